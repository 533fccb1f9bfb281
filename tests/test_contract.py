"""The contract every learner meets. A new learner joins with one line in CASES.

Each case is ``name -> factory(dtype) -> (learner, family)`` built with a fixed seed. The suite checks:
the learner learns its toy task, runs in float64, the vectorised meta-batch equals the per-task loop
(value and meta-gradient), its inputs are left unchanged, and its state dict round-trips.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import allmap
from _util import assert_vmap_equals_loop
from allmap.nets import MLP
from allmap.tasks import Episodes, LinearRegression, Logistic2D, Sinusoid, gaussian_classes


def _sine_mlp() -> MLP:
    return MLP([1, 32, 32, 1])


def _flat_mlp() -> torch.nn.Module:  # an encoder for the [1, 4, 4] "images" of gaussian_classes
    return torch.nn.Sequential(torch.nn.Flatten(), MLP([16, 32, 8]))


CASES: dict[str, Callable[[], tuple[allmap.Learner, object]]] = {
    "maml": lambda: (allmap.MAML(_sine_mlp(), inner_lr=0.01, inner_steps=2), Sinusoid(shots=5, queries=5)),
    "fomaml": lambda: (allmap.MAML(_sine_mlp(), inner_lr=0.01, first_order=True), Sinusoid(shots=5, queries=5)),
    "maml-adam": lambda: (allmap.MAML(_sine_mlp(), inner_lr=0.01, inner_steps=2, inner_optimizer="adam"),
                          Sinusoid(shots=5, queries=5)),
    "anil": lambda: (allmap.ANIL(_sine_mlp(), inner_lr=0.01, inner_steps=2), Sinusoid(shots=5, queries=5)),
    "metasgd": lambda: (allmap.MetaSGD(MLP([2, 2]), inner_lr=0.1, loss="cross_entropy"), Logistic2D(shots=10)),
    "hypernet": lambda: (allmap.HyperNetwork(MLP([4, 1]), x_dim=4, y_dim=1, hidden=32),
                         LinearRegression(dim=4, shots=10)),
    "hypernet+steps": lambda: (allmap.HyperNetwork(MLP([2, 2]), x_dim=2, y_dim=2, hidden=16, inner_steps=1,
                                                   inner_lr=0.1, loss="cross_entropy"), Logistic2D(shots=10)),
    "reptile": lambda: (allmap.Reptile(_sine_mlp(), inner_lr=0.02, inner_steps=5), Sinusoid(shots=5, queries=5)),
    "imaml": lambda: (allmap.IMAML(_sine_mlp(), lam=2.0, inner_lr=0.02, inner_steps=3, on_fail="ignore"),
                      Sinusoid(shots=5, queries=5)),
    "lstm": lambda: (allmap.LSTMMetaLearner(MLP([1, 16, 16, 1]), inner_steps=2, hidden=4), Sinusoid(shots=5, queries=5)),
    "protonet": lambda: (allmap.ProtoNet(_flat_mlp()), Episodes(gaussian_classes(), ways=5, shots=2, queries=3)),
    "matching": lambda: (allmap.MatchingNet(_flat_mlp(), scale=5.0), Episodes(gaussian_classes(), ways=5, shots=2, queries=3)),
    "siamese": lambda: (allmap.Siamese(_flat_mlp(), features=8), Episodes(gaussian_classes(), ways=5, shots=2, queries=3)),
}


def make(name: str, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    learner, family = CASES[name]()
    return learner.to(dtype), family


def tasks_of(family, n: int = 6, seed: int = 1, dtype: torch.dtype = torch.float32) -> allmap.TaskBatch:
    return family.sample(n, torch.Generator().manual_seed(seed)).to(dtype=dtype)


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
    assert after < 0.8 * before, f"{name}: held-out meta-loss {before:.4f} -> {after:.4f}"


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
