"""Bilevel hyperparameter learning: training on the train split is the inner problem, the validation loss
the outer one, and the hypergradient comes from an :mod:`allmap.hypergrad` strategy chosen by name.

    w_T(lambda) = T steps of  w <- w - lr(lambda) * grad_w L_train(w, lambda)
    lambda <- lambda - eta * d L_val(w_T(lambda)) / d lambda

The declared hyperparameters (:class:`Hyperparameters`) are tensors stored unconstrained (log learning rates,
log weight decays, logits of per-example weights, a log augmentation strength) so that any optimizer may
step them. :class:`BilevelProblem` is the thin adapter that presents "train the model for ``steps`` full-batch
steps on the train split" as the inner loop the strategies already differentiate:

* inner-loop strategies (``unrolled``, ``truncated(k)``, ``checkpointed``, ``implicit``) receive the training
  loss, which closes over the hyperparameters, and the SGD inner optimizer whose rates are hyperparameters;
  the hypergradient is the autograd gradient of the validation loss at the trained weights;
* whole-loss strategies (``forward``, ``finite_difference``) differentiate ``lambda -> L_val(w_T(lambda))``.

With ``warm_start`` each outer step continues training from the previous weights (Lorraine, Vicol &
Duvenaud 2020, alternating ``steps`` inner steps with one hypergradient step), so the total inner horizon
grows to thousands of steps while each hypergradient costs a fixed amount. The ``implicit`` strategy then
is Lorraine et al.'s implicit-function-theorem hypergradient: its inner problem is
``argmin_w L_train(w, lambda) + lam/2 ||w - w_prev||^2`` and its linear solve (CG, or the Neumann series
Lorraine et al. use) gives ``dL_val/dlambda = -d/dlambda <grad_w L_train, (H + lam I)^-1 grad_w L_val>``.
It does not see learning rates (the solution does not depend on them) and refuses them.
Unrolled and truncated hypergradients over a short warm-started window are greedy (short-horizon bias,
Wu et al. 2018); forward mode (Franceschi et al. 2017) costs one pass per hyperparameter entry.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allmap.automl.data import Split
from allmap.checks import check_int
from allmap.hypergrad.base import InnerStrategy, Strategy, WholeLossStrategy, resolve
from allmap.hypergrad.implicit import Implicit
from allmap.inner.loop import gradient_descent
from allmap.inner.optim import InnerOptimizer, Params, sgd

__all__ = ["Hyperparameters", "BilevelProblem", "HyperStep", "History", "optimize", "train_fixed", "evaluate"]

LR_SCOPES = (None, "global", "per_layer")
DECAY_SCOPES = (None, "global", "per_parameter")


def _log(value: float, what: str) -> float:
    if not value > 0:
        raise ValueError(f"Hyperparameters: expected {what} > 0 (it is learned in log space), got {value!r}.")
    return math.log(value)


class Hyperparameters:
    """The hyperparameters of ordinary training that are learned, declared as tensors.

    Args:
        model: the network trained in the inner loop (its parameter names and shapes).
        lr: the initial (or fixed) SGD learning rate.
        lr_scope: ``None`` (fixed), ``"global"`` (one learned rate) or ``"per_layer"`` (one per parameter tensor).
        weight_decay: the initial (or fixed) L2 coefficient; the penalty is ``sum_i decay_i w_i^2 / 2``.
        decay_scope: ``None`` (fixed), ``"global"`` or ``"per_parameter"`` (one coefficient per weight entry).
        examples: if > 0, learn one loss weight per training example (``2 sigmoid(logit)``, 1 at the start).
        augment: if given, learn the standard deviation (initially ``augment``) of Gaussian input noise, with
            one fixed noise draw per example so the training loss is a deterministic function of it.

    ``raw`` holds the learned tensors by name (``lr``, ``lr/<param>``, ``decay``, ``decay/<param>``,
    ``example_logits``, ``augment``).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        lr_scope: str | None = None,
        weight_decay: float = 0.0,
        decay_scope: str | None = None,
        examples: int = 0,
        augment: float | None = None,
    ) -> None:
        if lr_scope not in LR_SCOPES:
            raise ValueError(f"Hyperparameters: lr_scope must be one of {LR_SCOPES}, got {lr_scope!r}.")
        if decay_scope not in DECAY_SCOPES:
            raise ValueError(f"Hyperparameters: decay_scope must be one of {DECAY_SCOPES}, got {decay_scope!r}.")
        check_int("Hyperparameters", "examples", examples, minimum=0, what="per-example weights")
        shapes = {k: p.shape for k, p in model.named_parameters()}
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        self.names = list(shapes)
        self.lr, self.lr_scope = float(lr), lr_scope
        self.weight_decay, self.decay_scope = float(weight_decay), decay_scope
        raw: dict[str, Tensor] = {}

        def full(shape: Any, value: float) -> Tensor:
            return torch.full(shape, value, dtype=dtype, device=device)

        if lr_scope == "global":
            raw["lr"] = full((), _log(lr, "lr"))
        elif lr_scope == "per_layer":
            raw.update({f"lr/{k}": full((), _log(lr, "lr")) for k in shapes})
        if decay_scope == "global":
            raw["decay"] = full((), _log(weight_decay, "weight_decay"))
        elif decay_scope == "per_parameter":
            raw.update({f"decay/{k}": full(s, _log(weight_decay, "weight_decay")) for k, s in shapes.items()})
        if examples:
            raw["example_logits"] = full((examples,), 0.0)
        if augment is not None:
            raw["augment"] = full((), _log(augment, "augment"))
        self.raw = raw

    def rates(self, raw: Params) -> _Transformed:
        """The learning rate of each parameter tensor (computed from ``raw`` on each access)."""
        return _Transformed(self.names, raw, "lr", self.lr)

    def decays(self, raw: Params) -> _Transformed:
        """The L2 coefficient of each parameter tensor, a scalar or a tensor of its shape (computed on access)."""
        return _Transformed(self.names, raw, "decay", self.weight_decay)

    def optimizer(self, raw: Params) -> InnerOptimizer:
        """The inner SGD whose rates are (possibly learned) hyperparameters."""
        return sgd(self.rates(raw))

    def learns_rates(self) -> bool:
        return self.lr_scope is not None

    def summary(self, raw: Params) -> dict[str, float]:
        """Readable values for trajectories: each learned rate, the mean (and spread) of learned decays and
        example weights, the augmentation strength."""
        out: dict[str, float] = {}
        with torch.no_grad():
            for k, v in raw.items():
                if k == "example_logits":
                    w = 2 * torch.sigmoid(v)
                    out["example_weight_mean"], out["example_weight_min"] = float(w.mean()), float(w.min())
                elif k.startswith("decay/") or k == "decay":
                    out[k] = float(torch.exp(v).mean())
                else:
                    out[k] = float(torch.exp(v))
        return out


