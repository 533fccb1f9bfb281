"""Reptile: move the initialisation toward the parameters adapted on each task.

Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018. After ``k`` inner steps on a
task's support set, ``theta' = U^k(theta)``, the meta-update is ``theta <- theta + eps (mean_i theta'_i - theta)``.

Here that direction is the gradient of a surrogate, so any torch optimizer applies it: each task contributes

    meta_loss_i = L_query(theta'_i) + 1/2 ||theta - stop_gradient(theta'_i)||^2 - (the same, detached)

whose value is the query loss after adaptation (for logging and evaluation) and whose gradient w.r.t. theta
is ``theta - theta'_i``. With ``torch.optim.SGD(lr=eps)`` on the mean over tasks this is exactly the batched
Reptile update; ``Adam`` on it is the variant the paper also reports. The inner steps never build a graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from allmap.inner.loop import gradient_descent, stop_gradient
from allmap.learners.base import LossFn, functional_forward
from allmap.learners.gradient import GradientLearner
from allmap.learners.updates import descent

__all__ = ["Reptile"]


class Reptile(GradientLearner):
    """Reptile: the meta-gradient is ``theta - theta'`` after ``inner_steps`` steps on the support set.

    Args are those of :class:`MAML` without ``first_order`` and ``hypergrad``: Reptile's meta-gradient is its
    own, first order by construction. The meta-optimizer's learning rate plays Reptile's ``epsilon``.
    With ``inner_optimizer="adam"`` the inner Adam uses ``beta1 = 0`` as in the paper.

    Example:
        >>> import torch, allmap
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
        >>> reptile = allmap.Reptile(net, inner_lr=0.02, inner_steps=5)
        >>> tasks = allmap.tasks.Sinusoid(shots=10).sample(5, torch.Generator().manual_seed(0))
        >>> reptile.meta_loss(tasks).backward()   # p.grad == p - mean adapted p
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        loss: str | LossFn = "mse",
        inner_optimizer: str = "sgd",
        adapt_only: Sequence[str] | None = None,
        vectorize: bool | None = None,
    ) -> None:
        update = descent(type(self).__name__, inner_optimizer, inner_lr, betas=(0.0, 0.999))
        super().__init__(
            model,
            update,
            inner_steps=inner_steps,
            loss=loss,
            adapt_only=adapt_only,
            hypergrad="first_order",
            vectorize=vectorize,
        )
        self.strategies = ("first_order",)  # its meta-gradient is its own direction, never another strategy's
        self.inner_optimizer = inner_optimizer

    def task_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        theta = self.initial_params(support_x, support_y)
        frozen = self.frozen_params()
        with torch.no_grad():
            adapted = gradient_descent(
                self.support_loss(support_x, support_y, frozen),
                stop_gradient(theta),
                self.optimizer(),
                self.inner_steps,
            )
            value = self.loss_fn(functional_forward(self.model, {**frozen, **adapted}, query_x), query_y)
        distance = 0.5 * sum(((theta[k] - adapted[k]) ** 2).sum() for k in theta)
        return value + distance - distance.detach()
