"""Meta-gradient strategies: exactness against unrolled reverse mode and closed forms, in float64."""

from __future__ import annotations

import pytest
import torch

import allmap
from allmap.hypergrad import (
    STRATEGIES,
    Checkpointed,
    FirstOrder,
    Implicit,
    ImplicitSolveError,
    ImplicitSolveWarning,
    Truncated,
    Unrolled,
    hypergradient,
    resolve,
)
from allmap.inner import gradient_descent, sgd
from allmap.inner.loop import monotone_descent
from allmap.nets import MLP

D = torch.float64


@pytest.fixture(scope="module")
def tasks():
    return allmap.tasks.Sinusoid(shots=6, queries=5).sample(3, torch.Generator().manual_seed(0)).to(dtype=D)


def with_strategy(learner, spec):
    """Set the strategy of a learner whose constructor does not take ``hypergrad`` (Meta-SGD)."""
    learner.hypergrad = resolve(spec)  # first_order and the rest of learner.spec follow from it
    learner.hypergrad.check(learner)
    return learner


def meta_grad(tasks, hypergrad=None, steps=3, opt="sgd", vectorize=False, cls=allmap.MAML, sizes=(1, 8, 8, 1), **kw):
    torch.manual_seed(0)
    if cls is allmap.MetaSGD:
        learner = with_strategy(
            cls(MLP(list(sizes)).double(), inner_lr=0.05, inner_steps=steps, vectorize=vectorize, **kw), hypergrad
        )
    else:
        learner = cls(
            MLP(list(sizes)).double(),
            inner_lr=0.05,
            inner_steps=steps,
            hypergrad=hypergrad,
            inner_optimizer=opt,
            vectorize=vectorize,
            **kw,
        )
    loss = learner.meta_loss(tasks)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in learner.parameters()])


# -- a quadratic inner problem with closed forms -----------------------------------------------------------
def quadratic(dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=g, dtype=D)
    a_mat = m @ m.T / dim + 0.5 * torch.eye(dim, dtype=D)  # SPD support Hessian
    a = torch.randn(dim, generator=g, dtype=D)
    b = torch.randn(dim, generator=g, dtype=D)
    theta = torch.randn(dim, generator=g, dtype=D, requires_grad=True)
    return a_mat, a, b, theta


def support_loss_of(a_mat, a):
    return lambda p: 0.5 * (p["w"] - a) @ a_mat @ (p["w"] - a)


def query_loss(p, b):
    return 0.5 * ((p["w"] - b) ** 2).sum()


# -- names, parsing, errors -------------------------------------------------------------------------------
def test_registry_and_parsing():
    assert set(STRATEGIES) == {
        "unrolled",
        "first_order",
        "truncated",
        "checkpointed",
        "implicit",
        "forward",
        "finite_difference",
    }
    assert (
        resolve("truncated(3)") == Truncated(3) == resolve("truncated(k=3)") == resolve({"name": "truncated", "k": 3})
    )
    assert resolve(None) == Unrolled() and resolve(None, default="first_order") == FirstOrder()
    s = Implicit(lam=2.0)
    assert resolve(s) is s
    assert resolve("implicit(lam=0.5, iterations=10, solver='neumann')").solver == "neumann"


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("nope", ValueError, "unknown meta-gradient strategy 'nope'; expected one of unrolled"),
        ("truncated(-1)", ValueError, "expected k .* >= 0, got -1"),
        ("truncated(k=", ValueError, "cannot parse"),
        ("truncated(k=x)", ValueError, "Python literals"),
        ("truncated(q=1)", ValueError, "bad arguments for meta-gradient strategy 'truncated'"),
        ("implicit(lam=0)", ValueError, "lam > 0"),
        ("implicit(solver='lu')", ValueError, "unknown solver 'lu'"),
        ("implicit(on_fail='cry')", ValueError, "unknown on_fail"),
        ("checkpointed(every=0)", ValueError, "every"),
        ("finite_difference(directions=1)", ValueError, "variance needs two"),
        ({"k": 1}, ValueError, "needs a 'name' key"),
        (3, TypeError, "got int"),
    ],
)
def test_bad_specs(spec, error, match):
    with pytest.raises(error, match=match):
        resolve(spec)


