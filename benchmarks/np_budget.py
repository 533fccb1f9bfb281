"""Neural processes against the exact GP posterior, at a budget of process CPU time.

    OMP_NUM_THREADS=1 python benchmarks/np_budget.py train --presets gp-cnp gp-anp --cpu-minutes 1 2 4 8 \\
        --out runs/np
    python benchmarks/np_budget.py compare runs/np/gp-cnp runs/np/gp-anp      # paired, on the same tasks
    python benchmarks/np_budget.py train --presets gp-cnp --cpu-minutes 0.02 --out /tmp/np --smoke  # seconds

``train`` runs each preset with the real training loop (``allmap.app.train``) and scores it on the 600 fixed
test tasks at each mark of process CPU minutes (the curve; evaluation excluded from the clock, as
benchmarks/hypergrad_budget.py, whose marks it reuses). At the last mark the run stops as on Ctrl-C (a
checkpoint is saved) and is finished by ``resume`` with ``iterations`` set to the iteration reached, so
RUN_DIR holds a complete run folder (results.json with the GP oracle's metrics beside the learner's,
adaptation.png, checkpoint.pt) that ``allmap eval`` reads.

``compare`` scores two or more run folders on their test tasks, task by task: the metrics of each with the
GP oracle's, the log-likelihood of the further targets alone (the targets that are not context points),
and the paired difference of the target log-likelihood of each run against the first (mean ± 95% CI of the
per-task differences).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hypergrad_budget import Marks  # noqa: E402

import allmap  # noqa: E402
from allmap.app.build import build_family  # noqa: E402
from allmap.app.config import load_config  # noqa: E402
from allmap.app.host import apply_host_settings  # noqa: E402
from allmap.app.trainer import Interrupted, resume, train  # noqa: E402
from allmap.engine.evaluate import evaluate_per_task, fixed_tasks, summarize, task_batches  # noqa: E402
from allmap.engine.predictive import distribution_of, mixture_metrics, oracle_per_task  # noqa: E402

SMOKE = ["eval.tasks=20", "eval.val_tasks=10"]


class StopAtLastMark(Marks):
    """:class:`Marks` that, after its last mark, stops training as SIGINT does (a checkpoint is saved)."""

    def __call__(self, iteration: int, learner) -> None:
        try:
            super().__call__(iteration, learner)
        except StopIteration:
            self.stopped_at = iteration
            os.kill(os.getpid(), signal.SIGINT)


def train_preset(preset: str, marks: list[float], out: Path, overrides: list[str]) -> list[dict]:
    config = load_config(preset, overrides)
    apply_host_settings(config)  # threads and retained memory, as `allmap train` sets them
    config["iterations"] = 10**9  # stopped at the last mark
    config["eval"]["every"] = 10**9  # no validation inside the timed training
    config["checkpoint_every"] = 10**9
    clock = StopAtLastMark(preset, config, marks, config["eval"]["tasks"], "cpu")
    try:
        train(config, out, progress=False, callback=clock)
    except Interrupted as stop:
        resume(out, [f"iterations={stop.iteration}"], progress=False)
    for row in clock.rows:
        row["cpu_per_iteration_ms"] = round(60e3 * row["cpu_minutes"] / max(row["iteration"], 1), 3)
    (out / "curve.json").write_text(json.dumps(clock.rows, indent=1) + "\n")
    return clock.rows


def further_targets_loglik(learner, tasks) -> torch.Tensor:
    """Per task: the predictive log-likelihood per point of the targets that follow the context."""
    out = []
    learner.eval()
    with torch.no_grad():
        for b in task_batches(tasks):
            k = b.shots
            for i in range(len(b)):
                model = learner.adapt(b.support_x[i], b.support_y[i])
                out.append(mixture_metrics(*distribution_of(model, b.query_x[i, k:]), b.query_y[i, k:])[0])
    return torch.stack(out).double()


def oracle_loglik(family, tasks, further: bool = False, floor: float = 0.0) -> torch.Tensor:
    """Per task: the GP posterior's log-likelihood per target point (``further``: of the targets after the
    context only), with its std raised to at least ``floor`` (the best that a model whose std is floored
    there can reach: for a Gaussian of the right mean, the right std is the best, and the floor clips it)."""
    out = []
    for b in task_batches(tasks):
        k = b.shots if further else 0
        mean, std = family.oracle(b.support_x, b.support_y, b.query_x[:, k:], b.info)
        std = std.clamp_min(floor)
        for i in range(len(b)):
            out.append(mixture_metrics(mean[i : i + 1], std[i : i + 1], b.query_y[i, k:].double())[0])
    return torch.stack(out)


def fmt(r: dict[str, float]) -> str:
    return f"{r['mean']:.4f} ± {r['ci95']:.4f}"


def compare(runs: list[Path]) -> None:
    config = load_config(runs[0] / "config.yaml")
    family = build_family(config, "test")
    tasks = fixed_tasks(family, config["eval"]["tasks"], config["eval"]["seed"])
    oracle = {k: v.double() for k, v in oracle_per_task(family, tasks).items()}
    oracle["oracle_further_loglik"] = oracle_loglik(family, tasks, further=True)
    oracle["floored_oracle_target_loglik"] = oracle_loglik(family, tasks, floor=0.1)
    oracle["floored_oracle_further_loglik"] = oracle_loglik(family, tasks, further=True, floor=0.1)
    per_run = {}
    for run in runs:
        torch.manual_seed(0)  # the ANP's Monte-Carlo draws of z
        learner = allmap.load(run)
        values = evaluate_per_task(learner, tasks, steps=[0])
        values["further_loglik"] = further_targets_loglik(learner, tasks)
        per_run[run.name] = {k: v.double() for k, v in values.items()}
        rows = json.loads((run / "curve.json").read_text()) if (run / "curve.json").is_file() else []
        done = f"{rows[-1]['iteration']} iterations, {rows[-1]['cpu_minutes']} CPU min" if rows else ""
        print(f"{run.name} ({done})")
        for key, v in per_run[run.name].items():
            print(f"  {key:<16} {fmt(summarize(v))}")
        gap = per_run[run.name]["target_loglik"] - oracle["oracle_target_loglik"]
        print(f"  gap to the GP oracle, target log-likelihood (paired): {fmt(summarize(gap))}")
        gap = per_run[run.name]["further_loglik"] - oracle["oracle_further_loglik"]
        print(f"  gap to the GP oracle, further targets only (paired):  {fmt(summarize(gap))}")
        gap = per_run[run.name]["target_loglik"] - oracle["floored_oracle_target_loglik"]
        print(f"  gap to the GP oracle with std floored at 0.1, targets (paired): {fmt(summarize(gap))}")
    print(f"GP oracle on the same {len(oracle['oracle_mse'])} tasks")
    for key, v in oracle.items():
        print(f"  {key:<30} {fmt(summarize(v))}")
    floor = -math.log(0.1) - 0.5 * math.log(2 * math.pi)
    print(f"  the std floor 0.1 caps any learner's log-likelihood per point at {floor:.4f}")
    first = runs[0].name
    for run in runs[1:]:
        diff = per_run[run.name]["target_loglik"] - per_run[first]["target_loglik"]
        print(f"paired target log-likelihood, {run.name} - {first}: {fmt(summarize(diff))}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train presets to marks of process CPU minutes")
    t.add_argument("--presets", nargs="+", required=True)
    t.add_argument("--cpu-minutes", type=float, nargs="+", required=True)
    t.add_argument("--set", dest="overrides", action="append", default=[])
    t.add_argument("--out", required=True)
    t.add_argument("--smoke", action="store_true", help="20 test tasks, to check the script runs")
    c = sub.add_parser("compare", help="score run folders task by task against the GP oracle and each other")
    c.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args(argv)
    if args.command == "compare":
        compare(args.runs)
        return 0
    out = Path(args.out)
    for preset in args.presets:
        rows = train_preset(preset, args.cpu_minutes, out / preset, args.overrides + (SMOKE if args.smoke else []))
        for row in rows:
            cells = "  ".join(f"{k} {m:.4f}±{c:.4f}" for k, (m, c) in row["metrics"].items())
            print(f"{preset:<16} cpu {row['cpu_minutes']:>5.2f} min  it {row['iteration']:>6}  {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
