"""The gradient-based learner: the task model is theta after a few differentiable inner steps.

One learner serves the whole family; its parts are swapped, not subclassed (see docs/architecture.md):

* the inner update (:mod:`allmap.learners.updates`): SGD or Adam with a fixed rate (MAML), learned
  per-parameter rates (Meta-SGD), an LSTM that writes the update (Ravi & Larochelle);
* which parameters adapt (``adapt_only``: all, or the head as in ANIL);
* where the inner loop starts (:meth:`GradientLearner.initial_params`: theta, or a hypernetwork's output);
* the meta-gradient strategy (:mod:`allmap.hypergrad`).

Update rule: ``theta_{t+1} = theta_t + update(grad L_support(theta_t))`` for ``t < inner_steps``; the
meta-loss is ``L_query(theta_T)``, differentiated as the strategy says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from allmap.checks import check_int
from allmap.compat import in_transform
from allmap.hypergrad import Strategy, resolve
from allmap.inner.optim import InnerOptimizer, Params
from allmap.learners.base import Learner, LossFn, TaskModel, functional_forward, use_batch_statistics
from allmap.learners.updates import InnerUpdate

__all__ = ["GradientLearner", "adapted_names", "check_steps", "first_order_strategy"]


def check_steps(owner: str, inner_steps: Any, minimum: int = 0) -> int:
    """``inner_steps`` as an int, or a clear error naming ``owner``."""
    return check_int(owner, "inner_steps", inner_steps, minimum)


def adapted_names(owner: str, model: nn.Module, adapt_only: str | Sequence[str] | None) -> list[str]:
    """Names of the parameters that adapt: all, or those under the given prefixes (ANIL: ``"head"``)."""
    names = [n for n, _ in model.named_parameters()]
    if adapt_only is None:
        return names
    prefixes = [adapt_only] if isinstance(adapt_only, str) else list(adapt_only)
    chosen = [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]
    if not chosen:
        top = sorted({n.split(".")[0] for n in names})
        raise ValueError(
            f"{owner}: no parameter of the model matches {prefixes}; the model's top-level parameter groups are {top}."
        )
    return chosen


def first_order_strategy(
    owner: str, first_order: bool, hypergrad: str | Mapping[str, Any] | Strategy | None
) -> Strategy:
    """The strategy of ``first_order`` and ``hypergrad`` together: ``first_order=True`` is ``"first_order"``."""
    strategy = resolve(hypergrad, default="first_order" if first_order else "unrolled")
    if first_order and strategy.name != "first_order":
        raise ValueError(f"{owner}: first_order=True contradicts hypergrad={strategy!r}; pass only one of them.")
    return strategy


class GradientLearner(Learner):
    """A few differentiable inner steps from the meta-learned initialisation theta.

    Args:
        model: any ``nn.Module`` (run through ``torch.func.functional_call``); its parameters are theta and
            receive the meta-gradient in place. BatchNorm layers are switched to batch statistics.
        update: the inner update (:class:`~allmap.learners.updates.InnerUpdate`).
        inner_steps: inner steps during meta-training (and the default of :meth:`adapt`).
        loss: ``"mse"``, ``"cross_entropy"`` or a callable ``loss(pred, target)``.
        adapt_only: parameter-name prefixes to adapt; ``None`` adapts all.
        hypergrad: how the meta-gradient crosses the inner loop (a name such as ``"truncated(3)"``, a mapping,
            or a :class:`~allmap.hypergrad.Strategy`); must be one the update accepts.
        vectorize: run the tasks of a meta-batch with ``vmap`` (else one at a time; ``None``: automatic).
    """

    adapts_in_steps = True

    def __init__(
        self,
        model: nn.Module,
        update: InnerUpdate,
        inner_steps: int = 1,
        loss: str | LossFn = "mse",
        adapt_only: str | Sequence[str] | None = None,
        hypergrad: str | Mapping[str, Any] | Strategy | None = None,
        vectorize: bool | None = None,
    ) -> None:
        super().__init__(loss=loss, vectorize=vectorize)
        owner = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: expected model to be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(update, InnerUpdate):
            raise TypeError(
                f"{owner}: expected update to be an allmap.learners.updates.InnerUpdate, got {type(update).__name__}."
            )
        self.model = use_batch_statistics(model)
        self.inner_steps = check_steps(owner, inner_steps)
        self.adapted_names = adapted_names(owner, model, adapt_only)
        params = dict(model.named_parameters())
        update.setup({n: params[n] for n in self.adapted_names})
        self.update = update
        self.strategies = update.accepts()
        strategy = resolve(hypergrad)
        if strategy.name not in self.strategies:
            raise ValueError(
                f"{owner}: the {strategy.name!r} meta-gradient strategy does not apply to the "
                f"{type(update).__name__} inner update; expected one of {', '.join(self.strategies)}."
            )
        self.hypergrad = strategy
        strategy.check(self)

    # -- parts -----------------------------------------------------------------------------------------
    @property
    def first_order(self) -> bool:
        """Whether inner gradients enter the meta-gradient as constants (first-order MAML)."""
        return self.spec.first_order

    @property
    def inner_lr(self) -> float:
        """The inner update's (initial) step size."""
        return self.update.lr

    @inner_lr.setter
    def inner_lr(self, value: float) -> None:
        self.update.lr = float(value)

    def optimizer(self) -> InnerOptimizer:
        """The pure inner optimizer of this learner's update."""
        return self.update.optimizer()

    def initial_params(self, support_x: Tensor, support_y: Tensor) -> Params:
        """Where the inner loop starts: theta (the hypernetwork learner starts from its own output)."""
        return {n: p for n, p in self.model.named_parameters() if n in self.adapted_names}

    def frozen_params(self) -> Params:
        """The parameters that do not adapt (shared by every task)."""
        adapted = set(self.adapted_names)
        return {n: p for n, p in self.model.named_parameters() if n not in adapted}

    def support_loss(self, support_x: Tensor, support_y: Tensor, frozen: Params | None = None):
        """``params -> L_support(params)``, with the frozen parameters ``frozen`` (default: the learner's)."""
        frozen = self.frozen_params() if frozen is None else frozen
        return lambda p: self.loss_fn(functional_forward(self.model, {**frozen, **p}, support_x), support_y)

    def task_model(self, params: Params) -> TaskModel:
        """The task model with adapted ``params`` (the others frozen)."""
        full = {**self.frozen_params(), **params}
        return TaskModel(lambda x: functional_forward(self.model, full, x), params)

    # -- the mapping -------------------------------------------------------------------------------------
    def adapt_path(self, support_x: Tensor, support_y: Tensor, steps: Sequence[int]) -> list[TaskModel]:
        path = self.hypergrad.run(
            self.support_loss(support_x, support_y),
            self.initial_params(support_x, support_y),
            self.optimizer(),
            max(steps),
            record=list(steps),
            closure=list(self.parameters()),
        )
        return [self.task_model(p) for p in path]

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> TaskModel:
        """Task model after ``steps`` inner steps (default ``inner_steps``) on the support set."""
        if not in_transform([support_x, support_y]):
            self.check_support(support_x, support_y)
        if steps is not None:
            check_steps(f"{type(self).__name__}.adapt", steps)
        return self.adapt_path(support_x, support_y, [self.inner_steps if steps is None else steps])[0]

    def probe(self, x: Tensor) -> Tensor:
        return self.model(x)

    def extra_repr(self) -> str:
        return (
            f"inner_steps={self.inner_steps}, hypergrad={self.hypergrad!r}, "
            f"adapted={len(self.adapted_names)} tensors, " + super().extra_repr()
        )
