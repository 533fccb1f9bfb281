"""AutoML by the same calculus: hyperparameters and architectures learned by hypergradients.

Ordinary training on a train split is the inner problem and the validation loss the outer one; the
hypergradient strategies of :mod:`allmap.hypergrad` differentiate across training.

* :mod:`allmap.automl.bilevel`: declared hyperparameters (learning rates, weight decays, example weights,
  augmentation strength) learned by any strategy chosen by name;
* :mod:`allmap.automl.hd`: online hypergradient descent, HD-SGD and HD-Adam (Baydin et al. 2018);
* :mod:`allmap.automl.reweight`: learning to reweight examples (Ren et al. 2018);
* :mod:`allmap.automl.darts`: differentiable architecture search (Liu et al. 2019) and random search;
* :mod:`allmap.automl.data`: digits, Omniglot characters and class folders as train / validation / test splits.
"""

from allmap.automl.bilevel import BilevelProblem, History, Hyperparameters, HyperStep, evaluate, optimize, train_fixed
from allmap.automl.darts import CellNetwork, Genotype, SearchNetwork, random_cell, search
from allmap.automl.data import (
    Split,
    digits,
    flip_labels,
    from_class_images,
    load_data,
    omniglot_classes,
    stratified_split,
)
from allmap.automl.hd import HDSGD, HDAdam
from allmap.automl.reweight import ValidationReweighting, example_weights
from allmap.automl.training import fit

__all__ = [
    "Hyperparameters",
    "BilevelProblem",
    "HyperStep",
    "History",
    "optimize",
    "train_fixed",
    "evaluate",
    "Split",
    "digits",
    "omniglot_classes",
    "from_class_images",
    "flip_labels",
    "load_data",
    "stratified_split",
    "HDSGD",
    "HDAdam",
    "example_weights",
    "ValidationReweighting",
    "fit",
    "SearchNetwork",
    "CellNetwork",
    "Genotype",
    "search",
    "random_cell",
]
