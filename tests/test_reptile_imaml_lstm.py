"""Reptile, iMAML and the LSTM meta-learner: update rules against hand-written references, gradcheck."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import allmap
from allmap.engine.evaluate import evaluate, evaluate_per_task
from allmap.hypergrad import resolve
from allmap.learners.lstm import preprocess
from allmap.nets import MLP

D = torch.float64


@pytest.fixture(scope="module")
def tasks():
    return allmap.tasks.Sinusoid(shots=6, queries=5).sample(3, torch.Generator().manual_seed(0)).to(dtype=D)


class _MetaLoss(nn.Module):
    """Evaluate ``learner.meta_loss(tasks)`` at given parameter values (for gradcheck)."""

    def __init__(self, learner: nn.Module) -> None:
        super().__init__()
        self.learner = learner

    def forward(self, tasks):
        return self.learner.meta_loss(tasks)


def as_function(learner, tasks):
    names = [n for n, _ in learner.named_parameters()]
    wrapper = _MetaLoss(learner)

    def f(*values):
        return torch.func.functional_call(wrapper, {f"learner.{n}": v for n, v in zip(names, values)}, (tasks,))

    return f, tuple(p.detach().clone().requires_grad_(True) for p in learner.parameters())


# -- Reptile ----------------------------------------------------------------------------------------------
def reptile_reference(net, tasks, lr, steps):
    """theta - mean_i theta'_i with theta'_i from plain SGD written with torch.autograd.grad."""
    theta = [p.detach() for p in net.parameters()]
    names = [n for n, _ in net.named_parameters()]
    adapted = []
    for i in range(len(tasks)):
        w = [t.clone().requires_grad_(True) for t in theta]
        for _ in range(steps):
            pred = torch.func.functional_call(net, dict(zip(names, w)), (tasks.support_x[i],))
            grads = torch.autograd.grad(((pred - tasks.support_y[i]) ** 2).mean(), w)
            w = [(wi - lr * gi).detach().requires_grad_(True) for wi, gi in zip(w, grads)]
        adapted.append([wi.detach() for wi in w])
    return [t - torch.stack([a[j] for a in adapted]).mean(0) for j, t in enumerate(theta)]


@pytest.mark.parametrize("vectorize", [True, False])
def test_reptile_gradient_is_theta_minus_adapted(tasks, vectorize):
    torch.manual_seed(0)
    net = MLP([1, 8, 8, 1]).double()
    learner = allmap.Reptile(net, inner_lr=0.05, inner_steps=4, vectorize=vectorize)
    loss = learner.meta_loss(tasks)
    loss.backward()
    want = reptile_reference(net, tasks, 0.05, 4)
    for p, w in zip(learner.parameters(), want):
        assert torch.allclose(p.grad, w, atol=1e-13)
    # the value is the query loss after adaptation
    with torch.no_grad():
        ref = torch.stack(
            [
                nn.functional.mse_loss(
                    learner.adapt(tasks.support_x[i], tasks.support_y[i])(tasks.query_x[i]), tasks.query_y[i]
                )
                for i in range(len(tasks))
            ]
        ).mean()
    assert torch.allclose(loss.detach(), ref, atol=1e-13)


def test_reptile_sgd_step_is_the_batched_reptile_update(tasks):
    torch.manual_seed(0)
    net = MLP([1, 8, 1]).double()
    learner = allmap.Reptile(net, inner_lr=0.05, inner_steps=3)
    before = [p.detach().clone() for p in net.parameters()]
    adapted_mean = [b - g for b, g in zip(before, reptile_reference(net, tasks, 0.05, 3))]
    eps = 0.25
    opt = torch.optim.SGD(learner.parameters(), lr=eps)
    learner.meta_loss(tasks).backward()
    opt.step()
    for p, b, a in zip(net.parameters(), before, adapted_mean):
        assert torch.allclose(p.detach(), b + eps * (a - b), atol=1e-13)  # theta + eps (mean theta' - theta)


@pytest.mark.parametrize("vectorize", [True, False])
def test_reptile_inner_batches_walk_the_support_set_like_torch_adam(tasks, vectorize):
    """inner_batch 4 of 6 support points, 3 steps: rows 0-3, then 4, 5, 0, 1, then 2-5, each step one
    ``torch.optim.Adam(betas=(0, 0.999))`` step (the paper's inner optimizer), from theta for every task."""
    torch.manual_seed(0)
    net = MLP([1, 8, 1]).double()
    learner = allmap.Reptile(
        net, inner_lr=0.01, inner_steps=3, inner_optimizer="adam", inner_batch=4, vectorize=vectorize
    )
    learner.meta_loss(tasks).backward()
    rows = [[0, 1, 2, 3], [4, 5, 0, 1], [2, 3, 4, 5]]
    adapted = []
    for i in range(len(tasks)):
        copy = MLP([1, 8, 1]).double()
        copy.load_state_dict(net.state_dict())
        opt = torch.optim.Adam(copy.parameters(), lr=0.01, betas=(0.0, 0.999))  # eps 1e-8, as allmap.inner.adam
        for r in rows:
            opt.zero_grad()
            nn.functional.mse_loss(copy(tasks.support_x[i][r]), tasks.support_y[i][r]).backward()
            opt.step()
        adapted.append([p.detach() for p in copy.parameters()])
    for j, p in enumerate(net.parameters()):
        assert torch.allclose(p.grad, p.detach() - torch.stack([a[j] for a in adapted]).mean(0), atol=1e-12)
    with pytest.raises(ValueError, match="inner_batch = 7 is larger than the support set"):
        allmap.Reptile(MLP([1, 8, 1]).double(), inner_batch=7).meta_loss(tasks)
    with pytest.raises(ValueError, match="inner_batch"):
        allmap.Reptile(MLP([1, 8, 1]), inner_batch=0)


def _reptile_with_one_torch_adam(net: nn.Module, batches: list, steps: int, eps: float) -> list[list[torch.Tensor]]:
    """The paper code's procedure as a plain loop: one torch.optim.Adam for every inner loop, the weights set
    back to theta before each task, the outer step theta + eps (mean adapted - theta); theta after each batch."""
    opt = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.0, 0.999), eps=1e-8)
    path = []
    for batch in batches:
        theta = [p.detach().clone() for p in net.parameters()]
        ends = []
        for i in range(len(batch)):
            with torch.no_grad():
                for p, t in zip(net.parameters(), theta):
                    p.copy_(t)
            for _ in range(steps):
                opt.zero_grad()
                nn.functional.mse_loss(net(batch.support_x[i]), batch.support_y[i]).backward()
                opt.step()
            ends.append([p.detach().clone() for p in net.parameters()])
        with torch.no_grad():
            for j, (p, t) in enumerate(zip(net.parameters(), theta)):
                p.copy_(t + eps * (sum(e[j] for e in ends) / len(ends) - t))
        path.append([p.detach().clone() for p in net.parameters()])
    return path


