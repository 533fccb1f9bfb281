"""allmap side by side with learn2learn, higher and TorchOpt: tasks/s, peak memory, meta-gradient agreement.

    flock /tmp/allmap-bench.lock python benchmarks/peers.py            # every workload, ~10 min on 2 cores
    python benchmarks/peers.py --smoke                                  # tiny sizes, in-process, seconds
    python benchmarks/peers.py --workloads sinusoid-1,conv4-5w1s --iters 5

Every implementation gets the identical model (same initial weights), the identical fixed meta-batch and
hyper-parameters; each runs in its own subprocess (so peak memory is its own), does one meta-gradient that
is compared with allmap's (relative difference ``||g_peer - g_allmap|| / ||g_allmap||``, must be < 1e-4),
``--warmup`` untimed iterations and ``--iters`` timed ones (zero_grad + meta-gradient; no optimizer step,
which is the same for everyone). Peak memory is the rise of the process's peak RSS (``VmHWM``, reset before
the run) above its RSS after building the model, data and implementation (code that torch.func loads on
first use is loaded before, by a toy call). Peers are optional (``pip install
allmap[bench]``); a missing one is skipped with a note. Omniglot workloads use real Omniglot episodes when
the data are available (``$ALLMAP_OMNIGLOT`` or ../shared/data/omniglot), else random 28x28 images.

Implementations: ``allmap`` (automatic execution: ``vmap`` for the MLP, a per-task loop with backward per
task for conv nets on CPU), ``allmap+compile`` (``torch.compile``; compile time reported and amortised over
a 70,000-iteration run), ``allmap-1pass`` (conv only: the same loop but one backward for the whole
meta-batch, to show what backward-per-task saves), ``allmap-forked`` (conv only:
``Execution(workers=threads)``, the tasks shared between this process and forked ones, one thread
each; the children's memory counts), and the peers' documented MAML patterns. On conv4 workloads the
peers run the network their users write (torch modules in learn2learn's block order, NCHW;
:func:`textbook_conv4`, the same parameters and function), and ``learn2learn@Conv4`` runs learn2learn on
allmap's ``Conv4``, so the table shows what allmap's network gives apart from what its learners give.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import allmap  # noqa: E402
from allmap.app.host import retain_freed_memory
from allmap.engine.evaluate import evaluate
from allmap.engine.execution import Execution, examples_per_task
from allmap.engine.forked import children_peak_mb, reset_peak_rss, rss_mb
from allmap.learners.base import without_running_stats
from allmap.learners.protonet import ProtoNet
from allmap.nets import MLP, Conv4
from allmap.tasks.batch import TaskBatch

PEERS = ("learn2learn", "higher", "torchopt")
RUN_ITERATIONS = 70_000  # the sinusoid-maml preset: compile time is amortised over it


@dataclass
class Workload:
    name: str
    description: str
    kind: str  # "maml", "protonet" or "eval"
    model: Callable[[], nn.Module]
    tasks: Callable[[], TaskBatch]
    loss: str
    inner_lr: float = 0.0
    steps: int = 0
    threads: int | None = None
    eval_steps: tuple[int, ...] = ()


# -- data ---------------------------------------------------------------------------------------------
def _omniglot(
    ways: int, shots: int, queries: int, n: int, seed: int, split: str = "train", random_images: bool = False
) -> TaskBatch:
    if not random_images:
        try:
            family = allmap.tasks.Omniglot(split=split, ways=ways, shots=shots, queries=queries)
            return family.sample(n, torch.Generator().manual_seed(seed))
        except (OSError, ValueError, RuntimeError) as err:
            print(f"note: Omniglot data unavailable ({type(err).__name__}: {err}); using random 28x28 images")
    g = torch.Generator().manual_seed(seed)
    sy = torch.arange(ways).repeat_interleave(shots).repeat(n, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(n, 1)
    return TaskBatch(
        torch.rand(n, ways * shots, 1, 28, 28, generator=g),
        sy,
        torch.rand(n, ways * queries, 1, 28, 28, generator=g),
        qy,
    )


def workloads(smoke: bool) -> dict[str, Workload]:
    """The benchmark's workloads (full size), or tiny versions of them (``smoke``)."""
    h = 8 if smoke else 64
    b = (lambda full: 2) if smoke else (lambda full: full)
    rand = smoke
    sin = allmap.tasks.Sinusoid(shots=10, queries=10)

    def sinusoid(n: int) -> Callable[[], TaskBatch]:
        return lambda: sin.sample(n, torch.Generator().manual_seed(0))

    return {
        w.name: w
        for w in [
            Workload(
                "sinusoid-1",
                "sinusoid MAML, MLP 1-40-40-1, K=10, meta-batch 25, 1 step",
                "maml",
                lambda: MLP([1, 40, 40, 1]),
                sinusoid(b(25)),
                "mse",
                0.01,
                1,
                threads=1,
            ),
            Workload(
                "sinusoid-5",
                "same, 5 inner steps",
                "maml",
                lambda: MLP([1, 40, 40, 1]),
                sinusoid(b(25)),
                "mse",
                0.01,
                5,
                threads=1,
            ),
            Workload(
                "conv4-5w1s",
                f"Omniglot conv4 ({h} filters) MAML 5-way 1-shot 15 query, meta-batch {b(32)}, 1 step, 2nd order",
                "maml",
                lambda: Conv4(1, h, 5),
                lambda: _omniglot(5, 1, 15, b(32), 0, random_images=rand),
                "cross_entropy",
                0.4,
                1,
            ),
            Workload(
                "conv4-20w1s-5",
                f"Omniglot conv4 MAML 20-way 1-shot 5 query, meta-batch {b(16)}, 5 steps",
                "maml",
                lambda: Conv4(1, h, 20),
                lambda: _omniglot(20, 1, 5, b(16), 0, random_images=rand),
                "cross_entropy",
                0.1,
                5,
            ),
            Workload(
                "protonet-60w",
                "ProtoNets conv4, one 60-way 1-shot 5-query training episode",
                "protonet",
                lambda: Conv4(1, h),
                lambda: _omniglot(60 if not smoke else 5, 1, 5, 1, 0, random_images=rand),
                "cross_entropy",
            ),
            Workload(
                "eval-600",
                f"evaluation of {6 if smoke else 600} Omniglot test episodes, conv4 MAML 5-way "
                "1-shot 15 query, accuracy after 0/1/3 steps",
                "eval",
                lambda: Conv4(1, h, 5),
                lambda: _omniglot(5, 1, 15, 6 if smoke else 600, 1000, "test", random_images=rand),
                "cross_entropy",
                0.4,
                3,
                eval_steps=(0, 1, 3),
            ),
        ]
    }