class _Transformed(Mapping):
    """``name -> exp(raw[key])`` (``key`` the global ``prefix`` or ``prefix/name``), else the fixed ``default``.

    Computed on each access, so every inner step builds its own small graph from the raw hyperparameters
    (a checkpointed strategy recomputes steps and back-propagates through each recomputation separately).
    """

    def __init__(self, names: list[str], raw: Params, prefix: str, default: float) -> None:
        self.names, self.raw, self.prefix, self.default = names, raw, prefix, default

    def __getitem__(self, name: str) -> Tensor | float:
        for key in (self.prefix, f"{self.prefix}/{name}"):
            if key in self.raw:
                return torch.exp(self.raw[key])
        if name not in self.names:
            raise KeyError(name)
        return self.default

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class HyperStep:
    """One hypergradient: the validation loss at the trained weights, ``d L_val / d raw`` and those weights."""

    val_loss: float
    grads: Params
    params: Params


class BilevelProblem:
    """Ordinary training of ``model`` on ``split`` as the inner problem of a hypergradient strategy.

    Args:
        model: any ``nn.Module`` classifier (run with ``torch.func.functional_call``).
        split: the train / validation / test data.
        hyper: the declared :class:`Hyperparameters`.
        steps: full-batch SGD steps on the train split per hypergradient.
        strategy: a hypergradient strategy of :mod:`allmap.hypergrad` by name (``"implicit(lam=0.01,
            iterations=20)"``, ``"truncated(5)"``, ``"forward"``, ...) or object.
        seed: seed of the fixed augmentation noise.
    """

    def __init__(
        self,
        model: nn.Module,
        split: Split,
        hyper: Hyperparameters,
        steps: int = 10,
        strategy: str | Strategy = "unrolled",
        seed: int = 0,
    ) -> None:
        self.model, self.split, self.hyper = model, split, hyper
        self.steps = check_int("BilevelProblem", "steps", steps, what="inner steps per hypergradient")
        self.strategy = resolve(strategy)
        if "example_logits" in hyper.raw and hyper.raw["example_logits"].numel() != len(split.y_train):
            raise ValueError(
                f"BilevelProblem: {hyper.raw['example_logits'].numel()} example weights declared for "
                f"{len(split.y_train)} training examples; declare Hyperparameters(examples=len(split.y_train))."
            )
        if isinstance(self.strategy, Implicit) and hyper.learns_rates():
            raise ValueError(
                "BilevelProblem: the 'implicit' strategy differentiates the solution of training, which does not "
                "depend on the learning rate, so learned rates would get no gradient; use 'unrolled', "
                "'truncated(k)', 'checkpointed' or 'forward' for rates, or fix lr_scope=None."
            )
        x = split.x_train
        g = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)

    def initial_params(self) -> Params:
        return {k: p.detach().clone() for k, p in self.model.named_parameters()}

    def forward(self, params: Params, x: Tensor) -> Tensor:
        return torch.func.functional_call(self.model, params, (x,))

    def train_loss(self, raw: Params) -> Callable[[Params], Tensor]:
        """``w -> mean_i c_i CE(f_w(x_i + s n_i), y_i) + sum_j decay_j w_j^2 / 2`` at the hyperparameters ``raw``."""
        decays = self.hyper.decays(raw)

        def loss(params: Params) -> Tensor:  # the transforms run inside, see _Transformed
            x, y = self.split.x_train, self.split.y_train
            if "augment" in raw:
                x = x + torch.exp(raw["augment"]) * self.noise
            weights = 2 * torch.sigmoid(raw["example_logits"]) if "example_logits" in raw else None
            per_example = F.cross_entropy(self.forward(params, x), y, reduction="none")
            data = (weights * per_example).mean() if weights is not None else per_example.mean()
            penalty = sum((d * params[k] ** 2).sum() for k in params if _nonzero(d := decays[k]))
            return data + 0.5 * penalty

        return loss

    def val_loss(self, params: Params) -> Tensor:
        return F.cross_entropy(self.forward(params, self.split.x_val), self.split.y_val)

    def train(self, raw: Params, params: Params, steps: int | None = None) -> Params:
        """Plain training (no hypergradient) for ``steps`` (default: the problem's) from ``params``."""
        with torch.no_grad():
            return gradient_descent(self.train_loss(raw), params, self.hyper.optimizer(raw), steps or self.steps)

    def hypergradient(self, raw: Params, params: Params) -> HyperStep:
        """Train ``steps`` from ``params`` at hyperparameters ``raw``; the validation loss there, its
        hypergradient w.r.t. ``raw`` by the problem's strategy and the trained weights."""
        start = {k: v.detach() for k, v in params.items()}
        if isinstance(self.strategy, WholeLossStrategy):

            def whole(r: Params) -> Tensor:
                trained = self.strategy.run(self.train_loss(r), start, self.hyper.optimizer(r), self.steps)[-1]
                return self.val_loss(trained)

            value, grads, _ = self.strategy.meta_gradient(whole, {k: v.detach() for k, v in raw.items()})
            return HyperStep(float(value), grads, self.train(raw, start))
        if not isinstance(self.strategy, InnerStrategy):
            raise TypeError(f"BilevelProblem: unsupported strategy {self.strategy!r}.")
        leaves = {k: v.detach().requires_grad_(True) for k, v in raw.items()}
        with torch.enable_grad():
            trained = self.strategy.run(
                self.train_loss(leaves), start, self.hyper.optimizer(leaves), self.steps, closure=list(leaves.values())
            )[-1]
            value = self.val_loss(trained)
            found = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), found)}
        return HyperStep(float(value.detach()), grads, {k: v.detach() for k, v in trained.items()})


