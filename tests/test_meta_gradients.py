"""Every meta-gradient path, checked twice: float64 finite differences and an independent reference."""

from __future__ import annotations

import pytest
import torch
from _util import assert_vmap_equals_loop
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import allmap
from allmap.inner import adam, apply_updates, sgd
from allmap.nets import MLP
from allmap.tasks import LinearRegression, Logistic2D, Sinusoid

D = torch.float64


def _tasks(family, n=3, seed=0):
    return family.sample(n, torch.Generator().manual_seed(seed)).to(dtype=D)


def _call(learner, names, values, tasks):
    """meta_loss as a function of the meta-parameters (learner(tasks) is its meta_loss), for gradcheck."""
    return torch.func.functional_call(learner, dict(zip(names, values)), (tasks,))


def _small_mlp(sizes=(1, 6, 1)):
    torch.manual_seed(0)
    return MLP(list(sizes)).to(D)


LEARNERS = {
    "maml-2-steps": lambda: (allmap.MAML(_small_mlp(), inner_lr=0.1, inner_steps=2), Sinusoid(shots=4, queries=3)),
    "maml-adam-2-steps": lambda: (
        allmap.MAML(_small_mlp(), inner_lr=0.05, inner_steps=2, inner_optimizer="adam"),
        Sinusoid(shots=4, queries=3),
    ),
    "metasgd": lambda: (
        allmap.MetaSGD(_small_mlp((2, 2)), inner_lr=0.3, inner_steps=2, loss="cross_entropy"),
        Logistic2D(shots=5, queries=4),
    ),
    "anil": lambda: (allmap.ANIL(_small_mlp(), inner_lr=0.1, inner_steps=2), Sinusoid(shots=4, queries=3)),
    "hypernet": lambda: (
        allmap.HyperNetwork(_small_mlp((3, 1)), x_dim=3, y_dim=1, hidden=5, depth=1).to(D),
        LinearRegression(dim=3, shots=4, queries=3),
    ),
    "hypernet+step": lambda: (
        allmap.HyperNetwork(_small_mlp((3, 1)), x_dim=3, y_dim=1, hidden=5, depth=1, inner_steps=1, inner_lr=0.1).to(D),
        LinearRegression(dim=3, shots=4, queries=3),
    ),
}


def _perturb_heads(learner):
    # The hypernetwork's last layer starts at zero (training starts from theta); move it off zero so the
    # check covers the encoder's whole path.
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("name", LEARNERS)
def test_gradcheck_meta_loss(name):
    learner, family = LEARNERS[name]()
    learner = learner.to(D)
    _perturb_heads(learner)
    names = [n for n, _ in learner.named_parameters()]
    tasks = _tasks(family)
    values = tuple(p.detach().clone().requires_grad_(True) for p in learner.parameters())
    assert gradcheck(lambda *v: _call(learner, names, v, tasks), values, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["maml-2-steps", "metasgd", "anil"])
def test_gradgradcheck_meta_loss(name):
    learner, family = LEARNERS[name]()
    learner = learner.to(D)
    names = [n for n, _ in learner.named_parameters()]
    tasks = _tasks(family, n=2)
    values = tuple(p.detach().clone().requires_grad_(True) for p in learner.parameters())
    assert gradgradcheck(lambda *v: _call(learner, names, v, tasks), values, eps=1e-6, atol=1e-5, rtol=1e-4)


