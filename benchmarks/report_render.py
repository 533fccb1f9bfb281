"""How long an HTML report takes to render in headless Chromium, and how large it is.

    flock /tmp/allmap-bench.lock python benchmarks/report_render.py RUN_DIR [RUN_DIR ...] [--repeat 5]

Writes ``allmap report`` of the given run folders, then opens it ``--repeat`` times, each in a fresh headless
Chromium (driven over the DevTools pipe, as tests/test_report_browser.py does), and prints: the file size,
the time to write the report, and per load the page's own timings from navigation start (``performance``
entries: DOMContentLoaded, the load event, two animation frames drawn after it) and the wall time from the navigate
command to the load event as the driver sees it. The median and the worst load are reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _browser import Chromium, find_chromium  # noqa: E402

from allmap.app.html_report import write_report  # noqa: E402

_TIMINGS = """(async () => {
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const drawn = performance.now();
  const n = performance.getEntriesByType('navigation')[0];
  return [n.domContentLoadedEventEnd, n.loadEventEnd, drawn];
})()"""


def measure(url: str, repeat: int) -> list[dict[str, float]]:
    loads = []
    for _ in range(repeat):
        with Chromium() as browser:
            wall = browser.open(url)
            dom, load, drawn = browser.evaluate(_TIMINGS)
            if browser.errors:
                raise RuntimeError(f"the page logged errors: {browser.errors}")
            loads.append({"wall": wall * 1000, "dom": dom, "load": load, "drawn": drawn})
    return loads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--repeat", type=int, default=5, help="loads, each in a fresh browser (default 5)")
    p.add_argument("--out", help="where to write the report (default: a temporary file)")
    args = p.parse_args(argv)
    if find_chromium() is None:
        print("no Chromium found: install the Debian package chromium, or set ALLMAP_CHROMIUM", file=sys.stderr)
        return 2
    out = Path(args.out or Path(tempfile.mkdtemp(prefix="allmap-report-")) / "report.html")
    start = time.perf_counter()
    write_report(args.runs, out)
    written = time.perf_counter() - start
    loads = measure(out.resolve().as_uri(), args.repeat)
    print(f"report of {len(args.runs)} runs: {out} ({out.stat().st_size / 1e6:.2f} MB), written in {written:.2f} s")
    print(f"{'ms, over ' + str(args.repeat) + ' loads':<34}{'median':>10}{'worst':>10}")
    for key, name in (
        ("dom", "DOMContentLoaded"),
        ("load", "load event (page timing)"),
        ("drawn", "two frames drawn after load"),
        ("wall", "navigate -> load event (driver)"),
    ):
        values = [x[key] for x in loads]
        print(f"{name:<34}{statistics.median(values):>10.0f}{max(values):>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
