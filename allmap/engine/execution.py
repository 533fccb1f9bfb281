"""How the tasks of a meta-batch run: vectorised, in chunks, or one at a time, eager or compiled.

Every mode computes the same mean query loss and the same meta-gradient as a plain per-task loop (the
float64 tests check this); they differ only in speed and memory:

=========================  ======================================================================
``Execution("vmap")``      all tasks in one ``torch.func.vmap`` call (small models: Python overhead
                           is most of a per-task loop's time, so batching across tasks wins)
``Execution("vmap", 4)``   ``vmap`` over chunks of 4 tasks (bounds the memory of one call)
``Execution("loop")``      one task at a time; :meth:`Learner.meta_backward` runs the backward pass
                           after every task, so memory stays flat in the meta-batch
``Execution("loop", 8)``   one task at a time, backward after every 8 tasks
``compile=True``           ``torch.compile`` the per-chunk loss (opt-in; compile time is reported in
                           ``learner.execution_stats`` and the compiled function is cached; if
                           compilation fails the learner falls back to eager with a warning)
``workers=2``              :meth:`Learner.meta_backward` shares the tasks between this process and
                           a forked one, each with one intra-op thread, and adds their gradients
                           here (opt-in; CPU on Linux, else all of it runs here)
=========================  ======================================================================

With ``vmap`` and ``compile``, :meth:`Learner.meta_backward` goes further: the meta-gradient of a chunk is one
compiled ``torch.func.grad_and_value`` of the mean loss (:func:`compiled_meta_gradient`), so no autograd graph
is recorded and no autograd engine runs per step; the gradient is added to ``.grad``.
``meta_loss(tasks).backward()`` still compiles the forward pass only.

The automatic rule (``mode="auto"``) follows measurements side by side with the peer libraries
(``benchmarks/peers.py``; figures on docs/results.md):

* models with ``torch.nn`` BatchNorm layers run one task at a time: torch's vmapped second derivative of
  ``batch_norm`` is wrong (:mod:`allmap.compat`). Gradient-based learners replace affine BatchNorm layers
  with the exact :class:`~allmap.nets.BatchStatNorm`, so this applies only to other learners and to
  BatchNorm without affine parameters;
* convolution nets on CPU run one task at a time, with backward per task in :meth:`meta_backward`: conv
  kernels are compute-bound, small per-task batches stay in cache, and ``vmap`` in chunks was slower at
  several times the memory. Tasks of at most :data:`SMALL_TASK` examples (MAML's Omniglot training
  episodes: 5 support + 5 query images) are the exception: one image batch per task is too small to keep
  the cores busy, and ``vmap`` over the meta-batch is faster;
* everything else (MLPs and other small models, and convolution nets on a GPU, where per-task loops become
  launch-bound) runs all tasks in one ``vmap`` call: a per-task loop is bound by Python and kernel-launch
  overhead there.

Evaluation (:func:`allmap.engine.evaluate.evaluate`, first order, under ``torch.inference_mode``) uses the
same rule without the BatchNorm exception (:func:`evaluation_vmap`). When it runs a convolution net one task
at a time on CPU, it stores the 4-d weights and feeds the images in NHWC (``channels_last``) layout for the
duration of the call (:func:`evaluation_layout`; NCHW max-pooling and BatchNorm are several times slower on
CPU), and its inner loop calls torch's fused ``batch_norm`` (:func:`allmap.nets.norm.first_order_only`).
One-channel images need :func:`allmap.nets.conv.nhwc`: they are contiguous in both layouts, so
``contiguous(channels_last)`` would keep their NCHW strides and the first, largest block would run NCHW.
Training keeps the model's layout (``Conv4(channels_last=True)`` opts in): torch's NHWC BatchNorm is less
precise in float32 and second-order meta-gradients amplify it (see :class:`allmap.nets.Conv4`).

Set it per learner with ``learner.execution = Execution(...)`` (or a spec string ``"loop"``, ``"vmap(4)"``,
``"loop(8)+compile"``), or in a config file as ``learner: {..., execution: "vmap+compile"}``.
"""

from __future__ import annotations

import re
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from allmap.compat import vmap_batch_norm_second_order_exact
from allmap.tasks.batch import TaskBatch

__all__ = [
    "Execution",
    "Plan",
    "resolve_execution",
    "plan",
    "task_losses",
    "chunk_ranges",
    "compiled_cache",
    "compiled_meta_gradient",
    "functional_eligible",
    "evaluation_vmap",
    "evaluation_layout",
    "examples_per_task",
    "SMALL_TASK",
]

MODES = ("auto", "vmap", "loop")
#: compiled chunk functions per learner (kept outside the module so deepcopy and pickling never see them)
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SPEC = re.compile(r"^\s*(auto|vmap|loop)\s*(?:\(\s*(\d+)\s*\))?\s*(\+\s*compile)?\s*$")


