"""The run folder: what a training run leaves behind, and loading a trained learner back from it.

RUN_DIR/config.yaml        the resolved config (copy it to start a new run)
RUN_DIR/metrics.jsonl      one JSON object per log step (training loss, validation metrics, wall-clock
                           "seconds" and process "cpu_seconds" since the run began, resumes included)
RUN_DIR/checkpoint.pt      weights, optimizer and RNG state (+ checkpoint.pt.sha256)
RUN_DIR/results.json       "status" ("ok" or "failed", with the "reason"), the final test evaluation
                           (mean ± 95% CI) and its protocol
RUN_DIR/classes.json       class datasets: the class names of each phase (train, val, test), and their source
RUN_DIR/learning_curve.png, RUN_DIR/adaptation.png
RUN_DIR/training.json      while a process trains the run: its host and pid (``allmap runs`` shows "training")
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from allmap.app.build import build_family, build_learner, resolve_device
from allmap.app.checkpoint import CheckpointError, load_checkpoint
from allmap.app.config import ConfigError, read_yaml, validate, with_defaults
from allmap.learners.base import Learner

__all__ = [
    "TIME_KEYS",
    "RunDir",
    "load",
    "load_weights",
    "read_config",
    "to_json",
    "results_record",
    "non_finite_metrics",
    "marked_training",
    "training_process",
]


#: the keys of a metrics row that time the run rather than measure the learner
TIME_KEYS = ("seconds", "cpu_seconds", "cpu_time")  # cpu_time: the process time of meta-RL runs


def _nulls(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nulls(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nulls(v) for v in value]
    return value


def to_json(value: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``value``: NaN and infinities become null (bare ``NaN`` is not JSON)."""
    return json.dumps(_nulls(value), indent=indent, allow_nan=False)


def non_finite_metrics(metrics: dict[str, dict[str, float]]) -> list[str]:
    """Names of the metrics whose mean, CI or std is NaN or infinite."""
    return [
        name for name, r in metrics.items() if any(isinstance(v, float) and not math.isfinite(v) for v in r.values())
    ]


def results_record(protocol: str, metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
    """An evaluation as written to ``results.json`` and ``allmap eval --json``: ``status`` "ok", or "failed"
    with a ``reason`` when a metric is not finite (written as null: such a number is not a result)."""
    bad = non_finite_metrics(metrics)
    record: dict[str, Any] = {"status": "failed" if bad else "ok"}
    if bad:
        record["reason"] = (
            f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not finite (NaN or infinite, "
            "written as null): the model or its adaptation diverged"
        )
    return {**record, "protocol": protocol, "metrics": _nulls(metrics)}


class RunDir:
    """Paths inside a run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoint = self.path / "checkpoint.pt"
        self.results = self.path / "results.json"
        self.classes = self.path / "classes.json"
        self.curve = self.path / "learning_curve.png"
        self.adaptation = self.path / "adaptation.png"
        self.marker = self.path / "training.json"

    def write_results(self, record: dict[str, Any]) -> None:
        """Write ``results.json`` (strict JSON)."""
        self.results.write_text(to_json(record, indent=2) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]


@contextmanager
def marked_training(run: RunDir, main: bool = True) -> Iterator[None]:
    """Mark ``run`` as being trained by this process (``training.json``: host and pid) while the block runs;
    only ``main`` (rank 0) writes it. A process killed without cleanup leaves the marker behind, and
    :func:`training_process` then finds its pid gone."""
    if main:
        run.marker.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}) + "\n")
    try:
        yield
    finally:
        if main:
            run.marker.unlink(missing_ok=True)


def training_process(run: RunDir) -> str | None:
    """Who trains ``run`` now: ``"pid N"`` for a live process on this host, ``"host H (not checked from
    here)"`` for a marker written on another host, ``None`` when no process trains it."""
    try:
        mark = json.loads(run.marker.read_text())
        host, pid = str(mark["host"]), int(mark["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return f"host {host} (not checked from here)"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    return f"pid {pid}"


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config of a run folder, validated."""
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise ConfigError(
            f"{str(run.path)!r} is not a run folder: it has no config.yaml. Train one with "
            "`allmap train PRESET --out DIR`."
        )
    data = read_yaml(run.config)
    if not isinstance(data, dict):
        raise ConfigError(f"{str(run.config)!r} must hold a mapping of config keys, got {type(data).__name__}.")
    config = with_defaults(data)  # a run written before a key existed gets that key's default
    validate(config)
    return config


def load(
    run_dir: str | Path, device: str | torch.device | None = None, config: dict[str, Any] | None = None
) -> Learner:
    """The trained learner of a run folder (weights of its latest checkpoint, their average if the run set
    ``ema``), in eval mode.

    ``config`` (default: the run's own) builds the learner that receives the weights: the run's config with
    test-time changes such as ``learner.test_shift`` or ``learner.inner_lr`` (``allmap eval RUN --set ...``).
    A config whose learner has other parameters than the checkpoint is an error.

    Example:
        >>> learner = allmap.load("runs/sine")            # doctest: +SKIP
        >>> task_model = learner.adapt(support_x, support_y)  # doctest: +SKIP
    """
    config = read_config(run_dir) if config is None else config
    return _into_learner(load_checkpoint(RunDir(run_dir).checkpoint, map_location="cpu"), config, str(run_dir), device)


def load_weights(path: str | Path, config: dict[str, Any], device: str | torch.device | None = None) -> Learner:
    """The learner of ``config`` (a preset or config file's, resolved) with the weights in the file ``path``: a
    ``checkpoint.pt`` that allmap wrote (its weight average if it has one), or a learner ``state_dict`` saved
    with ``torch.save`` (read weights-only: loading never runs code). ``allmap eval PRESET --weights PATH``."""
    if not Path(path).is_file():
        raise ConfigError(f"--weights {str(path)!r} is not a file; pass a checkpoint.pt or a saved state_dict.")
    return _into_learner(load_checkpoint(path, map_location="cpu"), config, str(path), device)


def _into_learner(
    state: dict[str, Any], config: dict[str, Any], source: str, device: str | torch.device | None
) -> Learner:
    """Build the learner of ``config`` and load the weights of ``state`` (a checkpoint, or a bare state_dict)."""
    device = resolve_device(config["device"]) if device is None else torch.device(device)
    torch.manual_seed(config["seed"])
    learner = build_learner(config, build_family(config, "test"))
    if "learner" in state:  # a checkpoint; a run with `ema` is evaluated with its weight average
        weights = state["averaged"]["module"] if "averaged" in state else state["learner"]
    elif state and all(isinstance(v, torch.Tensor) for v in state.values()):
        weights = state
    else:
        raise CheckpointError(f"checkpoint of {source!r} has no learner weights.")
    try:
        learner.load_state_dict(weights)
    except RuntimeError as err:
        raise ConfigError(
            f"the weights of {source!r} do not fit the learner of this config: "
            f"{str(err).splitlines()[-1].strip() or err}. At evaluation, override only settings that keep the "
            "parameters (e.g. learner.inner_lr, learner.test_shift, eval.*), not model or learner sizes."
        ) from None
    return learner.to(device).eval()