def _least_squares(n_support=6, n_query=5, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(n_support, dim, generator=g, dtype=D), torch.randn(n_query, dim, generator=g, dtype=D)
    w_true = torch.randn(dim, 1, generator=g, dtype=D)
    return xs, xs @ w_true, xq, xq @ w_true


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_least_squares_closed_form(steps):
    """f(x) = x w, L(w) = 1/n |X w - y|^2. One inner step is w' = M w + a b with M = I - a A, A = 2/n X^T X,
    b = 2/n X^T y; after k steps dw_k/dw = M^k, so the meta-gradient is M^k grad L_q(w_k)."""
    xs, ys, xq, yq = _least_squares()
    net = nn.Linear(3, 1, bias=False).to(D)
    lr = 0.1
    maml = allmap.MAML(net, inner_lr=lr, inner_steps=steps)
    maml.meta_loss(allmap.TaskBatch(xs[None], ys[None], xq[None], yq[None])).backward()

    w = net.weight.detach().T.clone()
    a_s, b_s = 2 / len(xs) * xs.T @ xs, 2 / len(xs) * xs.T @ ys
    m = torch.eye(3, dtype=D) - lr * a_s
    wk = w
    for _ in range(steps):
        wk = m @ wk + lr * b_s
    grad_q = 2 / len(xq) * xq.T @ (xq @ wk - yq)
    expected = torch.linalg.matrix_power(m, steps) @ grad_q
    torch.testing.assert_close(net.weight.grad.T, expected, rtol=1e-12, atol=1e-12)


def test_first_order_equals_detached_inner_gradients():
    """FOMAML's meta-gradient is the query gradient at the adapted weights, w' computed with plain autograd
    and detached inner gradients (an independent per-task loop)."""
    torch.manual_seed(0)
    net = _small_mlp((1, 8, 1))
    tasks = _tasks(Sinusoid(shots=5, queries=5), n=4)
    fo = allmap.MAML(net, inner_lr=0.05, inner_steps=3, first_order=True)
    fo.meta_loss(tasks).backward()
    got = [p.grad.clone() for p in net.parameters()]

    expected = [torch.zeros_like(p) for p in net.parameters()]
    for i in range(len(tasks)):
        params = [p for p in net.parameters()]
        for _ in range(3):
            out = torch.func.functional_call(
                net, dict(zip([n for n, _ in net.named_parameters()], params)), (tasks.support_x[i],)
            )
            grads = torch.autograd.grad(nn.functional.mse_loss(out, tasks.support_y[i]), params)
            params = [p - 0.05 * g.detach() for p, g in zip(params, grads)]
        out = torch.func.functional_call(
            net, dict(zip([n for n, _ in net.named_parameters()], params)), (tasks.query_x[i],)
        )
        for e, g in zip(expected, torch.autograd.grad(nn.functional.mse_loss(out, tasks.query_y[i]), params)):
            e += g / len(tasks)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_second_order_matches_plain_autograd_loop():
    """Second-order MAML against a per-task loop written with torch.autograd.grad(create_graph=True)."""
    torch.manual_seed(0)
    net = _small_mlp((1, 8, 1))
    names = [n for n, _ in net.named_parameters()]
    tasks = _tasks(Sinusoid(shots=5, queries=5), n=4)
    allmap.MAML(net, inner_lr=0.05, inner_steps=2).meta_loss(tasks).backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    total = 0
    for i in range(len(tasks)):
        params = list(net.parameters())
        for _ in range(2):
            out = torch.func.functional_call(net, dict(zip(names, params)), (tasks.support_x[i],))
            grads = torch.autograd.grad(nn.functional.mse_loss(out, tasks.support_y[i]), params, create_graph=True)
            params = [p - 0.05 * g for p, g in zip(params, grads)]
        out = torch.func.functional_call(net, dict(zip(names, params)), (tasks.query_x[i],))
        total = total + nn.functional.mse_loss(out, tasks.query_y[i]) / len(tasks)
    expected = torch.autograd.grad(total, list(net.parameters()))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_metasgd_rate_gradient_closed_form():
    """d L_q(w - alpha * g_s) / d alpha = -g_s * grad L_q(w') on least squares (one step)."""
    xs, ys, xq, yq = _least_squares()
    net = nn.Linear(3, 1, bias=False).to(D)
    learner = allmap.MetaSGD(net, inner_lr=0.1)
    learner.meta_loss(allmap.TaskBatch(xs[None], ys[None], xq[None], yq[None])).backward()
    w = net.weight.detach().T
    g_s = 2 / len(xs) * xs.T @ (xs @ w - ys)
    w1 = w - 0.1 * g_s
    g_q = 2 / len(xq) * xq.T @ (xq @ w1 - yq)
    torch.testing.assert_close(learner.inner_lrs["weight"].grad.T, -g_s * g_q, rtol=1e-12, atol=1e-12)


def test_batchnorm_uses_batch_statistics_and_correct_second_order():
    from allmap.nets import BatchStatNorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1)).to(D)
    weight = net[1].weight
    learner = allmap.MAML(net, inner_lr=0.05, inner_steps=2)
    # swapped for the exact mean/var form, keeping the same parameter objects and names
    assert isinstance(net[1], BatchStatNorm) and net[1].weight is weight
    assert [n for n, _ in net.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    assert learner.vmap_meta_loss()  # automatic: vectorised, since the second derivative is now exact under vmap
    tasks = _tasks(Sinusoid(shots=6, queries=6), n=3)
    # batch statistics: a task's predictions depend on the other query examples in its batch
    model = learner.adapt(tasks.support_x[0], tasks.support_y[0])
    assert not torch.allclose(model(tasks.query_x[0])[:2], model(tasks.query_x[0][:2]))
    # second order: vmap equals the per-task loop, and both pass a float64 gradcheck
    assert_vmap_equals_loop(learner, tasks)
    names = [n for n, _ in learner.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_(True) for p in learner.parameters())
    assert gradcheck(lambda *v: _call(learner, names, v, tasks[:2]), values, eps=1e-6, atol=1e-6, rtol=1e-5)
    learner.vectorize = True
    assert gradcheck(lambda *v: _call(learner, names, v, tasks[:2]), values, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_torch_batchnorm_left_in_place_runs_per_task_and_refuses_vmap():
    # a BatchNorm without affine parameters is kept (running statistics off): torch's batch_norm, whose
    # second derivative under vmap is wrong in torch 2.13, so second order runs per task and vmap is refused
    net = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8, affine=False), nn.ReLU(), nn.Linear(8, 1)).to(D)
    learner = allmap.MAML(net, inner_lr=0.05, inner_steps=2)
    assert isinstance(net[1], nn.BatchNorm1d) and net[1].running_mean is None and not net[1].track_running_stats
    assert not learner.vmap_meta_loss()
    learner.vectorize = True
    with pytest.raises(ValueError, match="BatchNorm layers would give a wrong meta-gradient"):
        learner.meta_loss(_tasks(Sinusoid(shots=6, queries=6), n=3))
    # first order needs no double backward: vmap is allowed and equals the loop
    fo = allmap.MAML(net, inner_lr=0.05, inner_steps=2, first_order=True)
    assert_vmap_equals_loop(fo, _tasks(Sinusoid(shots=6, queries=6), n=3))