def test_reptile_carried_adam_is_one_torch_adam_across_tasks_and_resumes():
    """inner_state='carried': three meta-batches of 3 tasks equal one torch.optim.Adam carried through every
    inner loop (to float64 rounding); the moments are in the state_dict, so a learner rebuilt from it after
    the second batch ends the third where the uninterrupted one does; evaluation leaves them unchanged."""
    batches = [allmap.tasks.Sinusoid(shots=6).sample(3, torch.Generator().manual_seed(s)).to(dtype=D) for s in range(3)]
    net = MLP([1, 8, 1]).double()
    reference = _reptile_with_one_torch_adam(copy.deepcopy(net), batches, steps=3, eps=0.5)

    def build(model: nn.Module) -> tuple[allmap.Reptile, torch.optim.Optimizer]:
        learner = allmap.Reptile(model, inner_lr=0.01, inner_steps=3, inner_optimizer="adam", inner_state="carried")
        return learner, torch.optim.SGD(learner.parameters(), lr=0.5)

    learner, opt = build(copy.deepcopy(net))
    assert learner.spec.sequential and not learner.execution_plan(3).vmap
    saved = None
    for k, batch in enumerate(batches):
        if k == 2:  # rebuild from the state after two batches: the resumed learner must continue exactly
            learner, opt = build(copy.deepcopy(net))
            learner.load_state_dict(saved)
        opt.zero_grad()
        learner.meta_backward(batch)
        opt.step()
        if k == 1:
            saved = copy.deepcopy(learner.state_dict())
        for p, q in zip(learner.model.parameters(), reference[k]):
            torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-12)
    assert int(learner.moments.count) == 3 * 3 * 3
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    evaluate(learner, batches[0], steps=[0, 5])
    assert all(torch.equal(before[k], v) for k, v in learner.state_dict().items())
    with pytest.raises(ValueError, match="inner_optimizer='sgd' has none"):
        allmap.Reptile(MLP([1, 8, 1]), inner_state="carried")
    with pytest.raises(ValueError, match="expected fresh or carried"):
        allmap.Reptile(MLP([1, 8, 1]), inner_optimizer="adam", inner_state="kept")
    learner.execution = {"mode": "loop", "workers": 2}
    with pytest.raises(ValueError, match="carries state from one task to the next"):
        learner.meta_backward(batches[0])


