"""Host tuning chosen at the entry point (the CLI), never as a side effect of a library call: intra-op
threads (``threads`` in run configs) and the CPU allocator setting behind ``retain_memory``.

PyTorch's CPU allocator is the C library's ``malloc``. glibc serves blocks above its mmap threshold (at most
32 MB) with ``mmap`` and returns them to the kernel on ``free``, so every training step that allocates
activations of that size (a conv4 layer on a 60-way ProtoNets episode is 72 MB) maps fresh pages and the
kernel zeroes each one on first touch: such a step can spend most of its time in page faults. With
``mmap`` off and trimming off, freed blocks are reused, at the cost of a higher peak RSS: memory the
process has used once stays with it. This is what jemalloc or tcmalloc would do, without preloading a
library. ``benchmarks/allocator.py`` measures both settings; docs/results.md has the figures.

Only glibc has these knobs (``mallopt``); elsewhere :func:`retain_freed_memory` does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from typing import Any

import torch

__all__ = ["retain_freed_memory", "apply_threads", "apply_host_settings"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # the largest int mallopt takes: 2 GiB of free top-of-heap before a trim


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse (``M_MMAP_MAX = 0``, trim threshold 2 GiB).

    Process-wide and one-way: it affects every later allocation of the process. Returns whether it took
    effect (``False`` off glibc, e.g. on macOS or musl).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def apply_threads(config: dict[str, Any]) -> None:
    """Set torch's intra-op threads from ``config['threads']`` (null keeps torch's default). Tiny models
    want one thread: a second one spends its time spin-waiting, and is slower still when the other core is
    busy."""
    if config.get("threads"):
        torch.set_num_threads(config["threads"])


def apply_host_settings(config: dict[str, Any]) -> None:
    """This process's CPU settings from a run config: intra-op threads (:func:`apply_threads`) and, unless
    ``retain_memory: false``, glibc's malloc keeping freed blocks (:func:`retain_freed_memory`). Process-wide:
    ``allmap train`` and ``allmap eval`` call it; a Python program calling :func:`allmap.app.train` chooses."""
    apply_threads(config)
    if config.get("retain_memory", True):
        retain_freed_memory()
