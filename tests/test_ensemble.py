"""Ensembles of trained classifiers: the mean of the members' class probabilities, checked against a plain
loop, float64 gradient checks of the ensemble's loss, evaluation, ``allmap eval RUN RUN``, and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _util import image_folder, imagefolder_config
from torch import nn

import allmap
from allmap.engine.evaluate import evaluate, evaluate_per_task, fixed_tasks
from allmap.learners.ensemble import Ensemble
from allmap.nets import MLP
from allmap.tasks import Episodes, gaussian_classes


def _members(n: int = 3, hidden: int = 8) -> list:
    torch.manual_seed(0)
    kinds = [
        lambda: allmap.ProtoNet(nn.Sequential(nn.Flatten(), MLP([16, hidden, 4]))),
        lambda: allmap.MatchingNet(nn.Sequential(nn.Flatten(), MLP([16, hidden, 4])), scale=3.0),
    ]
    return [kinds[i % 2]().double() for i in range(n)]


def _tasks(n: int = 3, ways: int = 4):
    family = Episodes(gaussian_classes(), ways=ways, shots=2, queries=3)
    return family.sample(n, torch.Generator().manual_seed(7)).to(dtype=torch.float64)


def _reference_log_probs(members, sx, sy, qx) -> torch.Tensor:
    """log of the mean over members of each query's class probabilities, query by query and class by class."""
    scores = [m.adapt(sx, sy)(qx) for m in members]
    rows = []
    for q in range(len(qx)):
        probs = []
        for k in range(scores[0].shape[1]):
            p = sum(math.exp(s[q, k].item()) / sum(math.exp(v) for v in s[q].tolist()) for s in scores)
            probs.append(math.log(p / len(members)))
        rows.append(probs)
    return torch.tensor(rows, dtype=torch.float64)


def test_ensemble_predicts_the_log_of_the_mean_member_probabilities():
    members, tasks = _members(3), _tasks()
    ensemble = Ensemble(members).eval()
    sx, sy, qx = tasks.support_x[0], tasks.support_y[0], tasks.query_x[0]
    out = ensemble.adapt(sx, sy)(qx)
    torch.testing.assert_close(out, _reference_log_probs(members, sx, sy, qx), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(len(qx), dtype=torch.float64))
    # one member: its own log-probabilities; copies of one member: the same
    alone = members[0].adapt(sx, sy)(qx).log_softmax(-1)
    torch.testing.assert_close(Ensemble(members[:1]).adapt(sx, sy)(qx), alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Ensemble([members[0]] * 4).adapt(sx, sy)(qx), alone, rtol=1e-12, atol=1e-12)
    assert "3 members" in repr(ensemble)


def test_float64_gradcheck_and_a_loop_reference_of_the_ensemble_loss():
    members, tasks = _members(2, hidden=2), _tasks(n=2, ways=3)
    ensemble = Ensemble(members)
    names = [n for n, _ in ensemble.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in ensemble.parameters())

    def loss(*ps):
        return torch.func.functional_call(ensemble, dict(zip(names, ps)), (tasks,))

    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-6, fast_mode=True)
    # the meta-gradient against the mean cross-entropy of the loop reference
    ensemble.zero_grad()
    ensemble.meta_loss(tasks).backward()
    ref = torch.stack(
        [
            -_reference_log_probs(members, tasks.support_x[t], tasks.support_y[t], tasks.query_x[t])
            .gather(1, tasks.query_y[t][:, None])
            .mean()
            for t in range(len(tasks))
        ]
    ).mean()
    assert math.isclose(ensemble.meta_loss(tasks).item(), ref.item(), rel_tol=1e-12)
    # and the gradient against that of the mean probabilities written directly, task by task
    nll = []
    for t in range(len(tasks)):
        sx, sy, qx, qy = tasks.support_x[t], tasks.support_y[t], tasks.query_x[t], tasks.query_y[t]
        probs = torch.stack([m.adapt(sx, sy)(qx).softmax(-1) for m in members]).mean(0)
        nll.append(-probs.log().gather(1, qy[:, None]).mean())
    expected = torch.autograd.grad(torch.stack(nll).mean(), list(ensemble.parameters()))
    for p, g in zip(ensemble.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_evaluate_scores_the_ensemble_task_by_task():
    members, tasks = _members(3), _tasks(n=5)
    ensemble = Ensemble(members).eval()
    acc = evaluate_per_task(ensemble, tasks, steps=[0])["accuracy"]
    for t in range(len(tasks)):
        ref = _reference_log_probs(members, tasks.support_x[t], tasks.support_y[t], tasks.query_x[t])
        expected = (ref.argmax(1) == tasks.query_y[t]).double().mean()
        assert math.isclose(acc[t].item(), expected.item(), rel_tol=1e-9)
    assert (
        evaluate(Ensemble(members[:1]).eval(), tasks, steps=[0])["accuracy"]
        == evaluate(members[0].eval(), tasks, steps=[0])["accuracy"]
    )


def test_ensemble_errors_are_clear():
    with pytest.raises(TypeError, match="non-empty list of allmap learners, got nothing"):
        Ensemble([])
    with pytest.raises(TypeError, match="got ProtoNet, Linear"):
        Ensemble([_members(1)[0], nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="every member must be a classifier .*MAML is not"):
        Ensemble([allmap.MAML(nn.Linear(1, 1))])
    with pytest.raises(ValueError, match="differ in labels \\(outputs, support\\)"):
        Ensemble([_members(1)[0], allmap.MAML(nn.Linear(16, 4), loss="cross_entropy")])


# -- allmap eval RUN RUN ---------------------------------------------------------------------------------
def test_allmap_eval_of_several_runs_scores_their_ensemble(tmp_path, capsys):
    from allmap.app import load_config
    from allmap.app.build import build_family
    from allmap.app.runs import load
    from allmap.cli import main

    config = imagefolder_config(tmp_path, image_folder(tmp_path / "images", [f"c{i}" for i in range(10)]))
    runs = [tmp_path / "a", tmp_path / "b"]
    for seed, run in enumerate(runs):
        assert main(["train", str(config), "--set", f"seed={seed}", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", *map(str, runs), "--json", "--no-progress"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert "an ensemble of 2 models (mean class probabilities), 4 fixed test tasks" in record["protocol"]
    tasks = fixed_tasks(build_family(load_config(str(config)), "test"), 4, 1000)
    expected = evaluate(Ensemble([load(r) for r in runs]).eval(), tasks, steps=[0], workers=0)
    assert math.isclose(record["metrics"]["accuracy"]["mean"], expected["accuracy"]["mean"], rel_tol=1e-6)
    # the same weights from elsewhere, with the config file
    weights = [str(r / "checkpoint.pt") for r in runs]
    assert main(["eval", str(config), "--weights", *weights, "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["accuracy"] == record["metrics"]["accuracy"]
    # --weights with run folders is refused, with what to do
    assert main(["eval", str(runs[0]), str(runs[1]), "--weights", weights[0]]) == 2
    assert "--weights goes with one preset or config file" in capsys.readouterr().err
