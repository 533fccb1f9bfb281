"""Few-shot episodes over a user's own images: one sub-folder per class, or a mini-ImageNet CSV split.

Three layouts are read:

* split folders: ``ROOT/train/class_name/*.png|jpg|jpeg|bmp|gif``, ``ROOT/val/...`` and ``ROOT/test/...``,
  one sub-folder per class, each phase with its own classes;
* a flat folder: ``ROOT/class_name/*.png`` (no ``train/``, ``val/`` or ``test/``). The classes are split
  between the phases by :func:`split_classes`: the sorted class names shuffled with a fixed seed
  (``split_seed``, 0), the first 64% for training, the next 16% for validation, the last 20% for test
  (``split_fractions``);
* a CSV split file as distributed with mini-ImageNet (Ravi & Larochelle 2017): ``ROOT/SPLIT.csv`` with the
  header ``filename,label`` and the images in ``ROOT/images/``.

Hidden entries (names starting with ``.``: ``.ipynb_checkpoints/``, macOS ``._*`` files) are skipped.
Images are converted to ``channels`` (3: RGB, 1: grey) and resized to ``size x size`` (antialiased
bilinear, PIL) or, with ``size=None``, must all have the same size. They are kept as uint8 (a quarter of the
memory of float32; 60,000 84x84 RGB images take 1.3 GB) and become float in [0, 1] when an episode is
drawn. The decoded tensor is cached on disk, keyed by the images' bytes (see :mod:`allmap.tasks.cache`).
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from allmap.tasks.cache import default_cache_dir, files_digest, load_entry, store_entry
from allmap.tasks.episodes import ClassImages, Episodes

__all__ = [
    "load_image_folder",
    "ImageFolder",
    "IMAGE_SUFFIXES",
    "PHASES",
    "SPLIT_FRACTIONS",
    "split_classes",
    "folder_layout",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
#: the phases a run reads: training, validation and test classes.
PHASES = ("train", "val", "test")
#: the shares of a flat folder's classes for training, validation and test (mini-ImageNet's 64/16/20 of 100).
SPLIT_FRACTIONS = (0.64, 0.16, 0.20)
CACHE_VERSION = 1


def _visible(path: Path) -> bool:
    """Not a hidden entry (``.ipynb_checkpoints``, macOS ``._*`` resource forks, ``.DS_Store``)."""
    return not path.name.startswith(".")


def _list_folder(root: Path) -> dict[str, list[Path]]:
    classes = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and _visible(p)):
        files = sorted(p for p in d.iterdir() if _visible(p) and p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            classes[d.name] = files
    if not classes:
        raise ValueError(
            f"image folder: {root} has no class sub-folders with images ({', '.join(IMAGE_SUFFIXES)}); expected "
            "ROOT/class_name/image.png, one sub-folder per class."
        )
    return classes


def folder_layout(root: str | os.PathLike) -> str:
    """``"csv"`` if ``root`` has ``train.csv``, ``val.csv`` or ``test.csv``; ``"split"`` if it has a ``train/``,
    ``val/`` or ``test/`` folder; else ``"flat"`` (``ROOT/class_name/...``)."""
    root = Path(root)
    if any((root / f"{s}.csv").is_file() for s in PHASES):
        return "csv"
    if any((root / s).is_dir() for s in PHASES):
        return "split"
    return "flat"


def split_classes(
    names: Sequence[str], seed: int = 0, fractions: Sequence[float] = SPLIT_FRACTIONS
) -> dict[str, tuple[str, ...]]:
    """The classes of a flat folder for each phase: ``sorted(names)`` in the order of NumPy's legacy
    ``RandomState(seed).permutation`` (a stream NumPy keeps stable across versions); the last
    ``round(fractions[2] * n)`` are the test classes, the ``round(fractions[1] * n)`` before them the
    validation classes (each at least one; rounded half up), the rest the training classes.

    Example:
        >>> {k: len(v) for k, v in split_classes([f"c{i}" for i in range(100)]).items()}
        {'train': 64, 'val': 16, 'test': 20}
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or not all(0 < f < 1 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"image folder: expected split_fractions to be three shares of the classes (train, val, "
            f"test), each in (0, 1), adding up to 1, such as {list(SPLIT_FRACTIONS)}; got {list(fractions)}."
        )
    ordered = sorted(names)
    n = len(ordered)
    n_val, n_test = (max(1, math.floor(f * n + 0.5)) for f in fractions[1:])
    if n - n_val - n_test < 1:
        raise ValueError(
            f"image folder: a flat folder needs at least 3 classes to split between train, val and test; it has {n}."
        )
    shuffled = [ordered[i] for i in np.random.RandomState(seed).permutation(n)]
    n_train = n - n_val - n_test
    return {
        "train": tuple(shuffled[:n_train]),
        "val": tuple(shuffled[n_train : n_train + n_val]),
        "test": tuple(shuffled[n_train + n_val :]),
    }


