"""The execution layer (allmap/engine/execution.py): every way of running the tasks gives the per-task loop's
loss and meta-gradient (float64), meta_backward equals meta_loss().backward(), compile is opt-in with a clean
fallback, and the automatic rule picks what benchmarks/peers.py measured."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import allmap
from allmap.engine.evaluate import evaluate
from allmap.engine.execution import Execution, evaluation_vmap, plan, resolve_execution
from allmap.tasks.batch import TaskBatch

torch.set_num_threads(1)


def mlp_maml(steps: int = 2, seed: int = 0) -> allmap.MAML:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    return allmap.MAML(net, inner_lr=0.3, inner_steps=steps)


def sinusoid(n: int = 5, seed: int = 0) -> TaskBatch:
    return (
        allmap.tasks.Sinusoid(shots=4, queries=3).sample(n, torch.Generator().manual_seed(seed)).to(dtype=torch.float64)
    )


def grads_of(learner: nn.Module, tasks: TaskBatch, execution, backward: bool = False, chunk=None):
    learner.execution = execution
    learner.zero_grad(set_to_none=True)
    if backward:
        loss = learner.meta_backward(tasks, chunk=chunk)
    else:
        loss = learner.meta_loss(tasks)
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in learner.parameters()]


def reference_maml(learner: allmap.MAML, tasks: TaskBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """MAML written independently: a Python loop over tasks with torch.autograd.grad(create_graph=True)."""
    names, params = zip(*learner.model.named_parameters())
    losses = []
    for i in range(len(tasks)):
        fast = list(params)
        for _ in range(learner.inner_steps):
            pred = torch.func.functional_call(learner.model, dict(zip(names, fast)), (tasks.support_x[i],))
            g = torch.autograd.grad(((pred - tasks.support_y[i]) ** 2).mean(), fast, create_graph=True)
            fast = [p - learner.inner_lr * gi for p, gi in zip(fast, g)]
        pred = torch.func.functional_call(learner.model, dict(zip(names, fast)), (tasks.query_x[i],))
        losses.append(((pred - tasks.query_y[i]) ** 2).mean())
    loss = torch.stack(losses).mean()
    return loss.detach(), list(torch.autograd.grad(loss, params))


MODES = [
    ("vmap", False, None),
    ("vmap(2)", False, None),
    ("loop", False, None),
    ("loop(3)", False, None),
    ("loop", True, None),
    ("loop(2)", True, None),
    ("vmap(2)", True, None),
    ("vmap", True, 3),
    ("auto", True, 1),
    (Execution("vmap", 4), True, None),
]


@pytest.mark.parametrize("execution,backward,chunk", MODES)
def test_every_mode_equals_independent_per_task_loop(execution, backward, chunk):
    learner = mlp_maml()
    tasks = sinusoid(5)
    ref_loss, ref_grads = reference_maml(learner, tasks)
    loss, grads = grads_of(learner, tasks, execution, backward, chunk)
    assert torch.allclose(loss, ref_loss, rtol=1e-12, atol=1e-14)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("execution", ["vmap(2)", "loop"])
def test_chunked_meta_loss_gradcheck_and_gradgradcheck(execution):
    learner = mlp_maml(steps=1)
    learner.execution = execution
    tasks = sinusoid(3)
    names = [n for n, _ in learner.named_parameters()]
    base = {n: p.detach() for n, p in learner.named_parameters()}

    def f(w):  # meta-loss as a function of the first layer's weight
        return torch.func.functional_call(learner, {**base, names[0]: w}, (tasks,))

    w = base[names[0]].clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (w,))
    assert torch.autograd.gradgradcheck(f, (w,))


def test_meta_backward_scale_and_accumulation():
    learner = mlp_maml()
    tasks = sinusoid(4)
    ref_loss, ref_grads = grads_of(learner, tasks, "vmap")
    learner.execution = "loop"
    learner.zero_grad(set_to_none=True)
    half = learner.meta_backward(tasks, scale=0.5)
    learner.meta_backward(tasks, chunk=3, scale=0.5)  # adds to .grad like backward()
    assert torch.allclose(half, 0.5 * ref_loss)
    for p, r in zip(learner.parameters(), ref_grads):
        assert torch.allclose(p.grad, r, rtol=1e-10, atol=1e-12)


def tiny_conv(bn: bool = True) -> nn.Module:
    layers = (
        [nn.Conv2d(1, 3, 3, stride=2)]
        + ([nn.BatchNorm2d(3)] if bn else [])
        + [nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 3)]
    )
    return nn.Sequential(*layers).double()


def image_tasks(n: int = 4, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat(n, 1)
    return TaskBatch(
        torch.randn(n, 3, 1, 7, 7, generator=g, dtype=torch.float64),
        y,
        torch.randn(n, 3, 1, 7, 7, generator=g, dtype=torch.float64),
        y.clone(),
    )


def test_conv_with_batchnorm_runs_per_task_and_meta_backward_matches():
    torch.manual_seed(0)
    learner = allmap.MAML(tiny_conv(), inner_lr=0.2, inner_steps=2, loss="cross_entropy")
    tasks = image_tasks(4)
    p = learner.execution_plan(4, torch.device("cpu"))
    assert (p.vmap, p.chunk) == (False, 1) and "convolutions" in p.reason
    ref_loss, ref_grads = grads_of(learner, tasks, "loop")
    # BatchNorm became BatchStatNorm, so second order under vmap is exact too
    for execution, chunk in (("auto", None), ("loop", 3), ("loop(2)", None), ("vmap", None), ("vmap(3)", None)):
        loss, grads = grads_of(learner, tasks, execution, backward=True, chunk=chunk)
        assert torch.allclose(loss, ref_loss, rtol=1e-12)
        for g, r in zip(grads, ref_grads):
            assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)


def test_conv_with_torch_batchnorm_refuses_vmap():
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2), nn.BatchNorm2d(3, affine=False), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3)
    ).double()
    learner = allmap.MAML(net, inner_lr=0.2, inner_steps=2, loss="cross_entropy")
    assert "BatchNorm" in learner.execution_plan(4).reason
    with pytest.raises(ValueError, match="vmap with BatchNorm"):
        grads_of(learner, image_tasks(4), "vmap")


def test_automatic_rule():
    mlp = mlp_maml()
    assert plan(mlp, 25).vmap and plan(mlp, 25).chunk == 25
    conv = allmap.MAML(tiny_conv(bn=False), loss="cross_entropy")
    p = plan(conv, 32, torch.device("cpu"))
    assert not p.vmap and p.chunk == 1 and "convolutions" in p.reason
    assert plan(conv, 32, torch.device("meta")).vmap  # accelerators batch across tasks
    assert not plan(conv, 32, torch.device("cpu"), examples=80).vmap
    small = plan(conv, 32, torch.device("cpu"), examples=10)  # MAML's Omniglot episodes: 5 + 5 images
    assert small.vmap and small.chunk == 32 and "at most" in small.reason
    assert not evaluation_vmap(conv, torch.device("cpu")) and evaluation_vmap(mlp)
    mlp.vectorize = False  # the older switch still works
    assert not plan(mlp, 25).vmap
    mlp.execution = "vmap(5)"  # an explicit execution mode wins over it
    assert plan(mlp, 25).vmap and plan(mlp, 25).chunk == 5


def test_specs_and_errors():
    assert resolve_execution("loop(8)+compile") == Execution("loop", 8, True)
    assert resolve_execution({"mode": "vmap", "chunk": 2}) == Execution("vmap", 2)
    assert resolve_execution(None) == Execution()
    with pytest.raises(ValueError, match="cannot parse the execution spec"):
        resolve_execution("vmap[3]")
    with pytest.raises(ValueError, match="unknown mode"):
        Execution("threads")
    with pytest.raises(ValueError, match="positive integer"):
        Execution("loop", 0)
    with pytest.raises(ValueError, match="unknown key"):
        resolve_execution({"mode": "loop", "chunks": 2})
    with pytest.raises(TypeError, match="spec string"):
        resolve_execution(3)
    learner = mlp_maml()
    with pytest.raises(ValueError, match="meta_backward: expected chunk"):
        learner.meta_backward(sinusoid(2), chunk=0)


def test_config_sets_execution():
    from allmap.app.build import build_family, build_learner
    from allmap.app.config import DEFAULTS, ConfigError, _merge

    config = _merge(
        DEFAULTS, {"learner": {"name": "maml", "execution": "loop(4)"}, "model": {"name": "mlp", "sizes": [1, 4, 1]}}
    )
    learner = build_learner(config, build_family(config))
    assert learner.execution == Execution("loop", 4)
    config["learner"]["execution"] = "fast"
    with pytest.raises(ConfigError, match="learner.execution"):
        build_learner(config, build_family(config))


def test_metric_learner_meta_backward_matches():
    torch.manual_seed(0)
    learner = allmap.learners.ProtoNet(nn.Sequential(nn.Flatten(), nn.Linear(49, 5)).double())
    tasks = image_tasks(4)
    ref_loss, ref_grads = grads_of(learner, tasks, "auto")
    loss, grads = grads_of(learner, tasks, "auto", backward=True, chunk=1)
    assert torch.allclose(loss, ref_loss, rtol=1e-12)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_evaluate_vmap_equals_loop_under_inference_mode(net):
    torch.manual_seed(0)
    if net == "mlp":
        learner, tasks = mlp_maml(), sinusoid(6)
        learner.inner_lr = 0.05
    else:
        learner = allmap.MAML(tiny_conv(), inner_lr=0.2, inner_steps=1, loss="cross_entropy")
        tasks = image_tasks(6)
    learner.execution = "vmap" if net == "mlp" else "auto"
    a = evaluate(learner, tasks, steps=(0, 1, 2), chunk=4)
    learner.execution = "loop"
    b = evaluate(learner, tasks, steps=(0, 1, 2), chunk=4)
    for key in a:
        assert a[key]["mean"] == pytest.approx(b[key]["mean"], rel=1e-10, abs=1e-12)
    # adaptation (torch.func.grad) ran under inference_mode: same as with autograd fully enabled
    ref = torch.stack(
        [
            learner.loss_fn(
                learner.adapt(tasks.support_x[i], tasks.support_y[i], steps=2)(tasks.query_x[i]), tasks.query_y[i]
            )
            for i in range(len(tasks))
        ]
    ).mean()
    assert a["loss@2"]["mean"] == pytest.approx(float(ref.detach()), rel=1e-10)
    assert a["loss@2"]["mean"] != pytest.approx(a["loss@0"]["mean"])


class _ViewAfterConv(nn.Module):
    """A model that needs NCHW input: ``.view`` on a convolution's output fails in NHWC layout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 3, 3, stride=2), nn.Linear(3 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).relu()
        return self.head(h.view(h.shape[0], -1))


