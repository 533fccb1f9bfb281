"""Weight averaging (``ema`` in run configs): the update rule, and a run evaluated with its average."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import allmap
from allmap.app import ConfigError, load_config, train
from allmap.app.averaging import WeightAverage, averaged
from allmap.app.build import build_family
from allmap.app.checkpoint import load_checkpoint
from allmap.engine.evaluate import evaluate, fixed_tasks

TINY = [
    "iterations=12",
    "meta_batch=4",
    "log_every=4",
    "checkpoint_every=4",
    "eval.tasks=20",
    "eval.every=6",
    "eval.val_tasks=8",
    "eval.queries=20",
    "eval.steps=[0,1]",
]


def test_average_follows_the_update_rule_with_warmup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    avg = WeightAverage(net, decay=0.8)
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    for t in range(6):
        net(torch.randn(5, 3, dtype=torch.float64))  # moves the BatchNorm running statistics
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        avg.update(net)
        d = min(0.8, (1 + t) / (10 + t))  # 0.1, 0.18, 0.25, ... then 0.8
        for k, v in net.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    assert avg.steps == 6
    for k, v in avg.module.state_dict().items():
        assert torch.allclose(v, expected[k], rtol=1e-12, atol=1e-12), k
    assert int(avg.module[1].num_batches_tracked) == 6
    assert not any(p.requires_grad for p in avg.module.parameters())
    assert averaged(net) is avg.module and averaged(avg.module) is avg.module


def test_run_with_ema_is_evaluated_with_the_average(tmp_path):
    config = load_config("sinusoid-maml", TINY + ["ema=0.5"])
    seen = []
    returned = train(
        config,
        tmp_path / "run",
        progress=False,
        callback=lambda it, learner: seen.append(averaged(learner) is not learner),
    )
    assert seen == [True] * 12  # callbacks (benchmarks/omniglot_budget.py) reach the average
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["averaged"]["steps"] == 12
    average, last = state["averaged"]["module"], state["learner"]
    assert any(not torch.equal(average[k], last[k]) for k in last)  # the average is not the last iterate
    loaded = allmap.load(tmp_path / "run")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, average[k]) and torch.equal(returned.state_dict()[k], v), k
    # results.json holds the average's test numbers
    tasks = fixed_tasks(build_family(config, "test"), 20, config["eval"]["seed"])
    again = evaluate(loaded, tasks, steps=[0, 1])
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    assert saved["loss@1"]["mean"] == pytest.approx(again["loss@1"]["mean"], rel=1e-6)


@pytest.mark.parametrize("bad", ["1.0", "0", "true", "'high'"])
def test_bad_ema_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match="'ema' must be null .* decay in \\(0, 1\\)"):
        load_config("sinusoid-maml", [f"ema={bad}"])
    with pytest.raises(ValueError, match="number in \\(0, 1\\)"):
        WeightAverage(nn.Linear(1, 1), decay=1.0)