def test_strategies_that_cannot_apply():
    net = MLP([1, 4, 1])
    with pytest.raises(ValueError, match="learned inner rates"):
        with_strategy(allmap.MetaSGD(net), "implicit")
    with pytest.raises(ValueError, match="first_order=True contradicts"):
        allmap.MAML(net, first_order=True, hypergrad="unrolled")
    with pytest.raises(ValueError, match="this learner has 1761 > max_entries=100"):
        allmap.MAML(MLP([1, 40, 40, 1]), hypergrad="forward(max_entries=100)")
    with pytest.raises(ValueError, match="cannot run inside torch.func transforms"):
        torch.func.vmap(lambda w: Checkpointed().run(lambda p: (p["w"] ** 2).sum(), {"w": w}, sgd(0.1), 1)[0]["w"])(
            torch.ones(2, 1)
        )


def test_first_order_argument_still_works(tasks):
    assert torch.equal(meta_grad(tasks, first_order=True)[1], meta_grad(tasks, "first_order")[1])
    assert allmap.MAML(MLP([1, 2, 1]), first_order=True).first_order


# -- exactness against unrolled ---------------------------------------------------------------------------
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_checkpointed_and_full_truncation_equal_unrolled(tasks, opt):
    value, ref = meta_grad(tasks, "unrolled", steps=4, opt=opt, vectorize=True)
    for spec, vectorize in [
        ("checkpointed", False),
        ("checkpointed(every=3)", True),
        ("truncated(4)", False),
        ("truncated(k=9)", True),
    ]:
        v, g = meta_grad(tasks, spec, steps=4, opt=opt, vectorize=vectorize)
        assert torch.allclose(v, value, rtol=0, atol=1e-12)
        assert (g - ref).abs().max() < 1e-10, spec
    assert torch.equal(
        meta_grad(tasks, "truncated(0)", steps=4, opt=opt)[1], meta_grad(tasks, "first_order", steps=4, opt=opt)[1]
    )


@pytest.mark.parametrize("cls, kw", [(allmap.ANIL, {}), (allmap.MetaSGD, {})])
def test_checkpointed_differentiates_what_the_loop_closes_over(tasks, cls, kw):
    # ANIL's body and Meta-SGD's learned rates enter the inner step only through its closure
    _, ref = meta_grad(tasks, "unrolled", cls=cls, **kw)
    _, got = meta_grad(tasks, "checkpointed", cls=cls, **kw)
    assert (got - ref).abs().max() < 1e-10


def test_truncated_matches_closed_form():
    # SGD on a quadratic: d theta_T / d theta_0 = (I - lr A)^T; truncated(k) keeps only (I - lr A)^k
    a_mat, a, b, theta = quadratic()
    lr, steps = 0.2, 6
    for k in (0, 2, 6):
        [phi] = Truncated(k).run(support_loss_of(a_mat, a), {"w": theta}, sgd(lr), steps)
        (grad,) = torch.autograd.grad(query_loss(phi, b), theta)
        jac = torch.linalg.matrix_power(torch.eye(4, dtype=D) - lr * a_mat, k)
        assert torch.allclose(grad, jac @ (phi["w"] - b).detach(), atol=1e-12)


