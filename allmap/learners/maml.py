"""Model-Agnostic Meta-Learning and its parameter-partition variant ANIL.

MAML (Finn, Abbeel & Levine, ICML 2017): the task model is theta after a few gradient steps on the
support loss, ``theta' = theta - inner_lr * grad L_support(theta)``, and theta is meta-trained on the
query loss ``L_query(theta')``; second order by default, first order (FOMAML) with ``first_order=True``.

ANIL (Raghu, Raghu, Bengio & Vinyals, ICLR 2020): only the head is adapted; the body is meta-learned but
shared across tasks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from allmap.hypergrad import Strategy, meta_loss_surrogate, resolve
from allmap.inner.optim import InnerOptimizer, Params, adam, sgd
from allmap.learners.base import Learner, LossFn, TaskModel, functional_forward, use_batch_statistics
from allmap.tasks.batch import TaskBatch

__all__ = ["MAML", "ANIL"]

INNER_OPTIMIZERS = {"sgd": sgd, "adam": adam}


def _finite_non_negative(value: Any) -> bool:
    """Whether ``value`` reads as a finite number >= 0 (a Python number, numpy scalar or 0-d tensor)."""
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        return False
    return math.isfinite(number) and number >= 0


class MAML(Learner):
    """MAML: a few differentiable gradient steps from the meta-learned initialisation theta.

    Args:
        model: any ``nn.Module`` (run through ``torch.func.functional_call``); its parameters are theta and
            receive the meta-gradient in place. BatchNorm layers are switched to batch statistics.
        inner_lr: step size of the inner loop.
        inner_steps: inner steps during meta-training (and the default of :meth:`adapt`).
        first_order: treat inner gradients as constants (FOMAML).
        loss: ``"mse"``, ``"cross_entropy"`` or a callable ``loss(pred, target)``.
        inner_optimizer: ``"sgd"`` (the paper) or ``"adam"``.
        adapt_only: parameter-name prefixes to adapt; ``None`` adapts all (see :class:`ANIL`).
        vectorize: run the tasks of a meta-batch with ``vmap`` (else one at a time).
        hypergrad: how the meta-gradient crosses the inner loop (see :mod:`allmap.hypergrad`): ``"unrolled"``
            (default), ``"first_order"`` (same as ``first_order=True``), ``"truncated(k)"``,
            ``"checkpointed"``, ``"implicit(lam=...)"`` (see :class:`IMAML`; these two run the tasks one at
            a time whatever ``vectorize`` says),
            ``"forward"``, ``"finite_difference"``, or a :class:`~allmap.hypergrad.Strategy`.

    Example:
        >>> import torch, allmap
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
        >>> maml = allmap.MAML(net, inner_lr=0.01, inner_steps=1)
        >>> tasks = allmap.tasks.Sinusoid(shots=10).sample(25, torch.Generator().manual_seed(0))
        >>> maml.meta_loss(tasks).backward()
    """

    adapts_in_steps = True

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        loss: str | LossFn = "mse",
        inner_optimizer: str = "sgd",
        adapt_only: Sequence[str] | None = None,
        vectorize: bool | None = None,
        hypergrad: str | Mapping[str, Any] | Strategy | None = None,
    ) -> None:
        super().__init__(loss=loss, vectorize=vectorize)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}: expected model to be a torch.nn.Module, got {type(model).__name__}.")
        if isinstance(inner_lr, bool) or not _finite_non_negative(inner_lr):
            raise ValueError(f"{type(self).__name__}: inner_lr must be a finite number >= 0 (the inner step size; "
                             f"0 keeps theta), got {inner_lr!r}. A negative step climbs the support loss instead "
                             "of lowering it.")
        if not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"{type(self).__name__}: expected inner_steps to be an integer >= 0, got {inner_steps!r}.")
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(
                f"{type(self).__name__}: unknown inner_optimizer {inner_optimizer!r}; expected one of "
                f"{', '.join(INNER_OPTIMIZERS)}."
            )
        self.model = use_batch_statistics(model)
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        strategy = resolve(hypergrad, default="first_order" if first_order else "unrolled")
        if first_order and strategy.name != "first_order":
            raise ValueError(
                f"{type(self).__name__}: first_order=True contradicts hypergrad={strategy!r}; pass only one of them."
            )
        self.hypergrad = strategy
        self.first_order = strategy.name == "first_order"
        self.inner_optimizer = inner_optimizer
        names = [n for n, _ in model.named_parameters()]
        if adapt_only is None:
            self.adapted_names = names
        else:
            prefixes = [adapt_only] if isinstance(adapt_only, str) else list(adapt_only)
            self.adapted_names = [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]
            if not self.adapted_names:
                top = sorted({n.split(".")[0] for n in names})
                raise ValueError(
                    f"{type(self).__name__}: no parameter of the model matches {prefixes}; the model's top-level "
                    f"parameter groups are {top}."
                )
        strategy.check(self)

    # -- pieces subclasses change --------------------------------------------------------------------
    def optimizer(self) -> InnerOptimizer:
        """The inner optimizer (Meta-SGD swaps in learned per-parameter rates)."""
        return INNER_OPTIMIZERS[self.inner_optimizer](self.inner_lr)

    def initial_params(self, support_x: Tensor, support_y: Tensor) -> Params:
        """Where the inner loop starts: theta (the hypernetwork learner starts from its own output)."""
        return {n: p for n, p in self.model.named_parameters() if n in self.adapted_names}

    # -- the mapping ---------------------------------------------------------------------------------
    def _frozen(self) -> Params:
        adapted = set(self.adapted_names)
        return {n: p for n, p in self.model.named_parameters() if n not in adapted}

    def _task_model(self, params: Params) -> TaskModel:
        full = {**self._frozen(), **params}
        return TaskModel(lambda x: functional_forward(self.model, full, x), params)

    def adapt_path(self, support_x: Tensor, support_y: Tensor, steps: Sequence[int]) -> list[TaskModel]:
        frozen = self._frozen()

        def support_loss(params: Params) -> Tensor:
            return self.loss_fn(functional_forward(self.model, {**frozen, **params}, support_x), support_y)

        path = self.hypergrad.run(
            support_loss,
            self.initial_params(support_x, support_y),
            self.optimizer(),
            max(steps),
            record=list(steps),
            closure=list(self.parameters()),
        )
        return [self._task_model(p) for p in path]

    def meta_loss(self, tasks: TaskBatch) -> Tensor:
        if self.hypergrad.scope == "meta_loss":  # forward mode, finite differences: the whole loss at once
            return meta_loss_surrogate(self.hypergrad, self, tasks, super().meta_loss)
        return super().meta_loss(tasks)

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> TaskModel:
        """Task model after ``steps`` inner steps (default ``inner_steps``) on the support set."""
        return self.adapt_path(support_x, support_y, [self.inner_steps if steps is None else steps])[0]

    def probe(self, x: Tensor) -> Tensor:
        return self.model(x)

    def extra_repr(self) -> str:
        return (
            f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, hypergrad={self.hypergrad!r}, "
            f"inner_optimizer={self.inner_optimizer}, adapted={len(self.adapted_names)} tensors, "
            + super().extra_repr()
        )


class ANIL(MAML):
    """ANIL: MAML that adapts only the head (parameters under the module named ``head``).

    Raghu et al., "Rapid Learning or Feature Reuse?", ICLR 2020. Update rule: ``w' = w - inner_lr *
    grad_w L_support(body, w)`` for the head ``w``; the body is meta-learned through the query loss only.
    """

    def __init__(
        self,
        model: nn.Module,
        head: str | Sequence[str] = "head",
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        loss: str | LossFn = "mse",
        inner_optimizer: str = "sgd",
        vectorize: bool | None = None,
        hypergrad: str | Mapping[str, Any] | Strategy | None = None,
    ) -> None:
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order, loss=loss,
                         inner_optimizer=inner_optimizer, adapt_only=head, vectorize=vectorize, hypergrad=hypergrad)
        self.head = head
