"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

Each class is represented by the mean embedding of its support examples, its prototype
``c_k = (1/|S_k|) sum_{(x_i, y_i) in S_k} f_phi(x_i)``, and a query is classified by a softmax over negative
squared Euclidean distances, ``p(y = k | x) = softmax_k(-||f_phi(x) - c_k||^2)``; phi is trained on the
query cross-entropy of episodes.
"""

from __future__ import annotations

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

    Example:
        >>> import torch, allmap
        >>> from allmap.learners.protonet import ProtoNet
        >>> learner = ProtoNet(allmap.nets.MLP([2, 16, 8]))
        >>> tasks = allmap.tasks.Logistic2D(shots=10).sample(4, torch.Generator().manual_seed(0))
        >>> learner.meta_loss(tasks).backward()
    """

    def __init__(self, model: nn.Module, vectorize: bool | None = None, test_shift: int = 0) -> None:
        super().__init__(model, vectorize=vectorize, test_shift=test_shift)

    def prototypes(self, z_support: Tensor, onehot: Tensor) -> Tensor:
        """Class means ``[..., N, D]``."""
        counts = onehot.sum(-2).unsqueeze(-1)  # [..., N, 1]
        return (onehot.transpose(-1, -2) @ z_support) / counts.clamp_min(1)

    def logits(self, z_support: Tensor, onehot: Tensor, z_query: Tensor) -> Tensor:
        protos = self.prototypes(z_support, onehot)
        dist = ((z_query.unsqueeze(-2) - protos.unsqueeze(-3)) ** 2).sum(-1)  # [..., Nq, N]
        empty = onehot.sum(-2).unsqueeze(-2) == 0  # classes without support examples (inside vmap only)
        return (-dist).masked_fill(empty, float("-inf"))