@pytest.mark.parametrize("spec", ["unrolled", "checkpointed", "checkpointed(2)"])
def test_gradcheck_exact_strategies(spec):
    strategy = resolve(spec)
    x = torch.linspace(-1, 1, 5, dtype=D).unsqueeze(-1)
    y = torch.sin(3 * x)

    def f(w1, w2, lr):
        scale = 1.0 + lr.sum()  # a tensor the loop closes over: checkpointed must return its gradient too

        def loss(p):
            return ((torch.tanh(x @ p["w1"]) @ p["w2"] * scale - y) ** 2).mean()

        [phi] = strategy.run(loss, {"w1": w1, "w2": w2}, sgd(0.3), 3, closure=[lr])
        return (((torch.tanh(x @ phi["w1"]) @ phi["w2"]) - 2 * y) ** 2).mean()

    g = torch.Generator().manual_seed(1)
    args = (
        torch.randn(1, 3, generator=g, dtype=D, requires_grad=True),
        torch.randn(3, 1, generator=g, dtype=D, requires_grad=True),
        torch.tensor([0.1], dtype=D, requires_grad=True),
    )
    assert torch.autograd.gradcheck(f, args)
    if strategy.name == "unrolled":  # checkpointed computes first derivatives only (documented)
        assert torch.autograd.gradgradcheck(f, args)


def test_gradcheck_implicit():
    # converged inner loop: the function is query(phi*(theta, a)), phi* the exact regularised solution
    a_mat, a, b, theta = quadratic(3)
    a = a.clone().requires_grad_(True)

    def f(t, target):
        [phi] = Implicit(lam=0.5, iterations=3, tol=1e-10).run(
            support_loss_of(a_mat, target), {"w": t}, sgd(0.3), 300, closure=[target]
        )
        return query_loss(phi, b)

    assert torch.autograd.gradcheck(f, (theta, a))


def test_truncated_and_first_order_equal_hand_written_stop_gradients():
    # truncated(k) and first_order are not derivatives of the loss, so gradcheck does not apply; compare with
    # the loss whose constant part of the path is detached by hand.
    a_mat, a, b, theta = quadratic(3)
    lr = 0.1

    def by_hand(t, k, steps=4):
        w = t
        for s in range(steps):
            g = a_mat @ (w - a)
            w = w - lr * (g.detach() if s < steps - k else g)
        return 0.5 * ((w - b) ** 2).sum()

    for spec, k in (("truncated(2)", 2), ("first_order", 0)):

        def f(t, spec=spec):
            [phi] = resolve(spec).run(support_loss_of(a_mat, a), {"w": t}, sgd(lr), 4)
            return query_loss(phi, b)

        (got,) = torch.autograd.grad(f(theta), theta)
        (want,) = torch.autograd.grad(by_hand(theta, k), theta)
        assert torch.allclose(got, want, atol=1e-13)


# -- implicit ---------------------------------------------------------------------------------------------
def implicit_reference(a_mat, a, b, theta, lam):
    """phi* = (A + lam I)^-1 (A a + lam theta) in closed form; autograd through the solve."""
    phi = torch.linalg.solve(a_mat + lam * torch.eye(len(a), dtype=D), a_mat @ a + lam * theta)
    return query_loss({"w": phi}, b)


@pytest.mark.parametrize("solver, extra", [("cg", {}), ("neumann", {"alpha": 0.3})])
def test_implicit_equals_closed_form_and_converges(solver, extra):
    a_mat, a, b, theta = quadratic()
    lam = 1.0
    (want,) = torch.autograd.grad(implicit_reference(a_mat, a, b, theta, lam), theta)
    errors = []
    for iterations in (1, 2, 3, 4) if solver == "cg" else (1, 5, 20, 80):
        strategy = Implicit(lam=lam, iterations=iterations, solver=solver, tol=1e-9, on_fail="ignore", **extra)
        [phi] = strategy.run(support_loss_of(a_mat, a), {"w": theta}, sgd(0.2), 300)
        (got,) = torch.autograd.grad(query_loss(phi, b), theta)
        errors.append(float((got - want).norm()))
    assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-9, errors  # CG is exact after dim iterations; Neumann converges geometrically
    assert strategy.last_residual < 1e-9


def test_implicit_gradient_of_closed_over_tensors():
    # the support loss closes over its target a: d phi*/d a = (A + lam I)^-1 A, by the implicit function theorem
    a_mat, a, b, theta = quadratic()
    a = a.clone().requires_grad_(True)
    lam = 0.7
    want = torch.autograd.grad(implicit_reference(a_mat, a, b, theta, lam), (theta, a))
    strategy = Implicit(lam=lam, iterations=4, tol=1e-12)
    [phi] = strategy.run(support_loss_of(a_mat, a), {"w": theta}, sgd(0.2), 400, closure=[a])
    got = torch.autograd.grad(query_loss(phi, b), (theta, a))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-10)


