"""Meta-training: ordinary supervised training on batches of tasks, with exact resume.

Each iteration samples ``meta_batch`` tasks from a seeded generator, computes ``learner.meta_loss`` and
steps a torch optimizer. A checkpoint holds the weights, the optimizer and every RNG state, so a resumed
run ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from allmap.learners.base import Learner
from allmap.train.build import apply_threads, build_family, build_learner, build_optimizer, resolve_device
from allmap.train.checkpoint import load_checkpoint, save_checkpoint
from allmap.train.config import ConfigError, apply_overrides, dump_config, validate
from allmap.train.evaluate import evaluate, format_results, fixed_tasks
from allmap.train.plots import plot_adaptation, plot_learning_curve
from allmap.train.runs import RunDir, read_config

__all__ = ["train", "resume", "finish", "NonFiniteLossError", "RESUMABLE_KEYS"]

#: keys that ``--resume`` may change; anything else would make the resumed run a different run.
RESUMABLE_KEYS = ("iterations", "log_every", "checkpoint_every", "device", "eval")


class NonFiniteLossError(FloatingPointError):
    """The meta-loss became NaN or infinite; the message names the iteration."""


class _Trainer:
    def __init__(self, config: dict[str, Any], run: RunDir, progress: bool) -> None:
        self.config, self.run, self.progress = config, run, progress
        self.device = resolve_device(config["device"])
        apply_threads(config)
        torch.manual_seed(config["seed"])
        self.family = build_family(config, "train")
        self.learner = build_learner(config, self.family).to(self.device)
        self.optimizer = build_optimizer(config, self.learner)
        self.generator = torch.Generator().manual_seed(config["seed"])
        ev = config["eval"]
        self.val_tasks = fixed_tasks(build_family(config, "val"), ev["val_tasks"], ev["seed"] + 1)
        self.val_steps = [getattr(self.learner, "inner_steps", 0)]
        self.iteration, self.elapsed = 0, 0.0
        self.pending: list[torch.Tensor] = []

    # -- state ---------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "elapsed": self.elapsed,
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "task_rng": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["task_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.iteration, self.elapsed = int(state["iteration"]), float(state["elapsed"])
        rows = [r for r in self.run.read_metrics() if r["iteration"] <= self.iteration]
        self.run.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # -- the loop ------------------------------------------------------------------------------------
    def check_pending(self) -> float | None:
        """Verify the losses since the last check are finite (one host sync); return their mean."""
        if not self.pending:
            return None
        losses = torch.stack(self.pending).cpu()
        first = self.iteration - len(self.pending) + 1
        self.pending = []
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            it = first + int(bad[0])
            raise NonFiniteLossError(
                f"the meta-loss was {float(losses[int(bad[0])])} at iteration {it}; training stopped. The last "
                f"good checkpoint ({self.run.checkpoint}) is intact. Lower optimizer.lr or learner.inner_lr, "
                "then start again or `allmap train --resume` it."
            )
        return float(losses.mean())

    def log(self, row: dict[str, Any]) -> None:
        with open(self.run.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    def step(self) -> None:
        tasks = self.family.sample(self.config["meta_batch"], self.generator).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.learner.meta_loss(tasks)
        loss.backward()
        self.optimizer.step()
        self.pending.append(loss.detach())

    def validate(self) -> dict[str, float]:
        res = evaluate(self.learner, self.val_tasks, steps=self.val_steps, chunk=self.config["eval"]["chunk"])
        return {f"val_{k.split('@')[0]}": v["mean"] for k, v in res.items()}

    def fit(self, callback: Callable[[int, Learner], None] | None = None) -> None:
        cfg = self.config
        total = cfg["iterations"]
        bar = tqdm(total=total, initial=self.iteration, disable=not self.progress, desc="meta-train",
                   dynamic_ncols=True, unit="it")
        start = time.perf_counter() - self.elapsed
        while self.iteration < total:
            self.step()
            self.iteration += 1
            it = self.iteration
            bar.update(1)
            at_log = it % cfg["log_every"] == 0 or it == total
            at_ckpt = it % cfg["checkpoint_every"] == 0 or it == total
            at_val = it % cfg["eval"]["every"] == 0 or it == total
            if at_log or at_ckpt or at_val:
                mean = self.check_pending()
                self.elapsed = time.perf_counter() - start
                row: dict[str, Any] = {"iteration": it, "seconds": round(self.elapsed, 3)}
                if mean is not None and at_log:
                    row["loss"] = mean
                if at_val:
                    row.update(self.validate())
                if len(row) > 2:
                    self.log(row)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k not in ("iteration", "seconds")})
                if at_ckpt:
                    save_checkpoint(self.state(), self.run.checkpoint)
            if callback is not None:
                callback(it, self.learner)
        bar.close()


def _start(config: dict[str, Any], out_dir: str | Path, progress: bool) -> _Trainer:
    run = RunDir(out_dir)
    if run.checkpoint.exists():
        raise ConfigError(f"{str(run.path)!r} already holds a run; continue it with `allmap train --resume "
                          f"{run.path}` or choose another --out.")
    run.path.mkdir(parents=True, exist_ok=True)
    run.config.write_text(dump_config(config))
    run.metrics.write_text("")
    return _Trainer(config, run, progress)


def train(config: dict[str, Any], out_dir: str | Path, progress: bool = True,
          callback: Callable[[int, Learner], None] | None = None) -> Learner:
    """Meta-train from a validated ``config`` into ``out_dir``, evaluate on the test tasks and plot.

    ``callback(iteration, learner)`` runs after every iteration (tests use it to interrupt a run).
    """
    trainer = _start(config, out_dir, progress)
    trainer.fit(callback)
    finish(trainer.run.path, trainer.learner, config)
    return trainer.learner


def resume(run_dir: str | Path, overrides: list[str] | None = None, progress: bool = True,
           callback: Callable[[int, Learner], None] | None = None) -> Learner:
    """Continue the run in ``run_dir`` from its checkpoint.

    ``overrides`` are ``key=value`` strings that may change only :data:`RESUMABLE_KEYS` (for example
    ``iterations=100000`` to train longer); anything else would make it a different run.
    """
    before = read_config(run_dir)
    config = apply_overrides(before, overrides or [])
    validate(config)
    changed = sorted(k for k in config if config[k] != before[k] and k not in RESUMABLE_KEYS)
    if changed:
        raise ConfigError(f"--resume can change only {', '.join(RESUMABLE_KEYS)}; changing {changed} would make it a "
                          "different run. Start a new run with --out instead.")
    run = RunDir(run_dir)
    run.config.write_text(dump_config(config))
    trainer = _Trainer(config, run, progress)
    trainer.restore(load_checkpoint(run.checkpoint, map_location="cpu"))
    trainer.fit(callback)
    finish(run.path, trainer.learner, config)
    return trainer.learner


def protocol(config: dict[str, Any], family, n: int) -> str:
    """One line naming what the numbers are: family, shots, queries, number of tasks and seed."""
    task = config["task"]
    ways = f"{family.ways}-way " if hasattr(family, "ways") else ""
    return (f"{task['family']} {ways}{family.shots}-shot, {family.queries} queries per task, {n} fixed test "
            f"tasks (seed {config['eval']['seed']}); mean ± 95% CI (1.96·std/sqrt(n))")


def finish(run_dir: str | Path, learner: Learner, config: dict[str, Any]) -> dict[str, Any]:
    """Final test evaluation (``results.json``) and plots of a run."""
    run = RunDir(run_dir)
    ev = config["eval"]
    family = build_family(config, "test")
    tasks = fixed_tasks(family, ev["tasks"], ev["seed"])
    results = evaluate(learner, tasks, steps=ev["steps"], chunk=ev["chunk"])
    text = protocol(config, family, len(tasks))
    run.results.write_text(json.dumps({"protocol": text, "metrics": results}, indent=2) + "\n")
    plot_learning_curve(run.read_metrics(), run.curve, title=config.get("description", "").split("\n")[0][:70])
    shown = fixed_tasks(family, 4, ev["seed"]).to(next(learner.parameters()).device)
    plot_adaptation(learner, family, shown, run.adaptation, steps=sorted({0, 1, max(ev["steps"])}))
    return {"protocol": text, "metrics": results}


def format_run_results(res: dict[str, Any]) -> str:
    return format_results(res["metrics"], res["protocol"])
