"""The batched sampler: every task of a meta-batch and every trajectory of each task, stepped together.

One policy evaluation and one environment step per time step for the whole meta-batch: observations
``[tasks, trajectories, obs_dim]`` go through the task-stacked policy (:mod:`allmap.rl.policy`) and the batched
environment (:mod:`allmap.rl.envs`). Trajectories that end early are masked from then on.

:func:`sample_steps` samples by a budget of environment steps instead of a number of trajectories (rllab's
``batch_size``, which cbfinn/maml_rl's test uses): a policy that reaches its goals sooner then collects
more, shorter trajectories.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from allmap.inner.optim import Params
from allmap.rl.envs import BatchedEnv
from allmap.rl.policy import Policy

__all__ = ["Trajectories", "sample", "sample_steps", "within_budget"]


@dataclass(frozen=True)
class Trajectories:
    """A meta-batch of trajectories, time-major per task: ``obs [tasks, horizon, batch, obs_dim]``,
    ``actions [tasks, horizon, batch, ...]``, ``rewards`` and ``mask [tasks, horizon, batch]`` (1 where the
    step happened). ``advantages`` are filled by :func:`allmap.rl.estimators.advantages`."""

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor
    advantages: Tensor | None = None

    def returns(self) -> Tensor:
        """Undiscounted return of each trajectory ``[tasks, batch]``."""
        return (self.rewards * self.mask).sum(1)

    def mean_return(self) -> Tensor:
        """Mean undiscounted return ``[tasks]`` over each task's trajectories (those with at least one step:
        :func:`within_budget` masks out whole trajectories)."""
        kept = (self.mask.sum(1) > 0).sum(-1).clamp(min=1)
        return self.returns().sum(-1) / kept

    def with_advantages(self, advantages: Tensor) -> Trajectories:
        return replace(self, advantages=advantages)

    def rows(self, index: slice) -> Trajectories:
        """The trajectories of the tasks in ``index``."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Trajectories(*(pick(getattr(self, k)) for k in ("obs", "actions", "rewards", "mask", "advantages")))


@torch.no_grad()
def sample(
    env: BatchedEnv,
    policy: Policy,
    params: Params,
    tasks: Tensor,
    batch: int,
    generator: torch.Generator | None = None,
    rows: slice | None = None,
    total: int | None = None,
) -> Trajectories:
    """``batch`` trajectories in each task of ``tasks`` with the task-stacked ``params``.

    The random numbers are drawn for ``total`` tasks (default ``len(tasks)``) and those of ``rows`` used, so a
    process that samples only its share of a meta-batch (under torchrun) draws the same trajectories for it
    as one process sampling the whole meta-batch.
    """
    n = len(tasks)
    total = n if total is None else total
    rows = slice(0, n) if rows is None else rows
    dtype = next(iter(params.values())).dtype
    state, obs = env.reset(tasks, batch, generator)
    obs = obs.to(dtype)
    alive = torch.ones(n, batch, dtype=torch.bool, device=obs.device)
    all_obs, all_actions, all_rewards, all_mask = [], [], [], []
    for _ in range(env.horizon):
        action = policy.act(policy.dist(params, obs), policy.noise((total, batch), generator, dtype)[rows])
        state, next_obs, reward, done = env.step(tasks, state, action)
        all_obs.append(obs)
        all_actions.append(action)
        all_mask.append(alive.to(dtype))
        all_rewards.append(reward.to(dtype) * alive)
        alive = alive & ~done
        obs = next_obs.to(dtype)
    return Trajectories(
        torch.stack(all_obs, 1), torch.stack(all_actions, 1), torch.stack(all_rewards, 1), torch.stack(all_mask, 1)
    )


def within_budget(traj: Trajectories, budget: int) -> Trajectories:
    """``traj`` with each task's trajectories after the one that brings its step count to ``budget`` masked
    out: trajectory ``j`` is kept while the steps of trajectories ``0..j-1`` are fewer than ``budget``, as
    rllab's sampler collects whole paths until ``batch_size`` steps."""
    lengths = traj.mask.sum(1)  # [tasks, batch]
    keep = ((lengths.cumsum(-1) - lengths) < budget).to(traj.mask.dtype)[:, None]
    return replace(traj, rewards=traj.rewards * keep, mask=traj.mask * keep)


def sample_steps(
    env: BatchedEnv,
    policy: Policy,
    params: Params,
    tasks: Tensor,
    batch: int,
    budget: int,
    generator: torch.Generator | None = None,
    rows: slice | None = None,
    total: int | None = None,
    most: int | None = None,
) -> Trajectories:
    """Whole trajectories, ``batch`` more per task at a time, until every task has at least ``budget``
    environment steps; each task keeps its first trajectories up to the one that reaches ``budget``
    (:func:`within_budget`), the rest are masked out.

    At most ``most`` trajectories per task are sampled (rounded up to whole rounds; default ten times
    ``budget / env.horizon``), which rllab does not bound: it binds only where trajectories average under a
    tenth of the horizon (an oracle that reaches its goal in a few steps would otherwise need thousands of
    trajectories per task), and a mean return over that many trajectories is already precise.

    ``generator`` gives one seed per call, and the rounds draw from a generator of their own seeded with it:
    ``generator`` then advances alike whatever the number of rounds, so a process that samples only its
    ``rows`` (under torchrun) gets the trajectories one process would get for them, as with :func:`sample`.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"sample_steps: expected budget to be a positive number of steps, got {budget!r}.")
    local = None
    if generator is not None:
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        local = torch.Generator(generator.device).manual_seed(seed)
    most = max(batch, 10 * -(-budget // env.horizon)) if most is None else most
    rounds = [sample(env, policy, params, tasks, batch, local, rows, total)]
    steps = rounds[0].mask.sum(dim=(1, 2))
    while len(rounds) * batch < most and bool((steps < budget).any()):
        rounds.append(sample(env, policy, params, tasks, batch, local, rows, total))
        steps = steps + rounds[-1].mask.sum(dim=(1, 2))
    keys = ("obs", "actions", "rewards", "mask")
    joined = Trajectories(*(torch.cat([getattr(r, k) for r in rounds], 2) for k in keys))
    return within_budget(joined, budget)
