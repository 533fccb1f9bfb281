"""One file per algorithm family; every learner is a map support set -> task model."""

from allmap.learners.base import Learner, TaskModel
from allmap.learners.hypernet import HyperNetwork
from allmap.learners.maml import ANIL, MAML
from allmap.learners.metasgd import MetaSGD

__all__ = ["Learner", "TaskModel", "MAML", "ANIL", "MetaSGD", "HyperNetwork"]
