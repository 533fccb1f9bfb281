"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

Each class is represented by the mean embedding of its support examples, its prototype
``c_k = (1/|S_k|) sum_{(x_i, y_i) in S_k} f_phi(x_i)``, and a query is classified by a softmax over negative
squared Euclidean distances, ``p(y = k | x) = softmax_k(-||f_phi(x) - c_k||^2)``; phi is trained on the
query cross-entropy of episodes.

Transductive refinement (``transductive=T``, test time only; Ren et al., ICLR 2018, soft k-means): the
prototypes are refined ``T`` times with the task's queries, each weighted by its current class
probabilities, ``c_k <- (sum_{S_k} z_i + sum_q p(k | z_q) z_q) / (|S_k| + sum_q p(k | z_q))``. A query's
class then depends on the other queries of its task, so the numbers it gives are transductive and must be
reported as such.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from allmap.learners.metric import MetricLearner

__all__ = ["ProtoNet"]


class ProtoNet(MetricLearner):
    """Prototypical Networks: squared Euclidean distance to the class means of the support embeddings.

    Args:
        model: the embedding network ``f_phi`` (e.g. ``allmap.nets.Conv4()``).
        vectorize: ``False`` loops over tasks; otherwise one encoder call embeds the whole meta-batch
            (see :mod:`allmap.learners.metric`).
        test_shift: in eval mode, embed each image as the mean over its copies moved by up to this many
            pixels (see :mod:`allmap.learners.metric`); 0 (default): off.
        transductive: in eval mode, refine the prototypes this many times with the queries (soft k-means;
            see the module docstring); 0 (default): off, every query is classified on its own.

    Example:
        >>> import torch, allmap
        >>> from allmap.learners.protonet import ProtoNet
        >>> learner = ProtoNet(allmap.nets.MLP([2, 16, 8]))
        >>> tasks = allmap.tasks.Logistic2D(shots=10).sample(4, torch.Generator().manual_seed(0))
        >>> learner.meta_loss(tasks).backward()
    """

    def __init__(
        self, model: nn.Module, vectorize: bool | None = None, test_shift: int = 0, transductive: int = 0
    ) -> None:
        super().__init__(model, vectorize=vectorize, test_shift=test_shift)
        if isinstance(transductive, bool) or not isinstance(transductive, int) or transductive < 0:
            raise ValueError(
                f"ProtoNet: expected transductive (soft k-means refinements of the prototypes at test time) to "
                f"be an integer >= 0, got {transductive!r}. Use 0 to classify every query on its own."
            )
        self.transductive = transductive

    def logits(self, z_support: Tensor, onehot: Tensor, z_query: Tensor) -> Tensor:
        protos = self.prototypes(z_support, onehot)
        empty = onehot.sum(-2).unsqueeze(-2) == 0  # classes without support examples (inside vmap only)
        scores = self._scores(protos, z_query, empty)
        for _ in range(0 if self.training else self.transductive):
            weights = torch.cat([onehot, scores.softmax(-1)], dim=-2)  # [..., Ns + Nq, N]
            protos = self.prototypes(torch.cat([z_support, z_query], dim=-2), weights)
            scores = self._scores(protos, z_query, empty)
        return scores

    @staticmethod
    def _scores(protos: Tensor, z_query: Tensor, empty: Tensor) -> Tensor:
        """``-||z_q - c_k||^2`` ``[..., Nq, N]``; ``-inf`` for classes without support examples."""
        dist = ((z_query.unsqueeze(-2) - protos.unsqueeze(-3)) ** 2).sum(-1)
        return (-dist).masked_fill(empty, float("-inf"))

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", transductive={self.transductive}" if self.transductive else "")
