"""What a run folder holds, read for people: its status, progress, evaluation tables, curves and figures.

Used by ``allmap runs`` (a table of the run folders under a directory) and ``allmap report`` (an HTML page).
Everything is read from the files a run writes (``config.yaml``, ``metrics.jsonl``, ``results.json``,
``checkpoint.pt``, figure files), so a run that is still training, was interrupted or failed is summarised
from what exists so far. The conventions a family follows to appear (evaluation tables anywhere in
``results.json``, a ``curves`` key, figure files with captions in ``figures.json``) are in docs/reports.md.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
import yaml

from allmap.app.config import ConfigError, list_presets, load_config, with_defaults
from allmap.app.runs import RunDir, training_process

__all__ = [
    "RunSummary",
    "MetricTable",
    "Figure",
    "summarize",
    "find_runs",
    "metric_tables",
    "read_rows",
    "step_curves",
    "FIGURE_SUFFIXES",
    "CAPTIONS",
    "finite",
    "other_numbers",
    "json_pointer",
]

#: figure files a report embeds: every file with one of these suffixes in the run folder
FIGURE_SUFFIXES = (".png", ".svg")

#: captions of the figures allmap's trainer writes; a run's ``figures.json`` may caption any other file
CAPTIONS = {
    "learning_curve.png": "Learning curve as drawn by the trainer: training query loss and validation metrics "
    "against meta-iterations.",
    "adaptation.png": "What the learner does on the first test tasks: adapted predictions against the true "
    "function (regression), or episodes with the predicted class of each query (classification).",
}

#: keys of a results.json that describe the record rather than hold numbers
_RECORD_TEXT = ("status", "reason", "protocol")

_STEP_METRIC = re.compile(r"^(?P<base>.+)@(?P<k>\d+)$")


@dataclass
class MetricTable:
    """An evaluation table found in ``results.json``: ``path`` is where (``("metrics",)`` for the test
    evaluation), ``metrics`` maps a metric name to its record (``mean``, ``ci95``, ``std``, ``n``), and
    ``protocol`` is the line naming what the numbers are (the protocol beside the table, if any)."""

    path: tuple[str, ...]
    metrics: dict[str, dict[str, Any]]
    protocol: str | None = None

    @property
    def title(self) -> str:
        return "test evaluation" if self.path == ("metrics",) else " / ".join(self.path)

    def pointer(self, metric: str, field_name: str) -> str:
        """The JSON pointer (RFC 6901) of one number of the table inside ``results.json``."""
        return json_pointer((*self.path, metric, field_name))


def json_pointer(parts: tuple[str, ...] | list[str]) -> str:
    """The JSON pointer (RFC 6901) of a path of keys: ``("metrics", "loss@0", "mean")`` -> ``/metrics/loss@0/mean``."""
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


@dataclass
class Figure:
    """A figure file of the run folder and its caption."""

    path: Path
    caption: str


@dataclass
class RunSummary:
    """One run folder as it is now; ``config`` is its config.yaml as written (None if unreadable)."""

    path: Path
    config: dict[str, Any] | None
    config_text: str
    rows: list[dict[str, Any]]
    results: dict[str, Any] | None
    iterations_done: int
    iterations_total: int | None
    wall_seconds: float | None
    status: str  #: "finished", "training" (a live process trains it now), "interrupted", "failed"
    reason: str | None
    preset: str | None
    changes: list[str] = field(default_factory=list)
    tables: list[MetricTable] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def learner(self) -> str:
        if (self.config or {}).get("kind") == "rl":  # meta-RL configs have one learner and name no other
            return "maml-rl"
        return _name(self.config, "learner", "name")

    @property
    def family(self) -> str:
        if (self.config or {}).get("kind") == "rl":
            return _name(self.config, "env", "name")
        return _name(self.config, "task", "family")

    @property
    def protocol(self) -> str | None:
        return self.results.get("protocol") if self.results else None

    @property
    def main_table(self) -> MetricTable | None:
        return next((t for t in self.tables if t.path == ("metrics",)), None)

    @property
    def source(self) -> str:
        """The preset the run was trained from with the keys it changed, or "own config"."""
        if self.preset is None:
            return "own config"
        return self.preset + "".join(f" {c}" for c in self.changes)


def _name(config: dict[str, Any] | None, section: str, key: str) -> str:
    """The component a config section names (``learner.name``), or ``?`` where the config does not say."""
    part = (config or {}).get(section)
    return str(part[key]) if isinstance(part, dict) and key in part else "?"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; a last line that is being written (not yet valid JSON) is left out,
    so a run that is still training can be read."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ConfigError(
                f"{str(path)!r} line {i + 1} is not JSON ({line[:60]!r}); a metrics log holds one JSON object "
                "per line. Fix or remove that line."
            ) from None
    return rows


def _is_record(value: Any) -> bool:
    """An evaluated metric: a mapping with a numeric (or null: not finite) ``mean``."""
    return (
        isinstance(value, dict)
        and "mean" in value
        and (value["mean"] is None or (isinstance(value["mean"], (int, float)) and not isinstance(value["mean"], bool)))
    )


def metric_tables(results: dict[str, Any], path: tuple[str, ...] = ()) -> list[MetricTable]:
    """Every evaluation table in ``results``: each mapping (at any depth, outside ``curves``) whose values are
    all metric records (``{"mean": ..., "ci95": ..., ...}``), with the ``protocol`` string beside it."""
    tables = []
    for key, value in results.items():
        if not isinstance(value, dict) or (not path and key == "curves"):
            continue
        if value and all(_is_record(v) for v in value.values()):
            protocol = results.get("protocol")
            tables.append(MetricTable((*path, key), value, protocol if isinstance(protocol, str) else None))
        else:
            tables.extend(metric_tables(value, (*path, key)))
    return tables


def other_numbers(results: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], float]]:
    """The numbers of ``results`` outside its evaluation tables and ``curves``: ``(path, value)`` of every
    numeric leaf (``("stopped_after_iteration",)``, ``("continual", "forgetting")``), lists left out."""
    out: list[tuple[tuple[str, ...], float]] = []
    for key, value in results.items():
        if not path and key == "curves":
            continue
        if isinstance(value, dict):
            if not (value and all(_is_record(v) for v in value.values())):
                out.extend(other_numbers(value, (*path, key)))
        elif finite(value):
            out.append(((*path, key), value))
    return out


def step_curves(metrics: dict[str, dict[str, Any]]) -> dict[str, list[tuple[int, str]]]:
    """Metrics named ``BASE@K`` (after K inner steps) grouped by BASE: ``{"loss": [(0, "loss@0"), ...]}``,
    sorted by K; only bases with at least two step counts (a curve)."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for name in metrics:
        m = _STEP_METRIC.match(name)
        if m:
            groups.setdefault(m["base"], []).append((int(m["k"]), name))
    return {base: sorted(points) for base, points in groups.items() if len(points) >= 2}


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:  # being written, or damaged: the summary says so
        return {"status": "failed", "reason": f"{path.name} is not valid JSON ({err.msg}, line {err.lineno})"}
    return data if isinstance(data, dict) else None


