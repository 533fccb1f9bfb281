"""Honest evaluation: fixed seeded test tasks, scored as mean ± 1.96·std/sqrt(n) over tasks."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from allmap.engine.execution import evaluation_layout, evaluation_vmap
from allmap.engine.forked import can_fork, even_shares, run_forked
from allmap.engine.predictive import PREDICTIVE_METRICS, distribution_of, mixture_metrics
from allmap.engine.spec import Mapping
from allmap.engine.validate import check_tasks
from allmap.nets.conv import nhwc
from allmap.nets.norm import first_order_only
from allmap.tasks.batch import TaskBatch

__all__ = [
    "evaluate",
    "evaluate_per_task",
    "evaluation_workers",
    "summarize",
    "fixed_tasks",
    "task_batches",
    "count_tasks",
    "metric_names",
    "step_names",
    "Progress",
]

#: ``progress(done, total)``: ``done`` of the ``total`` tasks this process evaluates are finished.
Progress = Callable[[int, int], None]


def fixed_tasks(family, n: int, seed: int) -> TaskBatch | list[TaskBatch]:
    """The ``n`` test tasks fixed by ``seed`` (the same on every call and machine): one batch, or for a family
    whose test tasks differ in size (``family.fixed_tasks``: GP tasks with their own context counts) a list of
    batches, one per size, holding ``n`` tasks in all."""
    generator = torch.Generator().manual_seed(seed)
    if callable(getattr(family, "fixed_tasks", None)):
        return family.fixed_tasks(n, generator)
    return family.sample(n, generator)


def task_batches(tasks: TaskBatch | Sequence[TaskBatch]) -> list[TaskBatch]:
    """``tasks`` as a list of batches (a single batch is a list of one)."""
    return [tasks] if isinstance(tasks, TaskBatch) else list(tasks)


def count_tasks(tasks: TaskBatch | Sequence[TaskBatch]) -> int:
    """The number of tasks in a batch or a list of batches."""
    return sum(len(b) for b in task_batches(tasks))


def summarize(values: Tensor) -> dict[str, float]:
    """``mean``, ``ci95 = 1.96 * std / sqrt(n)`` (sample std), ``std`` and ``n`` of a 1-D tensor."""
    values = values.double().flatten()
    n = values.numel()
    std = float(values.std(unbiased=True)) if n > 1 else 0.0
    return {"mean": float(values.mean()), "ci95": 1.96 * std / math.sqrt(n), "std": std, "n": n}


def step_names(learner: Mapping, steps: Sequence[int]) -> list[str]:
    """Metric suffixes: ``@k`` (after k inner steps) for learners that adapt in steps, else nothing."""
    return [f"@{k}" for k in steps] if learner.spec.adapts_in_steps else [""]


def metric_names(learner: Mapping) -> list[str]:
    """What :func:`evaluate` reports per task (before the step suffix): the loss, the accuracy of
    classifiers, and for predictive learners (``[mean, std]`` outputs, see :mod:`allmap.engine.predictive`)
    the log-likelihood per point of the targets and of the context, the MSE of the predictive mean and the
    coverage of the central 95% interval of the targets."""
    names = ["loss"] + (["accuracy"] if learner.classification else [])
    return names + (list(PREDICTIVE_METRICS) if learner.spec.predictive else [])


def _per_task(learner: Mapping, steps: Sequence[int]):
    predictive = learner.spec.predictive

    def metrics(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        rows = []
        for model in learner.adapt_path(sx, sy, steps):
            pred = model(qx)
            loss = learner.loss_fn(pred, qy)
            row = [loss]
            if learner.classification:
                row.append((pred.argmax(-1) == qy).to(loss.dtype).mean())
            if predictive:
                target_ll, mse, coverage = mixture_metrics(*distribution_of(model, qx), qy)
                row += [target_ll, mixture_metrics(*distribution_of(model, sx), sy)[0], mse, coverage]
            rows.append(torch.stack(row).detach())
        return torch.stack(rows)

    return metrics


def _convert_weights(learner: Mapping, layout: torch.memory_format | None) -> Callable[[], None]:
    """Store ``learner``'s 4-d parameters in ``layout`` (the same values) and return the function that puts
    them back as they were. NHWC convolutions want NHWC weights as well as NHWC inputs: with NCHW weights
    the layout brings the evaluation no speed."""
    if layout is None:
        return lambda: None
    saved = [(p, p.data) for p in learner.parameters() if p.dim() == 4 and not p.is_contiguous(memory_format=layout)]
    for p, data in saved:
        p.data = data.contiguous(memory_format=layout)

    def restore() -> None:
        for p, data in saved:
            p.data = data
        saved.clear()

    return restore


def evaluate(
    learner: Mapping,
    tasks: TaskBatch | Sequence[TaskBatch],
    steps: Sequence[int] = (0, 1, 5, 10),
    chunk: int = 100,
    workers: int | str = "auto",
    progress: Progress | None = None,
) -> dict[str, dict[str, float]]:
    """Loss (and accuracy for classification) of ``learner`` on ``tasks``, as mean ± 95% CI over tasks.

    Gradient-based learners are scored after each number of inner steps in ``steps`` (0 = before
    adaptation); one-shot learners (metric, amortised) once. Predictive learners (``[mean, std]`` outputs)
    are also scored by the log-likelihood of their predictive distribution, its MSE and its coverage
    (:func:`metric_names`). Adaptation computes inner gradients, but no
    meta-gradient is kept, so it runs under ``torch.inference_mode`` (``no_grad`` for learners that call
    ``torch.autograd`` while adapting). Tasks run under ``vmap`` per chunk of ``chunk`` tasks, or one at a
    time for convolution nets on CPU, run in NHWC layout (see :func:`allmap.engine.execution.evaluation_vmap`
    and :func:`~allmap.engine.execution.evaluation_layout`). ``workers`` processes (forked, each with one
    share of the tasks and one intra-op thread; Linux, CPU) run at once, ``0`` runs here; ``"auto"`` is
    :func:`evaluation_workers`. Every setting gives the same numbers up to float rounding (the thread count
    changes the order of sums inside kernels, which can flip a near-tie prediction of an untrained model).
    ``progress(done, total)``, if given, is called as tasks finish: after each chunk here, after each
    worker's share with workers (e.g. the CLI's progress bar); it changes no number. ``tasks`` may be a list
    of batches (test tasks of several sizes, :func:`fixed_tasks`): the statistics are over all their tasks.
    Returns ``{"loss@1": {"mean", "ci95", "std", "n"}, ...}``.
    """
    return {
        name: summarize(v) for name, v in evaluate_per_task(learner, tasks, steps, chunk, workers, progress).items()
    }


def evaluate_per_task(
    learner: Mapping,
    tasks: TaskBatch | Sequence[TaskBatch],
    steps: Sequence[int] = (0, 1, 5, 10),
    chunk: int = 100,
    workers: int | str = "auto",
    progress: Progress | None = None,
) -> dict[str, Tensor]:
    """The metrics of :func:`evaluate` task by task (``{"loss@1": Tensor [tasks], ...}``), for paired
    comparisons of two learners on the same tasks."""
    batches = task_batches(tasks)
    for batch in batches:
        check_tasks(learner, batch, "evaluate")
    names = step_names(learner, steps)
    steps = list(steps) if names != [""] else [0]
    total = count_tasks(batches)
    n_workers = evaluation_workers(learner, total) if workers == "auto" else workers
    if not isinstance(n_workers, int) or n_workers < 0:
        raise ValueError(f"evaluate: workers must be 'auto' or a number of processes >= 0, got {workers!r}.")
    counted = _counter(progress, total)
    values = torch.cat([_batch_values(learner, b, steps, chunk, n_workers, counted) for b in batches])
    return {
        f"{metric}{suffix}": values[:, j, m]
        for j, suffix in enumerate(names)
        for m, metric in enumerate(metric_names(learner))
    }


def _batch_values(
    learner: Mapping, tasks: TaskBatch, steps: list[int], chunk: int, workers: int, counted: Callable[[int], None]
) -> Tensor:
    """``[tasks, steps, metrics]`` of one batch, here or in ``workers`` forked processes."""
    workers = min(workers, len(tasks)) if can_fork() else 0
    if not workers:
        return _values(learner, tasks, steps, chunk, counted)
    bounds = even_shares(len(tasks), workers)
    shares = [tasks[lo:hi] for lo, hi in bounds]
    return torch.cat(
        run_forked(
            lambda share: _values(learner, share, steps, chunk),
            shares,
            done=lambda i: counted(bounds[i][1] - bounds[i][0]),
        )
    )


def evaluation_workers(learner: Mapping, n_tasks: int) -> int:
    """How many processes :func:`evaluate` forks by default: one per intra-op thread for convolution nets
    evaluated one task at a time on CPU, given two or more threads and at least 8 tasks per process; else 0
    (run in this process: one forked process with one thread is no faster than this one).

    Small convolutions keep several intra-op threads only partly busy, so processes with one thread each
    score conv4 episodes faster than one process with as many threads (see docs/results.md). Nets that run
    under ``vmap`` (MLPs) stay in one process: their batched kernels already fill the threads.
    """
    device = next((p.device for p in learner.parameters()), torch.device("cpu"))
    if device.type != "cpu" or evaluation_vmap(learner, device):
        return 0
    threads = torch.get_num_threads()
    return threads if threads > 1 and n_tasks >= 8 * threads else 0


def _counter(progress: Progress | None, total: int) -> Callable[[int], None]:
    """``add(n)``: ``n`` more tasks are done; tells ``progress`` the running count (nothing without one)."""
    done = [0]

    def add(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    return add


def _values(
    learner: Mapping, tasks: TaskBatch, steps: list[int], chunk: int, done: Callable[[int], None] = lambda n: None
) -> Tensor:
    """``[tasks, steps, metrics]``: the :func:`metric_names` of every task after each number of steps;
    ``done(n)`` after each chunk of ``n`` tasks."""
    fn = _per_task(learner, steps)
    device = next(learner.parameters()).device
    use_vmap = evaluation_vmap(learner, device)
    layout = [evaluation_layout(learner, use_vmap, device)]  # dropped if the model needs NCHW

    def one_task(args: tuple[Tensor, ...], i: int) -> tuple[Tensor, ...]:
        task = tuple(a[i] for a in args)
        if layout[0] is None:
            return task
        return tuple(nhwc(a) if a.dim() == 4 else a for a in task)

    batched = torch.func.vmap(fn, randomness="different")
    was_training = learner.training
    learner.eval()
    restore = _convert_weights(learner, layout[0])
    parts = []
    grad_mode = torch.inference_mode  # no meta-graph; torch.func.grad in the inner loop still works under it
    try:
        for part in tasks.chunks(chunk):
            part = part.to(device)
            args = (part.support_x, part.support_y, part.query_x, part.query_y)
            while True:
                try:
                    with grad_mode(), first_order_only():
                        if use_vmap:  # first order only here, so vmap is exact even with BatchNorm
                            parts.append(batched(*args))
                        else:
                            parts.append(torch.stack([fn(*one_task(args, i)) for i in range(len(part))]))
                    done(len(part))
                    break
                except RuntimeError as err:
                    if layout[0] is not None:  # e.g. a model calling .view() on a convolution's output
                        layout[0] = None
                        restore()
                        continue
                    # a learner calling torch.autograd inside adapt: inference tensors can't be saved
                    if grad_mode is torch.no_grad or "nference" not in str(err):
                        raise
                    grad_mode = torch.no_grad
    finally:
        restore()
        learner.train(was_training)
    return torch.cat(parts).cpu()
