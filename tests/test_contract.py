"""The contract every learner meets. A new learner joins with one line in CASES.

Each case is ``name -> factory() -> (learner, family)``, built with a fixed seed by :func:`make`. The suite
checks: the learner learns its toy task (whatever the sign of its loss), runs in float64, the vectorised
meta-batch equals the per-task loop (value and meta-gradient), ``meta_backward`` equals
``meta_loss(...).backward()``, every execution mode it accepts (loop, vmap, chunks, forked workers) equals
the plain loop and a mode it refuses raises a clear ``ValueError``, ``allmap.engine.evaluate`` reports
finite metrics that agree with the meta-loss, a float64 ``gradcheck`` of the meta-loss as a function of the
meta-parameters passes, its inputs are left unchanged, and its state dict round-trips.

The file runs with one intra-op thread (see :func:`one_thread`): these models are tiny, and a second
thread only spin-waits.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

import pytest
import torch
from _util import as_function, assert_vmap_equals_loop, guide_module

import allmap
from allmap.engine.forked import can_fork
from allmap.nets import MLP
from allmap.tasks import Episodes, GPRegression, LinearRegression, Logistic2D, Sinusoid, gaussian_classes

RidgeHead = guide_module("ridge_head.py").RidgeHead  # the learner written in docs/extending.md


def _sine_mlp() -> MLP:
    return MLP([1, 32, 32, 1])


def _flat_mlp() -> torch.nn.Module:  # an encoder for the [1, 4, 4] "images" of gaussian_classes
    return torch.nn.Sequential(torch.nn.Flatten(), MLP([16, 32, 8]))


def gaussian_nll(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of ``target [N, 1]`` under ``N(mean, exp(log_std)^2)`` with
    ``pred [N, 2] = [mean, log_std]``: a loss that is negative once the predicted spread is small."""
    mean, log_std = pred[..., :1], pred[..., 1:]
    return (0.5 * ((target - mean) * torch.exp(-log_std)) ** 2 + log_std).mean() + 0.5 * math.log(2 * math.pi)


class SmallSinusoid(Sinusoid):
    """Sinusoids of amplitude 0.005-0.1: a fitted Gaussian's negative log-likelihood goes below zero."""

    amplitude = (0.005, 0.1)


def _episodes() -> Episodes:
    return Episodes(gaussian_classes(), ways=5, shots=2, queries=3)


CASES: dict[str, Callable[[], tuple[allmap.Learner, object]]] = {
    "maml": lambda: (allmap.MAML(_sine_mlp(), inner_lr=0.01, inner_steps=2), Sinusoid(shots=5, queries=5)),
    "fomaml": lambda: (allmap.MAML(_sine_mlp(), inner_lr=0.01, first_order=True), Sinusoid(shots=5, queries=5)),
    "maml-adam": lambda: (
        allmap.MAML(_sine_mlp(), inner_lr=0.01, inner_steps=2, inner_optimizer="adam"),
        Sinusoid(shots=5, queries=5),
    ),
    "maml-nll": lambda: (
        allmap.MAML(MLP([1, 32, 32, 2]), inner_lr=0.001, inner_steps=2, loss=gaussian_nll),
        SmallSinusoid(shots=5, queries=5),
    ),
    "anil": lambda: (allmap.ANIL(_sine_mlp(), inner_lr=0.01, inner_steps=2), Sinusoid(shots=5, queries=5)),
    "metasgd": lambda: (allmap.MetaSGD(MLP([2, 2]), inner_lr=0.1, loss="cross_entropy"), Logistic2D(shots=10)),
    "hypernet": lambda: (
        allmap.HyperNetwork(MLP([4, 1]), x_dim=4, y_dim=1, hidden=32),
        LinearRegression(dim=4, shots=10),
    ),
    "hypernet+steps": lambda: (
        allmap.HyperNetwork(
            MLP([2, 2]), x_dim=2, y_dim=2, hidden=16, inner_steps=1, inner_lr=0.1, loss="cross_entropy"
        ),
        Logistic2D(shots=10),
    ),
    "reptile": lambda: (allmap.Reptile(_sine_mlp(), inner_lr=0.02, inner_steps=5), Sinusoid(shots=5, queries=5)),
    "imaml": lambda: (
        allmap.IMAML(_sine_mlp(), lam=2.0, inner_lr=0.02, inner_steps=3, on_fail="ignore"),
        Sinusoid(shots=5, queries=5),
    ),
    "lstm": lambda: (
        allmap.LSTMMetaLearner(MLP([1, 16, 16, 1]), inner_steps=2, hidden=4),
        Sinusoid(shots=5, queries=5),
    ),
    "protonet": lambda: (allmap.ProtoNet(_flat_mlp()), _episodes()),
    "matching": lambda: (allmap.MatchingNet(_flat_mlp(), scale=5.0), _episodes()),
    "siamese": lambda: (allmap.Siamese(_flat_mlp(), features=8), _episodes()),
    "snail": lambda: (
        allmap.SNAIL(_flat_mlp(), y_dim=5, shots=2, features=8, filters=8, attention=[[8, 4], [8, 4], [8, 4]]),
        _episodes(),
    ),
    "ridge": lambda: (RidgeHead(MLP([1, 32, 32]), y_dim=1), Sinusoid(shots=5, queries=5)),
    "ridge-episodes": lambda: (RidgeHead(_flat_mlp(), y_dim=5, loss="cross_entropy"), _episodes()),
    "cnp": lambda: (allmap.CNP(MLP([2, 32, 32]), decoder=[32]), GPRegression()),
    "cnp-sinusoid": lambda: (allmap.CNP(MLP([2, 32, 32]), decoder=[32]), Sinusoid(shots=5, queries=5)),
    "cnp-classifier": lambda: (allmap.CNPClassifier(_flat_mlp(), features=8, decoder=[16]), _episodes()),
    # in eval mode the ANP's ELBO is taken at the mean of q(z | targets): deterministic, so two runs compare
    # exactly; its training-mode sample is checked in tests/test_neural_process.py
    "anp": lambda: (
        allmap.ANP(MLP([2, 32, 32]), latent=[32], latent_dim=8, attention=[32], heads=4, decoder=[32]).eval(),
        GPRegression(),
    ),
}

