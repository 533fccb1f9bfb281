"""Differentiable inner optimizers as pure ``(init, update)`` pairs, in the style of optax.

An optimizer never mutates its inputs: ``update(grads, state, params)`` returns new ``updates`` and a new
``state``, and :func:`apply_updates` returns new parameters. Every operation is differentiable, so a
meta-gradient can flow through the whole inner loop (or be stopped, see ``allmap.hypergrad``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["Params", "InnerOptimizer", "sgd", "adam", "apply_updates"]

Params = dict[str, Tensor]
LearningRate = float | Tensor | Mapping[str, float | Tensor]


class InnerOptimizer(NamedTuple):
    """A pure optimizer: ``state = init(params)``; ``updates, state = update(grads, state, params)``.

    With ``uses_loss=True`` the update also reads the loss value at ``params``:
    ``update(grads, state, params, value)`` (learned optimizers, e.g. the LSTM of Ravi & Larochelle 2017).
    """

    init: Callable[[Params], Any]
    update: Callable[..., tuple[Params, Any]]
    uses_loss: bool = False


def _rate(lr: LearningRate, name: str) -> float | Tensor:
    if isinstance(lr, Mapping):
        if name not in lr:
            raise KeyError(f"inner optimizer: no learning rate for parameter {name!r}; have {sorted(lr)}.")
        return lr[name]
    return lr


def apply_updates(params: Params, updates: Params) -> Params:
    """Return ``params + updates`` (new tensors; the inputs are left unchanged)."""
    return {k: params[k] + updates[k] for k in params}


def sgd(lr: LearningRate) -> InnerOptimizer:
    """Plain gradient descent: ``theta' = theta - lr * g``.

    ``lr`` is a number, a tensor (learnable: its gradient is the meta-gradient w.r.t. the step size), or a
    mapping from parameter name to a rate of that parameter's shape (Meta-SGD, Li et al. 2017).

    Example:
        >>> opt = sgd(0.1)
        >>> p = {"w": torch.ones(2)}
        >>> upd, _ = opt.update({"w": torch.ones(2)}, opt.init(p), p)
        >>> apply_updates(p, upd)["w"]
        tensor([0.9000, 0.9000])
    """

    def init(params: Params) -> tuple:
        return ()

    def update(grads: Params, state: tuple, params: Params) -> tuple[Params, tuple]:
        return {k: -_rate(lr, k) * g for k, g in grads.items()}, state

    return InnerOptimizer(init, update)


def adam(
    lr: LearningRate,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    eps_root: float = 1e-16,
) -> InnerOptimizer:
    """Adam (Kingma & Ba 2015), safe to differentiate through.

    ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``; ``theta' = theta - lr * m_hat / (sqrt(v_hat + eps_root) + eps)``
    with bias-corrected ``m_hat``, ``v_hat``. ``eps_root > 0`` keeps the derivative of the square root finite
    where the second moment is zero (plain ``sqrt(v)`` gives ``inf * 0 = NaN`` in the meta-gradient there);
    optax uses the same device.
    """
    b1, b2 = betas
    if eps_root <= 0:
        raise ValueError(
            f"adam: expected eps_root > 0 so the meta-gradient stays finite at zero second moment, got {eps_root}."
        )

    def init(params: Params) -> dict[str, Any]:
        zeros = {k: torch.zeros_like(p) for k, p in params.items()}
        return {"count": 0, "m": zeros, "v": dict(zeros)}

    def update(grads: Params, state: dict[str, Any], params: Params) -> tuple[Params, dict[str, Any]]:
        count = state["count"] + 1
        m = {k: b1 * state["m"][k] + (1 - b1) * g for k, g in grads.items()}
        v = {k: b2 * state["v"][k] + (1 - b2) * g * g for k, g in grads.items()}
        c1, c2 = 1 - b1**count, 1 - b2**count
        updates = {k: -_rate(lr, k) * (m[k] / c1) / (torch.sqrt(v[k] / c2 + eps_root) + eps) for k in grads}
        return updates, {"count": count, "m": m, "v": v}

    return InnerOptimizer(init, update)
