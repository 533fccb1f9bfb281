"""Online hypergradient descent: optimizers that learn their own step size as they train.

Baydin, Cornish, Martinez Rubio, Schmidt & Wood, "Online Learning Rate Adaptation with Hypergradient
Descent", ICLR 2018. The loss after a step, ``f(theta_{t-1} - alpha u_{t-1})``, has derivative
``-grad f(theta_{t-1}) . u_{t-1}`` w.r.t. the rate ``alpha`` that took the step, so before each step

    h_t = grad f(theta_{t-1}) . u_{t-2}           (the hypergradient, with the sign that increases alpha)
    alpha_t = alpha_{t-1} + beta h_t
    theta_t = theta_{t-1} - alpha_t u_{t-1}

where ``u`` is the optimizer's direction: the gradient for :class:`HDSGD`, the bias-corrected Adam direction
``m_hat / (sqrt(v_hat) + eps)`` for :class:`HDAdam`. One rate per parameter group (the paper's global rate);
the cost is one dot product per step. Both are drop-in ``torch.optim.Optimizer`` s; the current rate is
``group["lr"]`` and the last hypergradient ``group["hypergradient"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["HDSGD", "HDAdam"]


def _check(lr: float, hypergrad_lr: float) -> None:
    if not lr >= 0 or not hypergrad_lr >= 0:
        raise ValueError(f"expected lr >= 0 and hypergrad_lr >= 0, got lr={lr}, hypergrad_lr={hypergrad_lr}.")


def _hypergradient(params: list[Tensor], state: dict, key: str) -> Tensor | None:
    """``sum_p grad_p . state[p][key]`` over the parameters that have both, or ``None`` on the first step."""
    terms = [(p.grad * state[p][key]).sum() for p in params if p.grad is not None and key in state[p]]
    return torch.stack(terms).sum() if terms else None


def _evaluate(closure: Callable[[], Tensor] | None) -> Tensor | None:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _adapt_rate(group: dict, state: dict) -> list[Tensor]:
    """Add the weight decay to the gradients of ``group`` and move its rate by ``beta h``; returns the
    parameters that have a gradient."""
    params = [p for p in group["params"] if p.grad is not None]
    if group["weight_decay"]:
        for p in params:
            p.grad.add_(p, alpha=group["weight_decay"])
    h = _hypergradient(params, state, "direction")
    if h is not None:
        group["hypergradient"] = float(h)
        group["lr"] = group["lr"] + group["hypergrad_lr"] * float(h)
    return params


class HDSGD(torch.optim.Optimizer):
    """SGD whose learning rate follows its hypergradient (SGD-HD of Baydin et al. 2018).

    Args:
        params: parameters or parameter groups.
        lr: the initial learning rate ``alpha_0``.
        hypergrad_lr: ``beta``, the learning rate of the learning rate.
        weight_decay: L2 coefficient added to the gradient.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = HDSGD([w], lr=0.1, hypergrad_lr=0.01)
        >>> for _ in range(3):
        ...     opt.zero_grad(); (w ** 2).sum().backward(); opt.step()
        >>> opt.param_groups[0]["lr"] > 0.1
        True
    """

    def __init__(
        self, params: Iterable, lr: float = 1e-3, hypergrad_lr: float = 1e-3, weight_decay: float = 0.0
    ) -> None:
        _check(lr, hypergrad_lr)
        super().__init__(params, {"lr": lr, "hypergrad_lr": hypergrad_lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = _evaluate(closure)
        for group in self.param_groups:
            params = _adapt_rate(group, self.state)
            for p in params:
                self.state[p]["direction"] = p.grad.clone()
                p.add_(p.grad, alpha=-group["lr"])
        return loss


class HDAdam(torch.optim.Optimizer):
    """Adam whose learning rate follows its hypergradient (Adam-HD of Baydin et al. 2018).

    ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``; ``u = m_hat / (sqrt(v_hat) + eps)``; the rate moves
    by ``beta g . u_prev`` before the step ``theta -= alpha u``. With ``hypergrad_lr=0`` it is ``torch.optim.Adam``.

    Args:
        params: parameters or parameter groups.
        lr: the initial learning rate.
        hypergrad_lr: ``beta``, the learning rate of the learning rate.
        betas, eps, weight_decay: as in ``torch.optim.Adam``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        hypergrad_lr: float = 1e-7,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        _check(lr, hypergrad_lr)
        defaults = {"lr": lr, "hypergrad_lr": hypergrad_lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = _evaluate(closure)
        for group in self.param_groups:
            params = _adapt_rate(group, self.state)
            b1, b2 = group["betas"]
            for p in params:
                state = self.state[p]
                if "m" not in state:
                    state["count"], state["m"], state["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                state["count"] += 1
                state["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                state["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                m_hat = state["m"] / (1 - b1 ** state["count"])
                v_hat = state["v"] / (1 - b2 ** state["count"])
                state["direction"] = m_hat / (v_hat.sqrt() + group["eps"])
                p.add_(state["direction"], alpha=-group["lr"])
        return loss