@pytest.mark.parametrize("make", [tiny_conv, lambda: _ViewAfterConv().double()])
def test_evaluation_in_nhwc_layout_equals_nchw(make):
    # the per-task loop on CPU feeds conv nets NHWC images; a model that cannot take them falls back to NCHW
    from allmap.engine.execution import evaluation_layout

    torch.manual_seed(0)
    learner = allmap.MAML(make(), inner_lr=0.2, inner_steps=1, loss="cross_entropy")
    assert evaluation_layout(learner, False, torch.device("cpu")) is torch.channels_last
    assert evaluation_layout(learner, True, torch.device("cpu")) is None
    tasks = image_tasks(5)
    learner.execution = "loop"
    before = [p.detach().clone() for p in learner.parameters()]
    a = evaluate(learner, tasks, steps=(0, 1, 2), chunk=2)
    for p, q in zip(learner.parameters(), before):  # weights go back to their layout, values untouched
        assert p.is_contiguous() and torch.equal(p, q)
    learner.execution = "vmap"  # vmap keeps the input layout
    b = evaluate(learner, tasks, steps=(0, 1, 2), chunk=2)
    for key in a:
        assert a[key]["mean"] == pytest.approx(b[key]["mean"], rel=1e-10, abs=1e-12)


def test_compile_marker_registered(pytestconfig):
    assert any(m.startswith("compile:") for m in pytestconfig.getini("markers"))


