"""The batched sampler: every task of a meta-batch and every trajectory of each task, stepped together.

One policy evaluation and one environment step per time step for the whole meta-batch: observations
``[tasks, trajectories, obs_dim]`` go through the task-stacked policy (:mod:`allmap.rl.policy`) and the batched
environment (:mod:`allmap.rl.envs`). Trajectories that end early are masked from then on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from allmap.inner.optim import Params
from allmap.rl.envs import BatchedEnv
from allmap.rl.policy import Policy

__all__ = ["Trajectories", "sample"]


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
