"""Few-shot episodes over a user's own images: one sub-folder per class, or a mini-ImageNet CSV split.

Two layouts are read:

* folders: ``ROOT/SPLIT/class_name/*.png|jpg|jpeg|bmp|gif`` (or ``ROOT/class_name/...`` when there is no
  ``SPLIT`` sub-folder), one sub-folder per class;
* a CSV split file as distributed with mini-ImageNet (Ravi & Larochelle 2017): ``ROOT/SPLIT.csv`` with the
  header ``filename,label`` and the images in ``ROOT/images/``.

Images are converted to ``channels`` (3: RGB, 1: grey) and resized to ``size x size`` (antialiased
bilinear, PIL) or, with ``size=None``, must all have the same size. They are kept as uint8 (a quarter of the
memory of float32; 60,000 84x84 RGB images take 1.3 GB) and become float in [0, 1] when an episode is
drawn. The decoded tensor is cached on disk, keyed by the files' names, sizes and modification times.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from allmap.tasks.episodes import ClassImages, Episodes
from allmap.tasks.omniglot import default_cache_dir

__all__ = ["load_image_folder", "ImageFolder", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def _list_folder(root: Path) -> dict[str, list[Path]]:
    classes = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            classes[d.name] = files
    if not classes:
        raise ValueError(
            f"image folder: {root} has no class sub-folders with images ({', '.join(IMAGE_SUFFIXES)}); expected "
            "ROOT/class_name/image.png, one sub-folder per class."
        )
    return classes


def _list_csv(path: Path, images: Path) -> dict[str, list[Path]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"filename", "label"} <= set(reader.fieldnames):
            raise ValueError(
                f"image folder: {path} must have the header 'filename,label' (the mini-ImageNet split files of "
                f"Ravi & Larochelle), got {reader.fieldnames}."
            )
        classes: dict[str, list[Path]] = {}
        for row in reader:
            classes.setdefault(row["label"], []).append(images / row["filename"])
    if not classes:
        raise ValueError(f"image folder: {path} lists no images.")
    missing = [p for files in classes.values() for p in files if not p.is_file()]
    if missing:
        raise ValueError(
            f"image folder: {len(missing)} images listed in {path} are missing, e.g. {missing[0]}; the images "
            f"belong in {images}."
        )
    return classes


def _decode(path: Path, size: int | None, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"image folder: cannot read {path} ({err}); the file is corrupt or not an image.") from err
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_image_folder(
    root: str | os.PathLike,
    split: str | None = None,
    size: int | None = 84,
    channels: int = 3,
    cache_dir: str | os.PathLike | None = None,
) -> ClassImages:
    """The images of ``root`` (see the module docstring for the layouts) as a :class:`ClassImages`.

    Args:
        root: the data folder.
        split: ``ROOT/SPLIT.csv`` or ``ROOT/SPLIT/`` if given and present; else ``root`` itself.
        size: resize to ``size x size``; ``None`` keeps the size, which must then be the same everywhere.
        channels: 3 (RGB) or 1 (grey).
        cache_dir: where decoded tensors are cached (default ``$ALLMAP_CACHE`` or ``~/.cache/allmap``).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"image folder: {root} is not a folder.")
    if channels not in (1, 3):
        raise ValueError(f"image folder: expected channels 1 (grey) or 3 (RGB), got {channels!r}.")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"image folder: expected size to be a positive integer or None, got {size!r}.")
    if split is not None and (root / f"{split}.csv").is_file():
        classes = _list_csv(root / f"{split}.csv", root / "images")
    elif split is not None and (root / split).is_dir():
        classes = _list_folder(root / split)
    else:
        classes = _list_folder(root)
    files = [p for fs in classes.values() for p in fs]
    h = hashlib.sha256(f"{size}|{channels}".encode())
    for name, fs in classes.items():
        h.update(name.encode())
        for p in fs:
            st = p.stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"imagefolder-{h.hexdigest()[:16]}.pt"
    names = tuple(classes)
    counts = torch.tensor([len(fs) for fs in classes.values()])
    if cache_file.is_file():
        try:
            return ClassImages(torch.load(cache_file, weights_only=True), counts, names=names)
        except Exception:  # a damaged cache is rebuilt, never trusted
            cache_file.unlink(missing_ok=True)
    arrays = [_decode(p, size, channels) for p in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = arrays[0].shape
        i = next(i for i, a in enumerate(arrays) if a.shape != first)
        raise ValueError(
            f"image folder: images have different sizes ({files[0]} is {first[2]}x{first[1]}, {files[i]} is "
            f"{arrays[i].shape[2]}x{arrays[i].shape[1]}); pass size=N to resize them all to N x N."
        )
    images = torch.from_numpy(np.stack(arrays))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        torch.save(images, tmp)
        tmp.replace(cache_file)
    except OSError:
        pass
    return ClassImages(images, counts, names=names)


class ImageFolder(Episodes):
    """N-way K-shot episodes over an image folder or a mini-ImageNet CSV split (see :func:`load_image_folder`).

    ``split`` is the phase the training loop asks for (``train``, ``val``, ``test``): ``ROOT/train.csv`` or
    ``ROOT/train/`` and so on. No rotations by default (natural images).

    Example:
        >>> family = ImageFolder("data/miniimagenet", split="test", ways=5, shots=5, queries=15)  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = None,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        size: int | None = 84,
        channels: int = 3,
        rotations: tuple[int, ...] | list[int] = (0,),
        cache_dir: str | os.PathLike | None = None,
        shift: int = 0,
        rotate: float = 0.0,
        scale: float = 0.0,
    ) -> None:
        data = load_image_folder(root, split, size=size, channels=channels, cache_dir=cache_dir)
        super().__init__(data, ways, shots, queries, rotations, shift=shift, rotate=rotate, scale=scale)
        self.split = split
