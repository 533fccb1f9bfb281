"""Model-Agnostic Meta-Learning and its parameter-partition variant ANIL.

MAML (Finn, Abbeel & Levine, ICML 2017): the task model is theta after a few gradient steps on the
support loss, ``theta' = theta - inner_lr * grad L_support(theta)``, and theta is meta-trained on the
query loss ``L_query(theta')``; second order by default, first order (FOMAML) with ``first_order=True``.

ANIL (Raghu, Raghu, Bengio & Vinyals, ICLR 2020): only the head is adapted; the body is meta-learned but
shared across tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from allmap.hypergrad import Strategy
from allmap.learners.base import LossFn
from allmap.learners.gradient import GradientLearner, first_order_strategy
from allmap.learners.updates import descent

__all__ = ["MAML", "ANIL"]


class MAML(GradientLearner):
    """MAML: a few differentiable gradient steps from the meta-learned initialisation theta.

    Args:
        model: any ``nn.Module`` (run through ``torch.func.functional_call``); its parameters are theta and
            receive the meta-gradient in place. BatchNorm layers are switched to batch statistics.
        inner_lr: step size of the inner loop.
        inner_steps: inner steps during meta-training (and the default of :meth:`adapt`).
        first_order: treat inner gradients as constants (FOMAML).
        loss: ``"mse"``, ``"cross_entropy"`` or a callable ``loss(pred, target)``.
        inner_optimizer: ``"sgd"`` (the paper) or ``"adam"``.
        adapt_only: parameter-name prefixes to adapt; ``None`` adapts all (see :class:`ANIL`).
        vectorize: run the tasks of a meta-batch with ``vmap`` (else one at a time).
        hypergrad: how the meta-gradient crosses the inner loop (see :mod:`allmap.hypergrad`): ``"unrolled"``
            (default), ``"first_order"`` (same as ``first_order=True``), ``"truncated(k)"``,
            ``"checkpointed"``, ``"implicit(lam=...)"`` (see :class:`IMAML`; these two run the tasks one at
            a time whatever ``vectorize`` says), ``"forward"``, ``"finite_difference"``, or a
            :class:`~allmap.hypergrad.Strategy`.

    Example:
        >>> import torch, allmap
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
        >>> maml = allmap.MAML(net, inner_lr=0.01, inner_steps=1)
        >>> tasks = allmap.tasks.Sinusoid(shots=10).sample(25, torch.Generator().manual_seed(0))
        >>> maml.meta_loss(tasks).backward()
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        loss: str | LossFn = "mse",
        inner_optimizer: str = "sgd",
        adapt_only: Sequence[str] | None = None,
        vectorize: bool | None = None,
        hypergrad: str | Mapping[str, Any] | Strategy | None = None,
    ) -> None:
        owner = type(self).__name__
        super().__init__(
            model,
            descent(owner, inner_optimizer, inner_lr),
            inner_steps=inner_steps,
            loss=loss,
            adapt_only=adapt_only,
            hypergrad=first_order_strategy(owner, first_order, hypergrad),
            vectorize=vectorize,
        )
        self.inner_optimizer = inner_optimizer


class ANIL(MAML):
    """ANIL: MAML that adapts only the head (parameters under the module named ``head``); MAML's
    configuration with ``adapt_only=head``.

    Raghu et al., "Rapid Learning or Feature Reuse?", ICLR 2020. Update rule: ``w' = w - inner_lr *
    grad_w L_support(body, w)`` for the head ``w``; the body is meta-learned through the query loss only.
    Other arguments as in :class:`MAML`.
    """

    def __init__(
        self,
        model: nn.Module,
        head: str | Sequence[str] = "head",
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        loss: str | LossFn = "mse",
        inner_optimizer: str = "sgd",
        vectorize: bool | None = None,
        hypergrad: str | Mapping[str, Any] | Strategy | None = None,
    ) -> None:
        super().__init__(
            model,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            first_order=first_order,
            loss=loss,
            inner_optimizer=inner_optimizer,
            adapt_only=head,
            vectorize=vectorize,
            hypergrad=hypergrad,
        )
        self.head = head
