"""The LSTM meta-learner: an LSTM writes every inner update (Ravi & Larochelle, ICLR 2017).

The learner network's initial parameters ``theta_0`` and the LSTM's weights are meta-learned together; the
update rule is :class:`~allmap.learners.updates.LSTMUpdate`'s, run by the shared gradient learner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from allmap.hypergrad import Strategy
from allmap.learners.base import LossFn
from allmap.learners.gradient import GradientLearner, first_order_strategy
from allmap.learners.updates import LSTMUpdate, preprocess, step_size

__all__ = ["LSTMMetaLearner", "preprocess"]


class LSTMMetaLearner(GradientLearner):
    """Ravi & Larochelle's meta-learner LSTM over the parameters of ``model``.

    Args:
        model: the learner network; its parameters are the learned initialisation ``theta_0``.
        inner_steps: LSTM updates on the support set.
        hidden: width ``H`` of the coordinate-wise LSTM layer (the paper uses 20).
        inner_lr: initial step size: ``b_I`` starts at ``logit(inner_lr)``, so ``i_t ~ inner_lr``.
        forget_bias: initial ``b_F`` (large, so ``f_t ~ 1``: no decay at the start; the paper uses 4 to 6).
        first_order: treat the loss and gradient inputs as constants (the paper's approximation).
        loss, adapt_only, vectorize: as in :class:`MAML`.
        hypergrad: ``"unrolled"`` (default), ``"first_order"``, or a whole-loss strategy (``"forward"``,
            ``"finite_difference"``); the others take apart optimizer steps, which the LSTM's are not.

    Example:
        >>> import torch, allmap
        >>> learner = allmap.LSTMMetaLearner(torch.nn.Linear(1, 1), inner_steps=3)
        >>> tasks = allmap.tasks.Sinusoid(shots=5).sample(2, torch.Generator().manual_seed(0))
        >>> learner.meta_loss(tasks).backward()
    """

    def __init__(
        self,
        model: nn.Module,
        inner_steps: int = 5,
        hidden: int = 20,
        inner_lr: float = 0.01,
        forget_bias: float = 5.0,
        first_order: bool = False,
        loss: str | LossFn = "mse",
        adapt_only: Sequence[str] | None = None,
        vectorize: bool | None = None,
        hypergrad: str | Mapping[str, Any] | Strategy | None = None,
    ) -> None:
        owner = type(self).__name__
        super().__init__(
            model,
            LSTMUpdate(hidden, step_size(owner, inner_lr), forget_bias),
            inner_steps=inner_steps,
            loss=loss,
            adapt_only=adapt_only,
            hypergrad=first_order_strategy(owner, first_order, hypergrad),
            vectorize=vectorize,
        )
        self.hidden = hidden
