"""Normalisation with batch statistics, written with plain tensor ops so ``vmap`` differentiates it exactly.

MAML's reference implementation (Finn et al. 2017, github.com/cbfinn/maml) normalises every hidden layer
with the statistics of the batch it sees, in training and at test time. ``torch.nn.BatchNorm1d`` does
that in training mode, but under ``torch.func.vmap`` torch 2.13 gives a wrong second derivative of
``batch_norm`` (a float64 gradcheck fails), so the meta-gradient through it would be wrong. This module
computes the same function from ``mean`` and ``var``, whose batching rules are exact, inside ``torch.func``
transforms (``vmap``, ``grad``: where second derivatives are taken), and calls torch's fused ``batch_norm``
outside them, where it is faster and only its exact first derivative (or a plain double backward) is used.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BatchStatNorm", "first_order_only"]

_FIRST_ORDER = contextvars.ContextVar("allmap_first_order_only", default=False)


@contextlib.contextmanager
def first_order_only() -> Iterator[None]:
    """Declare that no second derivative is taken inside this block (evaluation's inner loop is such a
    block): :class:`BatchStatNorm` then calls torch's fused ``batch_norm`` inside ``torch.func.grad`` too,
    except under ``vmap``. A speed hint only: outside ``vmap`` both forms are exact to any order, but the
    fused one is faster for a first derivative (such as evaluation's adaptation) and slower for a
    second."""
    token = _FIRST_ORDER.set(True)
    try:
        yield
    finally:
        _FIRST_ORDER.reset(token)


def under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` is active (``grad`` transforms alone do not count)."""
    stack = torch._C._functorch.get_interpreter_stack() or ()
    return any(level.key() == torch._C._functorch.TransformType.Vmap for level in stack)


def _fused() -> bool:
    """Whether to call the fused ``batch_norm``: outside ``torch.func`` transforms, or in a
    :func:`first_order_only` block outside ``vmap``."""
    if torch._C._functorch.maybe_current_level() is None:
        return True
    return not torch.compiler.is_compiling() and _FIRST_ORDER.get() and not under_vmap()


class BatchStatNorm(nn.Module):
    """``y = (x - mean_B(x)) / sqrt(var_B(x) + eps) * weight + bias`` over every dimension but ``dim``.

    Equal to ``BatchNorm1d``/``2d`` in training mode without running statistics (tested), and safe to
    differentiate twice under ``vmap``.

    Args:
        features: size of the feature dimension.
        dim: the feature dimension (``-1`` for ``[N, F]`` activations, ``1`` for ``[N, C, H, W]``).
        eps: added to the variance.
    """

    def __init__(self, features: int, dim: int = -1, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.dim, self.eps = dim, eps

    def forward(self, x: Tensor) -> Tensor:
        if self.dim % x.dim() == 1 and _fused():
            # outside torch.func transforms (e.g. the query pass of a per-task loop) nothing will take the
            # second derivative under vmap, and torch's fused kernel is faster for the first
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        dim = self.dim % x.dim()
        reduce = [d for d in range(x.dim()) if d != dim]
        # centred once: the products below save only ``d`` (one activation-sized tensor per layer, which
        # matters when a second derivative keeps every inner step's graph alive)
        d = x - x.mean(reduce, keepdim=True)
        var = (d * d).mean(reduce, keepdim=True)
        shape = [1] * x.dim()
        shape[dim] = -1
        return d * (torch.rsqrt(var + self.eps) * self.weight.view(shape)) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, dim={self.dim}, eps={self.eps}"
