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

from allmap.checks import check_int
from allmap.compat import in_transform
from allmap.hypergrad.base import InnerStrategy, register
from allmap.inner.loop import gradient_descent, inner_step, monotone_descent
from allmap.inner.optim import InnerOptimizer, Params

__all__ = ["Implicit", "ImplicitSolveWarning", "ImplicitSolveError", "conjugate_gradient", "neumann"]

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


def conjugate_gradient(matvec: MatVec, b: Vec, iterations: int, tol: float = 0.0) -> tuple[Vec, Tensor]:
    """Solve ``A x = b`` for symmetric positive definite ``A`` (given as ``matvec``) from ``x = 0``.

    At most ``iterations`` steps; converged once ``||b - A x|| <= tol ||b||``. If ``A`` is not positive
    definite along a search direction (a non-convex support loss with small ``lam``), the iteration stops
    there, returning ``b`` itself (the first-order answer, ``A ~ I``) if that happens at once (Steihaug
    1983); the residual says so (raise ``damping`` or ``lam``). Written without data-dependent control
    flow: a finished solve's updates are masked to zero, so it runs inside ``vmap`` (one solve per task);
    outside ``torch.func`` transforms it stops early once every solve is finished. Returns
    ``(x, relative residual ||b - A x|| / ||b||)``, the residual as a tensor.
    """
    x = [torch.zeros_like(t) for t in b]
    r, p = list(b), list(b)
    bb = _dot(b, b)
    rr = bb
    done = bb <= tol**2 * bb  # b = 0, or tol = 1
    traced = in_transform([bb])
    for it in range(iterations):
        if not traced and bool(done.all()):
            break
        ap = matvec(p)
        pap = _dot(p, ap)
        bad = (pap <= 0) & ~done
        if it == 0:  # negative curvature at once: x = b, residual b - A b
            x = [torch.where(bad, bi, xi) for bi, xi in zip(b, x)]
            r = [torch.where(bad, bi - ai, ri) for bi, ai, ri in zip(b, ap, r)]
            rr = torch.where(bad, _dot(r, r), rr)
        done = done | bad
        alpha = torch.where(done, torch.zeros_like(rr), rr / torch.where(done, torch.ones_like(pap), pap))
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rr_new = _dot(r, r)
        beta = torch.where(done, torch.zeros_like(rr), rr_new / torch.where(rr == 0, torch.ones_like(rr), rr))
        p = _axpy(beta, p, r)
        rr = torch.where(done, rr, rr_new)
        done = done | (rr <= tol**2 * bb)
    return x, torch.sqrt(rr / torch.where(bb == 0, torch.ones_like(bb), bb))


def neumann(matvec: MatVec, b: Vec, iterations: int, alpha: float = 1.0) -> tuple[Vec, Tensor]:
    """``A^-1 b ~ alpha sum_{j=0}^{J} (I - alpha A)^j b`` (converges when ``||I - alpha A|| < 1``).

    Branch-free (runs inside ``vmap``). Returns ``(x, relative residual ||b - A x|| / ||b||)`` as a tensor.
    """
    term = [alpha * t for t in b]
    x = list(term)
    for _ in range(iterations):
        term = _axpy(-alpha, matvec(term), term)
        x = [xi + ti for xi, ti in zip(x, term)]
    res = _axpy(-1.0, matvec(x), b)
    bb = _dot(b, b)
    return x, torch.sqrt(_dot(res, res) / torch.where(bb == 0, torch.ones_like(bb), bb))


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
        phi = {k: p.detach() for k, p in zip(ctx.names, phi_values)}
        v = {k: g if g is not None else torch.zeros_like(p) for (k, p), g in zip(phi.items(), grad_phi)}
        x, residual = strategy.implicit_solve(ctx.loss, phi, v)
        strategy.check_residual(float(residual))
        need = [t for t in closure if t.requires_grad]
        from_closure: Sequence[Tensor | None] = [None] * len(need)
        if need:
            with torch.enable_grad():
                coupling = strategy.coupling(ctx.loss, phi, x)
                if coupling.requires_grad:
                    from_closure = torch.autograd.grad(coupling, need, allow_unused=True)
        it = iter(from_closure)
        closure_grads = [
            (None if (c := next(it)) is None else -c / strategy.lam) if t.requires_grad else None for t in closure
        ]
        theta_grads = [x[k] if t.requires_grad else None for k, t in zip(ctx.names, theta)]
        return (None, None, None, None, *([None] * ctx.n), *theta_grads, *closure_grads)


