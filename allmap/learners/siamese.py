"""Siamese networks for one-shot classification (Koch, Zemel & Salakhutdinov, ICML DL workshop 2015).

A twin encoder ``h`` (shared weights) and a learned similarity
``p(same | x1, x2) = sigmoid(sum_j alpha_j |h(x1)_j - h(x2)_j| + beta)`` are trained on same/different
pairs with binary cross-entropy. One-shot classification labels a query with the class of its most similar
support example. Pairs are drawn from episodes: every query against every support example of its task,
with the same-class and different-class terms weighted equally (there are N-1 times more different pairs).

Deviation from the paper, said plainly: the encoder is whatever module you pass (conv4 on 28x28 images in
our presets), not Koch et al.'s 105x105 network, and training uses the episode pairs described above
rather than a fixed set of 30k-150k pairs with affine distortions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allmap.checks import check_int
from allmap.learners.metric import MetricLearner

__all__ = ["Siamese"]


class Siamese(MetricLearner):
    """Siamese network: weighted-L1 similarity of twin embeddings, trained on same/different pairs.

    The task model returns, for each query and class, the largest pair logit over that class's support
    examples (the "most similar support example" rule), so ``argmax`` is the predicted class.

    Args:
        model: the twin embedding network ``h``.
        features: embedding size (the length of ``alpha``); 64 for conv4-64.
        vectorize: ``False`` loops over tasks; otherwise one encoder call embeds the whole meta-batch.
        test_shift: in eval mode, embed each image as the mean over its copies moved by up to this many
            pixels (see :mod:`allmap.learners.metric`); 0 (default): off.

    Example:
        >>> import torch, allmap
        >>> from allmap.learners.siamese import Siamese
        >>> learner = Siamese(allmap.nets.MLP([2, 16, 8]), features=8)
        >>> tasks = allmap.tasks.Logistic2D(shots=10).sample(4, torch.Generator().manual_seed(0))
        >>> learner.meta_loss(tasks).backward()
    """

    def __init__(
        self, model: nn.Module, features: int = 64, vectorize: bool | None = None, test_shift: int = 0
    ) -> None:
        super().__init__(model, vectorize=vectorize, test_shift=test_shift)
        check_int("Siamese", "features", features, what="the embedding size")
        self.similarity = nn.Linear(features, 1)

    def pair_logits(self, z_support: Tensor, z_query: Tensor) -> Tensor:
        """Logit of ``p(same)`` for every query/support pair, ``[..., Nq, Ns]``."""
        diff = (z_query.unsqueeze(-2) - z_support.unsqueeze(-3)).abs()
        if diff.shape[-1] != self.similarity.in_features:
            raise ValueError(
                f"Siamese: the encoder gives {diff.shape[-1]}-d embeddings but features={self.similarity.in_features}."
            )
        return self.similarity(diff).squeeze(-1)

    def logits(self, z_support: Tensor, onehot: Tensor, z_query: Tensor) -> Tensor:
        pairs = self.pair_logits(z_support, z_query).unsqueeze(-1)  # [..., Nq, Ns, 1]
        member = onehot.unsqueeze(-3) > 0  # [..., 1, Ns, N]
        return pairs.masked_fill(~member, float("-inf")).amax(dim=-2)

    def objective(self, z_support: Tensor, onehot: Tensor, z_query: Tensor, query_y: Tensor) -> Tensor:
        """Balanced binary cross-entropy over all query/support pairs of each task."""
        pairs = self.pair_logits(z_support, z_query)  # [..., Nq, Ns]
        same = torch.gather(onehot, -1, query_y.unsqueeze(-2).expand(*onehot.shape[:-1], query_y.shape[-1]))
        same = same.transpose(-1, -2)  # [..., Nq, Ns]: 1 where the support example has the query's class
        bce = F.binary_cross_entropy_with_logits(pairs, same, reduction="none")
        pos = (bce * same).sum((-1, -2)) / same.sum((-1, -2)).clamp_min(1)
        neg = (bce * (1 - same)).sum((-1, -2)) / (1 - same).sum((-1, -2)).clamp_min(1)
        return 0.5 * (pos + neg)