def _missing_phase(root: Path, split: str, layout: str) -> ValueError:
    present = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir() if _visible(p)))
    if layout == "csv":
        return ValueError(
            f"image folder: {root / (split + '.csv')} is missing. {root} holds {present}, so it is read as a "
            "CSV split (mini-ImageNet): ROOT/train.csv, ROOT/val.csv and ROOT/test.csv (header filename,label) "
            "with the images in ROOT/images/. Add the missing file."
        )
    return ValueError(
        f"image folder: {root / split}/ is missing. {root} holds {present}, so it is read as split folders: "
        "ROOT/train/CLASS/*.png, ROOT/val/CLASS/*.png and ROOT/test/CLASS/*.png, each phase with classes of its "
        f"own. Add {split}/ (or move its classes out of train/), or use a flat folder ROOT/CLASS/*.png with no "
        "train/ val/ test/, whose classes are split for you (task.split_seed, task.split_fractions)."
    )


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


def _decode_classes(classes: dict[str, list[Path]], size: int | None, channels: int, cache: Path) -> ClassImages:
    """Decode every image of ``classes`` (in order), through the disk cache keyed by their bytes."""
    files = [p for fs in classes.values() for p in fs]
    h = hashlib.sha256(f"imagefolder|v{CACHE_VERSION}|{size}|{channels}".encode())
    for name, fs in classes.items():
        h.update(f"{name}|{len(fs)}\n".encode())
    h.update(files_digest(files, cache).encode())
    cache_file = cache / f"imagefolder-{h.hexdigest()[:24]}.pt"
    names = tuple(classes)
    counts = torch.tensor([len(fs) for fs in classes.values()])
    images = load_entry(cache_file)
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[0] == len(files):
        return ClassImages(images, counts, names=names)
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
    store_entry(cache_file, images)
    return ClassImages(images, counts, names=names)


def _select(data: ClassImages, names: Sequence[str]) -> ClassImages:
    """The classes ``names`` of ``data`` (in the order of ``data``)."""
    wanted = set(names)
    keep = torch.tensor([n in wanted for n in data.names])
    rows = torch.repeat_interleave(keep, data.counts)
    return ClassImages(data.images[rows], data.counts[keep], names=tuple(n for n in data.names if n in wanted))


