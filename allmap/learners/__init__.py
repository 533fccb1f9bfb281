"""One file per algorithm family; every learner is a map support set -> task model.

``LEARNERS`` maps the names used in config files (``learner: {name: maml, ...}``) to learner classes;
:func:`register` adds one (see docs/extending.md).
"""

from collections.abc import Callable

from allmap.learners.base import Learner, TaskModel
from allmap.learners.ensemble import Ensemble
from allmap.learners.gradient import GradientLearner
from allmap.learners.hypernet import HyperNetwork
from allmap.learners.imaml import IMAML
from allmap.learners.lstm import LSTMMetaLearner
from allmap.learners.maml import ANIL, MAML
from allmap.learners.matching import MatchingNet
from allmap.learners.metasgd import MetaSGD
from allmap.learners.neural_process import ANP, CNP, CNPClassifier
from allmap.learners.oml import ANML, OML
from allmap.learners.protonet import ProtoNet
from allmap.learners.reptile import Reptile
from allmap.learners.siamese import Siamese
from allmap.learners.snail import SNAIL

__all__ = [
    "Learner",
    "TaskModel",
    "GradientLearner",
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
    "LEARNERS",
    "register",
]

LEARNERS: dict[str, type[Learner]] = {
    "maml": MAML,
    "anil": ANIL,
    "metasgd": MetaSGD,
    "hypernet": HyperNetwork,
    "protonet": ProtoNet,
    "matching": MatchingNet,
    "siamese": Siamese,
    "snail": SNAIL,
    "reptile": Reptile,
    "imaml": IMAML,
    "lstm": LSTMMetaLearner,
    "cnp": CNP,
    "cnp_classifier": CNPClassifier,
    "anp": ANP,
    "oml": OML,
    "anml": ANML,
}


def register(name: str) -> Callable[[type[Learner]], type[Learner]]:
    """Class decorator: make a learner available to config files and the CLI as ``learner: {name: NAME}``."""

    def add(cls: type[Learner]) -> type[Learner]:
        if not (isinstance(cls, type) and issubclass(cls, Learner)):
            raise TypeError(f"register({name!r}): expected a subclass of allmap.Learner, got {cls!r}.")
        if name in LEARNERS and LEARNERS[name] is not cls:
            raise ValueError(
                f"register: the learner name {name!r} is taken by {LEARNERS[name].__name__}; choose another name."
            )
        LEARNERS[name] = cls
        return cls

    return add