def test_implicit_memory_free_record_and_bad_solves():
    a_mat, a, b, theta = quadratic()
    path = Implicit(iterations=4).run(support_loss_of(a_mat, a), {"w": theta}, sgd(0.2), 5, record=[0, 5])
    assert path[0]["w"] is theta
    bad = Implicit(lam=1.0, iterations=1, tol=1e-12, on_fail="raise")
    [phi] = bad.run(support_loss_of(a_mat, a), {"w": theta}, sgd(0.2), 50)
    with pytest.raises(ImplicitSolveError, match=r"cg stopped after 1 iterations at relative residual [0-9.e-]+ > tol"):
        query_loss(phi, b).backward()
    warn = Implicit(lam=1.0, iterations=1, tol=1e-12, on_fail="warn")
    [phi] = warn.run(support_loss_of(a_mat, a), {"w": theta}, sgd(0.2), 50)
    with pytest.warns(ImplicitSolveWarning, match="relative residual"):
        query_loss(phi, b).backward()
    assert warn.last_residual > 1e-3


def test_imaml_meta_gradient_equals_closed_form_on_linear_regression():
    # linear model, mse: the inner problem is quadratic, phi* = (X'X 2/n + lam I)^-1 (X'y 2/n + lam theta)
    fam = allmap.tasks.LinearRegression(dim=3, shots=8, queries=6)
    tasks = fam.sample(2, torch.Generator().manual_seed(3)).to(dtype=D)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1, bias=False).double()
    lam = 2.0
    learner = allmap.IMAML(net, lam=lam, inner_lr=0.1, inner_steps=400, cg_iterations=3, tol=1e-12)
    learner.meta_loss(tasks).backward()
    theta = net.weight.detach().clone().requires_grad_(True)
    total = 0
    for i in range(len(tasks)):
        x, y, qx, qy = tasks.support_x[i], tasks.support_y[i], tasks.query_x[i], tasks.query_y[i]
        n = x.shape[0]
        h = 2 * x.T @ x / n
        phi = torch.linalg.solve(h + lam * torch.eye(3, dtype=D), 2 * x.T @ y / n + lam * theta.T)
        total = total + ((qx @ phi - qy) ** 2).mean()
    (want,) = torch.autograd.grad(total / len(tasks), theta)
    assert torch.allclose(net.weight.grad, want, atol=1e-9)


def test_monotone_descent_equals_plain_descent_when_steps_are_stable_and_stops_divergence():
    a_mat, a, b, theta = quadratic()
    loss = support_loss_of(a_mat, a)
    start = {"w": theta.detach()}
    steps = list(range(31))
    plain = gradient_descent(loss, start, sgd(0.2), 30, record=steps)  # lr < 2 / curvature: the loss falls
    assert torch.stack([loss(p) for p in plain]).diff().lt(0).all()
    for p, q in zip(plain, monotone_descent(loss, start, sgd(0.2), 30, record=steps)):
        assert torch.equal(p["w"], q["w"])
    # with Adam (not a descent method) the loss along the safeguarded path never rises (beyond rounding)
    safe = torch.stack([loss(p) for p in monotone_descent(loss, start, allmap.inner.adam(0.5), 30, record=steps)])
    assert (safe.diff() <= 1.5e-8 * safe[:-1]).all() and safe[-1] < 0.2 * safe[0]
    # lr far above 2 / (largest curvature): plain descent blows up, the safeguarded one converges to a
    big = 2.0 / float(torch.linalg.eigvalsh(a_mat)[-1])
    assert not torch.isfinite(gradient_descent(loss, start, sgd(20 * big), 2000)["w"]).all()
    assert torch.allclose(monotone_descent(loss, start, sgd(20 * big), 2000)["w"], a, atol=1e-8)


