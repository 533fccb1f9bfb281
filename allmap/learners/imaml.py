"""iMAML: implicit model-agnostic meta-learning.

Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019. The task model is
``phi* = argmin_phi L_support(phi) + lam/2 ||phi - theta||^2`` (approximated by ``inner_steps`` optimizer
steps from theta), and the meta-gradient is ``(I + H/lam)^-1 grad L_query(phi*)`` by the implicit function
theorem, solved with conjugate gradient (see :class:`allmap.hypergrad.Implicit`). Memory does not depend on
the number of inner steps.
"""

from __future__ import annotations

from torch import nn

from allmap.hypergrad import Implicit
from allmap.learners.maml import MAML

__all__ = ["IMAML"]


class IMAML(MAML):
    """MAML with a proximal inner problem and the implicit meta-gradient.

    Args:
        model, inner_lr, inner_steps, loss, inner_optimizer, adapt_only: as in :class:`MAML`.
        lam: proximal regularisation strength (the paper uses 0.5 to 2 on Omniglot).
        cg_iterations: conjugate-gradient iterations of the implicit solve (the paper uses 5).
        solver, damping, tol, on_fail: see :class:`allmap.hypergrad.Implicit`.
        vectorize: ignored in effect: the implicit backward solves a linear system per task, so tasks run one
            at a time (see :class:`allmap.hypergrad.Implicit`).

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
        vectorize: bool = True,
        **kwargs,
    ) -> None:
        for arg in ("first_order", "hypergrad"):
            if kwargs.get(arg) not in (None, False):
                raise ValueError(
                    f"IMAML: the meta-gradient is the implicit one; {arg}={kwargs[arg]!r} cannot apply. Set the "
                    "solve with lam, cg_iterations, solver, damping, tol, on_fail; or use MAML(hypergrad=...)."
                )
            kwargs.pop(arg, None)
        strategy = Implicit(
            lam=lam, iterations=cg_iterations, solver=solver, damping=damping, tol=tol, on_fail=on_fail
        )
        super().__init__(
            model, inner_lr=inner_lr, inner_steps=inner_steps, vectorize=vectorize, hypergrad=strategy, **kwargs
        )
        self.lam = float(lam)
