"""allmap: meta-learning on PyTorch, where every meta-learner is a differentiable map
from a task's support set to a model for that task.

The names below load on first use, so ``import allmap`` stays light (the ``allmap`` command answers
``--version`` and Ctrl-C while torch loads); ``allmap.MAML``, ``from allmap import MAML`` and the
subpackages (``allmap.tasks``, ``allmap.nets``, ...) work as usual.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SUBPACKAGES = ("tasks", "nets", "inner", "hypergrad", "engine", "learners", "automl", "app")
_NAMES = {
    **dict.fromkeys(("Execution", "LearnerSpec"), "allmap.engine"),
    **dict.fromkeys(
        (
            "Learner",
            "GradientLearner",
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
            "CNP",
            "ANP",
            "CNPClassifier",
            "SNAIL",
            "OML",
            "ANML",
            "Ensemble",
        ),
        "allmap.learners",
    ),
    "TaskBatch": "allmap.tasks",
}

__all__ = [*_NAMES, "tasks", "nets", "inner", "hypergrad", "engine", "learners", "automl", "load", "__version__"]

if TYPE_CHECKING:  # for type checkers and editors; at run time the names load on first use
    from allmap import automl, engine, hypergrad, inner, learners, nets, tasks  # noqa: F401
    from allmap.engine import Execution, LearnerSpec  # noqa: F401
    from allmap.learners import (  # noqa: F401
        ANIL,
        ANML,
        ANP,
        CNP,
        IMAML,
        MAML,
        OML,
        SNAIL,
        CNPClassifier,
        Ensemble,
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
    from allmap.tasks import TaskBatch  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"allmap.{name}")
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'allmap' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def load(run_dir: str | os.PathLike, device: Any = None) -> Learner:
    """A trained learner back from a run folder (see :func:`allmap.app.runs.load`), ready to ``adapt``."""
    from allmap.app.runs import load as _load

    return _load(run_dir, device=device)