@dataclass(frozen=True)
class Execution:
    """How a learner runs the tasks of a meta-batch.

    Args:
        mode: ``"vmap"`` (vectorise the tasks of a chunk with ``torch.func.vmap``), ``"loop"`` (one task at
            a time) or ``"auto"`` (chosen per model and device, see the module docstring).
        chunk: tasks per chunk. A chunk is one ``vmap`` call in ``"vmap"`` mode, and one backward pass in
            :meth:`Learner.meta_backward`. ``None``: the whole meta-batch for ``"vmap"``, one task for ``"loop"``.
        compile: ``torch.compile`` the loss of a chunk (opt-in).
        workers: processes that share the tasks of :meth:`Learner.meta_backward`, this one and
            ``workers - 1`` forked ones (opt-in; ``0`` or ``1``: this process alone). For convolution nets
            on a CPU with as many cores; set it in a config as
            ``execution: {mode: auto, workers: 2}``.

    Example:
        >>> Execution("loop", chunk=4)
        Execution(mode='loop', chunk=4, compile=False, workers=0)
        >>> resolve_execution("vmap(8)+compile")
        Execution(mode='vmap', chunk=8, compile=True, workers=0)
    """

    mode: str = "auto"
    chunk: int | None = None
    compile: bool = False
    workers: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Execution: unknown mode {self.mode!r}; expected one of {', '.join(MODES)}.")
        if self.chunk is not None and (
            isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1
        ):
            raise ValueError(f"Execution: expected chunk to be a positive integer or None, got {self.chunk!r}.")
        if not isinstance(self.compile, bool):
            raise TypeError(f"Execution: expected compile to be a bool, got {type(self.compile).__name__}.")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(
                f"Execution: expected workers (processes, this one included) to be an integer >= 0, "
                f"got {self.workers!r}."
            )


def resolve_execution(spec: Execution | str | dict[str, Any] | None) -> Execution:
    """An :class:`Execution` from itself, ``None`` (auto), a spec string such as ``"loop(4)"`` or
    ``"vmap+compile"``, or a mapping of its fields (as in config files)."""
    if spec is None:
        return Execution()
    if isinstance(spec, Execution):
        return spec
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"mode", "chunk", "compile", "workers"})
        if unknown:
            raise ValueError(f"execution: unknown key(s) {unknown}; valid keys: mode, chunk, compile, workers.")
        return Execution(**spec)
    if isinstance(spec, str):
        match = _SPEC.match(spec)
        if not match:
            raise ValueError(
                f"cannot parse the execution spec {spec!r}; expected MODE[(CHUNK)][+compile] with MODE one of "
                f"{', '.join(MODES)}, e.g. 'loop', 'vmap(8)' or 'auto+compile'."
            )
        mode, chunk, comp = match.groups()
        return Execution(mode, int(chunk) if chunk else None, bool(comp))
    raise TypeError(f"execution: expected an Execution, a spec string, a mapping or None, got {type(spec).__name__}.")


@dataclass(frozen=True)
class Plan:
    """The resolved way one meta-batch runs: ``vmap`` or not, tasks per chunk, compiled or not."""

    vmap: bool
    chunk: int
    compile: bool
    reason: str = field(default="", compare=False)


def _has(model: nn.Module, kinds: tuple[type, ...]) -> bool:
    return any(isinstance(m, kinds) for m in model.modules())


#: convolution nets on CPU batch tasks of at most this many examples (support + query) across the meta-batch
SMALL_TASK = 20


def examples_per_task(tasks: TaskBatch) -> int:
    """Support plus query examples of one task."""
    return int(tasks.support_x.shape[1] + tasks.query_x.shape[1])


SEQUENTIAL = "the learner carries state from task to task, so its tasks run one after another"


def plan(learner: Any, tasks: int, device: torch.device | None = None, examples: int | None = None) -> Plan:
    """The :class:`Plan` of ``learner.execution`` for a meta-batch of ``tasks`` tasks of ``examples``
    examples each (support + query; ``None``: unknown, taken as large)."""
    ex: Execution = learner.execution
    if device is None:
        device = next((p.device for p in learner.parameters()), torch.device("cpu"))
    small = examples is not None and examples <= SMALL_TASK
    key = ("plan", tasks, small, device, learner.spec, len(learner._modules))
    cache = compiled_cache(learner)
    if key not in cache:  # the hot loop asks every iteration; walking the modules each time is avoidable
        cache[key] = _plan(learner, ex, tasks, device, small)
    return cache[key]


