"""Differentiable architecture search (DARTS; Liu, Simonyan & Yang, ICLR 2019) on a small cell, and random
search over the same cells.

The cell has ``nodes`` intermediate nodes; node ``i`` sums an operation applied to each earlier state (the
cell input and nodes ``1..i-1``), and the cell outputs the mean of its nodes. During the search every edge
is a mixture ``sum_o softmax(alpha_edge)_o op_o(x)`` over :data:`OPS`; the architecture ``alpha`` is learned on
the validation split and the weights ``w`` on the train split, alternately:

    alpha <- alpha - eta_alpha grad_alpha L_val(w - xi grad_w L_train(w, alpha), alpha)
    w     <- w - eta_w grad_w L_train(w, alpha)

First order sets ``xi = 0``. Second order (``xi`` = the weights' learning rate) expands the chain rule to
``grad_alpha L_val(w', alpha) - xi grad^2_{alpha,w} L_train(w, alpha) grad_w' L_val(w', alpha)`` and computes
the mixed second derivative as the paper does, by the central difference of ``grad_alpha L_train`` along
``v = grad_w' L_val`` with step ``0.01 / ||v||`` (:func:`allmap.hypergrad.directional_difference`).

The found cell keeps, for each node, its ``keep`` strongest incoming edges (strength: the largest weight of an
operation other than ``none``) with their strongest operation. :func:`random_cell` draws a cell of the same
form uniformly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allmap.automl.data import Split
from allmap.automl.training import minibatches
from allmap.checks import check_int
from allmap.hypergrad.finite_difference import directional_difference

__all__ = ["OPS", "Genotype", "SearchNetwork", "CellNetwork", "search", "random_cell", "SearchResult"]


def _conv(channels: int, kernel: int, dilation: int = 1) -> nn.Module:
    pad = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(channels, channels, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(channels, affine=False, track_running_stats=False),
    )


class _Zero(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


OPS = {
    "none": lambda c: _Zero(),
    "skip": lambda c: nn.Identity(),
    "conv3": lambda c: _conv(c, 3),
    "conv5": lambda c: _conv(c, 5),
    "dil3": lambda c: _conv(c, 3, dilation=2),
    "avg3": lambda c: nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
    "max3": lambda c: nn.MaxPool2d(3, stride=1, padding=1),
}


def _edges(nodes: int) -> list[tuple[int, int]]:
    """``(source state, node)`` pairs; state 0 is the cell input, node ``i`` is state ``i``."""
    return [(j, i) for i in range(1, nodes + 1) for j in range(i)]


@dataclass(frozen=True)
class Genotype:
    """A discrete cell: for each node, the ``(source state, operation)`` of its kept incoming edges."""

    nodes: tuple[tuple[tuple[int, str], ...], ...]

    def __str__(self) -> str:
        return "; ".join(f"n{i + 1}=" + "+".join(f"{op}(s{j})" for j, op in node) for i, node in enumerate(self.nodes))


class _Backbone(nn.Module):
    """Stem convolution, ``cells`` cells, global average pooling and a linear classifier."""

    def __init__(self, in_channels: int, channels: int, classes: int, cells: list[nn.Module]) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels, affine=False, track_running_stats=False),
        )
        self.cells = nn.ModuleList(cells)
        self.head = nn.Linear(channels, classes)

    def features(self, x: Tensor, run_cell) -> Tensor:
        s = self.stem(x)
        for cell in self.cells:
            s = run_cell(cell, s)
        return self.head(s.mean(dim=(2, 3)))


class SearchNetwork(_Backbone):
    """The over-parameterised network of the search: every edge of every cell is a softmax-weighted mixture of
    :data:`OPS`; the cells share the architecture ``alpha [edges, ops]``."""

    def __init__(self, in_channels: int, classes: int, channels: int = 8, cells: int = 2, nodes: int = 3) -> None:
        edges = _edges(check_int("SearchNetwork", "nodes", nodes))
        super().__init__(in_channels, channels, classes, [_mixed_cell(len(edges), channels) for _ in range(cells)])
        self.edges, self.nodes = edges, nodes
        self.alpha = nn.Parameter(1e-3 * torch.randn(len(self.edges), len(OPS)))

    def weights(self) -> dict[str, Tensor]:
        return {k: p for k, p in self.named_parameters() if k != "alpha"}

    def forward(self, x: Tensor) -> Tensor:
        mix = F.softmax(self.alpha, dim=-1)

        def run(cell: nn.ModuleList, s: Tensor) -> Tensor:
            states = [s]
            for i in range(1, self.nodes + 1):
                total = 0
                for e, (j, node) in enumerate(self.edges):
                    if node == i:
                        total = total + sum(mix[e, o] * op(states[j]) for o, op in enumerate(cell[e]))
                states.append(total)
            return torch.stack(states[1:]).mean(0)

        return self.features(x, run)

    def genotype(self, keep: int = 2) -> Genotype:
        """The discrete cell DARTS derives from ``alpha`` (see the module docstring)."""
        names = list(OPS)
        weights = F.softmax(self.alpha.detach(), dim=-1)
        nodes = []
        for i in range(1, self.nodes + 1):
            incoming = [(e, j) for e, (j, node) in enumerate(self.edges) if node == i]
            scored = []
            for e, j in incoming:
                o = max((o for o in range(len(names)) if names[o] != "none"), key=lambda o: float(weights[e, o]))
                scored.append((float(weights[e, o]), j, names[o]))
            scored.sort(reverse=True)
            nodes.append(tuple(sorted((j, op) for _, j, op in scored[:keep])))
        return Genotype(tuple(nodes))


def _mixed_cell(edges: int, channels: int) -> nn.ModuleList:
    """Every operation of :data:`OPS` on each of ``edges`` edges."""
    return nn.ModuleList(nn.ModuleList(make(channels) for make in OPS.values()) for _ in range(edges))


class CellNetwork(_Backbone):
    """The network of a discrete cell (:class:`Genotype`), trained from scratch to score the cell."""

    def __init__(self, genotype: Genotype, in_channels: int, classes: int, channels: int = 8, cells: int = 2) -> None:
        built = [
            nn.ModuleList(nn.ModuleList(OPS[op](channels) for _, op in node) for node in genotype.nodes)
            for _ in range(cells)
        ]
        super().__init__(in_channels, channels, classes, built)
        self.genotype = genotype

    def forward(self, x: Tensor) -> Tensor:
        def run(cell: nn.ModuleList, s: Tensor) -> Tensor:
            states = [s]
            for node, ops in zip(self.genotype.nodes, cell):
                states.append(sum(op(states[j]) for (j, _), op in zip(node, ops)))
            return torch.stack(states[1:]).mean(0)

        return self.features(x, run)


def random_cell(nodes: int, generator: torch.Generator, keep: int = 2) -> Genotype:
    """A cell drawn uniformly: each node keeps ``min(keep, i)`` distinct earlier states, each with an operation
    other than ``none``."""
    names = [n for n in OPS if n != "none"]
    out = []
    for i in range(1, nodes + 1):
        sources = torch.randperm(i, generator=generator)[: min(keep, i)].tolist()
        ops = torch.randint(len(names), (len(sources),), generator=generator).tolist()
        out.append(tuple(sorted((j, names[o]) for j, o in zip(sources, ops))))
    return Genotype(tuple(out))


@dataclass
class SearchResult:
    """The derived cell, the architecture weights' trajectory (softmax per epoch) and the CPU seconds spent."""

    genotype: Genotype
    alphas: list[list[list[float]]]
    val_loss: list[float]
    cpu_seconds: float


