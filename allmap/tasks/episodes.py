"""N-way K-shot episodes over a labelled image collection, sampled without per-image Python work.

All images of a collection live in one tensor ``images [M, C, H, W]``; class ``c`` owns the rows
``starts[c] : starts[c] + counts[c]``. An episode draws ``ways`` classes, then ``shots + queries`` distinct
images of each, with a handful of vectorised tensor operations for the whole batch of episodes (random
keys + ``argsort``, one gather), so sampling costs a small fraction of a training step.

Rotations (Santoro et al. 2016; Vinyals et al. 2016): with ``rotations=(0, 90, 180, 270)`` every class
``c`` of the collection becomes four classes ``c + r * classes`` (``r`` indexes the rotation), rotated when
the episode is drawn, so they cost no memory.

Within-group episodes (Lake et al. 2015, "within-alphabet"): with ``within_group=True`` all ``ways``
classes of an episode come from one group (an Omniglot alphabet; rotated copies stay in their alphabet).

Labels inside an episode are ``0 .. ways-1`` in the order the classes were drawn (a random order); the
support and query sets are ordered class by class. ``info["classes"] [B, ways]`` holds the collection's
class ids (rotation included) and ``info["group"] [B]`` the group of within-group episodes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from allmap.checks import check_int
from allmap.tasks.batch import TaskBatch

__all__ = [
    "ClassImages",
    "Episodes",
    "EpisodeStream",
    "gaussian_classes",
    "translate",
    "translations",
    "warp",
    "affine",
]


def _positive_int(owner: str, name: str, value: object) -> int:
    return check_int(owner, name, value)


def translate(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Images ``[M, C, H, W]``, each moved by its own random offset ``(dy, dx)`` in ``[-shift, shift]^2``
    (uniform integers from ``generator``), zero filled: one padded gather, no per-image Python."""
    m, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (shift, shift, shift, shift))
    offset = torch.randint(0, 2 * shift + 1, (2, m), generator=generator)
    rows = (torch.arange(h)[None] + offset[0][:, None])[:, None, :, None]  # [M, 1, H, 1]
    cols = (torch.arange(w)[None] + offset[1][:, None])[:, None, None, :]  # [M, 1, 1, W]
    return padded[torch.arange(m)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def translations(x: Tensor, radius: int) -> list[Tensor]:
    """The ``(2 * radius + 1) ** 2`` copies of images ``[..., H, W]`` moved by every offset ``(dy, dx)`` in
    ``[-radius, radius]^2`` pixels, zero filled, the unmoved copy first (views of one padded tensor)."""
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (radius, radius, radius, radius))
    offsets = [(0, 0)] + [
        (dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1) if dy or dx
    ]
    return [padded[..., radius + dy : radius + dy + h, radius + dx : radius + dx + w] for dy, dx in offsets]


def warp(x: Tensor, rotate: float, scale: float, generator: torch.Generator) -> Tensor:
    """Images ``[M, C, H, W]``, each turned by its own random angle in ``[-rotate, rotate]`` degrees and
    zoomed by its own factor in ``[1 - scale, 1 + scale]`` about the image centre (uniform draws from
    ``generator``; see :func:`affine`). The small affine distortions of Koch et al. (2015) for one-shot
    Omniglot."""
    u = torch.rand(2, x.shape[0], generator=generator).mul_(2).sub_(1).to(x.device)
    return affine(x, u[0] * math.radians(rotate), 1 + u[1] * scale)


