"""benchmarks/peers.py runs end to end in --smoke mode (tiny sizes, in-process) and prints its table, with the
meta-gradient of every installed peer agreeing with allmap's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("allmap_bench_peers", ROOT / "benchmarks" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["allmap_bench_peers"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_peers_smoke(capsys):
    peers = _load()
    assert peers.main(["--smoke", "--workloads", "sinusoid-1,conv4-5w1s,protonet-60w,eval-600"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = {(r[1].strip(), r[2].strip()) for r in rows}
    assert {
        ("sinusoid-1", "allmap"),
        ("conv4-5w1s", "allmap"),
        ("protonet-60w", "allmap"),
        ("eval-600", "allmap"),
    } <= names
    for r in rows:
        assert float(r[3]) > 0  # tasks/s
        if r[8].strip():  # relative meta-gradient (or accuracy) difference from allmap
            assert float(r[8]) < 1e-4, r
    for peer in peers.PEERS:
        if not peers.available(peer):
            assert "skipped: " in out and peer in out
