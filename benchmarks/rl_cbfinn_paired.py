"""Meta-RL runs on cbfinn/maml_rl's own 40 test goals, paired goal by goal with its published returns.

cbfinn/maml_rl's test script (``maml_examples/test_maml_point.py``) draws its goals with
``np.random.seed(1); np.random.uniform(-0.5, 0.5, size=(40, 2))`` and pickles each goal's mean return after
0..4 steps (``icml/icml_point_results_*.pkl``). This script scores allmap runs on those goals with the test of
the run's config (its step sizes and step budget) and prints, per step count, both means ± 95% CI and the
paired difference ours - theirs ± 95% CI over the goals: a far tighter comparison than two sets of goals.

    git clone https://github.com/cbfinn/maml_rl /tmp/maml_rl
    python benchmarks/rl_cbfinn_paired.py --authors /tmp/maml_rl \\
        runs/cb-maml:maml runs/cb-pre:sens0 runs/cb-oracle:oracle

Each argument is ``RUN_DIR:NAME`` with NAME the pickle's suffix (``maml``, ``sens0`` for the pretrained
policy, ``random``, ``oracle``); an oracle run is scored at step 0 only.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np
import torch

from allmap.app.rl_train import load_rl
from allmap.app.runs import read_config
from allmap.rl import adaptation_returns


def authors_goals() -> torch.Tensor:
    return torch.tensor(np.random.RandomState(1).uniform(-0.5, 0.5, size=(40, 2)), dtype=torch.float32)


def ci95(x: np.ndarray) -> float:
    return float(1.96 * x.std() / np.sqrt(len(x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors", type=Path, required=True, help="a checkout of cbfinn/maml_rl")
    parser.add_argument("runs", nargs="+", help="RUN_DIR:NAME pairs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    goals = authors_goals()
    print("| run | steps | allmap | cbfinn/maml_rl | paired difference | medians |")
    print("|---|---|---|---|---|---|")
    for pair in args.runs:
        run, name = pair.rsplit(":", 1)
        with open(args.authors / "icml" / f"icml_point_results_{name}.pkl", "rb") as f:
            theirs = np.array(pickle.load(f, encoding="latin1")["task_avg_returns"])
        learner, env = load_rl(run)
        ev = read_config(run)["eval"]  # the run's own test settings
        steps = [0] if len(theirs) == 1 else list(ev["steps"])
        lrs, budget = ev.get("inner_lrs"), ev.get("step_budget")
        ours, _ = adaptation_returns(learner, env, goals, ev["trajectories"], steps, ev["seed"], lrs=lrs, budget=budget)
        for k, row in zip(steps, ours.double().numpy()):
            diff = row - theirs[k]
            print(
                f"| {run} | {k} | {row.mean():.2f} ± {ci95(row):.2f} | {theirs[k].mean():.2f} ± {ci95(theirs[k]):.2f} "
                f"| {diff.mean():+.2f} ± {ci95(diff):.2f} | {np.median(row):.2f} / {np.median(theirs[k]):.2f} |"
            )


if __name__ == "__main__":
    main()
