"""allmap: meta-learning on PyTorch, where every meta-learner is a differentiable map
from a task's support set to a model for that task."""

from __future__ import annotations

import os

import torch

from allmap import hypergrad, inner, nets, tasks
from allmap.learners import ANIL, MAML, HyperNetwork, Learner, MetaSGD, TaskModel
from allmap.learners import IMAML, LSTMMetaLearner, Reptile
from allmap.learners import MatchingNet, ProtoNet, Siamese
from allmap.tasks import TaskBatch

__version__ = "0.1.0"

__all__ = [
    "Learner",
    "TaskModel",
    "MAML",
    "ANIL",
    "MetaSGD",
    "HyperNetwork",
    "Reptile",
    "IMAML",
    "LSTMMetaLearner",
    "ProtoNet",
    "MatchingNet",
    "Siamese",
    "TaskBatch",
    "tasks",
    "nets",
    "inner",
    "hypergrad",
    "load",
    "__version__",
]


def load(run_dir: str | os.PathLike, device: str | torch.device | None = None) -> Learner:
    """A trained learner back from a run folder (see ``allmap.train.runs.load``), ready to ``adapt``."""
    from allmap.train.runs import load as _load

    return _load(run_dir, device=device)
