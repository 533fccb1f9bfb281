"""Runs that fail say so: a diverged or non-finite run exits non-zero with what to change, its run folder
records status "failed", every JSON file is strict JSON, a resume never rewinds a run, and a damaged or
crafted checkpoint is named for what it is."""

from __future__ import annotations

import io
import json
import pickle
import warnings

import pytest
import torch

import allmap
from allmap.app import CheckpointError, ConfigError, NonFiniteLossError, load_config, resume, train
from allmap.app import trainer as loop
from allmap.app.checkpoint import load_checkpoint, save_checkpoint
from allmap.app.runs import TIME_KEYS
from allmap.app.trainer import check_config
from allmap.cli import main

TINY = [
    "iterations=20",
    "meta_batch=4",
    "log_every=5",
    "checkpoint_every=100",
    "eval.tasks=10",
    "eval.every=10",
    "eval.val_tasks=8",
    "eval.queries=10",
    "eval.steps=[0,1,5]",
]


def _sets(items: list[str]) -> list[str]:
    return sum((["--set", s] for s in items), [])


def strict_json(text: str):
    """``json.loads`` that refuses the NaN / Infinity / -Infinity that Python's json writes by default."""

    def refuse(name: str):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_strict_json_helper_refuses_nan():
    with pytest.raises(ValueError, match="not strict JSON: NaN"):
        strict_json('{"a": NaN}')


# -- point 2: diverged runs fail -----------------------------------------------------------------------


@pytest.mark.parametrize("value", [-0.5, -1e-9])
def test_negative_inner_lr_is_refused_at_construction(value):
    with pytest.raises(ConfigError, match=r"learner 'maml': .*inner_lr must be a finite number >= 0 .*got -"):
        check_config(load_config("sinusoid-maml", TINY + [f"learner.inner_lr={value}"]))
    with pytest.raises(ValueError, match=r"MAML: inner_lr must be a finite number >= 0"):
        allmap.MAML(torch.nn.Linear(1, 1), inner_lr=value)
    allmap.MAML(torch.nn.Linear(1, 1), inner_lr=0.0)  # 0 keeps theta: allowed


def test_a_diverging_training_loss_fails_the_run_and_names_what_to_lower(tmp_path, capsys):
    out = tmp_path / "div"
    code = main(["train", "sinusoid-maml", "--out", str(out), "--no-progress", *_sets(TINY + ["optimizer.lr=3.0"])])
    err = capsys.readouterr()
    assert code == 2
    assert "loss@" not in err.out  # no result table
    assert "diverged" in err.err and "Lower optimizer.lr (now 3.0) or learner.inner_lr (now 0.01)" in err.err
    assert f"{loop.DIVERGENCE_FACTOR:g} times" in err.err
    assert "No checkpoint was written" in err.err and "intact" not in err.err
    record = strict_json((out / "results.json").read_text())
    assert record["status"] == "failed" and "diverged" in record["reason"] and record["metrics"] is None
    for line in (out / "metrics.jsonl").read_text().splitlines():
        strict_json(line)


def test_the_divergence_rule_waits_for_a_logged_check_and_keeps_the_last_checkpoint(tmp_path):
    sets = TINY + ["optimizer.lr=3.0", "checkpoint_every=1", "log_every=1", "iterations=10"]
    with pytest.raises(
        loop.DivergedError,
        match=r"diverged at iteration 2: the mean meta-loss of the last "
        r"meta-batch is .*, more than 1000 times the size of the first "
        r"meta-batch's loss \(\d",
    ) as info:
        train(load_config("sinusoid-maml", sets), tmp_path / "div", progress=False)
    assert "The last checkpoint (iteration 1" in str(info.value)
    assert load_checkpoint(tmp_path / "div" / "checkpoint.pt")["iteration"] == 1  # the diverged weights are not saved


def test_a_non_finite_final_test_fails_the_run(tmp_path, capsys):
    # inner_lr 1000: the meta-loss is huge from the first step (so it never rises above its start), and
    # the final test after 5 inner steps is NaN: a failure, not a result
    out = tmp_path / "nan"
    code = main(
        [
            "train",
            "sinusoid-maml",
            "--out",
            str(out),
            "--no-progress",
            *_sets(TINY + ["iterations=3", "learner.inner_lr=1000"]),
        ]
    )
    err = capsys.readouterr()
    assert code == 2 and "loss@5" not in err.out
    assert "final test" in err.err and "loss@5" in err.err and "learner.inner_lr (now 1000)" in err.err
    record = strict_json((out / "results.json").read_text())
    assert record["status"] == "failed" and "loss@5" in record["reason"]
    assert record["metrics"]["loss@5"]["mean"] is None and isinstance(record["metrics"]["loss@0"]["mean"], float)