def tiny_float_maml() -> allmap.MAML:
    torch.manual_seed(0)
    return allmap.MAML(nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)), inner_lr=0.1, inner_steps=1)


@pytest.mark.parametrize("backward", [False, True])  # meta_loss().backward() and meta_backward (functional)
def test_compile_fallback_on_failure(monkeypatch, backward):
    learner = tiny_float_maml()
    tasks = allmap.tasks.Sinusoid(shots=4).sample(3, torch.Generator().manual_seed(0))
    ref_loss, ref_grads = grads_of(learner, tasks, "vmap")

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("backend exploded")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*backend exploded"):
        loss, grads = grads_of(learner, tasks, "vmap+compile", backward=backward)
    assert "backend exploded" in learner.execution_stats["compile_failed"]
    assert torch.equal(loss, ref_loss) and all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; later calls run eagerly
        grads_of(learner, tasks, "vmap+compile", backward=backward)


@pytest.mark.compile
def test_compile_matches_eager_and_reports_time():
    """Real torch.compile (inductor) of the vmapped chunk on a tiny model: same loss and meta-gradient."""
    learner = tiny_float_maml()
    tasks = allmap.tasks.Sinusoid(shots=4).sample(5, torch.Generator().manual_seed(0))
    ref_loss, ref_grads = grads_of(learner, tasks, "vmap")
    loss, grads = grads_of(learner, tasks, "vmap+compile")
    assert learner.execution_stats["compile_seconds"] > 0 and learner.execution_stats["compiles"] == 1
    assert "compile_failed" not in learner.execution_stats
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6)
    grads_of(learner, tasks, "vmap+compile")  # cached: no second compilation for the same shapes
    assert learner.execution_stats["compiles"] == 1


