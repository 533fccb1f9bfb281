"""The two reverse-mode strategies every gradient-based learner supports: unrolled and first order."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from allmap.hypergrad.base import STRATEGIES, InnerStrategy, check_strategy, register
from allmap.inner.loop import gradient_descent, stop_gradient
from allmap.inner.optim import InnerOptimizer, Params

__all__ = ["Unrolled", "FirstOrder", "STRATEGIES", "check_strategy", "stop_gradient"]


@register
class Unrolled(InnerStrategy):
    """Reverse mode through every inner step (exact, second order; memory grows with the steps).

    ``d L_query(theta_T) / d theta_0 = prod_t (I - lr H_t) grad L_query(theta_T)`` for SGD, computed by
    autograd through the ``torch.func.grad`` calls of the loop (Finn et al. 2017).
    """

    name = "unrolled"


@register
class FirstOrder(InnerStrategy):
    """Inner gradients are constants: ``d theta_T / d theta_0 = I`` (first-order MAML, Finn et al. 2017, 5.2).

    The meta-gradient is the query gradient at the adapted parameters; no second derivatives, and the inner
    gradients are computed without recording the outer graph.
    """

    name = "first_order"

    def run(
        self,
        loss: Callable[[Params], Tensor],
        params: Params,
        optimizer: InnerOptimizer,
        steps: int,
        record: Sequence[int] = (),
        closure: Sequence[Tensor] = (),
    ) -> list[Params]:
        return gradient_descent(loss, params, optimizer, steps, first_order=True, record=list(record) or [steps])
