"""HD-SGD / HD-Adam and learning to reweight: their hypergradients against central finite differences in
float64, and the optimizers against torch's own at zero hypergradient rate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from allmap.automl import digits, flip_labels
from allmap.automl.hd import HDSGD, HDAdam
from allmap.automl.reweight import example_hypergradient, example_weights
from allmap.automl.training import fit
from allmap.hypergrad import central_differences


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 5, generator=g, dtype=torch.float64)
    y = torch.randint(3, (20,), generator=g)
    torch.manual_seed(0)
    return nn.Linear(5, 3).double(), x, y


def _steps(opt_cls, n, **kw):
    model, x, y = _problem()
    opt = opt_cls(model.parameters(), **kw)
    for _ in range(n):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, x, y


@pytest.mark.parametrize(
    "hd, ref, kw",
    [(HDSGD, torch.optim.SGD, {"lr": 0.1}), (HDAdam, torch.optim.Adam, {"lr": 0.01})],
    ids=["sgd", "adam"],
)
def test_zero_hypergradient_rate_is_torchs_optimizer(hd, ref, kw):
    a, _, _, _ = _steps(hd, 5, hypergrad_lr=0.0, **kw)
    b, _, _, _ = _steps(ref, 5, **kw)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("hd, kw", [(HDSGD, {"lr": 0.1}), (HDAdam, {"lr": 0.01})], ids=["sgd", "adam"])
def test_hypergradient_is_minus_the_derivative_of_the_loss_after_the_step_wrt_its_rate(hd, kw):
    model, opt, x, y = _steps(hd, 3, hypergrad_lr=1e-3, **kw)
    direction = [opt.state[p]["direction"].clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    rate = torch.tensor(opt.param_groups[0]["lr"], dtype=torch.float64)

    def loss_after_step(r):  # the loss at theta_{t-1} = theta_{t-2} - alpha u_{t-2}, as a function of alpha
        back = [p + rate * u for p, u in zip(params, direction)]  # theta_{t-2}
        w, b = (q - r["alpha"] * u for q, u in zip(back, direction))
        return F.cross_entropy(x @ w.T + b, y)

    fd = central_differences(loss_after_step, {"alpha": rate}, 1e-6)[1]["alpha"]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.param_groups[0]["hypergradient"] == pytest.approx(-float(fd), rel=1e-6)


def test_hd_sgd_raises_a_too_small_rate_and_refuses_negative_rates():
    _, opt, _, _ = _steps(HDSGD, 30, lr=1e-3, hypergrad_lr=0.1)
    assert opt.param_groups[0]["lr"] > 1e-2
    with pytest.raises(ValueError, match="expected lr >= 0 and hypergrad_lr >= 0"):
        HDSGD(nn.Linear(1, 1).parameters(), lr=-1.0)


def test_example_hypergradient_matches_finite_differences_of_the_look_ahead_validation_loss():
    model, x, y = _problem()
    xv, yv = x[:7] + 0.1, y[:7]
    grad = example_hypergradient(model, x, y, xv, yv, lr=0.5)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def look_ahead(e):
        def weighted(p):
            return (e["eps"] * F.cross_entropy(torch.func.functional_call(model, p, (x,)), y, reduction="none")).sum()

        g = torch.func.grad(weighted)(params)
        moved = {k: params[k] - 0.5 * g[k] for k in params}
        return F.cross_entropy(torch.func.functional_call(model, moved, (xv,)), yv)

    fd = central_differences(look_ahead, {"eps": torch.zeros(20, dtype=torch.float64)}, 1e-6)[1]["eps"]
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-10)
    w = example_weights(model, x, y, xv, yv)
    assert float(w.sum()) == pytest.approx(1.0) and bool((w >= 0).all())
    assert torch.equal(w > 0, grad < 0)


def test_reweighting_gives_flipped_labels_less_weight():
    clean = digits(seed=0)
    noisy, flipped = flip_labels(clean, 0.4, seed=0)
    assert float(flipped.float().mean()) == pytest.approx(0.4, abs=0.01)
    assert bool((noisy.y_train[flipped] != clean.y_train[flipped]).all())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    fit(model, noisy, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 3, 100)  # a few epochs first
    w = example_weights(model, noisy.x_train, noisy.y_train, clean.x_val, clean.y_val)
    assert float(w[flipped].mean()) < 0.75 * float(w[~flipped].mean())
