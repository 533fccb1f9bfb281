"""Run folders for the report tests (not collected: no test_ prefix): one real tiny training run with
TensorBoard on, and synthetic folders of the other kinds a report meets (another family's tables, curves and
figures; a run still training; a failed run). Made once per test session."""

from __future__ import annotations

import json
from pathlib import Path

from allmap.app import load_config, train

TINY = [
    "iterations=12",
    "meta_batch=4",
    "log_every=3",
    "checkpoint_every=6",
    "eval.tasks=20",
    "eval.every=6",
    "eval.val_tasks=8",
    "eval.queries=20",
    "threads=1",
]

_MADE: dict[str, dict[str, Path]] = {}


def _record(mean: float, ci: float, n: int = 50) -> dict[str, float]:
    return {"mean": mean, "ci95": ci, "std": ci * n**0.5 / 1.96, "n": n}


SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="120" height="60" viewBox="0 0 120 60">'
    '<rect width="120" height="60" fill="#eef"/><path d="M0 50 L60 10 L120 40" stroke="#1f77b4" fill="none"/></svg>'
)


def _new_family(path: Path) -> Path:
    """A run of a family the report does not know: tables nested in results.json, curves, an SVG figure."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(
        "description: a neural process on GP regression\niterations: 40\ntask: {family: gp}\n"
        "learner: {name: cnp}\nmodel: {name: mlp}\n"
    )
    rows = [{"iteration": i, "seconds": 0.1 * i, "loss": 2.0 / i} for i in (10, 20, 30, 40)]
    rows[-1]["val_target_loglik"] = -1.25
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {
        "status": "ok",
        "protocol": "gp 3..9 context points, 50 fixed test tasks (seed 1000); mean ± 95% CI",
        "metrics": {"target_loglik": _record(-1.2307117, 0.0274), "mse": _record(0.74422, 0.04455)},
        "baselines": {
            "oracle": {
                "protocol": "the exact GP posterior on the same 50 tasks",
                "metrics": {"target_loglik": _record(1.3646318, 0.0487), "coverage95": _record(0.97580303, 0.00466)},
            }
        },
        "stream": {"forgetting": 0.1234567, "classes": 100, "order": [3, 1, 2]},
        "curves": {
            "accuracy_vs_classes": {
                "title": "accuracy against classes seen",
                "x_label": "classes seen",
                "y_label": "accuracy",
                "x": [10, 50, 100],
                "series": {"held-out": {"mean": [0.91, 0.82, 0.761], "ci95": [0.01, 0.012, 0.02]}},
            }
        },
    }
    (path / "results.json").write_text(json.dumps(results, indent=1))
    (path / "predictive_bands.svg").write_text(SVG)
    (path / "figures.json").write_text(json.dumps({"predictive_bands.svg": "Predictive mean and 95% band"}))
    return path


def _training(path: Path) -> Path:
    """A run still training: config, a metrics log whose last line is being written, no results."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(
        "description: still going\niterations: 1000\ntask: {family: sinusoid}\nlearner: {name: maml}\n"
    )
    (path / "metrics.jsonl").write_text(
        '{"iteration": 100, "seconds": 1.5, "loss": 3.5}\n{"iteration": 200, "seconds": 3.25, "loss": 2.75, '
        '"val_loss": 2.5}\n{"iteration": 300, "sec'
    )
    return path


def _failed(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("iterations: 50\nlearner: {name: maml}\n")
    (path / "metrics.jsonl").write_text('{"iteration": 10, "seconds": 0.5, "loss": 1e9}\n')
    (path / "results.json").write_text(
        json.dumps(
            {
                "status": "failed",
                "reason": "training diverged at iteration 10",
                "stopped_after_iteration": 10,
                "protocol": None,
                "metrics": None,
            }
        )
    )
    return path


def report_runs(tmp_path_factory) -> dict[str, Path]:
    """``{"maml": ..., "metasgd": ..., "np": ..., "training": ..., "failed": ...}`` under one session folder."""
    if "runs" not in _MADE:
        root = tmp_path_factory.mktemp("report-runs")
        train(load_config("sinusoid-maml", [*TINY, "log.tensorboard=true"]), root / "maml", progress=False)
        train(load_config("logistic2d-metasgd", TINY), root / "metasgd", progress=False)
        _MADE["runs"] = {
            "maml": root / "maml",
            "metasgd": root / "metasgd",
            "np": _new_family(root / "np"),
            "training": _training(root / "training"),
            "failed": _failed(root / "failed"),
        }
    return _MADE["runs"]