# -- implementations ------------------------------------------------------------------------------------
def _import_learn2learn():
    """learn2learn's algorithms without its package __init__ (which needs torchvision and gym)."""
    if "learn2learn" not in sys.modules:
        spec = importlib.util.find_spec("learn2learn")
        if spec is None or spec.origin is None:
            raise ImportError("learn2learn is not installed")
        shell = types.ModuleType("learn2learn")
        shell.__path__ = [os.path.dirname(spec.origin)]
        sys.modules["learn2learn"] = shell
    from learn2learn.algorithms.maml import MAML

    return MAML


def _loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    return F.mse_loss if name == "mse" else F.cross_entropy


def maml_step(impl: str, w: Workload, model: nn.Module, tasks: TaskBatch) -> tuple[Callable[[], None], list]:
    """``(step, params)``: ``step()`` accumulates the meta-gradient of the mean query loss into ``.grad``."""
    loss_fn, n = _loss(w.loss), len(tasks)
    sx, sy, qx, qy = tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y
    if impl.startswith("allmap"):
        learner = allmap.MAML(model, inner_lr=w.inner_lr, inner_steps=w.steps, loss=w.loss)
        if impl == "allmap+compile":
            learner.execution = "auto+compile"
            return (lambda: learner.meta_backward(tasks)), list(learner.parameters()), learner
        if impl == "allmap-1pass":
            return (lambda: learner.meta_loss(tasks).backward()), list(learner.parameters()), learner
        if impl == "allmap-forked":  # this process and forked ones share the tasks, one thread each
            learner.execution = Execution("auto", workers=torch.get_num_threads())
        return (lambda: learner.meta_backward(tasks)), list(learner.parameters()), learner
    if impl == "learn2learn":
        maml = _import_learn2learn()(model, lr=w.inner_lr, first_order=False)

        def step() -> None:
            for i in range(n):
                learner = maml.clone()
                for _ in range(w.steps):
                    learner.adapt(loss_fn(learner(sx[i]), sy[i]))
                (loss_fn(learner(qx[i]), qy[i]) / n).backward()

        return step, list(maml.parameters()), None
    if impl == "higher":
        import higher

        inner = torch.optim.SGD(model.parameters(), lr=w.inner_lr)

        def step() -> None:
            for i in range(n):
                with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                    for _ in range(w.steps):
                        diffopt.step(loss_fn(fmodel(sx[i]), sy[i]))
                    (loss_fn(fmodel(qx[i]), qy[i]) / n).backward()

        return step, list(model.parameters()), None
    if impl == "torchopt":
        import torchopt

        inner = torchopt.MetaSGD(model, lr=w.inner_lr)
        net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(inner, by="reference")

        def step() -> None:
            for i in range(n):
                for _ in range(w.steps):
                    inner.step(loss_fn(model(sx[i]), sy[i]))
                (loss_fn(model(qx[i]), qy[i]) / n).backward()
                torchopt.recover_state_dict(model, net_state)
                torchopt.recover_state_dict(inner, opt_state)

        return step, list(model.parameters()), None
    raise ValueError(f"unknown implementation {impl!r}")


