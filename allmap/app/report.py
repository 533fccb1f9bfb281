"""Reporting: evaluation results as text, under the line that names their protocol."""

from __future__ import annotations

__all__ = ["format_results"]


def _digits4(x: float) -> str:
    """``x`` with 4 significant digits, trailing zeros kept (``0.3900``, ``12.35``, ``1235``, ``1.235e+05``)."""
    return f"{x:#.4g}".rstrip(".")


def format_results(results: dict[str, dict[str, float]], protocol: str) -> str:
    """A readable table: one line per metric, ``mean ± ci95``, under a line naming the protocol. Accuracies
    in percent with 2 decimals (``98.97% ± 0.18%``), losses with 4 significant digits (``0.1234 ± 0.005678``)."""
    lines = [protocol]
    width = max(len(k) for k in results)
    for key, r in results.items():
        if key.startswith("accuracy"):
            value = f"{100 * r['mean']:.2f}% ± {100 * r['ci95']:.2f}%"
        else:
            value = f"{_digits4(r['mean'])} ± {_digits4(r['ci95'])}"
        lines.append(f"  {key:<{width}}  {value}")
    return "\n".join(lines)
