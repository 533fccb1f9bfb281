"""Forward-mode meta-gradients: ``torch.func.jvp`` through the whole adaptation.

One forward pass with a tangent ``u`` gives the directional derivative ``<grad f, u>`` alongside the value,
with memory independent of the number of inner steps (nothing is stored for a backward pass). The gradient
w.r.t. ``n`` scalars costs ``n`` passes, so forward mode pays off for a few hyper-parameters (inner learning
rates, a per-layer rate, the regularisation strength) and long inner loops, where reverse mode stores every
step (Franceschi et al., "Forward and Reverse Gradient-Based Hyperparameter Optimization", ICML 2017).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from allmap.checks import check_int
from allmap.hypergrad.base import WholeLossStrategy, register
from allmap.inner.optim import Params

__all__ = ["Forward", "hypergradient"]


def hypergradient(fn: Callable[[Params], Tensor], hyper: Params) -> tuple[Tensor, Params]:
    """``(fn(hyper), d fn / d hyper)`` by forward mode: one ``jvp`` per scalar entry of ``hyper``.

    ``fn`` maps a dict of tensors to a scalar and may run a whole inner loop (``torch.func.grad`` inside
    works: forward-over-reverse).

    Example:
        >>> f = lambda h: (h["lr"] ** 2).sum()
        >>> hypergradient(f, {"lr": torch.tensor([1.0, 2.0])})[1]["lr"]
        tensor([2., 4.])
    """
    primals = {k: v.detach() for k, v in hyper.items()}
    grads = {k: torch.zeros_like(v) for k, v in primals.items()}
    value = None
    for name, p in primals.items():
        for i in range(p.numel()):
            tangent = {k: torch.zeros_like(v) for k, v in primals.items()}
            tangent[name].view(-1)[i] = 1.0
            value, dot = torch.func.jvp(fn, (primals,), (tangent,))
            grads[name].view(-1)[i] = dot
    if value is None:  # no entries at all
        value = fn(primals)
    return value.detach(), grads


@register
class Forward(WholeLossStrategy):
    """Meta-gradient of the whole meta-loss by forward mode, one ``jvp`` per meta-parameter entry.

    Meant for learners with few meta-parameters; ``max_entries`` guards against the cost (a learner with
    more raises at construction). For hyper-parameters that are not meta-parameters of a learner, call
    :func:`hypergradient` directly.

    Args:
        max_entries: the largest number of meta-parameter entries accepted.
    """

    name = "forward"

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = check_int("forward", "max_entries", max_entries)

    def meta_gradient(self, fn: Callable[[Params], Tensor], params: Params) -> tuple[Tensor, Params, dict]:
        value, grads = hypergradient(fn, params)
        return value, grads, {"evaluations": sum(p.numel() for p in params.values())}

    def check(self, learner: nn.Module) -> None:
        super().check(learner)
        n = sum(p.numel() for p in learner.parameters())
        if n > self.max_entries:
            raise ValueError(
                f"{type(learner).__name__}: the 'forward' strategy costs one forward pass per meta-parameter "
                f"entry and this learner has {n} > max_entries={self.max_entries}. Use reverse mode ('unrolled', "
                "'checkpointed') for many meta-parameters, raise max_entries, or call "
                "allmap.hypergrad.forward.hypergradient for a few hyper-parameters."
            )
