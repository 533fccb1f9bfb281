"""Reporting: evaluation results as text, under the line that names their protocol."""

from __future__ import annotations

__all__ = ["format_results"]


def format_results(results: dict[str, dict[str, float]], protocol: str) -> str:
    """A readable table: one line per metric, ``mean ± ci95``, under a line naming the protocol."""
    lines = [protocol]
    width = max(len(k) for k in results)
    for key, r in results.items():
        scale, unit = (100.0, "%") if key.startswith("accuracy") else (1.0, "")
        lines.append(f"  {key:<{width}}  {r['mean'] * scale:.4f}{unit} ± {r['ci95'] * scale:.4f}{unit}")
    return "\n".join(lines)