def _checkpoint_progress(path: Path) -> tuple[int | None, float | None]:
    """``(iteration, elapsed seconds)`` saved in a checkpoint, read lazily (memory-mapped: the weights are not
    read), or ``(None, None)`` if there is none or it cannot be read now (being written)."""
    if not path.is_file():
        return None, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a checkpoint being replaced or damaged: fall back to the metrics log
        return None, None
    if not isinstance(state, dict):
        return None, None
    it, elapsed = state.get("iteration"), state.get("elapsed")
    return (int(it) if isinstance(it, int) else None), (float(elapsed) if isinstance(elapsed, (int, float)) else None)


@cache
def _preset_by_description() -> dict[str, str]:
    found: dict[str, str] = {}
    for name, desc in list_presets().items():
        found.setdefault(desc, name)
    return found


@cache
def _preset_config(name: str) -> str:
    return json.dumps(load_config(name), sort_keys=True)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def _preset_of(config: dict[str, Any]) -> tuple[str | None, list[str]]:
    """The preset whose description the config carries, and the ``key=value`` settings where they differ."""
    name = _preset_by_description().get(str(config.get("description") or "").strip())
    if name is None:
        return None, []
    base, own = _flatten(json.loads(_preset_config(name))), _flatten(with_defaults(config))
    changed = [
        f"{k}={json.dumps(own.get(k))}"
        for k in sorted(set(base) | set(own))
        if k not in ("notes",) and base.get(k) != own.get(k)
    ]
    return name, changed