#: cases whose held-out meta-loss ends below zero (the "it learns" check must not depend on the loss's sign)
NEGATIVE_LOSS = {"maml-nll"}

#: cases whose evaluation loss is not their meta-loss: the ANP trains on its ELBO (with a KL term and z from
#: q(z | targets)); evaluation predicts with z from q(z | context)

#: meta-gradient strategies whose gradient is the exact derivative of the meta-loss ("": plain backprop);
#: the others are by design another direction (first order, truncated, implicit, Reptile's theta - theta')
EXACT_STRATEGIES = ("", "unrolled", "checkpointed")

#: execution modes every learner is run in, each compared with the plain per-task loop
MODES: dict[str, str | dict] = {
    "loop": "loop",
    "vmap": "vmap",
    "loop(2)": "loop(2)",
    "vmap(2)": "vmap(2)",
    "workers=2": {"mode": "auto", "workers": 2},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for this file (restored after): the models are tiny."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(name: str, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    learner, family = CASES[name]()
    return learner.to(dtype), family


def tasks_of(family, n: int = 6, seed: int = 1, dtype: torch.dtype = torch.float32) -> allmap.TaskBatch:
    return family.sample(n, torch.Generator().manual_seed(seed)).to(dtype=dtype)


def learned(before: float, after: float, fraction: float = 0.15, margin: float = 0.01) -> bool:
    """Whether a loss fell from ``before`` to ``after`` by at least ``fraction`` of its size ``|before|`` plus
    ``margin``: the same demand for a loss of either sign (``after < 0.8 * before`` would accept a negative
    log-likelihood that rose from -1.0 to -0.85), and a real drop for one that starts near zero."""
    return before - after > fraction * abs(before) + margin


def test_learned_is_a_drop_whatever_the_sign_of_the_loss():
    assert learned(3.0, 2.0) and not learned(3.0, 2.6)
    assert learned(-1.0, -1.3) and not learned(-1.0, -0.85) and not learned(-1.0, -1.1)
    assert learned(0.5, -0.5) and not learned(0.01, 0.0)


@pytest.mark.parametrize("name", CASES)
def test_learns_toy_task(name):
    learner, family = make(name)
    opt = torch.optim.Adam(learner.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(2)
    held_out = tasks_of(family, 64, seed=99)
    with torch.no_grad():
        before = learner.meta_loss(held_out).item()
    for _ in range(150):
        opt.zero_grad()
        learner.meta_loss(family.sample(16, gen)).backward()
        opt.step()
    with torch.no_grad():
        after = learner.meta_loss(held_out).item()
    assert learned(before, after), f"{name}: held-out meta-loss {before:.4f} -> {after:.4f}"
    if name in NEGATIVE_LOSS:
        assert after < 0, f"{name}: the case is there to learn a loss below zero, got {after:.4f}"


@pytest.mark.parametrize("name", CASES)
def test_float64(name):
    learner, family = make(name, torch.float64)
    loss = learner.meta_loss(tasks_of(family, dtype=torch.float64))
    loss.backward()
    assert loss.dtype == torch.float64
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in learner.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", CASES)
def test_vectorised_equals_loop(name):
    learner, family = make(name, torch.float64)
    assert_vmap_equals_loop(learner, tasks_of(family, dtype=torch.float64))


@pytest.mark.parametrize("name", CASES)
def test_inputs_unchanged(name):
    learner, family = make(name)
    tasks = tasks_of(family)
    copies = [t.clone() for t in (tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)]
    versions = [t._version for t in (tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)]
    params = {n: (p.detach().clone(), p._version) for n, p in learner.named_parameters()}
    learner.meta_loss(tasks).backward()
    learner.adapt(tasks.support_x[0], tasks.support_y[0])(tasks.query_x[0])
    for t, c, v in zip((tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y), copies, versions):
        assert torch.equal(t, c) and t._version == v
    for n, p in learner.named_parameters():
        assert torch.equal(p.detach(), params[n][0]) and p._version == params[n][1], n


@pytest.mark.parametrize("name", CASES)
def test_state_dict_round_trip(name):
    learner, family = make(name)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.01 * torch.randn_like(p))
    twin, _ = make(name)
    twin.load_state_dict(learner.state_dict())
    tasks = tasks_of(family)
    torch.testing.assert_close(learner.meta_loss(tasks), twin.meta_loss(tasks), rtol=0, atol=0)


# -- the engine ---------------------------------------------------------------------------------------
Result = tuple[torch.Tensor, list[torch.Tensor | None]]


def _run(
    learner: allmap.Learner, tasks: allmap.TaskBatch, entry: str, chunk: int | None = None, scale: float = 1.0
) -> Result:
    """The loss and every parameter's gradient of ``meta_loss(tasks).backward()`` (``entry="meta_loss"``) or
    of ``meta_backward(tasks, chunk, scale)`` (``entry="meta_backward"``), from zero gradients."""
    learner.zero_grad(set_to_none=True)
    if entry == "meta_loss":
        loss = learner.meta_loss(tasks)
        loss.backward()
        loss = loss.detach()
    else:
        loss = learner.meta_backward(tasks, chunk=chunk, scale=scale)
    return loss, [None if p.grad is None else p.grad.clone() for p in learner.parameters()]


def assert_same(learner: allmap.Learner, got: Result, expected: Result, what: str, scale: float = 1.0) -> None:
    """Equal in float64 up to rounding: the loss to 1e-12, every gradient to 1e-10 (relative)."""
    torch.testing.assert_close(got[0], scale * expected[0], rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: loss: {m}")
    for (pname, _), g, e in zip(learner.named_parameters(), got[1], expected[1]):
        assert (g is None) == (e is None), f"{what}: {pname} has a gradient in one run and none in the other"
        if g is not None:
            torch.testing.assert_close(
                g, scale * e, rtol=1e-10, atol=1e-12, msg=lambda m, pname=pname: f"{what}: {pname}: {m}"
            )


def run_mode(learner: allmap.Learner, tasks: allmap.TaskBatch, execution: str | dict) -> dict[str, Result] | ValueError:
    """``meta_backward`` and ``meta_loss(...).backward()`` with ``learner.execution = execution`` (only the
    first with forked workers, which only ``meta_backward`` uses), or the ``ValueError`` with which the
    learner refuses that mode."""
    try:
        learner.execution = execution
        entries = ("meta_backward",) if learner.execution.workers else ("meta_backward", "meta_loss")
        return {entry: _run(learner, tasks, entry) for entry in entries}
    except ValueError as err:
        return err


def assert_clear_refusal(err: ValueError, learner: allmap.Learner) -> None:
    """A refused execution mode says which learner refuses what, and what to do instead."""
    msg = str(err)
    assert type(learner).__name__ in msg, msg
    assert re.search(r"vmap|loop|workers|execution", msg), msg
    assert re.search(r"\b[Uu]se\b", msg), msg


@pytest.mark.parametrize("name", CASES)
def test_meta_backward_equals_meta_loss_backward(name):
    learner, family = make(name, torch.float64)
    tasks = tasks_of(family, dtype=torch.float64)
    expected = _run(learner, tasks, "meta_loss")
    for chunk in (None, 1, 4):  # 6 tasks: one pass, six, and chunks of 4 and 2 weighted by their share
        assert_same(learner, _run(learner, tasks, "meta_backward", chunk=chunk), expected, f"{name} chunk={chunk}")
    assert_same(learner, _run(learner, tasks, "meta_backward", scale=0.5), expected, f"{name} scale=0.5", scale=0.5)


@functools.cache
def _loop_reference(name: str) -> Result:
    """Loss and meta-gradient of the plain per-task loop on 4 float64 tasks (computed once per case)."""
    learner, family = make(name, torch.float64)
    learner.execution = "loop"
    return _run(learner, tasks_of(family, n=4, dtype=torch.float64), "meta_loss")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASES)
def test_execution_mode_equals_the_loop(name, mode):
    if isinstance(MODES[mode], dict) and MODES[mode].get("workers", 0) > 1 and not can_fork():
        pytest.skip("forked workers need Linux and no CUDA context")
    learner, family = make(name, torch.float64)
    outcome = run_mode(learner, tasks_of(family, n=4, dtype=torch.float64), MODES[mode])
    if isinstance(outcome, ValueError):
        assert_clear_refusal(outcome, learner)
        pytest.skip(f"{name} refuses {mode}: {outcome}")
    for entry, result in outcome.items():
        assert_same(learner, result, _loop_reference(name), f"{name} {mode} {entry}")


def test_refused_modes_raise_a_clear_value_error():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(1, 8), torch.nn.BatchNorm1d(8, affine=False), torch.nn.ReLU(), torch.nn.Linear(8, 1)
    )
    maml = allmap.MAML(net, inner_lr=0.01).double()  # torch's vmap rule for batch_norm's 2nd derivative is wrong
    tasks = tasks_of(Sinusoid(shots=5, queries=5), dtype=torch.float64)
    refusal = run_mode(maml, tasks, "vmap")
    assert isinstance(refusal, ValueError) and "vmap with BatchNorm" in str(refusal)
    assert_clear_refusal(refusal, maml)
    assert not isinstance(run_mode(maml, tasks, "loop"), ValueError)
    if can_fork():  # BatchNorm running statistics updated in a forked child would be lost
        proto = allmap.ProtoNet(
            torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8))
        )
        refusal = run_mode(proto, tasks_of(_episodes()), {"mode": "auto", "workers": 2})
        assert isinstance(refusal, ValueError) and "running statistics" in str(refusal)
        assert_clear_refusal(refusal, proto)


