"""PNG plots of a run: the learning curve, and what the adapted models do on a few test tasks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from allmap.app.episode_plot import plot_episode, plot_episodes  # noqa: E402
from allmap.app.predictive_plot import plot_predictive  # noqa: E402
from allmap.learners.base import Learner  # noqa: E402
from allmap.tasks.batch import TaskBatch  # noqa: E402
from allmap.tasks.episodes import Episodes  # noqa: E402
from allmap.tasks.families import LinearRegression, Logistic2D, Sinusoid  # noqa: E402

__all__ = ["plot_learning_curve", "learning_curve_figure", "plot_adaptation", "ADAPTATION_PLOTS"]


def learning_curve_figure(rows: Sequence[dict[str, Any]], title: str = ""):
    """The figure of :func:`plot_learning_curve`: every logged row is drawn (a short run's few points get
    markers, so one logged point shows as a dot, not as an invisible line)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    train = [r for r in rows if "loss" in r]
    marker = "o" if len(train) <= 50 else None
    ax.plot(
        [r["iteration"] for r in train],
        [r["loss"] for r in train],
        marker=marker,
        ms=3,
        lw=1,
        label="train (query loss)",
    )
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["iteration"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, label="validation loss")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole numbers, even over a short run
    losses = [r["loss"] for r in train] + [r["val_loss"] for r in val]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 10:  # log scale only where it helps
        ax.set_yscale("log")
    acc = [r for r in rows if "val_accuracy" in r]
    top = ax
    if acc:
        top = ax.twinx()
        top.plot(
            [r["iteration"] for r in acc],
            [100 * r["val_accuracy"] for r in acc],
            "s--",
            ms=3,
            color="C2",
            label="validation accuracy",
        )
        top.set_ylabel("accuracy (%)")
    handles = [h for a in dict.fromkeys([ax, top]) for h in a.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)  # hides no point
    ax.set_title(title or "learning curve")
    ax.grid(alpha=0.3)
    return fig


def plot_learning_curve(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Training loss (and validation metrics where logged) against meta-iterations, saved as a PNG."""
    fig = learning_curve_figure(rows, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _models(learner: Learner, tasks: TaskBatch, i: int, steps: Sequence[int]):
    return learner.adapt_path(tasks.support_x[i], tasks.support_y[i], steps)


def _plot_sinusoid(learner: Learner, family: Sinusoid, tasks: TaskBatch, steps: Sequence[int], ax, i: int) -> None:
    x = torch.linspace(*family.x_range, 200, device=tasks.support_x.device).view(-1, 1)
    info = {k: v[i : i + 1] for k, v in tasks.info.items()}
    ax.plot(x.cpu(), family.target(info, x[None])[0].cpu(), "k-", lw=2, label="true function")
    for k, model in zip(steps, _models(learner, tasks, i, steps)):
        ax.plot(x.cpu(), model(x).detach().cpu(), "--", lw=1.2, label=f"after {k} step{'s' * (k != 1)}")
    ax.plot(tasks.support_x[i].cpu(), tasks.support_y[i].cpu(), "r^", ms=7, label=f"support (K={tasks.shots})")


def _plot_linreg(
    learner: Learner, family: LinearRegression, tasks: TaskBatch, steps: Sequence[int], ax, i: int
) -> None:
    info = {k: v[i : i + 1] for k, v in tasks.info.items()}
    true = family.target(info, tasks.query_x[i : i + 1])[0].flatten().cpu()
    for k, model in zip(steps, _models(learner, tasks, i, steps)):
        ax.plot(true, model(tasks.query_x[i]).detach().flatten().cpu(), "o", ms=3, label=f"after {k} steps")
    lim = float(true.abs().max()) * 1.1
    ax.plot([-lim, lim], [-lim, lim], "k-", lw=1, label="ideal")
    ax.set_xlabel("true w.x + b")
    ax.set_ylabel("prediction")


def _plot_logistic(learner: Learner, family: Logistic2D, tasks: TaskBatch, steps: Sequence[int], ax, i: int) -> None:
    g = torch.linspace(-3, 3, 120, device=tasks.support_x.device)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], 1)
    info = {k: v[i : i + 1] for k, v in tasks.info.items()}
    ax.contour(gx.cpu(), gy.cpu(), family.target(info, grid[None])[0].view(120, 120).cpu(), levels=[0], colors="k")
    model = _models(learner, tasks, i, [steps[-1]])[0]
    p = torch.softmax(model(grid).detach(), -1)[:, 1].view(120, 120).cpu()
    ax.contourf(gx.cpu(), gy.cpu(), p, levels=[0, 0.5, 1], colors=["#c6dbef", "#fdd0a2"], alpha=0.6)
    sx, sy = tasks.support_x[i].cpu(), tasks.support_y[i].cpu()
    ax.scatter(sx[:, 0], sx[:, 1], c=sy, cmap="coolwarm", edgecolors="k", s=30, label=f"support (K={tasks.shots})")
    ax.set_title(f"task {i}: true boundary (line), adapted after {steps[-1]} steps (shade)", fontsize=7)


ADAPTATION_PLOTS = {
    Sinusoid: _plot_sinusoid,
    LinearRegression: _plot_linreg,
    Logistic2D: _plot_logistic,
    Episodes: plot_episode,
}


def plot_adaptation(
    learner: Learner, family, tasks: TaskBatch, path: str | Path, steps: Sequence[int] = (0, 1, 10), n: int = 4
) -> bool:
    """Adapted predictions against the true function on the first ``n`` tasks; False if the family has none.
    Predictive learners on 1-d regression (GP tasks, sinusoids) draw their predictive mean ± 2 std instead
    (:func:`~allmap.app.predictive_plot.plot_predictive`), beside the exact GP posterior where there is one."""
    if learner.spec.predictive and getattr(family, "x_dim", None) == 1 and hasattr(family, "x_range"):
        plot_predictive(learner, family, tasks, path)
        return True
    plot = next((fn for cls, fn in ADAPTATION_PLOTS.items() if isinstance(family, cls)), None)
    if plot is None:
        return False
    if not learner.spec.adapts_in_steps:
        steps = [0]
    if isinstance(family, Episodes):  # image episodes: a grid of episodes, one row per class
        plot_episodes(learner, family, tasks, path, steps, n)
        return True
    n = min(n, len(tasks))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
    for i, ax in enumerate(axes[0]):
        plot(learner, family, tasks, steps, ax, i)
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{type(learner).__name__} on {type(family).__name__} test tasks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
