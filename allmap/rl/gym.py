"""Your own ``gymnasium.Env`` as a meta-RL task family (gymnasium is an optional extra: ``pip install
allmap[rl]``).

:class:`GymnasiumFamily` keeps one environment per (task, trajectory) of a meta-batch and steps them in a
loop behind the batched interface of :class:`~allmap.rl.envs.BatchedEnv`; a task is a parameter vector that
``set_task(env, params)`` writes into an environment (a pole length, a gravity, a goal). The policy is still
evaluated once per time step for the whole meta-batch. :func:`cartpole_lengths` is the example family:
CartPole with the pole length drawn per task.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from allmap.rl.envs import BatchedEnv

__all__ = ["GymnasiumFamily", "cartpole_lengths", "gymnasium_family", "GYM_FAMILIES"]


def _gymnasium():
    try:
        import gymnasium
    except ImportError as err:
        raise ImportError(
            "allmap.rl.gym needs gymnasium, an optional extra: pip install 'allmap[rl]' (or gymnasium)."
        ) from err
    return gymnasium


class GymnasiumFamily(BatchedEnv):
    """A task family of gymnasium environments.

    Args:
        make: ``() -> gymnasium.Env``, one fresh environment.
        set_task: ``(env, params) -> None``, puts the task ``params`` (a 1-D float tensor) into ``env``.
        sample_tasks: ``(n, generator) -> Tensor [n, task_dim]``, draws task parameters.
        horizon: steps per trajectory (a trajectory also ends when the environment terminates or truncates).

    The state passed between :meth:`reset` and :meth:`step` is the current observation; the environments
    themselves live in this object, so one meta-batch is sampled at a time.
    """

    name = "gymnasium"

    def __init__(
        self,
        make: Callable[[], object],
        set_task: Callable[[object, Tensor], None],
        sample_tasks: Callable[[int, torch.Generator | None], Tensor],
        horizon: int,
    ) -> None:
        spaces = _gymnasium().spaces
        probe = make()
        self.make, self.set_task, self._sample = make, set_task, sample_tasks
        self.horizon = int(horizon)
        if isinstance(probe.action_space, spaces.Discrete):
            self.discrete, self.action_dim = True, int(probe.action_space.n)
        elif isinstance(probe.action_space, spaces.Box):
            self.discrete, self.action_dim = False, int(np.prod(probe.action_space.shape))
        else:
            raise ValueError(
                f"GymnasiumFamily: expected a Discrete or Box action space, got {probe.action_space}; wrap the "
                "environment so that its actions are one of them."
            )
        self.obs_dim = int(np.prod(probe.observation_space.shape))
        self.task_dim = int(sample_tasks(1, torch.Generator().manual_seed(0)).shape[-1])
        self._envs: list = []
        self._done: np.ndarray = np.zeros(0, dtype=bool)

    def sample_tasks(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self._sample(n, generator)

    def reset(self, tasks: Tensor, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        n = len(tasks) * batch
        while len(self._envs) < n:
            self._envs.append(self.make())
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=generator).tolist()
        obs = []
        for i, env in enumerate(self._envs[:n]):
            self.set_task(env, tasks[i // batch])
            obs.append(np.asarray(env.reset(seed=seeds[i])[0], dtype=np.float64).reshape(-1))
        self._done = np.zeros(n, dtype=bool)
        state = torch.as_tensor(np.stack(obs)).reshape(len(tasks), batch, self.obs_dim)
        return state, state

    def step(self, tasks: Tensor, state: Tensor, action: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n, batch = state.shape[:2]
        flat = action.reshape(n * batch, *action.shape[2:]).cpu().numpy()
        obs = state.reshape(n * batch, -1).clone().numpy()
        reward = np.zeros(n * batch)
        for i, env in enumerate(self._envs[: n * batch]):
            if self._done[i]:
                continue
            a = int(flat[i]) if self.discrete else flat[i]
            o, r, terminated, truncated, _ = env.step(a)
            obs[i], reward[i] = np.asarray(o, dtype=np.float64).reshape(-1), float(r)
            self._done[i] = terminated or truncated
        state = torch.as_tensor(obs).reshape(n, batch, -1).to(state.device)
        done = torch.as_tensor(self._done.copy()).reshape(n, batch).to(state.device)
        return state, state, torch.as_tensor(reward).reshape(n, batch).to(state.device), done

    def __repr__(self) -> str:
        return f"GymnasiumFamily(horizon={self.horizon}, obs_dim={self.obs_dim}, action_dim={self.action_dim})"


def cartpole_lengths(horizon: int = 200, low: float = 0.25, high: float = 1.0) -> GymnasiumFamily:
    """CartPole-v1 with the pole's half-length drawn per task from ``U[low, high]`` (gymnasium's default is 0.5):
    a longer pole falls more slowly, so the balancing policy differs from task to task."""
    gymnasium = _gymnasium()

    def set_task(env, params: Tensor) -> None:
        core = env.unwrapped
        core.length = float(params[0])
        core.polemass_length = core.masspole * core.length

    def sample(n: int, generator: torch.Generator | None) -> Tensor:
        return low + (high - low) * torch.rand(n, 1, generator=generator, dtype=torch.float64)

    return GymnasiumFamily(lambda: gymnasium.make("CartPole-v1").unwrapped, set_task, sample, horizon)


GYM_FAMILIES: dict[str, Callable[..., GymnasiumFamily]] = {"cartpole-lengths": cartpole_lengths}


def gymnasium_family(family: str = "cartpole-lengths", **kwargs) -> GymnasiumFamily:
    """A named gymnasium task family (``env: {name: gymnasium, family: cartpole-lengths}`` in configs)."""
    if family not in GYM_FAMILIES:
        raise ValueError(f"unknown gymnasium task family {family!r}; expected one of {', '.join(GYM_FAMILIES)}.")
    return GYM_FAMILIES[family](**kwargs)
