"""Continual streams: examples in a fixed order, class by class, consumed once by an online learner.

* :class:`ContinualStream`: an ordered sequence of examples (one at a time or in small batches) with the
  class boundaries, so evaluation can run during the stream (after each class).
* :func:`class_incremental`: the stream of the OML / ANML continual meta-test (Javed & White 2019,
  ``evaluate_omniglot`` of the OML code): the given drawings of each class, classes in the given order,
  labels ``0 .. N-1`` in that order.
* :class:`OMLTrajectories`: the meta-training tasks of OML (and ANML): a *trajectory* of ``ways`` classes
  seen ``shots`` images at a time in class order (the support set, consumed one image per inner step), and an
  outer set of ``queries`` further images of those classes plus ``remember`` images of other classes (the
  query set), as the OML code samples them after its July 2020 fix.
* :class:`IncrementalSine`: OML's incremental sine regression, 10 functions learned in sequence, each in
  its own one-hot task slot of the input.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from allmap.checks import check_int
from allmap.tasks.batch import TaskBatch
from allmap.tasks.omniglot import DRAWINGS, omniglot_data

__all__ = [
    "ContinualStream",
    "class_incremental",
    "OMLTrajectories",
    "IncrementalSine",
    "background_order",
    "evaluation_order",
]


@dataclass(frozen=True)
class ContinualStream:
    """``x [M, *x]``, ``y [M]`` in stream order, read in batches of ``batch`` examples, in one pass.

    ``ends[c]`` is the number of examples seen once the ``c``-th class of the stream is complete, so
    ``x[:ends[c]]`` is what a learner has seen after ``c + 1`` classes.

    Example:
        >>> s = ContinualStream(torch.arange(6.0).view(6, 1), torch.tensor([0, 0, 0, 1, 1, 1]))
        >>> [b[1].tolist() for b in s], s.ends.tolist()
        ([[0], [0], [0], [1], [1], [1]], [3, 6])
    """

    x: Tensor
    y: Tensor
    batch: int = 1

    def __post_init__(self) -> None:
        check_int("ContinualStream", "batch", self.batch)
        if self.y.dim() != 1 or self.x.shape[:1] != self.y.shape:
            raise ValueError(
                f"ContinualStream: expected x [M, ...] and labels y [M], got x {list(self.x.shape)} and y "
                f"{list(self.y.shape)}."
            )
        if self.y.numel() and bool((self.y[1:] < self.y[:-1]).any()):
            raise ValueError(
                "ContinualStream: labels must come class by class in increasing order (0, 0, ..., 1, 1, ...); "
                "relabel the classes in the order they appear (class_incremental does)."
            )

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, len(self.y), self.batch):
            yield self.x[i : i + self.batch], self.y[i : i + self.batch]

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch)

    @property
    def classes(self) -> int:
        return int(self.y.max()) + 1 if self.y.numel() else 0

    @property
    def ends(self) -> Tensor:
        """Examples seen when each class is complete, ``[classes]``."""
        return torch.bincount(self.y, minlength=self.classes).cumsum(0)


def class_incremental(data: Tensor, classes: Sequence[int] | Tensor, drawings: Sequence[int], batch: int = 1):
    """The stream of ``data [C, D, *x]``'s ``classes`` (rows, in this order), each with its ``drawings``
    (columns, in this order); the ``k``-th class is labelled ``k``."""
    rows = torch.as_tensor(classes, dtype=torch.long)
    cols = torch.as_tensor(list(drawings), dtype=torch.long)
    if rows.dim() != 1 or not len(rows) or not len(cols):
        raise ValueError("class_incremental: expected a non-empty list of classes and of drawings.")
    x = data[rows][:, cols]
    y = torch.arange(len(rows)).repeat_interleave(len(cols))
    return ContinualStream(x.reshape(-1, *data.shape[2:]), y, batch)


def background_order(root: str | os.PathLike | None = None, size: int = 28) -> Tensor:
    """Omniglot's background characters as ``[963, 20, 1, size, size]``: characters 1-963 in official order
    (the 963 meta-training classes of the OML code; character 964 is unused there too)."""
    return omniglot_data(root, size).split("background").images[:963].unsqueeze(2)


def evaluation_order(root: str | os.PathLike | None = None, size: int = 28) -> Tensor:
    """Omniglot's 659 evaluation characters as ``[659, 20, 1, size, size]``, in official order."""
    return omniglot_data(root, size).split("evaluation").images.unsqueeze(2)


