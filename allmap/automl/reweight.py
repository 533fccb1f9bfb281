"""Learning to reweight examples for robust training (Ren, Zeng, Yang & Urtasun, ICML 2018).

For each training minibatch, one look-ahead SGD step on the loss weighted by ``eps`` (all zero),

    theta'(eps) = theta - lr * grad_theta sum_i eps_i l_i(theta),

and the gradient of the loss of a clean validation minibatch at ``theta'`` w.r.t. ``eps`` gives the weights

    u_i = -d L_val(theta'(eps)) / d eps_i |_{eps=0} = lr * grad l_i(theta) . grad L_val(theta),
    w_i = max(u_i, 0) / sum_j max(u_j, 0)          (all zero if no example helps).

An example whose gradient points against the validation gradient (a flipped label, typically) gets weight
zero. The hypergradient is the reverse-mode derivative through one differentiable inner step, computed with
``torch.func`` at the model's current parameters, so any ``nn.Module`` works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["example_hypergradient", "example_weights", "ValidationReweighting"]


def example_hypergradient(
    model: nn.Module, x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor, lr: float = 1.0
) -> Tensor:
    """``d L_val(theta'(eps)) / d eps`` at ``eps = 0`` for the minibatch ``(x, y)`` (one entry per example)."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def look_ahead_val(eps: Tensor) -> Tensor:
        def weighted(p: dict[str, Tensor]) -> Tensor:
            logits = torch.func.functional_call(model, (p, buffers), (x,))
            return (eps * F.cross_entropy(logits, y, reduction="none")).sum()

        grads = torch.func.grad(weighted)(params)
        moved = {k: params[k] - lr * grads[k] for k in params}
        return F.cross_entropy(torch.func.functional_call(model, (moved, buffers), (x_val,)), y_val)

    return torch.func.grad(look_ahead_val)(torch.zeros(len(y), dtype=x.dtype, device=x.device))


def example_weights(model: nn.Module, x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor) -> Tensor:
    """Ren et al.'s weights ``w = max(-hypergradient, 0)``, normalised to sum 1 (zero if none is positive)."""
    u = torch.clamp(-example_hypergradient(model, x, y, x_val, y_val), min=0.0)
    total = u.sum()
    return torch.where(total > 0, u / torch.where(total > 0, total, torch.ones_like(total)), u)


class ValidationReweighting:
    """The weighting of :func:`allmap.automl.training.fit` that reweights each minibatch against a random
    minibatch of ``batch_size`` clean validation examples."""

    def __init__(self, x_val: Tensor, y_val: Tensor, batch_size: int = 100, seed: int = 0) -> None:
        self.x_val, self.y_val, self.batch_size = x_val, y_val, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        idx = torch.randperm(len(self.y_val), generator=self.generator)[: self.batch_size].to(self.y_val.device)
        return example_weights(model, x, y, self.x_val[idx], self.y_val[idx])
