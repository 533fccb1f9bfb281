"""``allmap report RUN [RUN ...]``: one self-contained HTML page about one or several run folders.

The page needs no network: charts are inline SVG drawn from ``metrics.jsonl`` and ``results.json``, figure
files are embedded as data URIs, the one small script (legend buttons that show or hide a line) is inline.
Per run: its status and progress, the preset it came from and what it changed, the protocol line, every
evaluation table of ``results.json`` (mean ± 95% CI), learning and validation curves, adaptation curves
(metrics named ``BASE@K``: after K inner steps, with their CI), the curves a family writes under
``results.json["curves"]``, every PNG/SVG figure of the folder with its caption, and the config. With several
runs, a comparison table aligned by metric and every curve overlaid. A run that is still training is shown
with what exists so far.

Every number drawn from a file is an element that says where it comes from (``data-src``, e.g.
``results.json#/metrics/loss@0/mean`` or ``metrics.jsonl#3/val_loss``) and holds its exact value
(``data-value`` / ``data-y``), so a reader (and a test) can check the page against the files.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from allmap import __version__
from allmap.app.report import format_number
from allmap.app.runs import TIME_KEYS
from allmap.app.runs_table import wall_time
from allmap.app.summary import (
    Figure,
    MetricTable,
    RunSummary,
    finite,
    json_pointer,
    other_numbers,
    step_curves,
    summarize,
)
from allmap.app.svg import PALETTE, Point, Series, line_chart

__all__ = ["build_report", "write_report", "resolve_source", "run_labels", "MAX_IMAGE_BYTES"]

#: an embedded image larger than this is re-encoded at a lower resolution (keeps a report of many runs small)
MAX_IMAGE_BYTES = 1_500_000

_LOWER_BETTER = ("loss", "mse", "error", "nll", "regret")
_HIGHER_BETTER = ("accuracy", "return", "loglik", "reward")
_ROW_KEYS = ("iteration", "skipped", *TIME_KEYS)

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1b1b1b;background:#fafafa}
main{max-width:1180px;margin:auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0}h2{font-size:19px;margin:28px 0 6px;border-bottom:2px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;background:#fff}
th,td{border:1px solid #ddd;padding:3px 9px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}th{background:#f0f0f0}
.best{font-weight:700;background:#eef7ee}.protocol{color:#333;background:#fff;border-left:3px solid #1f77b4;
padding:4px 8px;margin:6px 0}.warn{color:#8a4b00;background:#fff4e0;padding:4px 8px;border-left:3px solid #e69500}
.status{display:inline-block;padding:1px 8px;border-radius:9px;font-size:12px;color:#fff;vertical-align:middle}
.finished{background:#2ca02c}.training{background:#1f77b4}.interrupted{background:#e69500}.failed{background:#d62728}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:14px}
figure{margin:0;background:#fff;border:1px solid #e2e2e2;padding:8px}figcaption{font-size:12.5px;color:#444}
svg.chart{width:100%;height:auto;display:block}svg .grid line{stroke:#e6e6e6}
svg text{font-size:11px;fill:#555}svg .axis-label{font-size:12px;fill:#222}
.legend button{border:1px solid #ccc;background:#fff;margin:2px 4px 0 0;padding:1px 7px;cursor:pointer;font:12px system-ui}
.legend button.off{opacity:.35}.swatch{display:inline-block;width:14px;height:3px;margin:0 5px 3px 0;vertical-align:middle}
.series.off{display:none}img.figure{max-width:100%;height:auto;display:block}
.figures figure{margin:0 0 14px;width:fit-content;max-width:100%}
pre{background:#fff;border:1px solid #e2e2e2;padding:8px;overflow:auto;font-size:12px}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:6px 0}dl.meta dt{color:#666}
dl.meta dd{margin:0}
"""

_SCRIPT = """
document.querySelectorAll('.legend button').forEach(function (b) {
  b.addEventListener('click', function () {
    var chart = document.getElementById(b.parentNode.dataset.chart);
    var g = chart.querySelector('g.series[data-series="' + b.dataset.series + '"]');
    var off = !b.classList.contains('off');
    b.classList.toggle('off', off);
    b.setAttribute('aria-pressed', String(!off));
    if (g) { g.classList.toggle('off', off); }
  });
});
"""


