"""The mapping every learner implements: support set -> task model, trained end to end on the query loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allmap.inner.optim import Params
from allmap.nets.norm import BatchStatNorm
from allmap.learners.execution import (Execution, Plan, chunk_ranges, compiled_cache, compiled_meta_gradient,
                                      examples_per_task, functional_eligible, plan,
                                      resolve_execution, task_losses)
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
    inside ``vmap`` and would leak information between tasks. Affine BatchNorm layers become
    :class:`~allmap.nets.BatchStatNorm` holding the same ``weight`` and ``bias`` parameters (same names, so
    state dicts and optimizers are unaffected): the same function, written with ``mean`` and ``var``, whose
    second derivative is exact under ``vmap`` (``batch_norm``'s is not in torch 2.13) and cheaper (a MAML conv4
    step spent 21% of its time in ``batch_norm``'s double backward). The model is changed in place and returned.
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
    (``False``); both give the same value and gradient. ``None`` (the default) chooses per model and device:
    one task at a time for models with ``torch.nn`` BatchNorm layers (in torch 2.13 the second derivative of
    ``batch_norm`` under ``vmap`` is wrong: our float64 gradcheck fails on it while the per-task loop passes;
    MAML-family learners replace them with the exact :class:`~allmap.nets.BatchStatNorm`) and for convolution
    nets on CPU (faster and flat in memory), ``vmap`` otherwise. ``execution`` refines this (chunks,
    ``torch.compile``); see :mod:`allmap.learners.execution`. :meth:`meta_backward` runs the backward pass
    chunk by chunk so memory does not grow with the meta-batch.
    """

    #: True when ``meta_loss`` is the mean of per-task losses run through the execution layer, so that
    #: :meth:`meta_backward` splits a meta-batch into the plan's chunks by default; learners whose ``meta_loss``
    #: batches the tasks itself (metric learners: one encoder call) set it False and run in one pass unless
    #: ``meta_backward`` is given a chunk.
    per_task_meta_loss: bool = True

    #: True for learners whose task model comes from inner gradient steps; evaluation then scores it after
    #: each number of steps (``loss@0``, ``loss@1``, ...) instead of once.
    adapts_in_steps: bool = False

    def __init__(
        self, loss: str | LossFn = "mse", vectorize: bool | None = None, execution: Execution | str | None = None
    ) -> None:
        super().__init__()
        self.loss_fn, self.classification = resolve_loss(loss)
        self.loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
        self.vectorize = vectorize
        self.execution = execution
        self.execution_stats: dict[str, float | int | str] = {}  # compile time and failures (execution.py)
        self._tasks_checked = False
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
        :mod:`allmap.learners.execution`. Every way gives the same value and gradient.
        """
        if not self._tasks_checked:
            self.check_tasks(tasks)
        return task_losses(self, tasks).mean()

    def meta_backward(self, tasks: TaskBatch, chunk: int | None = None, scale: float = 1.0) -> Tensor:
        """Accumulate the meta-gradient of ``scale * meta_loss(tasks)`` into ``.grad`` chunk by chunk; return
        that loss, detached.

        Equivalent to ``loss = scale * meta_loss(tasks); loss.backward(); return loss.detach()`` (``scale`` is
        e.g. a distributed rank's share of the meta-batch), but the backward pass runs after every chunk of
        ``chunk`` tasks (default: the execution plan's chunk, one task when tasks run in a loop; the whole
        meta-batch for learners with ``per_task_meta_loss = False`` and for meta-gradient strategies that
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
        up to float rounding. A trade of memory for speed: on a 2-core CPU, conv4 MAML (5-way 1-shot,
        second order, meta-batch 32) ran 15.0 against 11.7 tasks/s in this process alone with two threads,
        at 241 against 153 MB peak (the child builds its own graphs); with freed memory retained, as
        ``allmap train`` does, 17.1 against 15.9 tasks/s (``benchmarks/README.md``, session 8). Anything
        else the children change (random number streams, buffers) stays in the children, so models that
        update buffers in training mode (BatchNorm with running statistics) are refused.
        """
        self.check_tasks(tasks)
        workers = min(self.execution.workers, len(tasks))
        if workers > 1 and torch.is_grad_enabled() and self._can_fork():
            return self._forked_backward(tasks, chunk, scale, workers)
        return self._meta_backward_here(tasks, chunk, scale)

    def _can_fork(self) -> bool:
        """Whether :meth:`meta_backward` may fork here (else it runs in this process); raises for models whose
        training updates buffers the parent would never see."""
        from allmap.train.forked import can_fork  # lazy: allmap.train imports the learners

        if not can_fork() or any(p.device.type != "cpu" for p in self.parameters()):
            return False
        stateful = [name for name, m in self.named_modules()
                    if m.training and isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
        if stateful:
            raise ValueError(
                f"{type(self).__name__}: execution workers={self.execution.workers} computes the meta-gradient in "
                f"forked processes, whose updates of BatchNorm running statistics ({stateful[0]}) would be lost. "
                "Use BatchNorm without running statistics (MAML-family learners use batch statistics) or workers=0."
            )
        return True

    def _forked_backward(self, tasks: TaskBatch, chunk: int | None, scale: float, workers: int) -> Tensor:
        """:meth:`meta_backward` with the tasks shared between this process and ``workers - 1`` forked ones."""
        from allmap.train.forked import even_shares, run_forked  # lazy: allmap.train imports the learners

        n = len(tasks)
        params = [p for p in self.parameters() if p.requires_grad]

        def share(bounds: tuple[int, int]) -> tuple[Tensor, list[Tensor | None]]:
            lo, hi = bounds
            for p in params:  # the share's own gradient, not the accumulated one
                p.grad = None
            loss = self._meta_backward_here(tasks[lo:hi], chunk, scale * (hi - lo) / n)
            return loss, [p.grad for p in params]

        saved = [p.grad for p in params]
        try:  # the first share runs here (warm caches, one process fewer), the others in forked children
            shares = run_forked(share, even_shares(n, workers), here=True)
        finally:
            for p, g in zip(params, saved):
                p.grad = g
        total = None
        for loss, grads in shares:
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
            total = loss if total is None else total + loss
        return total

    def _meta_backward_here(self, tasks: TaskBatch, chunk: int | None, scale: float) -> Tensor:
        """:meth:`meta_backward` in this process."""
        n = len(tasks)
        whole = getattr(getattr(self, "hypergrad", None), "scope", "inner") == "meta_loss"  # forward mode, finite
        if chunk is not None:  # differences: one estimate over the whole meta-batch costs what one chunk's does
            size = chunk
        else:
            size = (plan(self, n, tasks.support_x.device, examples_per_task(tasks)).chunk
                    if self.per_task_meta_loss and not whole else n)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"meta_backward: expected chunk to be a positive integer or None, got {chunk!r}.")
        total = None
        for start, stop in chunk_ranges(n, size):  # one range (0, n) when the chunk holds every task
            part = self._chunk_backward(tasks if size >= n else tasks[start:stop], scale * (stop - start) / n)
            total = part if total is None else total + part
        return total

    def _chunk_backward(self, tasks: TaskBatch, scale: float) -> Tensor:
        """Accumulate the gradient of ``scale * meta_loss(tasks)``; return that loss, detached. Compiled
        vectorised plans compute it as one compiled ``torch.func.grad`` (no autograd engine at run time)."""
        p = plan(self, len(tasks), tasks.support_x.device, examples_per_task(tasks))
        if torch.is_grad_enabled() and functional_eligible(self, p) and p.chunk >= len(tasks):
            args = (tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)
            loss = compiled_meta_gradient(self, p, args, scale)
            if loss is not None:
                return loss
        loss = self._checked_meta_loss(tasks) * scale
        loss.backward()
        return loss.detach()

    def _checked_meta_loss(self, tasks: TaskBatch) -> Tensor:
        """``meta_loss`` of tasks already validated (skips the label checks, which synchronise with the host)."""
        self._tasks_checked = True
        try:
            return self.meta_loss(tasks)
        finally:
            self._tasks_checked = False

    @property
    def execution(self) -> Execution:
        """How tasks run: an :class:`~allmap.learners.execution.Execution`; assign one or a spec string
        (``"loop"``, ``"vmap(8)"``, ``"auto+compile"``) or a mapping of its fields."""
        return self.__dict__["_execution"]

    @execution.setter
    def execution(self, spec: Execution | str | dict | None) -> None:
        new = resolve_execution(spec)
        if self.__dict__.get("_execution") != new:
            self.__dict__["_execution"] = new
            compiled_cache(self).clear()

    def execution_plan(self, tasks: int, device: torch.device | None = None, examples: int | None = None) -> Plan:
        """The resolved plan (``vmap``, ``chunk``, ``compile``, ``reason``) for a meta-batch of ``tasks`` tasks
        of ``examples`` examples each (support + query)."""
        return plan(self, tasks, device, examples)

    def vmap_meta_loss(self) -> bool:
        """Whether ``meta_loss`` runs the tasks under ``vmap`` (see :mod:`allmap.learners.execution`)."""
        return plan(self, 1).vmap

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
        ex = "" if self.execution == Execution() else f", execution={self.execution}"
        return f"loss={self.loss_name}, vectorize={self.vectorize}{ex}"
