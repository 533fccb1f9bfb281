"""Heads learned on continual streams of frozen features, and the metrics of continual learning.

A representation meta-learned by OML or ANML is frozen at meta-test: only a head learns, from the stream.
The representation's features of every image are therefore computed once, and the heads below run on them,
many runs at a time (a leading run dimension ``R``):

* :func:`online_linear`: a fresh linear head (Kaiming normal weights, zero bias, as the OML code resets it)
  learned in one pass, one example per step, by Adam or SGD on the cross-entropy (the continual meta-test of
  the OML code, ``evaluate_omniglot.py``);
* :func:`nearest_mean`: the streaming nearest-class-mean head, whose prototypes are running means (one pass,
  exact, no learning rate);
* :func:`offline_linear`: the i.i.d. upper bound, a linear head trained offline on the same examples
  (many shuffled passes);
* :func:`online_regression`: a scalar linear head learned by SGD on the squared error, one example per
  step (incremental sine regression; a shuffled, repeated stream gives its offline upper bound).

Metrics, as Avalanche (Lomonaco et al. 2021) defines them over *experiences* (groups of consecutive classes
of the stream), from ``acc[k, c]``, the accuracy on class ``c`` after experience ``k``
(:func:`continual_metrics`): the average accuracy over the classes seen after each experience, the
forgetting of each class (its best accuracy during the stream minus its final accuracy) and the backward
transfer (final accuracy minus the accuracy just after the class was learned).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from allmap.checks import check_int
from allmap.compat import adam_step_

__all__ = [
    "LinearHeads",
    "online_linear",
    "online_regression",
    "offline_linear",
    "nearest_mean",
    "nearest_mean_predict",
    "experience_ends",
    "continual_metrics",
    "OPTIMIZERS",
]

OPTIMIZERS = ("adam", "sgd")
BETAS = (0.9, 0.999)
EPS = 1e-8


@dataclass(frozen=True)
class LinearHeads:
    """``R`` linear heads ``weight [R, K, F]``, ``bias [R, K]``: ``logits = x @ weight^T + bias``."""

    weight: Tensor
    bias: Tensor

    def logits(self, x: Tensor) -> Tensor:
        """``x [R, M, F]`` -> ``[R, M, K]``."""
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))

    def predict(self, x: Tensor, classes: int | None = None) -> Tensor:
        """Predicted labels ``[R, M]``, over the first ``classes`` outputs (default: all)."""
        logits = self.logits(x)
        return (logits if classes is None else logits[..., :classes]).argmax(-1)


def fresh_heads(runs: int, classes: int, features: int, like: Tensor, generator: torch.Generator) -> LinearHeads:
    """Kaiming-normal weights (std ``sqrt(2 / F)``) and zero biases, as the OML code resets its head."""
    w = torch.randn(runs, classes, features, generator=generator, dtype=like.dtype)
    return LinearHeads((w * math.sqrt(2.0 / features)).to(like.device), like.new_zeros(runs, classes))


def _check_stream(x: Tensor, y: Tensor) -> None:
    if x.dim() != 3 or y.shape != x.shape[:2]:
        raise ValueError(
            f"expected features x [runs, examples, features] and labels y [runs, examples], got x "
            f"{list(x.shape)} and y {list(y.shape)}."
        )


def _lrs(lr: float | Sequence[float] | Tensor, runs: int, like: Tensor) -> Tensor:
    lrs = torch.as_tensor(lr, dtype=torch.float64).flatten()
    if lrs.numel() == 1:
        lrs = lrs.expand(runs)
    if lrs.numel() != runs or not bool((lrs > 0).all()):
        raise ValueError(f"expected one positive learning rate or one per run ({runs}), got {lrs.tolist()}.")
    return lrs


def online_linear(
    x: Tensor,
    y: Tensor,
    classes: int,
    lr: float | Sequence[float] | Tensor,
    generator: torch.Generator,
    optimizer: str = "adam",
    snapshots: Sequence[int] = (),
) -> tuple[LinearHeads, list[LinearHeads]]:
    """A fresh linear head per run learned in one pass over ``x [R, M, F]``, ``y [R, M]``, one example per step.

    Update (per run, step ``t``, example ``(x_t, y_t)``): ``g = (softmax(W x_t + b) - onehot(y_t)) x_t^T``
    (and ``g_b`` without ``x_t``); SGD: ``W -= lr g``; Adam (torch's defaults, betas 0.9/0.999, eps 1e-8,
    bias-corrected): ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``W -= lr m_hat / (sqrt(v_hat) + eps)``. The gradient is the exact gradient of the cross-entropy of one
    example, written in closed form so the step is a few fused tensor operations on all runs at once.

    Args:
        classes: outputs of the head (``K``).
        lr: one step size, or one per run (a sweep runs its learning rates as runs).
        generator: draws the fresh heads.
        optimizer: ``"adam"`` (the OML code's meta-test) or ``"sgd"``.
        snapshots: example counts after which a copy of the heads is kept (e.g. the end of each experience).

    Returns:
        ``(final heads, [heads after each snapshot count])``.
    """
    _check_stream(x, y)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"online_linear: expected optimizer one of {', '.join(OPTIMIZERS)}, got {optimizer!r}.")
    runs, steps, features = x.shape
    check_int("online_linear", "classes", classes)
    if steps and int(y.max()) >= classes:
        raise ValueError(f"online_linear: label {int(y.max())} needs more than classes = {classes} outputs.")
    lrs = _lrs(lr, runs, x)
    heads = fresh_heads(runs, classes, features, x, generator)
    w, b = heads.weight.clone(), heads.bias.clone()
    gw, gb = torch.empty_like(w), torch.empty_like(b)
    mw, vw, mb, vb = torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(b), torch.zeros_like(b)
    # runs that share a step size take one fused step together (a sweep runs one rate per run)
    groups = []
    for value in lrs.unique().tolist():
        idx = (lrs == value).nonzero().flatten().tolist()
        whole = len(idx) == runs
        pick = (lambda t: [t]) if whole else (lambda t, idx=idx: [t[i] for i in idx])
        tensors = [pick(w) + pick(b), pick(gw) + pick(gb), pick(mw) + pick(mb), pick(vw) + pick(vb)]
        groups.append((value, tensors, [torch.zeros((), dtype=x.dtype) for _ in tensors[0]]))
    rows = torch.arange(runs, device=x.device)
    wanted, kept = set(snapshots), {}
    for t in range(steps):
        xt = x[:, t]  # [R, F]
        torch.softmax(torch.baddbmm(b.unsqueeze(1), xt.unsqueeze(1), w.transpose(1, 2)).squeeze(1), -1, out=gb)
        gb[rows, y[:, t]] -= 1.0  # d loss / d logits, [R, K]: the bias gradient
        torch.mul(gb.unsqueeze(2), xt.unsqueeze(1), out=gw)  # the weight gradient, [R, K, F]
        for value, (ps, gs, ms, vs), counts in groups:
            if optimizer == "adam":
                adam_step_(ps, gs, ms, vs, counts, value, BETAS, EPS)
            else:
                for p, g in zip(ps, gs):
                    p.sub_(g, alpha=value)
        if t + 1 in wanted:
            kept[t + 1] = LinearHeads(w.clone(), b.clone())
    if 0 in wanted:
        kept[0] = heads
    return LinearHeads(w, b), [kept[s] for s in snapshots]


def offline_linear(
    x: Tensor,
    y: Tensor,
    classes: int,
    lr: float,
    generator: torch.Generator,
    epochs: int = 10,
    batch: int = 32,
) -> LinearHeads:
    """The i.i.d. upper bound: a fresh linear head per run trained by Adam on the cross-entropy of shuffled
    minibatches of ``batch`` examples of the same stream, for ``epochs`` passes (the OML code's oracle)."""
    _check_stream(x, y)
    runs, m, features = x.shape
    heads = fresh_heads(runs, classes, features, x, generator)
    w = heads.weight.clone().requires_grad_(True)
    b = heads.bias.clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    rows = torch.arange(runs, device=x.device).unsqueeze(1)
    for _ in range(check_int("offline_linear", "epochs", epochs)):
        order = torch.rand(runs, m, generator=generator).argsort(1).to(x.device)
        for i in range(0, m, check_int("offline_linear", "batch", batch)):
            idx = order[:, i : i + batch]
            logits = LinearHeads(w, b).logits(x[rows, idx])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[rows, idx].flatten(), reduction="sum")
            opt.zero_grad()
            (loss / idx.shape[1]).backward()
            opt.step()
    return LinearHeads(w.detach(), b.detach())


def nearest_mean(x: Tensor, y: Tensor, classes: int, snapshots: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
    """Streaming nearest-class-mean: the prototype of each class is the running mean of its features.

    Returns ``(prototypes [R, K, F], [prototypes after each snapshot count])``; a class not yet seen has no
    prototype (NaN), and :func:`nearest_mean_predict` never predicts it.
    """
    _check_stream(x, y)
    onehot = torch.nn.functional.one_hot(y, classes).to(x.dtype)  # [R, M, K]

    def means(upto: int) -> Tensor:
        oh = onehot[:, :upto]
        counts = oh.sum(1).unsqueeze(-1)  # [R, K, 1]
        total = oh.transpose(1, 2) @ x[:, :upto]
        return torch.where(counts > 0, total / counts.clamp_min(1), torch.full_like(total, float("nan")))

    return means(x.shape[1]), [means(s) for s in snapshots]


def nearest_mean_predict(prototypes: Tensor, x: Tensor) -> Tensor:
    """Labels ``[R, M]`` of ``x [R, M, F]``: the nearest prototype (squared Euclidean), seen classes only."""
    dist = torch.cdist(x, torch.nan_to_num(prototypes, nan=0.0)) ** 2
    return dist.masked_fill(prototypes.isnan().any(-1).unsqueeze(1), float("inf")).argmin(-1)


def experience_ends(classes: int, experiences: int) -> list[int]:
    """Class counts at the end of each of ``experiences`` near-equal groups of consecutive classes."""
    e = min(check_int("experience_ends", "experiences", experiences), classes)
    return [round(classes * (k + 1) / e) for k in range(e)]


def continual_metrics(acc: Tensor, ends: Sequence[int]) -> dict[str, Tensor]:
    """Avalanche's metrics from per-class accuracies ``acc [R, E, K]`` after each of ``E`` experiences (the
    ``k``-th ends with ``ends[k]`` classes seen; entries of classes not yet seen are ignored).

    Returns per run (``[R]``): ``average_accuracy`` (the final accuracy over all classes),
    ``forgetting`` (mean over the classes of all but the last experience of their best accuracy after they
    were learned minus their final accuracy) and ``backward_transfer`` (mean of final minus just-learned
    accuracy, the same classes); and ``curve [R, E]``, the average accuracy over the classes seen after each
    experience.
    """
    runs, e, k = acc.shape
    ends_t = torch.as_tensor(list(ends), device=acc.device)
    seen = torch.arange(k, device=acc.device).view(1, k) < ends_t.view(e, 1)  # [E, K]
    curve = (acc * seen).sum(-1) / seen.sum(-1)
    learned = torch.searchsorted(ends_t, torch.arange(k, device=acc.device), right=True)  # experience of class c
    just = acc.gather(1, learned.view(1, 1, k).expand(runs, 1, k)).squeeze(1)
    best = acc.masked_fill(~seen.unsqueeze(0), float("-inf")).amax(1)
    final = acc[:, -1]
    old = torch.arange(k, device=acc.device) < (ends_t[-2] if e > 1 else 0)
    denom = max(int(old.sum()), 1)
    return {
        "average_accuracy": curve[:, -1],
        "forgetting": ((best - final) * old).sum(-1) / denom,
        "backward_transfer": ((final - just) * old).sum(-1) / denom,
        "curve": curve,
    }


def online_regression(
    x: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    lr: float | Sequence[float] | Tensor,
    snapshots: Sequence[int] = (),
) -> tuple[tuple[Tensor, Tensor], list[tuple[Tensor, Tensor]]]:
    """A scalar linear head per run, started at ``weight [F]``, ``bias []`` and learned by SGD in one pass
    over ``x [R, M, F]``, ``y [R, M]``, one example per step.

    Update (per run, step ``t``): ``e = w . x_t + b - y_t``; ``w -= lr * 2 e x_t``, ``b -= lr * 2 e``: the exact
    gradient of the squared error ``e^2`` of one example (``mse`` of a single target), so the heads of all
    runs step together.

    Returns ``((w [R, F], b [R]), [(w, b) after each snapshot count])``.
    """
    if x.dim() != 3 or y.shape != x.shape[:2]:
        raise ValueError(
            f"online_regression: expected features x [runs, examples, features] and targets y [runs, examples], "
            f"got x {list(x.shape)} and y {list(y.shape)}."
        )
    runs = x.shape[0]
    lrs = _lrs(lr, runs, x).to(x.dtype).to(x.device)
    w = weight.reshape(1, -1).to(x).expand(runs, -1).clone()
    b = bias.reshape(()).to(x).expand(runs).clone()
    wanted, kept = set(snapshots), {}
    if 0 in wanted:
        kept[0] = (w.clone(), b.clone())
    for t in range(x.shape[1]):
        step = 2.0 * lrs * (torch.einsum("rf,rf->r", w, x[:, t]) + b - y[:, t])  # [R]
        w -= step.unsqueeze(1) * x[:, t]
        b -= step
        if t + 1 in wanted:
            kept[t + 1] = (w.clone(), b.clone())
    return (w, b), [kept[s] for s in snapshots]
