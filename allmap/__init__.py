"""allmap: meta-learning on PyTorch, where every meta-learner is a differentiable map
from a task's support set to a model for that task."""

from __future__ import annotations

import os

import torch

from allmap import engine, hypergrad, inner, learners, nets, tasks
from allmap.engine import Execution, LearnerSpec
from allmap.learners import (
    ANIL,
    IMAML,
    MAML,
    GradientLearner,
    HyperNetwork,
    Learner,
    LSTMMetaLearner,
    MatchingNet,
    MetaSGD,
    ProtoNet,
    Reptile,
    Siamese,
    TaskModel,
    register,
)
from allmap.tasks import TaskBatch

__version__ = "0.1.0"

__all__ = [
    "Learner",
    "GradientLearner",
    "LearnerSpec",
    "Execution",
    "register",
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
    "engine",
    "learners",
    "load",
    "__version__",
]


def load(run_dir: str | os.PathLike, device: str | torch.device | None = None) -> Learner:
    """A trained learner back from a run folder (see ``allmap.app.runs.load``), ready to ``adapt``."""
    from allmap.app.runs import load as _load

    return _load(run_dir, device=device)
