"""Truncated back-propagation: differentiate only the last ``k`` inner steps.

Shaban, Cheng, Hatch & Boots, "Truncated Back-propagation for Bilevel Optimization", AISTATS 2019. The
first ``T - k`` steps run with constant gradients (as first-order MAML: ``d theta_{T-k} / d theta_0 = I``,
no graph is stored for them), the last ``k`` are unrolled:
``d theta_T / d theta_0 = prod_{t > T-k} (I - lr H_t)``. ``k = 0`` is first order; ``k >= T`` is unrolled
exactly. Memory grows with ``k``, not with ``T``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from allmap.checks import check_int
from allmap.hypergrad.base import InnerStrategy, register
from allmap.inner.loop import inner_step, unroll
from allmap.inner.optim import InnerOptimizer, Params

__all__ = ["Truncated"]


@register
class Truncated(InnerStrategy):
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
        self.k = check_int("truncated", "k", k, minimum=0, what="differentiated steps")

    def run(
        self,
        loss: Callable[[Params], Tensor],
        params: Params,
        optimizer: InnerOptimizer,
        steps: int,
        record: Sequence[int] = (),
        closure: Sequence[Tensor] = (),
    ) -> list[Params]:
        total = max(record) if record else steps

        def step(carry: tuple, t: int) -> tuple:  # steps before the last k are first order
            return inner_step(loss, *carry, optimizer, first_order=t <= total - self.k)

        return unroll(step, (params, optimizer.init(params)), steps, record, view=lambda c: c[0])