REMEMBER = ("first-half", "all")


class OMLTrajectories:
    """OML's meta-training tasks over Omniglot (Javed & White 2019, the OML code's ``oml_omniglot.py``).

    The classes of the split are numbered ``0 .. C-1`` (official order); the first half (``0 .. C//2 - 1``) gives
    the remember images, the second half the trajectory classes. Each task draws ``ways`` trajectory classes
    and, for each, ``shots + queries`` distinct drawings at random: the support set is the ``shots`` images
    of each class, class after class (one inner step per image), the query set is ``remember`` images drawn
    at random from the remember classes followed by the ``queries`` other images of each trajectory class.
    Labels are the class numbers (a head with one output per class of the split, or more).

    With ``remember_from="all"`` the remember images come from every class of the split: the i.i.d. batches
    of the pretraining baseline (with ``inner_steps: 0`` the query set is an ordinary minibatch).

    Args:
        root: the Omniglot folder (see :func:`~allmap.tasks.omniglot.load_omniglot`).
        split: ``train`` (background characters 1-963, the OML code's 963 classes) or ``val``/``test``
            (the 659 evaluation characters), for a sanity check of the meta-objective on new classes.
        ways, shots, queries, remember: 3, 5, 5 and 15 in the OML code.
        remember_from: ``"first-half"`` (OML) or ``"all"``.

    Example:
        >>> tasks = OMLTrajectories().sample(1, torch.Generator().manual_seed(0))   # doctest: +SKIP
        >>> tasks.support_x.shape, tasks.query_x.shape                              # doctest: +SKIP
        (torch.Size([1, 15, 1, 28, 28]), torch.Size([1, 30, 1, 28, 28]))
    """

    classification = True

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        ways: int = 3,
        shots: int = 5,
        queries: int = 5,
        remember: int = 15,
        remember_from: str = "first-half",
        size: int = 28,
    ) -> None:
        owner = "OMLTrajectories"
        if split not in ("train", "val", "test"):
            raise ValueError(f"{owner}: expected split train, val or test, got {split!r}.")
        if remember_from not in REMEMBER:
            raise ValueError(f"{owner}: expected remember_from one of {', '.join(REMEMBER)}, got {remember_from!r}.")
        self.ways = check_int(owner, "ways", ways)
        self.shots = check_int(owner, "shots", shots)
        self.queries = check_int(owner, "queries", queries, 0)
        self.remember = check_int(owner, "remember", remember, 0)
        if self.shots + self.queries > DRAWINGS:
            raise ValueError(f"{owner}: shots + queries = {self.shots + self.queries}, but a class has {DRAWINGS}.")
        self.split, self.remember_from = split, remember_from
        self.images = background_order(root, size) if split == "train" else evaluation_order(root, size)
        count = self.images.shape[0]
        half = count // 2  # the OML code: remember classes range(int(963 / 2)) = 0..480, trajectories 481..962
        self.trajectory_classes = torch.arange(half, count)
        self.remember_classes = torch.arange(count) if remember_from == "all" else torch.arange(half)
        if self.ways > len(self.trajectory_classes):
            raise ValueError(
                f"{owner}: ways = {self.ways}, but only {len(self.trajectory_classes)} trajectory classes."
            )
        first = 1 if split == "train" else 965
        self.names = tuple(f"{first + i:04d}" for i in range(count))
        self.x_shape = tuple(self.images.shape[2:])
        self.x_dim = int(torch.tensor(self.x_shape).prod())
        self.y_dim = count

    @property
    def data(self) -> OMLTrajectories:
        """The family itself: its ``names`` are the characters it draws from (checked for overlap with a test
        family's)."""
        return self

    def sample(self, n: int, generator: torch.Generator) -> TaskBatch:
        check_int("OMLTrajectories", "the number of tasks", n)
        k, q, w = self.shots, self.queries, self.ways
        pick = torch.rand(n, len(self.trajectory_classes), generator=generator).argsort(1)[:, :w]
        classes = self.trajectory_classes[pick]  # [n, w]
        drawings = torch.rand(n, w, DRAWINGS, generator=generator).argsort(2)[:, :, : k + q]
        traj = self.images[classes.unsqueeze(-1), drawings]  # [n, w, k + q, *x]
        labels = classes.unsqueeze(-1).expand(n, w, k + q)
        flat = torch.randint(len(self.remember_classes) * DRAWINGS, (n, self.remember), generator=generator)
        r_cls, r_draw = self.remember_classes[flat // DRAWINGS], flat % DRAWINGS
        query_x = torch.cat([self.images[r_cls, r_draw], traj[:, :, k:].reshape(n, w * q, *self.x_shape)], 1)
        query_y = torch.cat([r_cls, labels[:, :, k:].reshape(n, w * q)], 1)
        return TaskBatch(
            traj[:, :, :k].reshape(n, w * k, *self.x_shape),
            labels[:, :, :k].reshape(n, w * k),
            query_x,
            query_y,
            {"classes": classes},
        )

    def describe(self) -> str:
        source = "background characters 1-963" if self.split == "train" else "evaluation characters"
        return (
            f"OML trajectories: {self.ways} classes x {self.shots} images in class order, outer set "
            f"{self.queries} more per class + {self.remember} remember images ({self.remember_from}); {source}"
        )


class IncrementalSine:
    """Incremental sine regression (Javed & White 2019, the OML code's ``oml_regression.py``): ``slots`` sine
    functions ``y = a sin(x + phi)`` learned one after another, each given its own task slot.

    Each function draws ``a`` uniform in ``[0.1, 5.1]`` and ``phi`` uniform in ``[0, pi]`` (the OML code's
    ``(rand + 0.02) * 5`` and ``rand * pi``); ``x`` is uniform in ``[-5, 5]``. The input is the one-hot slot
    of the function (``slots`` entries) followed by ``x``, ``[slots + 1]``; the target is ``[1]``. A task
    draws ``slots`` functions, the ``k``-th in slot ``k``; its support set is ``shots`` points of function 0,
    then ``shots`` of function 1, ... (the trajectory, one inner step per point), its query set ``queries``
    further points of every function (the loss over all functions, which the online steps must not have
    overwritten). ``slot_of(x)`` gives each example's function, the stream's "class".

    Example:
        >>> tasks = IncrementalSine(shots=2, queries=1).sample(1, torch.Generator().manual_seed(0))
        >>> tasks.support_x.shape, tasks.query_x.shape, tasks.support_x[0, :, :10].argmax(-1).tolist()
        (torch.Size([1, 20, 11]), torch.Size([1, 10, 11]), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9])
    """

    classification = False

    def __init__(self, slots: int = 10, shots: int = 10, queries: int = 10) -> None:
        owner = "IncrementalSine"
        self.slots = check_int(owner, "slots", slots)
        self.shots = check_int(owner, "shots", shots)
        self.queries = check_int(owner, "queries", queries)
        self.x_dim, self.y_dim = self.slots + 1, 1

    def functions(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Amplitudes and phases ``[n, slots]`` of ``n`` sequences of functions."""
        amplitude = (torch.rand(n, self.slots, generator=generator) + 0.02) * 5.0
        return {"amplitude": amplitude, "phase": torch.rand(n, self.slots, generator=generator) * math.pi}

    def points(self, info: dict[str, Tensor], per: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``per`` points of each function, function by function: inputs ``[n, slots * per, slots + 1]`` and
        targets ``[n, slots * per, 1]``."""
        n = info["amplitude"].shape[0]
        x = torch.rand(n, self.slots, per, generator=generator) * 10.0 - 5.0
        y = info["amplitude"].unsqueeze(-1) * torch.sin(x + info["phase"].unsqueeze(-1))
        slot = torch.eye(self.slots).view(1, self.slots, 1, self.slots).expand(n, -1, per, -1)
        inputs = torch.cat([slot, x.unsqueeze(-1)], -1).reshape(n, self.slots * per, self.slots + 1)
        return inputs, y.reshape(n, self.slots * per, 1)

    def slot_of(self, x: Tensor) -> Tensor:
        """The function (slot) of each input ``[..., slots + 1]``."""
        return x[..., : self.slots].argmax(-1)

    def sample(self, n: int, generator: torch.Generator) -> TaskBatch:
        check_int("IncrementalSine", "the number of tasks", n)
        info = self.functions(n, generator)
        sx, sy = self.points(info, self.shots, generator)
        qx, qy = self.points(info, self.queries, generator)
        return TaskBatch(sx, sy, qx, qy, info)

    def describe(self) -> str:
        return (
            f"incremental sine regression: {self.slots} functions in sequence (one-hot slot + x), "
            f"{self.shots} points each in the trajectory, {self.queries} each in the outer set"
        )
