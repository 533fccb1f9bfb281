"""A batch of few-shot tasks: support and query sets with a leading task dimension."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["TaskBatch", "shape_str"]


def shape_str(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


@dataclass(frozen=True)
class TaskBatch:
    """``B`` tasks, each a support set (to adapt on) and a query set (to score the adapted model on).

    Shapes: ``support_x [B, Ns, *x]``, ``support_y [B, Ns, *y]``, ``query_x [B, Nq, *x]``,
    ``query_y [B, Nq, *y]``. ``info`` holds optional per-task tensors with leading dimension ``B``
    (for example the amplitude and phase of a sinusoid), used for plots and reference solutions.

    Example:
        >>> tasks = TaskBatch(torch.zeros(4, 5, 1), torch.zeros(4, 5, 1), torch.zeros(4, 7, 1), torch.zeros(4, 7, 1))
        >>> len(tasks), tasks.shots
        (4, 5)
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    info: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = ("support_x", "support_y", "query_x", "query_y")
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise TypeError(f"TaskBatch: expected {name} to be a torch.Tensor, got {type(value).__name__}.")
            if value.dim() < 2:
                raise ValueError(
                    f"TaskBatch: expected {name} of shape [tasks, examples, ...], got {shape_str(value)}. "
                    "Add the task dimension with .unsqueeze(0) for a single task."
                )
        sx, sy, qx, qy = (getattr(self, n) for n in names)
        b = sx.shape[0]
        for name in names[1:]:
            if getattr(self, name).shape[0] != b:
                raise ValueError(
                    f"TaskBatch: every tensor needs the same number of tasks (dim 0); support_x has {b}, "
                    f"{name} has shape {shape_str(getattr(self, name))}."
                )
        if sy.shape[1] != sx.shape[1]:
            raise ValueError(
                f"TaskBatch: support_x {shape_str(sx)} and support_y {shape_str(sy)} must have the same number of "
                "examples (dim 1)."
            )
        if qy.shape[1] != qx.shape[1]:
            raise ValueError(
                f"TaskBatch: query_x {shape_str(qx)} and query_y {shape_str(qy)} must have the same number of "
                "examples (dim 1)."
            )
        if sx.shape[2:] != qx.shape[2:]:
            raise ValueError(
                f"TaskBatch: support_x {shape_str(sx)} and query_x {shape_str(qx)} must have the same example shape "
                "(dims 2 and on)."
            )
        if sy.shape[2:] != qy.shape[2:] or sy.dtype != qy.dtype:
            raise ValueError(
                f"TaskBatch: support_y {shape_str(sy)} ({sy.dtype}) and query_y {shape_str(qy)} ({qy.dtype}) must "
                "have the same target shape and dtype."
            )
        for key, value in self.info.items():
            if value.shape[:1] != (b,):
                raise ValueError(f"TaskBatch: info[{key!r}] must have leading dimension {b}, got {shape_str(value)}.")

    def __len__(self) -> int:
        return self.support_x.shape[0]

    @property
    def shots(self) -> int:
        """Number of support examples per task."""
        return self.support_x.shape[1]

    def __getitem__(self, index: int | slice | Tensor) -> TaskBatch:
        """Select tasks; an integer index keeps the task dimension (a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return TaskBatch(
            self.support_x[index],
            self.support_y[index],
            self.query_x[index],
            self.query_y[index],
            {k: v[index] for k, v in self.info.items()},
        )

    def chunks(self, size: int) -> list[TaskBatch]:
        """Split into consecutive batches of at most ``size`` tasks."""
        return [self[i : i + size] for i in range(0, len(self), size)]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TaskBatch:
        """Move to ``device``; ``dtype`` converts floating-point tensors only (labels stay integers)."""

        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return TaskBatch(
            move(self.support_x),
            move(self.support_y),
            move(self.query_x),
            move(self.query_y),
            {k: move(v) for k, v in self.info.items()},
        )