@pytest.mark.compile
def test_compiled_meta_backward_is_one_functional_gradient_equal_to_backward():
    """meta_backward under vmap+compile: the meta-gradient as one compiled torch.func.grad, float64, equal to
    eager meta_loss().backward(); learned inner rates (Meta-SGD) and a frozen tensor included."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    learner = allmap.MetaSGD(net, inner_lr=0.1, inner_steps=2)
    net[0].bias.requires_grad_(False)  # frozen: used, never trained
    tasks = allmap.tasks.Sinusoid(shots=4).sample(5, torch.Generator().manual_seed(0)).to(dtype=torch.float64)
    learner.execution = "vmap"
    ref_loss = learner.meta_loss(tasks)
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in learner.named_parameters() if p.requires_grad}
    for chunk in (None, 2):  # the whole meta-batch, and chunks of 2 tasks (three compiled shapes: 5, 2, 1)
        learner.execution = "vmap+compile" if chunk is None else "vmap(2)+compile"
        learner.zero_grad(set_to_none=True)
        loss = learner.meta_backward(tasks)
        assert loss.grad_fn is None and "compile_failed" not in learner.execution_stats
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
        for n, p in learner.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, ref[n], rtol=1e-10, atol=1e-13)
            else:
                assert p.grad is None
    assert learner.execution_stats["compiles"] == 3 and learner.execution_stats["compile_seconds"] > 0


def test_meta_backward_whole_loss_strategies_run_in_one_pass(monkeypatch):
    """Forward-mode / finite-difference meta-gradients estimate the whole loss at once: no per-task split."""
    learner = allmap.MAML(tiny_conv(), inner_lr=0.2, inner_steps=1, loss="cross_entropy", hypergrad="forward")
    tasks = image_tasks(3)
    calls = []
    original = allmap.MAML.batch_loss  # meta_loss without the validation: what meta_backward runs per chunk
    monkeypatch.setattr(allmap.MAML, "batch_loss", lambda self, t: calls.append(len(t)) or original(self, t))
    ref = original(learner, tasks)
    calls.clear()
    ref_grads = torch.autograd.grad(ref, list(learner.parameters()))
    loss = learner.meta_backward(tasks)
    assert calls == [3]
    assert torch.allclose(loss, ref.detach(), rtol=1e-12)
    for p, r in zip(learner.parameters(), ref_grads):
        assert torch.allclose(p.grad, r, rtol=1e-8, atol=1e-10)
