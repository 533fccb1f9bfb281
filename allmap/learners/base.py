"""The mapping every learner implements: support set -> task model, trained end to end on the query loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allmap.inner.optim import Params
from allmap.tasks.batch import TaskBatch, _shape

__all__ = ["Learner", "TaskModel", "LOSSES", "resolve_loss", "use_batch_statistics", "functional_forward"]

LossFn = Callable[[Tensor, Tensor], Tensor]
LOSSES: dict[str, LossFn] = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}


def resolve_loss(loss: str | LossFn) -> tuple[LossFn, bool]:
    """Return ``(loss_fn, is_classification)`` for a loss name or a callable ``loss(pred, target)``."""
    if callable(loss):
        return loss, False
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)} or a callable(pred, target).")
    return LOSSES[loss], loss == "cross_entropy"


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """Make every BatchNorm layer of ``model`` normalise with the statistics of the batch it sees.

    As in MAML (Finn et al. 2017), the adapted model normalises with the support or query batch, in training
    and at test time alike; running statistics are not tracked, since an in-place buffer update cannot run
    inside ``vmap`` and would leak information between tasks. The model is changed in place and returned.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            module.num_batches_tracked = None
    return model


def functional_forward(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    """``model(x)`` with ``params`` standing in for the module's own parameters of the same names."""
    return torch.func.functional_call(model, params, (x,), strict=False)


class TaskModel:
    """The model a learner produced for one task: ``task_model(x) -> predictions``.

    ``params`` are the adapted parameters (differentiable w.r.t. the learner's meta-parameters) where the
    learner has them, else ``None``.
    """

    def __init__(self, forward: Callable[[Tensor], Tensor], params: Params | None = None) -> None:
        self._forward = forward
        self.params = params

    def __call__(self, x: Tensor) -> Tensor:
        return self._forward(x)


class Learner(nn.Module):
    """Base class of every meta-learner: a differentiable map from a support set to a task model.

    Subclasses implement :meth:`adapt` (and :meth:`adapt_path` if they adapt in steps). ``meta_loss`` is
    the mean query loss over a :class:`~allmap.TaskBatch`; its gradient w.r.t. ``self.parameters()`` is the
    meta-gradient. Tasks run vectorised with ``torch.func.vmap`` (``vectorize=True``) or one at a time
    (``False``); both give the same value and gradient. ``None`` (the default) vectorises unless the model
    has BatchNorm layers: in torch 2.13 the second derivative of ``batch_norm`` under ``vmap`` is wrong
    (our float64 gradcheck fails on it while the per-task loop passes), so those run one task at a time.
    """

    #: True for learners whose task model comes from inner gradient steps; evaluation then scores it after
    #: each number of steps (``loss@0``, ``loss@1``, ...) instead of once.
    adapts_in_steps: bool = False

    def __init__(self, loss: str | LossFn = "mse", vectorize: bool | None = None) -> None:
        super().__init__()
        self.loss_fn, self.classification = resolve_loss(loss)
        self.loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
        self.vectorize = vectorize
        self._probe_cache: dict[tuple, tuple[int, ...]] = {}

    # -- the mapping ---------------------------------------------------------------------------------
    def adapt(self, support_x: Tensor, support_y: Tensor) -> TaskModel:
        """Map one task's support set (no task dimension) to a task model."""
        raise NotImplementedError

    def adapt_path(self, support_x: Tensor, support_y: Tensor, steps: Sequence[int]) -> list[TaskModel]:
        """Task models after each number of inner steps in ``steps``; one-shot learners return the same one."""
        model = self.adapt(support_x, support_y)
        return [model for _ in steps]

    def task_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        """Query loss of the task model adapted on the support set (one task, no task dimension)."""
        return self.loss_fn(self.adapt(support_x, support_y)(query_x), query_y)

    def meta_loss(self, tasks: TaskBatch) -> Tensor:
        """Mean query loss over the tasks; ``meta_loss(tasks).backward()`` gives the meta-gradient."""
        self.check_tasks(tasks)
        args = (tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)
        if self.vmap_meta_loss():
            losses = torch.func.vmap(self.task_loss, randomness="different")(*args)
        else:
            losses = torch.stack([self.task_loss(*(a[i] for a in args)) for i in range(len(tasks))])
        return losses.mean()

    def has_batchnorm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules())

    def vmap_meta_loss(self) -> bool:
        """Whether ``meta_loss`` runs the tasks under ``vmap`` (see ``vectorize`` in the class docstring)."""
        if self.vectorize is None:
            return not self.has_batchnorm()
        if self.vectorize and self.has_batchnorm() and not getattr(self, "first_order", False):
            raise ValueError(
                f"{type(self).__name__}: vectorize=True with BatchNorm layers would give a wrong meta-gradient "
                "(torch's vmap rule for the second derivative of batch_norm is incorrect). Use vectorize=None "
                "(automatic) or False to run tasks one at a time."
            )
        return bool(self.vectorize)

    def forward(self, tasks: TaskBatch) -> Tensor:
        """``learner(tasks)`` is ``learner.meta_loss(tasks)`` (so ``functional_call`` and DDP work on it)."""
        return self.meta_loss(tasks)

    # -- validation ----------------------------------------------------------------------------------
    def output_shape(self, x: Tensor) -> tuple[int, ...]:
        """Shape of one prediction (without the example dimension) for inputs like ``x [N, *x]``.

        Found by running the model once on two examples, cached per input shape, dtype and device.
        """
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key not in self._probe_cache:
            with torch.no_grad():  # two examples: BatchNorm in batch-statistics mode needs more than one
                out = self.probe(x[:2])
            self._probe_cache[key] = tuple(out.shape[1:])
        return self._probe_cache[key]

    def probe(self, x: Tensor) -> Tensor:
        """Predictions of the un-adapted model on ``x``, used only to learn the output shape."""
        raise NotImplementedError

    def check_tasks(self, tasks: TaskBatch) -> None:
        """Raise a clear error if the tasks do not fit this learner (dtype, target shape, label range)."""
        if not isinstance(tasks, TaskBatch):
            raise TypeError(f"meta_loss: expected an allmap.TaskBatch, got {type(tasks).__name__}.")
        out = self.output_shape(tasks.support_x[0])
        ys = (tasks.support_y, tasks.query_y)
        if self.classification:
            for name, y in zip(("support_y", "query_y"), ys):
                if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                    raise ValueError(
                        f"{type(self).__name__}: cross_entropy needs integer class labels, got {name} of dtype "
                        f"{y.dtype}. Convert with .long()."
                    )
                if y.dim() != 2:
                    raise ValueError(
                        f"{type(self).__name__}: expected {name} of shape [tasks, examples] (class indices), "
                        f"got {_shape(y)}."
                    )
            classes = out[-1] if out else 1
            lo = min(int(y.min()) for y in ys)
            hi = max(int(y.max()) for y in ys)
            if lo < 0 or hi >= classes:
                raise ValueError(
                    f"{type(self).__name__}: labels must lie in [0, {classes - 1}] for a model with {classes} "
                    f"outputs, got labels in [{lo}, {hi}]. Relabel each task's classes 0..N-1 or widen the "
                    "model's output layer."
                )
        elif self.loss_name == "mse":
            for name, y in zip(("support_y", "query_y"), ys):
                if tuple(y.shape[2:]) != out:
                    raise ValueError(
                        f"{type(self).__name__}: predictions have shape [examples, {', '.join(map(str, out))}] "
                        f"but {name} has shape {_shape(y)} (per task [examples, "
                        f"{', '.join(map(str, y.shape[2:]))}]); mse would broadcast them. Reshape the targets, "
                        "e.g. y.unsqueeze(-1)."
                    )

    def extra_repr(self) -> str:
        return f"loss={self.loss_name}, vectorize={self.vectorize}"
