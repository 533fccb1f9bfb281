"""SNAIL: the blocks against a plain one-query-per-sequence reference, causality, attention over the keys,
masks on the input's device, float64 gradients, errors, and the Omniglot presets through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import allmap
from allmap.app.config import load_config
from allmap.cli import main
from allmap.learners.snail import SNAIL, AttentionBlock, DenseBlock, TCBlock, causal_mask, delayed

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
needs_omniglot = pytest.mark.skipif(not ROOT.is_dir(), reason="needs ../shared/data/omniglot")

WAYS, FEATURES = 3, 6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(shots: int = 2, dtype: torch.dtype = torch.float64) -> SNAIL:
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, FEATURES))
    learner = SNAIL(encoder, y_dim=WAYS, shots=shots, features=FEATURES, filters=4, attention=[[5, 3], [4, 2], [3, 2]])
    return learner.to(dtype)


# -- an independent reference: the paper's blocks on one sequence, written with conv1d and tril ------------
def reference_sequence(learner: SNAIL, h: torch.Tensor) -> torch.Tensor:
    """Outputs ``[L, N]`` of ``learner``'s weights on one plain causal sequence ``h [L, C]``: dilated causal
    ``conv1d`` of kernel 2 (left padding) and attention with a lower-triangular mask."""
    for block in learner.blocks:
        dense = block.blocks if isinstance(block, TCBlock) else None
        if dense is None:
            q, k, v = block.query(h), block.key(h), block.value(h)
            logits = q @ k.T / math.sqrt(block.key_size)
            allowed = torch.ones(len(h), len(h), dtype=torch.bool).tril()
            h = torch.cat([h, torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=1) @ v], dim=1)
            continue
        for d in dense:
            c = h.shape[1]
            w = d.conv.weight  # [2D, 2C]: the first C columns act on h[t - r], the last C on h[t]
            kernel = torch.stack([w[:, :c], w[:, c:]], dim=2)  # [2D, C, 2], taps at t - r and t
            x = F.conv1d(F.pad(h.T.unsqueeze(0), (d.dilation, 0)), kernel, d.conv.bias, dilation=d.dilation)
            xf, xg = x[0].T.chunk(2, dim=1)
            h = torch.cat([h, torch.tanh(xf) * torch.sigmoid(xg)], dim=1)
    return learner.out(h)


def sequence_input(z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    labels = torch.zeros(len(z), WAYS, dtype=z.dtype) if y is None else F.one_hot(y, WAYS).to(z.dtype)
    return torch.cat([z, labels], dim=1)


def test_queries_sharing_the_support_prefix_equal_one_sequence_per_query():
    learner = tiny(shots=2)
    gen = torch.Generator().manual_seed(1)
    zs, zq = torch.randn(6, FEATURES, generator=gen, dtype=torch.float64), torch.randn(4, FEATURES, dtype=torch.float64)
    ys = torch.tensor([0, 0, 1, 1, 2, 2])
    got = learner.scores(zs, ys, zq)
    support = sequence_input(zs, ys)
    for i in range(len(zq)):
        one = torch.cat([support, sequence_input(zq[i : i + 1], None)])
        torch.testing.assert_close(got[i], reference_sequence(learner, one)[-1], rtol=1e-12, atol=1e-12)
    # a plain causal sequence (no queries) is the reference at every position
    h = torch.randn(7, FEATURES + WAYS, dtype=torch.float64)
    torch.testing.assert_close(learner.sequence(h, 7), reference_sequence(learner, h), rtol=1e-12, atol=1e-12)


def test_depth_and_widths_follow_the_paper():
    learner = SNAIL(allmap.nets.Conv4(out_features=64), y_dim=5)  # 5-way 1-shot: T = 6, ceil(log2 6) = 3
    kinds = [type(b).__name__ for b in learner.blocks]
    assert kinds == ["AttentionBlock", "TCBlock", "AttentionBlock", "TCBlock", "AttentionBlock"]
    assert [len(b.blocks) for b in learner.blocks if isinstance(b, TCBlock)] == [3, 3]
    assert [d.dilation for d in learner.blocks[1].blocks] == [2, 4, 8]
    assert [(b.key_size, b.value.out_features) for b in learner.blocks if isinstance(b, AttentionBlock)] == [
        (64, 32),
        (256, 128),
        (512, 256),
    ]
    assert learner.out.in_features == 64 + 5 + 32 + 3 * 128 + 128 + 3 * 128 + 256
    assert len(SNAIL(allmap.nets.Conv4(out_features=64), y_dim=20).blocks[1].blocks) == 5  # T = 21


def test_causal_an_earlier_output_ignores_later_elements():
    learner = tiny()
    h = torch.randn(8, FEATURES + WAYS, dtype=torch.float64)
    base = learner.sequence(h, 8)
    for t in range(8):
        changed = h.clone()
        changed[t] += 1.0
        out = learner.sequence(changed, 8)
        torch.testing.assert_close(out[:t], base[:t], rtol=0, atol=0)
        assert (out[t] - base[t]).abs().max() > 1e-6  # the element itself does count
    # with queries after a support prefix of 5: a query changes neither the support outputs nor another query
    base = learner.sequence(h, 5)
    changed = h.clone()
    changed[6] += 1.0
    out = learner.sequence(changed, 5)
    torch.testing.assert_close(out[[0, 1, 2, 3, 4, 5, 7]], base[[0, 1, 2, 3, 4, 5, 7]], rtol=0, atol=0)
    assert (out[6] - base[6]).abs().max() > 1e-6


def test_attention_is_a_softmax_over_the_keys():
    torch.manual_seed(0)
    block = AttentionBlock(4, 3, 2).double()
    h = torch.randn(2, 6, 4, dtype=torch.float64)
    p = block.weights(h, 6)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 6, dtype=torch.float64), rtol=0, atol=1e-14)
    assert torch.all(p.triu(1) == 0)  # no weight on later positions
    assert not torch.allclose(p.sum(-2), torch.ones(2, 6, dtype=torch.float64))  # columns (queries) do not sum to 1
    logits = block.query(h[0, 4]) @ block.key(h[0, :5]).T / math.sqrt(3)
    torch.testing.assert_close(p[0, 4, :5], torch.softmax(logits, 0), rtol=1e-12, atol=1e-14)
    # queries after a prefix of 4: each sees the 4 support positions and itself
    p = block.weights(h, 4)
    assert torch.equal(p[:, 5, 4], torch.zeros(2, dtype=torch.float64)) and torch.all(p[:, 5, [0, 1, 2, 3, 5]] > 0)


def test_masks_and_shifts_are_built_on_the_inputs_device():
    meta = torch.device("meta")
    assert causal_mask(5, 3, meta).device == meta
    block = AttentionBlock(4, 3, 2).to(meta)
    assert block(torch.empty(2, 5, 4, device=meta), 3).device == meta
    dense = DenseBlock(4, 2, 3).to(meta)
    assert dense(torch.empty(2, 5, 4, device=meta), 3).shape == (2, 5, 7)
    assert causal_mask(4, 2, torch.device("cpu")).tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [True, True, False, True],
    ]


def test_delayed_reads_the_past_and_each_query_the_support_prefix():
    h = torch.arange(1.0, 7.0).view(6, 1)  # 4 support positions (1..4), then 2 queries (5, 6)
    assert delayed(h, 2, 4).flatten().tolist() == [0, 0, 1, 2, 3, 3]
    assert delayed(h, 4, 4).flatten().tolist() == [0, 0, 0, 0, 1, 1]
    assert delayed(h, 8, 4).flatten().tolist() == [0, 0, 0, 0, 0, 0]


def test_float64_gradcheck_of_the_sequence_and_the_meta_loss():
    learner = tiny()
    ys = torch.tensor([0, 0, 1, 1, 2, 2])
    zs = torch.randn(6, FEATURES, dtype=torch.float64, requires_grad=True)
    zq = torch.randn(3, FEATURES, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: learner.scores(a, ys, b), (zs, zq), eps=1e-6, atol=1e-8)
    tasks = allmap.tasks.Episodes(allmap.tasks.gaussian_classes(), ways=WAYS, shots=2, queries=2)
    batch = tasks.sample(2, torch.Generator().manual_seed(0)).to(dtype=torch.float64)
    names = [n for n, _ in learner.named_parameters()]
    base = {n: p.detach().clone().requires_grad_() for n, p in learner.named_parameters()}

    def f(*params: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(learner, dict(zip(names, params)), (batch,))

    # fast mode: the analytic gradient against central differences along random directions
    assert torch.autograd.gradcheck(f, tuple(base.values()), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_bfloat16_sequence_is_close_and_float64_is_never_cast():
    learner = tiny(dtype=torch.float32)
    zs, zq, ys = torch.randn(6, FEATURES), torch.randn(2, FEATURES), torch.tensor([0, 0, 1, 1, 2, 2])
    exact = learner.scores(zs, ys, zq)
    learner.precision = "bfloat16"
    mixed = learner.scores(zs, ys, zq)
    assert mixed.dtype == torch.float32 and not torch.equal(mixed, exact)
    torch.testing.assert_close(mixed, exact, rtol=0.05, atol=0.05)
    double = tiny()
    double.precision = "bfloat16"
    torch.testing.assert_close(double.scores(zs.double(), ys, zq.double()), exact.double(), rtol=1e-5, atol=1e-6)


def test_errors_say_what_was_expected():
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, FEATURES))
    with pytest.raises(ValueError, match="loss='cross_entropy'"):
        SNAIL(enc, y_dim=3, loss="mse")
    with pytest.raises(ValueError, match=r"three \(key_size, value_size\) pairs"):
        SNAIL(enc, y_dim=3, attention=[[4, 2]])
    with pytest.raises(ValueError, match="precision"):
        SNAIL(enc, y_dim=3, precision="float16")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        SNAIL("conv4", y_dim=3)
    learner = SNAIL(enc, y_dim=3, features=8)
    tasks = allmap.tasks.Episodes(allmap.tasks.gaussian_classes(), ways=3, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"Set learner.features to the model's output size"):
        learner.meta_loss(tasks.sample(2, torch.Generator().manual_seed(0)))


def test_presets_name_the_protocol():
    five, twenty = load_config("omniglot-5w1s-snail"), load_config("omniglot-20w1s-snail")
    for config, ways in ((five, 5), (twenty, 20)):
        assert config["learner"]["name"] == "snail" and config["task"]["protocol"] == "standard"
        assert config["task"]["ways"] == config["eval"]["ways"] == ways and config["task"]["shots"] == 1
        assert config["model"]["out_features"] == config["learner"]["features"] == 64


@needs_omniglot
def test_omniglot_smoke_train_and_eval(tmp_path, capsys):
    tiny_run = [
        "iterations=3",
        "meta_batch=2",
        "model.hidden=8",
        "learner.filters=8",
        "learner.attention=[[8,4],[8,4],[8,4]]",
        "eval.tasks=6",
        "eval.val_tasks=4",
        "eval.queries=2",
        "eval.every=3",
        "log_every=1",
        "checkpoint_every=3",
    ]
    args = ["train", "omniglot-5w1s-snail", "--out", str(tmp_path / "run")]
    assert main(args + [a for s in tiny_run for a in ("--set", s)]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "5-way 1-shot, 2 queries" in results["protocol"] and "vinyals-test" in results["protocol"]
    assert results["metrics"]["accuracy"]["n"] == 6 and 0 <= results["metrics"]["accuracy"]["mean"] <= 1
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--tasks", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metrics"]["accuracy"]["n"] == 4
