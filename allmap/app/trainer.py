"""Meta-training: ordinary supervised training on batches of tasks, with exact resume.

Each iteration samples ``meta_batch`` tasks from a seeded generator, computes ``learner.meta_loss`` and
steps a torch optimizer. A checkpoint holds the weights, the optimizer and every RNG state, so a resumed
run ends with exactly the weights of an uninterrupted one.

Under ``torchrun`` each rank adapts its shard of every meta-batch and the meta-gradients are all-reduced
(see :mod:`allmap.app.distributed`); only rank 0 writes files. SIGINT/SIGTERM finish the current
iteration, save a checkpoint and raise :class:`Interrupted`; ``resume`` continues exactly. Under
``torchrun --max-restarts``, a restarted worker group continues the run from its last checkpoint.

A run that diverges fails instead of reporting numbers: a NaN or infinite meta-loss or meta-gradient
(:class:`NonFiniteLossError`), a meta-loss that rises far above its start, or a non-finite validation or
final test (:class:`DivergedError`). The run folder's ``results.json`` then records ``status: failed`` and
the reason, and the error names the rates to lower.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from allmap.app.averaging import WeightAverage, averaged
from allmap.app.build import build_family, build_learner, build_optimizer, check_held_out, resolve_device
from allmap.app.checkpoint import CheckpointError, loads_checkpoint, read_verified, save_checkpoint
from allmap.app.config import ConfigError, apply_overrides, dump_config, validate
from allmap.app.distributed import Dist, current, evaluate_sharded, reduce_step, restart_count
from allmap.app.evaluation import evaluate_run
from allmap.app.plots import plot_adaptation, plot_learning_curve
from allmap.app.preflight import check_device, check_model_input, check_model_size, check_sizes, trial_step
from allmap.app.progress import TaskProgress, progress_bar
from allmap.app.report import format_results
from allmap.app.runs import TIME_KEYS, RunDir, marked_training, read_config, to_json
from allmap.app.tensorboard import TensorBoardLog, enabled, require
from allmap.engine.evaluate import count_tasks, fixed_tasks, task_batches
from allmap.learners.base import Learner

__all__ = [
    "train",
    "resume",
    "finish",
    "check_config",
    "NonFiniteLossError",
    "DivergedError",
    "Interrupted",
    "StoppedAtOnce",
    "RESUMABLE_KEYS",
    "MAX_CONSECUTIVE_SKIPS",
    "DIVERGENCE_FACTOR",
    "RECENT_STEPS",
    "lower_rates",
]

#: keys that ``--resume`` may change; anything else would make the resumed run a different run.
RESUMABLE_KEYS = ("iterations", "log_every", "checkpoint_every", "device", "eval", "on_nonfinite", "log")

#: with ``on_nonfinite: skip``, this many non-finite meta-batches in a row stop the run (it has diverged).
MAX_CONSECUTIVE_SKIPS = 10

#: training has diverged when, at a check (every log, checkpoint and validation step, and the end), the mean
#: meta-loss of the last RECENT_STEPS meta-batches exceeds DIVERGENCE_FACTOR times the size of the first
#: meta-batch's loss (the loss of the initial weights, which no update has touched yet)
DIVERGENCE_FACTOR = 1e3
RECENT_STEPS = 10


class NonFiniteLossError(FloatingPointError):
    """The meta-loss or a meta-gradient became NaN or infinite; the message names the iteration."""


class DivergedError(NonFiniteLossError):
    """Training diverged: the meta-loss rose far above its start (see :data:`DIVERGENCE_FACTOR`), or the
    validation or final test gave a NaN or infinite metric. The message says what to lower."""


def lower_rates(config: dict[str, Any]) -> str:
    """The settings to lower when a run diverges, with their values: ``optimizer.lr (now 3.0) or ...``."""
    rates = [
        f"{key} (now {value})"
        for key, value in (
            ("optimizer.lr", config["optimizer"].get("lr")),
            ("learner.inner_lr", config["learner"].get("inner_lr")),
        )
        if value is not None
    ]
    return " or ".join(rates) or "optimizer.lr or learner.inner_lr"


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training after a completed iteration, whose checkpoint was saved."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path) -> None:
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received: stopped after iteration {iteration} and saved {checkpoint}; continue "
            f"exactly with `allmap train --resume {checkpoint.parent}`."
        )


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT/SIGTERM while training was stopping (finishing its iteration or validating): it stopped
    at once, without saving (a save under way is finished first); the message names the checkpoint on disk
    and its iteration."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum


class _StopSignals:
    """Within ``with``: the first SIGINT/SIGTERM is recorded (training stops at the end of the iteration and
    saves) and, with ``notice``, says so on stderr; a second one raises :class:`StoppedAtOnce` at once, with
    the message ``left(signum)``: no save then, since the iteration under way may be half done. A save under
    way (``with signals.saving():``) finishes first, so the message can say which checkpoint is on disk.
    Handlers are restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, left: Callable[[int], str] = lambda signum: "", notice: bool = False) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._left, self._notice = left, notice
        self._saving, self._held = False, None

    def _stop_at_once(self, signum: int) -> None:
        self._restore()
        raise StoppedAtOnce(self._left(signum), signum)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            if self._saving:  # raised when the save is done
                self._held = signum
                return
            self._stop_at_once(signum)
        self.received = signum
        if self._notice:  # os.write: print() could re-enter a stream the main thread is writing to
            os.write(
                2,
                f"\n{signal.Signals(signum).name} received: stopping after this iteration and saving a "
                "checkpoint; press Ctrl-C again to stop at once without saving.\n".encode(),
            )

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Within: a second signal waits until the block is done (a checkpoint is written whole)."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False
        if self._held is not None:
            self._stop_at_once(self._held)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()


