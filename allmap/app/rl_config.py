"""Run configs of meta-reinforcement learning (``kind: rl``): defaults, validation and building the parts.

A config with ``kind: rl`` goes through the same loader as every other (presets, ``base:``, ``--set``
overrides, run folders), with these defaults and checks instead of the supervised ones.
"""

from __future__ import annotations

from typing import Any

import torch

from allmap.rl import ENVS, MAMLRL, PPO, TRPO, BatchedEnv, WithTask, make_policy

__all__ = ["RL_DEFAULTS", "validate_rl", "build_env", "build_rl_learner", "build_outer", "is_rl"]

RL_DEFAULTS: dict[str, Any] = {
    "description": "",
    "notes": "",
    "kind": "rl",
    "imports": [],
    "seed": 0,
    "threads": None,
    "retain_memory": True,
    "dtype": "float32",
    "iterations": 500,
    "meta_batch": 20,
    "trajectories": 20,
    "log_every": 10,
    "checkpoint_every": 50,
    "env": {"name": "navigation2d", "oracle": False},
    "policy": {"hidden": [64, 64], "activation": "tanh"},
    "learner": {"inner_lr": 0.1, "inner_steps": 1, "hypergrad": "unrolled", "estimator": "reinforce"},
    "outer": {"name": "trpo"},
    "eval": {
        "tasks": 40,
        "trajectories": 40,
        "steps": [0, 1, 2, 3],
        "seed": 1000,
        "compare": {},
        "inner_lrs": None,
        "step_budget": None,
    },
}

_POSITIVE = ("iterations", "meta_batch", "trajectories", "log_every", "checkpoint_every")
_OUTER = {"trpo": TRPO, "ppo": PPO, "adam": PPO}


def is_rl(config: dict[str, Any]) -> bool:
    """Whether ``config`` is a meta-RL run config."""
    return config.get("kind") == "rl"


def _error(message: str) -> Exception:
    from allmap.app.config import ConfigError  # the loader imports this module lazily, so no cycle

    return ConfigError(message)


def validate_rl(config: dict[str, Any]) -> None:
    """Check keys and value types of a ``kind: rl`` config; section keys are checked by the constructors."""
    unknown = sorted(set(config) - set(RL_DEFAULTS))
    if unknown:
        raise _error(f"unknown config key(s) {unknown} for kind: rl; valid top-level keys: {', '.join(RL_DEFAULTS)}.")
    for key in _POSITIVE:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _error(f"config key {key!r} must be a positive integer, got {value!r}.")
    for section in ("env", "policy", "learner", "outer", "eval"):
        if not isinstance(config.get(section), dict):
            raise _error(f"config section {section!r} must be a mapping, got {config.get(section)!r}.")
    if config["env"].get("name") not in ENVS and config["env"].get("name") != "gymnasium":
        raise _error(f"unknown env {config['env'].get('name')!r}; expected one of {', '.join([*ENVS, 'gymnasium'])}.")
    if config["outer"].get("name") not in _OUTER:
        raise _error(f"unknown outer loop {config['outer'].get('name')!r}; expected one of {', '.join(_OUTER)}.")
    if config["dtype"] not in ("float32", "float64"):
        raise _error(f"config key 'dtype' must be 'float32' or 'float64', got {config['dtype']!r}.")
    steps = config["eval"].get("steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, int) and 0 <= s <= 100 for s in steps):
        raise _error(f"config key 'eval.steps' must be a non-empty list of integers in [0, 100], got {steps!r}.")
    rates = config["eval"].get("inner_lrs")
    if rates is not None and not (
        isinstance(rates, list)
        and rates
        and all(isinstance(r, (int, float)) and not isinstance(r, bool) and r >= 0 for r in rates)
    ):
        raise _error(
            "config key 'eval.inner_lrs' must be null (the learner's inner_lr) or a non-empty list of step sizes "
            f">= 0, one per test-time step, the last repeating (e.g. [0.5, 0.25]), got {rates!r}."
        )
    budget = config["eval"].get("step_budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise _error(
            "config key 'eval.step_budget' must be null (eval.trajectories trajectories per task and step) or a "
            f"positive number of environment steps to sample whole trajectories up to (e.g. 4000), got {budget!r}."
        )
    if not isinstance(config["eval"].get("compare"), dict):
        raise _error(
            "config key 'eval.compare' must map a baseline's name to its run folder, e.g. "
            f"{{pretrained: runs/pretrained}}, got {config['eval'].get('compare')!r}."
        )


def build_env(config: dict[str, Any]) -> BatchedEnv:
    """The environment family of ``config['env']`` (``oracle: true`` adds the task to the observations)."""
    args = {k: v for k, v in config["env"].items() if k not in ("name", "oracle")}
    name = config["env"]["name"]
    try:
        if name == "gymnasium":
            from allmap.rl.gym import gymnasium_family

            env = gymnasium_family(**args)
        else:
            env = ENVS[name](**args)
    except TypeError as err:
        raise _error(f"env {name!r}: {err}") from None
    return WithTask(env) if config["env"].get("oracle") else env


def build_rl_learner(config: dict[str, Any], env: BatchedEnv) -> MAMLRL:
    """The policy and the MAML-RL learner of ``config``."""
    try:
        policy = make_policy(env, **config["policy"])
        return MAMLRL(policy, **config["learner"]).to(getattr(torch, config["dtype"]))
    except TypeError as err:
        raise _error(f"policy or learner section: {err}") from None


def build_outer(config: dict[str, Any]) -> TRPO | PPO:
    """The outer loop of ``config['outer']`` (``trpo``, or ``ppo`` / ``adam`` with an ``lr``)."""
    args = {k: v for k, v in config["outer"].items() if k not in ("name", "lr")}
    try:
        return _OUTER[config["outer"]["name"]](**args)
    except TypeError as err:
        raise _error(f"outer section: {err}") from None
