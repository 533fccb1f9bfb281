"""The one test-evaluation pipeline of a run, used by the trainer at the end of training and by
``allmap eval``: the fixed test tasks of the config's protocol, scored (sharded under torchrun), with the
line that names the protocol and the record's status."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from allmap.app.build import build_family, check_disjoint, check_validation_held_out
from allmap.app.distributed import Dist, current, evaluate_sharded
from allmap.app.progress import TaskProgress
from allmap.app.runs import results_record
from allmap.engine.evaluate import count_tasks, fixed_tasks, summarize
from allmap.engine.predictive import oracle_per_task
from allmap.learners.base import Learner
from allmap.learners.ensemble import Ensemble
from allmap.nets.norm import BatchStatNorm

__all__ = ["evaluate_run", "protocol"]

_PHASES = {"test": "test", "val": "validation"}


def protocol(
    config: dict[str, Any], family: Any, n: int, phase: str = "test", members: int = 1, batch_norm: bool = False
) -> str:
    """One line naming what the numbers are: family, shots, queries, number of tasks (``phase``: test or
    validation) and seed; ``members`` > 1: the scores are an ensemble's; ``batch_norm``: the model normalises
    with the statistics of each batch it sees, so a query's prediction depends on the other queries of its
    task (a transductive test, as in MAML's Omniglot numbers) and on how many there are."""
    task = config["task"]
    ways = f"{family.ways}-way " if hasattr(family, "ways") else ""
    detail = f" ({family.describe()})" if callable(getattr(family, "describe", None)) else ""
    shift = config["learner"].get("test_shift")
    shifts = f", embeddings averaged over test-time shifts of up to {shift} px" if shift else ""
    refine = config["learner"].get("transductive")
    if refine:
        shifts += f", transductive: prototypes refined {refine} times with each task's queries"
    if batch_norm:
        shifts += ", BatchNorm with the statistics of each task's batch of queries (transductive)"
    if members > 1:
        shifts += f", an ensemble of {members} models (mean class probabilities)"
    counts = family.counts() if callable(getattr(family, "counts", None)) else None
    per = "class" if ways else "task"  # an N-way episode has its queries per class
    counts = counts or f"{ways}{family.shots}-shot, {family.queries} {_plural(family.queries, 'query')} per {per}"
    return (
        f"{task['family']} {counts}{detail}{shifts}, {n} fixed {_PHASES[phase]} tasks (seed {config['eval']['seed']}); "
        "mean ± 95% CI (1.96·std/sqrt(n))"
    )


def _normalises_with_batch_statistics(module: Any) -> bool:
    if isinstance(module, BatchStatNorm):
        return True
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word[:-1] + "ies" if word.endswith("y") else word + "s"


def evaluate_run(
    learner: Learner,
    config: dict[str, Any],
    trained: Sequence[dict[str, Any]] = (),
    ctx: Dist | None = None,
    progress: bool = False,
    phase: str = "test",
) -> tuple[Any, dict[str, Any]]:
    """``(test family, record)`` of ``learner`` on the test protocol of ``config`` (``phase="val"``: on its
    validation tasks, for choosing a model without touching the test classes; refused where the protocol's
    validation classes are part of its training side).

    ``record`` is :func:`~allmap.app.runs.results_record`'s: ``status`` ("ok", or "failed" with the reason
    when a metric is NaN or infinite), ``protocol`` and ``metrics`` (mean ± 95% CI). For a predictive
    learner on a family with an exact posterior (``family.oracle``: GP tasks), the oracle's metrics on the
    same tasks are reported beside the learner's (``oracle_target_loglik``, ...). With ``trained`` (the
    configs the weights were trained with, when ``config`` is another protocol, one per member of an ensemble)
    the test classes must not overlap their training classes. ``progress``: a bar counting test tasks on
    rank 0's stderr.
    """
    ctx = current() if ctx is None else ctx
    if phase not in _PHASES:
        raise ValueError(f"evaluate_run: expected phase 'test' or 'val', got {phase!r}.")
    family = build_family(config, phase)
    check_validation_held_out(config, family)
    for config_trained in trained:
        check_disjoint(build_family(config_trained, "train"), family)
    ev = config["eval"]
    tasks = fixed_tasks(family, ev["tasks"], ev["seed"])
    n = count_tasks(tasks)
    with TaskProgress("test", enabled=progress and ctx.is_main, total=n) as bar:
        results = evaluate_sharded(learner, tasks, ev["steps"], ev["chunk"], ctx, progress=bar)
    if learner.spec.predictive and callable(getattr(family, "oracle", None)):  # e.g. the exact GP posterior
        results.update({k: summarize(v) for k, v in oracle_per_task(family, tasks).items()})
    members = len(learner.members) if isinstance(learner, Ensemble) else 1
    batch_norm = any(_normalises_with_batch_statistics(m) for m in learner.modules())
    return family, results_record(protocol(config, family, n, phase, members, batch_norm), results)
