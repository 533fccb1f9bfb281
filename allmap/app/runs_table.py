"""``allmap runs DIR``: one line per run folder (preset, learner, iterations done, status, wall time and the
final test metrics with their 95% CI), as aligned text, CSV or a Markdown table."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from allmap.app.config import ConfigError
from allmap.app.report import format_metric
from allmap.app.summary import RunSummary

__all__ = ["runs_table", "FORMATS", "wall_time"]

FORMATS = ("text", "csv", "markdown")

_COLUMNS = ("run", "preset", "learner", "task", "iterations", "status", "wall time")


def wall_time(seconds: float | None) -> str:
    """``h:mm:ss``, or seconds with one decimal under a minute (``-`` if unknown)."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _metric_names(runs: Sequence[RunSummary], wanted: Sequence[str] | None) -> list[str]:
    found: dict[str, None] = {}
    for run in runs:
        table = run.main_table
        for name in table.metrics if table else ():
            found.setdefault(name)
    if wanted is None:
        return list(found)
    unknown = [w for w in wanted if w not in found]
    if unknown:
        raise ConfigError(
            f"--metrics {','.join(unknown)}: no run has {'this metric' if len(unknown) == 1 else 'these metrics'}; "
            f"the runs have {', '.join(found) or 'no final metrics yet'}."
        )
    return list(wanted)


def _iterations(run: RunSummary) -> str:
    total = "?" if run.iterations_total is None else str(run.iterations_total)
    return f"{run.iterations_done}/{total}"


def _base(run: RunSummary, root_name: str) -> list[str]:
    source = run.preset or "own config"
    if run.changes:
        source += f" ({len(run.changes)} key{'s' * (len(run.changes) != 1)} changed)"
    return [root_name, source, run.learner, run.family, _iterations(run), run.status, wall_time(run.wall_seconds)]


def runs_table(
    runs: Sequence[RunSummary],
    fmt: str = "text",
    metrics: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
) -> str:
    """The table of ``runs``: ``fmt`` "text" (aligned columns), "csv" (mean and ci95 in their own columns,
    full precision) or "markdown". ``metrics`` chooses the metric columns (default: every final test metric
    of any run); ``names`` are the run labels (default: the folder names)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    cols = _metric_names(runs, metrics)
    labels = list(names) if names is not None else [r.name for r in runs]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*_COLUMNS, "wall seconds", *(f"{c} {part}" for c in cols for part in ("mean", "ci95"))])
        for label, run in zip(labels, runs):
            table = run.main_table.metrics if run.main_table else {}
            cells = [v for c in cols for v in (table.get(c, {}).get("mean"), table.get(c, {}).get("ci95"))]
            writer.writerow([*_base(run, label), run.wall_seconds, *("" if v is None else repr(v) for v in cells)])
        return out.getvalue()
    rows = [[*_COLUMNS, *cols]]
    for label, run in zip(labels, runs):
        table = run.main_table.metrics if run.main_table else {}
        rows.append([*_base(run, label), *(format_metric(c, table[c]) if c in table else "-" for c in cols)])
    if fmt == "markdown":
        lines = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        lines.insert(1, "|" + "|".join("---" for _ in rows[0]) + "|")
        return "\n".join(lines) + "\n"
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows) + "\n"
