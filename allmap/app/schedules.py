"""Optimizers with a built-in learning-rate schedule, so a config needs only the ``optimizer`` section.

The schedule's position lives in the optimizer's ``param_groups`` (``scheduled_step``), so it is saved in
the optimizer's ``state_dict`` and a resumed run continues the schedule exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from allmap.checks import check_int

__all__ = ["StepDecayAdam", "CosineAdam", "LinearSGD"]


class _Scheduled:
    """Sets each group's ``lr`` to ``self.rate(group, t)`` before the ``t``-th step (``t`` from 0)."""

    def _start_schedule(self, lr: float, **fields: object) -> None:
        for group in self.param_groups:
            group.setdefault("base_lr", lr)
            group.setdefault("scheduled_step", 0)
            group.update(fields)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["lr"] = self.rate(group, group["scheduled_step"])
            group["scheduled_step"] += 1
        return super().step(closure)


class StepDecayAdam(_Scheduled, torch.optim.Adam):
    """Adam whose learning rate is multiplied by ``gamma`` every ``every`` steps:
    ``lr_t = lr * gamma ** floor(t / every)`` (the ProtoNets schedule: ``gamma=0.5``, ``every=2000``).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, every: int = 2000, gamma: float = 0.5, **kwargs) -> None:
        check_int("StepDecayAdam", "every", every)
        if not 0 < gamma <= 1:
            raise ValueError(f"StepDecayAdam: expected 0 < gamma <= 1, got {gamma!r}.")
        super().__init__(params, lr=lr, **kwargs)
        self._start_schedule(lr, every=every, gamma=gamma)

    def rate(self, group: dict, step: int) -> float:
        return group["base_lr"] * group["gamma"] ** (step // group["every"])


class CosineAdam(_Scheduled, torch.optim.Adam):
    """Adam with cosine decay from ``lr`` to ``lr * final`` over ``total`` steps (Loshchilov & Hutter 2017),
    constant afterwards: ``lr_t = lr * (final + (1 - final) * (1 + cos(pi * min(t, total) / total)) / 2)``."""

    def __init__(self, params: Iterable, lr: float = 1e-3, total: int = 10000, final: float = 0.01, **kwargs) -> None:
        check_int("CosineAdam", "total", total)
        super().__init__(params, lr=lr, **kwargs)
        self._start_schedule(lr, total=total, final=float(final))

    def rate(self, group: dict, step: int) -> float:
        frac = min(step, group["total"]) / group["total"]
        return group["base_lr"] * (group["final"] + (1 - group["final"]) * 0.5 * (1 + math.cos(math.pi * frac)))


class LinearSGD(_Scheduled, torch.optim.SGD):
    """SGD whose learning rate moves linearly from ``lr`` to ``final`` over ``total`` steps, constant
    afterwards: ``lr_t = lr + (final - lr) * min(t, total) / total``. Reptile's outer step size
    (Nichol et al. 2018: ``epsilon`` annealed from 1 to 0 over the run, ``frac_done = i / meta_iters``)."""

    def __init__(self, params: Iterable, lr: float = 1.0, total: int = 100000, final: float = 0.0, **kwargs) -> None:
        check_int("LinearSGD", "total", total)
        if final < 0:
            raise ValueError(f"LinearSGD: expected final >= 0 (the last learning rate), got {final!r}.")
        super().__init__(params, lr=lr, **kwargs)
        self._start_schedule(lr, total=total, final=float(final))

    def rate(self, group: dict, step: int) -> float:
        frac = min(step, group["total"]) / group["total"]
        return group["base_lr"] + (group["final"] - group["base_lr"]) * frac
