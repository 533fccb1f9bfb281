"""The regression presets' figures: MAML's sinusoid protocol, Meta-SGD and the mapping learner against MAML.

    python benchmarks/regression_protocols.py --runs runs/bench           # full presets (about 25 min on 2 cores)
    python benchmarks/regression_protocols.py --runs /tmp/smoke --smoke   # seconds; what the tests call

Trains each preset into RUNS/NAME (skipped if RUNS/NAME/results.json exists), then prints one table:
test loss after 0/1/5/10 inner steps at 5 and 10 shots (mean ± 95% CI over 600 fixed tasks), wall-clock
training time, and how close the mapping learner's one-shot output is to the least-squares solution when
the support set is large.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import allmap
from allmap.app import load_config, train
from allmap.app.build import build_family
from allmap.engine.evaluate import evaluate, fixed_tasks

PRESETS = [
    "sinusoid-maml",
    "sinusoid-maml-5shot",
    "sinusoid-metasgd",
    "linreg-hypernet",
    "linreg-maml",
    "logistic2d-metasgd",
]
SMOKE = ["iterations=30", "log_every=10", "checkpoint_every=30", "eval.every=30", "eval.val_tasks=10"]


def run(name: str, runs: Path, smoke: bool) -> Path:
    out = runs / name
    if (out / "results.json").is_file():
        return out
    train(load_config(name, SMOKE if smoke else []), out, progress=False)
    return out


def train_seconds(out: Path) -> float:
    """Wall-clock seconds of meta-training, as logged by the run (resumed runs included)."""
    rows = allmap.app.RunDir(out).read_metrics()
    return rows[-1]["seconds"] if rows else float("nan")


def score(out: Path, shots: int | None, tasks: int) -> dict[str, dict[str, float]]:
    config = load_config(out / "config.yaml", [f"eval.shots={shots}"] if shots else [])
    learner = allmap.load(out)
    family = build_family(config, "test")
    return evaluate(learner, fixed_tasks(family, tasks, config["eval"]["seed"]), steps=config["eval"]["steps"])


def least_squares_gap(out: Path, shots: int, tasks: int) -> dict[str, float]:
    """Mean relative distance of the adapted (w, b) to the least-squares fit on a support set of ``shots``."""
    learner = allmap.load(out)
    config = load_config(out / "config.yaml")
    dim = config["task"]["dim"]
    family = allmap.tasks.LinearRegression(dim=dim, shots=shots, queries=1, noise=config["task"]["noise"])
    batch = fixed_tasks(family, tasks, 7)
    gaps, truth_gaps = [], []
    for i in range(tasks):  # inner gradients still flow under no_grad (torch.func.grad ignores it)
        x, y = batch.support_x[i], batch.support_y[i]
        design = torch.cat([x, torch.ones(shots, 1)], 1).double()
        ls = torch.linalg.lstsq(design, y.double()).solution.flatten()
        with torch.no_grad():
            params = learner.adapt(x, y).params
        got = torch.cat([params["head.weight"].flatten(), params["head.bias"].flatten()]).double()
        truth = torch.cat([batch.info["weight"][i], batch.info["bias"][i : i + 1]]).double()
        gaps.append(float((got - ls).norm() / ls.norm()))
        truth_gaps.append(float((ls - truth).norm() / truth.norm()))
    return {"adapted_vs_ls": sum(gaps) / tasks, "ls_vs_truth": sum(truth_gaps) / tasks}


def fmt(r: dict[str, float]) -> str:
    return f"{r['mean']:.3f} ± {r['ci95']:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/bench", help="folder for the run folders")
    p.add_argument("--smoke", action="store_true", help="30 iterations per preset, 50 test tasks (for tests)")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    n = 50 if args.smoke else 600
    outs = {name: run(name, runs, args.smoke) for name in PRESETS}

    print("| run | shots | loss@0 | loss@1 | loss@5 | loss@10 | train time (s) |")
    print("|---|---|---|---|---|---|---|")
    for name in PRESETS:
        seconds = train_seconds(outs[name])
        shot_list = [5, 10] if name in ("sinusoid-maml", "sinusoid-metasgd") else [None]
        for shots in shot_list:
            res = score(outs[name], shots, n)
            key = "accuracy" if "accuracy@0" in res else "loss"
            scale = 100.0 if key == "accuracy" else 1.0
            cells = [fmt({k: v * scale for k, v in res[f"{key}@{s}"].items()}) for s in (0, 1, 5, 10)]
            label = name + (" (accuracy, %)" if key == "accuracy" else "")
            config = load_config(outs[name] / "config.yaml")
            print(
                f"| {label} | {shots or config['eval']['shots'] or config['task']['shots']} | "
                + " | ".join(cells)
                + f" | {seconds:.1f} |"
            )
    gap = least_squares_gap(outs["linreg-hypernet"], shots=100, tasks=n)
    gap_maml = least_squares_gap(outs["linreg-maml"], shots=100, tasks=n)
    print()
    print("linear regression, support of 100 points: mean relative distance to the least-squares (w, b)")
    print(f"  mapping learner, one forward pass:  {gap['adapted_vs_ls']:.4f}")
    print(f"  MAML after its 5 inner steps:       {gap_maml['adapted_vs_ls']:.4f}")
    print(f"  (least squares vs the true (w, b):  {gap['ls_vs_truth']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
