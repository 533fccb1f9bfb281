"""Checkpointed reverse mode: recompute each inner step during the backward pass.

The forward pass keeps only the parameters (and optimizer state) between segments of ``every`` steps; the
backward pass re-runs one segment at a time with its graph and back-propagates through it. The gradient is
the unrolled one exactly (same operations, same order), memory grows with the size of the parameters per
step instead of the activations and second-order graph per step, at the price of one more forward and inner
backward pass per step (Griewank & Walther 2000; Chen et al. 2016).

Why a custom ``autograd.Function`` rather than ``torch.utils.checkpoint``: the inner step calls
``torch.func.grad``, which rejects the saved-tensor hooks of the non-reentrant checkpoint, and the reentrant
one supports ``.backward()`` but not ``torch.autograd.grad`` (hence not ``gradcheck``). This one takes the
tensors the step closes over as explicit inputs and supports both. It computes first derivatives of the
meta-loss only (no ``gradgrad``), and cannot run inside ``vmap`` (learners then run tasks one at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from allmap.checks import check_int
from allmap.compat import in_transform
from allmap.hypergrad.base import InnerStrategy, register
from allmap.inner.loop import gradient_descent, inner_step
from allmap.inner.optim import InnerOptimizer, Params

__all__ = ["Checkpointed"]


class _Segment(torch.autograd.Function):
    """Run ``segment(*tensors[:n])`` without a graph; recompute it with one in ``backward``."""

    @staticmethod
    def forward(ctx: Any, segment: Callable, n: int, holder: dict, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.segment, ctx.n = segment, n
        ctx.save_for_backward(*tensors)
        # the recomputation must draw the same random numbers (dropout), as torch.utils.checkpoint ensures
        ctx.devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.devices]
        leaves, holder["spec"] = tree_flatten(segment(*tensors[:n]))
        holder["leaves"] = leaves  # non-tensor leaves (e.g. Adam's step count) are rebuilt from these
        return tuple(leaf.detach() for leaf in leaves if isinstance(leaf, Tensor))

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple:
        tensors = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in tensors[: ctx.n]]
        closure = tensors[ctx.n :]
        with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_rng)
            for d, state in zip(ctx.devices, ctx.cuda_rng):
                torch.cuda.set_rng_state(state, d)
            outputs = [leaf for leaf in tree_flatten(ctx.segment(*inputs))[0] if isinstance(leaf, Tensor)]
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
        wrt = [t for t in (*inputs, *closure) if t.requires_grad]
        grads = iter(
            torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
            if pairs and wrt
            else [None] * len(wrt)
        )
        return (None, None, None, *[next(grads) if t.requires_grad else None for t in (*inputs, *closure)])


@register
class Checkpointed(InnerStrategy):
    """Unrolled reverse mode with recomputation of each segment of ``every`` inner steps.

    Args:
        every: inner steps per recomputed segment (1: only the parameters between steps are kept).

    Example:
        >>> import torch, allmap
        >>> learner = allmap.MAML(torch.nn.Linear(1, 1), inner_steps=5, hypergrad="checkpointed")
    """

    name = "checkpointed"
    vmappable = False

    def __init__(self, every: int = 1) -> None:
        self.every = check_int("checkpointed", "every", every, what="steps per segment")

    def run(
        self,
        loss: Callable[[Params], Tensor],
        params: Params,
        optimizer: InnerOptimizer,
        steps: int,
        record: Sequence[int] = (),
        closure: Sequence[Tensor] = (),
    ) -> list[Params]:
        record = list(record) or [steps]
        if not torch.is_grad_enabled():  # evaluation: nothing to recompute, so plain (and vmappable)
            return gradient_descent(loss, params, optimizer, max(record), record=record)
        total = max(record)
        closure = [t for t in closure if isinstance(t, Tensor)]
        state = optimizer.init(params)
        path: dict[int, Params] = {0: params}
        step = 0
        while step < total:
            # segments end at recorded steps so every recorded point is a segment output
            stop = min(step + self.every, min(r for r in record if r > step))
            carry, spec = tree_flatten((params, state))
            tensor_pos = [i for i, c in enumerate(carry) if isinstance(c, Tensor)]
            if in_transform([carry[i] for i in tensor_pos]):
                raise ValueError(
                    "checkpointed: cannot run inside torch.func transforms (vmap/grad/jvp), because the "
                    "recomputation calls torch.autograd; run the tasks one at a time, or use 'unrolled' there."
                )

            def segment(*tensors: Tensor, carry=carry, spec=spec, tensor_pos=tensor_pos, n=stop - step) -> Any:
                leaves = list(carry)
                for i, t in zip(tensor_pos, tensors):
                    leaves[i] = t
                p, s = tree_unflatten(leaves, spec)
                for _ in range(n):
                    p, s = inner_step(loss, p, s, optimizer)
                return p, s

            holder: dict = {}
            ins = [carry[i] for i in tensor_pos]
            outs = _Segment.apply(segment, len(ins), holder, *ins, *closure)
            it = iter(outs)
            leaves = [next(it) if isinstance(leaf, Tensor) else leaf for leaf in holder["leaves"]]
            params, state = tree_unflatten(leaves, holder["spec"])
            step = stop
            if step in record:
                path[step] = params
        return [path[r] for r in record]