def test_a_non_finite_loss_before_any_checkpoint_says_none_was_written(tmp_path):
    with pytest.raises(NonFiniteLossError, match="at iteration 2") as info:
        train(load_config("sinusoid-maml", TINY + ["optimizer.lr=1e4"]), tmp_path / "inf", progress=False)
    text = str(info.value)
    assert "No checkpoint was written" in text and "intact" not in text and "Lower optimizer.lr (now 1e4)" in text
    assert strict_json((tmp_path / "inf" / "results.json").read_text())["status"] == "failed"


def test_a_non_finite_loss_after_a_checkpoint_names_it(tmp_path):
    def poison(iteration, learner):
        if iteration == 5:
            with torch.no_grad():
                next(learner.parameters()).fill_(float("nan"))

    sets = TINY + ["checkpoint_every=5", "log_every=1"]
    with pytest.raises(NonFiniteLossError, match=r"at iteration 6.*The last checkpoint \(iteration 5, .*\) is intact"):
        train(load_config("sinusoid-maml", sets), tmp_path / "nan", progress=False, callback=poison)


# -- point 3: strict JSON everywhere ---------------------------------------------------------------------


def test_results_and_eval_json_are_strict_json_with_a_status(tmp_path, capsys):
    out = tmp_path / "ok"
    assert main(["train", "sinusoid-maml", "--out", str(out), "--no-progress", *_sets(TINY)]) == 0
    assert strict_json((out / "results.json").read_text())["status"] == "ok"
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    assert strict_json(capsys.readouterr().out)["status"] == "ok"
    # an inner rate that makes adaptation blow up at evaluation: valid JSON, nulls, status failed, exit 2
    assert main(["eval", str(out), "--json", "--set", "learner.inner_lr=1000"]) == 2
    printed = capsys.readouterr()
    report = strict_json(printed.out)
    assert report["status"] == "failed" and "loss@5" in report["reason"]
    assert report["metrics"]["loss@5"]["mean"] is None
    assert "loss@5" in printed.err and "learner.inner_lr (now 1000)" in printed.err
    assert main(["eval", str(out), "--set", "learner.inner_lr=1000"]) == 2
    assert "nan" not in capsys.readouterr().out


# -- point 5: resume never rewinds, and an extended run logs what an uninterrupted one logs -------------------


def test_resume_to_fewer_iterations_than_done_is_refused_and_leaves_the_config(tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config("sinusoid-maml", TINY + ["checkpoint_every=5"]), out, progress=False)
    before = (out / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--set", "iterations=10", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "has trained 20 iterations" in err and "iterations=10" in err and "iterations >= 20" in err
    assert (out / "config.yaml").read_bytes() == before
    with pytest.raises(ConfigError, match="has trained 20 iterations"):
        resume(out, ["iterations=19"], progress=False)
    assert (out / "config.yaml").read_bytes() == before
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 20


def _rows(run_dir) -> list[dict]:
    rows = [strict_json(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


@pytest.mark.parametrize("first", [7, 8])  # ends off the log/validation schedule, and on it
def test_an_extended_run_logs_exactly_what_an_uninterrupted_run_logs(tmp_path, first):
    sets = TINY + ["log_every=4", "eval.every=8", "checkpoint_every=3", "iterations=14"]
    whole = train(load_config("sinusoid-maml", sets), tmp_path / "whole", progress=False)
    train(load_config("sinusoid-maml", sets + [f"iterations={first}"]), tmp_path / "ext", progress=False)
    extended = resume(tmp_path / "ext", ["iterations=14"], progress=False)
    for name, value in whole.state_dict().items():
        assert torch.equal(extended.state_dict()[name], value), name
    assert _rows(tmp_path / "ext") == _rows(tmp_path / "whole")
    assert [r["iteration"] for r in _rows(tmp_path / "whole") if "loss" in r] == [4, 8, 12, 14]


def test_cpu_seconds_are_logged_and_carried_across_a_resume(tmp_path):
    """Curves against CPU time need a clock that a resume continues, not restarts."""
    sets = TINY + ["log_every=4", "eval.every=8", "checkpoint_every=3", "iterations=14"]
    train(load_config("sinusoid-maml", sets + ["iterations=6"]), tmp_path / "run", progress=False)
    before = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["cpu_elapsed"]
    resume(tmp_path / "run", ["iterations=14"], progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    cpu = [r["cpu_seconds"] for r in rows]
    assert cpu[0] > 0 and all(b >= a for a, b in zip(cpu, cpu[1:])), cpu
    assert saved + 1e-3 >= before[-1]["cpu_seconds"] > 0  # logged rounded to 1 ms
    assert all(r["cpu_seconds"] + 1e-3 >= saved for r in rows if r["iteration"] > 6)


def test_the_loss_row_averages_the_whole_log_window_whatever_checkpoint_every(tmp_path):
    base = TINY + ["iterations=6", "eval.every=100"]
    train(load_config("sinusoid-maml", base + ["checkpoint_every=3"]), tmp_path / "a", progress=False)
    train(load_config("sinusoid-maml", base + ["checkpoint_every=100"]), tmp_path / "b", progress=False)
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")


# -- point 8: checkpoints ------------------------------------------------------------------------------------


def _saved(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"iteration": 3, "w": torch.arange(2000.0)}, path)
    return path


DAMAGED = r"is damaged \(.*\)\. Resume from another copy of the run folder, or train again"


@pytest.mark.parametrize("damage", ["truncate", "not_a_zip", "empty"])
def test_a_damaged_checkpoint_without_checksum_is_called_damaged(tmp_path, damage):
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "not_a_zip": b"hello world " * 50, "empty": b""}[damage])
    path.with_name("checkpoint.pt.sha256").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match=DAMAGED) as info:
            load_checkpoint(path)
    assert "safely" not in str(info.value) and "only tensors" not in str(info.value)


