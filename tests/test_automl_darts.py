"""DARTS: the finite-difference mixed Hessian-vector product against autograd, the second-order architecture
gradient against the exact one, and the derived and random cells' form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from allmap.automl import digits
from allmap.automl.darts import OPS, CellNetwork, SearchNetwork, architecture_gradient, random_cell, search
from allmap.hypergrad import directional_difference


@pytest.fixture(scope="module")
def tiny():
    s = digits(seed=0, flat=False)
    return s, (s.x_train[:16].double(), s.y_train[:16]), (s.x_val[:16].double(), s.y_val[:16])


def _net():
    torch.manual_seed(0)
    net = SearchNetwork(1, 10, channels=4, cells=1, nodes=2).double()
    with torch.no_grad():
        net.alpha.normal_()
    return net


def test_directional_difference_is_a_hessian_vector_product():
    a = torch.randn(3, dtype=torch.float64)
    p = {"w": torch.randn(4, dtype=torch.float64)}
    d = {"w": torch.randn(4, dtype=torch.float64)}
    m = torch.randn(3, 4, dtype=torch.float64)

    def loss(w, a):
        return torch.tanh(m @ w).dot(a) ** 2

    approx = directional_difference(lambda q: {"a": torch.func.grad(loss, argnums=1)(q["w"], a)}, p, d, 1e-5)["a"]
    exact = torch.func.jvp(lambda w: torch.func.grad(loss, argnums=1)(w, a), (p["w"],), (d["w"],))[1]
    torch.testing.assert_close(approx, exact, rtol=1e-7, atol=1e-9)


def test_second_order_architecture_gradient_matches_autograd_through_the_look_ahead_step(tiny):
    _, batch, val = tiny
    net = _net()
    xi = 0.05
    w = {k: p.detach() for k, p in net.weights().items()}

    def unrolled(a):
        train = lambda p: F.cross_entropy(torch.func.functional_call(net, {**p, "alpha": a}, (batch[0],)), batch[1])  # noqa: E731
        g = torch.func.grad(train)(w)
        moved = {k: w[k] - xi * g[k] for k in w}
        return F.cross_entropy(torch.func.functional_call(net, {**moved, "alpha": a}, (val[0],)), val[1])

    exact = torch.func.grad(unrolled)(net.alpha.detach())
    approx = architecture_gradient(net, batch, val, xi, fd_scale=1e-6)
    torch.testing.assert_close(approx, exact, rtol=1e-6, atol=1e-9)
    paper = architecture_gradient(net, batch, val, xi)  # the paper's step 0.01 / ||v||: close, not exact
    assert float((paper - exact).norm() / exact.norm()) < 0.05
    first = architecture_gradient(net, batch, val, 0.0)
    direct = torch.func.grad(
        lambda a: F.cross_entropy(torch.func.functional_call(net, {**w, "alpha": a}, (val[0],)), val[1])
    )(net.alpha.detach())
    torch.testing.assert_close(first, direct)


def test_search_derives_a_cell_that_trains_and_random_cells_have_its_form(tiny):
    split = tiny[0]
    torch.manual_seed(0)
    net = SearchNetwork(1, 10, channels=4, cells=1, nodes=3)
    small = type(split)(
        split.x_train[:128],
        split.y_train[:128],
        split.x_val[:64],
        split.y_val[:64],
        split.x_test[:64],
        split.y_test[:64],
        10,
    )
    result = search(net, small, epochs=1, order=2, batch_size=32)
    g = result.genotype
    assert [len(n) for n in g.nodes] == [1, 2, 2]
    assert all(op in OPS and op != "none" and j < i + 1 for i, n in enumerate(g.nodes) for j, op in n)
    assert len(result.alphas) == 1 and len(result.alphas[0]) == 6
    out = CellNetwork(g, 1, 10, channels=4, cells=1)(small.x_test)
    assert out.shape == (64, 10)
    cell = random_cell(3, torch.Generator().manual_seed(0))
    assert [len(n) for n in cell.nodes] == [1, 2, 2] and all(len({j for j, _ in n}) == len(n) for n in cell.nodes)
    with pytest.raises(ValueError, match="expected order 1"):
        search(net, small, order=3)
