"""Faults: Ctrl-C / SIGTERM save and resume exactly; a process killed while writing never leaves a broken
checkpoint; a non-finite loss or gradient stops the run naming the iteration, or is skipped and counted.
(SIGKILL of a torchrun worker and its restart is in tests/test_distributed.py.)"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from allmap.app import NonFiniteLossError, load_config, resume, train
from allmap.app import checkpoint as ckpt
from allmap.app.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from allmap.app.runs import TIME_KEYS
from allmap.app.trainer import Interrupted

ROOT = Path(__file__).resolve().parents[1]
SETS = [
    "meta_batch=4",
    "log_every=5",
    "checkpoint_every=5",
    "eval.tasks=20",
    "eval.every=5",
    "eval.val_tasks=8",
    "eval.queries=10",
]


def rows(run_dir: Path) -> list[dict]:
    out = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in out]


def test_ctrl_c_saves_a_checkpoint_exits_cleanly_and_resume_is_exact(tmp_path):
    """SIGINT to a real `allmap train` process: exit status 130, no traceback, checkpoint at the iteration
    it stopped after; resumed, the run ends with exactly the weights (and log) of an uninterrupted run."""
    sig = signal.SIGINT
    out = tmp_path / "cut"
    cmd = [
        sys.executable,
        "-m",
        "allmap",
        "train",
        "sinusoid-metasgd",
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "iterations=1000000",
    ] + sum((["--set", s] for s in SETS), [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists():  # training is under way (first checkpoint at 5)
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err
    match = re.search(rf"{sig.name} received: stopped after iteration (\d+) and saved", err)
    assert match, err
    stopped = int(match.group(1))
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == stopped
    assert "Traceback" not in err

    total = stopped + 7  # continue past the interruption, then compare with a run never interrupted
    resumed = resume(out, [f"iterations={total}"], progress=False)
    whole = train(load_config("sinusoid-metasgd", SETS + [f"iterations={total}"]), tmp_path / "whole", progress=False)
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert rows(out) == rows(tmp_path / "whole")  # same log: the pending losses travelled in the checkpoint


def test_sigterm_in_process_stops_after_the_iteration_and_resume_is_exact(tmp_path):
    config = load_config("sinusoid-metasgd", SETS + ["iterations=20"])

    def terminate(iteration, learner):
        if iteration == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # recorded by the handler; the run stops after iteration 8

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match=r"SIGTERM received: stopped after iteration 8 and saved"):
        train(config, tmp_path / "cut", progress=False, callback=terminate)
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["iteration"] == 8
    resumed = resume(tmp_path / "cut", progress=False)
    whole = train(config, tmp_path / "whole", progress=False)
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")


# -- checkpoints under crashes --------------------------------------------------------------------------


def _state(k: int) -> dict:
    # pieces below torch's intra-op grain size (32768): no OpenMP region, which a forked child could deadlock on
    return {"iteration": k, "w": [torch.full((16_000,), float(k) + i) for i in range(8)]}


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("crash_at", range(6))
def test_a_crash_at_any_point_of_a_save_leaves_a_loadable_checkpoint(crash_at, tmp_path, monkeypatch):
    """Injected crash before the n-th file operation of save_checkpoint (fsync'd writes and renames)."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(_state(1), path)
    calls = {"n": 0}
    real_replace, real_open = os.replace, open

    class Crash(Exception):
        pass

    def counted(fn):
        def wrapper(*args, **kwargs):
            if calls["n"] == crash_at:
                raise Crash
            calls["n"] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(ckpt.os, "replace", counted(real_replace))
    monkeypatch.setattr(ckpt, "open", counted(real_open), raising=False)
    try:
        save_checkpoint(_state(2), path)
        finished = True
    except Crash:
        finished = False
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["iteration"] in (1, 2)
    assert _same(state["w"], _state(state["iteration"])["w"])
    if finished:
        assert state["iteration"] == 2


def _writer(path: str, ready) -> None:  # runs in a forked child, killed with SIGKILL at a random moment
    torch.set_num_threads(1)
    k = 0
    while True:
        k += 1
        save_checkpoint(_state(k), path)
        ready.set()


def test_sigkill_while_writing_never_leaves_a_broken_checkpoint(tmp_path):
    ctx = multiprocessing.get_context("fork")
    path = tmp_path / "checkpoint.pt"
    rng = random.Random(0)
    seen = set()
    for _ in range(int(os.environ.get("ALLMAP_FAULT_TRIALS", "20"))):
        ready = ctx.Event()
        child = ctx.Process(target=_writer, args=(str(path), ready))
        child.start()
        assert ready.wait(30)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(child.pid, signal.SIGKILL)  # our own child, by pid
        child.join()
        state = load_checkpoint(path)  # never damaged, never half-written
        assert _same(state["w"], _state(state["iteration"])["w"])
        seen.add(state["iteration"])
    assert len(seen) > 1


def test_a_damaged_checkpoint_is_named_even_after_an_interrupted_save(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(_state(1), path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint.pt' is damaged"):
        load_checkpoint(path)
    save_checkpoint(_state(2), path)  # a later good save replaces the damaged file
    assert load_checkpoint(path)["iteration"] == 2


# -- non-finite loss or gradient --------------------------------------------------------------------------


def _nan_gradient_once(at: int):
    """A callback that makes the next meta-gradient NaN (the loss stays finite) once, after iteration ``at``."""

    def callback(iteration, learner):
        if iteration == at:
            param = next(learner.parameters())
            handles = []

            def hook(grad):
                handles[0].remove()
                return grad * float("nan")

            handles.append(param.register_hook(hook))

    return callback


def test_non_finite_gradient_with_finite_loss_names_the_iteration(tmp_path):
    config = load_config("sinusoid-maml", ["iterations=20", "meta_batch=2", "log_every=1", "checkpoint_every=5"])
    with pytest.raises(
        NonFiniteLossError,
        match=r"meta-loss was finite .* but a meta-gradient entry was NaN or "
        r"infinite at iteration 7",
    ):
        train(config, tmp_path / "nan", progress=False, callback=_nan_gradient_once(6))
    state = load_checkpoint(tmp_path / "nan" / "checkpoint.pt")
    assert state["iteration"] == 5 and all(torch.isfinite(v).all() for v in state["learner"].values())


def test_skip_mode_skips_the_bad_meta_batch_and_counts_it(tmp_path):
    sets = [
        "iterations=12",
        "meta_batch=2",
        "log_every=4",
        "checkpoint_every=4",
        "eval.tasks=5",
        "eval.every=100",
        "eval.val_tasks=4",
        "on_nonfinite=skip",
    ]
    learner = train(
        load_config("sinusoid-maml", sets), tmp_path / "skip", progress=False, callback=_nan_gradient_once(6)
    )
    assert all(torch.isfinite(p).all() for p in learner.parameters())
    log = rows(tmp_path / "skip")
    assert [(r["iteration"], r["skipped"]) for r in log] == [(4, 0), (8, 1), (12, 1)]
    state = load_checkpoint(tmp_path / "skip" / "checkpoint.pt")
    assert state["skipped"] == 1
    assert int(state["optimizer"]["state"][0]["step"]) == 11  # 12 meta-batches drawn, 11 steps taken


def test_skip_mode_stops_a_diverged_run(tmp_path):
    sets = ["iterations=40", "meta_batch=2", "log_every=5", "checkpoint_every=5", "on_nonfinite=skip"]

    def poison(iteration, learner):
        if iteration == 5:
            with torch.no_grad():
                next(learner.parameters()).fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"10 meta-batches in a row \(iterations 6-15\)"):
        train(load_config("sinusoid-maml", sets), tmp_path / "div", progress=False, callback=poison)