def protonet_step(impl: str, w: Workload, model: nn.Module, tasks: TaskBatch):
    if impl == "allmap":
        learner = ProtoNet(model)
        return (lambda: learner.meta_backward(tasks)), list(learner.parameters()), learner
    if impl == "learn2learn":  # learn2learn's ProtoNet example: plain torch over one episode at a time

        def step() -> None:
            for i in range(len(tasks)):
                ways = int(tasks.support_y[i].max()) + 1
                emb = model(torch.cat([tasks.support_x[i], tasks.query_x[i]]))
                s, q = emb[: tasks.shots], emb[tasks.shots :]
                protos = torch.stack([s[tasks.support_y[i] == k].mean(0) for k in range(ways)])
                logits = -((q.unsqueeze(1) - protos.unsqueeze(0)) ** 2).sum(-1)
                (F.cross_entropy(logits, tasks.query_y[i]) / len(tasks)).backward()

        return step, list(model.parameters()), None
    raise ValueError(f"{impl} has no ProtoNets (no inner loop to differentiate)")


def eval_run(impl: str, w: Workload, model: nn.Module, tasks: TaskBatch) -> Callable[[], Tensor]:
    """A function returning the accuracy of every episode after each of ``w.eval_steps`` steps ``[n, k]``."""
    if impl == "allmap":
        learner = allmap.MAML(model, inner_lr=w.inner_lr, inner_steps=w.steps, loss=w.loss)

        def run() -> Tensor:
            res = evaluate(learner, tasks, steps=w.eval_steps, chunk=50)
            return torch.tensor([res[f"accuracy@{k}"]["mean"] for k in w.eval_steps])

        return run
    if impl == "learn2learn":
        maml = _import_learn2learn()(model, lr=w.inner_lr, first_order=False)
        maml.eval()

        def run() -> Tensor:
            acc = torch.zeros(len(tasks), len(w.eval_steps))
            for i in range(len(tasks)):
                learner = maml.clone()
                for s in range(max(w.eval_steps) + 1):
                    if s in w.eval_steps:
                        with torch.no_grad():
                            pred = learner(tasks.query_x[i]).argmax(-1)
                        acc[i, w.eval_steps.index(s)] = (pred == tasks.query_y[i]).float().mean()
                    if s < max(w.eval_steps):
                        learner.adapt(F.cross_entropy(learner(tasks.support_x[i]), tasks.support_y[i]))
            return acc.mean(0)

        return run
    raise ValueError(f"{impl}: evaluation is compared with learn2learn only")


