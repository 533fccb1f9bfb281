"""The one integer check of argument values, so every error reads the same way."""

from __future__ import annotations

from typing import Any

__all__ = ["check_int"]


def check_int(owner: str, name: str, value: Any, minimum: int = 1, what: str = "") -> int:
    """``value`` if it is an integer (not a bool) ``>= minimum``, else a ``ValueError`` naming ``owner``'s
    argument ``name`` (``what`` says what it counts), e.g. ``"truncated: expected k (differentiated steps)
    to be an integer >= 0, got -1."``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        label = f"{name} ({what})" if what else name
        raise ValueError(f"{owner}: expected {label} to be {kind}, got {value!r}.")
    return value
