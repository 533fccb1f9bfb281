"""Incremental sine regression: the stream's order and content, OML's second-order meta-gradient on it
against a float64 reference, the closed-form online head against the learner's own inner loop, the
evaluation's numbers, and the CLI end to end."""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from allmap.app.continual_sine import SineMethod, SineProtocol, _seen_mse, evaluate_sine, sine_streams
from allmap.engine.continual import online_regression
from allmap.learners.oml import OML
from allmap.nets.mlp import MLP
from allmap.tasks.streams import IncrementalSine


def test_stream_visits_the_functions_in_slot_order_with_the_right_targets():
    family = IncrementalSine(slots=4, shots=3, queries=5)
    tasks = family.sample(2, torch.Generator().manual_seed(0))
    assert tasks.support_x.shape == (2, 12, 5) and tasks.support_y.shape == (2, 12, 1)
    assert tasks.query_x.shape == (2, 20, 5)
    slot = family.slot_of(tasks.support_x)
    assert slot.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]] * 2  # function by function, in slot order
    assert family.slot_of(tasks.query_x)[0].tolist() == [k for k in range(4) for _ in range(5)]
    assert (tasks.support_x[..., :4].sum(-1) == 1).all()  # exactly one slot per point
    a, phi = tasks.info["amplitude"], tasks.info["phase"]
    assert ((a >= 0.1) & (a <= 5.1)).all() and ((phi >= 0) & (phi <= math.pi)).all()
    for part_x, part_y in ((tasks.support_x, tasks.support_y), (tasks.query_x, tasks.query_y)):
        x = part_x[..., 4]
        assert ((x >= -5) & (x <= 5)).all()
        k = family.slot_of(part_x)
        want = a.gather(1, k) * torch.sin(x + phi.gather(1, k))
        torch.testing.assert_close(part_y[..., 0], want)
    # the evaluation's streams: seeded, the same for every method, different across runs
    protocol = SineProtocol(slots=4, points=3, held_out=5, runs=3)
    one, two = sine_streams(protocol, 3, 0), sine_streams(protocol, 3, 0)
    for p, q in zip(one, two):
        assert torch.equal(p, q)
    assert not torch.equal(one[1][0], one[1][1])


def reference_meta_loss(model: MLP, sx, sy, qx, qy, lr: float) -> torch.Tensor:
    """The OML code's regression loop, written independently: the whole network on each point, the head's
    fast weights ``W - lr * grad`` with ``create_graph=True``, the MSE on all functions after the last point."""
    w, b = model.head.weight, model.head.bias
    for x, y in zip(sx, sy):
        loss = F.mse_loss(F.linear(model.body(x[None]), w, b), y[None])
        gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
        w, b = w - lr * gw, b - lr * gb
    return F.mse_loss(F.linear(model.body(qx), w, b), qy)


def test_oml_meta_gradient_on_sine_matches_a_float64_reference_and_gradcheck():
    torch.manual_seed(0)
    tasks = IncrementalSine(slots=3, shots=2, queries=2).sample(1, torch.Generator().manual_seed(1))
    tasks = type(tasks)(*(t.double() for t in (tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)))
    model = MLP([4, 5, 5, 1]).double()
    learner = OML(model, inner_lr=0.1, inner_steps=6, reset_head=False, loss="mse")
    params = list(learner.parameters())
    names = [n for n, _ in learner.named_parameters()]

    def ours(*values):
        return torch.func.functional_call(learner, dict(zip(names, values)), (tasks,))

    grads = torch.autograd.grad(ours(*params), params)
    ref = torch.autograd.grad(
        reference_meta_loss(model, tasks.support_x[0], tasks.support_y[0], tasks.query_x[0], tasks.query_y[0], 0.1),
        params,
    )
    for g, r in zip(grads, ref):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(ours, tuple(params), eps=1e-6, atol=1e-5)