def test_monotone_descent_under_vmap_keeps_one_step_size_per_task():
    # task i has curvature c_i; lr 0.5 is stable for c = 1 and unstable for c = 10 and 50
    curv = torch.tensor([1.0, 10.0, 50.0], dtype=D)
    target = torch.tensor([1.0, -2.0, 3.0], dtype=D)

    def solve(c, t):
        return monotone_descent(
            lambda p: 0.5 * c * ((p["w"] - t) ** 2).sum(), {"w": torch.zeros(2, dtype=D)}, sgd(0.5), 60
        )["w"]

    batched = torch.func.vmap(solve)(curv, target)
    for i in range(3):
        assert torch.equal(batched[i], solve(curv[i], target[i]))
        assert torch.allclose(batched[i], target[i].expand(2), atol=1e-6)


def test_imaml_safeguard_keeps_diverging_tasks_finite():
    # inner_lr 5 on a steep regression diverges without the safeguard; the implicit gradient stays the
    # closed form with it (the solution is the same, only the path changes)
    fam = allmap.tasks.LinearRegression(dim=3, shots=8, queries=6)
    tasks = fam.sample(2, torch.Generator().manual_seed(3)).to(dtype=D)
    tasks = type(tasks)(3 * tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y, tasks.info)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1, bias=False).double()
    grads = {}
    for safeguard in (False, True):
        net.zero_grad()
        learner = allmap.IMAML(
            net,
            lam=2.0,
            inner_lr=5.0,
            inner_steps=300,
            cg_iterations=3,
            tol=1e-12,
            safeguard=safeguard,
            on_fail="ignore",
        )
        learner.meta_loss(tasks).backward()
        grads[safeguard] = net.weight.grad.clone()
    assert not torch.isfinite(grads[False]).all()
    reference = allmap.IMAML(net, lam=2.0, inner_lr=0.01, inner_steps=5000, cg_iterations=3, tol=1e-12)
    net.zero_grad()
    reference.meta_loss(tasks).backward()
    assert torch.allclose(grads[True], net.weight.grad, atol=1e-9)


# -- forward mode -----------------------------------------------------------------------------------------
def test_forward_mode_equals_reverse_for_per_layer_rates(tasks):
    torch.manual_seed(0)
    net = MLP([1, 8, 8, 1]).double()
    names = [n for n, _ in net.named_parameters()]
    layer = {n: i for i, n in enumerate(sorted({n.rsplit(".", 1)[0] for n in names}))}
    theta = {n: p.detach() for n, p in net.named_parameters()}

    def meta_loss(hyper):
        rates = {n: hyper["lr"][layer[n.rsplit(".", 1)[0]]] for n in names}
        total = 0
        for i in range(len(tasks)):

            def support(p, i=i):
                return ((torch.func.functional_call(net, p, (tasks.support_x[i],)) - tasks.support_y[i]) ** 2).mean()

            phi = gradient_descent(support, theta, sgd(rates), 5)
            total = total + ((torch.func.functional_call(net, phi, (tasks.query_x[i],)) - tasks.query_y[i]) ** 2).mean()
        return total / len(tasks)

    lr = torch.tensor([0.05, 0.02, 0.08], dtype=D)
    value, fwd = hypergradient(meta_loss, {"lr": lr})
    lr_r = lr.clone().requires_grad_(True)
    (rev,) = torch.autograd.grad(meta_loss({"lr": lr_r}), lr_r)
    assert torch.allclose(fwd["lr"], rev, rtol=0, atol=1e-12)
    assert torch.allclose(value, meta_loss({"lr": lr}))


def test_forward_strategy_equals_unrolled(tasks):
    value, ref = meta_grad(tasks, "unrolled", sizes=(1, 4, 1), vectorize=True)
    v, got = meta_grad(tasks, "forward", sizes=(1, 4, 1), vectorize=True)
    assert torch.allclose(v, value, atol=1e-14)
    assert (got - ref).abs().max() < 1e-12


