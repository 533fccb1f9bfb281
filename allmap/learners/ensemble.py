"""Ensembles: several trained classifiers as one mapping from a support set to a task model.

Each member ``m`` maps the support set to its own task model with class scores ``s_m(x)``; the ensemble's
task model predicts the mean of the members' class probabilities,

    p(y = k | x) = (1/M) sum_m softmax_k(s_m(x)),

and returns ``log p`` as its scores, so cross-entropy, accuracy and argmax treat it like any learner's
output. Averaging probabilities rather than scores keeps members with differently scaled scores (a
ProtoNet's squared distances, a Matching Network's cosine attention) on one footing (Lakshminarayanan et
al., NeurIPS 2017, average the members' predictive distributions the same way). ``allmap eval RUN RUN ...``
scores an ensemble of trained runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from allmap.learners.base import Learner, TaskModel

__all__ = ["Ensemble"]


class Ensemble(Learner):
    """The mean of the class probabilities of ``members``' task models (see the module docstring).

    Args:
        members: trained classification learners with one label convention (all index the support set's
            classes, as metric learners do, or all index their outputs); learners that adapt in steps are
            combined step by step (the members' task models after 1, 5, ... steps).

    Example:
        >>> import torch, allmap
        >>> from allmap.learners.ensemble import Ensemble
        >>> from allmap.learners.protonet import ProtoNet
        >>> ensemble = Ensemble([ProtoNet(allmap.nets.MLP([2, 16, 8])) for _ in range(3)])
        >>> tasks = allmap.tasks.Logistic2D(shots=10).sample(1, torch.Generator().manual_seed(0))
        >>> task_model = ensemble.adapt(tasks.support_x[0], tasks.support_y[0])
        >>> probs = task_model(tasks.query_x[0]).exp()   # class probabilities: each row sums to one
        >>> bool(torch.allclose(probs.sum(-1), torch.ones(len(probs))))
        True
    """

    def __init__(self, members: Sequence[Learner]) -> None:
        members = list(members)
        _check_members(members)
        super().__init__(loss="cross_entropy")
        self.members = nn.ModuleList(members)
        first = members[0]
        self.labels = first.labels
        self.adapts_in_steps = first.spec.adapts_in_steps
        self.inner_steps = first.spec.inner_steps

    def adapt(self, support_x: Tensor, support_y: Tensor) -> TaskModel:
        """The members' task models for this support set, combined into one."""
        return _combine([m.adapt(support_x, support_y) for m in self.members])

    def adapt_path(self, support_x: Tensor, support_y: Tensor, steps: Sequence[int]) -> list[TaskModel]:
        """The combined task models after each number of inner steps in ``steps``."""
        paths = [m.adapt_path(support_x, support_y, steps) for m in self.members]
        return [_combine(models) for models in zip(*paths)]

    def batch_loss(self, tasks) -> Tensor:
        """Mean query cross-entropy of the combined predictions, one task at a time."""
        return self.looped_loss(tasks)

    def probe(self, x: Tensor) -> Tensor:
        return self.members[0].probe(x)

    def extra_repr(self) -> str:
        return f"{len(self.members)} members"


def _combine(models: Sequence[TaskModel]) -> TaskModel:
    """``x -> log((1/M) sum_m softmax(s_m(x)))``, computed as a log-sum-exp of the members' log-softmaxes."""
    log_m = math.log(len(models))

    def forward(x: Tensor) -> Tensor:
        scores = [model(x) for model in models]  # low-precision scores are combined in float32
        dtype = torch.promote_types(scores[0].dtype, torch.float32)
        scores = torch.stack([s.to(dtype).log_softmax(-1) for s in scores])
        return torch.logsumexp(scores, 0) - log_m

    return TaskModel(forward)


def _check_members(members: list) -> None:
    if not members or not all(isinstance(m, Learner) for m in members):
        kinds = ", ".join(type(m).__name__ for m in members) or "nothing"
        raise TypeError(f"Ensemble: expected a non-empty list of allmap learners, got {kinds}.")
    specs = [m.spec for m in members]
    if not all(s.classification for s in specs):
        names = ", ".join(type(m).__name__ for m, s in zip(members, specs) if not s.classification)
        raise ValueError(
            f"Ensemble: averages class probabilities, so every member must be a classifier (cross-entropy "
            f"loss); {names} is not. Ensemble classifiers only."
        )
    for what in ("labels", "adapts_in_steps"):
        values = {getattr(s, what) for s in specs}
        if len(values) > 1:
            raise ValueError(
                f"Ensemble: the members differ in {what} ({', '.join(sorted(map(str, values)))}); combine "
                "learners of one kind (e.g. metric learners, or learners that adapt in steps)."
            )
