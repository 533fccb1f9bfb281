"""Ordinary classification data split into train / validation / test, with no download.

* :func:`digits`: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes; ships inside the
  ``scikit-learn`` package, an optional extra).
* :func:`omniglot_classes`: the first ``classes`` characters of Omniglot's background alphabets as an
  ordinary ``classes``-way classification set (each character's 20 drawings split among the phases).
* :func:`from_class_images`: any :class:`~allmap.tasks.ClassImages`, for example a class-folder dataset read by
  :func:`allmap.tasks.imagefolder.load_image_folder`.

Every split is stratified (each class is divided among the phases in the same proportions) and seeded.
:func:`flip_labels` corrupts a fraction of the training labels, for label-noise experiments.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from allmap.tasks.episodes import ClassImages

__all__ = ["Split", "digits", "omniglot_classes", "from_class_images", "stratified_split", "flip_labels", "load_data"]

FRACTIONS = (0.6, 0.2, 0.2)


@dataclass(frozen=True)
class Split:
    """Inputs ``x_*`` (float) and integer labels ``y_*`` of the three phases, and the number of classes."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: int

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Split:
        """The same split on ``device``, inputs in ``dtype`` (labels stay integers)."""
        xs = {k: getattr(self, k).to(device=device, dtype=dtype) for k in ("x_train", "x_val", "x_test")}
        ys = {k: getattr(self, k).to(device=device) for k in ("y_train", "y_val", "y_test")}
        return replace(self, **xs, **ys)

    def describe(self) -> str:
        return (
            f"{self.classes} classes, {len(self.y_train)} train / {len(self.y_val)} validation / "
            f"{len(self.y_test)} test examples"
        )


def stratified_split(x: Tensor, y: Tensor, fractions: Sequence[float] = FRACTIONS, seed: int = 0) -> Split:
    """Divide each class's examples among train / validation / test in proportions ``fractions``."""
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"expected three positive fractions (train, validation, test) summing to 1, got {fractions}.")
    g = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[], [], []]
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_train = max(1, round(fractions[0] * len(idx)))
        n_val = max(1, round(fractions[1] * len(idx)))
        if n_train + n_val >= len(idx):
            raise ValueError(f"class {int(c)} has {len(idx)} examples, too few to split three ways; expected >= 3.")
        for part, chunk in zip(parts, (idx[:n_train], idx[n_train : n_train + n_val], idx[n_train + n_val :])):
            part.append(chunk)
    tr, va, te = (torch.cat(p)[torch.randperm(int(sum(len(c) for c in p)), generator=g)] for p in parts)
    return Split(x[tr], y[tr], x[va], y[va], x[te], y[te], int(y.max()) + 1)


def digits(fractions: Sequence[float] = FRACTIONS, seed: int = 0, flat: bool = True) -> Split:
    """scikit-learn's digits (pixels scaled to [0, 1]); ``flat``: vectors of 64, else images ``[1, 8, 8]``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "the digits data set comes with scikit-learn, which is not installed; `pip install scikit-learn`, "
            "or use dataset 'omniglot' or a class folder."
        ) from err
    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32) / 16.0
    x = x if flat else x.reshape(-1, 1, 8, 8)
    return stratified_split(x, torch.as_tensor(data.target, dtype=torch.long), fractions, seed)


def from_class_images(
    data: ClassImages, fractions: Sequence[float] = FRACTIONS, seed: int = 0, flat: bool = False
) -> Split:
    """An ordinary classification split of the images of a :class:`~allmap.tasks.ClassImages` (one label per class)."""
    images = data.images.float() / 255.0 if data.images.dtype == torch.uint8 else data.images.float()
    y = torch.repeat_interleave(torch.arange(data.classes), data.counts)
    return stratified_split(images.flatten(1) if flat else images, y, fractions, seed)


def omniglot_classes(
    root: str | os.PathLike, classes: int = 20, size: int = 14, fractions: Sequence[float] = FRACTIONS, seed: int = 0
) -> Split:
    """The first ``classes`` background characters of Omniglot at ``size x size`` as a classification set."""
    from allmap.tasks.omniglot import load_omniglot

    data = load_omniglot(root, size=size).split("background")
    if not 2 <= classes <= len(data):
        raise ValueError(f"omniglot_classes: expected 2 <= classes <= {len(data)}, got {classes}.")
    keep = torch.zeros(len(data), dtype=torch.bool)
    keep[:classes] = True
    return from_class_images(data.select(keep).classes(), fractions, seed)


def flip_labels(split: Split, fraction: float, seed: int = 0) -> tuple[Split, Tensor]:
    """``split`` with ``fraction`` of its training labels replaced by a different class drawn uniformly; returns
    the new split and the boolean mask of flipped examples (validation and test labels stay clean)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"flip_labels: expected 0 <= fraction < 1, got {fraction}.")
    g = torch.Generator().manual_seed(seed)
    n = len(split.y_train)
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=g)[: round(fraction * n)]] = True
    shift = torch.randint(1, split.classes, (n,), generator=g).to(split.y_train.device)
    y = torch.where(flipped.to(split.y_train.device), (split.y_train + shift) % split.classes, split.y_train)
    return replace(split, y_train=y), flipped


def load_data(name: str, seed: int = 0, flat: bool = True, root: str | None = None, **kwargs) -> Split:
    """A split by name: ``digits``, ``omniglot`` (``root`` the Omniglot folder, ``classes``, ``size``) or
    ``folder`` (``root`` a class-folder dataset, one sub-folder of images per class; ``size``, ``channels``,
    ``cache_dir`` as :func:`~allmap.tasks.imagefolder.load_image_folder`). ``flat``: inputs as vectors."""
    if name == "digits":
        return digits(seed=seed, flat=flat, **kwargs)
    if name == "omniglot":
        from allmap.tasks.omniglot import _resolve_root

        split = omniglot_classes(_resolve_root(root), seed=seed, **kwargs)
    elif name == "folder":
        if root is None:
            raise ValueError("dataset 'folder' needs root, the folder with one sub-folder of images per class.")
        from allmap.tasks.imagefolder import load_image_folder

        read = {k: kwargs.pop(k) for k in ("size", "channels", "cache_dir") if k in kwargs}
        read.setdefault("size", 28)
        read.setdefault("channels", 1)
        split = from_class_images(load_image_folder(root, **read), seed=seed, **kwargs)
    else:
        raise ValueError(f"unknown dataset {name!r}; expected digits, omniglot or folder.")
    return (
        replace(split, **{k: getattr(split, k).flatten(1) for k in ("x_train", "x_val", "x_test")}) if flat else split
    )