def test_reptile_carried_moments_start_every_test_task():
    """Evaluation adapts each test task with a torch.optim.Adam loaded with the carried moments and step
    count (as the paper's code restores its optimizer state before each test task), not from zeros."""
    batches = [allmap.tasks.Sinusoid(shots=6).sample(3, torch.Generator().manual_seed(s)).to(dtype=D) for s in range(2)]
    learner = allmap.Reptile(
        MLP([1, 8, 1]).double(), inner_lr=0.01, inner_steps=3, inner_optimizer="adam", inner_state="carried"
    )
    learner.meta_backward(batches[0])  # 3 tasks x 3 steps: count 9, nonzero moments
    test = batches[1]
    losses = []
    for i in range(len(test)):
        net = copy.deepcopy(learner.model)
        opt = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.0, 0.999), eps=1e-8)
        for name, p in net.named_parameters():
            m, v = learner.moments.state()["m"][name], learner.moments.state()["v"][name]
            opt.state[p] = {"step": torch.tensor(9.0, dtype=D), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
        for _ in range(4):
            opt.zero_grad()
            nn.functional.mse_loss(net(test.support_x[i]), test.support_y[i]).backward()
            opt.step()
        losses.append(nn.functional.mse_loss(net(test.query_x[i]), test.query_y[i]).item())
    scores = evaluate_per_task(learner, test, steps=[4], workers=0)["loss@4"]
    torch.testing.assert_close(scores, torch.tensor(losses, dtype=scores.dtype), rtol=1e-10, atol=1e-12)
    assert int(learner.moments.count) == 9


def test_reptile_takes_no_strategy_and_uses_adam_beta1_zero():
    with pytest.raises(TypeError, match="hypergrad"):  # its meta-gradient is its own: no such argument
        allmap.Reptile(MLP([1, 2, 1]), hypergrad="unrolled")
    reptile = allmap.Reptile(MLP([1, 2, 1]))
    assert reptile.first_order and reptile.spec.strategies == ("first_order",)
    with pytest.raises(ValueError, match="Reptile: the 'unrolled' meta-gradient strategy does not apply"):
        resolve("unrolled").check(reptile)
    learner = allmap.Reptile(MLP([1, 2, 1]), inner_optimizer="adam")
    p = {"w": torch.zeros(1)}
    opt = learner.optimizer()
    state = opt.init(p)
    _, state = opt.update({"w": torch.ones(1)}, state, p)
    assert torch.equal(state["m"]["w"], torch.ones(1))  # beta1 = 0: the first moment is the last gradient


# -- iMAML ------------------------------------------------------------------------------------------------
def test_imaml_gradcheck():
    fam = allmap.tasks.LinearRegression(dim=2, shots=6, queries=4)
    tasks = fam.sample(2, torch.Generator().manual_seed(5)).to(dtype=D)
    torch.manual_seed(0)
    learner = allmap.IMAML(
        nn.Linear(2, 1).double(), lam=1.5, inner_lr=0.1, inner_steps=200, cg_iterations=4, tol=1e-10, on_fail="raise"
    )
    f, args = as_function(learner, tasks)
    assert torch.autograd.gradcheck(f, args)


def test_imaml_forward_is_the_proximal_solution():
    # after enough steps the adapted parameters solve grad L(phi) + lam (phi - theta) = 0
    fam = allmap.tasks.Sinusoid(shots=8)
    tasks = fam.sample(1, torch.Generator().manual_seed(0)).to(dtype=D)
    torch.manual_seed(0)
    learner = allmap.IMAML(MLP([1, 8, 1]).double(), lam=4.0, inner_lr=0.05, inner_steps=1000)
    phi = learner.adapt(tasks.support_x[0], tasks.support_y[0]).params
    theta = dict(learner.model.named_parameters())

    def support(p):
        return nn.functional.mse_loss(
            torch.func.functional_call(learner.model, p, (tasks.support_x[0],)), tasks.support_y[0]
        )

    grads = torch.func.grad(support)({k: v.detach() for k, v in phi.items()})
    for k in phi:
        assert (grads[k] + 4.0 * (phi[k] - theta[k]).detach()).abs().max() < 1e-8


def imaml_code_reference(net, task, inner_lr, steps, lam, cg_steps, cg_damping, lam_damping=10.0):
    """The meta-gradient of iMAML's released Omniglot script (omniglot_implicit_maml.py), on flat vectors:
    ``steps`` plain SGD steps on the support loss, one SGD step on lam/2 ||w - w_k||^2 ("pull back"), then
    ``cg_steps`` CG iterations on ``(1 + cg_damping) v + H v / (lam + lam_damping) = grad L_query``."""
    names = [n for n, _ in net.named_parameters()]
    w_k = torch.cat([p.detach().flatten() for p in net.parameters()])
    shapes = [p.shape for p in net.parameters()]

    def unflat(w):
        return dict(zip(names, torch.split(w, [math.prod(s) for s in shapes])))

    def loss(w, x, y):
        out = torch.func.functional_call(net, {n: t.view(s) for (n, t), s in zip(unflat(w).items(), shapes)}, (x,))
        return nn.functional.mse_loss(out, y)

    sx, sy, qx, qy = task
    w = w_k.clone()
    for _ in range(steps):
        w = w - inner_lr * torch.autograd.functional.jacobian(lambda v: loss(v, sx, sy), w)
    w = w - inner_lr * lam * (w - w_k)  # the pull-back step
    b = torch.autograd.functional.jacobian(lambda v: loss(v, qx, qy), w)
    hessian = torch.autograd.functional.hessian(lambda v: loss(v, sx, sy), w)

    def f_ax(v):
        return (1.0 + cg_damping) * v + hessian @ v / (lam + lam_damping)

    x = torch.zeros_like(b)
    r = b - f_ax(x)
    p = r.clone()
    rdotr = r @ r
    for _ in range(cg_steps):  # utils.cg_solve
        z = f_ax(p)
        v = rdotr / (p @ z)
        x = x + v * p
        r = r - v * z
        newrdotr = r @ r
        p = r + (newrdotr / rdotr) * p
        rdotr = newrdotr
    return [t.view(s) for t, s in zip(torch.split(x, [math.prod(s) for s in shapes]), shapes)]


@pytest.mark.parametrize("vectorize", [True, False])
def test_imaml_released_code_procedure_matches_its_script(tasks, vectorize):
    """inner_lam 0 + pull_back lam + the code's system (lam + 10, damping) = the script's meta-gradient."""
    torch.manual_seed(0)
    net = MLP([1, 6, 1]).double()
    lam, steps, lr = 2.0, 4, 0.05
    learner = allmap.IMAML(
        net, inner_lr=lr, inner_steps=steps, lam=lam + 10.0, damping=1.0, cg_iterations=3, inner_lam=0.0,
        pull_back=lam, safeguard=False, on_fail="ignore", vectorize=vectorize,
    )  # fmt: skip
    learner.meta_loss(tasks).backward()
    per_task = [
        imaml_code_reference(
            net,
            [a[i] for a in (tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)],
            lr,
            steps,
            lam,
            3,
            1.0,
        )
        for i in range(len(tasks))
    ]
    for j, p in enumerate(net.parameters()):
        assert torch.allclose(p.grad, torch.stack([g[j] for g in per_task]).mean(0), atol=1e-10)
    # evaluation adapts by the plain steps alone (the script tests with lam 0: no proximal term, no pull-back)
    plain = allmap.MAML(net, inner_lr=lr, inner_steps=steps)
    with torch.no_grad():
        got = learner.adapt(tasks.support_x[0], tasks.support_y[0]).params
        want = plain.adapt(tasks.support_x[0], tasks.support_y[0]).params
    assert all(torch.allclose(got[k], want[k], atol=1e-12) for k in want)
    with pytest.raises(ValueError, match="pull_back >= 0"):
        allmap.IMAML(MLP([1, 2, 1]), pull_back=-1.0)


def test_imaml_rejects_other_strategies():
    with pytest.raises(TypeError, match="hypergrad"):  # the implicit gradient is what IMAML is
        allmap.IMAML(MLP([1, 2, 1]), hypergrad="unrolled")
    assert allmap.IMAML(MLP([1, 2, 1])).spec.strategies == ("implicit",)
    with pytest.raises(ValueError, match="lam > 0"):
        allmap.IMAML(MLP([1, 2, 1]), lam=0.0)


# -- the LSTM meta-learner --------------------------------------------------------------------------------
def test_preprocess():
    x = torch.tensor([2.0, -1e-3, 0.0, -3.0], dtype=D)
    out = preprocess(x, p=10.0)
    assert torch.allclose(out[0], torch.tensor([math.log(2.0) / 10, 1.0], dtype=D))
    assert torch.allclose(out[1], torch.tensor([math.log(1e-3) / 10, -1.0], dtype=D))  # 1e-3 > e^-10
    assert torch.allclose(out[2], torch.tensor([-1.0, 0.0], dtype=D))
    small = preprocess(torch.tensor([1e-10], dtype=D), p=20.0)[0]  # 1e-10 < e^-20
    assert torch.allclose(small, torch.tensor([-1.0, math.exp(20) * 1e-10], dtype=D))
    assert torch.autograd.gradcheck(preprocess, (torch.tensor([0.5, -2.0, 1e-7], dtype=D, requires_grad=True),))


@pytest.mark.parametrize("first_order", [False, True])
def test_lstm_first_step_is_the_gated_update(tasks, first_order):
    # with zero gate weights, theta_1 = sigmoid(b_F) theta_0 - sigmoid(b_I) grad L(theta_0)
    torch.manual_seed(0)
    learner = allmap.LSTMMetaLearner(
        MLP([1, 4, 1]).double(), inner_steps=1, hidden=3, inner_lr=0.1, forget_bias=3.0, first_order=first_order
    )
    with torch.no_grad():
        learner.update.input_gate.weight.zero_()
        learner.update.forget_gate.weight.zero_()
    sx, sy = tasks.support_x[0], tasks.support_y[0]
    theta = dict(learner.model.named_parameters())
    grads = torch.func.grad(lambda p: nn.functional.mse_loss(torch.func.functional_call(learner.model, p, (sx,)), sy))(
        {k: v.detach() for k, v in theta.items()}
    )
    phi = learner.adapt(sx, sy).params
    f, i = torch.sigmoid(torch.tensor(3.0, dtype=D)), torch.tensor(0.1, dtype=D)
    for k in theta:
        assert torch.allclose(phi[k], f * theta[k] - i * grads[k], atol=1e-14)


def test_lstm_gradcheck(tasks):
    torch.manual_seed(0)
    learner = allmap.LSTMMetaLearner(MLP([1, 3, 1]).double(), inner_steps=2, hidden=2, inner_lr=0.1)
    small = allmap.TaskBatch(
        tasks.support_x[:2, :4], tasks.support_y[:2, :4], tasks.query_x[:2, :3], tasks.query_y[:2, :3]
    )
    f, args = as_function(learner, small)
    assert torch.autograd.gradcheck(f, args)


def test_lstm_meta_gradient_reaches_every_part(tasks):
    torch.manual_seed(0)
    learner = allmap.LSTMMetaLearner(MLP([1, 4, 1]).double(), inner_steps=3, hidden=3)
    learner.meta_loss(tasks).backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    names = {n for n, _ in learner.named_parameters()}
    assert {"update.lstm.weight", "update.input_gate.bias", "update.forget_gate.bias", "model.head.weight"} <= names


def test_lstm_rejects_loop_strategies():
    with pytest.raises(
        ValueError,
        match="LSTMMetaLearner: the 'checkpointed' meta-gradient strategy does not apply "
        "to the LSTMUpdate inner update",
    ):
        allmap.LSTMMetaLearner(MLP([1, 2, 1]), hypergrad="checkpointed")
    with pytest.raises(ValueError, match="0 < inner_lr < 1"):
        allmap.LSTMMetaLearner(MLP([1, 2, 1]), inner_lr=2.0)


def test_lstm_forward_mode_equals_reverse(tasks):
    tasks = allmap.TaskBatch(tasks.support_x[:2], tasks.support_y[:2], tasks.query_x[:2], tasks.query_y[:2])
    grads = []
    for spec in ("unrolled", "forward"):
        torch.manual_seed(0)
        learner = allmap.LSTMMetaLearner(MLP([1, 2, 1]).double(), inner_steps=2, hidden=2, hypergrad=spec)
        learner.meta_loss(tasks).backward()
        grads.append(torch.cat([p.grad.flatten() for p in learner.parameters()]))
    assert (grads[0] - grads[1]).abs().max() < 1e-12


@pytest.mark.parametrize("adapt_only", [None, "head"])
def test_imaml_vmapped_surrogate_equals_custom_backward(tasks, adapt_only):
    # two implementations of the implicit meta-gradient: IMAML's vmappable surrogate (task_loss) and the
    # custom-backward strategy MAML(hypergrad=Implicit(...)) (adapt); with the same CG iterations they agree
    results = []
    for make in (
        lambda net: allmap.IMAML(
            net, lam=2.0, inner_lr=0.05, inner_steps=20, cg_iterations=6, tol=0.0, adapt_only=adapt_only, vectorize=True
        ),
        lambda net: allmap.IMAML(
            net,
            lam=2.0,
            inner_lr=0.05,
            inner_steps=20,
            cg_iterations=6,
            tol=0.0,
            adapt_only=adapt_only,
            vectorize=False,
        ),
        lambda net: allmap.MAML(
            net,
            inner_lr=0.05,
            inner_steps=20,
            adapt_only=adapt_only,
            hypergrad=allmap.hypergrad.Implicit(lam=2.0, iterations=6, tol=0.0),
        ),
    ):
        torch.manual_seed(0)
        learner = make(MLP([1, 8, 8, 1]).double())
        loss = learner.meta_loss(tasks)
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in learner.parameters()])))
    for value, grad in results[1:]:
        assert torch.allclose(value, results[0][0], atol=1e-12)
        assert (grad - results[0][1]).abs().max() < 1e-10