def _loss(net: SearchNetwork, w: dict[str, Tensor], alpha: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(torch.func.functional_call(net, {**w, "alpha": alpha}, (x,)), y)


def architecture_gradient(
    net: SearchNetwork, batch: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], xi: float, fd_scale: float = 0.01
) -> Tensor:
    """``d L_val / d alpha`` of DARTS: first order for ``xi = 0``, else the second-order gradient with the
    finite-difference Hessian-vector product of step ``fd_scale / ||v||`` (module docstring; the paper's 0.01
    steps across ReLU and max-pool kinks, a smaller one approaches the exact product in float64)."""
    w = {k: p.detach() for k, p in net.weights().items()}
    alpha = net.alpha.detach()
    if xi == 0:
        return torch.func.grad(lambda a: _loss(net, w, a, *val))(alpha)
    g_train = torch.func.grad(lambda p: _loss(net, p, alpha, *batch))(w)
    moved = {k: w[k] - xi * g_train[k] for k in w}
    g_w, g_alpha = torch.func.grad(lambda p, a: _loss(net, p, a, *val), argnums=(0, 1))(moved, alpha)
    norm = torch.sqrt(sum((g**2).sum() for g in g_w.values()))
    eps = fd_scale / float(norm.clamp_min(1e-12))
    mixed = directional_difference(
        lambda p: {"alpha": torch.func.grad(lambda a: _loss(net, p, a, *batch))(alpha)}, w, g_w, eps
    )["alpha"]
    return g_alpha - xi * mixed


def search(
    net: SearchNetwork,
    split: Split,
    epochs: int = 10,
    order: int = 1,
    batch_size: int = 64,
    lr: float = 0.05,
    alpha_lr: float = 3e-3,
    seed: int = 0,
) -> SearchResult:
    """Alternate architecture steps on validation minibatches and weight steps on training minibatches (SGD
    with momentum 0.9 and a cosine schedule for ``w``, Adam with betas (0.5, 0.999) and weight decay 1e-3 for
    ``alpha``, as in Liu et al. 2019). ``order`` 1 or 2."""
    if order not in (1, 2):
        raise ValueError(f"search: expected order 1 (first order) or 2 (second order), got {order!r}.")
    g = torch.Generator().manual_seed(seed)
    w_opt = torch.optim.SGD(net.weights().values(), lr=lr, momentum=0.9, weight_decay=3e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, epochs)
    a_opt = torch.optim.Adam([net.alpha], lr=alpha_lr, betas=(0.5, 0.999), weight_decay=1e-3)
    alphas, val_losses, start = [], [], time.process_time()
    n_val = len(split.y_val)
    for _ in range(epochs):
        for idx in minibatches(len(split.y_train), batch_size, g):
            batch = split.x_train[idx], split.y_train[idx]
            v = torch.randint(n_val, (batch_size,), generator=g)
            xi = w_opt.param_groups[0]["lr"] if order == 2 else 0.0
            a_opt.zero_grad()
            net.alpha.grad = architecture_gradient(net, batch, (split.x_val[v], split.y_val[v]), xi)
            a_opt.step()
            w_opt.zero_grad()
            F.cross_entropy(net(batch[0]), batch[1]).backward()
            net.alpha.grad = None
            w_opt.step()
        schedule.step()
        alphas.append(F.softmax(net.alpha.detach(), -1).tolist())
        with torch.no_grad():
            val_losses.append(float(F.cross_entropy(net(split.x_val), split.y_val)))
    return SearchResult(net.genotype(), alphas, val_losses, time.process_time() - start)
