"""Task families of Markov decision processes, stepped as batches: every task and trajectory in one tensor op.

A :class:`BatchedEnv` is a family of MDPs. ``sample_tasks(n, generator)`` draws ``n`` tasks as a tensor of task
parameters ``[n, p]``; ``reset(tasks, batch)`` starts ``batch`` trajectories in each task and returns the state
``[n, batch, ...]``; ``step(tasks, state, action)`` advances all of them at once and returns
``(state, observation, reward, done)``. The functions are pure (the state is a tensor passed in and out), so a
sampler can step a whole meta-batch with one call per time step and a test can compare it with a per-step loop.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

__all__ = ["BatchedEnv", "Navigation2D", "WithTask", "ENVS"]


class BatchedEnv:
    """A family of MDPs stepped as a batch ``[tasks, trajectories]``.

    Attributes:
        obs_dim: size of an observation.
        action_dim: size of a continuous action, or the number of actions when ``discrete``.
        discrete: whether actions are indices (a categorical policy) rather than vectors (a Gaussian policy).
        horizon: steps per trajectory (a trajectory may end earlier, when ``done``).
        task_dim: size of a task's parameter vector (the oracle policy observes it).
    """

    name: ClassVar[str] = ""
    obs_dim: int
    action_dim: int
    discrete: bool = False
    horizon: int
    task_dim: int

    def sample_tasks(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` task parameter vectors ``[n, task_dim]``."""
        raise NotImplementedError

    def reset(self, tasks: Tensor, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(state, observation)`` of ``batch`` fresh trajectories per task: ``[n, batch, ...]``; ``generator``
        draws random initial states where the family has them."""
        raise NotImplementedError

    def step(self, tasks: Tensor, state: Tensor, action: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(state, observation, reward [n, batch], done [n, batch])`` after ``action`` in every trajectory."""
        raise NotImplementedError


class Navigation2D(BatchedEnv):
    """2-D navigation of the MAML paper (Finn, Abbeel & Levine 2017, section 5.3): a point agent starts at
    ``(0, 0)`` and moves to a goal ``g ~ U[low, high]^2`` that only the reward reveals.

    Dynamics ``s_{t+1} = s_t + clip(a_t, -max_action, max_action)`` (per coordinate), reward
    ``r_t = -||s_{t+1} - g||``, a trajectory ends when both coordinates are within ``tolerance`` of the goal
    or after ``horizon`` steps. With ``max_action = 0.1`` this is the setting of pytorch-maml-rl's
    ``2DNavigation-v0`` and learn2learn's ``Particles2D`` (inner step size 0.1).

    ``rescale=True`` is the setting of cbfinn/maml_rl, whose environment is wrapped in rllab's ``normalize``:
    the policy acts in ``[-1, 1]`` and the move is ``clip(max_action * a_t, -max_action, max_action)``. A
    policy of std 1 then moves with std ``max_action`` instead of saturating the clip at every step (its
    inner step size is 0.5).
    """

    name = "navigation2d"
    obs_dim = 2
    action_dim = 2
    task_dim = 2

    def __init__(
        self,
        horizon: int = 100,
        low: float = -0.5,
        high: float = 0.5,
        max_action: float = 0.1,
        tolerance: float = 0.01,
        rescale: bool = False,
    ) -> None:
        if not (isinstance(horizon, int) and horizon >= 1):
            raise ValueError(f"Navigation2D: expected horizon as a positive integer, got {horizon!r}.")
        if not low < high:
            raise ValueError(f"Navigation2D: expected low < high for the goal range, got low={low}, high={high}.")
        if not max_action > 0:
            raise ValueError(f"Navigation2D: expected max_action > 0, got {max_action!r}.")
        self.horizon, self.low, self.high = horizon, float(low), float(high)
        if not isinstance(rescale, bool):
            raise ValueError(f"Navigation2D: expected rescale as true or false, got {rescale!r}.")
        self.max_action, self.tolerance, self.rescale = float(max_action), float(tolerance), rescale

    def sample_tasks(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.low + (self.high - self.low) * torch.rand(n, 2, generator=generator, dtype=torch.float64)

    def reset(self, tasks: Tensor, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        state = tasks.new_zeros(len(tasks), batch, 2)
        return state, state

    def step(self, tasks: Tensor, state: Tensor, action: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        move = action.to(state.dtype) * (self.max_action if self.rescale else 1.0)
        state = state + move.clamp(-self.max_action, self.max_action)
        offset = state - tasks[:, None, :]
        reward = -offset.norm(dim=-1)
        done = (offset.abs() < self.tolerance).all(dim=-1)
        return state, state, reward, done

    def __repr__(self) -> str:
        scale = ", actions rescaled from [-1, 1]" if self.rescale else ""
        return (
            f"Navigation2D(horizon={self.horizon}, goals U[{self.low}, {self.high}]^2, "
            f"max_action={self.max_action}{scale})"
        )


class WithTask(BatchedEnv):
    """``env`` whose observations carry the task parameters, ``[obs, task]``: the oracle, which sees the goal."""

    def __init__(self, env: BatchedEnv) -> None:
        self.env = env
        self.name = f"oracle({env.name})"
        self.obs_dim, self.action_dim, self.discrete = env.obs_dim + env.task_dim, env.action_dim, env.discrete
        self.horizon, self.task_dim = env.horizon, env.task_dim

    def _obs(self, tasks: Tensor, obs: Tensor) -> Tensor:
        return torch.cat([obs, tasks[:, None, :].to(obs.dtype).expand(-1, obs.shape[1], -1)], dim=-1)

    def sample_tasks(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.env.sample_tasks(n, generator)

    def reset(self, tasks: Tensor, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        state, obs = self.env.reset(tasks, batch, generator)
        return state, self._obs(tasks, obs)

    def step(self, tasks: Tensor, state: Tensor, action: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        state, obs, reward, done = self.env.step(tasks, state, action)
        return state, self._obs(tasks, obs), reward, done

    def __repr__(self) -> str:
        return f"WithTask({self.env!r})"


ENVS: dict[str, type[BatchedEnv]] = {"navigation2d": Navigation2D}
