"""Accuracy against training time: run a preset with the real training loop and, at given minutes of
training time, score the learner on fixed test episodes (evaluation time is not counted as training).

    flock /tmp/allmap-bench.lock python benchmarks/omniglot_budget.py omniglot-5w1s-protonet \\
        --minutes 5 10 20 30 40 50 60 --protocols 5:1:15 20:1:5 --out runs/bench-protonet

Writes OUT/budget.json (one row per checkpoint: training minutes (wall clock, evaluation excluded), process
CPU minutes, the 1-minute load average, iteration, accuracy mean ± 95% CI per protocol). ``--iterations``
adds checkpoints by iteration, which stay meaningful when other jobs share the cores; ``--clock cpu`` reads
``--minutes`` as process CPU minutes, for single-threaded runs side by side. ``--phase val`` scores the
validation episodes instead of the test ones, for tuning. ``--set key=value`` overrides the preset as in
``allmap train``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from allmap.app.averaging import averaged
from allmap.app.build import build_family, check_validation_held_out
from allmap.app.config import load_config
from allmap.app.host import apply_host_settings
from allmap.app.trainer import train
from allmap.engine.evaluate import evaluate, fixed_tasks


class Budget:
    def __init__(
        self,
        config,
        minutes,
        protocols,
        out: Path,
        tasks: int,
        stop_after: bool,
        iterations: list[int] | None = None,
        phase: str = "test",
        clock: str = "wall",
    ) -> None:
        self.marks = sorted(minutes)
        self.iteration_marks = sorted(iterations or [])
        self.out = out
        self.rows: list[dict] = []
        self.paused = 0.0
        self.start = time.perf_counter()
        self.stop_after = stop_after
        self.suites = {}
        for ways, shots, queries in protocols:
            cfg = copy.deepcopy(config)
            cfg["eval"].update({"ways": ways, "shots": shots, "queries": queries})
            family = build_family(cfg, phase)
            check_validation_held_out(cfg, family)
            self.suites[f"{ways}w{shots}s{queries}q"] = fixed_tasks(family, tasks, cfg["eval"]["seed"])
        self.total = config["iterations"]
        self.steps = config["eval"]["steps"]
        self.chunk = config["eval"]["chunk"]
        self.start = time.perf_counter()
        self.cpu0, self.cpu_paused = time.process_time(), 0.0
        self.clock = clock

    def training_minutes(self) -> float:
        return (time.perf_counter() - self.start - self.paused) / 60

    def cpu_minutes(self) -> float:
        return (time.process_time() - self.cpu0 - self.cpu_paused) / 60

    def __call__(self, iteration: int, learner) -> None:
        last = iteration == self.total
        at_iteration = bool(self.iteration_marks) and iteration >= self.iteration_marks[0]
        spent = self.cpu_minutes() if self.clock == "cpu" else self.training_minutes()
        at_minutes = bool(self.marks) and spent >= self.marks[0]
        if not (last or at_iteration or at_minutes):
            return
        if at_iteration:
            mark = f"it{self.iteration_marks.pop(0)}"
        elif at_minutes:
            mark = self.marks.pop(0)
        else:
            mark = "end"
        t0, c0 = time.perf_counter(), time.process_time()
        row = {
            "minutes": round(self.training_minutes(), 2),
            "mark": mark,
            "iteration": iteration,
            "process_cpu_minutes": round(self.cpu_minutes(), 2),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
        for name, tasks in self.suites.items():
            res = evaluate(averaged(learner), tasks, steps=self.steps, chunk=self.chunk)  # as the run reports
            row[name] = {
                k: [round(100 * v["mean"], 3), round(100 * v["ci95"], 3)]
                for k, v in res.items()
                if k.startswith("accuracy")
            }
        row["eval_seconds"] = round(time.perf_counter() - t0, 1)
        self.rows.append(row)
        (self.out / "budget.json").write_text(json.dumps(self.rows, indent=1) + "\n")
        print(json.dumps(row), flush=True)
        self.paused += time.perf_counter() - t0
        self.cpu_paused += time.process_time() - c0
        if self.stop_after and not self.marks and not self.iteration_marks:
            raise StopIteration


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("preset")
    p.add_argument("--minutes", type=float, nargs="*", default=[5, 10, 20, 30, 40, 50, 60])
    p.add_argument(
        "--iterations",
        type=int,
        nargs="*",
        default=[],
        help="also evaluate at these iterations (robust to a busy machine; convert with the step time)",
    )
    p.add_argument("--protocols", nargs="+", default=["5:1:15"], help="test N:K:Q triples, e.g. 5:1:15 20:1:5")
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--stop-after-last", action="store_true", help="stop training at the last mark")
    p.add_argument(
        "--phase",
        choices=("test", "val"),
        default="test",
        help="score on the protocol's test episodes, or on its validation ones (for tuning; eval.task applies)",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="--minutes in wall-clock training minutes, or in process CPU minutes (for runs sharing the cores)",
    )
    args = p.parse_args()
    config = load_config(args.preset, args.overrides)
    apply_host_settings(config)  # threads and retained memory, as `allmap train` sets them
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    protocols = [tuple(int(v) for v in s.split(":")) for s in args.protocols]
    budget = Budget(
        config,
        args.minutes,
        protocols,
        out,
        args.tasks,
        args.stop_after_last,
        args.iterations,
        args.phase,
        args.clock,
    )
    print(f"threads={torch.get_num_threads()} preset={args.preset} overrides={args.overrides}", flush=True)
    try:
        train(config, out / "run", progress=False, callback=budget)
    except StopIteration:
        pass
    print(f"total training minutes {budget.training_minutes():.2f}", flush=True)


if __name__ == "__main__":
    main()