class _Ids:
    """Unique, readable element ids (``run0-eval-loss-at-10``)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, *parts: Any) -> str:
        base = "-".join(re.sub(r"[^A-Za-z0-9]+", "-", str(p).replace("@", "-at-")).strip("-") for p in parts)
        name, k = base, 2
        while name in self.used:
            name, k = f"{base}-{k}", k + 1
        self.used.add(name)
        return name


def _e(text: Any) -> str:
    return html.escape(str(text))


def _num(ids: _Ids, key: str, value: Any, src: str, run: int, *id_parts: Any) -> str:
    """One number from a file, as shown (:func:`format_number`), with its exact value and source."""
    exact = repr(value) if finite(value) else "null"
    shown = (
        str(value)
        if isinstance(value, int) and not isinstance(value, bool)
        else format_number(key, value if finite(value) else None)
    )
    return (
        f'<span class="num" id="{ids(*id_parts)}" data-run="{run}" data-src="{_e(src)}" data-key="{_e(key)}" '
        f'data-value="{exact}" title="{_e(exact)}">{_e(shown)}</span>'
    )


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Short names for the runs: their folder names, with parent folders added where two names clash."""
    labels = [p.name for p in paths]
    depth = 1
    while len(set(labels)) < len(labels) and depth < 8:
        depth += 1
        labels = ["/".join(p.parts[-depth:]) for p in paths]
    return labels


def _legend(chart_id: str, series: Sequence[Series]) -> str:
    buttons = "".join(
        f'<button type="button" data-series="{k}" aria-pressed="true"><span class="swatch" '
        f'style="background:{s.color}"></span>{_e(s.name)}</button>'
        for k, s in enumerate(series)
    )
    return f'<div class="legend" data-chart="{chart_id}">{buttons}</div>'


