"""Plots of predictive distributions: the predictive mean ± 2 std of a learner against the truth and, for GP
tasks, against the exact GP posterior, on a grid of test tasks."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from allmap.engine.predictive import distribution_of  # noqa: E402
from allmap.learners.base import Learner  # noqa: E402
from allmap.tasks.batch import TaskBatch  # noqa: E402

__all__ = ["plot_predictive", "predictive_figure", "mixture_moments", "PLOT_SEED"]

#: the seed of the tasks drawn for plots (GP tasks on a grid of inputs)
PLOT_SEED = 1000


def mixture_moments(mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std of an equally weighted mixture of Gaussians ``[S, N, *y]`` (over the ``S`` components)."""
    m = mean.mean(0)
    var = (std.pow(2) + mean.pow(2)).mean(0) - m.pow(2)
    return m, var.clamp_min(0).sqrt()


def _plot_tasks(family, tasks: TaskBatch, n: int) -> tuple[TaskBatch, Tensor, Tensor]:
    """``(tasks, x [n, P, 1], truth [n, P, 1])``: GP families draw tasks on a grid (the truth is the sampled
    curve); other 1-d families keep ``tasks`` and evaluate their true function on a grid."""
    if callable(getattr(family, "grid_tasks", None)):
        shown = family.grid_tasks(n, torch.Generator().manual_seed(PLOT_SEED)).to(tasks.support_x.device)
        return shown, shown.query_x, shown.query_y
    shown = tasks[:n]
    lo, hi = family.x_range
    x = torch.linspace(lo, hi, 200, device=tasks.support_x.device).view(1, -1, 1).expand(len(shown), -1, -1)
    return shown, x, family.target(shown.info, x)


def predictive_figure(learner: Learner, family, tasks: TaskBatch, n: int = 6):
    """A grid of ``n`` test tasks: the context points, the truth, the learner's predictive mean ± 2 std
    (the moments of its mixture for latent-variable learners) and, where the family has an exact posterior
    (``family.oracle``), the posterior's mean ± 2 std."""
    shown, x, truth = _plot_tasks(family, tasks, n)
    n = len(shown)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, layout="constrained")
    was_training = learner.training
    learner.eval()
    try:
        for i, ax in enumerate(axes.flat):
            if i >= n:
                ax.axis("off")
                continue
            sx, sy, xi = shown.support_x[i], shown.support_y[i], x[i]
            with torch.no_grad():
                mean, std = mixture_moments(*distribution_of(learner.adapt(sx, sy), xi))
            xs = xi[:, 0].cpu()
            ax.plot(xs, truth[i][:, 0].cpu(), "k:", lw=1.5, label="truth")
            ax.plot(xs, mean[:, 0].cpu(), "C0-", lw=1.5, label=f"{type(learner).__name__} mean ± 2 std")
            lo, hi = (mean - 2 * std)[:, 0].cpu(), (mean + 2 * std)[:, 0].cpu()
            ax.fill_between(xs, lo, hi, color="C0", alpha=0.2)
            if callable(getattr(family, "oracle", None)):
                info = {k: v[i : i + 1] for k, v in shown.info.items()}
                gm, gs = family.oracle(sx[None], sy[None], xi[None], info)
                gm, gs = gm[0, :, 0].float().cpu(), gs[0, :, 0].float().cpu()
                ax.plot(xs, gm, "C3--", lw=1.2, label="GP posterior mean ± 2 std")
                ax.plot(xs, gm - 2 * gs, "C3:", lw=0.8)
                ax.plot(xs, gm + 2 * gs, "C3:", lw=0.8)
            ax.plot(sx[:, 0].cpu(), sy[:, 0].cpu(), "ko", ms=5, label="context")
            ax.set_title(f"test task {i}: {len(sx)} context points", fontsize=9)
            ax.grid(alpha=0.3)
    finally:
        learner.train(was_training)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), fontsize=8)
    fig.suptitle(f"{type(learner).__name__} on {type(family).__name__} test tasks: predictive distribution")
    return fig


def plot_predictive(learner: Learner, family, tasks: TaskBatch, path: str | Path, n: int = 6) -> None:
    """:func:`predictive_figure` saved as a PNG at ``path``."""
    fig = predictive_figure(learner, family, tasks, n)
    fig.savefig(path, dpi=120)
    plt.close(fig)