def test_forward_strategy_equals_unrolled_one_task_at_a_time(tasks):
    """Without vmap the MSE's double backward meets a target with no tangent: it must not be torch's fused
    ``mse_loss``, whose forward-over-reverse formula fails on it ("ZeroTensors are immutable")."""
    value, ref = meta_grad(tasks, "unrolled", sizes=(1, 4, 1), vectorize=False)
    v, got = meta_grad(tasks, "forward", sizes=(1, 4, 1), vectorize=False)
    assert torch.allclose(v, value, atol=1e-14)
    assert (got - ref).abs().max() < 1e-12


# -- finite differences -----------------------------------------------------------------------------------
def test_central_differences_within_stated_error(tasks):
    _, ref = meta_grad(tasks, "unrolled", sizes=(1, 4, 1))
    for eps, bound in ((1e-3, 1e-5), (1e-5, 1e-8)):  # error ~ eps^2 |f'''| / 6 (round-off ~1e-16/eps)
        _, got = meta_grad(tasks, f"finite_difference(eps={eps})", sizes=(1, 4, 1))
        assert (got - ref).abs().max() < bound, eps


def test_zeroth_order_is_unbiased_with_its_stated_variance():
    # on a quadratic the antithetic estimate is exactly (u . grad) u, so E[g] = grad and the spread matches
    a_mat, a, b, theta = quadratic(dim=6)
    fn = lambda p: 0.5 * (p["w"] - a) @ a_mat @ (p["w"] - a)  # noqa: E731
    p = {"w": theta.detach()}
    want = a_mat @ (theta.detach() - a)
    results = {}
    for m in (50, 800):
        value, got, info = resolve(f"finite_difference(eps=0.1, directions={m}, seed=0)").meta_gradient(fn, p)
        sq_err = float(((got["w"] - want) ** 2).sum())
        assert sq_err < 4 * info["variance"], (m, sq_err, info["variance"])
        assert info["evaluations"] == 2 * m + 1
        results[m] = info["variance"]
    assert 8 < results[50] / results[800] < 32  # variance falls as 1/m


def test_finite_difference_strategy_reports_its_cost(tasks):
    learner = allmap.MAML(MLP([1, 3, 1]).double(), inner_lr=0.05, hypergrad="finite_difference(eps=1e-4)")
    learner.meta_loss(tasks).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in learner.parameters())
    assert learner.hypergrad_info["evaluations"] == 2 * sum(p.numel() for p in learner.parameters()) + 1


@pytest.mark.parametrize("spec", ["checkpointed", "implicit(lam=1.0)"])
def test_custom_backward_strategies_evaluate_under_vmap_without_grad(tasks, spec):
    # evaluation runs adapt_path under no_grad and vmap: no custom backward is needed there
    torch.manual_seed(0)
    learner = allmap.MAML(MLP([1, 4, 1]).double(), inner_lr=0.05, inner_steps=3, hypergrad=spec)
    with torch.no_grad():
        batched = torch.func.vmap(lambda sx, sy, qx: learner.adapt(sx, sy)(qx))(
            tasks.support_x, tasks.support_y, tasks.query_x
        )
        looped = torch.stack(
            [learner.adapt(tasks.support_x[i], tasks.support_y[i])(tasks.query_x[i]) for i in range(len(tasks))]
        )
    assert torch.allclose(batched, looped, atol=1e-12)


def test_checkpointed_replays_random_numbers():
    # dropout inside the inner loop: the recomputed steps must draw the same masks as the forward pass
    net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Dropout(0.3), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    tasks = allmap.tasks.Sinusoid(shots=6, queries=5).sample(2, torch.Generator().manual_seed(0)).to(dtype=D)
    grads = []
    for spec in ("unrolled", "checkpointed"):
        torch.manual_seed(0)
        learner = allmap.MAML(net.double(), inner_lr=0.05, inner_steps=3, hypergrad=spec, vectorize=False)
        learner.zero_grad()
        torch.manual_seed(1)
        learner.meta_loss(tasks).backward()
        grads.append(torch.cat([p.grad.flatten() for p in learner.parameters()]))
    assert (grads[0] - grads[1]).abs().max() < 1e-12
