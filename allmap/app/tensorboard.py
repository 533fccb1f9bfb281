"""TensorBoard logging of a run (``log: {tensorboard: true}``), through ``torch.utils.tensorboard``.

Event files go to ``RUN_DIR/tensorboard/``; ``tensorboard --logdir runs`` then shows every run. Written by
rank 0 only, beside (never instead of) ``metrics.jsonl``:

- every row of the metrics log as scalars at its iteration: ``train/loss``, ``val/loss``, ``val/accuracy``
  (``val_X`` becomes ``val/X``, any other key ``train/KEY``) and ``time/seconds``;
- the final test evaluation: each metric's mean as ``test/METRIC`` and its CI as ``test_ci95/METRIC`` at the
  last iteration, and the table as Markdown text (``test/evaluation``) under its protocol line;
- the hyperparameters (the config's scalar settings, flattened: ``learner.inner_lr``, ...) with the test
  means (``hparams/METRIC``), in TensorBoard's HParams tab.

A resumed run purges events after its checkpoint's iteration, so the curves continue without a doubled
stretch. ``tensorboard`` is an optional extra: ``pip install "allmap[tensorboard]"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from allmap.app.config import ConfigError
from allmap.app.report import format_metric
from allmap.app.runs import TIME_KEYS

__all__ = ["TensorBoardLog", "enabled", "hparams", "require"]

_ROW_KEYS = ("iteration", *TIME_KEYS)


def enabled(config: dict[str, Any]) -> bool:
    """Whether the config asks for TensorBoard logging (``log: {tensorboard: true}``)."""
    return bool((config.get("log") or {}).get("tensorboard", False))


def hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config's scalar settings flattened to ``section.key`` (text, numbers and booleans; lists as text),
    without the free-text keys."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in ("description", "notes", "imports", "log"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif value is not None:
            out[name] = str(value)
    return out


def require() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, or a ConfigError saying how to install tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError(
            f"log.tensorboard: true needs the tensorboard package ({err}); install it with "
            '`pip install "allmap[tensorboard]"` or set log.tensorboard=false.'
        ) from None
    return SummaryWriter


class TensorBoardLog:
    """A ``SummaryWriter`` on ``RUN_DIR/tensorboard``; ``start`` is the iteration training (re)starts at: the
    events logged after it by an earlier process (past the checkpoint resumed from) are purged, those at it
    kept, as ``metrics.jsonl`` keeps its rows up to the checkpoint."""

    def __init__(self, run_dir: str | Path, start: int = 0) -> None:
        SummaryWriter = require()
        self.dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(str(self.dir), purge_step=start + 1 if start > 0 else None)

    def row(self, row: dict[str, Any]) -> None:
        """One row of the metrics log as scalars at its iteration."""
        step = int(row["iteration"])
        for key, value in row.items():
            if key in _ROW_KEYS or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
            self.writer.add_scalar(tag, value, step)
        for key in TIME_KEYS:
            if key in row:
                self.writer.add_scalar(f"time/{key}", row[key], step)
        self.writer.flush()

    def evaluation(self, record: dict[str, Any], config: dict[str, Any], step: int) -> None:
        """The final test evaluation (scalars, a Markdown table) and the run's hyperparameters."""
        metrics = record.get("metrics") or {}
        finals: dict[str, float] = {}
        for name, r in metrics.items():
            if r.get("mean") is not None:
                self.writer.add_scalar(f"test/{name}", r["mean"], step)
                finals[f"hparams/{name}"] = r["mean"]
            if r.get("ci95") is not None:
                self.writer.add_scalar(f"test_ci95/{name}", r["ci95"], step)
        table = "\n".join(
            ["| metric | mean ± 95% CI | tasks |", "|---|---|---|"]
            + [f"| {name} | {format_metric(name, r)} | {r.get('n', '')} |" for name, r in metrics.items()]
        )
        self.writer.add_text("test/evaluation", f"{record.get('protocol') or ''}\n\n{table}", step)
        self.writer.add_hparams(hparams(config), finals, run_name=".")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
