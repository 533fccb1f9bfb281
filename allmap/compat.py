"""Workarounds for torch behaviour, each named once here with the versions it applies to."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["TORCH_VERSION", "vmap_batch_norm_second_order_exact", "in_transform"]

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
