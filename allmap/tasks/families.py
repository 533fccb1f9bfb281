"""Seeded task families that make their own data: sinusoid, linear regression and 2-D logistic regression.

Every family samples a :class:`~allmap.TaskBatch` from a ``torch.Generator``, so the same seed gives the
same tasks on every machine; fixed test tasks are ``family.sample(n, generator seeded with the test seed)``.
``info`` carries each task's true parameters, and :meth:`TaskFamily.target` evaluates the true function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from allmap.checks import check_int
from allmap.tasks.batch import TaskBatch
from allmap.tasks.gp import GPRegression
from allmap.tasks.imagefolder import ImageFolder
from allmap.tasks.omniglot import Omniglot
from allmap.tasks.streams import IncrementalSine, OMLTrajectories

__all__ = ["TaskFamily", "Sinusoid", "LinearRegression", "Logistic2D", "FAMILIES"]


def _positive_int(owner: str, name: str, value: object) -> int:
    return check_int(owner, name, value)


def _shot_range(owner: str, value: object) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{owner}: expected shots as an integer or a range [lo, hi], got {list(value)!r}.")
        lo, hi = (_positive_int(owner, "shots", v) for v in value)
        if lo > hi:
            raise ValueError(f"{owner}: expected a shots range [lo, hi] with lo <= hi, got [{lo}, {hi}].")
        return lo, hi
    k = _positive_int(owner, "shots", value)
    return k, k


def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


class TaskFamily:
    """A distribution over tasks. Subclasses set ``x_dim``, ``y_dim``, ``classification`` and implement
    :meth:`sample_params`, :meth:`sample_inputs` and :meth:`target`."""

    x_dim: int = 1
    y_dim: int = 1
    classification: bool = False

    def __init__(self, shots: int | Sequence[int] = 10, queries: int = 10) -> None:
        name = type(self).__name__
        self._shot_range = _shot_range(name, shots)
        lo, hi = self._shot_range
        #: support examples per task: an int, or ``(lo, hi)`` when each meta-batch draws its own K
        self.shots: int | tuple[int, int] = lo if lo == hi else (lo, hi)
        self.queries = _positive_int(name, "queries", queries)

    def sample_params(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        raise NotImplementedError

    def sample_inputs(self, n: int, m: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def target(self, info: dict[str, Tensor], x: Tensor) -> Tensor:
        """Noise-free targets of the tasks in ``info`` at inputs ``x [B, N, x_dim]``."""
        raise NotImplementedError

    def noise(self, y: Tensor, generator: torch.Generator) -> Tensor:
        return y

    def sample(self, n: int, generator: torch.Generator) -> TaskBatch:
        """``n`` tasks with ``shots`` support and ``queries`` query examples each (float32, CPU).

        With a range of shots, the meta-batch draws one K uniformly from ``[lo, hi]`` (as neural processes
        draw context sizes), so a learner trained on it works across support-set sizes.
        """
        _positive_int(type(self).__name__, "the number of tasks", n)
        lo, hi = self._shot_range
        k = lo if lo == hi else int(torch.randint(lo, hi + 1, (1,), generator=generator))
        info = self.sample_params(n, generator)
        x = self.sample_inputs(n, k + self.queries, generator)
        y = self.noise(self.target(info, x), generator)
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:], info)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shots={self.shots}, queries={self.queries})"


class Sinusoid(TaskFamily):
    """``y = A sin(x - phi)``, ``A ~ U[0.1, 5]``, ``phi ~ U[0, pi]``, ``x ~ U[-5, 5]`` (Finn et al. 2017, 5.1)."""

    amplitude = (0.1, 5.0)
    phase = (0.0, math.pi)
    x_range = (-5.0, 5.0)

    def sample_params(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        return {
            "amplitude": _uniform(generator, (n,), *self.amplitude),
            "phase": _uniform(generator, (n,), *self.phase),
        }

    def sample_inputs(self, n: int, m: int, generator: torch.Generator) -> Tensor:
        return _uniform(generator, (n, m, 1), *self.x_range)

    def target(self, info: dict[str, Tensor], x: Tensor) -> Tensor:
        return info["amplitude"][:, None, None] * torch.sin(x - info["phase"][:, None, None])


class LinearRegression(TaskFamily):
    """``y = w.x + b + eps`` with ``w ~ N(0, I_d)``, ``b ~ N(0, 1)``, ``x ~ N(0, I_d)``, ``eps ~ N(0, noise^2)``.

    The worked example of the mapping learner (:class:`allmap.HyperNetwork` maps the data set to ``(w, b)``).
    """

    def __init__(self, dim: int = 8, shots: int | Sequence[int] = 10, queries: int = 10, noise: float = 0.1) -> None:
        super().__init__(shots, queries)
        self.x_dim = _positive_int("LinearRegression", "dim", dim)
        if noise < 0:
            raise ValueError(f"LinearRegression: expected noise >= 0, got {noise}.")
        self.noise_std = float(noise)

    def sample_params(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        return {"weight": torch.randn(n, self.x_dim, generator=generator), "bias": torch.randn(n, generator=generator)}

    def sample_inputs(self, n: int, m: int, generator: torch.Generator) -> Tensor:
        return torch.randn(n, m, self.x_dim, generator=generator)

    def target(self, info: dict[str, Tensor], x: Tensor) -> Tensor:
        return (x @ info["weight"][:, :, None]) + info["bias"][:, None, None]

    def noise(self, y: Tensor, generator: torch.Generator) -> Tensor:
        return y + self.noise_std * torch.randn(y.shape, generator=generator)


class Logistic2D(TaskFamily):
    """2-D binary classification: ``P(y = 1 | x) = sigmoid(scale * (w.x + b))`` with ``w ~ N(0, I_2)``,
    ``b ~ N(0, 0.25)``, ``x ~ N(0, I_2)``; labels are drawn from that probability.

    ``scale`` sets how clean the boundary is (large: nearly separable).
    """

    x_dim = 2
    y_dim = 2
    classification = True

    def __init__(self, shots: int | Sequence[int] = 10, queries: int = 10, scale: float = 4.0) -> None:
        super().__init__(shots, queries)
        self.scale = float(scale)

    def sample_params(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        return {"weight": torch.randn(n, 2, generator=generator), "bias": 0.5 * torch.randn(n, generator=generator)}

    def sample_inputs(self, n: int, m: int, generator: torch.Generator) -> Tensor:
        return torch.randn(n, m, 2, generator=generator)

    def target(self, info: dict[str, Tensor], x: Tensor) -> Tensor:
        """The true logit ``scale * (w.x + b)`` of class 1."""
        return self.scale * ((x @ info["weight"][:, :, None])[..., 0] + info["bias"][:, None])

    def noise(self, logit: Tensor, generator: torch.Generator) -> Tensor:
        return (torch.rand(logit.shape, generator=generator) < torch.sigmoid(logit)).long()


FAMILIES: dict[str, type[TaskFamily]] = {
    "sinusoid": Sinusoid,
    "linreg": LinearRegression,
    "logistic2d": Logistic2D,
    "omniglot": Omniglot,
    "imagefolder": ImageFolder,
    "gp": GPRegression,
    "omniglot-oml": OMLTrajectories,
    "sine-incremental": IncrementalSine,
}
