"""Minibatch training of an ``nn.Module`` on a :class:`~allmap.automl.data.Split` with any torch optimizer: the
loop that the online methods (hypergradient descent, example reweighting) and the architecture search share,
and their untuned baselines."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allmap.automl.data import Split
from allmap.checks import check_int

__all__ = ["Curve", "minibatches", "fit", "score"]

#: ``weights(model, x, y) -> per-example loss weights`` for one minibatch (uniform when not given)
Weighting = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass
class Curve:
    """Per epoch: process CPU seconds since the start, validation loss and accuracy, and each optimizer
    group's learning rate; the final test loss and accuracy."""

    cpu_seconds: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    test_loss: float = float("nan")
    test_accuracy: float = float("nan")


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Indices of one epoch over ``n`` examples in random order, ``batch_size`` at a time."""
    order = torch.randperm(n, generator=generator)
    yield from order.split(batch_size)


def score(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """``(cross-entropy, accuracy)`` of ``model`` on ``(x, y)``, in evaluation mode."""
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train(was)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(-1) == y).float().mean())


def fit(
    model: nn.Module,
    split: Split,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int = 128,
    seed: int = 0,
    weights: Weighting | None = None,
) -> Curve:
    """Train ``model`` on ``split.x_train`` for ``epochs`` epochs of minibatches; the loss of a minibatch is
    ``sum_i w_i CE_i`` with ``w = weights(model, x, y)`` if given, else the mean cross-entropy."""
    check_int("fit", "epochs", epochs)
    g = torch.Generator().manual_seed(seed)
    curve, start = Curve(), time.process_time()
    for _ in range(epochs):
        for idx in minibatches(len(split.y_train), batch_size, g):
            x, y = split.x_train[idx], split.y_train[idx]
            w = weights(model, x, y) if weights is not None else None
            optimizer.zero_grad()
            losses = F.cross_entropy(model(x), y, reduction="none")
            loss = (w * losses).sum() if w is not None else losses.mean()
            loss.backward()
            optimizer.step()
        val_loss, val_acc = score(model, split.x_val, split.y_val)
        curve.cpu_seconds.append(time.process_time() - start)
        curve.val_loss.append(val_loss)
        curve.val_accuracy.append(val_acc)
        curve.lr.append(float(optimizer.param_groups[0]["lr"]))
    curve.test_loss, curve.test_accuracy = score(model, split.x_test, split.y_test)
    return curve
