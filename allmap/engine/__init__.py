"""The engine: runs any learner over a batch of tasks (execution plans, vmap / loop / chunks, compile,
forked workers, ``meta_backward``, evaluation), knowing learners only through :mod:`allmap.engine.spec`."""

from allmap.engine.backward import meta_backward
from allmap.engine.evaluate import evaluate, evaluate_per_task, fixed_tasks, summarize
from allmap.engine.execution import Execution, Plan, plan, resolve_execution
from allmap.engine.spec import LearnerSpec, Mapping
from allmap.engine.validate import check_support, check_tasks

__all__ = [
    "meta_backward",
    "evaluate",
    "evaluate_per_task",
    "fixed_tasks",
    "summarize",
    "Execution",
    "Plan",
    "plan",
    "resolve_execution",
    "LearnerSpec",
    "Mapping",
    "check_support",
    "check_tasks",
]
