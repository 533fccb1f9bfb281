"""Finite-difference and zeroth-order meta-gradients, for inner loops that are not differentiable.

* ``directions = 0``: central differences on every coordinate,
  ``g_i = (f(p + eps e_i) - f(p - eps e_i)) / (2 eps)``; error ``<= eps^2/6 max|f'''| + macheps |f| / eps``
  per coordinate (truncation plus round-off), ``2 n`` evaluations.
* ``directions = m > 0``: the antithetic Gaussian estimator (Nesterov & Spokoiny 2017; ES, Salimans et al.
  2017) ``g = (1/m) sum_j (f(p + eps u_j) - f(p - eps u_j)) / (2 eps) u_j``, ``u_j ~ N(0, I)``: unbiased
  for the gradient of the Gaussian-smoothed loss (for a quadratic ``f``, of ``f`` itself), ``2 m``
  evaluations. The estimator's variance (sample variance of the ``m`` terms over ``m``, summed over
  coordinates) is reported in ``info["variance"]``, per tensor in ``info["coordinate_variance"]``.

The loss is evaluated under ``torch.no_grad``; the inner loop may contain anything.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from allmap.hypergrad.base import WholeLossStrategy, register
from allmap.inner.optim import Params

__all__ = ["FiniteDifference", "central_differences", "zeroth_order", "directional_difference"]


def _shift(params: Params, direction: Params, scale: float) -> Params:
    return {k: v + scale * direction[k] for k, v in params.items()}


def central_differences(fn: Callable[[Params], Tensor], params: Params, eps: float) -> tuple[Tensor, Params, dict]:
    """Central differences on every coordinate of ``params``; returns ``(fn(params), grads, info)``."""
    with torch.no_grad():
        value = fn(params)
        grads = {k: torch.zeros_like(v) for k, v in params.items()}
        for name, p in params.items():
            for i in range(p.numel()):
                e = {k: torch.zeros_like(v) for k, v in params.items()}
                e[name].view(-1)[i] = 1.0
                grads[name].view(-1)[i] = (fn(_shift(params, e, eps)) - fn(_shift(params, e, -eps))) / (2 * eps)
    n = sum(p.numel() for p in params.values())
    return value, grads, {"evaluations": 2 * n + 1, "variance": 0.0, "eps": eps}


def directional_difference(fn: Callable[[Params], Params], params: Params, direction: Params, eps: float) -> Params:
    """``(fn(p + eps d) - fn(p - eps d)) / (2 eps)``: the central difference of a tensor-valued ``fn`` along
    ``d``. For ``fn`` a gradient ``p -> grad_a L(p, a)`` it is the mixed Hessian-vector product
    ``grad^2_{a,p} L d`` with error ``O(eps^2)``, at the cost of two gradients (DARTS, Liu et al. 2019, eq. 8)."""
    with torch.no_grad():
        plus, minus = fn(_shift(params, direction, eps)), fn(_shift(params, direction, -eps))
    return {k: (plus[k] - minus[k]) / (2 * eps) for k in plus}


def zeroth_order(
    fn: Callable[[Params], Tensor], params: Params, eps: float, directions: int, generator: torch.Generator
) -> tuple[Tensor, Params, dict]:
    """The antithetic Gaussian estimator with ``directions`` random directions; see the module docstring."""
    with torch.no_grad():
        value = fn(params)
        total = {k: torch.zeros_like(v) for k, v in params.items()}
        square = {k: torch.zeros_like(v) for k, v in params.items()}
        for _ in range(directions):
            u = {k: torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device) for k, v in params.items()}
            slope = (fn(_shift(params, u, eps)) - fn(_shift(params, u, -eps))) / (2 * eps)
            for k in params:
                term = slope * u[k]
                total[k] += term
                square[k] += term * term
        m = directions
        grads = {k: total[k] / m for k in params}
        # variance of the mean of m i.i.d. terms: sample variance / m (unbiased sample variance)
        var = {k: (square[k] - m * grads[k] ** 2) / max(m - 1, 1) / m for k in params}
    info = {
        "evaluations": 2 * m + 1,
        "variance": float(sum(v.sum() for v in var.values())),
        "coordinate_variance": var,
        "eps": eps,
    }
    return value, grads, info


@register
class FiniteDifference(WholeLossStrategy):
    """Meta-gradient of the whole meta-loss by central differences (``directions=0``) or zeroth order.

    Args:
        eps: the step; about ``macheps ** (1/3)`` times the parameter scale balances truncation and
            round-off for central differences (``6e-6`` in float64, ``5e-3`` in float32).
        directions: 0 for coordinate-wise central differences, else the number of random directions.
        seed: seed of the random directions.
    """

    name = "finite_difference"

    def __init__(self, eps: float = 1e-3, directions: int = 0, seed: int = 0) -> None:
        if not eps > 0:
            raise ValueError(f"finite_difference: expected eps > 0, got {eps!r}.")
        if not isinstance(directions, int) or directions < 0 or directions == 1:
            raise ValueError(
                "finite_difference: expected directions to be 0 (central differences) or an integer >= 2 "
                f"(random directions; the variance needs two), got {directions!r}."
            )
        self.eps = float(eps)
        self.directions = directions
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "generator" in state:
            self._generator.set_state(state["generator"])

    def meta_gradient(self, fn: Callable[[Params], Tensor], params: Params) -> tuple[Tensor, Params, dict]:
        if self.directions == 0:
            return central_differences(fn, params, self.eps)
        return zeroth_order(fn, params, self.eps, self.directions, self._generator)