def _plan(learner: Any, ex: Execution, tasks: int, device: torch.device, small: bool = False) -> Plan:
    mode = ex.mode
    bn = not vmap_batch_norm_second_order_exact() and _has(learner, (nn.modules.batchnorm._BatchNorm,))
    if mode == "auto":
        if bn:
            mode, reason = "loop", "BatchNorm: torch's vmapped second derivative of batch_norm is wrong (allmap.compat)"
        elif device.type == "cpu" and _has(learner, (nn.modules.conv._ConvNd,)) and not small:
            mode, reason = "loop", "convolutions on CPU: per-task batches are faster and keep memory flat"
        elif device.type == "cpu" and _has(learner, (nn.modules.conv._ConvNd,)):
            mode, reason = (
                "vmap",
                (
                    f"convolutions on CPU, tasks of at most {SMALL_TASK} examples: per-task "
                    "batches are too small to keep the cores busy"
                ),
            )
        else:
            mode, reason = "vmap", "small model or accelerator: batching across tasks removes per-task overhead"
    else:
        reason = "set by the user"
    if mode == "vmap" and not learner.spec.vmappable:
        mode, reason = "loop", "the meta-gradient strategy has a custom backward pass that cannot run under vmap"
    if learner.spec.sequential:  # state carried from task to task: one after another, eagerly
        return Plan(vmap=False, chunk=min(ex.chunk or 1, max(tasks, 1)), compile=False, reason=SEQUENTIAL)
    if mode == "vmap" and bn and not learner.spec.first_order:
        raise ValueError(
            f"{type(learner).__name__}: vmap with BatchNorm layers would give a wrong meta-gradient (torch's vmap "
            "rule for the second derivative of batch_norm is incorrect). Use execution='auto' or 'loop' to run "
            "tasks one at a time."
        )
    chunk = ex.chunk or (tasks if mode == "vmap" else 1)
    return Plan(vmap=mode == "vmap", chunk=min(chunk, max(tasks, 1)), compile=ex.compile, reason=reason)


def evaluation_vmap(learner: Any, device: torch.device | None = None) -> bool:
    """Whether evaluation (adaptation without a meta-gradient) runs the tasks of a chunk under ``vmap``.

    The learner's explicit choice wins (``execution.mode`` "vmap" or "loop"); automatically, convolution nets on CPU run one task at a time (faster, see the module docstring) and
    everything else under ``vmap``. BatchNorm is no obstacle here: evaluation is first order only.
    """
    mode = learner.execution.mode
    if mode != "auto":
        return mode == "vmap"
    if device is None:
        device = next((p.device for p in learner.parameters()), torch.device("cpu"))
    return not (device.type == "cpu" and _has(learner, (nn.modules.conv._ConvNd,)))


def evaluation_layout(learner: Any, vmap: bool, device: torch.device) -> torch.memory_format | None:
    """``torch.channels_last`` where evaluation runs a convolution net one task at a time on CPU, else ``None``
    (weights and inputs as given). The same function in either layout; NHWC is faster there (see the module
    docstring)."""
    if vmap or device.type != "cpu" or not _has(learner, (nn.Conv2d,)):
        return None
    return torch.channels_last


