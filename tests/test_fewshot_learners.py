"""ProtoNets, Matching Networks, Siamese networks and conv backbones: references, float64 gradient checks,
learning on a small Omniglot subset, MAML on image episodes, and errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _util import assert_vmap_equals_loop
from torch import Tensor, nn

import allmap
from allmap.engine.evaluate import evaluate
from allmap.nets import MLP, Conv4, MAMLConv
from allmap.tasks import Episodes, Omniglot, gaussian_classes

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
needs_omniglot = pytest.mark.skipif(not ROOT.is_dir(), reason="needs ../shared/data/omniglot")


def _encoder() -> nn.Module:
    return nn.Sequential(nn.Flatten(), MLP([16, 12, 6]))


def _make(name: str, dtype=torch.float64, small: bool = False):
    torch.manual_seed(0)
    enc = (lambda: nn.Sequential(nn.Flatten(), MLP([16, 2]))) if small else _encoder
    width = 2 if small else 6
    learner = {
        "protonet": lambda: allmap.ProtoNet(enc()),
        "matching": lambda: allmap.MatchingNet(enc(), scale=3.0),
        "siamese": lambda: allmap.Siamese(enc(), features=width),
    }[name]()
    return learner.to(dtype)


def _tasks(n=3, ways=4, shots=2, queries=3, dtype=torch.float64):
    family = Episodes(gaussian_classes(), ways=ways, shots=shots, queries=queries)
    return family.sample(n, torch.Generator().manual_seed(7)).to(dtype=dtype)


# -- independent references: plain loops over classes, examples and pairs --------------------------------
def _reference_loss(name: str, learner, tasks) -> torch.Tensor:
    losses = []
    for t in range(len(tasks)):
        zs = learner.model(torch.cat([tasks.support_x[t], tasks.query_x[t]]))
        ns = tasks.shots
        zq, zs = zs[ns:], zs[:ns]
        sy, qy = tasks.support_y[t].tolist(), tasks.query_y[t].tolist()
        ways = max(sy) + 1
        total = 0.0
        for i, y in enumerate(qy):
            if name == "protonet":
                protos = [torch.stack([zs[j] for j in range(ns) if sy[j] == k]).mean(0) for k in range(ways)]
                logits = torch.stack([-((zq[i] - p) ** 2).sum() for p in protos])
                total = total - torch.log_softmax(logits, 0)[y]
            elif name == "matching":
                cos = torch.stack([F.cosine_similarity(zq[i], zs[j], dim=0) for j in range(ns)])
                a = torch.softmax(learner.scale * cos, 0)
                total = total - torch.log(sum(a[j] for j in range(ns) if sy[j] == y))
        if name == "siamese":
            # balanced BCE: mean over all positive pairs and mean over all negative pairs of the task
            pos_terms, neg_terms = [], []
            for i, y in enumerate(qy):
                for j in range(ns):
                    logit = learner.similarity((zq[i] - zs[j]).abs()).squeeze()
                    (pos_terms if sy[j] == y else neg_terms).append(logit)
            pos = torch.stack([-F.logsigmoid(v) for v in pos_terms]).mean()
            neg = torch.stack([-F.logsigmoid(-v) for v in neg_terms]).mean()
            losses.append(0.5 * (pos + neg))
        else:
            losses.append(total / len(qy))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("name", ["protonet", "matching", "siamese"])
def test_loss_matches_a_plain_loop_reference(name):
    learner, tasks = _make(name), _tasks()
    torch.testing.assert_close(learner.meta_loss(tasks), _reference_loss(name, learner, tasks), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["protonet", "matching", "siamese"])
def test_float64_gradcheck_of_the_loss(name):
    learner, tasks = _make(name, small=True), _tasks(n=2, ways=2, shots=2, queries=1)
    names = [n for n, _ in learner.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in learner.parameters())

    def loss(*ps):
        return _functional_meta_loss(learner, dict(zip(names, ps)), tasks)

    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(loss, params, eps=1e-6, atol=1e-5)


def _functional_meta_loss(learner, params, tasks):
    class Call(nn.Module):  # functional_call needs a forward
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return self.inner.meta_loss(t)

    return torch.func.functional_call(Call(learner), {f"inner.{k}": v for k, v in params.items()}, (tasks,))


def test_protonet_adapt_predicts_nearest_prototype_and_works_under_vmap():
    learner = _make("protonet")
    tasks = _tasks(n=4, ways=3, shots=3, queries=2)
    model = learner.adapt(tasks.support_x[0], tasks.support_y[0])
    out = model(tasks.query_x[0])
    assert out.shape == (6, 3)
    # under vmap the scores have one column per support example; extra classes are -inf, argmax agrees
    wide = torch.func.vmap(lambda sx, sy, qx: learner.adapt(sx, sy)(qx))(
        tasks.support_x, tasks.support_y, tasks.query_x
    )
    assert wide.shape == (4, 6, 9)
    torch.testing.assert_close(wide[0, :, :3], out)
    assert torch.isinf(wide[..., 3:]).all()
    # evaluate() (vmap path) equals the per-task loop
    res_v = evaluate(learner, tasks, steps=[0])
    learner.vectorize = False
    res_l = evaluate(learner, tasks, steps=[0])
    assert math.isclose(res_v["accuracy"]["mean"], res_l["accuracy"]["mean"])
    assert math.isclose(res_v["loss"]["mean"], res_l["loss"]["mean"], rel_tol=1e-9)


def _soft_kmeans_reference(z_s: Tensor, y_s: Tensor, z_q: Tensor, ways: int, steps: int) -> Tensor:
    """Soft k-means refinement of prototypes written as a loop over classes (Ren et al. 2018, eq. 2)."""
    protos = torch.stack([z_s[y_s == k].mean(0) for k in range(ways)])
    for _ in range(steps):
        dist = torch.stack([((z_q - protos[k]) ** 2).sum(-1) for k in range(ways)], dim=1)
        p = (-dist).softmax(1)
        protos = torch.stack(
            [
                (z_s[y_s == k].sum(0) + (p[:, k : k + 1] * z_q).sum(0)) / ((y_s == k).sum() + p[:, k].sum())
                for k in range(ways)
            ]
        )
    return -torch.stack([((z_q - protos[k]) ** 2).sum(-1) for k in range(ways)], dim=1)


def test_transductive_protonet_refines_prototypes_with_the_queries_at_test_time_only():
    torch.manual_seed(0)
    encoder = nn.Identity()
    learner = allmap.learners.ProtoNet(encoder, transductive=3).double()
    # two classes whose queries sit to one side of the single support example: refinement moves the prototypes
    support_x = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    support_y = torch.tensor([0, 1])
    query_x = torch.tensor([[1.2, 0.0], [1.3, 0.1], [2.6, 0.0], [-0.4, 0.0]], dtype=torch.float64)
    learner.eval()
    scores = learner.adapt(support_x, support_y)(query_x)
    torch.testing.assert_close(
        scores, _soft_kmeans_reference(support_x, support_y, query_x, 2, 3), rtol=1e-12, atol=1e-12
    )
    plain = -(torch.cdist(query_x, support_x) ** 2)
    assert not torch.allclose(scores, plain)
    # training mode (and transductive=0) classify every query on its own: the plain ProtoNets scores
    learner.train()
    torch.testing.assert_close(learner.adapt(support_x, support_y)(query_x), plain)
    learner.eval().transductive = 0
    torch.testing.assert_close(learner.adapt(support_x, support_y)(query_x), plain)
    with pytest.raises(ValueError, match="transductive .* integer >= 0"):
        allmap.learners.ProtoNet(encoder, transductive=-1)


def test_siamese_classifies_by_most_similar_support_example():
    learner = _make("siamese")
    tasks = _tasks(n=1, ways=3, shots=2, queries=2)
    scores = learner.adapt(tasks.support_x[0], tasks.support_y[0])(tasks.query_x[0])
    zs, zq = learner.model(tasks.support_x[0]), learner.model(tasks.query_x[0])
    pairs = learner.pair_logits(zs, zq)  # [Nq, Ns]
    best = tasks.support_y[0][pairs.argmax(1)]
    assert torch.equal(scores.argmax(1), best)


def test_errors_are_clear():
    learner = _make("protonet")
    tasks = _tasks()
    bad = allmap.TaskBatch(tasks.support_x, tasks.support_y.double(), tasks.query_x, tasks.query_y.double())
    with pytest.raises(ValueError, match="integer class labels"):
        learner.meta_loss(bad)
    missing = allmap.TaskBatch(tasks.support_x, tasks.support_y.clamp_min(1), tasks.query_x, tasks.query_y)
    with pytest.raises(ValueError, match="needs a support example"):
        learner.meta_loss(missing)
    high = allmap.TaskBatch(tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y + 5)
    with pytest.raises(ValueError, match="query labels"):
        learner.meta_loss(high)
    with pytest.raises(TypeError, match="encoder"):
        allmap.ProtoNet("conv4")
    with pytest.raises(ValueError, match="scale > 0"):
        allmap.MatchingNet(_encoder(), scale=0.0)
    with pytest.raises(ValueError, match="features=5"):
        allmap.Siamese(_encoder(), features=5).to(torch.float64).meta_loss(tasks)


# -- test-time shifts ------------------------------------------------------------------------------------
def _moved(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Reference shift, written differently from ``translations``: roll, then zero what wrapped around."""
    out = torch.roll(x, shifts=(-dy, -dx), dims=(-2, -1))
    h, w = x.shape[-2:]
    rows, cols = torch.arange(h) + dy, torch.arange(w) + dx
    keep = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
    return out * keep