def test_inner_adam_matches_torch_adam_and_is_pure():
    torch.manual_seed(0)
    params = {"w": torch.randn(5, dtype=D)}
    ref = params["w"].clone().requires_grad_(True)
    torch_opt = torch.optim.Adam([ref], lr=0.1, eps=1e-8)
    opt = adam(0.1, eps_root=1e-30)
    state = opt.init(params)
    for t in range(5):
        g = {"w": torch.sin(params["w"] * (t + 1))}
        before = params["w"].clone()
        updates, state = opt.update(g, state, params)
        assert torch.equal(params["w"], before)
        params = apply_updates(params, updates)
        ref.grad = torch.sin(ref.detach() * (t + 1))
        torch_opt.step()
        torch.testing.assert_close(params["w"], ref.detach(), rtol=1e-10, atol=1e-12)


def test_inner_adam_meta_gradient_is_finite_at_zero_second_moment():
    w = torch.zeros(3, dtype=D, requires_grad=True)
    opt = adam(0.1)

    def run(w0):
        params = {"w": w0}
        state = opt.init(params)
        g = {"w": w0 * torch.tensor([0.0, 1.0, 2.0], dtype=D)}  # first coordinate has zero gradient
        updates, state = opt.update(g, state, params)
        return apply_updates(params, updates)["w"].sum()

    (grad,) = torch.autograd.grad(run(w), w)
    assert torch.isfinite(grad).all()
    with pytest.raises(ValueError, match="eps_root > 0"):
        adam(0.1, eps_root=0.0)


