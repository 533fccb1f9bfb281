"""Few-shot presets through the real training loop and CLI, learning-rate schedules, episode streams."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from allmap.app.config import list_presets, load_config
from allmap.app.schedules import CosineAdam, LinearSGD, StepDecayAdam
from allmap.app.trainer import train
from allmap.cli import main
from allmap.tasks import Episodes, EpisodeStream, gaussian_classes

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
needs_omniglot = pytest.mark.skipif(not ROOT.is_dir(), reason="needs ../shared/data/omniglot")

TINY = [
    "iterations=3",
    "task.ways=5",
    "model.hidden=8",
    "eval.tasks=10",
    "eval.val_tasks=5",
    "log_every=1",
    "eval.queries=2",
    "eval.every=3",
    "checkpoint_every=3",
]


def test_omniglot_presets_exist_and_say_their_protocol():
    presets = list_presets()
    for name in (
        "omniglot-5w1s-maml",
        "omniglot-20w1s-maml",
        "omniglot-5w1s-protonet",
        "omniglot-20w1s-protonet",
        "omniglot-5w1s-matching",
        "omniglot-5w1s-siamese",
        "omniglot-5w1s-protonet-lake",
        "omniglot-5w1s-maml-lake",
        "omniglot-5w1s-protonet-shuffled",
    ):
        assert name in presets and presets[name]
    maml = load_config("omniglot-5w1s-maml")
    assert maml["learner"]["inner_lr"] == 0.4 and maml["learner"]["inner_steps"] == 1 and maml["meta_batch"] == 32
    # The MAML code's test protocol, which its published numbers come from: one query per class, ten steps.
    assert maml["eval"]["queries"] == 1 and 10 in maml["eval"]["steps"]
    maml20 = load_config("omniglot-20w1s-maml")
    assert maml20["learner"]["inner_lr"] == 0.1 and maml20["learner"]["inner_steps"] == 5 and maml20["meta_batch"] == 16
    assert load_config("omniglot-5w1s-protonet")["task"]["ways"] == 60
    assert maml["task"]["protocol"] == maml20["task"]["protocol"] == "shuffled"  # MAML's code splits at random
    assert load_config("omniglot-5w1s-protonet")["task"]["protocol"] == "standard"  # ProtoNets: the Vinyals split
    shuffled = load_config("omniglot-5w1s-protonet-shuffled")
    assert shuffled["task"]["protocol"] == "shuffled"
    assert {k: v for k, v in shuffled["task"].items() if k != "protocol"} == {
        k: v for k, v in load_config("omniglot-5w1s-protonet")["task"].items() if k != "protocol"
    }


@needs_omniglot
def test_protonet_preset_trains_evaluates_plots_and_evaluates_on_another_protocol(tmp_path, capsys):
    config = load_config("omniglot-5w1s-protonet", TINY)
    train(config, tmp_path / "run", progress=False)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "5-way 1-shot, 2 queries" in results["protocol"] and "vinyals-test" in results["protocol"]
    assert "transductive" not in results["protocol"]  # BatchNorm with running statistics at test time
    assert results["metrics"]["accuracy"]["n"] == 10
    assert (tmp_path / "run" / "adaptation.png").stat().st_size > 10_000
    assert (
        main(
            [
                "eval",
                str(tmp_path / "run"),
                "--tasks",
                "8",
                "--set",
                "eval.ways=20",
                "--set",
                "task.within_alphabet=true",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert "20-way 1-shot" in out["protocol"] and "within-alphabet" in out["protocol"]
    # another split whose test characters the run has trained on: refused, not scored
    assert main(["eval", str(tmp_path / "run"), "--tasks", "8", "--set", "task.protocol=shuffled"]) == 2
    err = capsys.readouterr().err
    assert "overlap the classes this run was trained on" in err and "of 423" in err
    # test-time settings of the learner apply to the run's weights; settings that change the weights are refused
    scores = {}
    for shift in (0, 1):
        args = ["eval", str(tmp_path / "run"), "--tasks", "8", "--set", f"learner.test_shift={shift}", "--json"]
        assert main(args) == 0
        out = json.loads(capsys.readouterr().out)
        assert ("test-time shifts of up to 1 px" in out["protocol"]) == bool(shift)
        scores[shift] = out["metrics"]["loss"]["mean"]
    assert scores[0] != scores[1]
    assert main(["eval", str(tmp_path / "run"), "--tasks", "8", "--set", "model.hidden=4"]) == 2
    assert "do not fit the learner of this config" in capsys.readouterr().err


@needs_omniglot
def test_maml_preset_runs_a_few_iterations(tmp_path):
    config = load_config("omniglot-5w1s-maml", TINY + ["meta_batch=2", "eval.steps=[0,1]"])
    train(config, tmp_path / "run", progress=False)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"accuracy@0", "accuracy@1"} <= set(results["metrics"])
    # MAML's BatchNorm normalises each batch of queries together: the protocol line says so
    assert "BatchNorm with the statistics of each task's batch of queries (transductive)" in results["protocol"]


def test_step_and_cosine_schedules_and_resume():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = StepDecayAdam([w], lr=1.0, every=2, gamma=0.5)
    rates = []
    for _ in range(6):
        w.grad = torch.ones(1)
        opt.step()
        rates.append(opt.param_groups[0]["lr"])
    assert rates == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    twin = StepDecayAdam([torch.nn.Parameter(w.detach().clone())], lr=1.0, every=2, gamma=0.5)
    twin.load_state_dict(opt.state_dict())
    twin.param_groups[0]["params"][0].grad = torch.ones(1)
    twin.step()
    assert twin.param_groups[0]["lr"] == 0.125
    cos = CosineAdam([torch.nn.Parameter(torch.zeros(1))], lr=1.0, total=4, final=0.0)
    seen = []
    for _ in range(6):
        cos.param_groups[0]["params"][0].grad = torch.ones(1)
        cos.step()
        seen.append(round(cos.param_groups[0]["lr"], 6))
    assert seen == [1.0, 0.853553, 0.5, 0.146447, 0.0, 0.0]
    with pytest.raises(ValueError, match="every"):
        StepDecayAdam([w], every=0)


def test_linear_sgd_is_reptiles_annealed_step_and_resumes():
    """Reptile's code: ``theta += eps_i (phi - theta)`` with ``eps_i = (1 - i / n) eps + (i / n) eps_final``."""
    n, eps, final = 4, 1.0, 0.2
    w = torch.nn.Parameter(torch.zeros(1))
    opt = LinearSGD([w], lr=eps, total=n, final=final)
    reference, theta, target = [], 0.0, 3.0
    for i in range(6):
        step = (1 - min(i, n) / n) * eps + min(i, n) / n * final
        theta += step * (target - theta)  # the interpolation Reptile's code applies
        reference.append(theta)
        w.grad = w.detach() - target  # the Reptile direction theta - phi
        opt.step()
        assert w.item() == pytest.approx(theta, abs=1e-6)
    half = LinearSGD([torch.nn.Parameter(torch.zeros(1))], lr=eps, total=n, final=final)
    for _ in range(2):
        half.param_groups[0]["params"][0].grad = torch.ones(1)
        half.step()
    twin = LinearSGD([torch.nn.Parameter(torch.zeros(1))], lr=eps, total=n, final=final)
    twin.load_state_dict(half.state_dict())
    twin.param_groups[0]["params"][0].grad = torch.ones(1)
    twin.step()
    assert twin.param_groups[0]["lr"] == pytest.approx(0.6)  # the third step's rate, continued exactly
    with pytest.raises(ValueError, match="final >= 0"):
        LinearSGD([w], final=-1.0)


