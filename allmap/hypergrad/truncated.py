"""Truncated back-propagation: differentiate only the last ``k`` inner steps.

Shaban, Cheng, Hatch & Boots, "Truncated Back-propagation for Bilevel Optimization", AISTATS 2019. The
first ``T - k`` steps run with constant gradients (as first-order MAML: ``d theta_{T-k} / d theta_0 = I``,
no graph is stored for them), the last ``k`` are unrolled:
``d theta_T / d theta_0 = prod_{t > T-k} (I - lr H_t)``. ``k = 0`` is first order; ``k >= T`` is unrolled
exactly. Memory grows with ``k``, not with ``T``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from allmap.hypergrad.base import Strategy, register
from allmap.inner.loop import inner_step
from allmap.inner.optim import InnerOptimizer, Params

__all__ = ["Truncated"]


@register
class Truncated(Strategy):
    """Back-propagate through the last ``k`` inner steps only (counted from the last recorded step).

    Args:
        k: number of differentiated (second-order) steps, an integer >= 0.

    Example:
        >>> from allmap.hypergrad import resolve
        >>> resolve("truncated(k=2)").k
        2
    """

    name = "truncated"

    def __init__(self, k: int = 1) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"truncated: expected k (differentiated steps) to be an integer >= 0, got {k!r}.")
        self.k = k

    def run(
        self,
        loss: Callable[[Params], Tensor],
        params: Params,
        optimizer: InnerOptimizer,
        steps: int,
        record: Sequence[int] = (),
        closure: Sequence[Tensor] = (),
    ) -> list[Params]:
        record = list(record) or [steps]
        total = max(record)
        grad_fn = torch.func.grad(loss)
        path: dict[int, Params] = {0: params}
        state = optimizer.init(params)
        for step in range(1, total + 1):
            first_order = step <= total - self.k
            params, state = inner_step(grad_fn, params, state, optimizer, first_order=first_order)
            if step in record:
                path[step] = params
        return [path[r] for r in record]