def chunk_ranges(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive chunks of at most ``chunk`` out of ``n`` tasks."""
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


def compiled_cache(learner: Any) -> dict:
    """Compiled functions, seen input signatures and plans of ``learner``; emptied when its execution changes."""
    if learner not in _COMPILED:
        _COMPILED[learner] = {}
    return _COMPILED[learner]


def _eager_fn(learner: Any, vmap: bool) -> Callable[..., Tensor]:
    """Per-task losses ``[n]`` of a chunk of tasks given as four stacked tensors."""
    if vmap:
        return torch.func.vmap(learner.task_loss, randomness="different")

    def loop(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        return torch.stack([learner.task_loss(sx[i], sy[i], qx[i], qy[i]) for i in range(sx.shape[0])])

    return loop


def _chunk_fn(learner: Any, p: Plan) -> Callable[..., Tensor]:
    """The (possibly compiled, cached) function computing the per-task losses of one chunk."""
    if not p.compile or learner.execution_stats.get("compile_failed"):
        return _eager_fn(learner, p.vmap)
    cache = compiled_cache(learner)
    if p.vmap not in cache:
        cache[p.vmap] = torch.compile(_eager_fn(learner, p.vmap), dynamic=False)
    return cache[p.vmap]


def _signature(args: tuple[Tensor, ...]) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device) for a in args) + (torch.is_grad_enabled(),)


def _compile_failed(learner: Any, err: Exception, stacklevel: int) -> None:
    """Record a compiler failure in ``learner.execution_stats`` and warn once: the learner runs eagerly from
    now on (the same function, so the same results)."""
    stats = learner.execution_stats
    stats["compile_failed"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    warnings.warn(
        f"{type(learner).__name__}: torch.compile failed ({stats['compile_failed']}); running eagerly from now on "
        "(same results, no speed-up).",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def _count_compile(stats: dict, start: float) -> None:
    """Add one compilation, begun at ``start`` (``time.perf_counter``), to ``execution_stats``."""
    stats["compile_seconds"] = stats.get("compile_seconds", 0.0) + time.perf_counter() - start
    stats["compiles"] = stats.get("compiles", 0) + 1


def _run_chunk(learner: Any, p: Plan, args: tuple[Tensor, ...]) -> Tensor:
    fn = _chunk_fn(learner, p)
    if not p.compile or learner.execution_stats.get("compile_failed"):
        return fn(*args)
    stats = learner.execution_stats
    key = _signature(args)
    seen = compiled_cache(learner).setdefault("signatures", set())
    if key in seen:
        return fn(*args)
    start = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the identical eager path
        _compile_failed(learner, err, stacklevel=5)
        return _eager_fn(learner, p.vmap)(*args)
    seen.add(key)
    _count_compile(stats, start)  # the first call with new shapes compiles (its time includes one run)
    return out


class _ChunkLosses(nn.Module):
    """``learner``'s per-task losses of a chunk as a module, so ``functional_call`` can swap its parameters."""

    def __init__(self, learner: nn.Module, vmap: bool) -> None:
        super().__init__()
        self.learner = learner
        self.vmap = vmap

    def forward(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        return _eager_fn(self.learner, self.vmap)(sx, sy, qx, qy)


def functional_eligible(learner: Any, p: Plan) -> bool:
    """Whether :func:`compiled_meta_gradient` may replace ``loss.backward()`` for this plan: compiled and
    vectorised, a learner whose meta-loss is the mean of its per-task losses and without buffers (nothing
    that a forward pass could update in place)."""
    return (
        p.compile
        and p.vmap
        and not learner.execution_stats.get("compile_failed")
        and learner.spec.per_task_loss
        and not learner.spec.whole_loss
        and next(learner.buffers(), None) is None
    )


def _gradient_fn(learner: Any, vmap: bool) -> Callable[..., tuple[dict[str, Tensor], Tensor]]:
    """Compiled ``(params, frozen, sx, sy, qx, qy) -> (d mean_loss / d params, mean_loss)``, cached."""
    cache = compiled_cache(learner)
    key = ("gradient", vmap)
    if key not in cache:
        module = _ChunkLosses(learner, vmap)

        def mean_loss(params: dict[str, Tensor], frozen: dict[str, Tensor], *args: Tensor) -> Tensor:
            return torch.func.functional_call(module, {**frozen, **params}, args).mean()

        cache[key] = torch.compile(torch.func.grad_and_value(mean_loss), dynamic=False)
    return cache[key]


def compiled_meta_gradient(learner: Any, p: Plan, args: tuple[Tensor, ...], scale: float) -> Tensor | None:
    """Add ``scale * d mean_loss / d theta`` of one chunk to the parameters' ``.grad``; return the scaled
    mean loss (detached), or ``None`` if compilation failed (the caller then runs the eager path).

    The whole meta-gradient (inner loop, query loss and its derivative, through ``torch.func.grad``) is one
    compiled graph: no autograd graph is recorded and no autograd engine runs.
    """
    named = [(f"learner.{n}", t) for n, t in learner.named_parameters()]
    params = {n: t.detach() for n, t in named if t.requires_grad}
    frozen = {n: t.detach() for n, t in named if not t.requires_grad}
    fn = _gradient_fn(learner, p.vmap)
    stats = learner.execution_stats
    key = ("gradient",) + _signature(args)
    seen = compiled_cache(learner).setdefault("signatures", set())
    start = time.perf_counter()
    try:
        grads, loss = fn(params, frozen, *args)
    except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the identical eager path
        _compile_failed(learner, err, stacklevel=4)
        return None
    if key not in seen:
        seen.add(key)
        _count_compile(stats, start)
    with torch.no_grad():
        for name, t in named:
            if name in grads:
                g = grads[name] if scale == 1.0 else grads[name] * scale
                if t.grad is None:
                    t.grad = g  # a fresh tensor of the compiled graph
                else:
                    t.grad.add_(g)
    return loss if scale == 1.0 else loss * scale


def task_losses(learner: Any, tasks: TaskBatch, p: Plan | None = None) -> Tensor:
    """Query loss of every task ``[B]``, computed chunk by chunk as ``p`` (default: the learner's plan) says.

    No host synchronisation happens here: chunks are slices of the stacked task tensors.
    """
    p = p or plan(learner, len(tasks), tasks.support_x.device, examples_per_task(tasks))
    args = (tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)
    n = args[0].shape[0]
    if p.chunk >= n and (p.vmap or p.compile):
        return _run_chunk(learner, p, args)
    if not p.vmap and not p.compile:
        return _eager_fn(learner, False)(*args)
    return torch.cat([_run_chunk(learner, p, tuple(a[s:e] for a in args)) for s, e in chunk_ranges(n, p.chunk)])
