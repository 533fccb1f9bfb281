"""``meta_backward``: the meta-gradient of a batch of tasks, accumulated chunk by chunk (or share by share
in forked processes), so that memory does not grow with the meta-batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from allmap.engine.execution import (
    chunk_ranges,
    compiled_meta_gradient,
    examples_per_task,
    functional_eligible,
    plan,
)
from allmap.engine.forked import can_fork, even_shares, run_forked
from allmap.engine.validate import check_tasks
from allmap.tasks.batch import TaskBatch

__all__ = ["meta_backward"]


def meta_backward(learner: Any, tasks: TaskBatch, chunk: int | None = None, scale: float = 1.0) -> Tensor:
    """Accumulate the gradient of ``scale * learner.meta_loss(tasks)`` into ``.grad``; return that loss,
    detached. See :meth:`allmap.Learner.meta_backward` for the contract."""
    check_tasks(learner, tasks, "meta_backward")
    workers = min(learner.execution.workers, len(tasks))
    if workers > 1 and learner.spec.sequential:
        raise ValueError(
            f"{type(learner).__name__}: execution workers={learner.execution.workers} would share the tasks "
            "between processes, but this learner carries state from one task to the next (run in order, in one "
            "process). Use workers=0."
        )
    if workers > 1 and torch.is_grad_enabled() and _can_fork(learner):
        return _forked_backward(learner, tasks, chunk, scale, workers)
    return _backward_here(learner, tasks, chunk, scale)


def _can_fork(learner: nn.Module) -> bool:
    """Whether :func:`meta_backward` may fork here (else it runs in this process); raises for models whose
    training updates buffers the parent would never see."""
    if not can_fork() or any(p.device.type != "cpu" for p in learner.parameters()):
        return False
    stateful = [
        name
        for name, m in learner.named_modules()
        if m.training and isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]
    if stateful:
        raise ValueError(
            f"{type(learner).__name__}: execution workers={learner.execution.workers} computes the meta-gradient in "
            f"forked processes, whose updates of BatchNorm running statistics ({stateful[0]}) would be lost. "
            "Use BatchNorm without running statistics (MAML-family learners use batch statistics) or workers=0."
        )
    return True


def _forked_backward(learner: nn.Module, tasks: TaskBatch, chunk: int | None, scale: float, workers: int) -> Tensor:
    """:func:`meta_backward` with the tasks shared between this process and ``workers - 1`` forked ones."""
    n = len(tasks)
    params = [p for p in learner.parameters() if p.requires_grad]

    def share(bounds: tuple[int, int]) -> tuple[Tensor, list[Tensor | None]]:
        lo, hi = bounds
        for p in params:  # the share's own gradient, not the accumulated one
            p.grad = None
        loss = _backward_here(learner, tasks[lo:hi], chunk, scale * (hi - lo) / n)
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


def _backward_here(learner: Any, tasks: TaskBatch, chunk: int | None, scale: float) -> Tensor:
    """:func:`meta_backward` in this process."""
    n = len(tasks)
    spec = learner.spec
    if chunk is not None:
        size = chunk
    elif spec.per_task_loss and not spec.whole_loss:
        size = plan(learner, n, tasks.support_x.device, examples_per_task(tasks)).chunk
    else:  # a batched meta-loss, or one whole-loss estimate (forward mode, finite differences): one pass
        size = n
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"meta_backward: expected chunk to be a positive integer or None, got {chunk!r}.")
    total = None
    for start, stop in chunk_ranges(n, size):  # one range (0, n) when the chunk holds every task
        part = _chunk_backward(learner, tasks if size >= n else tasks[start:stop], scale * (stop - start) / n)
        total = part if total is None else total + part
    return total


def _chunk_backward(learner: Any, tasks: TaskBatch, scale: float) -> Tensor:
    """Accumulate the gradient of ``scale * meta_loss(tasks)``; return that loss, detached. Compiled
    vectorised plans compute it as one compiled ``torch.func.grad`` (no autograd engine at run time)."""
    p = plan(learner, len(tasks), tasks.support_x.device, examples_per_task(tasks))
    if torch.is_grad_enabled() and functional_eligible(learner, p) and p.chunk >= len(tasks):
        args = (tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)
        loss = compiled_meta_gradient(learner, p, args, scale)
        if loss is not None:
            return loss
    loss = learner.batch_loss(tasks) * scale  # validated once, by meta_backward
    loss.backward()
    return loss.detach()
