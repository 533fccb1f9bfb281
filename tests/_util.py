"""Helpers shared by test files (not collected: no test_ prefix)."""

from __future__ import annotations

import torch

import allmap


def assert_vmap_equals_loop(learner: allmap.Learner, tasks: allmap.TaskBatch, grad_rtol: float = 1e-10) -> None:
    """``meta_loss`` and its meta-gradient are the same with tasks under ``vmap`` and in a per-task loop.

    Leaves ``learner.vectorize`` False.
    """
    results = []
    for vectorize in (True, False):
        learner.vectorize = vectorize
        learner.zero_grad()
        loss = learner.meta_loss(tasks)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in learner.parameters()]))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=grad_rtol, atol=1e-12)