def affine(x: Tensor, angle: Tensor, zoom: Tensor) -> Tensor:
    """Images ``[M, C, H, W]`` turned counter-clockwise by ``angle [M]`` radians and magnified by
    ``zoom [M]`` about the image centre, resampled bilinearly with zero fill: one batched ``grid_sample``."""
    cos, sin, zero = angle.cos() / zoom, angle.sin() / zoom, torch.zeros_like(angle)
    # grid_sample maps output to input coordinates (x right, y down): the inverse of the turn and zoom.
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1).to(x.dtype)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class ClassImages:
    """Images grouped by class: ``images [M, C, H, W]`` sorted by class (float, or uint8 bytes that become
    float in [0, 1] when sampled), ``counts [classes]`` images per class, optional ``group [classes]`` (e.g.
    alphabet) and ``names`` of the classes."""

    images: Tensor
    counts: Tensor
    group: Tensor | None = None
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise ValueError(
                f"ClassImages: expected images of shape [M, channels, height, width], got {list(self.images.shape)}."
            )
        if self.counts.dim() != 1 or int(self.counts.sum()) != self.images.shape[0]:
            raise ValueError(
                f"ClassImages: counts (sum {int(self.counts.sum())}) must add up to the number of images "
                f"({self.images.shape[0]})."
            )
        if int(self.counts.min()) < 1:
            raise ValueError("ClassImages: every class needs at least one image.")
        if self.group is not None and self.group.shape != self.counts.shape:
            raise ValueError(f"ClassImages: group must have one entry per class ({len(self.counts)}).")

    @classmethod
    def from_grid(cls, images: Tensor, group: Tensor | None = None, names: Sequence[str] | None = None) -> ClassImages:
        """From ``[classes, per_class, H, W]`` (one channel) or ``[classes, per_class, C, H, W]``."""
        if images.dim() == 4:
            images = images.unsqueeze(2)
        if images.dim() != 5:
            raise ValueError(
                f"ClassImages.from_grid: expected [classes, per_class, (channels,) height, width], got "
                f"{list(images.shape)}."
            )
        c, k = images.shape[:2]
        return cls(
            images.reshape(c * k, *images.shape[2:]),
            torch.full((c,), k, dtype=torch.long),
            group,
            None if names is None else tuple(names),
        )

    @property
    def classes(self) -> int:
        return self.counts.shape[0]

    @property
    def starts(self) -> Tensor:
        return torch.cumsum(self.counts, 0) - self.counts


