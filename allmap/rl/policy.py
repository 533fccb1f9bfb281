"""Policies with one parameter set per task: ``[tasks, ...]``-stacked parameters run under ``torch.func.vmap``.

Meta-RL adapts a copy of the policy to each task of a meta-batch. Here the copies are one stacked dict,
``params[name]`` of shape ``[tasks, *shape]``, and every policy evaluation is one vmapped
``functional_call`` over the tasks (a batched matrix product per layer), so a meta-batch of tasks samples,
adapts and is differentiated together. Starting every task from the shared theta is ``stack(params, n)``
(an ``expand``, so the meta-gradient sums over the tasks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from allmap.inner.optim import Params
from allmap.nets import MLP

__all__ = ["Policy", "GaussianPolicy", "CategoricalPolicy", "stack", "make_policy"]


def stack(params: Params, n: int) -> Params:
    """Each tensor of ``params`` repeated for ``n`` tasks (``expand``: differentiable, no copy)."""
    return {k: v.expand(n, *v.shape) for k, v in params.items()}


def _xavier(net: nn.Module) -> nn.Module:
    """Glorot-uniform weights and zero biases (the initialisation of pytorch-maml-rl's policies)."""
    for layer in net.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return net


class Policy(nn.Module):
    """A stochastic policy ``pi(a | s)`` with task-stacked functional evaluation.

    Subclasses define :meth:`dist` (distribution parameters from stacked params and observations ``[tasks,
    ..., obs_dim]``), :meth:`log_prob`, :meth:`kl` and :meth:`act` (an action from the distribution
    parameters and standard noise, so that the sampler controls the random numbers).
    """

    def __init__(self, obs_dim: int, out_dim: int, hidden: Sequence[int], activation: str) -> None:
        super().__init__()
        self.net = _xavier(MLP([obs_dim, *hidden, out_dim], activation=activation))
        self.obs_dim = obs_dim

    def forward_stacked(self, params: Params, obs: Tensor) -> Tensor:
        """The network's output for each task's parameters on that task's observations ``[tasks, ..., d]``."""
        net = {k[4:]: v for k, v in params.items() if k.startswith("net.")}

        def one(p: Params, x: Tensor) -> Tensor:
            return torch.func.functional_call(self.net, p, (x,))

        return torch.func.vmap(one)(net, obs)

    def dist(self, params: Params, obs: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def log_prob(self, dist: tuple[Tensor, ...], actions: Tensor) -> Tensor:
        raise NotImplementedError

    def kl(self, old: tuple[Tensor, ...], new: tuple[Tensor, ...]) -> Tensor:
        """``KL(old || new)`` at each state."""
        raise NotImplementedError

    def noise(self, shape: Sequence[int], generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
        """Standard random numbers for :meth:`act` for a batch of states of ``shape``."""
        raise NotImplementedError

    def act(self, dist: tuple[Tensor, ...], noise: Tensor) -> Tensor:
        raise NotImplementedError


class GaussianPolicy(Policy):
    """``a ~ N(mu_theta(s), diag(exp(log_std))^2)``: an MLP mean and a state-independent learned log standard
    deviation, initial std ``init_std`` (1.0, as pytorch-maml-rl's ``NormalMLPPolicy``)."""

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (64, 64),
        activation: str = "tanh",
        init_std: float = 1.0,
        min_std: float = 1e-6,
    ) -> None:
        super().__init__(obs_dim, action_dim, hidden, activation)
        if not init_std > 0:
            raise ValueError(f"GaussianPolicy: expected init_std > 0, got {init_std!r}.")
        self.log_std = nn.Parameter(torch.full((action_dim,), math.log(init_std)))
        self.min_log_std = math.log(min_std)

    def dist(self, params: Params, obs: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.forward_stacked(params, obs)
        log_std = params["log_std"].clamp(min=self.min_log_std)
        shape = (len(mean),) + (1,) * (mean.dim() - 2) + (mean.shape[-1],)
        return mean, log_std.reshape(shape).expand_as(mean)

    def log_prob(self, dist: tuple[Tensor, ...], actions: Tensor) -> Tensor:
        mean, log_std = dist
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def kl(self, old: tuple[Tensor, ...], new: tuple[Tensor, ...]) -> Tensor:
        (m0, s0), (m1, s1) = old, new
        return (s1 - s0 + (torch.exp(2 * s0) + (m0 - m1) ** 2) / (2 * torch.exp(2 * s1)) - 0.5).sum(-1)

    def noise(self, shape: Sequence[int], generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
        return torch.randn(*shape, self.log_std.numel(), generator=generator, dtype=dtype)

    def act(self, dist: tuple[Tensor, ...], noise: Tensor) -> Tensor:
        mean, log_std = dist
        return mean + torch.exp(log_std) * noise.to(mean.device)


class CategoricalPolicy(Policy):
    """``a ~ Categorical(softmax(f_theta(s)))`` over ``actions`` discrete actions (sampled by the Gumbel-max
    trick from the sampler's uniform noise)."""

    def __init__(self, obs_dim: int, actions: int, hidden: Sequence[int] = (32, 32), activation: str = "tanh") -> None:
        super().__init__(obs_dim, actions, hidden, activation)
        self.actions = actions

    def dist(self, params: Params, obs: Tensor) -> tuple[Tensor]:
        # unnormalised logits: the KL is curved in them (in log-probabilities it would be linear)
        return (self.forward_stacked(params, obs),)

    def log_prob(self, dist: tuple[Tensor, ...], actions: Tensor) -> Tensor:
        return torch.log_softmax(dist[0], -1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def kl(self, old: tuple[Tensor, ...], new: tuple[Tensor, ...]) -> Tensor:
        old_lp, new_lp = torch.log_softmax(old[0], -1), torch.log_softmax(new[0], -1)
        return (old_lp.exp() * (old_lp - new_lp)).sum(-1)

    def noise(self, shape: Sequence[int], generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
        u = torch.rand(*shape, self.actions, generator=generator, dtype=dtype)
        return -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-7)))

    def act(self, dist: tuple[Tensor, ...], noise: Tensor) -> Tensor:
        return (dist[0] + noise.to(dist[0].device)).argmax(-1)


def make_policy(env, hidden: Sequence[int] = (64, 64), activation: str = "tanh", **kwargs) -> Policy:
    """The policy that fits ``env``'s actions: Gaussian for continuous, categorical for discrete."""
    if env.discrete:
        return CategoricalPolicy(env.obs_dim, env.action_dim, hidden, activation, **kwargs)
    return GaussianPolicy(env.obs_dim, env.action_dim, hidden, activation, **kwargs)
