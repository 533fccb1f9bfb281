"""Reporting: evaluation results as text, under the line that names their protocol."""

from __future__ import annotations

__all__ = ["format_results", "format_number", "format_metric"]


def _digits4(x: float) -> str:
    """``x`` with 4 significant digits, trailing zeros kept (``0.3900``, ``12.35``, ``1235``, ``1.235e+05``)."""
    return f"{x:#.4g}".rstrip(".")


def format_number(key: str, x: float | None) -> str:
    """One number of metric ``key`` as printed: accuracies in percent with 2 decimals (``98.97%``), anything
    else with 4 significant digits (``0.1234``); ``-`` for a missing or non-finite value (JSON null)."""
    if x is None or x != x or x in (float("inf"), float("-inf")):
        return "-"
    return f"{100 * x:.2f}%" if key.startswith("accuracy") else _digits4(x)


def format_metric(key: str, r: dict[str, float]) -> str:
    """``mean ± ci95`` of metric ``key`` (:func:`format_number`), e.g. ``98.97% ± 0.18%``."""
    if r.get("ci95") is None:
        return format_number(key, r.get("mean"))
    return f"{format_number(key, r.get('mean'))} ± {format_number(key, r['ci95'])}"


def format_results(results: dict[str, dict[str, float]], protocol: str) -> str:
    """A readable table: one line per metric, ``mean ± ci95``, under a line naming the protocol. Accuracies
    in percent with 2 decimals (``98.97% ± 0.18%``), losses with 4 significant digits (``0.1234 ± 0.005678``)."""
    lines = [protocol]
    width = max(len(k) for k in results)
    for key, r in results.items():
        lines.append(f"  {key:<{width}}  {format_metric(key, r)}")
    return "\n".join(lines)
