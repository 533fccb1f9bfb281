"""Sampler throughput on 2-D navigation: allmap's batched sampler against learn2learn's vectorised sampler.

Environment steps per second (wall clock; learn2learn steps its environments in worker processes, whose CPU
time the parent's process time does not count), the same 64-64 Gaussian policy for both, one meta-batch of
``--tasks`` tasks x ``--trajectories`` trajectories x 100 steps:

* ``allmap batched``: :func:`allmap.rl.sample`, every task and trajectory in one tensor op per time step;
* ``learn2learn AsyncVectorEnv``: learn2learn 0.2.0's ``AsyncVectorEnv`` of ``Particles2DEnv`` with
  ``--workers`` subprocess environments (the sampler of its ``maml_trpo`` example, whose default is 10
  workers), one task at a time, the policy evaluated on the stacked observations each step, as cherry's
  ``Runner`` does;
* ``learn2learn Particles2DEnv loop``: the same environments stepped in this process (no pipes), the best
  case for per-environment stepping.

learn2learn's gym environments import ``gym`` (0.26 works with them when they are built directly rather than
through ``gym.make``); its package ``__init__`` needs torchvision, so its modules are imported without it.

    flock /tmp/allmap-bench.lock python benchmarks/rl_sampler.py --tasks 20 --trajectories 20 --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import types

import numpy as np
import torch

from allmap.rl import Navigation2D, make_policy, sample, stack


def _learn2learn_gym():
    if "learn2learn" not in sys.modules:  # its __init__ imports torchvision; the gym part does not need it
        spec = importlib.util.find_spec("learn2learn")
        if spec is None or spec.origin is None:
            raise ImportError("learn2learn is not installed")
        shell = types.ModuleType("learn2learn")
        shell.__path__ = [os.path.dirname(spec.origin)]
        sys.modules["learn2learn"] = shell
    from learn2learn.gym.async_vec_env import AsyncVectorEnv
    from learn2learn.gym.envs.particles.particles_2d import Particles2DEnv

    return AsyncVectorEnv, Particles2DEnv


def _act(policy, obs: np.ndarray, generator: torch.Generator) -> np.ndarray:
    params = stack(dict(policy.named_parameters()), 1)
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32))[None]
        dist = policy.dist(params, x)
        return policy.act(dist, policy.noise(x.shape[:2], generator, torch.float32))[0].numpy()


def time_allmap(policy, env, goals: torch.Tensor, trajectories: int) -> tuple[float, int]:
    params = stack(dict(policy.named_parameters()), len(goals))
    start = time.perf_counter()
    sample(env, policy, params, goals, trajectories, torch.Generator().manual_seed(0))
    return time.perf_counter() - start, len(goals) * trajectories * env.horizon


def time_l2l_vector(policy, goals: torch.Tensor, trajectories: int, workers: int, horizon: int) -> tuple[float, int]:
    AsyncVectorEnv, Particles2DEnv = _learn2learn_gym()
    vec = AsyncVectorEnv([Particles2DEnv for _ in range(workers)])
    gen = torch.Generator().manual_seed(0)
    steps = 0
    start = time.perf_counter()
    for goal in goals:
        vec.set_task({"goal": goal.numpy()})
        for _ in range(-(-trajectories // workers)):  # rounds of `workers` trajectories in parallel
            obs = vec.reset()
            for _ in range(horizon):
                obs, _, _, _ = vec.step(_act(policy, obs, gen))
                steps += workers
    elapsed = time.perf_counter() - start
    vec.close()
    return elapsed, steps


def time_l2l_loop(policy, goals: torch.Tensor, trajectories: int, horizon: int) -> tuple[float, int]:
    _, Particles2DEnv = _learn2learn_gym()
    envs = [Particles2DEnv() for _ in range(trajectories)]
    gen = torch.Generator().manual_seed(0)
    steps = 0
    start = time.perf_counter()
    for goal in goals:
        for e in envs:
            e.set_task({"goal": goal.numpy()})
        obs = np.stack([e.reset() for e in envs])
        for _ in range(horizon):
            actions = _act(policy, obs, gen)
            obs = np.stack([e.step(a)[0] for e, a in zip(envs, actions)])
            steps += len(envs)
    return time.perf_counter() - start, steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--trajectories", type=int, default=20)
    p.add_argument("--workers", type=int, default=10, help="learn2learn AsyncVectorEnv worker processes")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = Navigation2D()
    policy = make_policy(env)
    goals = env.sample_tasks(args.tasks, torch.Generator().manual_seed(0))
    rows = {"allmap batched": lambda: time_allmap(policy, env, goals, args.trajectories)}
    try:
        _learn2learn_gym()
        rows[f"learn2learn AsyncVectorEnv ({args.workers} workers)"] = lambda: time_l2l_vector(
            policy, goals.float(), args.trajectories, args.workers, env.horizon
        )
        rows["learn2learn Particles2DEnv loop"] = lambda: time_l2l_loop(
            policy, goals.float(), args.trajectories, env.horizon
        )
    except ImportError as err:
        print(f"note: learn2learn skipped ({err})")
    results = {}
    for name, run in rows.items():
        best = min((run() for _ in range(args.repeats)), key=lambda r: r[0] / r[1])
        results[name] = best[1] / best[0]
    base = results["allmap batched"]
    print(
        f"\n{args.tasks} tasks x {args.trajectories} trajectories x {env.horizon} steps, 64-64 Gaussian policy, "
        f"{args.threads} torch thread(s), best of {args.repeats}"
    )
    print("| sampler | env steps/s | allmap / this |")
    print("|---|---|---|")
    for name, rate in results.items():
        print(f"| {name} | {rate:,.0f} | {base / rate:.1f}x |")


if __name__ == "__main__":
    main()