def test_translations_are_every_zero_filled_shift_unmoved_first():
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    views = allmap.tasks.episodes.translations(x, 1)
    assert len(views) == 9 and torch.equal(views[0], x)
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    for view, (dy, dx) in zip(views[1:], offsets):
        assert torch.equal(view, _moved(x, dy, dx)), (dy, dx)
    assert len(allmap.tasks.episodes.translations(x, 2)) == 25


@pytest.mark.parametrize("name", ["protonet", "matching", "siamese"])
def test_test_shift_averages_embeddings_over_shifts_in_eval_mode_only(name):
    plain, shifted = _make(name), _make(name)
    shifted.test_shift = 1
    tasks = _tasks(n=2, ways=3, shots=2, queries=2)
    # training: one encoder call per image, the same loss as without shifts
    assert torch.equal(shifted.meta_loss(tasks), plain.meta_loss(tasks))
    shifted.eval()
    sx, sy, qx = tasks.support_x[0], tasks.support_y[0], tasks.query_x[0]

    def mean_embedding(x):
        return torch.stack([plain.model(_moved(x, dy, dx)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]).mean(0)

    onehot = F.one_hot(sy, 3).double()
    expected = plain.logits(mean_embedding(sx), onehot, mean_embedding(qx))
    torch.testing.assert_close(shifted.adapt(sx, sy)(qx), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(plain.adapt(sx, sy)(qx), expected)
    # evaluate(): the vmap path equals the per-task loop with shifts too
    res_v = evaluate(shifted, tasks, steps=[0])
    shifted.vectorize = False
    res_l = evaluate(shifted, tasks, steps=[0])
    assert math.isclose(res_v["loss"]["mean"], res_l["loss"]["mean"], rel_tol=1e-9)
    assert "test_shift=1" in repr(shifted)


def test_float64_gradcheck_of_the_loss_with_test_shifts():
    learner, tasks = _make("protonet", small=True), _tasks(n=2, ways=2, shots=2, queries=1)
    learner.test_shift = 1
    learner.eval()
    names = [n for n, _ in learner.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in learner.parameters())
    assert torch.autograd.gradcheck(
        lambda *ps: _functional_meta_loss(learner, dict(zip(names, ps)), tasks), params, eps=1e-6, atol=1e-6
    )


def test_test_shift_errors_are_clear():
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="test_shift .*integer >= 0"):
            allmap.ProtoNet(_encoder(), test_shift=bad)
    learner = allmap.ProtoNet(MLP([2, 4]), test_shift=1).eval()
    tasks = allmap.tasks.Logistic2D(shots=4).sample(1, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="test_shift=1 moves images"):
        learner.adapt(tasks.support_x[0], tasks.support_y[0].long())
    too_far = _make("protonet")
    too_far.test_shift = 4  # the test images are 4x4
    with pytest.raises(ValueError, match="shape \\[1, 4, 4\\]"):
        too_far.eval().meta_loss(_tasks())


# -- backbones ------------------------------------------------------------------------------------------
def test_conv_backbones_shapes_and_functional_call():
    x = torch.randn(7, 1, 28, 28)
    assert Conv4()(x).shape == (7, 64)
    assert Conv4(out_features=5)(x).shape == (7, 5)
    assert Conv4(in_channels=3, hidden=32, out_features=5, flat_features=32 * 25)(torch.randn(2, 3, 84, 84)).shape == (
        2,
        5,
    )
    net = MAMLConv(out_features=20)
    assert net(x).shape == (7, 20)
    params = {n: p * 1.0 for n, p in net.named_parameters()}
    torch.testing.assert_close(torch.func.functional_call(net, params, (x,)), net(x))
    with pytest.raises(ValueError, match="images \\[batch, channels, height, width\\]"):
        Conv4()(torch.randn(3, 28, 28))
    with pytest.raises(ValueError, match="hidden"):
        Conv4(hidden=0)


def test_mamlconv_flatten_readout_keeps_every_position():
    """readout='flatten' (the Reptile code's network): the head reads the last 64 x 2 x 2 map (64 x 6 x 6 on
    84x84 images) in (channel, row, column) order; 'mean' reads its spatial average."""
    torch.manual_seed(0)
    x = torch.randn(3, 1, 28, 28)
    flat, mean = MAMLConv(out_features=5, readout="flatten"), MAMLConv(out_features=5)
    assert flat.head.in_features == 64 * 2 * 2 and mean.head.in_features == 64
    h = flat.body.layers(x)
    assert h.shape == (3, 64, 2, 2)
    torch.testing.assert_close(flat(x), flat.head(h.reshape(3, -1)))
    mean.body.load_state_dict(flat.body.state_dict())
    torch.testing.assert_close(mean.body(x), h.mean(dim=(2, 3)))
    assert MAMLConv(in_channels=3, readout="flatten", image_size=84).head.in_features == 64 * 6 * 6
    with pytest.raises(ValueError, match="readout to be 'mean' or 'flatten'"):
        MAMLConv(readout="max")


def test_conv4_pool_then_relu_equals_relu_then_pool():
    torch.manual_seed(0)
    net = Conv4(hidden=8).eval()
    x = torch.randn(4, 1, 28, 28)
    h = x
    for layer in net.body.layers:  # reorder to the papers' conv -> BN -> ReLU -> pool
        if isinstance(layer, nn.MaxPool2d):
            continue
        h = layer(h)
        if isinstance(layer, nn.ReLU):
            h = F.max_pool2d(h, 2)
    torch.testing.assert_close(net(x), h.flatten(1))


@pytest.mark.parametrize("cls", [Conv4, MAMLConv])
def test_channels_last_is_the_same_function_and_meta_gradient(cls):
    torch.manual_seed(0)
    nchw = cls(hidden=4, out_features=3).double()
    nhwc = cls(hidden=4, out_features=3, channels_last=True).double()
    nhwc.load_state_dict(nchw.state_dict())
    assert nhwc.body.layers[0].weight.is_contiguous(memory_format=torch.channels_last)
    seen = []  # the strides each first convolution is given: one channel, so only stride(1) tells NHWC
    for net in (nchw, nhwc):
        net.body.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].stride(1)))
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(nhwc(x), nchw(x), rtol=1e-12, atol=1e-12)
    assert seen == [1, 784]  # NHWC strides even for one channel (contiguous(channels_last) keeps NCHW's)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(2, 2)
    tasks = allmap.TaskBatch(
        torch.randn(2, 6, 1, 28, 28, generator=g, dtype=torch.float64),
        y,
        torch.randn(2, 6, 1, 28, 28, generator=g, dtype=torch.float64),
        y.clone(),
    )
    grads = []
    for net in (nchw, nhwc):
        learner = allmap.MAML(net, inner_lr=0.3, inner_steps=2, loss="cross_entropy")
        learner.execution = "loop"  # vmap keeps the given layout
        learner.meta_loss(tasks).backward()
        grads.append([p.grad for p in learner.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [Conv4, MAMLConv])
def test_bfloat16_precision_is_mixed_and_leaves_float64_exact(cls):
    torch.manual_seed(0)
    full = cls(hidden=8, out_features=3)
    mixed = cls(hidden=8, out_features=3, precision="bfloat16")
    mixed.load_state_dict(full.state_dict())
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        out, ref = mixed(x), full(x)
    assert out.dtype == torch.float32 and all(p.dtype == torch.float32 for p in mixed.parameters())
    err = float((out - ref).norm() / ref.norm())
    assert 1e-6 < err < 0.05  # bfloat16 rounding: about 3 significant digits, not float32's 7
    # autocast leaves float64 alone: gradient checks of a bfloat16 model stay exact
    with torch.no_grad():
        torch.testing.assert_close(mixed.double()(x.double()), full.double()(x.double()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="precision to be one of float32, bfloat16, auto, got 'half'"):
        cls(hidden=8, precision="half")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bfloat16_only_where_the_device_computes_it_natively(native, monkeypatch):
    """``precision="auto"`` gives exactly the bfloat16 model where bfloat16 is native and exactly the float32
    one where torch would emulate it (many times slower); float64 is never cast."""
    import allmap.nets.conv as conv

    assert isinstance(conv.native_bfloat16("cpu"), bool) and conv.native_bfloat16("meta") is False
    monkeypatch.setattr(conv, "native_bfloat16", lambda device_type: native)
    torch.manual_seed(0)
    models = {p: Conv4(hidden=8, out_features=3, precision=p) for p in ("float32", "bfloat16", "auto")}
    for m in models.values():
        m.load_state_dict(models["float32"].state_dict())
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        out = {p: m(x) for p, m in models.items()}
        torch.testing.assert_close(models["auto"].double()(x.double()), models["float32"].double()(x.double()))
    assert not torch.equal(out["bfloat16"], out["float32"])
    assert torch.equal(out["auto"], out["bfloat16" if native else "float32"])


# -- on Omniglot -----------------------------------------------------------------------------------------
@needs_omniglot
@pytest.mark.parametrize("name", ["protonet", "matching", "siamese"])
def test_learns_a_small_omniglot_subset_above_chance(name):
    torch.manual_seed(0)
    encoder = Conv4(hidden=8)
    learner = {
        "protonet": lambda: allmap.ProtoNet(encoder),
        "matching": lambda: allmap.MatchingNet(encoder, scale=10.0),
        "siamese": lambda: allmap.Siamese(encoder, features=8),
    }[name]()
    train = Omniglot(ROOT, split="vinyals-train", ways=5, shots=1, queries=3, rotations=(0,))
    test = Omniglot(ROOT, split="test", ways=5, shots=1, queries=3, rotations=(0,))
    tasks = test.sample(50, torch.Generator().manual_seed(1))
    before = evaluate(learner, tasks, steps=[0])["accuracy"]["mean"]
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        opt.zero_grad()
        learner.meta_loss(train.sample(4, gen)).backward()
        opt.step()
    after = evaluate(learner, tasks, steps=[0])["accuracy"]["mean"]
    assert after > 0.3 and after > before + 0.05, (before, after)  # chance is 0.2


@needs_omniglot
def test_maml_runs_unchanged_on_omniglot_episodes():
    torch.manual_seed(0)
    family = Omniglot(ROOT, split="train", ways=5, shots=1, queries=2)
    tasks = family.sample(3, torch.Generator().manual_seed(0)).to(dtype=torch.float64)
    net = MAMLConv(hidden=4, out_features=5)
    # second order (convolutions on CPU -> tasks one at a time) equals an explicit per-task loop of task_loss
    maml = allmap.MAML(net, inner_lr=0.4, inner_steps=1, loss="cross_entropy").to(torch.float64)
    loss = maml.meta_loss(tasks)
    ref = torch.stack(
        [maml.task_loss(tasks.support_x[i], tasks.support_y[i], tasks.query_x[i], tasks.query_y[i]) for i in range(3)]
    ).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in maml.parameters())
    # first order: vmap over the tasks equals the loop
    fo = allmap.MAML(MAMLConv(hidden=4, out_features=5), inner_lr=0.4, first_order=True, loss="cross_entropy")
    fo = fo.to(torch.float64)
    assert_vmap_equals_loop(fo, tasks, grad_rtol=1e-9)
    res = evaluate(maml, tasks, steps=[0, 1, 3])
    assert set(res) == {"loss@0", "accuracy@0", "loss@1", "accuracy@1", "loss@3", "accuracy@3"}


def test_nhwc_gives_nhwc_strides_even_for_one_channel():
    from allmap.nets.conv import nhwc

    for c in (1, 3):
        x = torch.randn(2, c, 5, 4)
        y = nhwc(x)
        assert torch.equal(y, x) and y.stride() == (20 * c, 1, 4 * c, c)
        assert nhwc(y) is y  # already NHWC: no copy
