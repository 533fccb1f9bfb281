"""The HTML report in a real browser (headless Chromium, driven over the DevTools protocol): it loads without
console errors or network requests, its key figures and table cells are found by id and are visible, every
number a user reads equals the run's files to the digits shown, a legend button hides its line, and a
screenshot is written (to $ALLMAP_SCREENSHOT_DIR if set, else the test's temporary folder)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _browser import Chromium, find_chromium
from _report_runs import report_runs

from allmap.app.html_report import resolve_source, write_report

pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="headless Chromium not found: install the Debian packages chromium and chromium-driver "
    "(`apt-get install chromium chromium-driver`, as .ci/run does) or set ALLMAP_CHROMIUM to a Chromium binary",
)

ORDER = ["maml", "metasgd", "np", "training", "failed"]


def _agrees(text: str, value: float) -> bool:
    """Whether the number shown as ``text`` (``2.350``, ``98.97%``, ``1.235e+05``, ``600``) is ``value``
    rounded to the digits shown."""
    t = text.strip()
    percent = t.endswith("%")
    t = t.rstrip("%")
    mantissa, _, exponent = t.lower().partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    tol = 0.5 * 10.0 ** (int(exponent or 0) - decimals)
    shown = float(t)
    if percent:
        shown, tol = shown / 100, tol / 100
    return abs(shown - value) <= tol * (1 + 1e-9)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    runs = report_runs(tmp_path_factory)
    out = write_report([runs[k] for k in ORDER], tmp_path_factory.mktemp("report") / "report.html")
    with Chromium() as browser:
        browser.open(out.resolve().as_uri())
        yield browser, runs, out


def test_the_page_loads_without_errors_or_network(page):
    browser, _, out = page
    assert browser.errors == []
    assert browser.evaluate("document.readyState") == "complete"
    assert all(url.startswith(("file:", "data:")) for url in browser.requests), browser.requests
    assert browser.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    assert browser.evaluate("document.images.length") == 5  # 2 PNGs of each trained run, the family's SVG


def test_key_figures_and_cells_are_visible(page):
    browser, _, _ = page
    ids = [
        "overview",
        "compare-table",
        "compare-curve-loss",
        "compare-adapt-loss",
        "run0-eval",
        "run0-eval-loss-at-0-mean",
        "run0-curve-loss",
        "run0-adapt-loss",
        "run0-fig-adaptation",
        "run1-adapt-accuracy",
        "run2-table1",
        "run2-family-curve-accuracy-vs-classes",
        "run2-fig-predictive-bands",
        "run2-fields",
        "run3-status",
        "run4-reason",
    ]
    boxes = browser.evaluate(
        f"{ids!r}.map(i => {{ const e = document.getElementById(i); if (!e) return null;"
        " const r = e.getBoundingClientRect(); const s = getComputedStyle(e);"
        " return [r.width, r.height, s.visibility, s.display]; })"
    )
    for name, box in zip(ids, boxes):
        assert box is not None, f"#{name} is not on the page"
        width, height, visibility, display = box
        assert width > 20 and height > 10 and visibility == "visible" and display != "none", (name, box)
    texts = browser.evaluate("['run3-status', 'run4-status'].map(i => document.getElementById(i).innerText)")
    assert texts == ["interrupted", "failed"]
    # a chart shows its lines and points
    assert browser.evaluate("document.querySelectorAll('#run0-curve-loss circle').length") >= 4


def test_every_number_a_user_reads_equals_the_files(page):
    browser, runs, _ = page
    shown = browser.evaluate(
        "[...document.querySelectorAll('.num')].map(e => [e.dataset.run, e.dataset.src, e.innerText])"
    )
    assert len(shown) > 80
    for run, src, text in shown:
        value = resolve_source(runs[ORDER[int(run)]], src)
        assert _agrees(text, value), (ORDER[int(run)], src, text, value)
    # each point's tooltip, as the user hovers it, says the logged value
    tips = browser.evaluate(
        "[...document.querySelectorAll('#run0-curve-loss circle, #run0-adapt-loss circle')]"
        ".map(c => [c.dataset.src, c.querySelector('title').textContent])"
    )
    assert len(tips) >= 8
    for src, tip in tips:  # "training loss: meta-iteration 3, 2.34567" or "... 2.345 ± 0.7 (95% CI)"
        number = tip.split(", ")[-1].split(" ")[0]
        assert _agrees(number, resolve_source(runs["maml"], src)), (src, tip)
    # a table cell reads "mean ± ci95"
    cell = browser.evaluate("document.getElementById('run1-eval-accuracy-at-10-mean').parentNode.innerText")
    mean, ci = cell.split(" ± ")
    record = resolve_source(runs["metasgd"], "results.json#/metrics/accuracy@10")
    assert _agrees(mean, record["mean"]) and _agrees(ci, record["ci95"]) and mean.endswith("%")


def test_a_legend_button_hides_its_line(page):
    browser, _, _ = page
    visible = "getComputedStyle(document.querySelector('#compare-curve-loss g.series[data-series=\"1\"]')).display"
    assert browser.evaluate(visible) != "none"
    browser.click('.legend[data-chart="compare-curve-loss"] button[data-series="1"]')
    assert browser.evaluate(visible) == "none"
    browser.click('.legend[data-chart="compare-curve-loss"] button[data-series="1"]')
    assert browser.evaluate(visible) != "none"
    assert browser.errors == []


def test_a_screenshot_is_written(page, tmp_path):
    browser, _, _ = page
    folder = Path(os.environ.get("ALLMAP_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = browser.screenshot(folder / "report.png")
    from PIL import Image

    with Image.open(path) as img:
        width, height = img.size
        colours = img.convert("RGB").resize((64, 256)).getcolors(64 * 256)
    assert width == 1280 and height > 2000  # the whole page
    assert colours is not None and len(colours) > 20  # drawn, not blank


def test_render_benchmark_runs(page, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import report_render

    _, runs, _ = page
    assert report_render.main([str(runs["maml"]), "--repeat", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("report of 1 runs") and lines[-1].startswith("navigate -> load event (driver)")
    assert float(lines[-1].split()[-1]) > 0
