"""Line charts as inline SVG text, for the HTML report: no plotting library, no script, readable offline.

Each point is a ``<circle>`` carrying its exact value (``data-y``), where it comes from (``data-src``: the
file and the entry, e.g. ``metrics.jsonl:3/val_loss``) and a tooltip; a 95% CI is drawn as an error bar.
The y axis is logarithmic where the values span more than a factor of 10 (as in the trainer's PNG), and
accuracies are shown in percent.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Point", "Series", "line_chart", "PALETTE", "nice_ticks"]

#: matplotlib's tab10 colours, so a run has the same colour in the report as in the trainer's plots
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")

WIDTH, HEIGHT = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 66, 14, 12, 44


@dataclass
class Point:
    x: float
    y: float | None
    ci: float | None = None
    src: str = ""


@dataclass
class Series:
    name: str
    points: list[Point]
    color: str = PALETTE[0]
    dashed: bool = False
    attrs: dict[str, str] = field(default_factory=dict)  #: extra attributes of the series' group


def _finite(v: float | None) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (1, 2 or 5 times a power of ten apart) covering ``[lo, hi]``."""
    if hi <= lo:  # one value: a narrow range around it
        half = abs(lo) * 0.05 or 0.5
        lo, hi = lo - half, hi + half
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, v = [], start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _log_ticks(lo: float, hi: float) -> list[float]:
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    ticks = [10.0**e for e in range(a, b + 1)]
    if b - a <= 2:
        ticks = sorted({m * 10.0**e for e in range(a, b + 1) for m in (1, 2, 5)})
        ticks = [t for t in ticks if lo / 5 <= t <= hi * 5] or ticks
    return ticks


def _label(v: float, percent: bool) -> str:
    return f"{100 * v:.4g}%" if percent else f"{v:.4g}"


class _Scale:
    def __init__(self, lo: float, hi: float, a: float, b: float, log: bool) -> None:
        self.lo, self.hi, self.a, self.b, self.log = lo, hi, a, b, log

    def __call__(self, v: float) -> float:
        if self.log:
            f = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            f = (v - self.lo) / (self.hi - self.lo)
        return self.a + f * (self.b - self.a)


def _y_scale(points: list[Point], log: bool | None) -> tuple[_Scale, list[float]]:
    """The y scale and its ticks: logarithmic if ``log``, or (``log`` None) if the values are positive and
    span more than a factor of 10; the CI bars fit inside (those below zero are cut on a log scale)."""
    values = [p.y for p in points]
    positive = all(v > 0 for v in values)
    if log is None:
        log = positive and max(values) / min(values) > 10
    log = bool(log and positive)
    bars = [b for p in points if _finite(p.ci) for b in (p.y - p.ci, p.y + p.ci)]
    values += [b for b in bars if b > 0 or not log]
    if log:
        ticks = _log_ticks(min(values), max(values))
        lo, hi = min(ticks[0], min(values)), max(ticks[-1], max(values))
        return _Scale(lo, hi, HEIGHT - BOTTOM, TOP, True), ticks
    ticks = nice_ticks(min(values), max(values))
    return _Scale(ticks[0], ticks[-1], HEIGHT - BOTTOM, TOP, False), ticks


def line_chart(
    chart_id: str,
    series: Sequence[Series],
    x_label: str,
    y_label: str,
    log_y: bool | None = None,
    percent: bool = False,
) -> str:
    """An SVG line chart of ``series`` with id ``chart_id``; ``log_y`` None chooses (log if the values span
    more than 10x); ``percent`` shows y as percentages (the data stay fractions)."""
    pts = [p for s in series for p in s.points if _finite(p.y)]
    if not pts:
        return f'<svg id="{chart_id}" class="chart empty" viewBox="0 0 {WIDTH} 40"><text x="10" y="25">no finite values</text></svg>'
    yscale, yticks = _y_scale(pts, log_y)
    xs = [p.x for p in pts]
    xticks = nice_ticks(min(xs), max(xs)) if max(xs) > min(xs) else [min(xs) - 1, min(xs), min(xs) + 1]
    if all(float(x).is_integer() for x in xs):
        xticks = [t for t in xticks if float(t).is_integer()] or xticks
    xscale = _Scale(min(xticks[0], min(xs)), max(xticks[-1], max(xs)), LEFT, WIDTH - RIGHT, False)
    out = [
        f'<svg id="{chart_id}" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{html.escape(y_label)} against {html.escape(x_label)}">'
    ]
    out.append(f'<g class="grid">{_grid(xscale, yscale, xticks, yticks, percent)}</g>')
    out.append(
        f'<text class="axis-label" x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 8}" text-anchor="middle">'
        f"{html.escape(x_label)}</text>"
        f'<text class="axis-label" transform="translate(14 {(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" '
        f'text-anchor="middle">{html.escape(y_label)}{" (log)" if yscale.log else ""}</text>'
    )
    for k, s in enumerate(series):
        out.append(_series(k, s, xscale, yscale, x_label))
    out.append("</svg>")
    return "".join(out)


def _grid(xscale: _Scale, yscale: _Scale, xticks: list[float], yticks: list[float], percent: bool) -> str:
    parts = []
    for t in yticks:
        if not yscale.lo <= t <= yscale.hi:
            continue
        y = yscale(t)
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text x="{LEFT - 5}" y="{y + 4:.1f}" text-anchor="end">{_label(t, percent)}</text>'
        )
    for t in xticks:
        if not xscale.lo <= t <= xscale.hi:
            continue
        x = xscale(t)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}"/>'
            f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{t:.6g}</text>'
        )
    return "".join(parts)


def _series(k: int, s: Series, xscale: _Scale, yscale: _Scale, x_label: str) -> str:
    attrs = "".join(f' {a}="{html.escape(v)}"' for a, v in s.attrs.items())
    out = [f'<g class="series" data-series="{k}" data-name="{html.escape(s.name)}"{attrs} style="color:{s.color}">']
    segment: list[str] = []
    segments = []
    for p in s.points:
        if _finite(p.y) and (not yscale.log or p.y > 0):
            segment.append(f"{xscale(p.x):.1f},{yscale(p.y):.1f}")
        elif segment:
            segments.append(segment)
            segment = []
    segments.append(segment)
    dash = ' stroke-dasharray="5 3"' if s.dashed else ""
    for seg in segments:
        if len(seg) > 1:
            out.append(
                f'<polyline points="{" ".join(seg)}" fill="none" stroke="currentColor" stroke-width="1.5"{dash}/>'
            )
    r = 2.6 if len(s.points) <= 60 else 1.6
    for p in s.points:
        if not _finite(p.y) or (yscale.log and p.y <= 0):
            continue
        cx, cy = xscale(p.x), yscale(p.y)
        tip = f"{s.name}: {x_label} {p.x:g}, {p.y:.6g}" + (f" ± {p.ci:.4g} (95% CI)" if _finite(p.ci) else "")
        if _finite(p.ci):
            lo = yscale(max(p.y - p.ci, yscale.lo)) if yscale.log else yscale(p.y - p.ci)
            out.append(
                f'<line class="ci" x1="{cx:.1f}" x2="{cx:.1f}" y1="{lo:.1f}" y2="{yscale(p.y + p.ci):.1f}" '
                'stroke="currentColor"/>'
            )
        ci = f' data-ci="{p.ci!r}"' if _finite(p.ci) else ""
        out.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r}" fill="currentColor" data-src="{html.escape(p.src)}" '
            f'data-x="{p.x!r}" data-y="{p.y!r}"{ci}><title>{html.escape(tip)}</title></circle>'
        )
    out.append("</g>")
    return "".join(out)
