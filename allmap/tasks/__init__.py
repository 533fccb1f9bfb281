"""Where tasks come from."""

from allmap.tasks.batch import TaskBatch
from allmap.tasks.families import FAMILIES, LinearRegression, Logistic2D, Sinusoid, TaskFamily

__all__ = ["TaskBatch", "TaskFamily", "Sinusoid", "LinearRegression", "Logistic2D", "FAMILIES"]
