"""Meta-training and evaluation of meta-RL runs (``kind: rl`` configs): the run folder, checkpoints with exact
resume, torchrun data parallelism over the tasks of each meta-batch, the evaluation against baselines, plots.

Under torchrun each rank samples, adapts and differentiates its share of the meta-batch (and of the test
tasks); gradients, curvature products and line-search values are summed over ranks, and the random numbers
of every task are drawn as one process would draw them, so the run equals the one-process run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from allmap.app.checkpoint import load_checkpoint, save_checkpoint
from allmap.app.config import ConfigError, apply_overrides, dump_config, validate
from allmap.app.distributed import Dist, current
from allmap.app.progress import progress_bar
from allmap.app.rl_config import build_env, build_outer, build_rl_learner
from allmap.app.rl_plots import plot_returns, plot_rl_curve, plot_trajectories
from allmap.app.runs import RunDir, marked_training, read_config, results_record, to_json
from allmap.engine.evaluate import summarize
from allmap.rl import MAMLRL, PPO, Navigation2D, Surrogate, adaptation_returns, test_tasks
from allmap.rl.envs import BatchedEnv

__all__ = ["train_rl", "resume_rl", "evaluate_rl", "load_rl", "format_rl_results", "replot"]


class _RLTrainer:
    """One meta-RL run: the learner, its outer loop and generator, stepped one meta-iteration at a time."""

    def __init__(self, config: dict[str, Any], run: RunDir, progress: bool, ctx: Dist) -> None:
        self.config, self.run, self.progress, self.ctx = config, run, progress, ctx
        torch.manual_seed(config["seed"])
        self.env = build_env(config)
        self.learner = build_rl_learner(config, self.env)
        self.outer = build_outer(config)
        self.optimizer = None
        if isinstance(self.outer, PPO):
            self.optimizer = torch.optim.Adam(self.learner.policy.parameters(), lr=config["outer"].get("lr", 1e-3))
        self.generator = torch.Generator().manual_seed(config["seed"] + 1)
        self.iteration, self.cpu_time, self.seconds = 0, 0.0, 0.0
        ctx.broadcast_tensors(list(self.learner.parameters()))

    def state(self) -> dict[str, Any]:
        return {
            "learner": self.learner.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "iteration": self.iteration,
            "cpu_time": self.cpu_time,
            "seconds": self.seconds,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state["learner"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.iteration, self.cpu_time = state["iteration"], state["cpu_time"]
        self.seconds = float(state.get("seconds", 0.0))  # checkpoints before wall time was kept: from 0

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.ctx.all_reduce_sum(tensor)

    def step(self) -> dict[str, float]:
        """One meta-iteration: sample tasks, adapt with their trajectories, one outer step."""
        start, wall = time.process_time(), time.perf_counter()
        total, batch = self.config["meta_batch"], self.config["trajectories"]
        rows = self.ctx.shard(total)
        tasks = self.env.sample_tasks(total, self.generator)[rows]
        _, trajs = self.learner.adapt_and_sample(
            self.env, tasks, batch, generator=self.generator, rows=rows, total=total
        )
        clip = self.outer.clip if isinstance(self.outer, PPO) else None
        surrogate = Surrogate(self.learner, trajs[:-1], trajs[-1], total, clip=clip, offset=rows.start)
        if isinstance(self.outer, PPO):
            info = self.outer.step(list(self.learner.policy.parameters()), surrogate, self.optimizer, self.reduce)
        else:
            info = self.outer.step(dict(self.learner.policy.named_parameters()), surrogate, self.reduce)
        means = torch.stack([t.returns().mean(-1).sum() for t in (trajs[0], trajs[-1])])
        pre, post = (self.reduce(means) / total).tolist()
        self.iteration += 1
        self.cpu_time += time.process_time() - start
        self.seconds += time.perf_counter() - wall
        row = {
            "iteration": self.iteration,
            "return_pre": pre,
            **info,
            "cpu_time": self.cpu_time,
            "seconds": self.seconds,
        }
        if len(trajs) > 1:
            row["return_post"] = post
        return row

    def save(self) -> None:
        if self.ctx.is_main:
            save_checkpoint(self.state(), self.run.checkpoint)

    def fit(self) -> None:
        config = self.config
        bar = progress_bar(
            self.progress and self.ctx.is_main, total=config["iterations"], initial=self.iteration, desc="meta-train"
        )
        with bar:
            while self.iteration < config["iterations"]:
                row = self.step()
                bar.update(1)
                bar.set_postfix(ret=f"{row.get('return_post', row['return_pre']):.2f}")
                if self.ctx.is_main and (self.iteration % config["log_every"] == 0 or self.iteration == 1):
                    with self.run.metrics.open("a") as f:
                        f.write(to_json(row) + "\n")
                if self.iteration % config["checkpoint_every"] == 0 or self.iteration == config["iterations"]:
                    self.save()


def train_rl(config: dict[str, Any], out_dir: str | Path, progress: bool = True) -> MAMLRL:
    """Meta-train from a validated ``kind: rl`` config into ``out_dir``, then evaluate and plot (rank 0 writes)."""
    ctx = current()
    run = RunDir(out_dir)
    trainer = _RLTrainer(config, run, progress, ctx)
    if ctx.is_main:
        if run.checkpoint.exists():
            raise ConfigError(
                f"{str(run.path)!r} already holds a run; continue it with `allmap train --resume {run.path}` "
                "or choose another --out."
            )
        run.path.mkdir(parents=True, exist_ok=True)
        run.config.write_text(dump_config(config))
        run.metrics.write_text("")
    ctx.barrier()
    with marked_training(run, ctx.is_main):
        trainer.fit()
        evaluate_rl(trainer.learner, config, run.path, ctx, write=True)
    return trainer.learner


def resume_rl(run_dir: str | Path, overrides: list[str] | None = None, progress: bool = True) -> MAMLRL:
    """Continue a meta-RL run from its checkpoint (``overrides`` such as ``["iterations=800"]`` may extend
    it); exact: the result equals the uninterrupted run's."""
    ctx = current()
    run = RunDir(run_dir)
    config = apply_overrides(read_config(run.path), list(overrides or []))
    validate(config)
    trainer = _RLTrainer(config, run, progress, ctx)
    trainer.restore(load_checkpoint(run.checkpoint))
    if ctx.is_main:  # rows logged after the checkpoint are logged again by the resumed run
        rows = [r for r in run.read_metrics() if r.get("iteration", 0) <= trainer.iteration]
        run.metrics.write_text("".join(to_json(r) + "\n" for r in rows))
        run.config.write_text(dump_config(config))
    ctx.barrier()
    with marked_training(run, ctx.is_main):
        trainer.fit()
        evaluate_rl(trainer.learner, config, run.path, ctx, write=True)
    return trainer.learner


