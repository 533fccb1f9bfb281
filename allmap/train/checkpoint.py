"""Checkpoints that never execute code on load and are never left half-written.

A checkpoint is a ``torch.save`` file of tensors and plain containers only, loaded with
``torch.load(weights_only=True)`` (a crafted pickle is refused), written to a temporary file, flushed to
disk and renamed over the old one, so a crash mid-write leaves the previous checkpoint intact. A SHA-256
of the bytes is kept beside it and checked on load.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or not a safe checkpoint file."""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically, with its checksum in ``path + '.sha256'``."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    # Checksum first: a crash between the two writes leaves a new checksum beside the old file, which the
    # loader reports as damaged rather than trusting silently; the usual order would hide that case.
    _atomic_write(path.with_name(path.name + ".sha256"), (digest + "\n").encode())
    _atomic_write(path, data)


def load_checkpoint(path: str | Path, map_location: Any = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, verifying its checksum; never runs code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}; a run folder holds checkpoint.pt after its first save.")
    data = path.read_bytes()
    sums = path.with_name(path.name + ".sha256")
    if sums.is_file():
        expected = sums.read_text().strip()
        if hashlib.sha256(data).hexdigest() != expected:
            raise CheckpointError(f"checkpoint {str(path)!r} is damaged: its SHA-256 does not match {sums.name}.")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError / RuntimeError variants
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be loaded safely (only tensors and plain containers are "
            f"allowed): {str(err).splitlines()[0]}"
        ) from None
