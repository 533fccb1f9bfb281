"""Implicit differentiation of a proximal-regularised inner problem (iMAML).

Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019. The task
parameters are (approximately) ``phi* = argmin_phi L_support(phi) + lam/2 ||phi - theta||^2``, reached by
``steps`` optimizer steps from theta with no graph. Stationarity ``grad L(phi*) + lam (phi* - theta) = 0``
and the implicit function theorem give

    d phi* / d theta = (I + H / lam)^-1,     H = Hessian of L_support at phi*,

so the meta-gradient is ``x = (I + H/lam)^-1 v`` for ``v = d L_query / d phi*``: a linear solve with
Hessian-vector products, by conjugate gradient (default) or a truncated Neumann series. Tensors ``w`` that
the support loss closes over (for example a shared body) get ``-(1/lam) d<grad_phi L, x>/dw`` (the same
theorem). Memory does not depend on the number of inner steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from allmap.hypergrad.base import Strategy, register
from allmap.hypergrad.checkpointed import _in_transform
from allmap.inner.loop import gradient_descent, monotone_descent
from allmap.inner.optim import InnerOptimizer, Params

__all__ = ["Implicit", "ImplicitSolveWarning", "ImplicitSolveError", "conjugate_gradient", "conjugate_gradient_fixed",
           "neumann"]

Vec = list[Tensor]
MatVec = Callable[[Vec], Vec]


class ImplicitSolveWarning(UserWarning):
    """The linear solve of the implicit meta-gradient stopped above its tolerance."""


class ImplicitSolveError(RuntimeError):
    """The linear solve of the implicit meta-gradient did not converge and ``on_fail="raise"`` was asked."""


def _dot(a: Vec, b: Vec) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _axpy(alpha: Tensor | float, x: Vec, y: Vec) -> Vec:
    return [yi + alpha * xi for xi, yi in zip(x, y)]


def conjugate_gradient(matvec: MatVec, b: Vec, iterations: int, tol: float = 0.0) -> tuple[Vec, float]:
    """Solve ``A x = b`` for symmetric positive definite ``A`` (given as ``matvec``) from ``x = 0``.

    Stops after ``iterations`` or when ``||b - A x|| <= tol ||b||``. Returns ``(x, relative residual)``.
    If ``A`` is not positive definite along a search direction (a non-convex support loss with small
    ``lam``), the iteration stops there, returning ``b`` itself if that happens at once; the residual says
    so (raise ``damping`` or ``lam``).
    """
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    bb = _dot(b, b)
    if float(bb) == 0.0:
        return x, 0.0
    rr = bb
    for it in range(iterations):
        if float(rr) <= tol**2 * float(bb):
            break
        ap = matvec(p)
        pap = _dot(p, ap)
        if float(pap) <= 0:
            # negative curvature (Steihaug 1983): stop; on the first iteration fall back to x = b, the
            # first-order answer (A ~ I), rather than 0
            if it == 0:
                x = [t.clone() for t in b]
                r = _axpy(-1.0, ap, b)
                rr = _dot(r, r)
            break
        alpha = rr / pap
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rr_new = _dot(r, r)
        p = _axpy(rr_new / rr, p, r)
        rr = rr_new
    return x, float(rr.sqrt() / bb.sqrt())


def conjugate_gradient_fixed(matvec: MatVec, b: Vec, iterations: int) -> tuple[Vec, Tensor]:
    """:func:`conjugate_gradient` without data-dependent control flow, so it runs inside ``vmap``.

    Runs exactly ``iterations`` steps; once converged (zero residual) or at negative curvature the updates
    are masked to zero, with the same first-iteration fallback ``x = b``. Returns ``(x, relative residual)``
    with the residual as a tensor.
    """
    x = [torch.zeros_like(t) for t in b]
    r = list(b)
    p = list(b)
    bb = _dot(b, b)
    rr = bb
    done = bb == 0
    for it in range(iterations):
        ap = matvec(p)
        pap = _dot(p, ap)
        bad = (pap <= 0) & ~done
        if it == 0:
            x = [torch.where(bad, bi, xi) for bi, xi in zip(b, x)]
        done = done | bad
        alpha = torch.where(done, torch.zeros_like(rr), rr / torch.where(done, torch.ones_like(pap), pap))
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rr_new = _dot(r, r)
        beta = torch.where(done, torch.zeros_like(rr), rr_new / torch.where(rr == 0, torch.ones_like(rr), rr))
        p = _axpy(beta, p, r)
        rr = torch.where(done, rr, rr_new)
        done = done | (rr_new == 0)
    return x, torch.sqrt(rr / torch.where(bb == 0, torch.ones_like(bb), bb))


def neumann(matvec: MatVec, b: Vec, iterations: int, alpha: float = 1.0, tol: float = 0.0) -> tuple[Vec, float]:
    """``A^-1 b ~ alpha sum_{j=0}^{J} (I - alpha A)^j b`` (converges when ``||I - alpha A|| < 1``).

    Returns ``(x, relative residual ||b - A x|| / ||b||)``.
    """
    term = [alpha * t for t in b]
    x = list(term)
    for _ in range(iterations):
        term = _axpy(-alpha, matvec(term), term)
        x = [xi + ti for xi, ti in zip(x, term)]
    bnorm = float(_dot(b, b).sqrt())
    if bnorm == 0.0:
        return x, 0.0
    res = _axpy(-1.0, matvec(x), b)
    return x, float(_dot(res, res).sqrt()) / bnorm


class _ImplicitSolution(torch.autograd.Function):
    """Returns ``phi`` (computed without a graph); its backward is the implicit function theorem."""

    @staticmethod
    def forward(ctx: Any, strategy: Implicit, loss: Callable, names: list[str], n: int, *tensors: Tensor) -> tuple:
        ctx.strategy, ctx.loss, ctx.names, ctx.n = strategy, loss, names, n
        ctx.save_for_backward(*tensors)
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def backward(ctx: Any, *grad_phi: Tensor) -> tuple:
        saved = ctx.saved_tensors
        phi_values, theta, closure = saved[: ctx.n], saved[ctx.n : 2 * ctx.n], saved[2 * ctx.n :]
        strategy: Implicit = ctx.strategy
        v = [g if g is not None else torch.zeros_like(p) for g, p in zip(grad_phi, phi_values)]
        with torch.enable_grad():
            phi = [p.detach().requires_grad_(True) for p in phi_values]
            inner = ctx.loss(dict(zip(ctx.names, phi)))
            g = torch.autograd.grad(inner, phi, create_graph=True)

            def matvec(x: Vec) -> Vec:
                hx = torch.autograd.grad(g, phi, x, retain_graph=True, allow_unused=True)
                hx = [torch.zeros_like(p) if h is None else h for h, p in zip(hx, phi)]
                return [(1.0 + strategy.damping) * xi + hi / strategy.lam for xi, hi in zip(x, hx)]

            x, residual = strategy.solve(matvec, v)
            need = [t for t in closure if t.requires_grad]
            linked = need and any(gi.requires_grad for gi in g)
            from_closure = torch.autograd.grad(g, need, x, allow_unused=True) if linked else [None] * len(need)
        it = iter(from_closure)
        closure_grads = [
            (None if (c := next(it)) is None else -c / strategy.lam) if t.requires_grad else None for t in closure
        ]
        theta_grads = [xi if t.requires_grad else None for xi, t in zip(x, theta)]
        return (None, None, None, None, *([None] * ctx.n), *theta_grads, *closure_grads)


@register
class Implicit(Strategy):
    """Implicit meta-gradient of ``argmin_phi L_support(phi) + lam/2 ||phi - theta||^2`` (iMAML).

    Args:
        lam: regularisation strength ``lam > 0`` (iMAML's lambda; larger keeps phi closer to theta).
        iterations: conjugate-gradient iterations (or Neumann terms) of the linear solve.
        solver: ``"cg"`` or ``"neumann"``.
        damping: adds ``damping * x`` to the system, ``((1 + damping) I + H/lam) x = v`` (stabilises CG
            when the support Hessian is indefinite).
        tol: relative residual ``||v - A x|| / ||v||`` the solve must reach (CG stops early there).
        on_fail: what to do if the solve ends above ``tol``: ``"warn"`` (an :class:`ImplicitSolveWarning`
            with the residual), ``"raise"`` (:class:`ImplicitSolveError`) or ``"ignore"``.
        alpha: step of the Neumann series (``||I - alpha A|| < 1`` is needed to converge).
        safeguard: solve the inner problem with :func:`allmap.inner.loop.monotone_descent` (a step that
            raises the regularised loss is rejected and the task's step size halved). The implicit gradient
            depends on the solution, not on the path to it; this changes only steps that would raise the
            loss (curvature above about ``2 / inner_lr`` along them), which plain descent takes and which
            can make it oscillate or diverge. ``False``: plain descent.

    The residual of the last solve is kept in ``last_residual``.

    Example:
        >>> import torch, allmap
        >>> learner = allmap.IMAML(torch.nn.Linear(1, 1), lam=2.0, inner_steps=10)
    """

    name = "implicit"
    vmappable = False
    SOLVERS = ("cg", "neumann")
    ON_FAIL = ("warn", "raise", "ignore")

    def __init__(
        self,
        lam: float = 1.0,
        iterations: int = 5,
        solver: str = "cg",
        damping: float = 0.0,
        tol: float = 1e-2,
        on_fail: str = "warn",
        alpha: float = 1.0,
        safeguard: bool = True,
    ) -> None:
        if not lam > 0:
            raise ValueError(f"implicit: expected the regularisation lam > 0, got {lam!r}.")
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"implicit: expected iterations to be an integer >= 1, got {iterations!r}.")
        if solver not in self.SOLVERS:
            raise ValueError(f"implicit: unknown solver {solver!r}; expected one of {', '.join(self.SOLVERS)}.")
        if on_fail not in self.ON_FAIL:
            raise ValueError(f"implicit: unknown on_fail {on_fail!r}; expected one of {', '.join(self.ON_FAIL)}.")
        if damping < 0 or tol < 0:
            raise ValueError(f"implicit: expected damping >= 0 and tol >= 0, got damping={damping}, tol={tol}.")
        self.lam = float(lam)
        self.iterations = iterations
        self.solver = solver
        self.damping = float(damping)
        self.tol = float(tol)
        self.on_fail = on_fail
        self.alpha = float(alpha)
        self.safeguard = bool(safeguard)
        self._last_residual: float | None = None

    @property
    def last_residual(self) -> float | None:
        return self._last_residual

    @last_residual.setter
    def last_residual(self, value: float) -> None:
        self._last_residual = value

    def solve(self, matvec: MatVec, v: Vec) -> tuple[Vec, float]:
        """Solve ``A x = v``; warn or raise per ``on_fail`` if the relative residual stays above ``tol``."""
        if self.solver == "cg":
            x, residual = conjugate_gradient(matvec, v, self.iterations, self.tol)
        else:
            x, residual = neumann(matvec, v, self.iterations, self.alpha)
        self.check_residual(residual)
        return x, residual

    def solve_fixed(self, matvec: MatVec, v: Vec) -> tuple[Vec, Tensor]:
        """Like :meth:`solve` but branch-free (runs inside ``vmap``); the residual is returned, not checked."""
        if self.solver == "cg":
            return conjugate_gradient_fixed(matvec, v, self.iterations)
        term = [self.alpha * t for t in v]
        x = list(term)
        for _ in range(self.iterations):
            term = _axpy(-self.alpha, matvec(term), term)
            x = [xi + ti for xi, ti in zip(x, term)]
        res = _axpy(-1.0, matvec(x), v)
        bb = _dot(v, v)
        return x, torch.sqrt(_dot(res, res) / torch.where(bb == 0, torch.ones_like(bb), bb))

    def check_residual(self, residual: float) -> None:
        """Warn or raise per ``on_fail`` if ``residual`` is above ``tol``; remember it in ``last_residual``."""
        self.last_residual = residual
        if residual > self.tol and self.on_fail != "ignore":
            message = (
                f"implicit meta-gradient: {self.solver} stopped after {self.iterations} iterations at relative "
                f"residual {residual:.3g} > tol {self.tol:.3g}; raise iterations, lam or damping."
            )
            if self.on_fail == "raise":
                raise ImplicitSolveError(message)
            warnings.warn(message, ImplicitSolveWarning, stacklevel=3)

    def regularised(self, loss: Callable[[Params], Tensor], theta: Params) -> Callable[[Params], Tensor]:
        """``phi -> loss(phi) + lam/2 ||phi - theta||^2`` with theta held constant."""
        anchor = {k: v.detach() for k, v in theta.items()}

        def objective(phi: Params) -> Tensor:
            reg = sum(((phi[k] - anchor[k]) ** 2).sum() for k in phi)
            return loss(phi) + 0.5 * self.lam * reg

        return objective

    def solve_inner(
        self, loss: Callable[[Params], Tensor], theta: Params, optimizer: InnerOptimizer, record: Sequence[int]
    ) -> list[Params]:
        """The inner solves ``argmin_phi loss(phi) + lam/2 ||phi - theta||^2`` after each step count in ``record``."""
        descend = monotone_descent if self.safeguard else gradient_descent
        return descend(self.regularised(loss, theta), theta, optimizer, max(record), record=record)

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
        names = list(params)
        theta = [params[k] for k in names]
        if not torch.is_grad_enabled():  # evaluation: no meta-gradient wanted, so plain (and vmappable)
            return self.solve_inner(loss, params, optimizer, record)
        if _in_transform(theta):
            raise ValueError(
                "implicit: cannot run inside torch.func transforms (vmap/grad/jvp), because its backward "
                "solves a linear system with torch.autograd per task; run the tasks one at a time."
            )
        closure = [t for t in closure if isinstance(t, Tensor)]
        with torch.no_grad():
            start = {k: v.detach() for k, v in params.items()}
            path = self.solve_inner(loss, start, optimizer, record)
        out = []
        for r, phi in zip(record, path):
            if r == 0:
                out.append(params)
                continue
            values = _ImplicitSolution.apply(self, loss, names, len(names), *[phi[k] for k in names], *theta, *closure)
            out.append(dict(zip(names, values)))
        return out

    def check(self, learner: nn.Module) -> None:
        optimizer = getattr(type(learner), "optimizer", None)
        if getattr(optimizer, "__qualname__", "MAML.optimizer") != "MAML.optimizer":
            raise ValueError(
                f"{type(learner).__name__}: the 'implicit' strategy differentiates the solution of the inner "
                "problem, which does not depend on the inner optimizer, so learned inner rates (as in Meta-SGD) "
                "would get no gradient; use 'unrolled', 'checkpointed' or 'truncated(k)' for this learner."
            )