# -- measuring ----------------------------------------------------------------------------------------
def _native_batch_statistics(model: nn.Module) -> None:
    """What a peer's user writes for MAML's batch-statistics BatchNorm: ``track_running_stats=False``."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            without_running_stats(m)


def textbook_conv4(model: Conv4) -> nn.Sequential:
    """``model``'s parameters in the conv4 a peer's user runs: torch modules in the order of learn2learn's own
    ``ConvBlock`` (conv -> BatchNorm -> ReLU -> max-pool, NCHW), then flatten and the linear head. The same
    function and the same Parameter objects as allmap's :class:`~allmap.nets.Conv4` (which pools before the
    ReLU, so its ReLU is 4x smaller: a speed-up a peer's user would not have)."""
    layers = list(model.body.layers)
    blocks = []
    for i in range(0, len(layers), 4):
        conv, norm, pool, relu = layers[i : i + 4]
        blocks += [conv, norm, nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*blocks, nn.Flatten(), model.head)


def base_impl(impl: str) -> str:
    """``learn2learn@Conv4`` (a peer on allmap's network) runs the code of ``learn2learn``."""
    return impl.split("@")[0]


def build_model(w: Workload, impl: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The workload's model with seed 0; peers get torch BatchNorm in batch-statistics mode (allmap.MAML
    switches BatchNorm itself) and, for conv4, :func:`textbook_conv4` of it (``PEER@Conv4``: allmap's
    ``Conv4`` itself)."""
    torch.manual_seed(0)
    model = w.model().to(dtype)
    if not impl.startswith("allmap") and isinstance(model, Conv4) and not impl.endswith("@Conv4"):
        model = textbook_conv4(model)
    if w.kind != "protonet" and not impl.startswith("allmap"):
        _native_batch_statistics(model)
    return model


def _load_code() -> None:
    """Run torch.func and double backward once on a toy, so code loaded on first use is not counted as memory."""
    x = torch.ones(2, 2, requires_grad=True)
    torch.func.vmap(torch.func.grad(lambda v: (v.sin() ** 2).sum()))(x).sum().backward()
    g = torch.autograd.grad((x.sin() ** 2).sum(), x, create_graph=True)[0]
    g.sum().backward()


def measure(name: str, impl: str, iters: int, warmup: int, smoke: bool) -> dict:
    """Run one implementation on one workload in this process; the meta-gradient is in ``grad``."""
    w = workloads(smoke)[name]
    if w.threads:
        torch.set_num_threads(w.threads)
    tasks = w.tasks()
    model = build_model(w, impl)
    _load_code()
    out: dict = {"impl": impl, "workload": name}
    if w.kind == "eval":
        run = eval_run(base_impl(impl), w, model, tasks)
        run_small = eval_run(base_impl(impl), w, model, tasks[: max(1, len(tasks) // 50)])
        run_small()  # warm-up
        gc.collect()
        base, peak_ok = rss_mb("VmRSS"), reset_peak_rss()
        start = time.perf_counter()
        acc = run()
        seconds = time.perf_counter() - start
        out.update(tasks_per_s=len(tasks) / seconds, seconds=seconds, grad=acc.tolist())
    else:
        build = maml_step if w.kind == "maml" else protonet_step
        step, params, learner = build(base_impl(impl), w, model, tasks)
        if impl == "allmap+compile":  # compile first (timed in execution_stats), so peak memory is the run's
            step()
        gc.collect()
        base, peak_ok = rss_mb("VmRSS"), reset_peak_rss()
        for p in params:
            p.grad = None
        step()  # the compared meta-gradient
        out["grad"] = torch.cat([p.grad.flatten() for p in params]).double().tolist()
        for _ in range(warmup):
            for p in params:
                p.grad = None
            step()
        start = time.perf_counter()
        for _ in range(iters):
            for p in params:
                p.grad = None
            step()
        seconds = (time.perf_counter() - start) / iters
        out.update(tasks_per_s=len(tasks) / seconds, seconds=seconds)
        if learner is not None and learner.execution_stats.get("compile_seconds"):
            out["compile_s"] = learner.execution_stats["compile_seconds"] - seconds
            amortised = RUN_ITERATIONS * seconds + out["compile_s"]
            out["amortised_tasks_per_s"] = RUN_ITERATIONS * len(tasks) / amortised
        if learner is not None and learner.execution_stats.get("compile_failed"):
            out["note"] = "compile failed: " + str(learner.execution_stats["compile_failed"])
        if learner is not None and learner.spec.per_task_loss:
            p = learner.execution_plan(len(tasks), examples=examples_per_task(tasks))
            out["plan"] = f"{'vmap' if p.vmap else 'loop'}/chunk {p.chunk}" + (" +compile" if p.compile else "")
    peak = rss_mb("VmHWM") if peak_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_mb"] = None if base is None or peak is None else max(peak - base, 0.0)
    children = [m or 0.0 for m in children_peak_mb()]  # forked workers since the reset (the last call's)
    if children:
        forks = f"{len(children)} forked process{'es' if len(children) > 1 else ''}"
        if impl == "allmap-forked":  # meta_backward computes the first share in this process
            forks = f"this process + {forks}"
        out["plan"] = ", ".join(filter(None, [out.get("plan"), forks]))
        if out["peak_mb"] is not None:
            out["peak_mb"] += sum(children)
    if w.kind != "eval" and impl != "allmap+compile":
        out["grad64"] = float64_gradient(w, impl, tasks)
    return out


def float64_gradient(w: Workload, impl: str, tasks: TaskBatch) -> list[float]:
    """The same meta-gradient in float64 (after timing, not counted in memory). Second-order MAML through
    several steps is ill-conditioned in float32 (conv4-20w1s-5: the peers' float32 gradients are 3.3% from
    the float64 one), so agreement between implementations is checked in float64."""
    model = build_model(w, impl, torch.float64)
    build = maml_step if w.kind == "maml" else protonet_step
    step, params, _ = build(base_impl(impl), w, model, tasks.to(dtype=torch.float64))
    for p in params:
        p.grad = None
    step()
    return torch.cat([p.grad.flatten() for p in params]).tolist()


def implementations(w: Workload, smoke: bool) -> list[str]:
    """What runs on ``w``: allmap's variants, the peers on their own network, and for conv4 learn2learn on
    allmap's ``Conv4`` too (``learn2learn@Conv4``), which separates what the network gives from what the
    learner gives."""
    conv = ["learn2learn@Conv4"] if w.name.startswith(("conv", "eval", "protonet")) else []
    if w.kind == "maml":
        extra = (
            ["allmap-1pass", "allmap-forked"] if w.name.startswith("conv") else ([] if smoke else ["allmap+compile"])
        )
        return ["allmap", *extra, *PEERS, *conv]
    return ["allmap", "learn2learn", *conv]


def available(peer: str) -> bool:
    peer = base_impl(peer)
    if not peer.startswith(PEERS):
        return True
    return peer in sys.modules or importlib.util.find_spec(peer) is not None


def run_child(name: str, impl: str, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = (
        [
            sys.executable,
            __file__,
            "--child",
            name,
            impl,
            "--iters",
            str(args.iters),
            "--warmup",
            str(args.warmup),
            "--out",
            path,
        ]
        + (["--smoke"] if args.smoke else [])
        + (["--retain-memory"] if args.retain_memory else [])
    )
    proc = subprocess.run(cmd, capture_output=True, text=True)
    try:
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            return {"impl": impl, "workload": name, "note": f"failed: {tail}"}
        return json.loads(Path(path).read_text())
    finally:
        Path(path).unlink(missing_ok=True)


def rel_diff(a: list[float], b: list[float]) -> float:
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((ta - tb).norm() / tb.norm().clamp_min(1e-30))


def table(results: dict[str, list[dict]], ws: dict[str, Workload]) -> str:
    lines = [
        "| workload | implementation | tasks/s | s/iteration | peak MB | allmap / impl (tasks/s) | "
        "peak MB impl / allmap | rel. diff vs allmap, float64 | float32 error | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        ref = next((r for r in rows if r["impl"] == "allmap" and "tasks_per_s" in r), None)
        for r in rows:
            if "tasks_per_s" not in r:
                lines.append(f"| {name} | {r['impl']} | | | | | | | | {r.get('note', '')} |")
                continue
            ratio = f"{ref['tasks_per_s'] / r['tasks_per_s']:.2f}x" if ref else ""
            mem = (
                f"{r['peak_mb'] / ref['peak_mb']:.2f}"
                if ref and ref.get("peak_mb") and r.get("peak_mb") is not None
                else ""
            )
            key = "grad64" if ref and "grad64" in ref and "grad64" in r else "grad"
            diff = f"{rel_diff(ref[key], r[key]):.1e}" if ref and r is not ref else ""
            err = f"{rel_diff(r['grad'], ref['grad64']):.1e}" if ref and "grad64" in ref else ""
            notes = [r.get("plan", ""), r.get("note", "")]
            if "compile_s" in r:
                notes.append(
                    f"compile {r['compile_s']:.0f} s; {r['amortised_tasks_per_s']:.0f} tasks/s amortised "
                    f"over {RUN_ITERATIONS:,} iterations"
                )
            peak = "" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
            lines.append(
                f"| {name} | {r['impl']} | {r['tasks_per_s']:.1f} | {r['seconds']:.3f} | {peak} | {ratio} "
                f"| {mem} | {diff} | {err} | {'; '.join(n for n in notes if n)} |"
            )
    for name, rows in results.items():  # the compiled path against learn2learn, amortised over a long run
        by = {r["impl"]: r for r in rows if "tasks_per_s" in r}
        if "allmap+compile" in by and "learn2learn" in by:
            c, l2l = by["allmap+compile"], by["learn2learn"]["tasks_per_s"]
            amortised = (
                f" ({c['amortised_tasks_per_s'] / l2l:.1f}x with the compile time amortised over "
                f"{RUN_ITERATIONS:,} iterations)"
                if "amortised_tasks_per_s" in c
                else ""
            )
            lines.append(f"{name}: allmap+compile / learn2learn = {c['tasks_per_s'] / l2l:.1f}x{amortised}")
    lines.append("")
    lines.append(
        "ratio > 1: allmap is faster. rel. diff: ||g - g_allmap|| / ||g_allmap|| of the meta-gradients "
        "computed in float64 (allmap+compile: float32); float32 error: the timed float32 meta-gradient "
        "against allmap's float64 one. eval-600: tasks/s = episodes/s, s/iteration = seconds for all "
        "episodes, rel. diff compares mean accuracies after each step. Workloads: "
        + "; ".join(f"{k}: {w.description}" for k, w in ws.items() if k in results)
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="all", help="comma-separated names, or 'all'")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 20 MLP / 3 conv)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--impls",
        default="all",
        help="comma-separated implementations (allmap, allmap+compile, "
        "allmap-1pass, allmap-forked, learn2learn, higher, torchopt), or 'all'",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, in-process, no compile: seconds")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument(
        "--retain-memory",
        action="store_true",
        help="every implementation's process keeps freed memory (allmap.app.host, what "
        "`allmap train` does by default); off: glibc's defaults for everyone",
    )
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "IMPL"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.retain_memory:
        retain_freed_memory()
    if args.child:
        name, impl = args.child
        res = measure(name, impl, args.iters or 1, args.warmup, args.smoke)
        Path(args.out).write_text(json.dumps(res))
        return 0
    ws = workloads(args.smoke)
    names = list(ws) if args.workloads == "all" else args.workloads.split(",")
    unknown = [n for n in names if n not in ws]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; known: {', '.join(ws)}")
    missing = [p for p in PEERS if not available(p)]
    if missing:
        print(f"note: peer(s) not installed, skipped: {', '.join(missing)} (pip install allmap[bench])")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
        + (", freed memory retained (--retain-memory)" if args.retain_memory else "")
    )
    results: dict[str, list[dict]] = {}
    for name in names:
        rows = []
        for impl in implementations(ws[name], args.smoke):
            if not available(impl) or (args.impls != "all" and impl not in args.impls.split(",")):
                continue
            iters = args.iters or (1 if args.smoke else (20 if name.startswith("sinusoid") else 2))
            if args.smoke:
                res = measure(name, impl, iters, 0, True)
            else:
                res = run_child(name, impl, argparse.Namespace(**{**vars(args), "iters": iters}))
            rows.append(res)
            print(
                f"  {name:14s} {impl:15s} "
                + (f"{res['tasks_per_s']:.1f} tasks/s" if "tasks_per_s" in res else res.get("note", "")),
                flush=True,
            )
        results[name] = rows
    print(table(results, ws))
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
