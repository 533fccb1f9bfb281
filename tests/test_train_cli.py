"""The CLI and training loop end to end on tiny runs: run folder, eval JSON, exact resume, safe checkpoints."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys

import pytest
import torch

import allmap
from allmap.app import CheckpointError, ConfigError, NonFiniteLossError, load_config, resume, train
from allmap.app.build import build_family, build_learner
from allmap.app.checkpoint import load_checkpoint
from allmap.app.config import list_presets
from allmap.app.summary import summarize
from allmap.cli import main
from allmap.engine.evaluate import evaluate, fixed_tasks

TINY = [
    "iterations=20",
    "meta_batch=4",
    "log_every=5",
    "checkpoint_every=5",
    "eval.tasks=30",
    "eval.every=10",
    "eval.val_tasks=10",
    "eval.queries=20",
]


def test_cli_train_eval_json(tmp_path, capsys):
    out = tmp_path / "sine"
    sets = sum((["--set", s] for s in TINY), [])
    assert main(["train", "sinusoid-maml", "--out", str(out), "--no-progress", *sets]) == 0
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "checkpoint.pt",
        "results.json",
        "learning_curve.png",
        "adaptation.png",
    ):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "loss" in r] == [5, 10, 15, 20]
    assert [r["iteration"] for r in rows if "val_loss" in r] == [10, 20]
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--tasks", "25"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["metrics"]) == {"loss@0", "loss@1", "loss@5", "loss@10"}
    # the reported CI is 1.96 std / sqrt(n) over the fixed test tasks, recomputed independently here
    learner = allmap.load(out)
    config = load_config(out / "config.yaml")
    tasks = fixed_tasks(build_family(config, "test"), 25, config["eval"]["seed"])
    per_task = []
    for i in range(len(tasks)):
        model = learner.adapt(tasks.support_x[i], tasks.support_y[i], steps=5)
        per_task.append(torch.nn.functional.mse_loss(model(tasks.query_x[i]), tasks.query_y[i]).item())
    per_task = torch.tensor(per_task, dtype=torch.float64)
    r = report["metrics"]["loss@5"]
    assert r["n"] == 25
    assert r["mean"] == pytest.approx(per_task.mean().item(), rel=1e-5)
    assert r["ci95"] == pytest.approx(1.96 * per_task.std().item() / 5, rel=1e-4)
    assert main(["eval", str(out)]) == 0
    assert "loss@5" in capsys.readouterr().out and "±" in report["protocol"]


def _weights(learner):
    return {k: v.clone() for k, v in learner.state_dict().items()}


@pytest.mark.parametrize(
    "preset,extra",
    [
        ("sinusoid-metasgd", []),
        # random directions: the strategy's generator state travels in the checkpoint
        ("sinusoid-maml", ["learner.hypergrad=finite_difference(directions=4, eps=0.01)"]),
        ("sinusoid-metasgd", ["ema=0.9"]),  # the weight average (what train returns) travels in the checkpoint too
        # the inner Adam's moments carried from task to task travel in the checkpoint (learner buffers)
        ("sinusoid-reptile", ["learner.inner_optimizer=adam", "learner.inner_state=carried"]),
    ],
)
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, preset, extra):
    config = load_config(preset, TINY + extra)
    whole = _weights(train(config, tmp_path / "whole", progress=False))

    class Crash(Exception):
        pass

    def crash(iteration, learner):
        if iteration == 13:  # after the checkpoint at 10, before the one at 15
            raise Crash

    with pytest.raises(Crash):
        train(config, tmp_path / "cut", progress=False, callback=crash)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["iteration"] == 10
    resumed = _weights(resume(tmp_path / "cut", progress=False))
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "loss" in r] == [5, 10, 15, 20]  # no duplicated log rows


def test_a_run_being_trained_reads_as_training_and_a_stale_marker_as_interrupted(tmp_path):
    """``allmap runs`` tells a live training process from a stopped run: training.json names this process
    while it trains and is gone after; one left by a process that no longer exists reads as interrupted."""
    seen = []

    def look(iteration, learner):
        if iteration == 7:
            seen.append(summarize(tmp_path / "r"))
            raise KeyboardInterrupt

    config = load_config("sinusoid-maml", TINY)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "r", progress=False, callback=look)
    assert seen[0].status == "training" and seen[0].reason.endswith(f"trained now by pid {os.getpid()}")
    assert not (tmp_path / "r" / "training.json").exists()
    assert summarize(tmp_path / "r").status == "interrupted"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"host": socket.gethostname(), "pid": int(dead.stdout)}
    (tmp_path / "r" / "training.json").write_text(json.dumps(stale))
    assert summarize(tmp_path / "r").status == "interrupted"


def test_cli_resume_extends_a_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    sets = sum((["--set", s] for s in TINY), [])
    assert main(["train", "logistic2d-metasgd", "--out", str(out), "--no-progress", *sets]) == 0
    assert main(["train", "--resume", str(out), "--set", "iterations=30", "--no-progress"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 30
    assert "accuracy@1" in json.loads((out / "results.json").read_text())["metrics"]
    assert main(["train", "--resume", str(out), "--set", "seed=3"]) == 2
    assert "--resume can change only" in capsys.readouterr().err


def test_non_finite_loss_names_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path):
    config = load_config("sinusoid-maml", ["iterations=20", "meta_batch=2", "log_every=1", "checkpoint_every=5"])

    def diverge(iteration, learner):
        if iteration == 5:
            with torch.no_grad():
                next(learner.parameters()).fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="at iteration 6"):
        train(config, tmp_path / "nan", progress=False, callback=diverge)
    state = load_checkpoint(tmp_path / "nan" / "checkpoint.pt")
    assert state["iteration"] == 5
    assert all(torch.isfinite(v).all() for v in state["learner"].values())


def test_damaged_and_crafted_checkpoints_are_refused(tmp_path):
    out = tmp_path / "run"
    train(load_config("linreg-hypernet", TINY), out, progress=False)
    ckpt = out / "checkpoint.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is damaged: its SHA-256 does not match"):
        allmap.load(out)

    class Exploit:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').write('pwned')",))

    ckpt.write_bytes(pickle.dumps({"learner": Exploit()}))
    (out / "checkpoint.pt.sha256").unlink()
    with (
        pytest.warns(UserWarning, match="cannot be verified"),
        pytest.raises(CheckpointError, match=r"refused: not a weights file \(it contains code"),
    ):
        allmap.load(out)
    assert not (tmp_path / "pwned").exists()


def test_config_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'; known presets: .*sinusoid-maml"):
        load_config("nope")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['iteratons'\]"):
        load_config("sinusoid-maml", ["iteratons=5"])
    with pytest.raises(
        ConfigError, match=r"learner 'maml' has no option\(s\) \['inner_rate'\]; valid options: .*inner_lr"
    ):
        cfg = load_config("sinusoid-maml", ["learner.inner_rate=0.1"])
        build_learner(cfg, build_family(cfg))
    with pytest.raises(ConfigError, match="'iterations' must be a positive integer, got -3"):
        load_config("sinusoid-maml", ["iterations=-3"])
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config("sinusoid-maml", ["iterations"])
    with pytest.raises(ConfigError, match="unknown task family 'cosine'"):
        cfg = load_config("sinusoid-maml", ["task.family=cosine"])
        build_family(cfg)
    bad = tmp_path / "bad.yaml"
    bad.write_text("iterations: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    assert main(["train", "nope"]) == 2
    assert "known presets" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_validation_scores_after_eval_val_steps(tmp_path):
    """eval.val_steps sets the inner steps before validation scores a task (default: learner.inner_steps):
    the last row's val_loss is the final learner's loss on the validation tasks after that many steps."""
    losses = {}
    for steps in (None, 0):
        out = tmp_path / f"sine-{steps}"
        train(
            load_config("sinusoid-maml", TINY + [f"eval.val_steps={'null' if steps is None else steps}"]),
            out,
            progress=False,
        )
        config, learner = load_config(out / "config.yaml"), allmap.load(out)
        tasks = fixed_tasks(build_family(config, "val"), 10, config["eval"]["seed"] + 1)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        k = learner.inner_steps if steps is None else steps
        expected = evaluate(learner, tasks, steps=[k])[f"loss@{k}"]["mean"]
        losses[steps] = [r["val_loss"] for r in rows if "val_loss" in r][-1]
        assert losses[steps] == pytest.approx(expected, rel=1e-5)
    assert losses[0] > losses[None]  # five inner steps lower the loss of the unadapted model
    with pytest.raises(ConfigError, match="'eval.val_steps' must be an integer in \\[0, 100000\\]"):
        load_config("sinusoid-maml", ["eval.val_steps=-1"])


def test_existing_run_folder_is_not_overwritten(tmp_path):
    config = load_config("sinusoid-maml", TINY[:2])
    train(config, tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config, tmp_path / "r", progress=False)


@pytest.mark.parametrize("name", [n for n in list_presets() if load_config(n).get("kind") != "rl"])  # rl: test_rl.py
def test_every_preset_builds_and_takes_a_step(name):
    config = load_config(name, ["meta_batch=2"])
    family = build_family(config, "train")
    learner = build_learner(config, family)
    loss = learner.meta_loss(family.sample(2, torch.Generator().manual_seed(0)))
    loss.backward()
    assert torch.isfinite(loss)
    assert config["description"], "every preset says which protocol it follows"


def test_cli_presets_and_show(capsys):
    assert main(["presets"]) == 0
    listed = capsys.readouterr().out
    assert "sinusoid-maml" in listed and "linreg-hypernet" in listed
    assert main(["show", "sinusoid-maml"]) == 0
    assert "iterations: 70000" in capsys.readouterr().out


def test_evaluate_in_chunks_equals_one_chunk():
    torch.manual_seed(0)
    learner = allmap.MetaSGD(allmap.nets.MLP([2, 2]), inner_lr=0.5, loss="cross_entropy")
    tasks = allmap.tasks.Logistic2D().sample(30, torch.Generator().manual_seed(0))
    a = evaluate(learner, tasks, steps=[0, 1, 3], chunk=7)
    b = evaluate(learner, tasks, steps=[0, 1, 3], chunk=100)
    assert set(a) == {"loss@0", "loss@1", "loss@3", "accuracy@0", "accuracy@1", "accuracy@3"}
    for k in a:
        assert a[k]["mean"] == pytest.approx(b[k]["mean"], rel=1e-6)


def test_run_folder_written_before_a_config_key_existed_still_loads(tmp_path, capsys):
    import yaml

    out = tmp_path / "old"
    train(load_config("sinusoid-maml", TINY), out, progress=False)
    config = yaml.safe_load((out / "config.yaml").read_text())
    del config["threads"], config["eval"]["chunk"]  # as written by an earlier allmap
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["eval", str(out), "--tasks", "5"]) == 0
    assert "loss@1" in capsys.readouterr().out