def _load(
    root: str | os.PathLike,
    split: str | None,
    size: int | None,
    channels: int,
    cache_dir: str | os.PathLike | None,
    split_seed: int,
    split_fractions: Sequence[float],
) -> tuple[ClassImages, str]:
    """The classes of ``split`` (see :func:`load_image_folder`) and where they came from, in words."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"image folder: {root} is not a folder.")
    if channels not in (1, 3):
        raise ValueError(f"image folder: expected channels 1 (grey) or 3 (RGB), got {channels!r}.")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"image folder: expected size to be a positive integer or None, got {size!r}.")
    split_classes(["a", "b", "c"], split_seed, split_fractions)  # checks the fractions before any decoding
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    layout = folder_layout(root)
    if split is not None and (root / f"{split}.csv").is_file():
        return _decode_classes(
            _list_csv(root / f"{split}.csv", root / "images"), size, channels, cache
        ), f"{root / split}.csv"
    if split is not None and (root / split).is_dir() and _visible(root / split):
        return _decode_classes(_list_folder(root / split), size, channels, cache), f"{root / split}/"
    if split in PHASES and layout != "flat":
        raise _missing_phase(root, split, layout)
    if split is not None and split not in PHASES:
        raise ValueError(
            f"image folder: {root} has no {split}/ folder nor {split}.csv; expected a phase "
            f"({', '.join(PHASES)}) or the name of a sub-folder or CSV file of {root}."
        )
    data = _decode_classes(_list_folder(root), size, channels, cache)
    if split is None:
        return data, f"{root} (all classes)"
    chosen = split_classes(data.names, split_seed, split_fractions)[split]
    shares = "/".join(f"{100 * f:g}" for f in split_fractions)
    return _select(data, chosen), (
        f"{root}, {split} classes of a flat folder: {len(chosen)} of {data.classes}, "
        f"sorted class names shuffled with seed {split_seed}, {shares}% train/val/test"
    )


def load_image_folder(
    root: str | os.PathLike,
    split: str | None = None,
    size: int | None = 84,
    channels: int = 3,
    cache_dir: str | os.PathLike | None = None,
    split_seed: int = 0,
    split_fractions: Sequence[float] = SPLIT_FRACTIONS,
) -> ClassImages:
    """The images of ``root`` (see the module docstring for the layouts) as a :class:`ClassImages`.

    Args:
        root: the data folder.
        split: ``ROOT/SPLIT.csv`` or ``ROOT/SPLIT/`` if present; a phase (``train``, ``val``, ``test``) of a
            flat folder takes its share of the classes (:func:`split_classes`); ``None``: every class of
            ``root``.
        size: resize to ``size x size``; ``None`` keeps the size, which must then be the same everywhere.
        channels: 3 (RGB) or 1 (grey).
        cache_dir: where decoded tensors are cached (default ``$ALLMAP_CACHE`` or ``~/.cache/allmap``).
        split_seed, split_fractions: the split of a flat folder's classes (see :func:`split_classes`).
    """
    return _load(root, split, size, channels, cache_dir, split_seed, split_fractions)[0]


class ImageFolder(Episodes):
    """N-way K-shot episodes over an image folder or a mini-ImageNet CSV split (see :func:`load_image_folder`).

    ``split`` is the phase the training loop asks for (``train``, ``val``, ``test``): ``ROOT/train.csv`` or
    ``ROOT/train/`` and so on, or that phase's share of the classes of a flat folder (``split_seed``,
    ``split_fractions``: see :func:`split_classes`). No rotations by default (natural images). The other
    arguments are those of :class:`~allmap.tasks.Episodes` (``shuffle_support``: support sets in a random
    order, for learners that step on mini-batches of them, such as Reptile with ``inner_batch``).

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
        split_seed: int = 0,
        split_fractions: tuple[float, float, float] | list[float] = SPLIT_FRACTIONS,
        shuffle_support: bool = False,
    ) -> None:
        data, self.source = _load(root, split, size, channels, cache_dir, split_seed, split_fractions)
        try:
            super().__init__(
                data,
                ways,
                shots,
                queries,
                rotations,
                shift=shift,
                rotate=rotate,
                scale=scale,
                shuffle_support=shuffle_support,
            )
        except ValueError as err:
            flat = split in PHASES and folder_layout(Path(root).expanduser()) == "flat"
            shares = "; task.split_fractions sets the shares of train, val and test" if flat else ""
            raise ValueError(f"{err} (the {split or 'whole'} classes: {self.source}{shares})") from None
        self.split = split

    def describe(self) -> str:
        """Where the classes come from, written next to every reported number."""
        return self.source

    def __repr__(self) -> str:
        return f"ImageFolder(split={self.split!r}, " + super().__repr__()[len("Episodes(") :]
