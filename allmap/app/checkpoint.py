"""Checkpoints that never execute code on load and are never left half-written.

A checkpoint is a ``torch.save`` file of tensors and plain containers only, loaded with
``torch.load(weights_only=True)`` (a crafted pickle is refused), written to a temporary file, flushed to
disk and renamed over the old one, so a crash mid-write leaves the previous checkpoint intact. The
SHA-256 of the bytes is kept beside it (``checkpoint.pt.sha256``) and checked on load; a checkpoint whose
checksum file is missing still loads (as tensors only), with a warning that it could not be verified.

A file that fails to load is named for what it is: *damaged* (checksum mismatch, truncated, not a zip
archive) or *refused* (its pickle names code or objects other than tensors, which is never run).

Kill-safe ordering: the checksum file and the checkpoint cannot be replaced in one atomic step, so a save
first writes a checksum file listing the new digest *and* the old one, then replaces the checkpoint,
then rewrites the checksum file with the new digest alone. A process killed at any instant (SIGKILL,
power loss after the fsyncs) leaves a checkpoint whose digest is listed, old or new; a damaged file
matches neither and is named in the error.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "read_verified", "loads_checkpoint", "CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or not a safe checkpoint file."""


#: what to do about a damaged checkpoint (said after every "is damaged")
_DAMAGED_ADVICE = "Resume from another copy of the run folder, or train again."


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sums_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically, with its checksum in ``path + '.sha256'``."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    sums = _sums_path(path)
    old = None
    if path.is_file():  # the current checkpoint's digest, if it is intact (a damaged one stays reported)
        current = hashlib.sha256(path.read_bytes()).hexdigest()
        listed = sums.read_text().split() if sums.is_file() else [current]
        old = current if current in listed else None
    if old is not None and old != digest:  # either file may be the one on disk until the rename below
        _atomic_write(sums, f"{digest}\n{old}\n".encode())
    _atomic_write(path, data)
    _atomic_write(sums, (digest + "\n").encode())


def read_verified(path: str | Path) -> bytes:
    """The bytes of the checkpoint at ``path`` after checking them against its ``.sha256`` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}; a run folder holds checkpoint.pt after its first save.")
    data = path.read_bytes()
    sums = _sums_path(path)
    if not sums.is_file():
        warnings.warn(
            f"{sums.name} is missing, so checkpoint {str(path)!r} cannot be verified against damage; "
            "loading it anyway (as tensors only).",
            UserWarning,
            stacklevel=2,
        )
        return data
    if hashlib.sha256(data).hexdigest() not in sums.read_text().split():
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged: its SHA-256 does not match {sums.name}. {_DAMAGED_ADVICE}"
        )
    return data


def _damage(data: bytes) -> str:
    """What is wrong with bytes that torch could not read as a checkpoint archive."""
    if not data:
        return "the file is empty"
    if not data.startswith(b"PK\x03\x04"):
        return "it is not a zip archive, which is what torch.save writes"
    return "it is truncated or its zip archive is corrupt"


def _refusal(err: pickle.UnpicklingError) -> str:
    """Why torch's weights-only unpickler refused a file, without its advice to load it unsafely."""
    found = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
    return f": it refers to {found.group(1)}" if found else ""


def loads_checkpoint(data: bytes, name: str = "checkpoint", map_location: Any = None) -> dict[str, Any]:
    """Decode checkpoint bytes with ``torch.load(weights_only=True)``: tensors and plain containers only."""
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols says nothing about our files
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # the weights-only unpickler met something it will not build
        raise CheckpointError(
            f"checkpoint {name!r} refused: not a weights file (it contains code or objects other than tensors"
            f"{_refusal(err)}); nothing in it was run. Load only checkpoints that allmap wrote."
        ) from None
    except Exception:  # torch raises RuntimeError / EOFError / KeyError / ValueError on broken bytes
        raise CheckpointError(f"checkpoint {name!r} is damaged ({_damage(data)}). {_DAMAGED_ADVICE}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {name!r} holds a {type(state).__name__}, not a checkpoint mapping.")
    return state


def load_checkpoint(path: str | Path, map_location: Any = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, verifying its checksum; never runs code."""
    return loads_checkpoint(read_verified(path), str(path), map_location)