def test_a_checksum_mismatch_is_called_damaged_with_what_to_do(tmp_path):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError,
        match=r"is damaged: its SHA-256 does not match checkpoint.pt.sha256\. "
        r"Resume from another copy of the run folder, or train again",
    ):
        load_checkpoint(path)


class _Hostile:
    """Unpickling this would call ``open(marker, 'w')``: harmless, and visible if it ever ran."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_crafted_pickle_is_refused_as_not_a_weights_file_and_never_run(tmp_path, writer):
    path = _saved(tmp_path)
    marker = tmp_path / "executed"
    _Hostile.marker = str(marker)
    payload = {"iteration": 1, "learner": _Hostile()}
    if writer == "pickle":
        data = pickle.dumps(payload)
    else:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
    path.write_bytes(data)
    path.with_name("checkpoint.pt.sha256").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            CheckpointError,
            match=r"refused: not a weights file \(it contains code or objects other "
            r"than tensors",
        ) as info:
            load_checkpoint(path)
    text = str(info.value)
    assert "weights_only" not in text and "likely succeed" not in text and "damaged" not in text
    assert not marker.exists()


def test_a_checkpoint_without_its_checksum_loads_with_a_warning(tmp_path):
    path = _saved(tmp_path)
    path.with_name("checkpoint.pt.sha256").unlink()
    with pytest.warns(UserWarning, match=r"checkpoint.pt.sha256 is missing, so .* cannot be verified") as record:
        assert load_checkpoint(path)["iteration"] == 3
    assert len(record) == 1 and "\n" not in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact pair loads without a word
        save_checkpoint({"iteration": 4}, path)
        assert load_checkpoint(path)["iteration"] == 4


def _bn_net(inputs: int, outputs: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(inputs, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, outputs),
    )


@pytest.mark.parametrize("which", ["reptile-carried", "protonet-batchnorm"])
def test_trial_step_leaves_the_learners_buffers_grads_and_rng_as_they_were(which):
    """The preflight meta-batch runs one task forward and back, then puts back the learner's buffers (inner
    Adam moments carried from task to task; BatchNorm running statistics, which ProtoNet's encoder updates)
    and clears its gradients, so the run starts from exactly the state it would have without it."""
    from allmap.app.preflight import trial_step
    from allmap.tasks.episodes import Episodes, gaussian_classes

    if which == "reptile-carried":
        family = allmap.tasks.Sinusoid(shots=5)
        learner = allmap.Reptile(_bn_net(1, 1), inner_steps=2, inner_optimizer="adam", inner_state="carried")
        touched = "moments.count"
    else:
        family = Episodes(gaussian_classes(classes=12, per_class=6, shape=(1, 4, 4)), ways=3, shots=1, queries=2)
        learner = allmap.ProtoNet(_bn_net(16, 3))
        touched = "model.2.running_mean"
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    rng = torch.get_rng_state()
    trial_step(learner, family, torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in learner.state_dict().items())
    assert all(p.grad is None for p in learner.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    learner.meta_loss(family.sample(1, torch.Generator().manual_seed(0))).backward()  # without the restore:
    assert not torch.equal(before[touched], learner.state_dict()[touched])
