"""Task families are seeded and deterministic; bad input raises clear errors naming what was expected."""

from __future__ import annotations

import math

import pytest
import torch

import allmap
from allmap.nets import MLP
from allmap.tasks import LinearRegression, Logistic2D, Sinusoid, TaskBatch


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_sinusoid_protocol_ranges_and_targets():
    tasks = Sinusoid(shots=10, queries=7).sample(500, gen())
    assert tasks.support_x.shape == (500, 10, 1) and tasks.query_y.shape == (500, 7, 1)
    a, phi = tasks.info["amplitude"], tasks.info["phase"]
    assert 0.1 <= a.min() and a.max() <= 5.0 and 0 <= phi.min() and phi.max() <= math.pi
    assert -5 <= tasks.support_x.min() and tasks.support_x.max() <= 5
    expected = a[:, None, None] * torch.sin(tasks.query_x - phi[:, None, None])
    torch.testing.assert_close(tasks.query_y, expected)
    assert abs(a.mean().item() - 2.55) < 0.15  # U[0.1, 5]


def test_families_are_seeded():
    for family in (Sinusoid(), LinearRegression(dim=3), Logistic2D()):
        a, b, c = family.sample(4, gen(1)), family.sample(4, gen(1)), family.sample(4, gen(2))
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
        assert not torch.equal(a.support_x, c.support_x)


def test_linear_regression_noise_level_and_logistic_labels():
    fam = LinearRegression(dim=5, shots=200, queries=1, noise=0.1)
    tasks = fam.sample(50, gen())
    resid = tasks.support_y - fam.target(tasks.info, tasks.support_x)
    assert abs(resid.std().item() - 0.1) < 0.01
    lt = Logistic2D(shots=400, queries=1, scale=100.0).sample(20, gen())
    assert lt.support_y.dtype == torch.long and set(lt.support_y.unique().tolist()) <= {0, 1}
    agree = (lt.support_y == (Logistic2D(scale=100.0).target(lt.info, lt.support_x) > 0).long()).float().mean()
    assert agree > 0.97  # nearly separable at a large scale


def test_task_batch_validation_messages():
    x, y = torch.zeros(2, 5, 1), torch.zeros(2, 5, 1)
    with pytest.raises(ValueError, match=r"support_x \[2, 5, 1\] and support_y \[2, 4, 1\] must have the same number"):
        TaskBatch(x, torch.zeros(2, 4, 1), x, y)
    with pytest.raises(ValueError, match="same number of tasks"):
        TaskBatch(x, y, torch.zeros(3, 5, 1), torch.zeros(3, 5, 1))
    with pytest.raises(ValueError, match="same example shape"):
        TaskBatch(x, y, torch.zeros(2, 5, 2), y)
    with pytest.raises(ValueError, match=r"shape \[tasks, examples, ...\].*unsqueeze"):
        TaskBatch(torch.zeros(5), y, x, y)
    with pytest.raises(TypeError, match="expected query_y to be a torch.Tensor"):
        TaskBatch(x, y, x, [1, 2])
    batch = TaskBatch(x, y, x, y, {"a": torch.arange(2.0)})
    assert len(batch[1]) == 1 and batch[1].info["a"].item() == 1.0 and len(batch.chunks(1)) == 2


def test_regression_target_shape_mismatch_is_clear():
    learner = allmap.MAML(MLP([1, 4, 1]))
    t = Sinusoid(shots=3, queries=3).sample(2, gen())
    bad = TaskBatch(t.support_x, t.support_y[..., 0], t.query_x, t.query_y[..., 0])
    with pytest.raises(ValueError, match=r"mse would broadcast them.*unsqueeze\(-1\)"):
        learner.meta_loss(bad)


def test_labels_out_of_range_and_float_labels():
    learner = allmap.MAML(MLP([2, 2]), loss="cross_entropy")
    t = Logistic2D(shots=4, queries=4).sample(2, gen())
    with pytest.raises(
        ValueError, match=r"labels must lie in \[0, 1\] for a model with 2 outputs, got labels in \[0, 6\]"
    ):
        learner.meta_loss(TaskBatch(t.support_x, t.support_y, t.query_x, t.query_y + 5))
    with pytest.raises(ValueError, match="integer class labels"):
        learner.meta_loss(TaskBatch(t.support_x, t.support_y.float(), t.query_x, t.query_y.float()))


