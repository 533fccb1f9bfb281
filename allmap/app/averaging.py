"""Exponential moving average of the weights: the model that validation, test evaluation and ``allmap.load``
use when a run config sets ``ema``.

Polyak & Juditsky (1992) averaging in its exponential form (as in timm's ``ModelEmaV2``): after every
optimizer step ``t`` (counted from 0),

    theta_avg <- d_t * theta_avg + (1 - d_t) * theta,    d_t = min(decay, (1 + t) / (10 + t)),

for every floating-point parameter and buffer (BatchNorm running statistics included); integer buffers are
copied. The warm-up ``d_t`` keeps the average from remembering the initialisation. Mid-way through a
schedule, while the learning rate is still high, the average is usually a better model than the last
iterate; the training run itself is unchanged (the average is never fed back).
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import nn

__all__ = ["WeightAverage", "check_decay", "is_decay", "averaged"]

#: trained module -> its WeightAverage (weak: gone with the module)
_AVERAGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def averaged(module: nn.Module) -> nn.Module:
    """The weight average of ``module`` if a :class:`WeightAverage` follows it (as in a run with ``ema``),
    else ``module`` itself: what a training callback should evaluate."""
    average = _AVERAGES.get(module)
    return module if average is None else average.module


def is_decay(decay: Any) -> bool:
    """Whether ``decay`` is a number in (0, 1) (the run config and :class:`WeightAverage` both check this)."""
    return not isinstance(decay, bool) and isinstance(decay, (int, float)) and 0 < decay < 1


def check_decay(decay: Any, owner: str = "ema") -> float:
    """``decay`` as a float in (0, 1), or a clear error."""
    if not is_decay(decay):
        raise ValueError(
            f"{owner}: expected the averaging decay to be a number in (0, 1) such as 0.998 (an "
            f"average over about 1 / (1 - decay) steps, 500 for 0.998), or None for no averaging; got {decay!r}."
        )
    return float(decay)


class WeightAverage:
    """An averaged copy of ``module`` (``.module``), updated by :meth:`update` after each optimizer step.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> avg = WeightAverage(net, decay=0.9)
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> avg.update(net)  # first step: d_0 = min(0.9, 1/10) = 0.1
        >>> bool(torch.allclose(avg.module.weight, net.weight - 0.1))
        True
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = check_decay(decay)
        self.module = copy.deepcopy(module)
        self.module.requires_grad_(False)
        self.steps = 0
        _AVERAGES[module] = self

    def _pairs(self, module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple]]:
        own, src = self.module.state_dict(), module.state_dict()
        if own.keys() != src.keys():
            raise ValueError(
                f"WeightAverage: the module's state keys changed; expected {sorted(own)}, got {sorted(src)}."
            )
        avg, cur, others = [], [], []
        for k, a in own.items():
            if a.is_floating_point():
                avg.append(a)
                cur.append(src[k])
            else:
                others.append((a, src[k]))
        return avg, cur, others

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold ``module``'s current weights into the average (one fused ``lerp`` over all tensors)."""
        avg, cur, others = self._pairs(module)
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(avg, cur, 1.0 - d)
        for a, s in others:
            a.copy_(s)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.steps = int(state["steps"])
