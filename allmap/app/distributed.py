"""Data-parallel meta-training on ``torch.distributed``: every rank adapts a shard of each meta-batch.

Scheme (exact by construction): every rank draws the *same* full meta-batch of ``B`` tasks from the same
seeded generator and keeps the contiguous block ``tasks[lo_r:hi_r]`` of :meth:`Dist.shard`. Rank ``r``
back-propagates ``(n_r / B) * meta_loss(shard_r)`` (``meta_loss`` is a mean over its ``n_r`` tasks), so
the sum over ranks of the gradients is the gradient of the mean over the whole meta-batch; one
``all_reduce(SUM)`` of a flat buffer ``[grads, has_grad mask, loss, stop flag]`` per step gives every rank
that gradient, the global loss and whether any rank was asked to stop. Every rank then takes the same
optimizer step, so the weights stay identical across ranks and equal (to float rounding: only the order
of a sum changes) those of one process on the whole meta-batch.

Launch with ``torchrun --nproc_per_node=N -m allmap train ...``; the process group uses gloo for CPU
tensors and NCCL for CUDA tensors when NCCL is available (``"cpu:gloo,cuda:nccl"``), chosen automatically.
Only rank 0 writes files. Evaluation is sharded the same way; per-rank summaries (n, mean, std) are
gathered and pooled exactly (:func:`pool_summaries`), giving the mean ± CI of one process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from allmap.engine.evaluate import Progress, evaluate, metric_names, step_names, task_batches
from allmap.engine.forked import even_shares
from allmap.learners.base import Learner
from allmap.tasks.batch import TaskBatch

__all__ = [
    "Dist",
    "current",
    "init_from_env",
    "shutdown",
    "restart_count",
    "backend",
    "reduce_step",
    "pool_summaries",
    "evaluate_sharded",
]


def backend() -> str:
    """gloo for CPU tensors, plus NCCL for CUDA tensors where CUDA and NCCL are available."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def restart_count() -> int:
    """How many times torchrun (``--max-restarts``) has restarted this worker group; 0 outside torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def init_from_env() -> bool:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1, ``RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``). Returns True if this call created the group (so the caller should
    :func:`shutdown` it); a group created by the user, or a single process, is left alone.
    """
    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one TCPStore across restarts and torch reuses the same keys in it, so a
        # restarted worker can read a dead peer's address and fail to connect ("Connection refused"). A
        # prefix per restart gives every attempt fresh keys.
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
        store = dist.PrefixStore(f"allmap/attempt{restart_count()}", store)
        dist.init_process_group(backend=backend(), store=store, rank=rank, world_size=world)
    else:
        dist.init_process_group(backend=backend())
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class Dist:
    """This process's place in the (possibly one-process) job, with the few collectives training needs."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0, the only rank that writes checkpoints, logs, results and plots."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, n: int) -> slice:
        """The contiguous block of ``n`` items this rank handles (sizes differ by at most one)."""
        return slice(*even_shares(n, self.world)[self.rank])

    def device(self, device: torch.device) -> torch.device:
        """One GPU per rank: a bare ``cuda`` device becomes ``cuda:LOCAL_RANK`` under torchrun."""
        if self.active and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's ``data`` on every rank (as a uint8 tensor, so no pickle crosses the wire)."""
        if not self.active:
            return data or b""
        size = torch.tensor([len(data) if self.is_main and data is not None else 0], dtype=torch.int64)
        dist.broadcast(size, 0)
        buffer = torch.empty(int(size), dtype=torch.uint8)
        if self.is_main and data:
            buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        if int(size):
            dist.broadcast(buffer, 0)
        return buffer.numpy().tobytes()

    def broadcast_tensors(self, tensors: Sequence[Tensor]) -> None:
        """Overwrite every rank's ``tensors`` (in place) with rank 0's, as DDP does at start."""
        if self.active:
            for t in tensors:
                dist.broadcast(t.data, 0)

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape on all ranks), in rank order."""
        if not self.active:
            return [tensor]
        out = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(out, tensor.contiguous())
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def current() -> Dist:
    """The job this process belongs to: the initialised default process group, else one process."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Dist()


