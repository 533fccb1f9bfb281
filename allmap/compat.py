"""Workarounds for torch behaviour, each named once here with the versions it applies to."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["TORCH_VERSION", "vmap_batch_norm_second_order_exact", "in_transform", "adam_step_"]

TORCH_VERSION: tuple[int, int] = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])  # type: ignore[assignment]

#: The newest torch release on which the second derivative of ``batch_norm`` under ``torch.func.vmap`` was
#: checked (float64 gradcheck, tests/test_meta_gradients.py) and found wrong. allmap therefore never vmaps
#: a second-order meta-gradient through ``torch.nn`` BatchNorm: MAML-family learners swap in the exact
#: :class:`allmap.nets.BatchStatNorm`, other learners run such models one task at a time.
BATCH_NORM_VMAP_CHECKED_WRONG_UP_TO = (2, 13)


def vmap_batch_norm_second_order_exact() -> bool:
    """Whether torch's vmapped second derivative of ``batch_norm`` may be trusted: not on any version up to
    :data:`BATCH_NORM_VMAP_CHECKED_WRONG_UP_TO`, and not on a newer one until the gradcheck says so."""
    return False


def in_transform(tensors: Sequence[Tensor]) -> bool:
    """Whether any of ``tensors`` is a ``torch.func`` wrapper (inside ``vmap``, ``grad`` or ``jvp``), where a
    custom backward that calls ``torch.autograd`` cannot run and a tensor cannot become a Python number.
    Uses torch's private ``torch._C._functorch`` queries (present from torch 2.0 on)."""
    functorch = torch._C._functorch
    return any(functorch.is_batchedtensor(t) or functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def adam_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg: list[Tensor],
    exp_avg_sq: list[Tensor],
    steps: list[Tensor],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """One Adam step in place (torch.optim.Adam's update, bias-corrected), on tensors that need not be leaves
    (views of a batch of heads). Uses torch's fused kernel ``torch._fused_adam_`` (private; CPU support from
    torch 2.4), a few times faster than the same update written with tensor operations, which is the
    fallback where the kernel is missing."""
    fused = getattr(torch, "_fused_adam_", None)
    if fused is not None:
        torch._foreach_add_(steps, 1)  # the kernel reads the step count; torch.optim.Adam increments it first
        fused(
            params,
            grads,
            exp_avg,
            exp_avg_sq,
            [],
            steps,
            amsgrad=False,
            lr=lr,
            beta1=betas[0],
            beta2=betas[1],
            weight_decay=0.0,
            eps=eps,
            maximize=False,
        )
        return
    for p, g, m, v, k in zip(params, grads, exp_avg, exp_avg_sq, steps):
        k += 1
        m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        c1, c2 = 1 - betas[0] ** float(k), (1 - betas[1] ** float(k)) ** 0.5
        p.addcdiv_(m, v.sqrt().div_(c2).add_(eps), value=-lr / c1)
