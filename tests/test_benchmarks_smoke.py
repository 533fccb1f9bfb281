"""The benchmark scripts run end to end in --smoke mode and print their table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regression_protocols_smoke(tmp_path, capsys):
    assert _load("regression_protocols").main(["--runs", str(tmp_path), "--smoke"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| sinusoid-maml |")]
    assert len(rows) == 2 and all(line.count("±") == 4 for line in rows)
    assert "mapping learner, one forward pass:" in out
    gap = float(out.split("least squares vs the true (w, b):")[1].split(")")[0])
    assert 0 < gap < 0.05  # 100 points, noise 0.1: least squares is close to the truth


def test_allocator_benchmark_smoke(capsys):
    # four child processes (the allocator setting is process-wide); tiny 5-way episodes
    assert _load("allocator").main(["--ways", "5", "--steps", "2", "--warmup", "1"]) == 0
    rows = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| True") or line.startswith("| False")
    ]
    assert len(rows) == 4
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) > 0 and cells[3].endswith("x") and float(cells[6]) > 0


def test_eval_bound_smoke(capsys):
    assert _load("eval_bound").main(["--episodes", "2", "--hidden", "8"]) == 0
    out = capsys.readouterr().out
    gflop = float(out.split("FLOPs per episode: ")[1].split()[0])
    assert 0 < gflop < 1  # 8 filters: about 0.1 GFLOP
    rows = [line for line in out.splitlines() if line.startswith("| allmap") or line.startswith("| float32")]
    assert len(rows) == 3 and all(float(r.split("|")[2]) > 0 for r in rows)


def test_protonet_reference_smoke():
    import json
    import subprocess
    import sys

    import pytest

    if not (ROOT.parent / "shared" / "data" / "omniglot").is_dir():
        pytest.skip("needs ../shared/data/omniglot")
    out = subprocess.run(
        [sys.executable, "benchmarks/protonet_reference.py", "--minutes", "0.02", "--test-episodes", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    row = json.loads(out.strip().splitlines()[-1])
    assert row["episodes"] >= 1 and row["lr"] == 1e-3 and 0 <= row["5w1s"][0] <= 100


def test_mixed_precision_smoke(capsys):
    assert _load("mixed_precision").main(["--ways", "5", "--steps", "2", "--warmup", "1", "--hidden", "8"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| float32") or line.startswith("| bfloat16")]
    assert len(rows) == 2 and all(float(r.split("|")[2]) > 0 for r in rows)
    cost = json.loads(out.strip().splitlines()[-1])
    # bfloat16 keeps about 3 significant digits: close to float32, but not equal
    assert 0 < cost["embedding_rel_diff"] < 0.05 and 0 < cost["gradient_rel_diff"] < 0.2
    assert cost["gradient_cosine"] > 0.98


def test_np_step_benchmark_smoke(capsys):
    assert _load("np_step").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert float(out.split("relative): ")[1].split()[0]) < 1e-12  # the plain CNP is the same function
    assert float(out.split("allmap CNP / plain CNP: ")[1].split("x")[0]) > 0


def test_np_budget_smoke(tmp_path, capsys):
    np_budget = _load("np_budget")
    args = ["train", "--presets", "gp-cnp", "--cpu-minutes", "0.002", "--out", str(tmp_path), "--smoke"]
    args += ["--set", "model.sizes=[2, 16, 16]", "--set", "learner.decoder=[16]"]
    assert np_budget.main(args) == 0
    assert json.loads((tmp_path / "gp-cnp" / "results.json").read_text())["status"] == "ok"
    assert np_budget.main(["compare", str(tmp_path / "gp-cnp")]) == 0
    out = capsys.readouterr().out
    assert "gap to the GP oracle, target log-likelihood (paired)" in out and "oracle_target_loglik" in out