class Episodes:
    """A task family of N-way K-shot Q-query classification episodes over a :class:`ClassImages`.

    Args:
        data: the image collection.
        ways: classes per episode (N).
        shots: support images per class (K).
        queries: query images per class (Q).
        rotations: angles in degrees (multiples of 90) whose rotated copies are separate classes; ``(0,)``
            for none. Rotations by 90/270 need square images.
        within_group: draw all classes of an episode from one group (needs ``data.group``).
        shift: augmentation: every sampled image is translated by a random offset of up to ``shift``
            pixels in each direction (zero fill; :func:`translate`), drawn from the episode generator, so
            seeded episodes still repeat exactly. ``0`` (default): none. Run configs apply it to the
            training split only.
        rotate, scale: augmentation (:func:`warp`, applied before ``shift``): every sampled image is
            turned by a random angle of up to ``rotate`` degrees and zoomed by a random factor in
            ``[1 - scale, 1 + scale]``, zero fill, drawn from the episode generator. ``0`` (default): none.
            Training split only, like ``shift``.
        shuffle_support: put each support set in a random order instead of class by class (drawn from the
            episode generator after everything else, so the images drawn do not change). Learners that
            step on consecutive mini-batches of the support set (Reptile's ``inner_batch``) need it to see
            random mini-batches; to every other learner the order makes no difference.

    ``sample(n, generator)`` returns a :class:`~allmap.TaskBatch` with ``support_x [n, N*K, C, H, W]``,
    ``support_y [n, N*K]`` (int64 in ``0..N-1``), ``query_x [n, N*Q, C, H, W]``, ``query_y [n, N*Q]``.

    Example:
        >>> data = ClassImages.from_grid(torch.rand(10, 5, 8, 8))
        >>> tasks = Episodes(data, ways=3, shots=1, queries=2).sample(4, torch.Generator().manual_seed(0))
        >>> tasks.support_x.shape, tasks.query_y.shape
        (torch.Size([4, 3, 1, 8, 8]), torch.Size([4, 6]))
    """

    classification = True

    def __init__(
        self,
        data: ClassImages,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        rotations: Sequence[int] = (0,),
        within_group: bool = False,
        shift: int = 0,
        rotate: float = 0.0,
        scale: float = 0.0,
        shuffle_support: bool = False,
    ) -> None:
        if not isinstance(data, ClassImages):
            raise TypeError(f"Episodes: expected data to be an allmap.tasks.ClassImages, got {type(data).__name__}.")
        self.data = data
        self.ways = _positive_int("Episodes", "ways", ways)
        self.shots = _positive_int("Episodes", "shots", shots)
        self.queries = _positive_int("Episodes", "queries", queries)
        rotations = tuple(int(r) for r in rotations)
        if not rotations or any(r % 90 for r in rotations) or len(set(r % 360 for r in rotations)) != len(rotations):
            raise ValueError(f"Episodes: expected distinct rotations in multiples of 90 degrees, got {rotations}.")
        h, w = data.images.shape[-2:]
        if h != w and any(r % 180 for r in rotations):
            raise ValueError(f"Episodes: rotations by 90/270 degrees need square images, got {h}x{w}.")
        self.rotations = rotations
        self.within_group = bool(within_group)
        if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift < min(h, w):
            raise ValueError(
                f"Episodes: expected shift (random translation in pixels) to be an integer in "
                f"[0, {min(h, w) - 1}], got {shift!r}."
            )
        self.shift = shift
        for name, value, top in (("rotate", rotate, 180.0), ("scale", scale, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < top:
                raise ValueError(
                    f"Episodes: expected {name} (random {'angle in degrees' if top > 1 else 'zoom'} "
                    f"augmentation) to be a number in [0, {top:g}), got {value!r}."
                )
        self.rotate, self.scale = float(rotate), float(scale)
        if not isinstance(shuffle_support, bool):
            raise ValueError(f"Episodes: expected shuffle_support to be true or false, got {shuffle_support!r}.")
        self.shuffle_support = shuffle_support
        need = self.shots + self.queries
        small = torch.nonzero(data.counts < need).flatten()
        if len(small):
            c = int(small[0])
            name = data.names[c] if data.names else f"#{c}"
            raise ValueError(
                f"Episodes: class {name} has {int(data.counts[c])} images, fewer than shots + queries = {need} "
                f"({len(small)} classes are that small). Lower shots/queries or remove those classes."
            )
        base = data.classes
        self.classes = base * len(rotations)
        if self.within_group:
            if data.group is None:
                raise ValueError("Episodes: within_group=True needs data.group (e.g. the alphabet of each class).")
            group = data.group.repeat(len(rotations))
            sizes = torch.bincount(group)
            self._groups = torch.nonzero(sizes >= self.ways).flatten()
            if len(self._groups) == 0:
                raise ValueError(
                    f"Episodes: no group has {self.ways} classes (largest: {int(sizes.max())}); lower ways."
                )
            self._class_group = group
        elif self.ways > self.classes:
            raise ValueError(
                f"Episodes: ways = {self.ways} but the data have only {self.classes} classes "
                f"({base} x {len(rotations)} rotations). Lower ways or add classes."
            )
        self.x_shape = tuple(data.images.shape[1:])
        self.x_dim = int(torch.tensor(self.x_shape).prod())
        self.y_dim = self.ways
        self._starts = data.starts
        self._pixel_perms = None
        if any(r % 360 for r in rotations):
            grid = torch.arange(h * w).view(h, w)
            self._pixel_perms = torch.stack([torch.rot90(grid, (r // 90) % 4).flatten() for r in rotations])
        self._max_count = int(data.counts.max())

    # -- sampling ------------------------------------------------------------------------------------
    def _draw_classes(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        keys = torch.rand(n, self.classes, generator=generator)
        group = None
        if self.within_group:
            pick = torch.randint(len(self._groups), (n,), generator=generator)
            group = self._groups[pick]
            keys = keys.masked_fill(self._class_group[None, :] != group[:, None], 2.0)
        return keys.argsort(dim=1)[:, : self.ways], group

    def sample(self, n: int, generator: torch.Generator) -> TaskBatch:
        """``n`` episodes, drawn deterministically from ``generator``."""
        _positive_int("Episodes", "the number of tasks", n)
        need = self.shots + self.queries
        classes, group = self._draw_classes(n, generator)  # [n, N]
        base = classes % self.data.classes
        rot = classes // self.data.classes
        counts = self.data.counts[base]  # [n, N]
        keys = torch.rand(n, self.ways, self._max_count, generator=generator)
        keys = keys.masked_fill(torch.arange(self._max_count) >= counts[..., None], 2.0)
        pick = keys.argsort(dim=2)[..., :need]  # distinct images of each class
        rows = self._starts[base][..., None] + pick  # [n, N, K+Q]
        x = self.data.images[rows.flatten()].reshape(n, self.ways, need, *self.x_shape)
        if x.dtype == torch.uint8:  # image folders are stored as bytes
            x = x.float().div_(255.0)
        if self._pixel_perms is not None:
            # A rotation is a permutation of pixels: one gather rotates every class by its own angle.
            flat = x.flatten(-2)  # [n, N, K+Q, C, H*W]
            index = self._pixel_perms[rot][:, :, None, None, :].expand(flat.shape)
            x = torch.gather(flat, -1, index).view(x.shape)
        if self.rotate or self.scale:
            x = warp(x.flatten(0, 2), self.rotate, self.scale, generator).view(x.shape)
        if self.shift:
            x = translate(x.flatten(0, 2), self.shift, generator).view(x.shape)
        y = torch.arange(self.ways).view(1, self.ways, 1).expand(n, self.ways, need)
        k = self.shots
        info = {"classes": classes}
        if group is not None:
            info["group"] = group
        support_x = x[:, :, :k].reshape(n, self.ways * k, *self.x_shape)
        support_y = y[:, :, :k].reshape(n, self.ways * k)
        if self.shuffle_support:
            order = torch.rand(n, self.ways * k, generator=generator).argsort(dim=1)
            support_x, support_y = support_x[torch.arange(n)[:, None], order], support_y.gather(1, order)
        return TaskBatch(
            support_x,
            support_y,
            x[:, :, k:].reshape(n, self.ways * self.queries, *self.x_shape),
            y[:, :, k:].reshape(n, self.ways * self.queries),
            info,
        )

    def fixed(self, n: int, seed: int, batch: int = 100) -> list[TaskBatch]:
        """``n`` evaluation episodes fixed by ``seed`` (the same on every call and machine), in batches."""
        generator = torch.Generator().manual_seed(seed)
        out = []
        for i in range(0, n, batch):
            out.append(self.sample(min(batch, n - i), generator))
        return out

    def __repr__(self) -> str:
        return (
            f"Episodes(ways={self.ways}, shots={self.shots}, queries={self.queries}, classes={self.classes}, "
            f"rotations={self.rotations}, within_group={self.within_group})"
        )


class EpisodeStream(torch.utils.data.IterableDataset):
    """An endless stream of episode batches for a ``torch.utils.data.DataLoader`` (``batch_size=None``).

    Each worker draws from its own generator seeded with ``seed + 1000003 * worker_id``, so a run with the
    same seed and number of workers repeats exactly. With ``num_workers=0`` this equals calling
    ``family.sample(meta_batch, torch.Generator().manual_seed(seed))`` repeatedly.
    """

    def __init__(self, family: Episodes, meta_batch: int, seed: int = 0) -> None:
        self.family = family
        self.meta_batch = _positive_int("EpisodeStream", "meta_batch", meta_batch)
        self.seed = int(seed)

    def __iter__(self) -> Iterator[TaskBatch]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        generator = torch.Generator().manual_seed(self.seed + 1000003 * worker)
        while True:
            yield self.family.sample(self.meta_batch, generator)


def gaussian_classes(
    classes: int = 40, per_class: int = 10, shape: Sequence[int] = (1, 4, 4), noise: float = 0.5, seed: int = 0
) -> ClassImages:
    """A synthetic collection for fast tests: class ``c`` is ``N(mu_c, noise^2 I)`` with ``mu_c ~ N(0, I)``.

    Example:
        >>> Episodes(gaussian_classes(), ways=5, shots=1, queries=2).sample(3, torch.Generator()).support_x.shape
        torch.Size([3, 5, 1, 4, 4])
    """
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(classes, 1, *shape, generator=g)
    x = mu + noise * torch.randn(classes, per_class, *shape, generator=g)
    return ClassImages(
        x.reshape(classes * per_class, *shape),
        torch.full((classes,), per_class, dtype=torch.long),
        group=torch.arange(classes) % 4,
    )
