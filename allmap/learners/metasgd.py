"""Meta-SGD: MAML with a learned step size for every parameter entry.

Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", 2017 (seed 004).
Update rule: ``theta' = theta - alpha * grad L_support(theta)`` (elementwise product), where ``alpha``
has theta's shape and is meta-trained together with theta on the query loss ``L_query(theta')``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from allmap.hypergrad import Strategy
from allmap.inner.optim import InnerOptimizer, sgd
from allmap.learners.base import LossFn
from allmap.learners.maml import MAML

__all__ = ["MetaSGD"]


def _key(name: str) -> str:
    # ParameterDict keys may not contain "."; "__" cannot clash with a module attribute name.
    return name.replace(".", "__")


class MetaSGD(MAML):
    """MAML whose inner learning rates ``alpha`` (one per parameter entry) are meta-parameters.

    Args are those of :class:`MAML`; ``inner_lr`` initialises every entry of alpha (the paper draws it
    from U[0.005, 0.1]; a constant start is the common choice). The inner optimizer is SGD.

    Example:
        >>> import torch, allmap
        >>> learner = allmap.MetaSGD(torch.nn.Linear(2, 2), inner_lr=0.1, loss="cross_entropy")
        >>> sorted(n for n, _ in learner.named_parameters())
        ['inner_lrs.bias', 'inner_lrs.weight', 'model.bias', 'model.weight']
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
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order, loss=loss,
                         adapt_only=adapt_only, vectorize=vectorize, hypergrad=hypergrad)
        params = dict(model.named_parameters())
        self.inner_lrs = nn.ParameterDict(
            {_key(n): nn.Parameter(torch.full_like(params[n].detach(), float(inner_lr))) for n in self.adapted_names}
        )

    def optimizer(self) -> InnerOptimizer:
        return sgd({n: self.inner_lrs[_key(n)] for n in self.adapted_names})
