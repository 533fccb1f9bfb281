"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, NeurIPS 2016).

A query is labelled by attention over the support set, ``P(y | x, S) = sum_i a(x, x_i) y_i`` with
``a(x, x_i) = softmax_i(scale * cos(f(x), g(x_i)))`` and ``f = g`` the shared encoder (the paper's variant
without full context embeddings, which it reports on Omniglot). The task model returns the log of that
mixture, ``log P(y = k | x, S)``; cross-entropy of these log-probabilities is exactly the paper's negative
log-likelihood, since they already sum to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allmap.learners.metric import MetricLearner

__all__ = ["MatchingNet"]


class MatchingNet(MetricLearner):
    """Matching Networks: cosine-similarity attention over the support set.

    Args:
        model: the shared embedding network (``f = g``).
        scale: multiplies the cosine similarities before the softmax (1 in the paper; larger values sharpen
            the attention, which helps a ReLU encoder whose cosines lie in [0, 1]).
        vectorize: ``False`` loops over tasks; otherwise one encoder call embeds the whole meta-batch.
        test_shift: in eval mode, embed each image as the mean over its copies moved by up to this many
            pixels (see :mod:`allmap.learners.metric`); 0 (default): off.

    Example:
        >>> import torch, allmap
        >>> from allmap.learners.matching import MatchingNet
        >>> learner = MatchingNet(allmap.nets.MLP([2, 16, 8]), scale=10.0)
        >>> tasks = allmap.tasks.Logistic2D(shots=10).sample(4, torch.Generator().manual_seed(0))
        >>> learner.meta_loss(tasks).backward()
    """

    def __init__(
        self, model: nn.Module, scale: float = 1.0, vectorize: bool | None = None, test_shift: int = 0
    ) -> None:
        super().__init__(model, vectorize=vectorize, test_shift=test_shift)
        if not scale > 0:
            raise ValueError(f"MatchingNet: expected scale > 0, got {scale!r}.")
        self.scale = float(scale)

    def attention(self, z_support: Tensor, z_query: Tensor) -> Tensor:
        """``a(x, x_i)`` as ``[..., Nq, Ns]``: softmax over the support of scaled cosine similarities."""
        cos = F.normalize(z_query, dim=-1, eps=1e-8) @ F.normalize(z_support, dim=-1, eps=1e-8).transpose(-1, -2)
        return torch.softmax(self.scale * cos, dim=-1)

    def logits(self, z_support: Tensor, onehot: Tensor, z_query: Tensor) -> Tensor:
        probs = self.attention(z_support, z_query) @ onehot  # [..., Nq, N], rows sum to 1
        logp = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
        empty = onehot.sum(-2).unsqueeze(-2) == 0  # classes without support examples (inside vmap only)
        return logp.masked_fill(empty, float("-inf"))

    def extra_repr(self) -> str:
        return f"scale={self.scale}, " + super().extra_repr()
