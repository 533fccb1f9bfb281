"""The mapping every learner implements: support set -> task model, trained end to end on the query loss."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allmap.engine.backward import meta_backward
from allmap.engine.execution import Execution, Plan, compiled_cache, plan, resolve_execution, task_losses
from allmap.engine.predictive import gaussian_nll
from allmap.engine.spec import LearnerSpec
from allmap.engine.validate import check_support, check_tasks
from allmap.hypergrad import Strategy, WholeLossStrategy, meta_loss_surrogate
from allmap.inner.optim import Params
from allmap.nets.norm import BatchStatNorm
from allmap.tasks.batch import TaskBatch

__all__ = ["Learner", "TaskModel", "LOSSES", "resolve_loss", "use_batch_statistics", "functional_forward"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error, ``mean((pred - target)^2)``, as elementary operations: torch's fused ``mse_loss``
    has no forward-over-reverse derivative when the target carries no tangent (its double backward divides
    in place, "ZeroTensors are immutable"), which forward-mode meta-gradients through a loop need."""
    if pred.shape != target.shape:
        raise ValueError(
            f"mse: prediction and target must have one shape, got {tuple(pred.shape)} and {tuple(target.shape)}; "
            "reshape the model's output or the targets (a regression head of one output gives shape (n, 1))"
        )
    return (pred - target).square().mean()


LOSSES: dict[str, LossFn] = {"mse": mse, "cross_entropy": F.cross_entropy, "gaussian_nll": gaussian_nll}


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
    inside ``vmap`` and would leak information between tasks. Affine BatchNorm layers become
    :class:`~allmap.nets.BatchStatNorm` holding the same ``weight`` and ``bias`` parameters (same names, so
    state dicts and optimizers are unaffected): the same function, written with ``mean`` and ``var``, whose
    second derivative is exact under ``vmap`` (torch's ``batch_norm`` rule is not, see
    :mod:`allmap.compat`) and cheaper to differentiate twice. The model is changed in place and returned.
    """
    for parent in list(model.modules()):
        for name, module in list(parent.named_children()):
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            if module.affine:
                norm = BatchStatNorm(module.num_features, dim=1, eps=module.eps)
                norm.weight, norm.bias = module.weight, module.bias
                setattr(parent, name, norm)
            else:
                without_running_stats(module)
    return model


def without_running_stats(module: nn.modules.batchnorm._BatchNorm) -> None:
    """Make a torch BatchNorm layer normalise with batch statistics only (no running buffers)."""
    module.track_running_stats = False
    module.running_mean = module.running_var = module.num_batches_tracked = None


def functional_forward(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    """``model(x)`` with ``params`` standing in for the module's own parameters of the same names."""
    return torch.func.functional_call(model, params, (x,), strict=False)


