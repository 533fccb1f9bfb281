"""PNG plots of AutoML runs: hyperparameter trajectories and validation loss against process CPU time beside
the baselines, written into the run folder (one set per experiment; seed 0's curves, the other seeds faint)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["PLOTS"]

Seeds = list[dict[str, Any]]


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _each_seed(per_seed: Seeds, key: str):
    """``(alpha, curves)`` for every seed: seed 0 opaque, the others faint."""
    for i, r in enumerate(per_seed):
        yield (1.0 if i == 0 else 0.25), r["curves"][key]


def plot_hd(config: dict[str, Any], per_seed: Seeds, out: Path) -> None:
    """``hd_learning_rate.png``: the rate of HD-SGD and HD-Adam per epoch; ``hd_val_loss.png``: validation loss
    against CPU seconds for the four optimizers of each model."""
    models = list(config["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), layout="constrained", squeeze=False)
    fig2, axes2 = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), layout="constrained", squeeze=False)
    colors = {"sgd": "C0", "hdsgd": "C1", "adam": "C2", "hdadam": "C3"}
    for ax, ax2, model in zip(axes[0], axes2[0], models):
        for opt, color in colors.items():
            for alpha, c in _each_seed(per_seed, f"{model}/{opt}"):
                label = opt if alpha == 1.0 else None
                if opt.startswith("hd"):
                    ax.plot(range(1, len(c["lr"]) + 1), c["lr"], color=color, alpha=alpha, label=label)
                ax2.plot(c["cpu_seconds"], c["val_loss"], color=color, alpha=alpha, label=label)
        ax.set(title=f"{model}: learned step size", xlabel="epoch", ylabel="learning rate", yscale="log")
        ax2.set(title=f"{model}: validation loss", xlabel="process CPU seconds", ylabel="cross-entropy", yscale="log")
        ax.legend()
        ax2.legend()
    _save(fig, out / "hd_learning_rate.png")
    _save(fig2, out / "hd_val_loss.png")


def plot_bilevel(config: dict[str, Any], per_seed: Seeds, out: Path) -> None:
    """``hyper_trajectories.png``: each learned hyperparameter per outer step; ``val_loss_vs_time.png``: the
    learned run, the untuned run and the search (best validation loss so far against cumulative CPU time)."""
    first = per_seed[0]["curves"]
    names = list(first["learned"]["hyper"][0])
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for i, name in enumerate(names[:12]):
        ax.plot([h[name] for h in first["learned"]["hyper"]], color=f"C{i % 10}", label=name)
    ax.set(title="learned hyperparameters (seed 0)", xlabel="outer step", yscale="log")
    ax.legend(fontsize=7)
    _save(fig, out / "hyper_trajectories.png")
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for alpha, c in _each_seed(per_seed, "learned"):
        ax.plot(c["cpu_seconds"], c["val_loss"], color="C1", alpha=alpha, label="learned" if alpha == 1 else None)
    for alpha, c in _each_seed(per_seed, "untuned"):
        ax.plot(c["cpu_seconds"], c["val_loss"], color="C0", alpha=alpha, label="untuned" if alpha == 1 else None)
    for alpha, runs in _each_seed(per_seed, "search"):
        best = [min(r["val_loss"] for r in runs[: i + 1]) for i in range(len(runs))]
        label = f"{config['search'].get('kind', 'grid')} search (best so far)" if alpha == 1 else None
        ax.step([r["cpu"] for r in runs], best, where="post", color="C2", alpha=alpha, marker=".", label=label)
    ax.set(xlabel="process CPU seconds", ylabel="validation cross-entropy", xscale="log", yscale="log")
    ax.legend()
    _save(fig, out / "val_loss_vs_time.png")


def plot_reweight(config: dict[str, Any], per_seed: Seeds, out: Path) -> None:
    """``reweight_val_accuracy.png``: validation accuracy against CPU seconds, plain and reweighted."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for name, color in (("plain", "C0"), ("reweighted", "C1")):
        for alpha, c in _each_seed(per_seed, name):
            ax.plot(c["cpu_seconds"], c["val_accuracy"], color=color, alpha=alpha, label=name if alpha == 1 else None)
    ax.set(
        title=f"{round(100 * config['noise'])}% of training labels flipped",
        xlabel="process CPU seconds",
        ylabel="clean validation accuracy",
    )
    ax.legend()
    _save(fig, out / "reweight_val_accuracy.png")


def plot_darts(config: dict[str, Any], per_seed: Seeds, out: Path) -> None:
    """``darts_alphas.png``: the mean softmax weight of each operation per search epoch; ``darts_vs_random.png``:
    the random cells' test accuracy against cumulative CPU time, with the DARTS cells and their search time."""
    from allmap.automl.darts import OPS

    first = per_seed[0]["curves"]
    orders = config["orders"]
    fig, axes = plt.subplots(1, len(orders), figsize=(5 * len(orders), 3.6), layout="constrained", squeeze=False)
    for ax, order in zip(axes[0], orders):
        alphas = first[f"darts{order}"]["alphas"]  # [epoch][edge][op]
        for o, name in enumerate(OPS):
            ax.plot([sum(e[o] for e in epoch) / len(epoch) for epoch in alphas], label=name)
        ax.set(title=f"DARTS order {order}: mean op weight (seed 0)", xlabel="search epoch", ylabel="softmax(alpha)")
        ax.legend(fontsize=7)
    _save(fig, out / "darts_alphas.png")
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for i, r in enumerate(per_seed):
        pool = r["curves"]["random"]
        ax.scatter(
            [c["cpu"] for c in pool],
            [c["test_accuracy"] for c in pool],
            s=8,
            color="C0",
            alpha=0.5,
            label="random cells" if i == 0 else None,
        )
        for order in orders:
            m = r["metrics"]
            ax.scatter(
                [m[f"darts{order}/search_cpu_seconds"]],
                [m[f"darts{order}/test_accuracy"]],
                marker="*",
                s=80,
                color=f"C{order}",
                label=f"DARTS order {order}" if i == 0 else None,
            )
    ax.set(xlabel="cumulative process CPU seconds", ylabel="test accuracy")
    ax.legend()
    _save(fig, out / "darts_vs_random.png")


PLOTS: dict[str, Callable[[dict[str, Any], Seeds, Path], None]] = {
    "hd": plot_hd,
    "bilevel": plot_bilevel,
    "reweight": plot_reweight,
    "darts": plot_darts,
}
