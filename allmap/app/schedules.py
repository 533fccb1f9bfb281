"""Optimizers with a built-in learning-rate schedule, so a config needs only the ``optimizer`` section.

The schedule's position lives in the optimizer's ``param_groups`` (``scheduled_step``), so it is saved in
the optimizer's ``state_dict`` and a resumed run continues the schedule exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from allmap.checks import check_int

__all__ = ["StepDecayAdam", "CosineAdam"]


class StepDecayAdam(torch.optim.Adam):
    """Adam whose learning rate is multiplied by ``gamma`` every ``every`` steps:
    ``lr_t = lr * gamma ** floor(t / every)`` (the ProtoNets schedule: ``gamma=0.5``, ``every=2000``).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, every: int = 2000, gamma: float = 0.5, **kwargs) -> None:
        check_int("StepDecayAdam", "every", every)
        if not 0 < gamma <= 1:
            raise ValueError(f"StepDecayAdam: expected 0 < gamma <= 1, got {gamma!r}.")
        super().__init__(params, lr=lr, **kwargs)
        for group in self.param_groups:
            group.setdefault("base_lr", lr)
            group.setdefault("scheduled_step", 0)
            group["every"], group["gamma"] = every, gamma

    def rate(self, group: dict, step: int) -> float:
        return group["base_lr"] * group["gamma"] ** (step // group["every"])

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["lr"] = self.rate(group, group["scheduled_step"])
            group["scheduled_step"] += 1
        return super().step(closure)


class CosineAdam(StepDecayAdam):
    """Adam with cosine decay from ``lr`` to ``lr * final`` over ``total`` steps (Loshchilov & Hutter 2017),
    constant afterwards: ``lr_t = lr * (final + (1 - final) * (1 + cos(pi * min(t, total) / total)) / 2)``."""

    def __init__(self, params: Iterable, lr: float = 1e-3, total: int = 10000, final: float = 0.01, **kwargs) -> None:
        check_int("CosineAdam", "total", total)
        super().__init__(params, lr=lr, every=1, gamma=1.0, **kwargs)
        for group in self.param_groups:
            group["total"], group["final"] = total, float(final)

    def rate(self, group: dict, step: int) -> float:
        frac = min(step, group["total"]) / group["total"]
        return group["base_lr"] * (group["final"] + (1 - group["final"]) * 0.5 * (1 + math.cos(math.pi * frac)))