def _strategy_state(learner: Learner) -> dict[str, torch.Tensor]:
    """The meta-gradient strategy's changing state (the random directions of zeroth-order estimates)."""
    return learner.hypergrad.state_dict() if learner.hypergrad is not None else {}


class _Trainer:
    def __init__(self, config: dict[str, Any], run: RunDir, progress: bool, ctx: Dist) -> None:
        self.config, self.run, self.ctx = config, run, ctx
        self.progress = progress and ctx.is_main
        if config["meta_batch"] < ctx.world:
            raise ConfigError(
                f"meta_batch = {config['meta_batch']} is smaller than the number of processes "
                f"({ctx.world}); every rank needs at least one task. Raise meta_batch or use fewer processes."
            )
        self.device = ctx.device(resolve_device(config["device"]))
        check_device(self.device)
        torch.manual_seed(config["seed"])
        self.family = build_family(config, "train")
        families = {"train": self.family, "val": build_family(config, "val"), "test": build_family(config, "test")}
        check_held_out(config, families)  # validation and test classes are not training classes
        self.families = families
        check_sizes(config, families)  # before anything big is allocated
        check_model_size(config)
        check_model_input(config, self.family)
        self.learner = build_learner(config, self.family).to(self.device)
        if self.learner.spec.sequential and ctx.world > 1:
            raise ConfigError(
                f"{type(self.learner).__name__} carries state from task to task (learner.inner_state: carried), "
                f"which one process keeps in order; {ctx.world} processes would each carry their own. Run it in "
                "one process, or use learner.inner_state: fresh."
            )
        trial_step(self.learner, self.family, self.device)
        ctx.broadcast_tensors(list(self.learner.state_dict().values()))  # as DDP does: rank 0's weights
        self.params = list(self.learner.parameters())
        self.optimizer = build_optimizer(config, self.learner)
        # with `ema`, validation and the final test use an exponential moving average of the weights
        self.average = WeightAverage(self.learner, config["ema"]) if config.get("ema") is not None else None
        self.generator = torch.Generator().manual_seed(config["seed"])
        ev = config["eval"]
        self.val_tasks = fixed_tasks(families["val"], ev["val_tasks"], ev["seed"] + 1)
        # validation scores after eval.val_steps inner steps (default: as many as training takes)
        self.val_steps = [ev["val_steps"] if ev["val_steps"] is not None else self.learner.spec.inner_steps or 0]
        self.skip = config.get("on_nonfinite", "raise") == "skip"
        self.iteration, self.elapsed = 0, 0.0
        self.cpu_elapsed = 0.0  # this process's CPU seconds (all its threads; not forked children's)
        # per step since the last logged loss: [loss, 1 if loss and gradient are finite else 0]; the first
        # `checked` of them have been verified
        self.pending: list[torch.Tensor] = []
        self.checked = 0
        self.skipped, self.consecutive = 0, 0
        self.first_loss: float | None = None  # the first meta-batch's loss: the start of the divergence rule
        self.saved_at: int | None = None  # the iteration of the checkpoint on disk, once there is one
        if enabled(config) and ctx.is_main:
            require()  # before training: a missing tensorboard package is a config error, not a late crash
        self.tensorboard: TensorBoardLog | None = None  # opened at the first log row (rank 0)
        self.started_at = 0  # the iteration this process started training at (a resumed run's checkpoint)

    # -- state ---------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        pending = torch.stack(self.pending).cpu() if self.pending else torch.zeros(0, 2)
        return {
            "iteration": self.iteration,
            "elapsed": self.elapsed,
            "cpu_elapsed": self.cpu_elapsed,
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "task_rng": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "hypergrad": _strategy_state(self.learner),
            "pending": pending,
            "skipped": self.skipped,
            "first_loss": self.first_loss,
            **({"averaged": self.average.state_dict()} if self.average is not None else {}),
        }

    def restore(self, state: dict[str, Any]) -> None:
        try:
            self.learner.load_state_dict(state["learner"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.generator.set_state(state["task_rng"])
            torch.set_rng_state(state["torch_rng"])
            if self.learner.hypergrad is not None:
                self.learner.hypergrad.load_state_dict(state.get("hypergrad", {}))
            self.iteration, self.elapsed = int(state["iteration"]), float(state["elapsed"])
            self.cpu_elapsed = float(state.get("cpu_elapsed", 0.0))
            if self.average is not None:
                self.average.load_state_dict(state["averaged"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(
                f"checkpoint {str(self.run.checkpoint)!r} does not fit this run's config: {str(err).splitlines()[0]}"
            ) from None
        self.pending = [row.to(self.device) for row in state.get("pending", torch.zeros(0, 2))]
        self.checked = len(self.pending)  # verified before they were saved
        self.skipped = int(state.get("skipped", 0))
        self.first_loss = state.get("first_loss")
        self.saved_at = self.started_at = self.iteration
        if self.ctx.is_main:
            rows = self.continued_log(self.run.read_metrics())
            self.run.metrics.write_text("".join(to_json(r) + "\n" for r in rows))

    def continued_log(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The log rows up to the checkpoint. When the run goes on past the end of a finished one, that end's
        row keeps only what is on the schedule (``log_every``, ``eval.every``): an uninterrupted run logs no
        loss or validation there, and its loss row averages the whole window (the checkpoint kept its steps)."""
        rows = [r for r in rows if r["iteration"] <= self.iteration]
        it, cfg = self.iteration, self.config
        if not rows or rows[-1]["iteration"] != it or cfg["iterations"] <= it:
            return rows
        last = dict(rows.pop())
        if it % _log_interval(cfg["log_every"], cfg["iterations"]):
            last.pop("loss", None)
        if it % cfg["eval"]["every"]:
            last = {k: v for k, v in last.items() if not k.startswith("val_")}
        if set(last) - {"iteration", "skipped", *TIME_KEYS}:
            rows.append(last)
        return rows

    # -- the loop ------------------------------------------------------------------------------------
    def checkpoint_note(self) -> str:
        """What is on disk after a failure: the last checkpoint, or that none was written."""
        if self.saved_at is None:
            return "No checkpoint was written before it, so there is nothing to resume."
        return f"The last checkpoint (iteration {self.saved_at}, {self.run.checkpoint}) is intact."

    def verify_pending(self) -> torch.Tensor | None:
        """Raise if a loss or gradient not yet checked was non-finite (one host sync), or if the meta-loss
        has diverged (:data:`DIVERGENCE_FACTOR`); return the rows of the steps since the last logged loss."""
        if not self.pending:
            return None
        rows = torch.stack(self.pending).cpu()
        bad = (rows[self.checked :, 1] == 0).nonzero()
        if len(bad):
            i = self.checked + int(bad[0])
            it = self.iteration - len(self.pending) + 1 + i
            loss = float(rows[i, 0])
            what = (
                f"the meta-loss was {loss}"
                if not torch.isfinite(rows[i, 0])
                else f"the meta-loss was finite ({loss:.6g}) but a meta-gradient entry was NaN or infinite"
            )
            raise NonFiniteLossError(
                f"{what} at iteration {it}; training stopped. Lower {lower_rates(self.config)} and start again, "
                f"or set on_nonfinite: skip to skip such meta-batches. {self.checkpoint_note()}"
            )
        self.checked = len(rows)
        if self.first_loss is None:
            self.first_loss = float(rows[0, 0])
        self.check_divergence(rows[-RECENT_STEPS:, 0])
        return rows

    def check_divergence(self, recent: torch.Tensor) -> None:
        """Raise :class:`DivergedError` if the mean of ``recent`` losses exceeds DIVERGENCE_FACTOR times the
        size of the first meta-batch's loss."""
        mean, first = float(recent.double().mean()), self.first_loss
        if first and mean > DIVERGENCE_FACTOR * abs(first):
            n = len(recent)
            raise DivergedError(
                f"training diverged at iteration {self.iteration}: the mean meta-loss of the last "
                f"{f'{n} meta-batches' if n > 1 else 'meta-batch'} is {mean:.4g}, more than "
                f"{DIVERGENCE_FACTOR:g} times the size of the first meta-batch's loss ({first:.4g}); training "
                f"stopped. Lower {lower_rates(self.config)} and start again. {self.checkpoint_note()}"
            )

    def log(self, row: dict[str, Any]) -> None:
        if self.ctx.is_main:
            with open(self.run.metrics, "a") as f:
                f.write(to_json(row) + "\n")
            if enabled(self.config):
                if self.tensorboard is None:
                    self.tensorboard = TensorBoardLog(self.run.path, start=self.started_at)
                self.tensorboard.row(row)

    def close_log(self, record: dict[str, Any] | None = None) -> None:
        """Write the final test evaluation (if any) to TensorBoard and close its event files."""
        if self.tensorboard is None and record is not None and enabled(self.config) and self.ctx.is_main:
            self.tensorboard = TensorBoardLog(self.run.path, start=self.started_at)
        if self.tensorboard is not None:
            if record is not None:
                self.tensorboard.evaluation(record, self.config, self.iteration)
            self.tensorboard.close()
            self.tensorboard = None

    def step(self, stop: bool) -> bool:
        """One meta-batch; returns whether any rank was asked to stop."""
        ctx, size = self.ctx, self.config["meta_batch"]
        tasks = self.family.sample(size, self.generator)
        if ctx.active:
            tasks = tasks[ctx.shard(size)]
        tasks = tasks.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        # backward per chunk of tasks (allmap.engine.execution); scaled to this rank's share of the meta-batch
        loss = self.learner.meta_backward(tasks, scale=len(tasks) / size if ctx.active else 1.0)
        loss, finite, stop = reduce_step(self.params, loss.detach(), stop, ctx)
        if self.skip:
            if not bool(finite):  # one host sync per step, only in skip mode
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped += 1
                self.consecutive += 1
                if self.consecutive >= MAX_CONSECUTIVE_SKIPS:
                    raise NonFiniteLossError(
                        f"{self.consecutive} meta-batches in a row (iterations {self.iteration - self.consecutive + 2}"
                        f"-{self.iteration + 1}) had a non-finite loss or gradient; the run has diverged. Lower "
                        f"{lower_rates(self.config)} and start again. {self.checkpoint_note()}"
                    )
                return stop
            self.consecutive = 0
        self.optimizer.step()
        if self.average is not None:
            self.average.update(self.learner)
        self.pending.append(torch.stack([loss.float(), finite.float()]))
        return stop

    @property
    def model(self) -> Learner:
        """The learner that validation and the final test evaluate: the weight average if there is one."""
        return averaged(self.learner)

    def validate(self) -> dict[str, float]:
        """Validation metrics; raises :class:`DivergedError` if one is NaN or infinite."""
        with TaskProgress("validation", enabled=self.progress, total=count_tasks(self.val_tasks)) as bar:
            res = evaluate_sharded(
                self.model, self.val_tasks, self.val_steps, self.config["eval"]["chunk"], self.ctx, progress=bar
            )
        metrics = {f"val_{k.split('@')[0]}": v["mean"] for k, v in res.items()}
        bad = [f"{k} = {v}" for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise DivergedError(
                f"training diverged at iteration {self.iteration}: validation gave {', '.join(bad)}; training "
                f"stopped. Lower {lower_rates(self.config)} and start again. {self.checkpoint_note()}"
            )
        return metrics

    def save(self) -> None:
        if self.ctx.is_main:
            save_checkpoint(self.state(), self.run.checkpoint)
        self.saved_at = self.iteration

    def left_behind(self, signum: int) -> str:
        """What a second Ctrl-C leaves: the message of :class:`StoppedAtOnce`."""
        name = signal.Signals(signum).name
        if self.saved_at is None:
            return (
                f"{name} received again: stopped at once, without saving; no checkpoint was written yet "
                f"(iteration {self.iteration}). Start the run again."
            )
        return (
            f"{name} received again: stopped at once, without saving; {self.run.checkpoint} holds iteration "
            f"{self.saved_at}. Continue from there with `allmap train --resume {self.run.path}`."
        )

    def fit(self, callback: Callable[[int, Learner], None] | None = None) -> None:
        cfg = self.config
        total = cfg["iterations"]
        bar = progress_bar(self.progress, total=total, initial=self.iteration, desc="meta-train", unit="it")
        log_every = _log_interval(cfg["log_every"], total)
        start = time.perf_counter() - self.elapsed
        cpu_start = time.process_time() - self.cpu_elapsed
        # the bar is closed before any error reaches the user
        with bar, _StopSignals(self.left_behind, notice=self.ctx.is_main) as signals:
            while self.iteration < total:
                stop = self.step(signals.received is not None)
                self.iteration += 1
                it = self.iteration
                bar.update(1)
                end = it == total
                at_log = it % log_every == 0
                at_ckpt = it % cfg["checkpoint_every"] == 0 or end
                at_val = it % cfg["eval"]["every"] == 0 or end
                if at_log or at_ckpt or at_val:
                    rows = self.verify_pending()
                    if at_log:  # the next loss row averages the next window (an end off the schedule keeps it)
                        self.pending, self.checked = [], 0
                    self.elapsed = time.perf_counter() - start
                    self.cpu_elapsed = time.process_time() - cpu_start
                    row: dict[str, Any] = {
                        "iteration": it,
                        "seconds": round(self.elapsed, 3),
                        "cpu_seconds": round(self.cpu_elapsed, 3),
                    }
                    if rows is not None and (at_log or end):
                        row["loss"] = float(rows[:, 0].mean())
                    if at_val:
                        row.update(self.validate())
                    if set(row) - {"iteration", *TIME_KEYS}:
                        if self.skip:
                            row["skipped"] = self.skipped
                        self.log(row)
                        bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k not in ("iteration", *TIME_KEYS)})
                    if at_ckpt:
                        with signals.saving():
                            self.save()
                if callback is not None:
                    callback(it, self.learner)
                if stop and self.iteration < total:
                    self.verify_pending()  # never save weights that a non-finite step produced
                    self.elapsed = time.perf_counter() - start
                    self.cpu_elapsed = time.process_time() - cpu_start
                    with signals.saving():
                        self.save()
                    bar.close()
                    raise Interrupted(signals.received or signal.SIGTERM, it, self.run.checkpoint)
        bar.close()


def _log_interval(log_every: int, iterations: int) -> int:
    """Iterations between log rows: ``log_every``, or for a run shorter than that, a tenth of the run (so a
    short run's learning curve has points, not one dot at its end)."""
    return log_every if iterations >= log_every else max(1, iterations // 10)


def check_config(config: dict[str, Any]) -> None:
    """Everything ``train`` checks before its first iteration, without writing anything: the config's keys
    and types, building the task families, model, learner and optimizer, sizes against this machine's
    memory, the device, and one trial meta-batch. Raises :class:`~allmap.app.config.ConfigError`."""
    validate(config)
    _Trainer(config, RunDir("."), progress=False, ctx=Dist())


def _from_main(ctx: Dist, produce: Callable[[], bytes]) -> bytes:
    """Run ``produce`` on rank 0 and give its bytes to every rank; its ConfigError/CheckpointError is raised
    on every rank (so no rank waits forever for a rank that failed)."""
    if not ctx.active:
        return produce()
    payload = None
    if ctx.is_main:
        try:
            payload = b"\0" + produce()
        except (ConfigError, CheckpointError) as err:
            ctx.broadcast_bytes((b"\1" if isinstance(err, ConfigError) else b"\2") + str(err).encode())
            raise
    data = ctx.broadcast_bytes(payload)
    if data[:1] != b"\0":
        raise (ConfigError if data[:1] == b"\1" else CheckpointError)(data[1:].decode())
    return data[1:]


def train(
    config: dict[str, Any],
    out_dir: str | Path,
    progress: bool = True,
    callback: Callable[[int, Learner], None] | None = None,
) -> Learner:
    """Meta-train from a validated ``config`` into ``out_dir``, evaluate on the test tasks and plot.

    Under torchrun every rank calls this with the same arguments. If torchrun restarted the worker group
    (``--max-restarts``) and ``out_dir`` holds a checkpoint of this same config, the run continues from it.
    ``callback(iteration, learner)`` runs after every iteration (tests use it to interrupt a run);
    ``allmap.app.averaging.averaged(learner)`` is the model to evaluate there (the weight average with ``ema``).
    Returns the trained learner: the weight average when the config sets ``ema``.
    """
    ctx = current()
    run = RunDir(out_dir)
    wanted = yaml.safe_load(dump_config(config))

    def prepare() -> bytes:
        if run.checkpoint.exists():
            if restart_count() > 0 and run.config.is_file() and yaml.safe_load(run.config.read_text()) == wanted:
                return b"resume"
            raise ConfigError(
                f"{str(run.path)!r} already holds a run; continue it with `allmap train --resume "
                f"{run.path}` or choose another --out."
            )
        run.path.mkdir(parents=True, exist_ok=True)
        run.config.write_text(dump_config(config))
        run.metrics.write_text("")
        _write_classes(run, trainer.families)
        return b"new"

    trainer = _Trainer(config, run, progress, ctx)  # every check runs before the run folder is made
    if _from_main(ctx, prepare) == b"resume":
        return resume(out_dir, progress=progress, callback=callback)
    with marked_training(run, ctx.is_main):
        _fit_and_finish(trainer, callback)
    return trainer.model


def _fit_and_finish(trainer: _Trainer, callback: Callable[[int, Learner], None] | None) -> None:
    """Train, then test; a run that fails in training records ``status: failed`` and why in results.json."""
    try:
        trainer.fit(callback)
    except NonFiniteLossError as err:
        trainer.close_log()
        if trainer.ctx.is_main:
            trainer.run.write_results(
                {
                    "status": "failed",
                    "reason": str(err),
                    "stopped_after_iteration": trainer.iteration,
                    "protocol": None,
                    "metrics": None,
                }
            )
        raise
    except BaseException:  # interrupted: what was logged stays in the event files
        trainer.close_log()
        raise
    try:
        record = finish(trainer.run.path, trainer.model, trainer.config, trainer.ctx, progress=trainer.progress)
    except BaseException:
        trainer.close_log()
        raise
    trainer.close_log(record)


def resume(
    run_dir: str | Path,
    overrides: list[str] | None = None,
    progress: bool = True,
    callback: Callable[[int, Learner], None] | None = None,
) -> Learner:
    """Continue the run in ``run_dir`` from its checkpoint.

    ``overrides`` are ``key=value`` strings that may change only :data:`RESUMABLE_KEYS` (for example
    ``iterations=100000`` to train longer); anything else would make it a different run. Under torchrun,
    rank 0 reads the folder and sends the config and checkpoint bytes to the other ranks (no shared
    file system is needed).
    """
    ctx = current()
    run = RunDir(run_dir)
    before = yaml.safe_load(_from_main(ctx, lambda: dump_config(read_config(run_dir)).encode()))
    validate(before)
    config = apply_overrides(before, overrides or [])
    validate(config)
    changed = sorted(k for k in set(config) | set(before) if config.get(k) != before.get(k) and k not in RESUMABLE_KEYS)
    if changed:
        raise ConfigError(
            f"--resume can change only {', '.join(RESUMABLE_KEYS)}; changing {changed} would make it a "
            "different run. Start a new run with --out instead."
        )

    state = loads_checkpoint(
        _from_main(ctx, lambda: read_verified(run.checkpoint)), str(run.checkpoint), map_location="cpu"
    )
    done = state.get("iteration")
    if isinstance(done, int) and config["iterations"] < done:
        raise ConfigError(
            f"--resume: {str(run.path)!r} has trained {done} iterations, and "
            f"iterations={config['iterations']} would leave its weights past the end of its config. "
            f"Pass iterations >= {done} "
            f"(iterations={done} repeats only the final test), or start a new run with --out."
        )
    trainer = _Trainer(config, run, progress, ctx)
    trainer.restore(state)
    if ctx.is_main:  # the config changes only once the resumed run starts
        run.config.write_text(dump_config(config))
    with marked_training(run, ctx.is_main):
        _fit_and_finish(trainer, callback)
    return trainer.model


def _write_classes(run: RunDir, families: dict[str, Any]) -> None:
    """``RUN_DIR/classes.json``: the class names of each phase and where they came from, for class datasets
    (families whose data have names); nothing for the others."""
    names = {phase: getattr(getattr(f, "data", None), "names", None) for phase, f in families.items()}
    if not all(names.values()):
        return
    sources = {phase: f.describe() for phase, f in families.items() if callable(getattr(f, "describe", None))}
    run.classes.write_text(json.dumps({"sources": sources, **{p: list(n) for p, n in names.items()}}, indent=1) + "\n")


def finish(
    run_dir: str | Path, learner: Learner, config: dict[str, Any], ctx: Dist | None = None, progress: bool = False
) -> dict[str, Any]:
    """Final test evaluation (``results.json``) and plots of a run; sharded across ranks under torchrun,
    written by rank 0. A NaN or infinite test metric is written as null with ``status: failed`` and raises
    :class:`DivergedError`: it is not a result. ``progress``: a bar counting test tasks on rank 0's stderr
    (if it is a terminal)."""
    ctx = current() if ctx is None else ctx
    run = RunDir(run_dir)
    ev = config["eval"]
    family, record = evaluate_run(learner, config, ctx=ctx, progress=progress)
    if ctx.is_main:
        run.write_results(record)
        plot_learning_curve(
            run.read_metrics(),
            run.curve,
            title=f"{type(learner).__name__} on {config['task']['family']} ({run.path.name})",
        )
        if record["status"] == "ok":  # a diverged model has nothing to draw
            shown = task_batches(fixed_tasks(family, 4, ev["seed"]))[0].to(next(learner.parameters()).device)
            plot_adaptation(learner, family, shown, run.adaptation, steps=sorted({0, 1, max(ev["steps"])}))
    ctx.barrier()
    if record["status"] != "ok":
        raise DivergedError(
            f"the final test failed: {record['reason']}. Lower {lower_rates(config)} and train "
            f'again; {run.results} records status "failed".'
        )
    return {"protocol": record["protocol"], "metrics": record["metrics"]}


def format_run_results(res: dict[str, Any]) -> str:
    return format_results(res["metrics"], res["protocol"])
