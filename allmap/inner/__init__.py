"""Differentiable inner optimizers and the inner loop."""

from allmap.inner.loop import gradient_descent
from allmap.inner.optim import InnerOptimizer, Params, adam, apply_updates, sgd

__all__ = ["InnerOptimizer", "Params", "sgd", "adam", "apply_updates", "gradient_descent"]