def test_sgd_learned_rate_mapping_and_missing_rate():
    p = {"a": torch.ones(2), "b": torch.ones(1)}
    upd, _ = sgd({"a": torch.tensor(0.5), "b": 2.0}).update({"a": torch.ones(2), "b": torch.ones(1)}, (), p)
    assert torch.equal(apply_updates(p, upd)["a"], torch.full((2,), 0.5))
    assert torch.equal(apply_updates(p, upd)["b"], torch.full((1,), -1.0))
    with pytest.raises(KeyError, match="no learning rate for parameter 'b'"):
        sgd({"a": 1.0}).update({"b": torch.ones(1)}, (), {"b": torch.ones(1)})


def test_batch_stat_norm_equals_batchnorm_and_is_exact_under_vmap():
    from allmap.nets import BatchStatNorm

    torch.manual_seed(0)
    x = torch.randn(7, 5, dtype=D)
    ours, ref = BatchStatNorm(5).to(D), nn.BatchNorm1d(5, track_running_stats=False).to(D)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.normal_()
        ref.weight.copy_(ours.weight), ref.bias.copy_(ours.bias)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    x4 = torch.randn(3, 4, 5, 5, dtype=D)
    ref2 = nn.BatchNorm2d(4, track_running_stats=False).to(D)
    torch.testing.assert_close(BatchStatNorm(4, dim=1).to(D)(x4), ref2(x4), rtol=1e-12, atol=1e-12)

    net = MLP([1, 6, 6, 1], norm="batch").to(D)
    learner = allmap.MAML(net, inner_lr=0.1, inner_steps=2)
    assert learner.vmap_meta_loss()  # no torch BatchNorm inside: runs vectorised
    tasks = _tasks(Sinusoid(shots=5, queries=4), n=3)
    assert_vmap_equals_loop(learner, tasks)
    learner.vectorize = True
    names = [n for n, _ in learner.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_(True) for p in learner.parameters())
    assert gradcheck(lambda *v: _call(learner, names, v, tasks), values, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_first_order_only_uses_fused_batch_norm_with_the_same_values_and_gradients():
    from allmap.nets import BatchStatNorm
    from allmap.nets import norm as norm_module
    from allmap.nets.norm import first_order_only

    torch.manual_seed(0)
    layer = BatchStatNorm(4, dim=1).to(D)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.normal_()
    x = torch.randn(3, 4, 5, 5, dtype=D)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p):
        return (torch.func.functional_call(layer, p, (x,)) ** 3).sum()

    states = []
    fused = norm_module._fused

    def spy() -> bool:
        states.append(fused())
        return states[-1]

    norm_module._fused = spy
    try:
        plain = torch.func.grad(loss)(params)
        with first_order_only():
            quick = torch.func.grad(loss)(params)
            batched = torch.func.vmap(torch.func.grad(loss), in_dims=({"weight": 0, "bias": 0},))(
                {k: torch.stack([v, v]) for k, v in params.items()}
            )
    finally:
        norm_module._fused = fused
    assert states == [False, True, False]  # grad: formula; first_order_only: fused; under vmap: formula
    for k in params:
        torch.testing.assert_close(quick[k], plain[k], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(batched[k][1], plain[k], rtol=1e-10, atol=1e-12)
