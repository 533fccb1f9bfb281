"""The ``allmap automl`` command: every preset runs (shrunk by --set) into a run folder with results.json (mean
± 95% CI over seeds) and its PNG plots; errors name what to do."""

from __future__ import annotations

import json

import pytest

from allmap.app.automl import automl_presets, load_automl_config
from allmap.app.config import ConfigError
from allmap.cli import main

TINY = {
    "digits-hd": ["epochs=1", "batch_size=256", "models={logreg: []}"],
    "digits-weight-decay-implicit": ["outer_steps=2", "inner_steps=3", "search.points=2"],
    "digits-lr-forward": ["outer_steps=2", "inner_steps=2", "search.points=2", "hidden=[4]"],
    "omniglot-augment-truncated": ["outer_steps=2", "inner_steps=2", "search.points=2", "data.classes=3"],
    "digits-reweight": ["epochs=1"],
    "digits-darts": [
        "search_epochs=1",
        "final_epochs=1",
        "channels=2",
        "cells=1",
        "nodes=2",
        "orders=[1]",
        "data.fractions=[0.1, 0.1, 0.8]",
    ],
}
PLOTS = {
    "hd": ["hd_learning_rate.png", "hd_val_loss.png"],
    "bilevel": ["hyper_trajectories.png", "val_loss_vs_time.png"],
    "reweight": ["reweight_val_accuracy.png"],
    "darts": ["darts_alphas.png", "darts_vs_random.png"],
}


def test_every_preset_is_exercised_here_and_has_a_short_description():
    assert set(automl_presets()) == set(TINY)
    for name, desc in automl_presets().items():
        assert 40 <= len(desc) <= 160 and "\n" not in desc
        assert len(load_automl_config(name)["notes"].splitlines()) >= 2


@pytest.mark.parametrize("name", list(TINY))
def test_preset_runs_into_a_run_folder_with_results_and_plots(name, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = [arg for item in ["seeds=2", *TINY[name]] for arg in ("--set", item)]
    assert main(["automl", name, "--out", str(out), "--quiet", *overrides]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["status"] == "ok" and len(record["per_seed"]) == 2
    for metric in record["metrics"].values():
        assert metric["n"] == 2 and metric["ci95"] >= 0
    for png in PLOTS[record["experiment"]]:
        assert (out / png).stat().st_size > 1000
    assert "mean ± 95% CI" in capsys.readouterr().out.replace("Mean", "mean")


def test_unknown_presets_and_experiments_are_refused(tmp_path, capsys):
    assert main(["automl", "digits-nothing"]) == 2
    assert "unknown AutoML preset 'digits-nothing'; known: digits-darts" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: magic\n")
    with pytest.raises(ConfigError, match="experiment must be one of hd, bilevel, reweight, darts, got 'magic'"):
        load_automl_config(str(bad))
    assert main(["automl"]) == 0
    assert "digits-reweight" in capsys.readouterr().out
