"""OML / ANML: the second-order meta-gradient through the online trajectory, the meta-training tasks, the
continual streams and heads of the continual meta-test, its metrics, and the CLI entry point."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from allmap.app.continual import ContinualProtocol, Method, _streams, evaluate_method, run_classes
from allmap.engine.continual import (
    continual_metrics,
    experience_ends,
    fresh_heads,
    nearest_mean,
    nearest_mean_predict,
    online_linear,
)
from allmap.learners.oml import ANML, OML
from allmap.nets.lifelong import ANMLNet, OMLConv
from allmap.tasks.batch import TaskBatch
from allmap.tasks.streams import ContinualStream, OMLTrajectories, class_incremental


def tiny_tasks(dtype=torch.float64, classes=6, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(1, 4, 1, 19, 19, generator=g, dtype=dtype)
    qx = torch.rand(1, 5, 1, 19, 19, generator=g, dtype=dtype)
    return TaskBatch(sx, torch.tensor([[1, 1, 4, 4]]), qx, torch.tensor([[0, 1, 4, 4, 2]]))


def reference_meta_loss(model: torch.nn.Module, tasks: TaskBatch, lr: float, reset_seed: int | None) -> torch.Tensor:
    """The OML code's loop, written independently: the whole network on each image, the head's fast weights
    ``W - lr * grad`` with ``create_graph=True`` (its July 2020 fix), the outer loss after the last image."""
    w, b = model.head.weight, model.head.bias
    if reset_seed is not None:
        torch.manual_seed(reset_seed)
        fresh = torch.randn_like(w) * (2.0 / w.shape[1]) ** 0.5
        rows = torch.zeros(w.shape[0], dtype=torch.bool)
        rows[tasks.support_y[0]] = True
        w = torch.where(rows[:, None], fresh, w)
    for x, y in zip(tasks.support_x[0], tasks.support_y[0]):
        loss = F.cross_entropy(F.linear(model.body(x[None]), w, b), y[None])
        gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
        w, b = w - lr * gw, b - lr * gb
    return F.cross_entropy(F.linear(model.body(tasks.query_x[0]), w, b), tasks.query_y[0])


@pytest.mark.parametrize("net", ["oml", "anml"])
def test_second_order_meta_gradient_matches_reference_and_gradcheck(net):
    torch.manual_seed(0)
    model = (
        OMLConv(hidden=3, out_features=6, image_size=19)
        if net == "oml"
        else ANMLNet(hidden=3, nm_hidden=3, out_features=6, image_size=19)
    ).double()
    learner = (OML if net == "oml" else ANML)(model, inner_lr=0.5, inner_steps=4)
    tasks = tiny_tasks()
    params = list(learner.parameters())

    def ours(*values):
        torch.manual_seed(3)  # the head reset draws from the global generator
        named = dict(zip([n for n, _ in learner.named_parameters()], values))
        return torch.func.functional_call(learner, named, (tasks,))

    grads = torch.autograd.grad(ours(*params), params)
    ref = torch.autograd.grad(reference_meta_loss(model, tasks, 0.5, reset_seed=3), params)
    for g, r in zip(grads, ref):
        assert g.abs().max() > 0  # every layer receives a meta-gradient (no dead network)
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(ours, tuple(params), eps=1e-6, atol=1e-5, fast_mode=True)
    # the second-order terms matter: the first-order meta-gradient of the body differs
    fo = type(learner)(model, inner_lr=0.5, inner_steps=4, first_order=True)
    torch.manual_seed(3)
    fo_grads = torch.autograd.grad(fo.meta_loss(tasks), params)
    assert not torch.allclose(fo_grads[0], grads[0])


def test_adapt_consumes_the_stream_in_order_one_step_per_example():
    torch.manual_seed(0)
    learner = OML(OMLConv(hidden=2, out_features=6, image_size=19).double(), inner_lr=0.5, reset_head=False)
    tasks = tiny_tasks()
    sx, sy = tasks.support_x[0], tasks.support_y[0]
    path = learner.adapt_path(sx, sy, [0, 1, 3])
    w, b = learner.model.head.weight, learner.model.head.bias
    with torch.no_grad():
        for k, model in zip([0, 1, 3], path):
            if k == 0:
                torch.testing.assert_close(model.params["head.weight"], w)
            x = sx[:k]
            wk, bk = w.clone(), b.clone()
            for i in range(k):  # SGD on example i only, in order
                f = learner.model.body(x[i : i + 1])
                p = torch.softmax(F.linear(f, wk, bk), -1)
                p[0, sy[i]] -= 1
                wk, bk = wk - 0.5 * p.T @ f, bk - 0.5 * p[0]
            torch.testing.assert_close(model.params["head.weight"], wk)
    with pytest.raises(ValueError, match="support set has 4"):
        learner.adapt(sx, sy, steps=5)


def test_head_reset_redraws_only_the_rows_of_the_trajectory_classes():
    learner = OML(OMLConv(hidden=2, out_features=6, image_size=19), inner_steps=0)
    start = learner.initial_params(torch.zeros(4, 1, 19, 19), torch.tensor([1, 1, 4, 4]))["head.weight"]
    w = learner.model.head.weight
    changed = (start != w).any(1)
    assert changed.tolist() == [False, True, False, False, True, False]
    with pytest.raises(TypeError, match="body"):
        OML(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="nm"):
        ANML(OMLConv(hidden=2, out_features=6, image_size=19))
    with pytest.raises(ValueError, match="does not apply"):
        OML(OMLConv(hidden=2, out_features=6, image_size=19), hypergrad="implicit")


def test_oml_trajectories_follow_the_oml_code():
    family = OMLTrajectories()
    tasks = family.sample(4, torch.Generator().manual_seed(0))
    assert tasks.support_x.shape == (4, 15, 1, 28, 28) and tasks.query_x.shape == (4, 30, 1, 28, 28)
    for i in range(4):
        sy, qy = tasks.support_y[i], tasks.query_y[i]
        classes = sy.view(3, 5)[:, 0]
        assert (sy.view(3, 5) == classes[:, None]).all() and len(set(classes.tolist())) == 3  # class by class
        assert ((classes >= 481) & (classes <= 962)).all()
        assert ((qy[:15] >= 0) & (qy[:15] <= 480)).all()  # remember images
        assert (qy[15:].view(3, 5) == classes[:, None]).all()
        # the outer images of a trajectory class are other drawings than its support images
        for c in range(3):
            s, q = tasks.support_x[i, 5 * c : 5 * c + 5], tasks.query_x[i, 15 + 5 * c : 20 + 5 * c]
            assert torch.cdist(s.flatten(1), q.flatten(1)).min() > 0
    iid = OMLTrajectories(ways=1, shots=1, queries=1, remember=63, remember_from="all")
    assert iid.sample(2, torch.Generator().manual_seed(1)).query_x.shape == (2, 64, 1, 28, 28)
    with pytest.raises(ValueError, match="shots \\+ queries"):
        OMLTrajectories(shots=15, queries=6)


def test_stream_visits_each_training_image_once_in_class_order():
    ids = torch.arange(7 * 20).view(7, 20).float()  # image (class c, drawing d) has id 20 c + d
    stream = class_incremental(ids, [5, 2, 6], range(15))
    seen = torch.cat([x for x, _ in stream]).tolist()
    assert seen == [20 * c + d for c in (5, 2, 6) for d in range(15)]
    assert [y.item() for _, y in stream] == [k for k in range(3) for _ in range(15)]
    assert stream.ends.tolist() == [15, 30, 45] and len(stream) == 45
    # the meta-test's streams: classes in increasing order, the first 15 drawings, the rest held out
    protocol = ContinualProtocol(classes=(4,), pool=7)
    rows = run_classes(protocol, 4, 0, "test")
    assert rows.tolist() == sorted(rows.tolist())
    x, y = _streams(ids.unsqueeze(-1), rows[None], range(15))
    assert x[0, :, 0].tolist() == [20 * c + d for c in rows.tolist() for d in range(15)]
    xh, _ = _streams(ids.unsqueeze(-1), rows[None], range(15, 20))
    assert set(xh.flatten().tolist()).isdisjoint(x.flatten().tolist())
    with pytest.raises(ValueError, match="class by class"):
        ContinualStream(torch.zeros(3, 1), torch.tensor([1, 0, 1]))


@pytest.mark.parametrize("optimizer", ["adam", "adam-unfused", "sgd"])
def test_online_linear_equals_torch_optimizers_one_example_at_a_time(optimizer, monkeypatch):
    if optimizer == "adam-unfused":  # allmap.compat's fallback where torch has no fused Adam kernel
        monkeypatch.delattr(torch, "_fused_adam_")
        optimizer = "adam"
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 30, 7, generator=g), torch.randint(0, 5, (3, 30), generator=g).sort(1).values
    lrs = [0.01, 0.003, 0.01]
    heads, snaps = online_linear(x, y, 5, lrs, torch.Generator().manual_seed(1), optimizer, snapshots=[10, 30])
    start = fresh_heads(3, 5, 7, x, torch.Generator().manual_seed(1))
    for r in range(3):
        lin = torch.nn.Linear(7, 5)
        lin.weight.data, lin.bias.data = start.weight[r].clone(), start.bias[r].clone()
        opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(lin.parameters(), lr=lrs[r])
        for t in range(30):
            opt.zero_grad()
            F.cross_entropy(lin(x[r, t : t + 1]), y[r, t : t + 1]).backward()
            opt.step()
            if t + 1 == 10:
                torch.testing.assert_close(snaps[0].weight[r], lin.weight.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(heads.weight[r], lin.weight.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(heads.bias[r], lin.bias.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(snaps[1].weight, heads.weight)


def one_hot_features(classes: int = 12) -> torch.Tensor:
    """Every drawing of class c has feature 10 e_c: a head can memorise (and generalise) perfectly."""
    return 10 * torch.eye(classes).unsqueeze(1).expand(classes, 20, classes).clone()


@pytest.mark.parametrize("head", ["online", "ncm", "offline"])
def test_a_head_that_can_memorise_scores_100_percent_on_the_training_stream(head):
    protocol = ContinualProtocol(
        classes=(3, 8), runs=4, sweep_runs=2, pool=12, experiences=4, oracle_epochs=100, oracle_lr=0.05
    )
    out = evaluate_method(Method("m", one_hot_features(), head), protocol)
    for n in ("3", "8"):
        r = out["by_classes"][n]
        assert r["accuracy_stream"]["mean"] == 1.0 and r["accuracy_stream"]["ci95"] == 0.0
        assert r["accuracy_held_out"]["mean"] == 1.0
        assert r["runs"] == 4
        if head != "offline":
            assert r["forgetting_held_out"]["mean"] == 0.0 and r["backward_transfer_held_out"]["mean"] == 0.0
    if head == "online":
        assert out["by_classes"]["8"]["lr"] in protocol.lrs


def test_nearest_mean_is_the_running_class_mean():
    x = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 6.0]]])
    y = torch.tensor([[0, 0, 1, 1]])
    final, (after_two,) = nearest_mean(x, y, 2, [2])
    torch.testing.assert_close(final[0], torch.tensor([[1.0, 0.0], [0.0, 5.0]]))
    assert after_two[0, 1].isnan().all()  # class 1 not seen yet: never predicted
    assert nearest_mean_predict(after_two, torch.tensor([[[0.0, 5.0]]])).tolist() == [[0]]
    assert nearest_mean_predict(final, torch.tensor([[[0.0, 5.0]]])).tolist() == [[1]]


def test_continual_metrics_on_a_hand_made_accuracy_matrix():
    # 3 classes, one per experience; acc[k, c] after experience k
    acc = torch.tensor([[[0.9, 0.0, 0.0], [0.6, 0.8, 0.0], [0.3, 0.8, 1.0]]])
    m = continual_metrics(acc, experience_ends(3, 3))
    torch.testing.assert_close(m["curve"][0], torch.tensor([0.9, 0.7, 0.7]))
    torch.testing.assert_close(m["average_accuracy"], torch.tensor([0.7]))
    torch.testing.assert_close(m["forgetting"], torch.tensor([0.3]))  # ((0.9 - 0.3) + (0.8 - 0.8)) / 2
    torch.testing.assert_close(m["backward_transfer"], torch.tensor([-0.3]))
    assert experience_ends(600, 10)[:2] == [60, 120] and experience_ends(3, 10) == [1, 2, 3]


def test_cli_trains_a_preset_and_runs_the_continual_meta_test(tmp_path, capsys):
    from allmap.cli import main

    run = tmp_path / "oml"
    small = ["--set", "model.hidden=4", "--set", "eval.tasks=2", "--set", "eval.val_tasks=2", "--set", "eval.chunk=2"]
    assert main(["train", "omniglot-oml", "--set", "iterations=2", *small, "--out", str(run), "--no-progress"]) == 0
    pre = tmp_path / "pre"
    assert (
        main(["train", "omniglot-oml-pretrain", "--set", "iterations=2", *small, "--out", str(pre), "--no-progress"])
        == 0
    )
    capsys.readouterr()
    code = main(["continual", str(run), "--baseline", str(pre), "--classes", "3,5", "--runs", "2", "--sweep-runs", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "TRAINING-STREAM accuracy" in out and "HELD-OUT accuracy" in out
    record = json.loads((run / "results.json").read_text())
    methods = record["continual"]["methods"]
    assert set(methods) == {
        "OML",
        "OML + offline head (i.i.d. upper bound)",
        "pretrained (i.i.d.) + online head",
        "pretrained (i.i.d.) + NCM head",
    }
    assert methods["OML"]["by_classes"]["5"]["accuracy_held_out"]["n"] == 2
    assert (run / record["continual"]["figure"]).stat().st_size > 0
    assert main(["continual", str(run), "--classes", "3,x"]) == 2
    assert "--classes expects" in capsys.readouterr().err


def test_step_benchmark_smoke(monkeypatch, capsys):
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["oml_step.py", "--smoke"])
    runpy.run_path("benchmarks/oml_step.py", run_name="__main__")
    out = capsys.readouterr().out
    assert "omniglot-anml" in out and "600 classes" in out
