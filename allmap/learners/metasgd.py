"""Meta-SGD: MAML with a learned step size for every parameter entry.

Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", 2017.
Update rule: ``theta' = theta - alpha * grad L_support(theta)`` (elementwise product), where ``alpha``
has theta's shape and is meta-trained together with theta on the query loss ``L_query(theta')``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from allmap.hypergrad import Strategy
from allmap.learners.base import LossFn
from allmap.learners.gradient import GradientLearner, first_order_strategy
from allmap.learners.updates import LearnedRates, step_size

__all__ = ["MetaSGD"]


class MetaSGD(GradientLearner):
    """A gradient learner whose inner learning rates ``alpha`` (one per parameter entry) are meta-parameters.

    Args are those of :class:`MAML` (the inner update is always the learned-rate SGD step); ``inner_lr``
    initialises every entry of alpha (the paper draws it from U[0.005, 0.1]; a constant start is the common
    choice). The rates live in ``learner.update`` (``learner.update["weight"]`` for parameter ``weight``).

    Example:
        >>> import torch, allmap
        >>> learner = allmap.MetaSGD(torch.nn.Linear(2, 2), inner_lr=0.1, loss="cross_entropy")
        >>> sorted(n for n, _ in learner.named_parameters())
        ['model.bias', 'model.weight', 'update.rates.bias', 'update.rates.weight']
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        loss: str | LossFn = "mse",
        adapt_only: Sequence[str] | None = None,
        vectorize: bool | None = None,
        hypergrad: str | Mapping[str, Any] | Strategy | None = None,
    ) -> None:
        owner = type(self).__name__
        super().__init__(
            model,
            LearnedRates(step_size(owner, inner_lr)),
            inner_steps=inner_steps,
            loss=loss,
            adapt_only=adapt_only,
            hypergrad=first_order_strategy(owner, first_order, hypergrad),
            vectorize=vectorize,
        )

    @property
    def inner_lrs(self) -> LearnedRates:
        """The learned rates, by parameter name (``learner.inner_lrs["weight"]``)."""
        return self.update