def test_episode_stream_matches_sample_and_runs_in_workers():
    family = Episodes(gaussian_classes(), ways=3, shots=1, queries=2)
    stream = iter(EpisodeStream(family, meta_batch=4, seed=5))
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        a, b = next(stream), family.sample(4, gen)
        assert torch.equal(a.query_x, b.query_x)
    loader = torch.utils.data.DataLoader(EpisodeStream(family, meta_batch=4, seed=5), batch_size=None, num_workers=2)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == 4:
            break
    assert all(b.support_x.shape == (4, 3, 1, 4, 4) for b in batches)


@needs_omniglot
def test_cnp_preset_trains_and_scores_5_and_20_way_episodes(tmp_path, capsys):
    config = load_config("omniglot-5w1s-cnp", TINY + ["learner.features=8", "learner.decoder=[8]"])
    assert load_config("omniglot-5w1s-cnp")["task"]["protocol"] == "standard"  # the CNP paper: Vinyals' split
    train(config, tmp_path / "run", progress=False)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "5-way 1-shot, 2 queries" in results["protocol"] and "vinyals-test" in results["protocol"]
    assert results["metrics"]["accuracy"]["n"] == 10 and 0 <= results["metrics"]["accuracy"]["mean"] <= 1
    capsys.readouterr()
    args = ["eval", str(tmp_path / "run"), "--tasks", "4", "--set", "eval.ways=20", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert "20-way 1-shot" in out["protocol"] and out["metrics"]["accuracy"]["n"] == 4
