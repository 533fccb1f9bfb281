"""One file per algorithm family; every learner is a map support set -> task model."""

from allmap.learners.base import Learner, TaskModel
from allmap.learners.hypernet import HyperNetwork
from allmap.learners.maml import ANIL, MAML
from allmap.learners.matching import MatchingNet
from allmap.learners.metasgd import MetaSGD
from allmap.learners.protonet import ProtoNet
from allmap.learners.siamese import Siamese
from allmap.learners.reptile import Reptile
from allmap.learners.imaml import IMAML
from allmap.learners.lstm import LSTMMetaLearner

__all__ = ["Learner", "TaskModel", "MAML", "ANIL", "MetaSGD", "HyperNetwork", "Reptile", "IMAML", "LSTMMetaLearner",
           "ProtoNet", "MatchingNet", "Siamese"]
