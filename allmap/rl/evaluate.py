"""Evaluation of meta-RL: mean return after 0, 1, 2, ... policy-gradient steps on fixed seeded test tasks.

Each test task is adapted from the learner's theta with its own sampled trajectories (``trajectories`` per
step, or whole trajectories up to a ``budget`` of environment steps; the same inner update as in
meta-training), and scored by the mean undiscounted return of the trajectories the policy after ``k`` steps
collects. Reported per ``k`` as mean ± 1.96·std/sqrt(n) over the
``n`` test tasks. Baselines (a multi-task pretrained policy, a random initialisation, an oracle that
observes the task) go through the same function, so their numbers are comparable by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from allmap.engine.evaluate import summarize
from allmap.rl.envs import BatchedEnv
from allmap.rl.maml import MAMLRL

__all__ = ["test_tasks", "adaptation_returns", "evaluate_returns"]


def test_tasks(env: BatchedEnv, n: int = 40, seed: int = 1000) -> Tensor:
    """The fixed test tasks: ``n`` tasks drawn with a generator seeded with ``seed``."""
    return env.sample_tasks(n, torch.Generator().manual_seed(seed))


def adaptation_returns(
    learner: MAMLRL,
    env: BatchedEnv,
    tasks: Tensor,
    trajectories: int = 40,
    steps: Sequence[int] = (0, 1, 2, 3),
    seed: int = 1000,
    rows: slice | None = None,
    total: int | None = None,
    lrs: Sequence[float] | None = None,
    budget: int | None = None,
) -> tuple[Tensor, list]:
    """Per-task mean return ``[len(steps), tasks]`` after each step count, and the trajectories of each step
    (for plots). ``rows``/``total`` evaluate this process's share of the test tasks (see
    :func:`allmap.rl.sampler.sample`); ``lrs`` are the test-time step sizes and ``budget`` the environment
    steps per task and step in place of a fixed number of trajectories (see
    :meth:`~allmap.rl.maml.MAMLRL.adapt_and_sample`)."""
    generator = torch.Generator().manual_seed(seed + 1)
    _, trajs = learner.adapt_and_sample(env, tasks, trajectories, max(steps), generator, rows, total, lrs, budget)
    returns = torch.stack([trajs[k].mean_return() for k in steps])
    return returns, [trajs[k] for k in steps]


def evaluate_returns(
    learner: MAMLRL,
    env: BatchedEnv,
    tasks: int = 40,
    trajectories: int = 40,
    steps: Sequence[int] = (0, 1, 2, 3),
    seed: int = 1000,
    lrs: Sequence[float] | None = None,
    budget: int | None = None,
) -> dict[str, dict[str, float]]:
    """``{"return@k": {"mean", "ci95", "std", "n"}}`` over ``tasks`` fixed test tasks (seed ``seed``)."""
    test = test_tasks(env, tasks, seed)
    returns, _ = adaptation_returns(learner, env, test, trajectories, steps, seed, lrs=lrs, budget=budget)
    return {f"return@{k}": summarize(r.double()) for k, r in zip(steps, returns)}