def reduce_step(params: Sequence[Tensor], loss: Tensor, stop: bool, ctx: Dist) -> tuple[Tensor, Tensor, bool]:
    """All-reduce the meta-gradients of ``params`` in place, with the loss and the stop flag, in one call.

    ``loss`` is this rank's weighted share ``(n_r / B) * meta_loss(shard_r)``. Returns ``(loss, finite,
    stop)``: the whole meta-batch's loss, a bool tensor saying whether the loss and every gradient entry are
    finite (the same on every rank), and whether any rank asked to stop. Parameters without a gradient on
    every rank keep ``grad = None`` (so optimizers skip them, as in one process).
    """
    grads = [p.grad for p in params]
    device = loss.device
    pieces = [
        g.reshape(-1) if g is not None else torch.zeros(p.numel(), device=device, dtype=loss.dtype)
        for p, g in zip(params, grads)
    ]
    flags = [
        loss.reshape(1).to(pieces[0].dtype if pieces else loss.dtype),
        torch.tensor([float(stop)], device=device, dtype=pieces[0].dtype if pieces else loss.dtype),
    ]
    if ctx.active:
        mask = torch.tensor([float(g is not None) for g in grads], device=device, dtype=flags[0].dtype)
        flat = torch.cat(pieces + [mask] + flags)
        ctx.all_reduce_sum(flat)
        n = sum(p.numel() for p in params)
        mask = flat[n : n + len(params)]
        offset = 0
        present = mask.cpu().tolist()
        for p, here in zip(params, present):
            size = p.numel()
            if here > 0:
                p.grad = flat[offset : offset + size].view_as(p).to(p.dtype, copy=True)
            offset += size
        grad_part = flat[:n]
        loss_total, stop_total = flat[-2], flat[-1]
        return loss_total, torch.isfinite(grad_part).all() & torch.isfinite(loss_total), bool(stop_total > 0)
    finite = torch.isfinite(loss)
    present = [g for g in grads if g is not None]
    if present:
        finite = finite & torch.isfinite(torch.cat([g.reshape(-1) for g in present])).all()
    return loss, finite, stop


def pool_summaries(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Combine ``{"mean", "std", "n"}`` summaries of disjoint shards into that of their union, exactly.

    ``mean = sum n_r m_r / N``; ``(N - 1) s^2 = sum (n_r - 1) s_r^2 + sum n_r (m_r - mean)^2``;
    ``ci95 = 1.96 s / sqrt(N)`` (as :func:`allmap.engine.evaluate.summarize`).
    """
    parts = [p for p in parts if p["n"] > 0]
    n = sum(int(p["n"]) for p in parts)
    mean = sum(p["n"] * p["mean"] for p in parts) / n
    ss = sum((p["n"] - 1) * p["std"] ** 2 + p["n"] * (p["mean"] - mean) ** 2 for p in parts)
    std = math.sqrt(ss / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "ci95": 1.96 * std / math.sqrt(n), "std": std, "n": n}


def evaluate_sharded(
    learner: Learner,
    tasks: TaskBatch | Sequence[TaskBatch],
    steps: Sequence[int],
    chunk: int,
    ctx: Dist,
    progress: Progress | None = None,
) -> dict[str, dict[str, float]]:
    """:func:`~allmap.engine.evaluate.evaluate` with the tasks split across ranks (each batch of a list of
    batches split alike); every rank gets the pooled result, equal to one process's mean ± CI over all
    tasks. ``progress`` counts this rank's tasks."""
    if not ctx.active:
        return evaluate(learner, tasks, steps=steps, chunk=chunk, progress=progress)
    keys = [f"{metric}{suffix}" for suffix in step_names(learner, steps) for metric in metric_names(learner)]
    part = [b[ctx.shard(len(b))] for b in task_batches(tasks)]
    part = [b for b in part if len(b)]
    local = evaluate(learner, part, steps=steps, chunk=chunk, progress=progress) if part else {}
    row = torch.tensor(
        [[local[k]["n"], local[k]["mean"], local[k]["std"]] if k in local else [0.0, 0.0, 0.0] for k in keys],
        dtype=torch.float64,
    )
    gathered = ctx.all_gather(row)
    return {
        k: pool_summaries([{"n": int(g[i, 0]), "mean": float(g[i, 1]), "std": float(g[i, 2])} for g in gathered])
        for i, k in enumerate(keys)
    }