def _chart(chart_id: str, title: str, series: list[Series], x_label: str, y_label: str, caption: str) -> str:
    percent = y_label.startswith("accuracy") or y_label.startswith("val_accuracy")
    svg = line_chart(chart_id, series, x_label, y_label, percent=percent)
    return (
        f'<figure class="plot"><h3>{_e(title)}</h3>{svg}{_legend(chart_id, series)}'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _row_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if k not in _ROW_KEYS and (finite(v) or v is None):
                keys.setdefault(k)
    return list(keys)


def _base(key: str) -> str:
    return key[4:] if key.startswith("val_") else key


def _row_series(rows: Sequence[dict[str, Any]], key: str, name: str, color: str, dashed: bool = False) -> Series:
    points = [
        Point(float(r["iteration"]), r[key] if finite(r[key]) else None, src=f"metrics.jsonl#{i}/{key}")
        for i, r in enumerate(rows)
        if key in r and isinstance(r.get("iteration"), (int, float))
    ]
    return Series(name, points, color=color, dashed=dashed)


def _learning_curves(ids: _Ids, i: int, run: RunSummary) -> list[str]:
    """One chart per metric of the log (training loss with its validation loss, validation accuracy, ...)."""
    groups: dict[str, list[str]] = {}
    for key in _row_keys(run.rows):
        groups.setdefault(_base(key), []).append(key)
    out = []
    for base, keys in groups.items():
        series = [
            _row_series(
                run.rows,
                k,
                ("validation " if k.startswith("val_") else "training ") + _base(k),
                PALETTE[n % len(PALETTE)],
                dashed=k.startswith("val_"),
            )
            for n, k in enumerate(keys)
        ]
        out.append(
            _chart(
                ids(f"run{i}", "curve", base),
                f"{base} during meta-training",
                series,
                "meta-iteration",
                base,
                "From metrics.jsonl: the training value is the mean over the meta-batches since the last log "
                "row; validation on the run's fixed validation tasks.",
            )
        )
    return out


def _table_points(table: MetricTable, steps: list[tuple[int, str]]) -> list[Point]:
    return [
        Point(
            float(k),
            table.metrics[name].get("mean") if finite(table.metrics[name].get("mean")) else None,
            table.metrics[name].get("ci95") if finite(table.metrics[name].get("ci95")) else None,
            src="results.json#" + table.pointer(name, "mean"),
        )
        for k, name in steps
    ]


def _adaptation_curves(ids: _Ids, i: int, run: RunSummary) -> list[str]:
    out = []
    for t, table in enumerate(run.tables):
        for base, steps in step_curves(table.metrics).items():
            series = [Series(base, _table_points(table, steps), color=PALETTE[0])]
            where = "" if table.path == ("metrics",) else f" ({table.title})"
            out.append(
                _chart(
                    ids(f"run{i}", "adapt", *(() if t == 0 else (f"t{t}",)), base),
                    f"{base} against inner steps{where}",
                    series,
                    "inner steps",
                    base,
                    f"From results.json ({base}@K): mean over the test tasks after K inner steps, bars 95% CI.",
                )
            )
    return out


def _family_curves(results: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The ``curves`` a family writes in results.json: ``{name: {x, series: {label: {mean, ci95}}, ...}}``."""
    curves = (results or {}).get("curves")
    if not isinstance(curves, dict):
        return {}
    return {k: v for k, v in curves.items() if isinstance(v, dict) and isinstance(v.get("x"), list)}


def _curve_series(name: str, curve: dict[str, Any], label: str, color: str, dashed: bool = False) -> Series:
    values = curve["series"][label] if isinstance(curve.get("series"), dict) else {}
    mean = values.get("mean", []) if isinstance(values, dict) else values
    ci = values.get("ci95", []) if isinstance(values, dict) else []
    key = "mean" if isinstance(values, dict) else None
    points = []
    for n, x in enumerate(curve["x"]):
        y = mean[n] if n < len(mean) else None
        c = ci[n] if n < len(ci) else None
        ptr = f"/curves/{name}/series/{label}" + (f"/{key}" if key else "") + f"/{n}"
        points.append(Point(float(x), y if finite(y) else None, c if finite(c) else None, src="results.json#" + ptr))
    return Series(label, points, color=color, dashed=dashed)


def _curves_of_family(ids: _Ids, i: int, run: RunSummary) -> list[str]:
    out = []
    for name, curve in _family_curves(run.results).items():
        labels = list(curve.get("series") or {})
        series = [_curve_series(name, curve, lab, PALETTE[n % len(PALETTE)]) for n, lab in enumerate(labels)]
        out.append(
            _chart(
                ids(f"run{i}", "family-curve", name),
                str(curve.get("title") or name),
                series,
                str(curve.get("x_label") or "x"),
                str(curve.get("y_label") or name),
                str(curve.get("caption") or f"From results.json (curves/{name}); bars: 95% CI where given."),
            )
        )
    return out


def _metric_table(ids: _Ids, i: int, t: int, table: MetricTable) -> str:
    tid = ids(f"run{i}", "eval" if t == 0 else f"table{t}")
    rows = []
    for name, r in table.metrics.items():
        cells = [
            _num(ids, name, r.get(f), "results.json#" + table.pointer(name, f), i, tid, name, f) if f in r else "-"
            for f in ("mean", "ci95", "std")
        ]
        n = r.get("n")
        n_cell = _num(ids, "n", n, "results.json#" + table.pointer(name, "n"), i, tid, name, "n") if "n" in r else "-"
        rows.append(
            f'<tr id="{ids(tid, name, "row")}"><th scope="row">{_e(name)}</th><td class="n">{cells[0]} ± {cells[1]}</td>'
            f'<td class="n">{cells[2]}</td><td class="n">{n_cell}</td></tr>'
        )
    protocol = f'<p class="protocol">{_e(table.protocol)}</p>' if table.protocol else ""
    return (
        f'<h3>{_e(table.title)}</h3>{protocol}<table id="{tid}" class="metrics"><thead><tr><th>metric</th>'
        f"<th>mean ± 95% CI</th><th>std</th><th>tasks</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _other_numbers(ids: _Ids, i: int, run: RunSummary) -> str:
    """The numbers of results.json outside its tables (a family's own summary figures), one row each."""
    found = other_numbers(run.results or {})
    if not found:
        return ""
    tid = ids(f"run{i}", "fields")
    rows = "".join(
        f'<tr><th scope="row">{_e(" / ".join(path))}</th><td class="n">'
        f"{_num(ids, path[-1], value, 'results.json#' + json_pointer(path), i, tid, *path)}</td></tr>"
        for path, value in found
    )
    return f'<h3>other numbers in results.json</h3><table id="{tid}" class="metrics"><tbody>{rows}</tbody></table>'


def _image(figure: Figure, limit: int) -> tuple[str, str]:
    """``(data URI, note)`` of a figure file; a PNG over ``limit`` bytes is shrunk until it fits."""
    data = figure.path.read_bytes()
    if figure.path.suffix.lower() == ".svg":
        return "data:image/svg+xml;base64," + base64.b64encode(data).decode(), ""
    note = ""
    if len(data) > limit:
        from PIL import Image  # matplotlib's dependency: there wherever allmap's plots are

        with Image.open(io.BytesIO(data)) as img:
            scale = 1.0
            while len(data) > limit and scale > 0.1:
                scale *= 0.7
                size = (max(1, int(img.width * scale)), max(1, int(img.height * scale)))
                buf = io.BytesIO()
                img.resize(size, Image.LANCZOS).save(buf, format="PNG", optimize=True)
                data = buf.getvalue()
            note = f" (shown at {100 * scale:.0f}% of its resolution; the file in the run folder is full size)"
    return "data:image/png;base64," + base64.b64encode(data).decode(), note


def _figures(ids: _Ids, i: int, run: RunSummary, limit: int) -> str:
    parts = []
    for fig in run.figures:
        src, note = _image(fig, limit)
        rel = fig.path.relative_to(run.path).as_posix()
        parts.append(
            f'<figure id="{ids(f"run{i}", "fig", fig.path.stem)}" class="file"><h3>{_e(rel)}</h3>'
            f'<img class="figure" src="{src}" alt="{_e(fig.caption)}"><figcaption>{_e(fig.caption)}{_e(note)}'
            "</figcaption></figure>"
        )
    return f'<div class="figures">{"".join(parts)}</div>' if parts else "<p>No figure files yet.</p>"


def _run_section(ids: _Ids, i: int, run: RunSummary, label: str, limit: int) -> str:
    sid = f"run{i}"
    ids.used.add(sid)
    desc = (run.config or {}).get("description") or ""
    status = f'<span id="{ids(sid, "status")}" class="status {run.status}">{run.status}</span>'
    reason = f'<p class="warn" id="{ids(sid, "reason")}">{_e(run.reason)}</p>' if run.reason else ""
    meta = (
        f'<dl class="meta"><dt>folder</dt><dd>{_e(run.path)}</dd><dt>from</dt><dd>{_e(run.source)}</dd>'
        f"<dt>learner</dt><dd>{_e(run.learner)}</dd><dt>task</dt><dd>{_e(run.family)}</dd>"
        f'<dt>iterations</dt><dd id="{ids(sid, "iterations")}">{run.iterations_done} of '
        f"{run.iterations_total if run.iterations_total is not None else '?'}</dd>"
        f"<dt>wall time</dt><dd>{wall_time(run.wall_seconds)} (training and validation)</dd></dl>"
    )
    tables = "".join(_metric_table(ids, i, t, table) for t, table in enumerate(run.tables))
    if not run.tables:
        tables = '<p class="warn">No final evaluation yet.</p>' if run.status != "failed" else ""
    tables += _other_numbers(ids, i, run)
    charts = _learning_curves(ids, i, run) + _adaptation_curves(ids, i, run) + _curves_of_family(ids, i, run)
    charts_html = f'<div class="charts">{"".join(charts)}</div>' if charts else "<p>No logged metrics yet.</p>"
    return (
        f'<section id="{sid}" class="run" data-path="{_e(run.path)}"><h2>{_e(label)} {status}</h2>'
        f"<p>{_e(desc)}</p>{reason}{meta}{tables}<h3>curves</h3>{charts_html}"
        f"<h3>figures in the run folder</h3>{_figures(ids, i, run, limit)}"
        f'<details id="{ids(sid, "config")}"><summary>config.yaml</summary><pre>{_e(run.config_text)}</pre>'
        "</details></section>"
    )


def _direction(name: str) -> int:
    """+1 if larger is better, -1 if smaller is, 0 if the name does not say."""
    low = name.lower()
    if any(w in low for w in _HIGHER_BETTER):
        return 1
    if any(w in low for w in _LOWER_BETTER):
        return -1
    return 0


def _comparison_table(ids: _Ids, runs: Sequence[RunSummary], labels: Sequence[str]) -> str:
    titles: dict[str, dict[str, None]] = {}
    for run in runs:
        for table in run.tables:
            titles.setdefault(table.title, {}).update(dict.fromkeys(table.metrics))
    if not titles:
        return "<p>No run has a final evaluation yet.</p>"
    head = "".join(f"<th>{_e(lab)}</th>" for lab in labels)
    body = []
    for title, names in titles.items():
        body.append(f'<tr><th colspan="{len(runs) + 1}" class="group">{_e(title)}</th></tr>')
        for name in names:
            found = [next((t for t in r.tables if t.title == title), None) for r in runs]
            means = [t.metrics[name].get("mean") if t is not None and name in t.metrics else None for t in found]
            sign = _direction(name)
            vals = [m for m in means if finite(m)]
            best = (max(vals) if sign > 0 else min(vals)) if sign and len(vals) > 1 else None
            cells = []
            for i, t in enumerate(found):
                if t is None or name not in t.metrics:
                    cells.append('<td class="n">-</td>')
                    continue
                r = t.metrics[name]
                part = [
                    _num(
                        ids,
                        name,
                        r.get(f),
                        "results.json#" + t.pointer(name, f),
                        i,
                        "compare",
                        title,
                        name,
                        f"run{i}",
                        f,
                    )
                    for f in ("mean", "ci95")
                ]
                cls = "n best" if best is not None and means[i] == best else "n"
                cells.append(f'<td class="{cls}">{part[0]} ± {part[1]}</td>')
            body.append(f'<tr><th scope="row">{_e(name)}</th>{"".join(cells)}</tr>')
    protocols = {run.protocol for run in runs}
    lines = "".join(
        f"<li><b>{_e(lab)}</b>: {_e(r.protocol or 'no final evaluation yet')}</li>" for lab, r in zip(labels, runs)
    )
    warn = (
        '<p class="warn" id="compare-protocols-differ">The runs were evaluated on different protocols: compare '
        "their numbers only where the protocol lines agree.</p>"
        if len(protocols - {None}) > 1
        else ""
    )
    return (
        f'<table id="compare-table" class="metrics"><thead><tr><th>metric</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table><p>Bold: the best mean of a row whose metric name says which way "
        f"is better (loss, error: lower; accuracy, return, log-likelihood: higher).</p>{warn}<ul>{lines}</ul>"
    )


def _comparison_curves(ids: _Ids, runs: Sequence[RunSummary], labels: Sequence[str]) -> list[str]:
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(_row_keys(run.rows)))
    out = []
    for key in keys:
        series = [
            _row_series(run.rows, key, lab, PALETTE[i % len(PALETTE)])
            for i, (run, lab) in enumerate(zip(runs, labels))
            if any(key in r for r in run.rows)
        ]
        for i, s in enumerate(series):
            s.attrs["data-run"] = str(i)
        out.append(
            _chart(
                ids("compare", "curve", key),
                f"{key}: runs overlaid",
                series,
                "meta-iteration",
                key,
                "From each run's metrics.jsonl.",
            )
        )
    bases: dict[str, None] = {}
    for run in runs:
        if run.main_table:
            bases.update(dict.fromkeys(step_curves(run.main_table.metrics)))
    for base in bases:
        series = []
        for i, (run, lab) in enumerate(zip(runs, labels)):
            steps = step_curves(run.main_table.metrics).get(base) if run.main_table else None
            if steps:
                series.append(Series(lab, _table_points(run.main_table, steps), color=PALETTE[i % len(PALETTE)]))
        out.append(
            _chart(
                ids("compare", "adapt", base),
                f"{base} against inner steps: runs overlaid",
                series,
                "inner steps",
                base,
                "From each run's results.json; bars: 95% CI over its test tasks.",
            )
        )
    names: dict[str, None] = {}
    for run in runs:
        names.update(dict.fromkeys(_family_curves(run.results)))
    for name in names:
        series = []
        first: dict[str, Any] = {}
        for i, (run, lab) in enumerate(zip(runs, labels)):
            curve = _family_curves(run.results).get(name)
            if curve is None:
                continue
            first = first or curve
            for n, sl in enumerate(curve.get("series") or {}):
                s = _curve_series(name, curve, sl, PALETTE[i % len(PALETTE)], dashed=n > 0)
                s.name = f"{lab}: {sl}"
                series.append(s)
        out.append(
            _chart(
                ids("compare", "family-curve", name),
                f"{first.get('title') or name}: runs overlaid",
                series,
                str(first.get("x_label") or "x"),
                str(first.get("y_label") or name),
                "From each run's results.json; one colour per run.",
            )
        )
    return out


def _overview(runs: Sequence[RunSummary], labels: Sequence[str]) -> str:
    rows = "".join(
        f'<tr><td><a href="#run{i}">{_e(lab)}</a></td><td>{_e(r.source)}</td><td>{_e(r.learner)}</td>'
        f'<td>{_e(r.family)}</td><td class="n">{r.iterations_done}/{r.iterations_total or "?"}</td>'
        f'<td><span class="status {r.status}">{r.status}</span></td><td class="n">{wall_time(r.wall_seconds)}</td></tr>'
        for i, (r, lab) in enumerate(zip(runs, labels))
    )
    return (
        '<table id="overview"><thead><tr><th>run</th><th>from</th><th>learner</th><th>task</th><th>iterations</th>'
        f"<th>status</th><th>wall time</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def build_report(paths: Sequence[str | Path], title: str | None = None, max_image_bytes: int = MAX_IMAGE_BYTES) -> str:
    """The HTML text of the report on the run folders ``paths`` (see the module docstring)."""
    paths = [Path(p) for p in paths]
    runs = [summarize(p) for p in paths]
    labels = run_labels([p.resolve() for p in paths])
    ids = _Ids()
    title = title or ("allmap report: " + ", ".join(labels))
    compare = ""
    if len(runs) > 1:
        curves = _comparison_curves(ids, runs, labels)
        compare = (
            f'<section id="compare"><h2>comparison</h2>{_comparison_table(ids, runs, labels)}'
            f'<div class="charts">{"".join(curves)}</div></section>'
        )
    sections = "".join(_run_section(ids, i, r, lab, max_image_bytes) for i, (r, lab) in enumerate(zip(runs, labels)))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="allmap {__version__}"><title>{_e(title)}</title><style>{_CSS}</style>'
        f"</head><body><main><h1>{_e(title)}</h1>{_overview(runs, labels)}{compare}{sections}</main>"
        f"<script>{_SCRIPT}</script></body></html>\n"
    )


def write_report(paths: Sequence[str | Path], out: str | Path, title: str | None = None) -> Path:
    """Write :func:`build_report` to ``out`` (folders made as needed); returns the path."""
    out = Path(out)
    text = build_report(paths, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out


def _json_pointer(doc: Any, pointer: str) -> Any:
    """The value at an RFC 6901 JSON pointer (``/metrics/loss@0/mean``) in ``doc``."""
    for part in pointer.lstrip("/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def resolve_source(run_dir: str | Path, src: str) -> Any:
    """The number a ``data-src`` of the report names, read from the run folder's files (for checking a page)."""
    name, _, where = src.partition("#")
    path = Path(run_dir) / name
    if name == "metrics.jsonl":
        row, _, key = where.partition("/")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        return json.loads(lines[int(row)])[key]
    return _json_pointer(json.loads(path.read_text()), where)
