"""Reptile: move the initialisation toward the parameters adapted on each task.

Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018. After ``k`` inner steps on a
task's support set, ``theta' = U^k(theta)``, the meta-update is ``theta <- theta + eps (mean_i theta'_i - theta)``.

Here that direction is the gradient of a surrogate, so any torch optimizer applies it: each task contributes

    meta_loss_i = L_query(theta'_i) + 1/2 ||theta - stop_gradient(theta'_i)||^2 - (the same, detached)

whose value is the query loss after adaptation (for logging and evaluation) and whose gradient w.r.t. theta
is ``theta - theta'_i``. With ``torch.optim.SGD(lr=eps)`` on the mean over tasks this is exactly the batched
Reptile update; ``Adam`` on it is the variant the paper also reports. The inner steps never build a graph.
With ``inner_batch`` each training step sees the next ``inner_batch`` examples of the support set, as the
paper's code steps on mini-batches of the task's examples; with ``inner_state="carried"`` its inner Adam
keeps its moments from one task to the next, as that code's optimizer does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from allmap.checks import check_int
from allmap.inner.loop import inner_step, stop_gradient, unroll
from allmap.inner.optim import InnerOptimizer, Params
from allmap.learners.base import LossFn, functional_forward
from allmap.learners.gradient import GradientLearner
from allmap.learners.updates import descent, param_key
from allmap.nets.norm import first_order_only

__all__ = ["Reptile", "CarriedMoments"]


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

    ``inner_state``: ``"fresh"`` starts every task's inner optimizer from zero moments; ``"carried"`` (Adam
    only) starts each task from the moments and step count the previous meta-training task ended with, as
    the paper's code, whose one TensorFlow Adam optimizer runs every inner loop: steps are then scaled by a
    long-run average of squared gradients rather than by the task's first few. The moments are buffers of the
    learner (saved in checkpoints, so a resumed run continues exactly); adaptation at evaluation starts from
    them and leaves them unchanged (the code restores them after each test task). The tasks of a meta-batch
    then run one after another, in one process.

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
        inner_state: str = "fresh",
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
        self.inner_state = inner_state
        if inner_state not in ("fresh", "carried"):
            raise ValueError(f"Reptile: unknown inner_state {inner_state!r}; expected fresh or carried.")
        if inner_state == "carried":
            if inner_optimizer != "adam":
                raise ValueError(
                    f"Reptile: inner_state='carried' carries the inner Adam's moments from task to task, but "
                    f"inner_optimizer={inner_optimizer!r} has none; use inner_optimizer='adam' or inner_state='fresh'."
                )
            self.moments = CarriedMoments(self.initial_params(None, None))
            self.sequential = True

    def optimizer(self) -> InnerOptimizer:
        """The inner optimizer; with carried moments it starts from them instead of zeros."""
        opt = super().optimizer()
        if self.inner_state == "fresh":
            return opt
        return opt._replace(init=lambda params: self.moments.state())

    def train_descent(self, support_x: Tensor, support_y: Tensor, frozen: Params, theta: Params) -> Params:
        """``inner_steps`` steps from ``theta`` on the support set, or on its consecutive ``inner_batch``-sized
        mini-batches."""
        n, b = support_y.shape[0], self.inner_batch or support_y.shape[0]
        if b > n:
            raise ValueError(
                f"{type(self).__name__}: inner_batch = {b} is larger than the support set ({n} examples); "
                f"lower inner_batch or raise the training shots."
            )
        opt = self.optimizer()

        def step(carry: tuple, t: int) -> tuple:
            if b == n:
                return inner_step(self.support_loss(support_x, support_y, frozen), *carry, opt)
            rows = torch.arange((t - 1) * b, t * b, device=support_y.device) % n
            return inner_step(self.support_loss(support_x[rows], support_y[rows], frozen), *carry, opt)

        adapted, state = unroll(step, (theta, opt.init(theta)), self.inner_steps)[0]
        if self.inner_state == "carried":
            self.moments.store(state)
        return adapted

    def task_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        theta = self.initial_params(support_x, support_y)
        frozen = self.frozen_params()
        with torch.no_grad(), first_order_only():  # no second derivative: torch's fused batch_norm may run
            adapted = self.train_descent(support_x, support_y, frozen, stop_gradient(theta))
            value = self.loss_fn(functional_forward(self.model, {**frozen, **adapted}, query_x), query_y)
        distance = 0.5 * sum(((theta[k] - adapted[k]) ** 2).sum() for k in theta)
        return value + distance - distance.detach()


class CarriedMoments(nn.Module):
    """An Adam state (step count, first and second moments of each adapted parameter) kept as buffers, so that
    it is carried from task to task, saved in checkpoints and moved with the learner."""

    def __init__(self, params: Params) -> None:
        super().__init__()
        self.names = list(params)
        for n, p in params.items():
            self.register_buffer("m_" + param_key(n), torch.zeros_like(p.detach()))
            self.register_buffer("v_" + param_key(n), torch.zeros_like(p.detach()))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def state(self) -> dict:
        """The state in the form :func:`allmap.inner.optim.adam` keeps it."""
        return {
            "count": int(self.count),
            "m": {n: getattr(self, "m_" + param_key(n)) for n in self.names},
            "v": {n: getattr(self, "v_" + param_key(n)) for n in self.names},
        }

    @torch.no_grad()
    def store(self, state: dict) -> None:
        """Keep ``state`` (an Adam state as :meth:`state` returns) for the next task."""
        self.count.fill_(int(state["count"]))
        for n in self.names:
            getattr(self, "m_" + param_key(n)).copy_(state["m"][n])
            getattr(self, "v_" + param_key(n)).copy_(state["v"][n])
