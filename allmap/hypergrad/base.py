"""The strategy interface, the name registry and the parser of strategy specs such as ``"truncated(5)"``.

A strategy decides how the meta-gradient crosses adaptation. There are two protocols:

* :class:`InnerStrategy` replaces the inner loop: :meth:`InnerStrategy.run` returns the adapted parameters,
  whose autograd graph (or custom backward) carries the meta-gradient (unrolled, first order, truncated,
  checkpointed, implicit).
* :class:`WholeLossStrategy` differentiates the whole meta-loss as a black box of the meta-parameters
  (forward mode, finite differences): :meth:`WholeLossStrategy.meta_gradient` returns ``(value, gradients,
  info)`` and :func:`meta_loss_surrogate` turns them into a loss whose ``backward()`` deposits those
  gradients, so any torch optimizer applies them. Its inner loop is plain :meth:`Strategy.run`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from allmap.inner.loop import gradient_descent
from allmap.inner.optim import InnerOptimizer, Params

__all__ = [
    "Strategy",
    "InnerStrategy",
    "WholeLossStrategy",
    "STRATEGIES",
    "register",
    "resolve",
    "check_strategy",
    "meta_loss_surrogate",
]

STRATEGIES: dict[str, type[Strategy]] = {}


class Strategy:
    """Base class: how the meta-gradient crosses adaptation. Subclasses register under ``name``.

    Attributes:
        name: the name used in the API and in config files.
        vmappable: whether :meth:`run` may be called inside ``torch.func.vmap`` (custom backward passes that
            call ``torch.autograd`` cannot); learners run the tasks one at a time for those that are not.
    """

    name: ClassVar[str] = ""
    vmappable: ClassVar[bool] = True

    def run(
        self,
        loss: Callable[[Params], Tensor],
        params: Params,
        optimizer: InnerOptimizer,
        steps: int,
        record: Sequence[int] = (),
        closure: Sequence[Tensor] = (),
    ) -> list[Params]:
        """Adapt ``params`` by ``steps`` optimizer steps on ``loss``; the parameters after each step count in
        ``record`` (default: only the last). ``closure`` lists the tensors ``loss`` and ``optimizer`` close
        over that may need a gradient (strategies with a custom backward pass differentiate w.r.t. them)."""
        return gradient_descent(loss, params, optimizer, steps, record=list(record) or [steps])

    def check(self, learner: nn.Module) -> None:
        """Raise ``ValueError`` saying why if this strategy cannot apply to ``learner``: by default, when
        the learner's description (``learner.spec.strategies``) does not list it."""
        accepted = learner.spec.strategies
        if accepted and self.name not in accepted:
            raise ValueError(
                f"{type(learner).__name__}: the {self.name!r} meta-gradient strategy does not apply to "
                f"this learner; it accepts {', '.join(accepted)}."
            )

    def state_dict(self) -> dict[str, Tensor]:
        """State that changes during training (e.g. a random generator), saved in checkpoints so that a
        resumed run continues exactly; empty for deterministic strategies."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{self.name}({args})" if args else self.name

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and repr(other) == repr(self)

    def __hash__(self) -> int:
        return hash(repr(self))


class InnerStrategy(Strategy):
    """A strategy that replaces the inner loop: the adapted parameters carry the meta-gradient."""


class WholeLossStrategy(Strategy):
    """A strategy that differentiates the whole meta-loss as a function of the meta-parameters; the inner
    loop runs plainly (:meth:`Strategy.run`) inside each evaluation of that function."""

    def meta_gradient(self, fn: Callable[[Params], Tensor], params: Params) -> tuple[Tensor, Params, dict]:
        """``(fn(params), d fn / d params, info)``."""
        raise NotImplementedError


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy selectable by its ``name``."""
    STRATEGIES[cls.name] = cls
    return cls


_SPEC = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.S)


def _parse_args(text: str, spec: str) -> tuple[list, dict]:
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        args = [ast.literal_eval(a) for a in call.args]  # type: ignore[attr-defined]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}  # type: ignore[attr-defined]
    except (SyntaxError, ValueError) as err:
        raise ValueError(
            f"cannot parse the meta-gradient strategy {spec!r}: arguments must be Python literals, "
            "e.g. 'truncated(5)' or 'implicit(lam=2.0, iterations=10)'."
        ) from err
    return args, kwargs


def resolve(spec: str | Mapping[str, Any] | Strategy | None, default: str = "unrolled") -> Strategy:
    """A :class:`Strategy` from a name (``"checkpointed"``), a call (``"truncated(k=5)"``), a mapping
    (``{"name": "implicit", "lam": 2.0}``, as in config files) or a strategy object (returned as is).

    Example:
        >>> resolve("truncated(3)")
        truncated(k=3)
    """
    if spec is None:
        spec = default
    if isinstance(spec, Strategy):
        return spec
    if isinstance(spec, Mapping):
        kwargs = dict(spec)
        if "name" not in kwargs:
            raise ValueError(f"meta-gradient strategy mapping needs a 'name' key, got keys {sorted(kwargs)}.")
        name, args = kwargs.pop("name"), []
    elif isinstance(spec, str):
        match = _SPEC.match(spec)
        if not match:
            raise ValueError(f"cannot parse the meta-gradient strategy {spec!r}; expected e.g. 'truncated(5)'.")
        name = match.group(1)
        args, kwargs = _parse_args(match.group(2) or "", spec)
    else:
        raise TypeError(
            f"expected a meta-gradient strategy as a name, a mapping or a Strategy, got {type(spec).__name__}."
        )
    cls = STRATEGIES.get(check_strategy(name))
    try:
        return cls(*args, **kwargs)  # type: ignore[misc]
    except TypeError as err:
        raise ValueError(f"bad arguments for meta-gradient strategy {name!r}: {err}.") from err


def check_strategy(name: str) -> str:
    """Return ``name`` if it is a known strategy, else raise with the known ones."""
    if name not in STRATEGIES:
        raise ValueError(
            f"unknown meta-gradient strategy {name!r}; expected one of {', '.join(STRATEGIES)} "
            "(arguments in parentheses, e.g. 'truncated(5)')."
        )
    return name


class _Call(nn.Module):
    """Holds a learner so ``torch.func.functional_call`` can evaluate its loss at other parameter values."""

    def __init__(self, learner: nn.Module, fn: Callable[[Any], Tensor]) -> None:
        super().__init__()
        self.learner = learner
        self._fn = fn

    def forward(self, tasks: Any) -> Tensor:
        return self._fn(tasks)


def meta_loss_surrogate(
    strategy: WholeLossStrategy, learner: nn.Module, tasks: Any, plain_loss: Callable[[Any], Tensor]
) -> Tensor:
    """The meta-loss of ``learner`` on ``tasks`` whose gradient is the one ``strategy`` computes.

    Returns ``value + sum_i <p_i - stop_gradient(p_i), g_i>``: its value is the meta-loss and its gradient
    w.r.t. each meta-parameter ``p_i`` is the strategy's estimate ``g_i``. The strategy's ``info`` (for
    example the variance of a zeroth-order estimate) is stored in ``learner.hypergrad_info``.
    """
    named = dict(learner.named_parameters())
    wrapper = _Call(learner, plain_loss)

    def fn(params: Params) -> Tensor:
        return torch.func.functional_call(wrapper, {f"learner.{k}": v for k, v in params.items()}, (tasks,))

    value, grads, info = strategy.meta_gradient(fn, {k: v.detach() for k, v in named.items()})
    learner.hypergrad_info = info
    out = value.detach()
    for k, p in named.items():
        out = out + ((p - p.detach()) * grads[k].detach()).sum()
    return out
