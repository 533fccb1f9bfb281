"""torch.distributed meta-training: N ranks end with the weights of one process; restarts after SIGKILL.

The sharding arithmetic is checked in one process (fast); two tests launch real gloo process groups on
localhost through torchrun (``python -m torch.distributed.run``), each a few seconds plus interpreter
start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import allmap
from allmap.app import load_config, train
from allmap.app.checkpoint import load_checkpoint
from allmap.app.distributed import Dist, evaluate_sharded, pool_summaries, reduce_step
from allmap.app.runs import TIME_KEYS
from allmap.engine.evaluate import evaluate, summarize

ROOT = Path(__file__).resolve().parents[1]
# 12 iterations, checkpoints every 4, an odd meta-batch (uneven shards) and an odd number of test tasks.
TINY = [
    "iterations=12",
    "meta_batch=5",
    "log_every=4",
    "checkpoint_every=4",
    "eval.tasks=31",
    "eval.every=6",
    "eval.val_tasks=9",
    "eval.queries=10",
]
PRESET = "sinusoid-maml"


def torchrun(
    args: list[str], out: Path, nproc: int = 2, env: dict[str, str] | None = None, max_restarts: int = 0
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={max_restarts}",
        *args,
        "--out",
        str(out),
        "--no-progress",
    ]
    for s in TINY:
        cmd += ["--set", s]
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoint.pt")["learner"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """An uninterrupted 2-process gloo run through the real CLI: torchrun -m allmap train ..."""
    out = tmp_path_factory.mktemp("dist") / "two"
    proc = torchrun(["-m", "allmap", "train", PRESET], out)
    assert proc.stdout.count("run folder:") == 1  # only rank 0 prints
    return out


def test_two_gloo_ranks_end_with_the_weights_of_one_process(two_ranks, tmp_path):
    one = train(load_config(PRESET, TINY), tmp_path / "one", progress=False)
    two = weights(two_ranks)
    for name, value in one.state_dict().items():
        torch.testing.assert_close(two[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # the training log and the sharded, gathered evaluation agree with one process
    rows_one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    rows_two = [json.loads(x) for x in (two_ranks / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows_two] == [r["iteration"] for r in rows_one] == [4, 6, 8, 12]
    for a, b in zip(rows_one, rows_two):
        for key in set(a) - set(TIME_KEYS):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    res_one = json.loads((tmp_path / "one" / "results.json").read_text())["metrics"]
    res_two = json.loads((two_ranks / "results.json").read_text())["metrics"]
    assert set(res_one) == set(res_two) == {"loss@0", "loss@1", "loss@5", "loss@10"}
    for key in res_one:
        assert res_two[key]["n"] == 31
        assert res_two[key]["mean"] == pytest.approx(res_one[key]["mean"], rel=1e-5)
        assert res_two[key]["ci95"] == pytest.approx(res_one[key]["ci95"], rel=1e-5)


def test_sigkilled_rank_restarts_and_ends_with_the_uninterrupted_weights(two_ranks, tmp_path):
    """torchrun --max-restarts=1: rank 1 SIGKILLs itself after iteration 7 (checkpoint at 4); the group is
    restarted, resumes from iteration 4 and ends bit-for-bit where the uninterrupted 2-rank run ended."""
    out = tmp_path / "killed"
    env = {"ALLMAP_KILL_AT": "7", "ALLMAP_KILL_RANK": "1"}
    proc = torchrun([str(ROOT / "tests" / "_fault_worker.py"), "train", PRESET], out, env=env, max_restarts=1)
    assert "exitcode: -9" in proc.stderr or "SIGKILL" in proc.stderr  # the fault really happened
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 12
    ref = weights(two_ranks)
    for name, value in weights(out).items():
        assert torch.equal(value, ref[name]), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [4, 6, 8, 12]  # nothing lost, nothing logged twice
    assert json.loads((out / "results.json").read_text()) == json.loads((two_ranks / "results.json").read_text())


# -- the arithmetic of sharding, in one process ---------------------------------------------------------


@pytest.mark.parametrize("n,world", [(5, 2), (7, 3), (4, 4), (100, 7)])
def test_shards_are_contiguous_balanced_and_cover_everything(n, world):
    parts = [Dist(r, world).shard(n) for r in range(world)]
    assert parts[0].start == 0 and parts[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_weighted_shard_gradients_sum_to_the_whole_meta_batch_gradient():
    """sum_r grad[(n_r / B) meta_loss(shard_r)] == grad[meta_loss(batch)]: what all_reduce(SUM) relies on."""
    torch.manual_seed(0)
    learner = allmap.MAML(allmap.nets.MLP([1, 16, 1]), inner_lr=0.05, inner_steps=2).double()
    tasks = allmap.tasks.Sinusoid().sample(7, torch.Generator().manual_seed(1)).to(dtype=torch.float64)
    whole = torch.autograd.grad(learner.meta_loss(tasks), list(learner.parameters()))
    total = [torch.zeros_like(g) for g in whole]
    for r in range(3):
        part = tasks[Dist(r, 3).shard(7)]
        loss = learner.meta_loss(part) * (len(part) / 7)
        for acc, g in zip(total, torch.autograd.grad(loss, list(learner.parameters()))):
            acc += g
    for a, b in zip(total, whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_pooled_shard_summaries_equal_the_summary_of_all_values():
    values = torch.randn(31, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3 + 1
    for world in (1, 2, 3, 5, 31):
        parts = [summarize(values[Dist(r, world).shard(31)]) for r in range(world)]
        pooled, direct = pool_summaries(parts), summarize(values)
        for key in ("mean", "ci95", "std", "n"):
            assert pooled[key] == pytest.approx(direct[key], rel=1e-12), (world, key)


def test_evaluate_sharded_in_one_process_is_evaluate():
    torch.manual_seed(0)
    learner = allmap.MetaSGD(allmap.nets.MLP([2, 2]), inner_lr=0.5, loss="cross_entropy")
    tasks = allmap.tasks.Logistic2D().sample(9, torch.Generator().manual_seed(0))
    assert evaluate_sharded(learner, tasks, [0, 1], 4, Dist()) == evaluate(learner, tasks, steps=[0, 1], chunk=4)


def test_reduce_step_flags_non_finite_gradients_with_a_finite_loss():
    p = torch.nn.Parameter(torch.ones(3))
    unused = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    loss, finite, stop = reduce_step([p, unused], torch.tensor(0.5), True, Dist())
    assert float(loss) == 0.5 and not bool(finite) and stop
    p.grad = torch.ones(3)
    assert bool(reduce_step([p, unused], torch.tensor(0.5), False, Dist())[1])
    assert not bool(reduce_step([p], torch.tensor(float("inf")), False, Dist())[1])
    assert unused.grad is None