def load_rl(run_dir: str | Path, config: dict[str, Any] | None = None) -> tuple[MAMLRL, BatchedEnv]:
    """The trained learner of a meta-RL run folder and its environment family."""
    run = RunDir(run_dir)
    config = read_config(run.path) if config is None else config
    env = build_env(config)
    learner = build_rl_learner(config, env)
    learner.load_state_dict(load_checkpoint(run.checkpoint)["learner"])
    return learner, env


def _returns(learner: MAMLRL, env: BatchedEnv, config: dict[str, Any], ctx: Dist, steps: list[int]):
    """Per-task mean returns ``[steps, tasks]`` on the fixed test tasks (each rank its share, summed), and
    this rank's trajectories."""
    ev = config["eval"]
    tasks = test_tasks(env, ev["tasks"], ev["seed"])
    rows = ctx.shard(len(tasks))
    returns, trajs = adaptation_returns(
        learner,
        env,
        tasks[rows],
        ev["trajectories"],
        steps,
        ev["seed"],
        rows,
        len(tasks),
        ev.get("inner_lrs"),
        ev.get("step_budget"),
    )
    full = returns.new_zeros(len(steps), len(tasks))
    full[:, rows] = returns
    return ctx.all_reduce_sum(full), tasks[rows], trajs


def _metrics(returns: torch.Tensor, steps: list[int]) -> dict[str, dict[str, float]]:
    return {f"return@{k}": summarize(r.double()) for k, r in zip(steps, returns)}