def _nonzero(value: Tensor | float) -> bool:
    return isinstance(value, Tensor) or value != 0.0


@dataclass
class History:
    """What an optimisation run leaves: per outer step the process CPU seconds since the start, the validation
    loss, the hyperparameter summary and (for ``implicit``) the relative residual of the linear solve; the
    final weights and hyperparameters."""

    cpu_seconds: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    hyper: list[dict[str, float]] = field(default_factory=list)
    residual: list[float | None] = field(default_factory=list)
    params: Params = field(default_factory=dict)
    raw: Params = field(default_factory=dict)


def optimize(
    problem: BilevelProblem,
    outer_steps: int,
    hyper_lr: float = 0.05,
    warm_start: bool = True,
    callback: Callable[[int, HyperStep], None] | None = None,
) -> History:
    """Learn the hyperparameters by Adam on their hypergradients, ``outer_steps`` times ``problem.steps`` inner
    steps. ``warm_start``: keep training the same weights (Lorraine et al. 2020); else restart each outer step
    from the model's initial weights (the classic bilevel setting, exact for the chosen horizon)."""
    raw = {k: v.detach().clone().requires_grad_(True) for k, v in problem.hyper.raw.items()}
    opt = torch.optim.Adam(list(raw.values()), lr=hyper_lr)
    init = problem.initial_params()
    params, history, start = init, History(), time.process_time()
    for t in range(outer_steps):
        step = problem.hypergradient(raw, params)
        for k, v in raw.items():
            v.grad = step.grads[k].detach().to(v.dtype)
        opt.step()
        params = step.params if warm_start else init
        history.cpu_seconds.append(time.process_time() - start)
        history.val_loss.append(step.val_loss)
        history.hyper.append(problem.hyper.summary(raw))
        history.residual.append(getattr(problem.strategy, "last_residual", None))
        if callback is not None:
            callback(t, step)
    history.raw = {k: v.detach() for k, v in raw.items()}
    history.params = params if warm_start else problem.train(history.raw, init, problem.steps)
    return history


def train_fixed(problem: BilevelProblem, raw: Params, total_steps: int, every: int) -> History:
    """Training at fixed hyperparameters ``raw`` for ``total_steps``, the validation loss logged ``every`` steps
    (the untuned baseline, and one point of a grid or random search)."""
    params, history, start = problem.initial_params(), History(), time.process_time()
    for _ in range(max(1, total_steps // every)):
        params = problem.train(raw, params, every)
        with torch.no_grad():
            history.val_loss.append(float(problem.val_loss(params)))
        history.cpu_seconds.append(time.process_time() - start)
        history.hyper.append(problem.hyper.summary(raw))
    history.params, history.raw = params, dict(raw)
    return history


def evaluate(model: nn.Module, params: Params, x: Tensor, y: Tensor) -> dict[str, float]:
    """Cross-entropy and accuracy of ``model`` at ``params`` on ``(x, y)``."""
    with torch.no_grad():
        logits = torch.func.functional_call(model, params, (x,))
        return {"loss": float(F.cross_entropy(logits, y)), "accuracy": float((logits.argmax(-1) == y).float().mean())}
