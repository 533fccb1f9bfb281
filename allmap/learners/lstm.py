"""The LSTM meta-learner: an LSTM writes the inner updates, its cell state being the parameters.

Ravi & Larochelle, "Optimization as a Model for Few-Shot Learning", ICLR 2017 (seed 003, 3.2.2). Every
coordinate of the learner's parameters is updated by the same small network (coordinate-wise, as in
Andrychowicz et al. 2016). At step ``t``, with support loss ``L_t`` and gradient ``g_t = grad L_t(theta_{t-1})``:

    h_t       = LSTM(preprocess(g_t), preprocess(L_t); h_{t-1})         (a standard LSTM layer, width H)
    i_t       = sigmoid(W_I [h_t, theta_{t-1}, i_{t-1}] + b_I)             (learned input gate: a step size)
    f_t       = sigmoid(W_F [h_t, theta_{t-1}, f_{t-1}] + b_F)             (learned forget gate: a decay)
    theta_t   = f_t * theta_{t-1} - i_t * g_t                               (the meta-LSTM cell state update)

``theta_0`` (the cell's initial state) is the learned initialisation: the wrapped model's parameters.
``preprocess`` is the log/sign transform of Andrychowicz et al.: ``(log|x| / p, sign x)`` if
``|x| >= e^-p`` else ``(-1, e^p x)``. Meta-training is end to end through the query loss; with
``first_order=True`` the loss and gradient inputs are treated as constants, the paper's approximation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from allmap.hypergrad import Strategy
from allmap.inner.optim import Params
from allmap.learners.base import LossFn, TaskModel, functional_forward
from allmap.learners.maml import MAML

__all__ = ["LSTMMetaLearner", "preprocess"]


def preprocess(x: Tensor, p: float = 10.0) -> Tensor:
    """``[..., 2]`` features of ``x``: ``(log|x|/p, sign x)`` for ``|x| >= e^-p``, else ``(-1, e^p x)``.

    Andrychowicz et al. 2016, appendix A. ``log`` sees ``max(|x|, e^-p)`` so its derivative stays finite in the
    branch ``torch.where`` drops.
    """
    big = x.abs() >= math.exp(-p)
    first = torch.where(big, torch.log(x.abs().clamp_min(math.exp(-p))) / p, -torch.ones_like(x))
    second = torch.where(big, torch.sign(x), math.exp(p) * x)
    return torch.stack([first, second], dim=-1)


class LSTMMetaLearner(MAML):
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
            ``"finite_difference"``); the others are defined for gradient-descent inner loops only.

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
        if not 0 < inner_lr < 1:
            raise ValueError(f"LSTMMetaLearner: expected 0 < inner_lr < 1 (the initial input gate), got {inner_lr}.")
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order, loss=loss,
                         adapt_only=adapt_only, vectorize=vectorize, hypergrad=hypergrad)
        if self.hypergrad.scope == "inner" and self.hypergrad.name not in ("unrolled", "first_order"):
            raise ValueError(
                f"LSTMMetaLearner: the {self.hypergrad.name!r} strategy is defined for gradient-descent inner "
                "loops (it needs the update to be an optimizer step, or the solution of an inner problem); the LSTM "
                "writes its own updates. Use 'unrolled', 'first_order', 'forward' or 'finite_difference'."
            )
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"LSTMMetaLearner: expected hidden to be a positive integer, got {hidden!r}.")
        self.hidden = hidden
        ref = next(iter(self.model.parameters()), torch.empty(0))
        like = {"dtype": ref.dtype, "device": ref.device}
        self.lstm = nn.Linear(4 + hidden, 4 * hidden, **like)  # the coordinate-wise LSTM layer: [x, h] -> gates
        self.input_gate = nn.Linear(hidden + 2, 1, **like)
        self.forget_gate = nn.Linear(hidden + 2, 1, **like)
        with torch.no_grad():
            for gate, bias in ((self.input_gate, math.log(inner_lr / (1 - inner_lr))), (self.forget_gate, forget_bias)):
                gate.weight.uniform_(-0.01, 0.01)
                gate.bias.fill_(bias)

    def _update(self, h: Tensor, c: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        gates = self.lstm(torch.cat([x, h], dim=-1))
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def adapt_path(self, support_x: Tensor, support_y: Tensor, steps: Sequence[int]) -> list[TaskModel]:
        frozen = self._frozen()
        start = self.initial_params(support_x, support_y)
        names = list(start)
        shapes = [start[k].shape for k in names]
        sizes = [start[k].numel() for k in names]

        def unflatten(theta: Tensor) -> Params:
            return {k: t.view(s) for k, t, s in zip(names, theta.split(sizes), shapes)}

        def support_loss(theta: Tensor) -> Tensor:
            params = unflatten(theta)
            return self.loss_fn(functional_forward(self.model, {**frozen, **params}, support_x), support_y)

        grad_and_loss = torch.func.grad_and_value(support_loss)
        theta = torch.cat([start[k].reshape(-1) for k in names])
        n = theta.shape[0]
        h = theta.new_zeros(n, self.hidden)
        c = theta.new_zeros(n, self.hidden)
        i_gate = theta.new_zeros(n, 1)
        f_gate = theta.new_zeros(n, 1)
        wanted = set(steps)
        path: dict[int, Params] = {0: start}
        for step in range(1, max(steps) + 1):
            grad, value = grad_and_loss(theta)
            if self.first_order:
                grad, value = grad.detach(), value.detach()
            x = torch.cat([preprocess(grad), preprocess(value).expand(n, 2)], dim=-1)
            h, c = self._update(h, c, x)
            prev = theta.unsqueeze(-1)
            i_gate = torch.sigmoid(self.input_gate(torch.cat([h, prev, i_gate], dim=-1)))
            f_gate = torch.sigmoid(self.forget_gate(torch.cat([h, prev, f_gate], dim=-1)))
            theta = f_gate.squeeze(-1) * theta - i_gate.squeeze(-1) * grad
            if step in wanted:
                path[step] = unflatten(theta)
        return [self._task_model(path[s]) for s in steps]

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, " + super().extra_repr()