def test_constructor_errors():
    with pytest.raises(TypeError, match="expected model to be a torch.nn.Module"):
        allmap.MAML("not a model")
    with pytest.raises(ValueError, match="inner_steps to be an integer >= 0"):
        allmap.MAML(MLP([1, 1]), inner_steps=-1)
    with pytest.raises(ValueError, match="unknown inner_optimizer 'rmsprop'"):
        allmap.MAML(MLP([1, 1]), inner_optimizer="rmsprop")
    with pytest.raises(ValueError, match=r"no parameter of the model matches \['classifier'\].*\['body', 'head'\]"):
        allmap.ANIL(MLP([1, 4, 1]), head="classifier")
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        allmap.MAML(MLP([1, 1]), loss="l1")
    with pytest.raises(ValueError, match="positive integer"):
        Sinusoid(shots=0)
    with pytest.raises(ValueError, match="x_dim"):
        allmap.HyperNetwork(MLP([3, 1]), x_dim=2, y_dim=1).meta_loss(LinearRegression(dim=3).sample(2, gen()))
    with pytest.raises(TypeError, match="meta_loss: expected an allmap.TaskBatch"):
        allmap.MAML(MLP([1, 1])).meta_loss((1, 2, 3, 4))


def test_anil_adapts_only_the_head():
    net = MLP([1, 8, 1])
    learner = allmap.ANIL(net, inner_lr=0.1, inner_steps=2)
    t = Sinusoid(shots=5).sample(1, gen())
    model = learner.adapt(t.support_x[0], t.support_y[0])
    assert sorted(model.params) == ["head.bias", "head.weight"]
    assert not torch.equal(model.params["head.weight"], net.head.weight)


def test_hypernet_output_is_permutation_invariant():
    torch.manual_seed(0)
    learner = allmap.HyperNetwork(MLP([3, 1]), x_dim=3, y_dim=1, hidden=16)
    with torch.no_grad():
        for p in learner.rho.parameters():
            p.normal_()
    t = LinearRegression(dim=3, shots=7).sample(1, gen())
    perm = torch.randperm(7)
    a = learner.adapt(t.support_x[0], t.support_y[0]).params
    b = learner.adapt(t.support_x[0][perm], t.support_y[0][perm]).params
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert not torch.allclose(a["head.weight"], learner.model.head.weight)


def test_mlp_options_and_errors():
    torch.manual_seed(0)
    net = MLP([1, 40, 40, 1], init="maml", norm="batch")
    assert abs(net.head.weight.std().item() - 0.0088) < 0.003 and net.head.bias.abs().max() == 0
    assert net.head.weight.abs().max() <= 0.02  # truncated at two standard deviations
    assert any(type(m).__name__ == "BatchStatNorm" for m in net.modules())
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        MLP([1, 1], init="xavier")
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        MLP([1, 4, 1], norm="layer")
    with pytest.raises(ValueError, match="list of at least two positive integers"):
        MLP([3])


def test_shot_range_draws_one_k_per_meta_batch_reproducibly():
    fam = LinearRegression(dim=2, shots=[3, 9], queries=4)
    assert fam.shots == (3, 9)
    ks = [fam.sample(5, gen(s)).shots for s in range(40)]
    assert min(ks) >= 3 and max(ks) <= 9 and len(set(ks)) > 3
    assert ks == [fam.sample(5, gen(s)).shots for s in range(40)]
    assert all(fam.sample(5, gen(s)).query_x.shape[1] == 4 for s in range(5))
    with pytest.raises(ValueError, match=r"lo <= hi, got \[9, 3\]"):
        LinearRegression(shots=[9, 3])
    with pytest.raises(ValueError, match="integer or a range"):
        Sinusoid(shots=[1, 2, 3])
