"""PNG plots of a meta-RL run: returns during meta-training, return against adaptation steps (the method and
its baselines, mean ± 95% CI), and trajectories before and after adaptation for a few test goals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import Tensor  # noqa: E402

from allmap.rl import Trajectories  # noqa: E402

__all__ = ["plot_rl_curve", "plot_returns", "plot_trajectories"]


def plot_rl_curve(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Mean return of the meta-batch before and after adaptation against meta-iterations."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    rows = [r for r in rows if "return_pre" in r]
    its = [r["iteration"] for r in rows]
    ax.plot(its, [r["return_pre"] for r in rows], lw=1, label="before adaptation")
    if rows and "return_post" in rows[0]:
        ax.plot(its, [r["return_post"] for r in rows], lw=1, label="after adaptation")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("mean return of the meta-batch")
    ax.set_title(title or "meta-training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_returns(results: Mapping[str, Mapping[str, Mapping[str, float]]], path: str | Path, title: str = "") -> None:
    """Return against policy-gradient steps, one line per method, with its 95% confidence interval."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for name, metrics in results.items():
        steps = [int(k.split("@")[1]) for k in metrics]
        means = [m["mean"] for m in metrics.values()]
        cis = [m["ci95"] for m in metrics.values()]
        if len(steps) == 1:
            ax.axhline(means[0], ls="--", lw=1, color="gray", label=f"{name} (step {steps[0]})")
        else:
            ax.errorbar(steps, means, yerr=cis, marker="o", ms=4, capsize=3, label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("policy-gradient steps on the test task")
    ax.set_ylabel("mean return (± 95% CI over test tasks)")
    ax.set_title(title or "return after adaptation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_trajectories(
    tasks: Tensor, trajs: Sequence[Trajectories], steps: Sequence[int], path: str | Path, goals: int = 4, shown: int = 5
) -> None:
    """For the first ``goals`` test goals, ``shown`` trajectories (2-D positions) of the policy after each step
    count in ``steps``: one panel per goal, one colour per step count."""
    fig, axes = plt.subplots(1, goals, figsize=(3.2 * goals, 3.4), layout="constrained", squeeze=False)
    for i, ax in enumerate(axes[0]):
        for j, (k, traj) in enumerate(zip(steps, trajs)):
            for b in range(min(shown, traj.obs.shape[2])):
                valid = traj.mask[i, :, b] > 0
                xy = traj.obs[i, valid, b].cpu()
                ax.plot(xy[:, 0], xy[:, 1], color=f"C{j}", lw=0.8, alpha=0.8, label=f"{k} steps" if b == 0 else None)
        goal = tasks[i].cpu()
        ax.plot(goal[0], goal[1], "k*", ms=12, label="goal")
        ax.plot(0, 0, "ko", ms=4)
        ax.set_xlim(-0.6, 0.6)
        ax.set_ylim(-0.6, 0.6)
        ax.set_aspect("equal")
        ax.set_title(f"test goal {i}", fontsize=9)
        if i == 0:
            ax.legend(fontsize=7, loc="lower left")
    fig.savefig(path, dpi=120)
    plt.close(fig)
