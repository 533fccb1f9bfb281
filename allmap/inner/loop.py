"""The differentiable inner loop shared by every gradient-based learner.

How the meta-gradient crosses this loop (unrolled, first order, truncated, checkpointed, implicit, ...) is
chosen in :mod:`allmap.hypergrad`; :func:`gradient_descent` is the plain reverse-mode loop those strategies
build on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from allmap.inner.optim import InnerOptimizer, Params, apply_updates

__all__ = ["unroll", "gradient_descent", "inner_step", "monotone_descent", "stop_gradient"]

T = TypeVar("T")
C = TypeVar("C")


def unroll(
    step: Callable[[C, int], C], carry: C, steps: int, record: Sequence[int] = (), view: Callable[[C], T] = lambda c: c
) -> list[T]:
    """The one unroll-and-record loop: ``carry_t = step(carry_{t-1}, t)`` for ``t = 1..T``; returns
    ``view(carry_k)`` for each ``k`` in ``record`` (``0`` is the start), in ``record``'s order, where
    ``T = max(record)`` (``record`` empty: ``[steps]``). Every inner loop of allmap runs through it."""
    record = list(record) or [steps]
    wanted = set(record)
    path: dict[int, T] = {0: view(carry)} if 0 in wanted else {}
    for t in range(1, max(record) + 1):
        carry = step(carry, t)
        if t in wanted:
            path[t] = view(carry)
    return [path[k] for k in record]


def stop_gradient(tree: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detach every tensor: the value is kept, the derivative through it is zero."""
    return {k: v.detach() for k, v in tree.items()}


def inner_step(
    loss: Callable[[Params], Tensor],
    params: Params,
    state: Any,
    optimizer: InnerOptimizer,
    *,
    first_order: bool = False,
) -> tuple[Params, Any]:
    """One optimizer step ``theta_{t+1} = theta_t + update(grad L(theta_t))``; returns ``(params, state)``.
    The gradient comes from ``torch.func.grad(loss)`` (with the value, for updates that read it).

    With ``first_order`` the gradient is computed without recording the outer graph (``torch.func.grad``
    ignores an outer ``no_grad`` for its own level) and enters the update as a constant, so the step costs
    no meta-gradient memory while ``d theta_{t+1} / d theta_t = I`` and the step size still gets its gradient.
    """
    if optimizer.uses_loss:  # the update reads the loss value too (a learned optimizer such as the LSTM)
        if first_order:
            with torch.no_grad():
                grads, value = torch.func.grad_and_value(loss)(params)
            grads, value = stop_gradient(grads), value.detach()
        else:
            grads, value = torch.func.grad_and_value(loss)(params)
        updates, state = optimizer.update(grads, state, params, value)
        return apply_updates(params, updates), state
    grad_fn = torch.func.grad(loss)
    if first_order:
        with torch.no_grad():
            grads = grad_fn(params)
        grads = stop_gradient(grads)
    else:
        grads = grad_fn(params)
    updates, state = optimizer.update(grads, state, params)
    return apply_updates(params, updates), state


def gradient_descent(
    loss: Callable[[Params], Tensor],
    params: Params,
    optimizer: InnerOptimizer,
    steps: int,
    *,
    first_order: bool = False,
    record: Sequence[int] = (),
) -> Params | list[Params]:
    """Run ``steps`` optimizer steps on ``loss`` from ``params``, differentiably.

    Update rule (SGD): ``theta_{t+1} = theta_t - lr * grad L_support(theta_t)``. The inner gradients come
    from ``torch.func.grad``, so the result stays differentiable w.r.t. ``params`` (and anything ``loss``
    or the optimizer closes over) under ordinary autograd, and the loop runs unchanged inside ``vmap``.
    With ``first_order`` the inner gradients are constants (first-order MAML).

    Returns the final parameters, or, if ``record`` names step counts, the parameters after each of them
    (``0`` is ``params`` itself), computed in one pass of ``max(record)`` steps.
    """
    path = unroll(
        lambda c, t: inner_step(loss, *c, optimizer, first_order=first_order),
        (params, optimizer.init(params)),
        steps,
        record,
        view=lambda c: c[0],
    )
    return path if record else path[0]


def _where(keep: Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``keep`` else ``old``, leaf by leaf (non-tensor leaves, e.g. step counts, take ``new``)."""
    return tree_map(lambda a, b: torch.where(keep, a, b) if isinstance(a, Tensor) else a, new, old)


def monotone_descent(
    loss: Callable[[Params], Tensor],
    params: Params,
    optimizer: InnerOptimizer,
    steps: int,
    *,
    record: Sequence[int] = (),
) -> Params | list[Params]:
    """:func:`gradient_descent` that never lets the loss rise: a step whose loss is higher than the current one
    (or not finite) is rejected and the step size halved, ``theta_{t+1} = theta_t + s_t u_t`` if
    ``L(theta_t + s_t u_t) <= L(theta_t) (1 + sqrt(eps))``, else ``theta_{t+1} = theta_t`` and
    ``s_{t+1} = s_t / 2`` (``s_0 = 1``; ``eps`` the dtype's machine epsilon, so rounding noise at the minimum
    is not taken for a rise).

    For inner problems whose solution, not the path to it, carries the meta-gradient (iMAML's implicit
    gradient): a curvature above ``2 / lr`` on some task then slows that task's solve instead of sending it to
    infinity. Branch-free (``torch.where`` on each task's own loss), so it runs under ``vmap`` with one step
    size per task; one gradient evaluation per step, as plain descent, plus one at the start. No graph is
    meant to be built through it (call it under ``torch.no_grad``).
    """
    grad_and_value = torch.func.grad_and_value(loss)
    grads, value = grad_and_value(params)
    slack = torch.finfo(value.dtype).eps ** 0.5  # rounding near the minimum must not count as a rise

    def step(carry: tuple, t: int) -> tuple:
        params, grads, value, state, scale = carry
        updates, new_state = optimizer.update(grads, state, params)
        candidate = {k: params[k] + scale * updates[k] for k in params}
        new_grads, new_value = grad_and_value(candidate)
        keep = torch.isfinite(new_value) & (new_value <= value + slack * value.abs())
        return (
            _where(keep, candidate, params),
            _where(keep, new_grads, grads),
            torch.where(keep, new_value, value),
            _where(keep, new_state, state),
            torch.where(keep, scale, 0.5 * scale),
        )

    carry = (params, grads, value, optimizer.init(params), torch.ones_like(value))
    path = unroll(step, carry, steps, record, view=lambda c: c[0])
    return path if record else path[0]
