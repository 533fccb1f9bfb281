"""iMAML: implicit model-agnostic meta-learning.

Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019. The task model is
``phi* = argmin_phi L_support(phi) + lam/2 ||phi - theta||^2`` (approximated by ``inner_steps`` optimizer
steps from theta), and the meta-gradient is ``(I + H/lam)^-1 grad L_query(phi*)`` by the implicit function
theorem, solved with conjugate gradient (see :class:`allmap.hypergrad.Implicit`). Memory does not depend on
the number of inner steps.

Meta-training computes the implicit meta-gradient inside :meth:`IMAML.task_loss` as a surrogate (value: the
query loss at phi*; gradient: the implicit one), so the tasks of a meta-batch run under ``vmap`` like
MAML's; ``adapt`` under autograd (and ``MAML(hypergrad="implicit")``) uses the custom backward of
:class:`~allmap.hypergrad.Implicit`. Both call the same solve, :meth:`Implicit.implicit_solve`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from allmap.compat import in_transform
from allmap.hypergrad import Implicit
from allmap.inner.optim import Params
from allmap.learners.base import LossFn, functional_forward
from allmap.learners.gradient import GradientLearner
from allmap.learners.updates import descent

__all__ = ["IMAML"]


class _TrainingSurrogateImplicit(Implicit):
    """The implicit strategy of :class:`IMAML`: meta-training goes through ``IMAML.task_loss``'s vmappable
    surrogate, so the execution planner may vmap the tasks; only ``adapt`` under autograd uses the custom
    backward (and raises a clear error if asked to run it inside ``vmap``)."""

    vmappable = True


class IMAML(GradientLearner):
    """A gradient learner with a proximal inner problem and the implicit meta-gradient.

    Args:
        model, inner_lr, inner_steps, loss, inner_optimizer, adapt_only: as in :class:`MAML`.
        lam: proximal regularisation strength (the paper uses 0.5 to 2 on Omniglot).
        cg_iterations: conjugate-gradient iterations of the implicit solve (the paper uses 5).
        solver, damping, tol, on_fail, safeguard, inner_lam, pull_back: see :class:`allmap.hypergrad.Implicit`
            (``safeguard``, on by default, rejects inner steps that raise the regularised support loss and halves
            that task's step; ``inner_lam=0, pull_back=2`` with ``lam=12, damping=1`` is the released code's
            Omniglot procedure).
            Meta-training runs every solver iteration; ``tol`` is the residual that ``on_fail`` checks.
        vectorize: as in :class:`MAML` (under ``vmap`` the solve's residual is not checked per task; run with
            ``vectorize=False`` to get the ``on_fail`` warning or error).

    Example:
        >>> import torch, allmap
        >>> learner = allmap.IMAML(torch.nn.Linear(1, 1), lam=2.0, inner_lr=0.1, inner_steps=10)
        >>> tasks = allmap.tasks.LinearRegression(dim=1).sample(4, torch.Generator().manual_seed(0))
        >>> learner.meta_loss(tasks).backward()
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 10,
        lam: float = 1.0,
        cg_iterations: int = 5,
        solver: str = "cg",
        damping: float = 0.0,
        tol: float = 1e-2,
        on_fail: str = "warn",
        safeguard: bool = True,
        inner_lam: float | None = None,
        pull_back: float = 0.0,
        loss: str | LossFn = "mse",
        inner_optimizer: str = "sgd",
        adapt_only: Sequence[str] | None = None,
        vectorize: bool | None = None,
    ) -> None:
        strategy = _TrainingSurrogateImplicit(
            lam=lam,
            iterations=cg_iterations,
            solver=solver,
            damping=damping,
            tol=tol,
            on_fail=on_fail,
            safeguard=safeguard,
            inner_lam=inner_lam,
            pull_back=pull_back,
        )
        super().__init__(
            model,
            descent(type(self).__name__, inner_optimizer, inner_lr),
            inner_steps=inner_steps,
            loss=loss,
            adapt_only=adapt_only,
            hypergrad=strategy,
            vectorize=vectorize,
        )
        self.strategies = ("implicit",)
        self.inner_optimizer = inner_optimizer
        self.lam = float(lam)

    def task_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        """Query loss at phi*, with gradient ``x = (I + H/lam)^-1 grad L_query(phi*)`` for theta.

        Returns ``L_query(phi*, w) + <theta - sg(theta), sg(x)> - (1/lam) (<grad_phi L_support(phi*, w), sg(x)>
        - sg(same))``, where ``w`` are the parameters that are not adapted (``adapt_only``): their gradient is
        the direct one plus the implicit-function-theorem coupling ``-(1/lam) d<grad_phi L_support, x>/dw``.
        """
        if not torch.is_grad_enabled():
            return super().task_loss(support_x, support_y, query_x, query_y)
        strategy: Implicit = self.hypergrad
        theta = self.initial_params(support_x, support_y)
        frozen = self.frozen_params()
        constant = {k: v.detach() for k, v in frozen.items()}
        support = self.support_loss(support_x, support_y, constant)

        def query(p: Params, fr: Params = constant) -> Tensor:
            return self.loss_fn(functional_forward(self.model, {**fr, **p}, query_x), query_y)

        start = {k: v.detach() for k, v in theta.items()}
        with torch.no_grad():
            (phi,) = strategy.solve_training(support, start, self.optimizer(), [self.inner_steps])
            v = torch.func.grad(query)(phi)
        x, residual = strategy.implicit_solve(support, phi, v, tol=0.0)
        if not in_transform([residual]):
            strategy.check_residual(float(residual))
        out = query(phi, frozen)
        for k, xk in x.items():
            out = out + ((theta[k] - theta[k].detach()) * xk).sum()
        if any(w.requires_grad for w in frozen.values()):
            coupling = strategy.coupling(self.support_loss(support_x, support_y, frozen), phi, x)
            out = out - (coupling - coupling.detach()) / strategy.lam
        return out
