"""Run independent pieces of CPU work in forked processes, one intra-op thread each.

On a few CPU cores, small convolutions (a 5-image support set, a 75-image query set) keep two intra-op
threads only partly busy; two processes with one thread each, every one working through its own share of
the evaluation episodes, keep both cores busy (see docs/results.md). ``torch.func``
transforms cannot run in two Python threads at once, so processes it is. ``fork`` shares the learner
copy-on-write: nothing is pickled but the results.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

__all__ = ["can_fork", "run_forked", "even_shares", "children_peak_mb", "rss_mb", "reset_peak_rss"]

T = TypeVar("T")
_CHILDREN_PEAK_MB: list[float | None] = []


def even_shares(n: int, parts: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of ``parts`` contiguous shares of ``n`` items, sizes differing by at most one."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def children_peak_mb() -> list[float | None]:
    """The rise of each child's peak resident memory (MB) in the last :func:`run_forked` call, for benchmarks
    that count all the memory a computation used (``None`` where ``/proc`` cannot tell)."""
    return list(_CHILDREN_PEAK_MB)


def rss_mb(field: str) -> float | None:
    """``field`` of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in MB; ``None`` where there is none."""
    try:
        with open("/proc/self/status") as f:
            lines = f.read().splitlines()
        for line in lines:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the peak resident memory (``VmHWM``) to the current one, and forget the children's peaks of
    earlier :func:`run_forked` calls (so :func:`children_peak_mb` counts only what runs after); whether the
    reset of ``VmHWM`` worked."""
    _CHILDREN_PEAK_MB.clear()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def can_fork() -> bool:
    """Whether forking is safe here: Linux (``fork`` is the platform's own start method; macOS system
    frameworks are not fork-safe), and no CUDA context (a forked child cannot use its parent's)."""
    return (
        sys.platform.startswith("linux")
        and "fork" in multiprocessing.get_all_start_methods()
        and not torch.cuda.is_initialized()
    )


def _child(fn: Callable[[Any], T], piece: Any, write_fd: int) -> None:
    """In the forked child: compute ``fn(piece)`` with one thread, send it (or the error), exit.
    Ctrl-C and SIGTERM reach the whole process group; the parent decides what they mean (it stops its
    children if it gives up), so a child ignores them and finishes its short share."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    status, start = 0, rss_mb("VmRSS") if reset_peak_rss() else None
    try:
        torch.set_num_threads(1)
        value = fn(piece)
        peak = rss_mb("VmHWM")
        payload = (True, (value, None if start is None or peak is None else max(peak - start, 0.0)))
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent, which raises it
        payload, status = (False, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"), 1
    try:
        with os.fdopen(write_fd, "wb") as pipe:
            pickle.dump(payload, pipe, protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        os._exit(status)  # no atexit handlers or buffered output of the parent run twice


def _one_thread(fn: Callable[[Any], T], piece: Any) -> T:
    """``fn(piece)`` in this process with one intra-op thread, the thread count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(piece)
    finally:
        torch.set_num_threads(threads)


def run_forked(
    fn: Callable[[Any], T], pieces: Sequence[Any], here: bool = False, done: Callable[[int], None] | None = None
) -> list[T]:
    """``[fn(p) for p in pieces]``, each piece in a forked child process, all at once, every child with one
    intra-op thread (GNU OpenMP's thread pool does not survive ``fork``: a child that starts a parallel
    region after its parent has used the pool waits forever at its barrier; with one thread there is no
    parallel region). This process waits, or with ``here`` computes the first piece itself, with one
    intra-op thread while the children run (its thread count is restored after): one process fewer, and
    the caches this process has already paid for (a forked child pays them again) serve that piece.
    Results come back in order; an error in a child is raised here as ``RuntimeError`` with the child's
    traceback (an error of the piece computed here, as itself, after the children are stopped). ``fn``'s
    results must pickle. ``done(i)``, if given, is called here as the result of piece ``i`` arrives (in
    order; e.g. to advance a progress bar). Call only where :func:`can_fork` holds.
    """
    _CHILDREN_PEAK_MB.clear()
    here = here and len(pieces) > 0
    children = []
    try:
        for piece in pieces[1:] if here else pieces:
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child, which never returns
                os.close(read_fd)
                _child(fn, piece, write_fd)
            os.close(write_fd)
            children.append((pid, read_fd))
        results = [_one_thread(fn, pieces[0])] if here else []
        if here and done is not None:
            done(0)
        while children:
            pid, read_fd = children.pop(0)
            try:
                with os.fdopen(read_fd, "rb") as pipe:
                    data = pipe.read()
            finally:
                os.waitpid(pid, 0)
            if not data:
                raise RuntimeError(f"forked worker {pid} died without a result (killed, or out of memory?)")
            ok, value = pickle.loads(data)
            if not ok:
                raise RuntimeError(f"forked worker {pid} failed:\n{value}")
            results.append(value[0])
            _CHILDREN_PEAK_MB.append(value[1])
            if done is not None:
                done(len(results) - 1)
        return results
    finally:
        for pid, read_fd in children:  # an error or Ctrl-C here: stop the others, leave no zombies
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            try:
                os.close(read_fd)
            except OSError:
                pass