class TaskModel:
    """The model a learner produced for one task: ``task_model(x) -> predictions``.

    ``params`` are the adapted parameters (differentiable w.r.t. the learner's meta-parameters) where the
    learner has them, else ``None``. ``distribution``, for task models whose predictive distribution is a
    mixture (an ANP's draws of its latent), maps ``x`` to ``(mean [S, N, *y], std [S, N, *y])`` of ``S``
    equally weighted Gaussians (see :mod:`allmap.engine.predictive`).
    """

    def __init__(
        self,
        forward: Callable[[Tensor], Tensor],
        params: Params | None = None,
        distribution: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        self._forward = forward
        self.params = params
        if distribution is not None:
            self.distribution = distribution

    def __call__(self, x: Tensor) -> Tensor:
        return self._forward(x)


class Learner(nn.Module):
    """Base class of every meta-learner: a differentiable map from a support set to a task model.

    Subclasses implement :meth:`adapt` (and :meth:`adapt_path` if they adapt in steps). ``meta_loss`` is
    the mean query loss over a :class:`~allmap.TaskBatch`; its gradient w.r.t. ``self.parameters()`` is the
    meta-gradient. How the tasks run is one switch, :attr:`execution` (an
    :class:`~allmap.engine.execution.Execution`: ``"vmap"``, ``"loop"``, chunks, compile, forked workers;
    ``vectorize=True/False`` is shorthand for its mode). Every way gives the same value and gradient; the
    default, ``"auto"``, chooses per model and device (see :mod:`allmap.engine.execution`).
    :meth:`meta_backward` runs the backward pass chunk by chunk so memory does not grow with the meta-batch.
    """

    #: True for learners whose task model comes from inner steps (see :class:`~allmap.engine.spec.LearnerSpec`).
    adapts_in_steps: ClassVar[bool] = False
    #: False for learners whose ``batch_loss`` batches the tasks itself (metric learners: one encoder call).
    per_task_loss: ClassVar[bool] = True
    #: what class labels index: ``"outputs"`` of the model, or the ``"support"`` set's classes.
    labels: ClassVar[str] = "outputs"
    #: the meta-gradient strategies this learner accepts (names of :mod:`allmap.hypergrad`); gradient-based
    #: learners set it from their inner update
    strategies: tuple[str, ...] = ()
    #: the strategy in use, for learners that adapt through inner steps
    hypergrad: Strategy | None = None
    #: the default number of inner steps, for learners that adapt in steps
    inner_steps: int | None = None
    #: True for learners whose tasks must run one after another (state carried from task to task)
    sequential: bool = False

    def __init__(
        self, loss: str | LossFn = "mse", vectorize: bool | None = None, execution: Execution | str | None = None
    ) -> None:
        super().__init__()
        self.loss_fn, self.classification = resolve_loss(loss)
        self.loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
        self.execution = execution
        if vectorize is not None:
            self.vectorize = vectorize
        self.execution_stats: dict[str, float | int | str] = {}  # compile time and failures (execution.py)
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
        """Mean query loss over the tasks; ``meta_loss(tasks).backward()`` gives the meta-gradient.

        How the tasks run (``vmap``, chunks, a loop, compiled) is ``self.execution``; see
        :mod:`allmap.engine.execution`. Every way gives the same value and gradient.
        """
        check_tasks(self, tasks)
        return self.batch_loss(tasks)

    def batch_loss(self, tasks: TaskBatch) -> Tensor:
        """:meth:`meta_loss` of tasks already validated: the mean of :meth:`task_loss` over the tasks, run by
        the engine; a whole-loss strategy (forward mode, finite differences) supplies its own gradient."""
        if self.spec.whole_loss:
            return meta_loss_surrogate(self.hypergrad, self, tasks, lambda t: task_losses(self, t).mean())
        return task_losses(self, tasks).mean()

    def looped_loss(self, tasks: TaskBatch) -> Tensor:
        """The mean of :meth:`task_loss` over the tasks, one task at a time in a Python loop: what a learner
        that batches its own :meth:`batch_loss` runs under ``execution="loop"``, and the reference it equals."""
        args = (tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)
        return torch.stack([self.task_loss(*(a[i] for a in args)) for i in range(len(tasks))]).mean()

    def meta_backward(self, tasks: TaskBatch, chunk: int | None = None, scale: float = 1.0) -> Tensor:
        """Accumulate the meta-gradient of ``scale * meta_loss(tasks)`` into ``.grad`` chunk by chunk; return
        that loss, detached.

        Equivalent to ``loss = scale * meta_loss(tasks); loss.backward(); return loss.detach()`` (``scale`` is
        e.g. a distributed rank's share of the meta-batch), but the backward pass runs after every chunk of
        ``chunk`` tasks (default: the execution plan's chunk, one task when tasks run in a loop; the whole
        meta-batch for learners that batch the tasks themselves and for meta-gradient strategies that
        differentiate the whole loss), each chunk's mean loss weighted by its share of the tasks, so the
        autograd graph (the memory) of only one chunk is alive at a time. Gradients add to existing ``.grad``
        like ``backward()``.

        Example:
            >>> import torch, allmap
            >>> maml = allmap.MAML(torch.nn.Linear(1, 1))
            >>> maml.execution = "loop"
            >>> tasks = allmap.tasks.Sinusoid(shots=5).sample(4, torch.Generator().manual_seed(0))
            >>> loss = maml.meta_backward(tasks)   # four backward passes, one per task

        With ``execution.workers = W`` (``W > 1``, CPU parameters, Linux, no CUDA context) the tasks are
        split into W contiguous shares; the first share's meta-gradient (weighted by its share of the
        tasks) is computed here and the others' in W - 1 forked processes at the same time, each process
        with one intra-op thread, and the W gradients are added to ``.grad`` here: the same meta-gradient
        up to float rounding. It trades memory for speed (each child builds its own graphs). Anything else
        the children change (random number streams, buffers) stays in the children, so models that update
        buffers in training mode (BatchNorm with running statistics) are refused.
        """
        return meta_backward(self, tasks, chunk, scale)

    @property
    def spec(self) -> LearnerSpec:
        """What this learner is (see :class:`~allmap.engine.spec.LearnerSpec`)."""
        s = self.hypergrad
        return LearnerSpec(
            adapts_in_steps=self.adapts_in_steps,
            per_task_loss=self.per_task_loss,
            classification=self.classification,
            strategies=self.strategies,
            strategy=s.name if s else "",
            whole_loss=isinstance(s, WholeLossStrategy),
            vmappable=s is None or s.vmappable,
            first_order=s is not None and s.name == "first_order",
            sequential=self.sequential,
            inner_steps=self.inner_steps,
            labels=self.labels,
            predictive=self.loss_fn is gaussian_nll,
        )

    @property
    def execution(self) -> Execution:
        """How tasks run: an :class:`~allmap.engine.execution.Execution`; assign one or a spec string
        (``"loop"``, ``"vmap(8)"``, ``"auto+compile"``) or a mapping of its fields."""
        return self.__dict__["_execution"]

    @execution.setter
    def execution(self, spec: Execution | str | dict | None) -> None:
        new = resolve_execution(spec)
        if self.__dict__.get("_execution") != new:
            self.__dict__["_execution"] = new
            compiled_cache(self).clear()

    @property
    def vectorize(self) -> bool | None:
        """Shorthand for ``execution.mode``: ``True`` is ``"vmap"``, ``False`` ``"loop"``, ``None`` ``"auto"``;
        assigning it changes only the mode of :attr:`execution`."""
        mode = self.execution.mode
        return None if mode == "auto" else mode == "vmap"

    @vectorize.setter
    def vectorize(self, value: bool | None) -> None:
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{type(self).__name__}: expected vectorize to be True, False or None, got {value!r}.")
        mode = "auto" if value is None else ("vmap" if value else "loop")
        self.execution = dataclasses.replace(self.execution, mode=mode)

    def execution_plan(self, tasks: int, device: torch.device | None = None, examples: int | None = None) -> Plan:
        """The resolved plan (``vmap``, ``chunk``, ``compile``, ``reason``) for a meta-batch of ``tasks`` tasks
        of ``examples`` examples each (support + query)."""
        return plan(self, tasks, device, examples)

    def vmap_meta_loss(self) -> bool:
        """Whether ``meta_loss`` runs the tasks under ``vmap`` (see :mod:`allmap.engine.execution`)."""
        return plan(self, 1).vmap

    def forward(self, tasks: TaskBatch) -> Tensor:
        """``learner(tasks)`` is ``learner.meta_loss(tasks)`` (so ``functional_call`` and DDP work on it)."""
        return self.meta_loss(tasks)

    # -- validation ----------------------------------------------------------------------------------
    def output_shape(self, x: Tensor) -> tuple[int, ...]:
        """Shape of one prediction (without the example dimension) for inputs like ``x [N, *x]``.

        Found by running the model once on two examples, cached per input shape, dtype and device.
        """
        device = next((p.device for p in self.parameters()), x.device)
        key = (tuple(x.shape[1:]), x.dtype, device)
        if key not in self._probe_cache:
            x = x.to(device)
            with torch.no_grad():  # two examples: BatchNorm in batch-statistics mode needs more than one
                out = self.probe(x[:2])
            self._probe_cache[key] = tuple(out.shape[1:])
        return self._probe_cache[key]

    def probe(self, x: Tensor) -> Tensor:
        """Predictions of the un-adapted model on ``x``, used only to learn the output shape."""
        raise NotImplementedError

    def check_tasks(self, tasks: TaskBatch) -> None:
        """Raise a clear error if the tasks do not fit this learner (see :mod:`allmap.engine.validate`)."""
        check_tasks(self, tasks)

    def check_support(self, support_x: Tensor, support_y: Tensor) -> None:
        """Raise a clear error if one task's support set does not fit this learner (``adapt`` calls it)."""
        check_support(self, support_x, support_y)

    def extra_repr(self) -> str:
        ex = "" if self.execution == Execution() else f", execution={self.execution}"
        return f"loss={self.loss_name}{ex}"
