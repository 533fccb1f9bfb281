"""Meta-reinforcement learning: task families of MDPs as batched environments, a batched sampler,
policy-gradient estimators, MAML-RL with a TRPO or PPO outer loop, and its evaluation.

The mapping is the same as in supervised meta-learning: the trajectories a policy collects in a task become
an adapted policy through differentiable policy-gradient steps (:class:`MAMLRL`, built from the gradient
learners' inner update and the meta-gradient strategies of :mod:`allmap.hypergrad`).
"""

from allmap.rl.envs import ENVS, BatchedEnv, Navigation2D, WithTask
from allmap.rl.estimators import advantages, dice_loss, gae, linear_baseline, normalize, reinforce_loss
from allmap.rl.evaluate import adaptation_returns, evaluate_returns, test_tasks
from allmap.rl.maml import MAMLRL
from allmap.rl.outer import PPO, TRPO, Surrogate, trpo_step
from allmap.rl.policy import CategoricalPolicy, GaussianPolicy, Policy, make_policy, stack
from allmap.rl.sampler import Trajectories, sample, sample_steps, within_budget

__all__ = [
    "ENVS",
    "BatchedEnv",
    "Navigation2D",
    "WithTask",
    "advantages",
    "dice_loss",
    "gae",
    "linear_baseline",
    "normalize",
    "reinforce_loss",
    "adaptation_returns",
    "evaluate_returns",
    "test_tasks",
    "MAMLRL",
    "PPO",
    "TRPO",
    "Surrogate",
    "trpo_step",
    "CategoricalPolicy",
    "GaussianPolicy",
    "Policy",
    "make_policy",
    "stack",
    "Trajectories",
    "sample",
    "sample_steps",
    "within_budget",
]
