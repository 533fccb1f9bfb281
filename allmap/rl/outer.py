"""The outer loop of MAML-RL: TRPO (the paper's) or a first-order optimizer on the PPO-clip surrogate.

The outer objective of a meta-batch is the importance-weighted surrogate of the adapted policies on the
trajectories they collected, ``L(theta) = -mean_i mean_t r_it(theta) A'_it`` with ``r = pi_theta'_i(a|s) /
pi_old'_i(a|s)``, and ``KL(theta) = mean_i mean_t KL(pi_old'_i || pi_theta'_i)``, where ``theta'_i`` is
recomputed from theta through the inner step (:meth:`allmap.rl.maml.MAMLRL.adapt`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from allmap.hypergrad.implicit import conjugate_gradient
from allmap.inner.optim import Params
from allmap.rl.estimators import task_mean
from allmap.rl.maml import MAMLRL
from allmap.rl.sampler import Trajectories

__all__ = ["Surrogate", "TRPO", "PPO", "trpo_step", "kl_hvp"]

Reduce = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


class Surrogate:
    """``theta -> (loss, kl)`` of a meta-batch, for the outer loop, in two parts: :meth:`outputs` (the adapted
    policies' distribution parameters on the post-update states, through the inner step) and :meth:`loss_kl`
    (the surrogate and the KL from them), so that TRPO can form its curvature products from the Jacobian of
    the first and the (cheap) Fisher matrix of the second.

    ``total`` is the number of tasks of the whole meta-batch: the losses are sums over this process's tasks
    divided by it, so that summing them over processes (``reduce``) gives the mean over the meta-batch.
    """

    def __init__(
        self,
        learner: MAMLRL,
        pre: Sequence[Trajectories],
        post: Trajectories,
        total: int,
        clip: float | None = None,
        offset: int = 0,
        old_dist: tuple[Tensor, ...] | None = None,
    ) -> None:
        self.learner, self.pre, self.post, self.total, self.clip = learner, list(pre), post, total, clip
        self.offset = offset  # global index of this process's first task
        with torch.no_grad():
            self.old_dist = tuple(d.detach() for d in self.outputs()) if old_dist is None else old_dist
            self.old_log_prob = learner.policy.log_prob(self.old_dist, post.actions)

    def every(self, k: int) -> Surrogate:
        """The surrogate of the tasks whose global index is a multiple of ``k`` (TRPO's curvature on a subsample
        of the data, Schulman et al. 2015, section 6), averaged over those tasks of the whole meta-batch."""
        if k == 1:
            return self
        first = (-self.offset) % k
        pick = slice(first, None, k)
        return Surrogate(
            self.learner,
            [t.rows(pick) for t in self.pre],
            self.post.rows(pick),
            total=-(-self.total // k),
            clip=self.clip,
            old_dist=tuple(d[pick] for d in self.old_dist),
        )

    def outputs(self, theta: Params | None = None) -> tuple[Tensor, ...]:
        """The adapted policies' distribution parameters on the post-update states."""
        params = self.learner.adapt(self.pre, len(self.post.obs), theta)
        return self.learner.policy.dist(params, self.post.obs)

    def loss_kl(self, dist: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        policy, post = self.learner.policy, self.post
        ratio = torch.exp(policy.log_prob(dist, post.actions) - self.old_log_prob)
        gain = ratio * post.advantages
        if self.clip is not None:
            gain = torch.minimum(gain, ratio.clamp(1 - self.clip, 1 + self.clip) * post.advantages)
        average = self.learner.average
        loss = -task_mean(gain, post.mask, average).sum() / self.total
        kl = task_mean(policy.kl(self.old_dist, dist), post.mask, average).sum() / self.total
        return loss, kl

    def __call__(self) -> tuple[Tensor, Tensor]:
        return self.loss_kl(self.outputs())


@dataclass
class TRPO:
    """Trust-region policy optimisation (Schulman et al., ICML 2015), MAML's outer loop.

    Step ``theta <- theta - s^j sqrt(2 max_kl / (x^T H x)) x`` with ``x = H^-1 g`` solved by conjugate gradient
    (``cg_iters`` iterations with Hessian-vector products of the KL, plus ``damping``), ``g`` the surrogate's
    gradient, and the first ``j < ls_steps`` of a backtracking line search (ratio ``s``) at which the
    surrogate improves and the KL stays below ``max_kl``; no step if none does. The settings are those of
    pytorch-maml-rl's maml-trpo configuration. ``fisher_every = k`` forms the curvature products on every k-th
    task of the meta-batch only (the subsampled Fisher of the TRPO paper, section 6), ``k`` times cheaper; the
    gradient and the line search's KL check use every task.
    """

    max_kl: float = 1e-2
    cg_iters: int = 10
    damping: float = 1e-5
    ls_steps: int = 15
    backtrack: float = 0.8
    fisher_every: int = 1

    def step(self, params: dict[str, Tensor], surrogate: Surrogate, reduce: Reduce = _identity) -> dict[str, float]:
        return trpo_step(params, surrogate, self, reduce)


def _flat_reduce(tensors: Sequence[Tensor], reduce: Reduce) -> list[Tensor]:
    """``reduce`` applied to all ``tensors`` in one call (a single all-reduce under torchrun)."""
    flat = reduce(torch.cat([t.reshape(-1) for t in tensors]))
    return [c.view_as(t) for c, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _fisher_product(surrogate: Surrogate) -> Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]]:
    """``u -> F u``: the Hessian of the KL w.r.t. the distribution parameters at the old ones (where the KL
    and its gradient vanish), by double backward through the elementwise KL only."""
    dist = tuple(d.detach().requires_grad_(True) for d in surrogate.old_dist)
    with torch.enable_grad():
        grads = torch.autograd.grad(surrogate.loss_kl(dist)[1], dist, create_graph=True)

    def product(u: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        dot = sum((g * x).sum() for g, x in zip(grads, u))
        return torch.autograd.grad(dot, dist, retain_graph=True)

    return product


def kl_hvp(
    surrogate: Surrogate, params: dict[str, Tensor], dist: tuple[Tensor, ...], reduce: Reduce = _identity
) -> Callable[[Sequence[Tensor]], list[Tensor]]:
    """``v -> H v`` for the Hessian ``H`` of the KL w.r.t. theta at the current theta.

    There the KL's gradient w.r.t. the distribution parameters is zero, so ``H = J^T F J`` exactly (``J`` the
    Jacobian of :meth:`Surrogate.outputs`, through the inner step; ``F`` the KL's Hessian in distribution
    space): ``J v`` by forward mode, ``J^T (F J v)`` by a backward pass through ``dist``'s retained graph. The
    same product as differentiating the KL twice, at a fraction of the cost."""
    names = list(params)
    primals = tuple(params[n].detach() for n in names)
    fisher = _fisher_product(surrogate)

    def outputs(*theta: Tensor) -> tuple[Tensor, ...]:
        return surrogate.outputs(dict(zip(names, theta)))

    def hvp(v: Sequence[Tensor]) -> list[Tensor]:
        _, jv = torch.func.jvp(outputs, primals, tuple(v))
        hv = torch.autograd.grad(dist, [params[n] for n in names], fisher(jv), retain_graph=True)
        return _flat_reduce(hv, reduce)

    return hvp


def trpo_step(
    params: dict[str, Tensor], surrogate: Surrogate, cfg: TRPO, reduce: Reduce = _identity
) -> dict[str, float]:
    """One TRPO step on ``params`` (the learner's, by name) in place (see :class:`TRPO`); returns the loss before
    and after, the KL of the step taken, the line-search steps and the CG residual. ``reduce`` sums a tensor
    over processes."""
    tensors = list(params.values())
    dist = surrogate.outputs()
    loss, _ = surrogate.loss_kl(dist)
    sub = surrogate.every(cfg.fisher_every)
    grads = _flat_reduce(torch.autograd.grad(loss, tensors, retain_graph=sub is surrogate), reduce)
    curvature = kl_hvp(sub, params, dist if sub is surrogate else sub.outputs(), reduce)

    def hvp(v: Sequence[Tensor]) -> list[Tensor]:
        return [h + cfg.damping * x for h, x in zip(curvature(v), v)]

    direction, residual = conjugate_gradient(hvp, [g.detach() for g in grads], cfg.cg_iters)
    shs = 0.5 * sum((d * h).sum() for d, h in zip(direction, hvp(direction)))
    scale = torch.sqrt(shs.clamp(min=1e-30) / cfg.max_kl)
    step = [d / scale for d in direction]
    old_loss = float(reduce(loss.detach().clone()))
    old = [p.detach().clone() for p in tensors]
    info = {"loss": old_loss, "loss_after": old_loss, "kl": 0.0, "line_search": float(cfg.ls_steps)}
    info["cg_residual"] = float(residual)
    del dist, loss
    with torch.no_grad():
        for j in range(cfg.ls_steps):
            size = cfg.backtrack**j
            for p, o, s in zip(tensors, old, step):
                p.copy_(o - size * s)
            both = reduce(torch.stack(surrogate()))
            if float(both[0]) < old_loss and float(both[1]) < cfg.max_kl:
                info.update(loss_after=float(both[0]), kl=float(both[1]), line_search=float(j))
                return info
        for p, o in zip(tensors, old):
            p.copy_(o)
    return info


@dataclass
class PPO:
    """A first-order outer loop: ``epochs`` steps of ``optimizer`` on the PPO-clip surrogate (Schulman et al.
    2017), ``-mean min(r A, clip(r, 1 - clip, 1 + clip) A)``, each step through the inner adaptation again;
    ``clip=None`` with one epoch is the plain meta-policy-gradient with Adam."""

    epochs: int = 5
    clip: float | None = 0.2

    def step(
        self,
        params: Sequence[Tensor],
        objective: Callable[[], tuple[Tensor, Tensor]],
        optimizer: torch.optim.Optimizer,
        reduce: Reduce = _identity,
    ) -> dict[str, float]:
        params = list(params)
        first = last = None
        for _ in range(self.epochs):
            optimizer.zero_grad()
            loss, kl = objective()
            for p, g in zip(params, _flat_reduce(torch.autograd.grad(loss, params), reduce)):
                p.grad = g
            optimizer.step()
            value = reduce(torch.stack([loss.detach(), kl.detach()]))
            first = float(value[0]) if first is None else first
            last = value
        return {"loss": first, "loss_after": float(last[0]), "kl": float(last[1])}