@pytest.mark.parametrize("name", CASES)
def test_evaluate(name):
    learner, family = make(name, torch.float64)
    tasks = tasks_of(family, dtype=torch.float64)
    spec = learner.spec
    steps = sorted({0, 1, spec.inner_steps or 0})
    results = allmap.engine.evaluate(learner, tasks, steps=steps)
    suffixes = [f"@{k}" for k in steps] if spec.adapts_in_steps else [""]
    metrics = ["loss", "accuracy"] if spec.classification else ["loss"]
    if spec.predictive:
        metrics += ["target_loglik", "context_loglik", "mse", "coverage95"]
    assert set(results) == {m + s for m in metrics for s in suffixes}
    for key, r in results.items():
        assert math.isfinite(r["mean"]) and math.isfinite(r["ci95"]) and r["ci95"] >= 0 and r["n"] == len(tasks), key
        if key.startswith(("accuracy", "coverage")):
            assert 0 <= r["mean"] <= 1, key
    # evaluation scores the task model that meta-training adapts: its query loss is the meta-loss
    with torch.no_grad():
        value = learner.meta_loss(tasks).item()
    trained = f"loss@{spec.inner_steps}" if spec.adapts_in_steps else "loss"
    if name not in OWN_OBJECTIVE:
        assert results[trained]["mean"] == pytest.approx(value, rel=1e-9, abs=1e-12)


#: learners whose training objective is not the query loss of their task model (evaluation scores the
#: latter): Siamese networks train on the verification loss of support-query pairs
OWN_OBJECTIVE = {"siamese", "anp"}


@pytest.mark.parametrize("name", CASES)
def test_gradcheck_of_the_meta_loss(name):
    learner, family = make(name, torch.float64)
    if learner.spec.strategy not in EXACT_STRATEGIES:
        pytest.skip(f"{name}'s meta-gradient ({learner.spec.strategy}) is by design not the meta-loss's derivative")
    f, params = as_function(learner, tasks_of(family, n=2, dtype=torch.float64))
    # fast mode: every parameter's analytic gradient against central differences along random directions
    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
