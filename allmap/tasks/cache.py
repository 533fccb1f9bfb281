"""The disk cache of preprocessed datasets: keyed by content, bounded in size, least recently used evicted.

Loaders (:func:`~allmap.tasks.load_omniglot`, :func:`~allmap.tasks.imagefolder.load_image_folder`) keep
the tensors they decode in ``$ALLMAP_CACHE`` (default ``~/.cache/allmap``) so a second start skips the
decoding. An entry is named by a hash of the source files' bytes and the preprocessing parameters, so the
same data read from two paths, or copied with new modification times, is cached once, and changed data
is never served from an old entry.

Hashing every source file at every start would cost a read of the whole dataset, so the digest of a list
of files is remembered (in ``digests.json``) under the files' paths, sizes and modification times, as
``git`` does for its index; a changed file changes its size or modification time and is hashed again.

The cache holds at most ``$ALLMAP_CACHE_LIMIT`` bytes (default 2 GiB; a number of bytes or ``500M``,
``2G``; ``0`` turns the disk cache off). After a new entry is written, the least recently used entries
(by modification time, refreshed on every hit) are deleted until the rest fits. Deleting the folder is
always safe: entries are rebuilt from the sources.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "default_cache_dir",
    "cache_limit",
    "files_digest",
    "load_entry",
    "store_entry",
    "evict",
    "DEFAULT_LIMIT",
    "PREFIXES",
]

#: the default bound of the cache, in bytes (2 GiB).
DEFAULT_LIMIT = 2 << 30
#: names of the entries this package writes; nothing else in the folder is ever read or deleted.
PREFIXES = ("omniglot-", "imagefolder-")
_DIGESTS = "digests.json"
_MAX_DIGESTS = 512
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def default_cache_dir() -> Path:
    """``$ALLMAP_CACHE`` if set, else ``~/.cache/allmap``."""
    return Path(os.environ.get("ALLMAP_CACHE", Path.home() / ".cache" / "allmap"))


def cache_limit() -> int:
    """The cache's bound in bytes: ``$ALLMAP_CACHE_LIMIT`` (``2000000000``, ``500M``, ``2G``; ``0``: no disk
    cache), else :data:`DEFAULT_LIMIT`."""
    raw = os.environ.get("ALLMAP_CACHE_LIMIT", "").strip()
    if not raw:
        return DEFAULT_LIMIT
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", raw, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(
            f"ALLMAP_CACHE_LIMIT: expected a size in bytes such as 2000000000, 500M or 2G (0 turns the "
            f"disk cache off), got {raw!r}."
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _read_digests(cache: Path) -> dict[str, str]:
    try:
        data = json.loads((cache / _DIGESTS).read_text())
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def files_digest(files: Sequence[Path], cache: Path | None = None) -> str:
    """SHA-256 of the bytes of ``files`` in order (each length-prefixed), remembered in ``cache`` under their
    paths, sizes and modification times so an unchanged list is not read again."""
    stat = hashlib.sha256()
    for p in files:
        st = p.stat()
        stat.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    memo = stat.hexdigest()
    known = _read_digests(cache) if cache is not None else {}
    if memo in known:
        return known[memo]
    h = hashlib.sha256()
    for p in files:
        data = p.read_bytes()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    digest = h.hexdigest()
    if cache is not None and cache_limit() > 0:
        known.pop(memo, None)
        known[memo] = digest  # newest last; the oldest are dropped beyond _MAX_DIGESTS
        _write_atomic(cache / _DIGESTS, json.dumps(dict(list(known.items())[-_MAX_DIGESTS:])).encode())
    return digest


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError:  # a read-only cache location only costs speed
        pass


def load_entry(path: Path) -> Any | None:
    """The object saved at ``path`` (marked as just used), or ``None`` if it is absent or damaged (a damaged
    entry is deleted: it is rebuilt, never trusted)."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, weights_only=True)
    except Exception:
        path.unlink(missing_ok=True)
        return None
    try:
        os.utime(path)  # least recently used = oldest modification time
    except OSError:
        pass
    return obj


def store_entry(path: Path, obj: Any) -> None:
    """Save ``obj`` at ``path`` (atomically), then :func:`evict` down to :func:`cache_limit`. With a limit of
    0, or an entry larger than the limit, nothing is kept. Failing to write only costs speed."""
    limit = cache_limit()
    if limit <= 0:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(obj, tmp)
        if tmp.stat().st_size > limit:  # it would evict everything and still not fit
            tmp.unlink()
            return
        tmp.replace(path)
    except OSError:
        return
    evict(path.parent, limit)


def _entries(cache: Path) -> list[tuple[float, int, Path]]:
    out = []
    for p in cache.glob("*.pt"):
        if p.name.startswith(PREFIXES):
            try:
                st = p.stat()
            except OSError:  # deleted meanwhile by another process
                continue
            out.append((st.st_mtime, st.st_size, p))
    return sorted(out, key=lambda e: (e[0], e[2].name), reverse=True)  # most recently used first


def evict(cache: Path, limit: int | None = None) -> list[Path]:
    """Delete the least recently used entries of ``cache`` until the rest take at most ``limit`` bytes
    (default :func:`cache_limit`); return the deleted paths."""
    limit = cache_limit() if limit is None else limit
    total, deleted = 0, []
    for _, size, p in _entries(cache):
        total += size
        if total > limit:  # this entry and every older one
            p.unlink(missing_ok=True)
            deleted.append(p)
    return deleted