def _figures(run: Path) -> list[Figure]:
    """Every PNG or SVG file of the run folder (and of its ``figures/`` folder), with its caption from
    ``figures.json`` (file name -> caption), :data:`CAPTIONS`, or the file name."""
    captions = _read_json(run / "figures.json") or {}
    files = sorted(p for p in run.iterdir() if p.suffix.lower() in FIGURE_SUFFIXES and p.is_file())
    if (run / "figures").is_dir():
        files += sorted(p for p in (run / "figures").iterdir() if p.suffix.lower() in FIGURE_SUFFIXES and p.is_file())
    out = []
    for p in files:
        rel = p.relative_to(run).as_posix()
        caption = captions.get(rel) or CAPTIONS.get(rel) or p.stem.replace("_", " ").replace("-", " ")
        out.append(Figure(p, str(caption)))
    return out


def _status(
    results: dict[str, Any] | None, done: int, total: int | None, trainer: str | None = None
) -> tuple[str, str | None]:
    left = f"{done} of {total} iterations" if total is not None else f"{done} iterations"
    if trainer is not None:  # checked first: a resumed run keeps its earlier results.json until it ends
        return "training", f"{left} so far, trained now by {trainer}"
    if results is not None and results.get("status") == "failed":
        return "failed", str(results.get("reason") or "results.json records status failed")
    if results is not None and results.get("status") == "ok" and (total is None or done >= total):
        return "finished", None
    return "interrupted", f"{left} so far, no final test yet (stopped; continue with allmap train --resume)"


def summarize(path: str | Path) -> RunSummary:
    """Read the run folder ``path`` as it is now (finished, failed, interrupted or still training)."""
    run = RunDir(path)
    if not run.config.is_file():
        raise ConfigError(
            f"{str(run.path)!r} is not a run folder: it has no config.yaml. Train one with "
            "`allmap train PRESET --out DIR`."
        )
    text = run.config.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    config = data if isinstance(data, dict) else None  # as written: no defaults shown as if the run set them
    rows = read_rows(run.metrics)
    results = _read_json(run.results)
    ck_iter, ck_elapsed = _checkpoint_progress(run.checkpoint)
    logged = max((int(r["iteration"]) for r in rows if isinstance(r.get("iteration"), int)), default=0)
    done = max(logged, ck_iter or 0)
    if results is not None and isinstance(results.get("stopped_after_iteration"), int):
        done = max(done, results["stopped_after_iteration"])
    total = config["iterations"] if config and isinstance(config.get("iterations"), int) else None
    seconds = [float(r["seconds"]) for r in rows if isinstance(r.get("seconds"), (int, float))]
    wall = max([*seconds, *([ck_elapsed] if ck_elapsed is not None else [])], default=None)
    status, reason = _status(results, done, total, training_process(run))
    preset, changes = _preset_of(config) if config else (None, [])
    tables = metric_tables(results) if results else []
    return RunSummary(
        path=run.path,
        config=config,
        config_text=text,
        rows=rows,
        results=results,
        iterations_done=done,
        iterations_total=total,
        wall_seconds=wall,
        status=status,
        reason=reason,
        preset=preset,
        changes=changes,
        tables=tables,
        figures=_figures(run.path),
    )


def find_runs(root: str | Path) -> list[Path]:
    """The run folders (folders holding a ``config.yaml``) under ``root``, itself included, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{str(root)!r} is not a folder; pass the folder that holds your run folders (e.g. runs).")
    found = {p.parent for p in root.rglob("config.yaml") if p.is_file()}
    return sorted(found)


def finite(x: Any) -> bool:
    """Whether ``x`` is a finite number (not null, NaN, a bool or text)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