def test_online_head_equals_the_learners_inner_loop_and_the_evaluation_adds_up():
    torch.manual_seed(0)
    learner = OML(MLP([5, 6, 1]).double(), inner_lr=0.05, inner_steps=12, reset_head=False, loss="mse")
    x, y, _, _ = sine_streams(SineProtocol(slots=4, points=3, held_out=2), 1, 0)
    x, y = x.double(), y.double()
    head = learner.model.head
    path = learner.adapt_path(x[0], y[0, :, None], [3, 12])
    (w, b), snaps = online_regression(
        learner.features(x), y, head.weight.detach()[0], head.bias.detach()[0], 0.05, [3, 12]
    )
    for (ws, bs), model in zip(snaps, path):
        torch.testing.assert_close(ws[0], model.params["head.weight"][0].detach())
        torch.testing.assert_close(bs[0], model.params["head.bias"][0].detach())
    torch.testing.assert_close(w, snaps[-1][0])
    # MSE over the functions seen: the running mean of the per-function MSEs
    pred, target = torch.tensor([[1.0, 1.0, 0.0, 2.0]]), torch.zeros(1, 4)
    torch.testing.assert_close(_seen_mse(pred, target, 2), torch.tensor([[1.0, 1.5]]))
    # a representation with the exact basis [slot * sin x, slot * cos x] and a zero head: the offline head
    # (many shuffled SGD passes) fits the functions almost exactly, the online pass less well, both far below
    # the zero predictor
    protocol = SineProtocol(slots=3, points=20, held_out=10, runs=4, sweep_runs=2, oracle_epochs=30)

    def basis(z: torch.Tensor) -> torch.Tensor:
        s, t = z[:, :3], z[:, 3:]
        return torch.cat([s * torch.sin(t), s * torch.cos(t)], 1)

    zero = SineMethod("basis", basis, torch.zeros(6), torch.zeros(()))
    online = evaluate_sine(zero, protocol)
    offline = evaluate_sine(SineMethod("basis", basis, torch.zeros(6), torch.zeros(()), "offline"), protocol)
    _, _, _, yh = sine_streams(protocol, 4, 0)
    silent = (yh**2).view(4, 3, -1).mean(-1).mean(-1).mean()
    assert online["lr"] in protocol.lrs and len(online["mse_seen_held_out"]) == 3
    assert offline["mse_seen_held_out"][-1]["mean"] < 0.05 * float(silent)
    assert offline["mse_seen_held_out"][-1]["mean"] < online["mse_seen_held_out"][-1]["mean"] < float(silent)


def test_cli_trains_the_sine_presets_and_runs_the_evaluation(tmp_path, capsys):
    from allmap.cli import main

    small = ["--set", "iterations=2", "--set", "eval.tasks=2", "--set", "eval.val_tasks=2", "--set", "eval.chunk=2"]
    small += ["--set", "model.sizes=[11,8,1]", "--no-progress"]
    run, pre = tmp_path / "oml", tmp_path / "pre"
    assert main(["train", "sine-incremental-oml", *small, "--out", str(run)]) == 0
    assert main(["train", "sine-incremental-pretrain", *small, "--out", str(pre)]) == 0
    capsys.readouterr()
    args = ["continual", str(run), "--baseline", str(pre), "--runs", "3", "--sweep-runs", "1", "--scratch-runs", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "HELD-OUT MSE over the functions seen so far" in out and "after 10" in out
    record = json.loads((run / "results.json").read_text())["continual"]
    methods = record["methods"]
    assert (run / record["figure"]).stat().st_size > 0
    assert set(methods) == {
        "OML",
        "OML + offline head (i.i.d. upper bound)",
        "pretrained (i.i.d.) + online head",
        "scratch (whole network online)",
    }
    assert methods["OML"]["mse_seen_held_out"][9]["n"] == 3 and methods["scratch (whole network online)"]["runs"] == 2
    assert all(math.isfinite(c["mean"]) for m in methods.values() for c in m["mse_seen_held_out"])