@register
class Implicit(InnerStrategy):
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
        inner_lam: the proximal weight of the inner objective, ``L_support(phi) + inner_lam/2 ||phi - theta||^2``
            (``None``: ``lam``, the problem the implicit gradient assumes). ``0``: the inner steps descend the
            support loss alone, as iMAML's released Omniglot code does.
        pull_back: after the inner steps of meta-training, one more step of the inner optimizer on
            ``pull_back/2 ||phi - theta||^2`` (the released code's "pull back for regularization", with
            its lam 2); ``0``: none. Adaptation at evaluation never takes it (the code tests with lam 0).
            The code's linear system ``(1 + regu_coef) v + H v / (lam + lam_damping)`` is this class's with
            ``damping = regu_coef`` and ``lam = lam + lam_damping`` (1 and 2 + 10 on Omniglot).

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
        inner_lam: float | None = None,
        pull_back: float = 0.0,
    ) -> None:
        if not lam > 0:
            raise ValueError(f"implicit: expected the regularisation lam > 0, got {lam!r}.")
        check_int("implicit", "iterations", iterations)
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
        for name, value in (("inner_lam", inner_lam), ("pull_back", pull_back)):
            if value is not None and not value >= 0:
                raise ValueError(f"implicit: expected {name} >= 0 (a proximal weight), got {value!r}.")
        self.inner_lam = self.lam if inner_lam is None else float(inner_lam)
        self.pull_back = float(pull_back)
        self._last_residual: float | None = None

    @property
    def last_residual(self) -> float | None:
        return self._last_residual

    @last_residual.setter
    def last_residual(self, value: float) -> None:
        self._last_residual = value

    def solve(self, matvec: MatVec, v: Vec, tol: float | None = None) -> tuple[Vec, Tensor]:
        """Solve ``A x = v`` with this strategy's solver, CG stopping at relative residual ``tol`` (default:
        the strategy's); the residual is returned as a tensor (check it with :meth:`check_residual` where it
        can be read, outside ``vmap``)."""
        if self.solver == "cg":
            return conjugate_gradient(matvec, v, self.iterations, self.tol if tol is None else tol)
        return neumann(matvec, v, self.iterations, self.alpha)

    def implicit_solve(
        self, loss: Callable[[Params], Tensor], phi: Params, v: Params, tol: float | None = None
    ) -> tuple[Params, Tensor]:
        """``x = ((1 + damping) I + H / lam)^-1 v`` with ``H`` the Hessian of ``loss`` at ``phi``: the implicit
        meta-gradient for theta of a loss whose gradient at ``phi`` is ``v``. Hessian-vector products by
        reverse over reverse (``H`` is symmetric, so a vjp of the gradient is ``H x``), the linearisation
        built once and reused by every solver iteration; no graph is recorded. Runs inside ``vmap``."""
        names = list(phi)
        with torch.no_grad():
            _, hvp = torch.func.vjp(torch.func.grad(loss), phi)

            def matvec(x: Vec) -> Vec:
                (hx,) = hvp(dict(zip(names, x)))
                return [(1.0 + self.damping) * xi + hx[k] / self.lam for k, xi in zip(names, x)]

            x, residual = self.solve(matvec, [v[k] for k in names], tol)
        return dict(zip(names, x)), residual

    @staticmethod
    def coupling(loss: Callable[[Params], Tensor], phi: Params, x: Params) -> Tensor:
        """``<grad_phi loss(phi), x>``, differentiable w.r.t. the tensors ``loss`` closes over: its gradient
        times ``-1/lam`` is their implicit meta-gradient (for example a shared body that does not adapt)."""
        g = torch.func.grad(loss)(phi)
        return sum((g[k] * x[k]).sum() for k in phi)

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

    @staticmethod
    def proximal(theta: Params, weight: float) -> Callable[[Params], Tensor]:
        """``phi -> weight/2 ||phi - theta||^2`` with theta held constant."""
        anchor = {k: v.detach() for k, v in theta.items()}
        return lambda phi: 0.5 * weight * sum(((phi[k] - anchor[k]) ** 2).sum() for k in phi)

    def regularised(self, loss: Callable[[Params], Tensor], theta: Params) -> Callable[[Params], Tensor]:
        """``phi -> loss(phi) + inner_lam/2 ||phi - theta||^2`` with theta held constant."""
        if self.inner_lam == 0:
            return loss
        prox = self.proximal(theta, self.inner_lam)
        return lambda phi: loss(phi) + prox(phi)

    def solve_inner(
        self, loss: Callable[[Params], Tensor], theta: Params, optimizer: InnerOptimizer, record: Sequence[int]
    ) -> list[Params]:
        """The inner solves ``argmin_phi loss(phi) + inner_lam/2 ||phi - theta||^2`` after each step count in
        ``record`` (adaptation at evaluation)."""
        descend = monotone_descent if self.safeguard else gradient_descent
        return descend(self.regularised(loss, theta), theta, optimizer, max(record), record=record)

    def solve_training(
        self, loss: Callable[[Params], Tensor], theta: Params, optimizer: InnerOptimizer, record: Sequence[int]
    ) -> list[Params]:
        """:meth:`solve_inner`, then the ``pull_back`` step toward theta: the points whose implicit
        meta-gradient meta-training takes."""
        path = self.solve_inner(loss, theta, optimizer, record)
        if not self.pull_back:
            return path
        prox = self.proximal(theta, self.pull_back)
        return [
            phi if r == 0 else inner_step(prox, phi, optimizer.init(phi), optimizer)[0] for r, phi in zip(record, path)
        ]

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
        if in_transform(theta):
            raise ValueError(
                "implicit: cannot run inside torch.func transforms (vmap/grad/jvp), because its backward "
                "solves a linear system with torch.autograd per task; run the tasks one at a time."
            )
        closure = [t for t in closure if isinstance(t, Tensor)]
        with torch.no_grad():
            start = {k: v.detach() for k, v in params.items()}
            path = self.solve_training(loss, start, optimizer, record)
        out = []
        for r, phi in zip(record, path):
            if r == 0:
                out.append(params)
                continue
            values = _ImplicitSolution.apply(self, loss, names, len(names), *[phi[k] for k in names], *theta, *closure)
            out.append(dict(zip(names, values)))
        return out

    def check(self, learner: nn.Module) -> None:
        accepted = learner.spec.strategies
        if accepted and self.name not in accepted:
            raise ValueError(
                f"{type(learner).__name__}: the 'implicit' strategy differentiates the solution of the inner "
                "problem, which does not depend on the inner update, so an update with meta-parameters of its own "
                "(learned inner rates as in Meta-SGD, the LSTM) would get no gradient; use one of "
                f"{', '.join(accepted)} for this learner."
            )
