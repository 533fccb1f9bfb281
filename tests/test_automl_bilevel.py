"""Bilevel hyperparameter learning: every strategy's hypergradient against central finite differences of the
validation loss in float64, and the strategies against each other where they must agree."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from allmap.automl import BilevelProblem, Hyperparameters, digits, optimize, train_fixed
from allmap.hypergrad import central_differences


@pytest.fixture(scope="module")
def small():
    s = digits(seed=0).to(dtype=torch.float64)
    return replace(s, x_train=s.x_train[:50], y_train=s.y_train[:50], x_val=s.x_val[:40], y_val=s.y_val[:40])


def _model(hidden: int = 0) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)] if hidden else [nn.Linear(64, 10)]
    return nn.Sequential(*layers).double()


def _fd(problem: BilevelProblem, raw, params, steps=None) -> dict:
    def val(r):
        return problem.val_loss(problem.train(r, params, steps))

    return central_differences(val, raw, 1e-6)[1]


def _close(a: dict, b: dict, rtol=1e-5, atol=1e-9) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


SCALAR = [
    dict(lr_scope="global", decay_scope="global", weight_decay=1e-2),
    dict(lr_scope="per_layer", augment=0.1),
]
STRATEGIES = ["unrolled", "checkpointed", "truncated(10)", "forward", "finite_difference(eps=1e-6)"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("spec", SCALAR, ids=["lr+decay", "per-layer-lr+augment"])
def test_every_strategy_matches_central_differences_of_the_validation_loss(small, spec, strategy):
    model = _model(hidden=8)
    hyper = Hyperparameters(model, lr=0.5, **spec)
    problem = BilevelProblem(model, small, hyper, steps=4, strategy=strategy)
    params = problem.initial_params()
    step = problem.hypergradient(hyper.raw, params)
    _close(step.grads, _fd(problem, hyper.raw, params), rtol=1e-4 if "finite" in strategy else 1e-5)
    assert step.val_loss == pytest.approx(float(problem.val_loss(problem.train(hyper.raw, params))), rel=1e-12)


def test_reverse_strategies_agree_on_per_parameter_decay_and_example_weights(small):
    model = _model()
    hyper = Hyperparameters(model, lr=0.5, weight_decay=1e-2, decay_scope="per_parameter", examples=50)
    grads = {}
    for strategy in ["unrolled", "checkpointed(every=2)", "truncated(5)"]:
        problem = BilevelProblem(model, small, hyper, steps=5, strategy=strategy)
        grads[strategy] = problem.hypergradient(hyper.raw, problem.initial_params()).grads
    _close(grads["unrolled"], grads["checkpointed(every=2)"], rtol=1e-10)
    _close(grads["unrolled"], grads["truncated(5)"], rtol=1e-10)
    some = {"example_logits": hyper.raw["example_logits"]}  # a few coordinates by finite differences
    fd = central_differences(
        lambda r: problem.val_loss(problem.train({**hyper.raw, **r}, problem.initial_params())), some, 1e-6
    )[1]
    torch.testing.assert_close(grads["unrolled"]["example_logits"], fd["example_logits"], rtol=1e-5, atol=1e-10)


def test_truncation_drops_the_early_steps_and_first_order_sees_no_decay(small):
    model = _model()
    hyper = Hyperparameters(model, lr=0.5, lr_scope="global", weight_decay=1e-2, decay_scope="global")
    cut = BilevelProblem(model, small, hyper, steps=6, strategy="truncated(2)")
    params = cut.initial_params()
    full = BilevelProblem(model, small, hyper, steps=6, strategy="unrolled").hypergradient(hyper.raw, params)
    short = cut.hypergradient(hyper.raw, params)
    assert short.val_loss == pytest.approx(full.val_loss, rel=1e-12)
    assert not torch.allclose(short.grads["lr"], full.grads["lr"], rtol=1e-3)
    first = BilevelProblem(model, small, hyper, steps=6, strategy="first_order").hypergradient(hyper.raw, params)
    assert float(first.grads["decay"]) == 0.0  # inner gradients are constants: the decay cannot act
    assert float(first.grads["lr"]) != 0.0  # while the step size still multiplies them


STEPS = 60  # decay 1 makes training strongly convex: 60 steps of rate 0.5 reach the solution in float64


def test_implicit_matches_finite_differences_at_the_solution_of_training(small):
    model = _model()
    hyper = Hyperparameters(model, lr=0.5, weight_decay=1.0, decay_scope="per_parameter", examples=50)
    implicit = "implicit(lam=1e-8, iterations=100, tol=1e-12, safeguard=False)"
    problem = BilevelProblem(model, small, hyper, steps=STEPS, strategy=implicit)
    params = problem.initial_params()
    step = problem.hypergradient(hyper.raw, params)
    reference = BilevelProblem(model, small, hyper, steps=STEPS).hypergradient(hyper.raw, params)
    _close(step.grads, reference.grads, rtol=1e-4, atol=1e-8)  # converged training: the IFT is exact
    some = {"decay/0.bias": hyper.raw["decay/0.bias"]}
    fd = central_differences(lambda r: problem.val_loss(problem.train({**hyper.raw, **r}, params)), some, 1e-6)[1]
    torch.testing.assert_close(step.grads["decay/0.bias"], fd["decay/0.bias"], rtol=1e-4, atol=1e-8)
    neumann = "implicit(lam=1e-8, iterations=60, solver='neumann', alpha=5e-9, tol=1e-6, safeguard=False)"
    by_series = BilevelProblem(model, small, hyper, steps=STEPS, strategy=neumann).hypergradient(hyper.raw, params)
    _close(by_series.grads, step.grads, rtol=1e-4, atol=1e-8)


def test_implicit_refuses_learned_rates_and_weights_must_match_the_data(small):
    model = _model()
    with pytest.raises(ValueError, match="does not depend on the learning rate"):
        BilevelProblem(model, small, Hyperparameters(model, lr_scope="global"), strategy="implicit")
    with pytest.raises(ValueError, match="3 example weights declared for 50 training examples"):
        BilevelProblem(model, small, Hyperparameters(model, examples=3))
    with pytest.raises(ValueError, match="lr_scope must be one of"):
        Hyperparameters(model, lr_scope="per_unit")
    with pytest.raises(ValueError, match="weight_decay > 0"):
        Hyperparameters(model, decay_scope="global", weight_decay=0.0)


def test_optimize_lowers_the_validation_loss_below_fixed_training(small):
    model = _model()
    hyper = Hyperparameters(model, lr=0.05, lr_scope="global")
    problem = BilevelProblem(model, small, hyper, steps=5, strategy="unrolled")
    history = optimize(problem, outer_steps=20, hyper_lr=0.2)
    fixed = train_fixed(problem, hyper.raw, total_steps=100, every=5)
    assert len(history.val_loss) == 20 and history.hyper[-1]["lr"] > 0.05
    assert history.val_loss[-1] < fixed.val_loss[-1]
    assert all(b >= a for a, b in zip(history.cpu_seconds, history.cpu_seconds[1:]))
    assert history.residual == [None] * 20  # only the implicit strategy solves a linear system