def evaluate_rl(
    learner: MAMLRL, config: dict[str, Any], run_dir: str | Path | None, ctx: Dist | None = None, write: bool = False
) -> dict[str, Any]:
    """Returns after each of ``eval.steps`` policy-gradient steps on the fixed test tasks, for the learner and
    the baselines: ``random`` (the policy initialisation of the run's seed, fine-tuned alike) and the runs of
    ``eval.compare`` (e.g. a multi-task ``pretrained`` policy, fine-tuned alike, and an ``oracle`` that sees
    the goal, scored without adaptation). With ``write``, rank 0 writes results.json and the plots."""
    ctx = current() if ctx is None else ctx
    ev, steps = config["eval"], list(config["eval"]["steps"])
    env = build_env(config)
    returns, tasks, trajs = _returns(learner, env, config, ctx, steps)
    baselines: dict[str, dict[str, dict[str, float]]] = {}
    torch.manual_seed(config["seed"])
    fresh = build_rl_learner(config, env)
    baselines["random"] = _metrics(_returns(fresh, env, config, ctx, steps)[0], steps)
    for name, path in ev["compare"].items():
        other = read_config(path)
        other["eval"] = {**ev, "compare": {}}
        model, other_env = load_rl(path, other)
        own = steps if not other["env"].get("oracle") else [0]
        baselines[name] = _metrics(_returns(model, other_env, other, ctx, own)[0], own)
    rates = ev.get("inner_lrs")
    sizes = f"step sizes {', '.join(map(str, rates))} (the last repeats)" if rates else f"inner_lr {learner.inner_lr}"
    budget = ev.get("step_budget")
    per = (
        f"whole trajectories up to {budget} environment steps ({ev['trajectories']} at a time)"
        if budget
        else f"{ev['trajectories']} trajectories"
    )
    protocol = (
        f"{env!r}: mean return over {ev['tasks']} fixed test tasks (seed {ev['seed']}), {per} "
        f"per task and step, after {', '.join(map(str, steps))} policy-gradient steps of {sizes}; "
        "mean ± 95% CI (1.96·std/sqrt(n))"
    )
    record = results_record(protocol, _metrics(returns, steps))
    record["baselines"] = baselines
    if write and ctx.is_main and run_dir is not None:
        run = RunDir(run_dir)
        run.write_results(record)
        plot_rl_curve(run.read_metrics(), run.curve, config.get("description", ""))
        plot_returns({"this run": record["metrics"], **baselines}, run.path / "returns.png")
        if isinstance(env, Navigation2D) and ctx.world == 1:
            after = steps.index(learner.inner_steps) if learner.inner_steps in steps[1:] else len(steps) - 1
            shown = [0, after] if after else [0]
            plot_trajectories(
                tasks, [trajs[i] for i in shown], [steps[i] for i in shown], run.path / "trajectories.png"
            )
    return record


def replot(run_dir: str | Path) -> list[Path]:
    """Redraw a meta-RL run's learning curve and return-against-steps figure from its metrics and results
    (the trajectories figure needs new samples: ``allmap eval`` draws it)."""
    run = RunDir(run_dir)
    config = read_config(run.path)
    plot_rl_curve(run.read_metrics(), run.curve, config.get("description", ""))
    paths = [run.curve]
    if run.results.is_file():
        record = json.loads(run.results.read_text())
        plot_returns({"this run": record["metrics"], **record.get("baselines", {})}, run.path / "returns.png")
        paths.append(run.path / "returns.png")
    return paths


def format_rl_results(record: dict[str, Any]) -> str:
    """The results of :func:`evaluate_rl` as text: a line per step count, a column per method."""
    methods = {"this run": record["metrics"], **record.get("baselines", {})}
    lines = [record["protocol"], "  " + f"{'steps':<10}" + "".join(f"{name:>22}" for name in methods)]
    for key in record["metrics"]:
        cells = [f"{key:<10}"]
        for m in methods.values():
            r = m.get(key)
            cells.append(f"{r['mean']:>12.2f} ± {r['ci95']:<7.2f}" if r else f"{'':>22}")
        lines.append("  " + "".join(cells))
    return "\n".join(lines)
