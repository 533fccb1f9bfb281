"""Where tasks come from."""

from allmap.tasks.batch import TaskBatch
from allmap.tasks.episodes import ClassImages, Episodes, EpisodeStream, gaussian_classes
from allmap.tasks.families import FAMILIES, LinearRegression, Logistic2D, Sinusoid, TaskFamily
from allmap.tasks.gp import GPRegression, gp_posterior
from allmap.tasks.imagefolder import ImageFolder
from allmap.tasks.omniglot import Omniglot, load_omniglot
from allmap.tasks.streams import ContinualStream, OMLTrajectories, class_incremental

__all__ = [
    "TaskBatch",
    "TaskFamily",
    "Sinusoid",
    "LinearRegression",
    "Logistic2D",
    "FAMILIES",
    "ClassImages",
    "Episodes",
    "EpisodeStream",
    "gaussian_classes",
    "GPRegression",
    "gp_posterior",
    "ImageFolder",
    "Omniglot",
    "load_omniglot",
    "ContinualStream",
    "class_incremental",
    "OMLTrajectories",
]
