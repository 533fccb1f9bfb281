"""Gaussian-process regression tasks and their exact posterior predictive, the oracle of neural processes.

Each task is a function drawn from a GP with a squared-exponential kernel,
``k(x, x') = scale^2 exp(-|x - x'|^2 / (2 length_scale^2))``, observed with Gaussian noise of std ``noise``
at ``x ~ U(x_range)``. The protocol is that of the DeepMind neural-processes notebooks
(conditional_neural_process.ipynb, attentive_neural_process.ipynb): length scale 0.4, scale 1.0, noise std
0.02, ``x ~ U(-2, 2)``; each meta-batch draws a number of context points (3..9) and of further target points
(2..9); the targets are the context points followed by the further points, so ``query_x`` starts with
``support_x``. The random-kernel variant of the ANP notebook draws each task's length scale from U(0.1, 0.6)
and scale from U(0.1, 1.0) (give ranges for ``length_scale`` and ``scale``).

:func:`gp_posterior` is the exact posterior predictive of the true kernel in float64; evaluation compares a
learner's predictive distribution with it on the same test tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from allmap.checks import check_int
from allmap.tasks.batch import TaskBatch

__all__ = ["GPRegression", "gp_posterior", "se_kernel"]


def _range(owner: str, name: str, value: float | Sequence[float], positive: bool = True) -> tuple[float, float]:
    """``(lo, hi)`` of a number or a ``[lo, hi]`` range, checked."""
    lo, hi = (value, value) if isinstance(value, (int, float)) else tuple(value)  # type: ignore[misc]
    if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float))) or isinstance(lo, bool) or lo > hi:
        raise ValueError(f"{owner}: expected {name} as a number or a range [lo, hi] with lo <= hi, got {value!r}.")
    if positive and lo <= 0:
        raise ValueError(f"{owner}: expected {name} > 0, got {value!r}.")
    return float(lo), float(hi)


def _count_range(owner: str, name: str, value: int | Sequence[int], low: int) -> tuple[int, int]:
    lo, hi = (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[misc]
    lo, hi = check_int(owner, name, lo, low), check_int(owner, name, hi, low)
    if lo > hi:
        raise ValueError(f"{owner}: expected {name} as an integer or a range [lo, hi] with lo <= hi, got {value!r}.")
    return lo, hi


def se_kernel(x1: Tensor, x2: Tensor, length_scale: Tensor, scale: Tensor) -> Tensor:
    """Squared-exponential kernel ``[B, N1, N2]`` of inputs ``[B, N1, d]`` and ``[B, N2, d]``, with one
    ``length_scale [B]`` and ``scale [B]`` per task."""
    d2 = ((x1[:, :, None, :] - x2[:, None, :, :]) / length_scale[:, None, None, None]).pow(2).sum(-1)
    return scale[:, None, None].pow(2) * torch.exp(-0.5 * d2)


def gp_posterior(
    context_x: Tensor, context_y: Tensor, x: Tensor, length_scale: Tensor, scale: Tensor, noise: float
) -> tuple[Tensor, Tensor]:
    """Exact GP posterior predictive of noisy observations ``y`` at ``x``, given the context, in float64.

    ``mean = K_xc (K_cc + s^2 I)^-1 y_c`` and ``var = k(x, x) + s^2 - diag(K_xc (K_cc + s^2 I)^-1 K_cx)``
    with ``s = noise`` (Rasmussen & Williams 2006, eq. 2.23-2.24, plus the observation noise of a new ``y``).
    Shapes: ``context_x [B, Nc, d]``, ``context_y [B, Nc, 1]``, ``x [B, N, d]``; returns ``(mean, std)``,
    each ``[B, N, 1]``, float64.
    """
    cx, cy, x = context_x.double(), context_y.double(), x.double()
    ls, sf = length_scale.double(), scale.double()
    eye = torch.eye(cx.shape[1], dtype=torch.float64, device=cx.device)
    chol = torch.linalg.cholesky(se_kernel(cx, cx, ls, sf) + noise**2 * eye)
    k_xc = se_kernel(x, cx, ls, sf)  # [B, N, Nc]
    mean = k_xc @ torch.cholesky_solve(cy, chol)
    v = torch.linalg.solve_triangular(chol, k_xc.transpose(1, 2), upper=False)  # L^-1 K_cx  [B, Nc, N]
    var = sf[:, None].pow(2) + noise**2 - v.pow(2).sum(1)  # [B, N]
    return mean, var.clamp_min(noise**2).sqrt().unsqueeze(-1)


class GPRegression:
    """Regression tasks drawn from a Gaussian process (see the module docstring).

    Args:
        context: context points per task, an integer or a range ``[lo, hi]`` (one count per meta-batch).
        targets: further target points per task, beyond the context (the targets include the context).
        length_scale: the kernel's length scale, or a range ``[lo, hi]`` to draw one per task.
        scale: the kernel's signal scale (std of the function), or a range to draw one per task.
        noise: std of the observation noise.
        x_range: inputs are uniform on ``[lo, hi)``.

    Example:
        >>> tasks = GPRegression().sample(64, torch.Generator().manual_seed(0))
        >>> torch.equal(tasks.query_x[:, : tasks.shots], tasks.support_x)
        True
    """

    x_dim = 1
    y_dim = 1
    classification = False

    def __init__(
        self,
        context: int | Sequence[int] = (3, 9),
        targets: int | Sequence[int] = (2, 9),
        length_scale: float | Sequence[float] = 0.4,
        scale: float | Sequence[float] = 1.0,
        noise: float = 0.02,
        x_range: Sequence[float] = (-2.0, 2.0),
    ) -> None:
        name = type(self).__name__
        self.context = _count_range(name, "context", context, 1)
        self.targets = _count_range(name, "targets", targets, 0)
        self.length_scale = _range(name, "length_scale", length_scale)
        self.scale = _range(name, "scale", scale)
        if not (isinstance(noise, (int, float)) and noise > 0):
            raise ValueError(f"{name}: expected noise (the observation noise std) > 0, got {noise!r}.")
        self.noise = float(noise)
        self.x_range = _range(name, "x_range", x_range, positive=False)
        if self.x_range[0] == self.x_range[1]:
            raise ValueError(f"{name}: expected x_range [lo, hi] with lo < hi, got {list(x_range)!r}.")
        lo, hi = self.context
        self.shots: int | tuple[int, int] = lo if lo == hi else (lo, hi)
        #: the most target points of a task (context + further targets), for memory checks
        self.queries = hi + self.targets[1]

    def describe(self) -> str:
        """The protocol in words, for the line that heads evaluation results."""

        def span(r: tuple[float, float]) -> str:
            return f"{r[0]:g}" if r[0] == r[1] else f"U({r[0]:g}, {r[1]:g})"

        return (
            f"squared-exponential kernel with length scale {span(self.length_scale)} and scale "
            f"{span(self.scale)}, noise std {self.noise:g}, x ~ U({self.x_range[0]:g}, {self.x_range[1]:g})"
        )

    def counts(self) -> str:
        """How many points a task has, in words."""
        c, t = self.context, self.targets
        return (
            f"{c[0]}..{c[1]} context points and {t[0]}..{t[1]} further targets per task (the targets include the "
            "context)"
        )

    def _draw(self, generator: torch.Generator, r: tuple[float, float], n: int) -> Tensor:
        return r[0] + (r[1] - r[0]) * torch.rand(n, generator=generator, dtype=torch.float64)

    def _count(self, r: tuple[int, int], generator: torch.Generator) -> int:
        return r[0] if r[0] == r[1] else int(torch.randint(r[0], r[1] + 1, (1,), generator=generator))

    def sample_functions(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """Noisy observations ``y [B, N, 1]`` (float32) at ``x [B, N, 1]`` of ``B`` functions drawn from the GP
        (Cholesky factor in float64), and their kernel parameters ``info``."""
        n = x.shape[0]
        info = {
            "length_scale": self._draw(generator, self.length_scale, n).float(),
            "scale": self._draw(generator, self.scale, n).float(),
        }
        xd = x.double()
        eye = torch.eye(x.shape[1], dtype=torch.float64)
        k = se_kernel(xd, xd, info["length_scale"].double(), info["scale"].double()) + self.noise**2 * eye
        eps = torch.randn(n, x.shape[1], 1, generator=generator, dtype=torch.float64)
        return (torch.linalg.cholesky(k) @ eps).float(), info

    def sample_sized(self, n: int, context: int, targets: int, generator: torch.Generator) -> TaskBatch:
        """``n`` tasks of ``context`` context points and ``context + targets`` target points."""
        x = self.x_range[0] + (self.x_range[1] - self.x_range[0]) * torch.rand(
            n, context + targets, 1, generator=generator
        )
        y, info = self.sample_functions(x, generator)
        return TaskBatch(x[:, :context], y[:, :context], x, y, info)

    def sample(self, n: int, generator: torch.Generator) -> TaskBatch:
        """A meta-batch of ``n`` tasks with one context count and one target count (as the notebooks draw)."""
        check_int(type(self).__name__, "the number of tasks", n)
        nc = self._count(self.context, generator)
        return self.sample_sized(n, nc, self._count(self.targets, generator), generator)

    def fixed_tasks(self, n: int, generator: torch.Generator) -> list[TaskBatch]:
        """``n`` test tasks, each with its own context and target counts, grouped into one batch per
        ``(context, targets)`` pair (a batch holds tasks of one size), in a fixed order."""
        check_int(type(self).__name__, "the number of tasks", n)
        sizes = [(self._count(self.context, generator), self._count(self.targets, generator)) for _ in range(n)]
        return [self.sample_sized(sizes.count(s), *s, generator) for s in sorted(set(sizes))]

    def grid_tasks(self, n: int, generator: torch.Generator, points: int = 400) -> TaskBatch:
        """``n`` tasks for plots, as the notebooks' test mode: the targets are ``points`` inputs on a grid over
        ``x_range`` and the context a random subset of them."""
        lo, hi = self.x_range
        x = (lo + (hi - lo) * torch.arange(points) / points).view(1, points, 1).expand(n, points, 1).contiguous()
        y, info = self.sample_functions(x, generator)
        nc = self._count(self.context, generator)
        idx = torch.stack([torch.randperm(points, generator=generator)[:nc] for _ in range(n)])[..., None]
        return TaskBatch(x.gather(1, idx), y.gather(1, idx), x, y, info)

    def oracle(self, context_x: Tensor, context_y: Tensor, x: Tensor, info: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The exact posterior predictive ``(mean, std)`` of the true kernel (:func:`gp_posterior`), float64."""
        return gp_posterior(context_x, context_y, x, info["length_scale"], info["scale"], self.noise)

    def __repr__(self) -> str:
        return (
            f"GPRegression(context={list(self.context)}, targets={list(self.targets)}, "
            f"length_scale={list(self.length_scale)}, scale={list(self.scale)}, noise={self.noise})"
        )
