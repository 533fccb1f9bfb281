"""Multi-layer perceptrons split into ``body`` and ``head`` (so ANIL can adapt the head by name)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["MLP"]

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Module):
    """``sizes = [in, h1, ..., out]``: Linear + activation for each hidden layer, then a Linear ``head``.

    ``sizes=[1, 40, 40, 1]`` is the sinusoid network of the MAML paper; ``sizes=[2, 2]`` is logistic
    regression (no body).

    Example:
        >>> MLP([1, 40, 40, 1])(torch.zeros(5, 1)).shape
        torch.Size([5, 1])
    """

    def __init__(self, sizes: Sequence[int], activation: str = "relu") -> None:
        super().__init__()
        sizes = list(sizes)
        if len(sizes) < 2 or any(not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"MLP: expected sizes as a list of at least two positive integers, got {sizes!r}.")
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP: unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}.")
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-2], sizes[-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))
