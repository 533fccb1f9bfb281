"""What the engine knows of a learner: a typed description and the methods it calls.

The engine runs any learner over a batch of tasks through this interface alone; it never imports a learner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["LearnerSpec", "Mapping"]


@dataclass(frozen=True)
class LearnerSpec:
    """What a learner is, read by the engine and the application instead of ad-hoc attributes.

    Attributes:
        adapts_in_steps: the task model comes from inner steps, so evaluation scores it after each number of
            steps (``loss@0``, ``loss@1``, ...); else the learner maps a support set in one pass.
        per_task_loss: ``meta_loss`` is the mean of :meth:`Mapping.task_loss` over the tasks, so the engine
            may split a meta-batch into chunks (vmap, loop, backward per chunk); else the learner batches the
            tasks itself (metric learners embed every image of the meta-batch in one call).
        classification: predictions are class scores and targets integer labels (accuracy is reported).
        strategies: the meta-gradient strategies the learner accepts (names of :mod:`allmap.hypergrad`);
            empty when its meta-gradient is plain backpropagation through one pass.
        strategy: the name of the strategy in use ("" for none).
        whole_loss: the strategy differentiates the whole meta-loss as a function of the meta-parameters
            (forward mode, finite differences), so the meta-batch is one estimate, never chunked.
        vmappable: the tasks may run under ``torch.func.vmap`` while a meta-gradient is recorded (a strategy
            with a custom backward pass that calls ``torch.autograd`` cannot).
        first_order: the meta-gradient has no second-order terms through adaptation.
        sequential: each task's adaptation reads state the previous task left (Reptile's inner Adam moments
            carried from task to task), so the tasks of a meta-batch run one after another, in order, in
            one process: never under ``vmap``, compiled, or shared between forked workers or ranks.
        inner_steps: the default number of inner steps (``None`` for one-pass learners).
        predictive: the task model predicts a Gaussian, ``[mean, std]`` along the last dimension (the
            ``gaussian_nll`` loss), so evaluation also scores its predictive distribution
            (:mod:`allmap.engine.predictive`).
        labels: for classification, ``"outputs"`` (a label indexes the model's outputs) or ``"support"``
            (labels name the support set's classes 0..N-1, each with a support example: metric learners).
    """

    adapts_in_steps: bool
    per_task_loss: bool
    classification: bool
    strategies: tuple[str, ...] = ()
    strategy: str = ""
    whole_loss: bool = False
    vmappable: bool = True
    first_order: bool = False
    sequential: bool = False
    inner_steps: int | None = None
    labels: str = "outputs"
    predictive: bool = False


@runtime_checkable
class Mapping(Protocol):
    """The learner interface the engine runs: a differentiable map from a support set to a task model.

    Every :class:`allmap.Learner` satisfies it. ``adapt``/``adapt_path`` take one task (no task dimension);
    ``task_loss`` is the query loss of one task; ``loss_fn`` scores predictions against targets.
    """

    spec: LearnerSpec
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    execution: Any
    execution_stats: dict

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]: ...

    def adapt_path(
        self, support_x: Tensor, support_y: Tensor, steps: Sequence[int]
    ) -> list[Callable[[Tensor], Tensor]]: ...

    def task_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor: ...

    def meta_loss(self, tasks: Any) -> Tensor: ...

    def output_shape(self, x: Tensor) -> tuple[int, ...]: ...
