"""Policy-gradient estimators: the linear feature baseline, GAE, normalised advantages, REINFORCE and DiCE.

Every function works on a meta-batch at once (tensors ``[tasks, horizon, batch]``) and treats each task on
its own: the baseline is fitted and the advantages normalised per task.
"""

from __future__ import annotations

import torch
from torch import Tensor

from allmap.rl.sampler import Trajectories

__all__ = [
    "discount_matrix",
    "discounted",
    "baseline_features",
    "linear_baseline",
    "gae",
    "normalize",
    "advantages",
    "per_step_mean",
    "step_mean",
    "AVERAGES",
    "task_mean",
    "reinforce_loss",
    "dice_loss",
    "magic_box",
]


def discount_matrix(horizon: int, rate: float, like: Tensor) -> Tensor:
    """``M[t, k] = rate^(k - t)`` for ``k >= t``, else 0: ``M @ x`` is the discounted sum from each ``t`` on."""
    t = torch.arange(horizon, device=like.device, dtype=like.dtype)
    power = t[None, :] - t[:, None]
    return torch.where(power >= 0, torch.as_tensor(rate, dtype=like.dtype, device=like.device) ** power, 0.0)


def discounted(x: Tensor, rate: float) -> Tensor:
    """``y_t = sum_{k >= t} rate^(k - t) x_k`` along dimension 1 of ``x [tasks, horizon, batch]``."""
    return torch.einsum("tk,nkb->ntb", discount_matrix(x.shape[1], rate, x), x)


def baseline_features(obs: Tensor, mask: Tensor) -> Tensor:
    """Duan et al. (2016)'s features of a state at time ``t``: ``[s, s^2, t/100, (t/100)^2, (t/100)^3, 1]``
    (``s`` clipped to [-10, 10]), zero on masked steps, as rllab's and pytorch-maml-rl's linear baseline."""
    o = obs.clamp(-10, 10)
    t = torch.arange(obs.shape[1], device=obs.device, dtype=obs.dtype).view(1, -1, 1, 1).expand(*obs.shape[:3], 1)
    t = t / 100.0
    m = mask.unsqueeze(-1)
    return torch.cat([o, o**2, t, t**2, t**3, torch.ones_like(t)], dim=-1) * m


def linear_baseline(traj: Trajectories, gamma: float, reg: float = 1e-5) -> Tensor:
    """Value estimates ``[tasks, horizon, batch]`` of a linear function of :func:`baseline_features`, fitted per
    task by ridge regression on the task's discounted returns, ``w = (X^T X + reg I)^-1 X^T G`` (solved in
    float64; Duan, Chen, Houthooft, Schulman & Abbeel, "Benchmarking deep RL for continuous control", 2016)."""
    x = baseline_features(traj.obs, traj.mask).double()
    g = discounted(traj.rewards.double() * traj.mask.double(), gamma)
    n, h, b, f = x.shape
    x2, g2 = x.reshape(n, h * b, f), g.reshape(n, h * b, 1)
    gram = x2.transpose(1, 2) @ x2 + reg * torch.eye(f, dtype=x.dtype, device=x.device)
    w = torch.linalg.solve(gram, x2.transpose(1, 2) @ g2)
    return (x2 @ w).reshape(n, h, b).to(traj.rewards.dtype)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalised advantage estimation (Schulman et al., ICLR 2016): ``delta_t = r_t + gamma V(s_{t+1}) -
    V(s_t)`` and ``A_t = sum_{k >= t} (gamma lam)^(k - t) delta_k``, with ``V = 0`` after a trajectory ends."""
    v = values * mask
    v_next = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
    deltas = (rewards + gamma * v_next - v) * mask
    return discounted(deltas, gamma * lam) * mask


def normalize(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / (std + eps)`` over each task's valid steps (dimension 0 indexes tasks)."""
    count = mask.sum(dim=(1, 2), keepdim=True)
    mean = (x * mask).sum(dim=(1, 2), keepdim=True) / count
    var = (((x - mean) * mask) ** 2).sum(dim=(1, 2), keepdim=True) / (count - 1).clamp(min=1)
    return (x - mean) / (var.sqrt() + eps) * mask


def advantages(traj: Trajectories, gamma: float = 0.99, lam: float = 1.0, normalized: bool = True) -> Trajectories:
    """``traj`` with its advantages: the linear baseline fitted on these trajectories, GAE(gamma, lam), then
    normalised per task (the pipeline of pytorch-maml-rl and cbfinn/maml_rl)."""
    values = linear_baseline(traj, gamma)
    adv = gae(traj.rewards, values, traj.mask, gamma, lam)
    return traj.with_advantages(normalize(adv, traj.mask) if normalized else adv)


def per_step_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over each trajectory's valid steps, then over its task's trajectories (those with a valid step):
    ``[tasks]``."""
    length = mask.sum(1)
    return ((x * mask).sum(1) / length.clamp(min=1)).sum(-1) / (length > 0).sum(-1).clamp(min=1)


def step_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over each task's valid steps, every step weighing the same: ``[tasks]``."""
    return (x * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2)).clamp(min=1)


AVERAGES = {"trajectory": per_step_mean, "step": step_mean}


def task_mean(x: Tensor, mask: Tensor, average: str = "trajectory") -> Tensor:
    """Per-task mean ``[tasks]`` of ``x`` over the valid steps. ``"trajectory"`` averages each trajectory's steps,
    then the trajectories (pytorch-maml-rl's ``weighted_mean``); ``"step"`` weighs every valid step of the task
    alike (rllab's mean over the concatenated paths, as in cbfinn/maml_rl). They agree while no trajectory ends
    early; when some end at the goal, ``"trajectory"`` gives each step of a short trajectory more weight, so a
    policy that reaches its goal in a few steps takes larger policy-gradient steps."""
    if average not in AVERAGES:
        raise ValueError(f"unknown average {average!r}; expected one of {', '.join(AVERAGES)}.")
    return AVERAGES[average](x, mask)


def reinforce_loss(log_prob: Tensor, traj: Trajectories, average: str = "trajectory") -> Tensor:
    """REINFORCE with a baseline (Williams 1992), per task: ``-mean_t log pi(a_t | s_t) A_t`` (``[tasks]``, the
    mean of :func:`task_mean`); its gradient estimates ``-grad J``. Its second derivative omits how the sampling
    distribution depends on theta (see :func:`dice_loss`)."""
    return -task_mean(log_prob * traj.advantages, traj.mask, average)


def magic_box(x: Tensor) -> Tensor:
    """DiCE's magic box ``exp(x - stop_gradient(x))``: value 1, derivative ``magic_box(x) * dx``."""
    return torch.exp(x - x.detach())


def dice_loss(log_prob: Tensor, traj: Trajectories, average: str = "trajectory") -> Tensor:
    """Loaded DiCE (Foerster et al., ICML 2018; Farquhar et al., NeurIPS 2019), per task: ``-mean over
    trajectories of sum_t (box(c_t) - box(c_{t-1})) A_t / length``, with ``c_t = sum_{t' <= t} log pi(a_t' |
    s_t')`` (or divided by the task's number of steps, :func:`task_mean`). Same value (0) and first derivative
    as :func:`reinforce_loss`; every higher derivative is an unbiased estimate, so the meta-gradient through an
    inner step on it counts how the pre-update trajectories depend on theta."""
    logp = log_prob * traj.mask
    c = logp.cumsum(1)
    weights = magic_box(c) - magic_box(c - logp)
    return -task_mean(weights * traj.advantages, traj.mask, average)
