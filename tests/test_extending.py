"""docs/extending.md works as written: its learner file, its training script and its CLI commands run (with
few iterations) and give finite results that improve with training; and the config key ``imports`` that the
CLI uses to find a user's learner."""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from _util import guide_files, guide_module

from allmap.app.build import build_family, build_learner
from allmap.app.config import ConfigError, load_config
from allmap.cli import main
from allmap.learners import LEARNERS

#: what the guide runs for real, cut down here to keep the test fast
FEW = [
    "--set",
    "iterations=40",
    "--set",
    "eval.tasks=20",
    "--set",
    "eval.val_tasks=10",
    "--set",
    "log_every=10",
    "--set",
    "eval.every=20",
    "--no-progress",
]


@pytest.fixture
def guide_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The guide's files written to a fresh folder, the current directory, which is on the Python path (as
    the guide's ``export PYTHONPATH=$PWD`` makes it), with ``ridge_head`` not yet imported nor ``"ridge"``
    registered, so that the code under test imports and registers them itself (both restored after)."""
    guide_module("ridge_head.py")  # the module other tests use, put back after this test
    for name, (text, _) in guide_files().items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ridge_head")
    monkeypatch.delitem(LEARNERS, "ridge")
    return tmp_path


def test_the_guide_has_its_files():
    files = guide_files()
    assert set(files) == {"ridge_head.py", "train_ridge.py", "ridge.yaml", "commands.sh", "tiny_cnp.py"}
    code = files["ridge_head.py"][0]
    assert code.count('@allmap.register("ridge")') == 1
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) <= 45, f"the guide's learner should stay about 40 lines, it has {len(lines)} non-empty ones"


def test_training_script_learns(guide_dir: Path, capsys: pytest.CaptureFixture[str]):
    import runpy

    script = guide_dir / "train_ridge.py"
    text = script.read_text()
    assert text.count("ITERATIONS = 2000\n") == 1
    script.write_text(text.replace("ITERATIONS = 2000\n", "ITERATIONS = 100\n"))
    out = runpy.run_path(str(script), run_name="__main__")
    losses, window = out["losses"], out["window"]
    assert len(losses) == 100 and all(math.isfinite(v) for v in losses)
    early, late = sum(losses[:window]) / window, sum(losses[-window:]) / window
    assert late < 0.8 * early, f"mean meta-loss {early:.3f} in the first {window} iterations, {late:.3f} in the last"
    loss = out["results"]["loss"]
    assert math.isfinite(loss["mean"]) and math.isfinite(loss["ci95"]) and loss["n"] == 600
    assert loss["mean"] < early
    assert type(out["learner"]).__module__ == "ridge_head" and LEARNERS["ridge"] is type(out["learner"])
    printed = capsys.readouterr().out
    assert "test MSE" in printed and f"{loss['mean']:.3f}" in printed


def test_cli_commands_train_and_evaluate(guide_dir: Path, capsys: pytest.CaptureFixture[str]):
    commands = [line.strip() for line in (guide_dir / "commands.sh").read_text().splitlines() if line.strip()]
    assert commands[0] == "export PYTHONPATH=$PWD"  # the fixture put this folder on the path
    runs = []
    for line in commands[1:]:
        argv = shlex.split(line)
        assert argv[0] == "allmap", f"the test runs only allmap commands, got {line!r}"
        extra = FEW if argv[1] == "train" else ["--json"]
        capsys.readouterr()
        assert main(argv[1:] + extra) == 0, line
        runs.append((argv, capsys.readouterr().out))
    (train, _), (evaluate, printed) = runs
    assert train[1:3] == ["train", "ridge.yaml"] and evaluate[1] == "eval"
    run = guide_dir / train[train.index("--out") + 1]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["imports"] == ["ridge_head"] and config["learner"]["name"] == "ridge"
    results = json.loads((run / "results.json").read_text())["metrics"]
    assert set(results) == {"loss"}  # one closed-form solve: no loss@k
    assert math.isfinite(results["loss"]["mean"]) and math.isfinite(results["loss"]["ci95"])
    assert results["loss"]["n"] == 20
    logged = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(logged) >= 2 and logged[-1] < logged[0], logged
    # `allmap eval` rebuilt the learner by importing the module again, and scores it the same way
    again = json.loads(printed)["metrics"]
    assert again["loss"]["mean"] == pytest.approx(results["loss"]["mean"], rel=1e-6)


# -- the `imports` config key -------------------------------------------------------------------------
def _config(tmp_path: Path, **keys) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {"task": {"family": "sinusoid", "shots": 5}, "model": {"name": "mlp", "sizes": [1, 8, 8]}, **keys}
        )
    )
    return path


def test_imports_register_a_learner_before_names_are_resolved(tmp_path, monkeypatch):
    (tmp_path / "my_learners_for_test.py").write_text(
        "import allmap\n\n\n@allmap.register('imported-protonet')\nclass ImportedProtoNet(allmap.ProtoNet):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_learners_for_test", raising=False)
    path = _config(tmp_path, imports=["my_learners_for_test"], learner={"name": "imported-protonet"})
    config = load_config(path)
    try:
        learner = build_learner(config, build_family(config))
        assert type(learner).__name__ == "ImportedProtoNet" and type(learner).__module__ == "my_learners_for_test"
    finally:
        LEARNERS.pop("imported-protonet", None)
    assert "imported-protonet" not in LEARNERS


def test_imports_errors_name_the_module_and_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "broken_learners_for_test.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "needs_missing_for_test.py").write_text("import not_installed_anywhere_for_test\n")
    for name in ("broken_learners_for_test", "needs_missing_for_test"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    cases = {
        "absent_module_for_test": r"imports: no module named 'absent_module_for_test' on the Python path\. Put the "
        r"folder that holds absent_module_for_test\.py on PYTHONPATH",
        "broken_learners_for_test": r"imports: importing 'broken_learners_for_test' failed: RuntimeError: boom",
        "needs_missing_for_test": r"imports: importing 'needs_missing_for_test' failed: No module named "
        r"'not_installed_anywhere_for_test'",
    }
    for module, message in cases.items():
        config = load_config(_config(tmp_path, imports=[module]))
        with pytest.raises(ConfigError, match=message):
            build_family(config)
    path = _config(tmp_path, imports=["absent_module_for_test"])
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "no module named 'absent_module_for_test'" in capsys.readouterr().err
    for bad in ("ridge_head", ["my learners"], [3]):
        with pytest.raises(
            ConfigError,
            match=r"config key 'imports' must be a list of module names such as "
            r"\[my_learners\]",
        ):
            load_config(_config(tmp_path, imports=bad))


def test_an_unknown_learner_points_to_imports(tmp_path):
    config = load_config(_config(tmp_path, learner={"name": "not-registered"}))
    with pytest.raises(
        ConfigError,
        match=r"unknown learner 'not-registered'; known: .*anil.*@allmap\.register\(NAME\) "
        r"in a module listed under the config's 'imports' key",
    ):
        build_learner(config, build_family(config))
