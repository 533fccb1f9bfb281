"""Reptile: move the initialisation toward the parameters adapted on each task.

Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018. After ``k`` inner steps on a
task's support set, ``theta' = U^k(theta)``, the meta-update is ``theta <- theta + eps (mean_i theta'_i - theta)``.

Here that direction is the gradient of a surrogate, so any torch optimizer applies it: each task contributes

    meta_loss_i = L_query(theta'_i) + 1/2 ||theta - stop_gradient(theta'_i)||^2 - (the same, detached)

whose value is the query loss after adaptation (for logging and evaluation) and whose gradient w.r.t. theta
is ``theta - theta'_i``. With ``torch.optim.SGD(lr=eps)`` on the mean over tasks this is exactly the batched
Reptile update; ``Adam`` on it is the variant the paper also reports. The inner steps never build a graph.
With ``inner_batch`` each training step sees the next ``inner_batch`` examples of the support set, as the
paper's code steps on mini-batches of the task's examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from allmap.checks import check_int
from allmap.inner.loop import gradient_descent, inner_step, stop_gradient, unroll
from allmap.inner.optim import Params
from allmap.learners.base import LossFn, functional_forward
from allmap.learners.gradient import GradientLearner
from allmap.learners.updates import descent

__all__ = ["Reptile"]


class Reptile(GradientLearner):
    """Reptile: the meta-gradient is ``theta - theta'`` after ``inner_steps`` steps on the support set.

    Args are those of :class:`MAML` without ``first_order`` and ``hypergrad``: Reptile's meta-gradient is its
    own, first order by construction. The meta-optimizer's learning rate plays Reptile's ``epsilon``.
    With ``inner_optimizer="adam"`` the inner Adam uses ``beta1 = 0`` as in the paper.

    ``inner_batch``: in meta-training, inner step ``t`` (from 1) uses the support examples at positions
    ``(t - 1) * b ... t * b - 1`` (modulo the support size), so the steps walk through the support set in its
    order; with a support set in random order (``Episodes(shuffle_support=True)``) these are the paper code's
    mini-batches without replacement (5 steps of 10 out of 50 examples: one pass). ``None``: every step on the
    whole support set. Adaptation at evaluation always steps on the whole support set.

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
        inner_batch: int | None = None,
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
        self.inner_batch = None if inner_batch is None else check_int(type(self).__name__, "inner_batch", inner_batch)

    def train_descent(self, support_x: Tensor, support_y: Tensor, frozen: Params, theta: Params) -> Params:
        """``inner_steps`` steps from ``theta`` on the support set, or on its consecutive ``inner_batch``-sized
        mini-batches."""
        if self.inner_batch is None:
            return gradient_descent(
                self.support_loss(support_x, support_y, frozen), theta, self.optimizer(), self.inner_steps
            )
        n, b = support_y.shape[0], self.inner_batch
        if b > n:
            raise ValueError(
                f"{type(self).__name__}: inner_batch = {b} is larger than the support set ({n} examples); "
                f"lower inner_batch or raise the training shots."
            )
        opt = self.optimizer()

        def step(carry: tuple, t: int) -> tuple:
            rows = torch.arange((t - 1) * b, t * b, device=support_y.device) % n
            return inner_step(self.support_loss(support_x[rows], support_y[rows], frozen), *carry, opt)

        return unroll(step, (theta, opt.init(theta)), self.inner_steps, view=lambda c: c[0])[0]

    def task_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        theta = self.initial_params(support_x, support_y)
        frozen = self.frozen_params()
        with torch.no_grad():
            adapted = self.train_descent(support_x, support_y, frozen, stop_gradient(theta))
            value = self.loss_fn(functional_forward(self.model, {**frozen, **adapted}, query_x), query_y)
        distance = 0.5 * sum(((theta[k] - adapted[k]) ** 2).sum() for k in theta)
        return value + distance - distance.detach()
