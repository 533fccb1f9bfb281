"""Check config values against a constructor's type hints before calling it.

Config values come from YAML: ``int``, ``float``, ``bool``, ``str``, ``None``, lists and mappings. A value
that cannot be what the constructor's annotation asks for (``inner_steps: "five"``, ``inner_lr: [1]``,
``shots: 2.5``, ``lr: .nan``) is a :class:`~allmap.app.config.ConfigError` naming the key, the expected
type and the value, instead of a traceback from deep inside torch at the first training step. Numbers
written as YAML 1.1 reads them into strings (``1e-3``) are converted where a number is expected.
Annotations it does not understand (tensors, modules, callables) accept anything: they are not judged.
"""

from __future__ import annotations

import collections.abc as cabc
import inspect
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any

from allmap.app.config import ConfigError

__all__ = ["check_arguments"]

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_UNJUDGED = object()


def _hints(factory: Callable[..., Any]) -> dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolved forward references: check nothing rather than guess
        return {}


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"int": "an integer", "float": "a finite number", "bool": "true/false", "str": "a string"}.get(
            tp.__name__, tp.__name__
        )
    return str(tp).replace("typing.", "").replace("collections.abc.", "")


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` converted to ``tp``, or ``_UNJUDGED`` if ``tp`` is not understood; raises TypeError if
    ``value`` cannot be a ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is _UNJUDGED:
        return value
    if origin in (typing.Union, types.UnionType):
        judged = False
        for option in typing.get_args(tp):
            try:
                out = _coerce(value, option)
            except TypeError:
                judged = True
                continue
            if out is not _UNJUDGED:
                return out
        if judged:  # every understood option refused it; an unjudged option (e.g. Tensor) cannot be YAML
            raise TypeError
        return value
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise TypeError
            return value
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise TypeError
    if origin in (list, tuple, cabc.Sequence, cabc.Iterable, cabc.Collection) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise TypeError
            items = [_coerce(v, a) for v, a in zip(value, args)]
        else:
            item = args[0] if args else Any
            items = [_coerce(v, item) for v in value]
        if any(i is _UNJUDGED for i in items):
            return value
        return tuple(items) if isinstance(value, tuple) else items
    if origin in (dict, cabc.Mapping) or tp in (dict,):
        if not isinstance(value, dict):
            raise TypeError
        return value
    return _UNJUDGED


def check_arguments(kind: str, name: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` checked (and numeric strings converted) against ``factory``'s annotations."""
    hints = _hints(factory)
    out = dict(kwargs)
    for key, value in kwargs.items():
        if key not in hints:
            continue
        try:
            converted = _coerce(value, hints[key])
        except (TypeError, RecursionError):
            raise ConfigError(
                f"{kind} {name!r}: option {key!r} expects {_describe(hints[key])}, got {value!r} "
                f"({type(value).__name__})."
            ) from None
        if converted is not _UNJUDGED:
            out[key] = converted
    return out
