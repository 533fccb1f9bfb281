"""MAML for reinforcement learning (Finn, Abbeel & Levine, ICML 2017, section 5.3).

The task's data are trajectories the policy collects in the task; the task model is the policy after a few
policy-gradient steps on them, and the meta-gradient flows back through those steps:

    theta'_i = theta - inner_lr * grad L_inner(theta; D_i),   D_i ~ pi_theta in task i
    outer objective: L_outer(theta'_i; D'_i),                 D'_i ~ pi_theta'_i in task i

``L_inner`` is REINFORCE with the linear feature baseline and GAE (:mod:`allmap.rl.estimators`), or Loaded DiCE
so that the second derivative counts how ``D_i`` depends on theta. The inner step is the gradient learners'
own: an :class:`~allmap.learners.updates.InnerUpdate` and a meta-gradient strategy of :mod:`allmap.hypergrad`
(``unrolled``: second order; ``first_order``), run on task-stacked parameters so that one call adapts every
task of the meta-batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from allmap.hypergrad import Strategy
from allmap.inner.optim import Params, sgd
from allmap.learners.gradient import adapted_names, check_steps, first_order_strategy
from allmap.learners.updates import descent, step_size
from allmap.rl.envs import BatchedEnv
from allmap.rl.estimators import AVERAGES, advantages, dice_loss, reinforce_loss
from allmap.rl.policy import Policy, stack
from allmap.rl.sampler import Trajectories, sample, sample_steps

__all__ = ["MAMLRL", "ESTIMATORS", "STRATEGIES"]

ESTIMATORS = {"reinforce": reinforce_loss, "dice": dice_loss}
# strategies that apply: each inner step needs trajectories of the current policy, so the inner loop is one
# strategy call per step, with sampling in between
STRATEGIES = ("unrolled", "first_order")


class MAMLRL(nn.Module):
    """MAML-RL: a few policy-gradient steps from the meta-learned policy initialisation theta.

    Args:
        policy: a :class:`~allmap.rl.policy.Policy`; its parameters are theta.
        inner_lr: step size of the inner policy-gradient step (0.1 for 2-D navigation with actions in
            [-0.1, 0.1], as pytorch-maml-rl).
        inner_steps: inner steps during meta-training (0: no adaptation, the multi-task pretrained baseline).
        first_order: treat the inner gradient as a constant.
        hypergrad: the meta-gradient strategy (``"unrolled"`` or ``"first_order"``).
        estimator: ``"reinforce"`` or ``"dice"`` (Loaded DiCE) for the inner loss.
        gamma, gae_lambda: discount and GAE parameter of the advantages.
        normalize: normalise the advantages per task.
        average: how a task's losses average its steps: ``"trajectory"`` (each trajectory's steps, then the
            trajectories: pytorch-maml-rl) or ``"step"`` (every step alike: cbfinn/maml_rl's rllab); see
            :func:`allmap.rl.estimators.task_mean`. The outer surrogate and its KL average the same way.
        adapt_only: parameter-name prefixes to adapt (``None``: all).

    Example:
        >>> env = allmap.rl.Navigation2D()
        >>> learner = MAMLRL(allmap.rl.make_policy(env), inner_lr=0.1)
        >>> tasks = env.sample_tasks(4, torch.Generator().manual_seed(0))
        >>> path, trajs = learner.adapt_and_sample(env, tasks, batch=10, steps=1)
    """

    def __init__(
        self,
        policy: Policy,
        inner_lr: float = 0.1,
        inner_steps: int = 1,
        first_order: bool = False,
        hypergrad: str | Mapping[str, Any] | Strategy | None = None,
        estimator: str = "reinforce",
        gamma: float = 0.99,
        gae_lambda: float = 1.0,
        normalize: bool = True,
        adapt_only: str | Sequence[str] | None = None,
        average: str = "trajectory",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if not isinstance(policy, Policy):
            raise TypeError(f"{owner}: expected policy to be an allmap.rl.Policy, got {type(policy).__name__}.")
        if estimator not in ESTIMATORS:
            raise ValueError(f"{owner}: unknown estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}.")
        if not (0 < gamma <= 1 and 0 <= gae_lambda <= 1):
            raise ValueError(f"{owner}: expected 0 < gamma <= 1 and 0 <= gae_lambda <= 1, got {gamma}, {gae_lambda}.")
        if average not in AVERAGES:
            raise ValueError(f"{owner}: unknown average {average!r}; expected one of {', '.join(AVERAGES)}.")
        self.policy = policy
        self.inner_steps = check_steps(owner, inner_steps)
        self.adapted_names = adapted_names(owner, policy, adapt_only)
        params = dict(policy.named_parameters())
        self.update = descent(owner, "sgd", inner_lr)
        self.update.setup({n: params[n] for n in self.adapted_names})
        strategy = first_order_strategy(owner, first_order, hypergrad)
        if strategy.name not in STRATEGIES:
            raise ValueError(
                f"{owner}: the {strategy.name!r} meta-gradient strategy does not apply: each inner step "
                f"samples new trajectories, so the inner loop is one step at a time; expected one of "
                f"{', '.join(STRATEGIES)}."
            )
        self.hypergrad = strategy
        self.estimator, self.gamma, self.gae_lambda, self.normalize = estimator, gamma, gae_lambda, normalize
        self.average = average

    @property
    def inner_lr(self) -> float:
        return self.update.lr

    def theta(self, n: int, params: Params | None = None) -> Params:
        """The meta-parameters (or ``params`` standing in for them), stacked for ``n`` tasks."""
        return stack(dict(self.policy.named_parameters()) if params is None else params, n)

    def log_prob(self, params: Params, traj: Trajectories) -> Tensor:
        return self.policy.log_prob(self.policy.dist(params, traj.obs), traj.actions)

    def inner_loss(self, params: Params, traj: Trajectories) -> Tensor:
        """Per-task inner loss ``[tasks]`` of the chosen estimator on ``traj`` (which carries advantages)."""
        return ESTIMATORS[self.estimator](self.log_prob(params, traj), traj, self.average)

    def process(self, traj: Trajectories) -> Trajectories:
        """``traj`` with advantages (linear baseline, GAE, normalised as configured)."""
        return advantages(traj, self.gamma, self.gae_lambda, self.normalize)

    def inner_step(self, params: Params, traj: Trajectories, lr: float | None = None) -> Params:
        """One policy-gradient step of every task on its trajectories, through the meta-gradient strategy.

        The loss is the sum of the per-task losses, so its gradient w.r.t. the stacked parameters is each
        task's own gradient; ``theta'_i = theta_i - inner_lr * grad L_i(theta_i)`` (``lr`` in place of
        ``inner_lr`` when given)."""
        adapted = {k: v for k, v in params.items() if k in self.adapted_names}
        frozen = {k: v for k, v in params.items() if k not in self.adapted_names}
        loss = lambda p: self.inner_loss({**frozen, **p}, traj).sum()  # noqa: E731
        optimizer = self.update.optimizer() if lr is None else sgd(lr)
        new = self.hypergrad.run(loss, adapted, optimizer, 1, closure=list(self.parameters()))[-1]
        return {**frozen, **new}

    def adapt_and_sample(
        self,
        env: BatchedEnv,
        tasks: Tensor,
        batch: int,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        rows: slice | None = None,
        total: int | None = None,
        lrs: Sequence[float] | None = None,
        budget: int | None = None,
    ) -> tuple[list[Params], list[Trajectories]]:
        """Sample, adapt, sample again, ``steps`` times (default ``inner_steps``): the parameters after 0..steps
        steps (the adapted ones detached, so no graph is kept across steps; :meth:`adapt` recomputes them
        differentiably) and the processed trajectories each of them collected (``steps + 1`` of each). ``rows`` and
        ``total`` select this process's share of a meta-batch (see :func:`allmap.rl.sampler.sample`).
        ``lrs`` are step sizes in place of ``inner_lr``: step ``k`` (from 0) takes ``lrs[min(k, len(lrs) - 1)]``.
        ``budget``: each sampling collects whole trajectories, ``batch`` at a time, until ``budget`` steps per
        task (:func:`allmap.rl.sampler.sample_steps`) instead of ``batch`` trajectories."""
        owner = f"{type(self).__name__}.adapt_and_sample"
        steps = self.inner_steps if steps is None else check_steps(owner, steps)
        rates = [step_size(owner, lr) for lr in lrs] if lrs else []
        params = self.theta(len(tasks))
        path, trajs = [params], []
        for k in range(steps + 1):
            if budget is None:
                traj = sample(env, self.policy, params, tasks, batch, generator, rows, total)
            else:
                traj = sample_steps(env, self.policy, params, tasks, batch, budget, generator, rows, total)
            trajs.append(self.process(traj))
            if k < steps:
                lr = rates[min(k, len(rates) - 1)] if rates else None
                params = self.inner_step(params, trajs[-1], lr)
                params = {name: p.detach() for name, p in params.items()}  # values only: adapt() differentiates
                path.append(params)
        return path, trajs

    def adapt(self, pre: Sequence[Trajectories], n: int, theta: Params | None = None) -> Params:
        """The adapted parameters from given pre-update trajectories (one set per inner step), recomputed from
        the current theta (or ``theta`` standing in for it; differentiable w.r.t. it): what the outer loop
        differentiates."""
        params = self.theta(n, theta)
        for traj in pre:
            params = self.inner_step(params, traj)
        return params

    def extra_repr(self) -> str:
        return (
            f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, hypergrad={self.hypergrad!r}, "
            f"estimator={self.estimator!r}, gamma={self.gamma}, gae_lambda={self.gae_lambda}, "
            f"average={self.average!r}"
        )
