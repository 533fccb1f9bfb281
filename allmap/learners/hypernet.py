"""The amortised "mapping" learner: a set encoder outputs the base learner's parameters.

``theta_task = theta + rho(mean_i h_i)`` with ``h_i = phi(z_i) + (A z_i + a) * (B z_i + c)``, ``z_i = [x_i, y_i]``,
in one forward pass: a permutation-invariant DeepSets encoder (Zaheer et al. 2017) whose per-example code
has a multiplicative term (Jayakumar et al., ICLR 2020), so that the mean over the support set holds the
first and second moments of ``(x, y)``: the sufficient statistics of a linear-Gaussian model (and, with
one-hot labels, per-class sums of x). Without it an MLP must approximate products and the mapping stays
far from least squares. Optionally followed by ``inner_steps`` gradient steps from that output as in MAML.
Everything is trained end to end on the query loss, so the encoder learns the map support set -> parameters
directly. Closely related: LEO (Rusu et al. 2019) and the amortised learners of
Gordon et al. (VERSA, 2019).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allmap.hypergrad import Strategy
from allmap.inner.optim import Params
from allmap.learners.base import LossFn
from allmap.learners.gradient import GradientLearner, first_order_strategy
from allmap.learners.updates import descent

__all__ = ["HyperNetwork"]


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class HyperNetwork(GradientLearner):
    """A set encoder maps the support set to (a subset of) the base model's parameters.

    Args:
        model: the base learner; its parameters are the starting point theta that the encoder's output
            is added to (the encoder's last layer starts at zero, so training starts from theta).
        x_dim: size of one input after flattening (or after ``embedding``).
        y_dim: size of one target (regression) or the number of classes (classification, one-hot).
        generate: parameter-name prefixes to generate (for example ``["head"]``); ``None`` generates all.
            The others are shared across tasks and meta-learned.
        hidden: width of the encoder; depth: hidden layers in each of phi and rho.
        inner_steps: gradient steps taken from the generated parameters (0: pure amortised mapping).
        embedding: optional module applied to inputs before the encoder (e.g. a conv net for images).
        Other arguments as in :class:`MAML` (the inner steps are SGD).

    Example:
        >>> import torch, allmap
        >>> learner = allmap.HyperNetwork(torch.nn.Linear(8, 1), x_dim=8, y_dim=1)
        >>> tasks = allmap.tasks.LinearRegression(dim=8).sample(4, torch.Generator().manual_seed(0))
        >>> learner.meta_loss(tasks).backward()
    """

    def __init__(
        self,
        model: nn.Module,
        x_dim: int,
        y_dim: int,
        generate: Sequence[str] | None = None,
        hidden: int = 128,
        depth: int = 2,
        inner_steps: int = 0,
        inner_lr: float = 0.01,
        loss: str | LossFn = "mse",
        embedding: nn.Module | None = None,
        vectorize: bool | None = None,
        first_order: bool = False,
        hypergrad: str | Mapping[str, Any] | Strategy | None = None,
    ) -> None:
        owner = type(self).__name__
        super().__init__(
            model,
            descent(owner, "sgd", inner_lr),
            inner_steps=inner_steps,
            loss=loss,
            adapt_only=generate,
            hypergrad=first_order_strategy(owner, first_order, hypergrad),
            vectorize=vectorize,
        )
        if x_dim < 1 or y_dim < 1:
            raise ValueError(f"HyperNetwork: expected x_dim >= 1 and y_dim >= 1, got x_dim={x_dim}, y_dim={y_dim}.")
        self.x_dim, self.y_dim = int(x_dim), int(y_dim)
        self.embedding = embedding
        params = dict(model.named_parameters())
        self._sizes = [params[n].numel() for n in self.adapted_names]
        self._shapes = [params[n].shape for n in self.adapted_names]
        self.phi = _mlp([self.x_dim + self.y_dim] + [hidden] * depth)
        self.phi_a = nn.Linear(self.x_dim + self.y_dim, hidden)
        self.phi_b = nn.Linear(self.x_dim + self.y_dim, hidden)
        self.rho = _mlp([hidden] * depth + [sum(self._sizes)])
        nn.init.zeros_(self.rho[-1].weight)
        nn.init.zeros_(self.rho[-1].bias)

    def encode(self, support_x: Tensor, support_y: Tensor) -> Tensor:
        """The permutation-invariant code ``rho(mean_i h_i)`` (see the module docstring) as one flat vector."""
        x = support_x if self.embedding is None else self.embedding(support_x)
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.x_dim:
            raise ValueError(
                f"HyperNetwork: expected inputs of {self.x_dim} features (x_dim), got {x.shape[1]}; set x_dim to "
                "the flattened input size (or the embedding's output size)."
            )
        if self.classification:
            y = F.one_hot(support_y, self.y_dim).to(x.dtype)
        else:
            y = support_y.reshape(support_y.shape[0], -1).to(x.dtype)
        z = torch.cat([x, y], dim=1)
        h = self.phi(z) + self.phi_a(z) * self.phi_b(z)
        return self.rho(h.mean(dim=0))

    def initial_params(self, support_x: Tensor, support_y: Tensor) -> Params:
        theta = dict(self.model.named_parameters())
        deltas = torch.split(self.encode(support_x, support_y), self._sizes)
        return {n: theta[n] + d.view(s) for n, d, s in zip(self.adapted_names, deltas, self._shapes)}
