"""Learners at equal training time: MAML against Reptile, iMAML and the LSTM meta-learner.

Each preset is trained with the real training loop; at each mark (minutes of training wall-clock after the
first iteration, evaluation excluded; ``--clock cpu``: process CPU minutes) the learner is scored on the same fixed test tasks (``eval.seed`` of the preset), and the row
records the iteration reached and the process CPU minutes (fairer when other jobs share the cores). Run
under the shared lock::

    flock /tmp/allmap-bench.lock python benchmarks/hypergrad_budget.py \\
        --presets sinusoid-maml sinusoid-reptile sinusoid-imaml sinusoid-lstm --minutes 1 3 --out runs/budget-sinusoid

Writes OUT/budget.json and prints a table (regression: query MSE after each number of inner steps;
classification: accuracy in %).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from allmap.app.build import build_family
from allmap.app.config import load_config
from allmap.app.host import apply_host_settings
from allmap.app.trainer import train
from allmap.engine.evaluate import evaluate, fixed_tasks


class Marks:
    def __init__(self, preset: str, config: dict, minutes: list[float], tasks: int, clock: str = "wall") -> None:
        self.preset, self.marks, self.clock = preset, sorted(minutes), clock
        self.tasks = fixed_tasks(build_family(config, "test"), tasks, config["eval"]["seed"])
        self.steps, self.chunk = config["eval"]["steps"], config["eval"].get("chunk", 100)
        self.rows: list[dict] = []
        self.paused, self.start = 0.0, time.perf_counter()
        self.cpu0, self.cpu_paused = time.process_time(), 0.0

    def minutes(self) -> float:
        return (time.perf_counter() - self.start - self.paused) / 60

    def cpu_minutes(self) -> float:
        return (time.process_time() - self.cpu0 - self.cpu_paused) / 60

    def elapsed(self) -> float:
        return self.cpu_minutes() if self.clock == "cpu" else self.minutes()

    def __call__(self, iteration: int, learner) -> None:
        if iteration == 1:  # the clock starts after the first iteration (data loading, set-up, first call)
            self.start, self.paused = time.perf_counter(), 0.0
            self.cpu0, self.cpu_paused = time.process_time(), 0.0
            return
        if not self.marks or self.elapsed() < self.marks[0]:
            return
        mark = self.marks.pop(0)
        t0, c0 = time.perf_counter(), time.process_time()
        res = evaluate(learner, self.tasks, steps=self.steps, chunk=self.chunk)
        row = {
            "preset": self.preset,
            "mark": mark,
            "minutes": round(self.minutes(), 2),
            "iteration": iteration,
            "cpu_minutes": round(self.cpu_minutes(), 2),
            "load_1m": round(os.getloadavg()[0], 2),
            "metrics": {k: [v["mean"], v["ci95"]] for k, v in res.items()},
        }
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.paused += time.perf_counter() - t0
        self.cpu_paused += time.process_time() - c0
        if not self.marks:
            raise StopIteration


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", required=True)
    p.add_argument("--minutes", type=float, nargs="+", default=[1, 3])
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="marks in wall-clock minutes or in process CPU minutes (fair when the machine is shared)",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for preset in args.presets:
        config = load_config(preset, args.overrides)
        apply_host_settings(config)  # threads and retained memory, as `allmap train` sets them
        config["iterations"] = 10**9  # stopped by the last mark
        config["eval"]["every"] = 10**9  # no validation inside the timed training
        marks = Marks(preset, config, args.minutes, args.tasks, args.clock)
        try:
            train(config, out / preset, progress=False, callback=marks)
        except StopIteration:
            pass
        rows += marks.rows
        (out / "budget.json").write_text(json.dumps(rows, indent=1) + "\n")
    print()
    for row in rows:
        cells = "  ".join(
            f"{k} {100 * m:.2f}±{100 * c:.2f}%" if k.startswith("accuracy") else f"{k} {m:.4f}±{c:.4f}"
            for k, (m, c) in row["metrics"].items()
        )
        print(
            f"{row['preset']:<24} {row['minutes']:>5.1f} min  it {row['iteration']:>6}  cpu {row['cpu_minutes']:>5.1f} "
            f"min  load {row['load_1m']:>4.1f}  {cells}"
        )


if __name__ == "__main__":
    main()
