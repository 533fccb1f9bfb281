"""One validator of task data for every entry point (``meta_loss``, ``meta_backward``, ``adapt``, evaluation).

It checks what torch would otherwise broadcast silently or fail on deep inside: empty task batches, empty
support sets, class labels of the wrong dtype or out of range, and regression targets whose shape differs
from the predictions'.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from allmap.tasks.batch import TaskBatch, shape_str

__all__ = ["TaskDataError", "check_tasks", "check_support", "check_targets"]


class TaskDataError(ValueError):
    """Task data a learner cannot take (empty sets, labels out of range, mismatched shapes); the message says
    what was expected, what was given and how to fix it. The CLI prints it as one line."""


def check_tasks(learner: Any, tasks: TaskBatch, entry: str = "meta_loss") -> None:
    """Raise a clear error if ``tasks`` do not fit ``learner`` (see the module docstring)."""
    if not isinstance(tasks, TaskBatch):
        raise TypeError(f"{entry}: expected an allmap.TaskBatch, got {type(tasks).__name__}.")
    if len(tasks) == 0:
        raise TaskDataError(
            f"{entry}: the TaskBatch holds no tasks (support_x has shape {shape_str(tasks.support_x)}); "
            "sample at least one task, e.g. family.sample(4, generator)."
        )
    _check_nonempty(learner, entry, "support_x", tasks.support_x.shape[1])
    _check_nonempty(learner, entry, "query_x", tasks.query_x.shape[1])
    check_targets(learner, tasks.support_x[0], {"support_y": tasks.support_y, "query_y": tasks.query_y})


def check_support(learner: Any, support_x: Tensor, support_y: Tensor, entry: str = "adapt") -> None:
    """:func:`check_tasks` for one task's support set (no task dimension), as ``adapt`` receives it."""
    if not isinstance(support_x, Tensor) or not isinstance(support_y, Tensor):
        raise TypeError(
            f"{entry}: expected support_x and support_y to be tensors, got "
            f"{type(support_x).__name__} and {type(support_y).__name__}."
        )
    if support_x.dim() == 0 or support_y.dim() == 0 or support_x.shape[0] != support_y.shape[0]:
        raise TaskDataError(
            f"{entry}: expected support_x [N, ...] and support_y [N, ...] with the same N (one task, "
            f"no task dimension), got {shape_str(support_x)} and {shape_str(support_y)}."
        )
    _check_nonempty(learner, entry, "support_x", support_x.shape[0])
    check_targets(learner, support_x, {"support_y": support_y.unsqueeze(0)})


def _check_nonempty(learner: Any, entry: str, name: str, n: int) -> None:
    if n == 0:
        raise TaskDataError(
            f"{type(learner).__name__}.{entry}: every task needs at least one example in {name}, "
            "got 0. Sample tasks with shots >= 1 (and queries >= 1)."
        )


def check_targets(learner: Any, x: Tensor, ys: dict[str, Tensor]) -> None:
    """Check targets ``ys`` (each ``[tasks, examples, ...]``) of inputs like ``x [examples, ...]`` against
    ``learner``'s predictions: integer labels in range for classification (labels 0..N-1, each present in the
    support set, for learners whose classes come from the support set), the prediction's shape for ``mse``."""
    name = type(learner).__name__
    spec = learner.spec
    if spec.classification:
        for key, y in ys.items():
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise TaskDataError(
                    f"{name}: cross_entropy needs integer class labels, got {key} of dtype {y.dtype}. "
                    "Convert with .long()."
                )
            if y.dim() != 2:
                raise TaskDataError(
                    f"{name}: expected {key} of shape [tasks, examples] (class indices), got {shape_str(y)}."
                )
        if spec.labels == "support":
            _check_support_classes(name, ys)
            return
        out = learner.output_shape(x)
        classes = out[-1] if out else 1
        lo = min(int(y.min()) for y in ys.values())
        hi = max(int(y.max()) for y in ys.values())
        if lo < 0 or hi >= classes:
            raise TaskDataError(
                f"{name}: labels must lie in [0, {classes - 1}] for a model with {classes} outputs, got labels in "
                f"[{lo}, {hi}]. Relabel each task's classes 0..N-1 or widen the model's output layer."
            )
    elif learner.loss_name == "mse":
        out = learner.output_shape(x)
        for key, y in ys.items():
            if tuple(y.shape[2:]) != out:
                raise TaskDataError(
                    f"{name}: predictions have shape [examples, {', '.join(map(str, out))}] but {key} has shape "
                    f"{shape_str(y)} (per task [examples, {', '.join(map(str, y.shape[2:]))}]); mse would broadcast "
                    "them. Reshape the targets (e.g. y.unsqueeze(-1)), or use loss='cross_entropy' for class labels."
                )
    elif spec.predictive:
        out = learner.output_shape(x)
        for key, y in ys.items():
            if not out or out[:-1] != tuple(y.shape[2:-1]) or out[-1] != 2 * (y.shape[-1] if y.dim() > 2 else 0):
                raise TaskDataError(
                    f"{name}: gaussian_nll needs predictions [examples, 2 * y_dim] (mean, then std) for targets "
                    f"[examples, y_dim]; the predictions have shape [examples, {', '.join(map(str, out))}] and "
                    f"{key} has shape {shape_str(y)}. Give the model 2 * y_dim outputs and targets a last dimension "
                    "(e.g. y.unsqueeze(-1))."
                )


def _check_support_classes(name: str, ys: dict[str, Tensor]) -> None:
    """Labels name the support set's classes: 0..N-1, each with a support example; queries within range."""
    sy = ys["support_y"]
    if int(sy.min()) < 0:
        raise TaskDataError(f"{name}: labels must be >= 0, got {int(sy.min())}.")
    ways = int(sy.max()) + 1
    present = F.one_hot(sy, ways).sum(1) > 0  # [tasks, N]
    if not bool(present.all()):
        task, cls = (int(v) for v in torch.nonzero(~present)[0])
        raise TaskDataError(
            f"{name}: every class 0..{ways - 1} needs a support example, but task {task} has none of "
            f"class {cls}. Relabel each task's classes 0..N-1."
        )
    qy = ys.get("query_y")
    if qy is not None and (int(qy.min()) < 0 or int(qy.max()) >= ways):
        raise TaskDataError(
            f"{name}: expected integer query labels in [0, {ways - 1}] of shape [tasks, examples], got "
            f"{shape_str(qy)} ({qy.dtype}) with labels in [{int(qy.min())}, {int(qy.max())}]."
        )
