"""Multi-layer perceptrons split into ``body`` and ``head`` (so ANIL can adapt the head by name)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from allmap.nets.norm import BatchStatNorm

__all__ = ["MLP"]

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Module):
    """``sizes = [in, h1, ..., out]``: Linear (+ norm) + activation for each hidden layer, then a Linear ``head``.

    ``sizes=[1, 40, 40, 1]`` is the sinusoid network of the MAML paper; ``sizes=[2, 2]`` is logistic
    regression (no body). ``norm="batch"`` normalises hidden layers with batch statistics as MAML's
    reference code does (:class:`~allmap.nets.BatchStatNorm`, exact under ``vmap``); ``init="maml"`` uses
    that code's initialisation (truncated normal weights with std 0.01, zero biases).

    Example:
        >>> MLP([1, 40, 40, 1])(torch.zeros(5, 1)).shape
        torch.Size([5, 1])
    """

    def __init__(
        self, sizes: Sequence[int], activation: str = "relu", norm: str | None = None, init: str = "torch"
    ) -> None:
        super().__init__()
        sizes = list(sizes)
        if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"MLP: expected sizes as a list of at least two positive integers, got {sizes!r}.")
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP: unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}.")
        if norm not in (None, "none", "batch"):
            raise ValueError(f"MLP: unknown norm {norm!r}; expected None or 'batch'.")
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-2], sizes[1:-1]):
            layers.append(nn.Linear(a, b))
            if norm == "batch":
                layers.append(BatchStatNorm(b))
            layers.append(ACTIVATIONS[activation]())
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-2], sizes[-1])
        if init == "maml":  # MAML's reference code: truncated normal weights (std 0.01), zero biases
            for layer in self.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.trunc_normal_(layer.weight, std=0.01, a=-0.02, b=0.02)
                    nn.init.zeros_(layer.bias)
        elif init != "torch":
            raise ValueError(f"MLP: unknown init {init!r}; expected 'torch' (PyTorch's default) or 'maml'.")

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))
