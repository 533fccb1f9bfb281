"""Forked evaluation workers (allmap/engine/forked.py): results in order, errors raised in the parent, thread
counts, and evaluate() giving the same numbers with any number of workers."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import allmap
from allmap.engine.evaluate import evaluate, evaluation_workers
from allmap.engine.forked import can_fork, children_peak_mb, even_shares, reset_peak_rss, run_forked
from allmap.tasks.batch import TaskBatch

pytestmark = pytest.mark.skipif(not can_fork(), reason="forked workers need Linux without a CUDA context")


def _report(piece: int) -> tuple[int, int, int]:
    return piece * piece, os.getpid(), torch.get_num_threads()


def test_run_forked_keeps_order_and_runs_each_piece_in_its_own_one_thread_process():
    before = torch.get_num_threads()
    out = run_forked(_report, [1, 2, 3, 4])
    assert [r[0] for r in out] == [1, 4, 9, 16]
    assert os.getpid() not in {r[1] for r in out} and len({r[1] for r in out}) == 4
    assert all(r[2] == 1 for r in out) and torch.get_num_threads() == before
    assert len(children_peak_mb()) == 4
    reset_peak_rss()  # a benchmark's new measurement forgets earlier children
    assert children_peak_mb() == []


def test_run_forked_here_computes_the_first_piece_in_this_process_with_one_thread():
    before = torch.get_num_threads()
    out = run_forked(_report, [1, 2, 3], here=True)
    assert [r[0] for r in out] == [1, 4, 9]
    assert out[0][1] == os.getpid() and os.getpid() not in {out[1][1], out[2][1]}
    assert all(r[2] == 1 for r in out) and torch.get_num_threads() == before  # restored here
    assert len(children_peak_mb()) == 2  # only the children's peaks
    assert run_forked(_report, [], here=True) == []
    with pytest.raises(ValueError, match="piece three is bad"):  # raised here, as itself
        run_forked(_fail_on_three, [3, 1], here=True)
    assert torch.get_num_threads() == before


def _fail_on_three(piece: int) -> int:
    if piece == 3:
        raise ValueError("piece three is bad")
    return piece


def test_run_forked_raises_a_childs_error_with_its_message():
    with pytest.raises(RuntimeError, match="ValueError: piece three is bad"):
        run_forked(_fail_on_three, [1, 2, 3])
    assert run_forked(_fail_on_three, [5]) == [5]


def _conv_maml() -> allmap.MAML:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3)
    ).double()
    return allmap.MAML(net, inner_lr=0.2, inner_steps=2, loss="cross_entropy")


def _image_tasks(n: int) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(n, 1)
    return TaskBatch(
        torch.randn(n, 3, 1, 7, 7, generator=g, dtype=torch.float64),
        y,
        torch.randn(n, 3, 1, 7, 7, generator=g, dtype=torch.float64),
        y.clone(),
    )


def test_evaluate_with_workers_equals_one_process():
    learner, tasks = _conv_maml(), _image_tasks(11)
    one = evaluate(learner, tasks, steps=(0, 1, 2), chunk=4, workers=0)
    for workers in (1, 2, 3):  # float64: thread counts change only the last bits of sums
        many = evaluate(learner, tasks, steps=(0, 1, 2), chunk=4, workers=workers)
        assert many.keys() == one.keys()
        for key in one:
            assert many[key] == pytest.approx(one[key], rel=1e-12, abs=1e-14)
    assert one["accuracy@2"]["n"] == 11
    with pytest.raises(ValueError, match="workers must be 'auto' or a number of processes >= 0, got -1"):
        evaluate(learner, tasks, workers=-1)


def test_evaluation_workers_rule():
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert evaluation_workers(_conv_maml(), 600) == 2  # conv net, one task at a time on CPU
        assert evaluation_workers(_conv_maml(), 16) == 2 and evaluation_workers(_conv_maml(), 15) == 0  # 8 per fork
        mlp = allmap.MAML(nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)))
        assert evaluation_workers(mlp, 600) == 0  # runs under vmap, in this process
        torch.set_num_threads(1)
        assert evaluation_workers(_conv_maml(), 600) == 0  # one thread: a fork would not be faster
    finally:
        torch.set_num_threads(saved)
    assert even_shares(10, 3) == [(0, 3), (3, 6), (6, 10)] and even_shares(2, 2) == [(0, 1), (1, 2)]


# -- meta_backward in forked processes (Execution(workers=...)) -------------------------------------------
@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_forked_meta_backward_gives_the_in_process_meta_gradient_and_accumulates(mode):
    torch.manual_seed(0)
    learner = allmap.MAML(allmap.nets.MLP([1, 16, 16, 1]), inner_lr=0.01, inner_steps=2).double()
    tasks = allmap.tasks.Sinusoid(shots=5).sample(5, torch.Generator().manual_seed(0)).to(dtype=torch.float64)
    learner.execution = mode
    here = learner.meta_backward(tasks, scale=0.5)
    expected = [p.grad.clone() for p in learner.parameters()]
    learner.zero_grad(set_to_none=True)
    learner.execution = {"mode": mode, "workers": 2}  # shares of 2 and 3 tasks
    forked = learner.meta_backward(tasks, scale=0.5)
    assert torch.allclose(forked, here, rtol=1e-12, atol=0)
    for p, g in zip(learner.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-14)
    learner.meta_backward(tasks, scale=0.5)  # adds to .grad like backward()
    for p, g in zip(learner.parameters(), expected):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-10, atol=1e-14)


def test_forked_meta_backward_refuses_running_statistics_and_bad_worker_counts():
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8))
    learner = allmap.ProtoNet(encoder)
    learner.execution = allmap.engine.execution.Execution("auto", workers=2)
    tasks = allmap.tasks.Episodes(allmap.tasks.gaussian_classes(), ways=3, shots=2, queries=2).sample(
        4, torch.Generator().manual_seed(0)
    )
    with pytest.raises(ValueError, match="running statistics .*workers=0"):
        learner.meta_backward(tasks)
    with pytest.raises(ValueError, match="workers .*integer >= 0"):
        learner.execution = {"mode": "loop", "workers": -1}
