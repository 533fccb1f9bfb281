"""OML and ANML: meta-learned representations for online, one-pass continual learning.

OML (Javed & White, "Meta-Learning Representations for Continual Learning", NeurIPS 2019) splits a network
into a representation ``body`` (meta-learned, frozen while learning a task) and a prediction ``head``
(learned online). One meta-training step, as in the OML code after its July 2020 fix (second-order
meta-gradients):

1. the head's rows of the trajectory's classes are re-initialised (``reset_head``; Kaiming normal), so the
   head cannot simply remember them and the meta-gradient keeps flowing;
2. the head learns the trajectory one image at a time, one SGD step each:
   ``W_t = W_{t-1} - inner_lr * grad_W L(head_W(body(x_t)), y_t)`` for ``t = 1..T``;
3. the outer loss ``L(head_{W_T}(body(x_q)), y_q)`` on the query set (further images of the trajectory's
   classes and images of other classes, which the online updates must not have overwritten) is
   differentiated w.r.t. the body and the initial head through all ``T`` steps (second order).

The body's features of the ``T`` trajectory images are computed once per step (the body does not change
within a trajectory), so the unrolled loop runs on the head alone. ANML (Beaulieu et al., "Learning to
Continually Learn", ECAI 2020) is the same learner around :class:`~allmap.nets.lifelong.ANMLNet`, whose
body is gated by a neuromodulatory network meta-learned with it.

With ``inner_steps: 0`` and ``reset_head: false`` the task model is the network itself and the meta-loss is
the query loss: ordinary i.i.d. training (the pretraining baseline of the continual meta-test).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from allmap.hypergrad import Strategy
from allmap.inner.loop import inner_step, unroll
from allmap.inner.optim import Params
from allmap.learners.base import TaskModel, functional_forward
from allmap.learners.gradient import GradientLearner, check_steps
from allmap.learners.updates import SGD

__all__ = ["OML", "ANML", "StreamSGD"]


class StreamSGD(SGD):
    """SGD on one example per step (``theta_t = theta_{t-1} - lr * grad L(x_t, y_t)``): its meta-gradient
    is unrolled through every step or first order; the other strategies solve or truncate a loop over one
    fixed loss, which a stream of different examples is not."""

    def accepts(self) -> tuple[str, ...]:
        return ("unrolled", "first_order")


def _part(params: Params, prefix: str) -> Params:
    return {k[len(prefix) + 1 :]: v for k, v in params.items() if k.startswith(prefix + ".")}


class OML(GradientLearner):
    """Online-aware meta-learning: a representation meta-trained so that a head learned online, one image per
    SGD step, learns new classes without forgetting the others.

    Args:
        model: a module with a ``body`` (the representation) and a ``head`` (adapted online), such as
            :class:`~allmap.nets.lifelong.OMLConv` or :class:`~allmap.nets.lifelong.ANMLNet`.
        inner_lr: the head's SGD step size on each example (0.03 in the OML code).
        inner_steps: examples of the support set consumed in meta-training (the trajectory's length,
            ``ways * shots``: 15 in the OML code); ``0`` trains the network on the query set alone.
        reset_head: re-initialise the head's rows of the support set's classes before the trajectory.
        loss: ``"cross_entropy"`` (default) or ``"mse"`` (incremental regression).
        first_order: inner gradients as constants (the OML code before its July 2020 fix).
        hypergrad: ``"unrolled"`` (default, second order) or ``"first_order"``.

    Example:
        >>> from allmap.nets.lifelong import OMLConv
        >>> oml = OML(OMLConv(hidden=8, out_features=10), inner_steps=2)
        >>> x, y = torch.rand(2, 1, 28, 28), torch.tensor([3, 4])
        >>> oml.adapt(x, y)(x).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.03,
        inner_steps: int = 15,
        reset_head: bool = True,
        loss: str = "cross_entropy",
        first_order: bool = False,
        hypergrad: str | Mapping[str, Any] | Strategy | None = None,
    ) -> None:
        owner = type(self).__name__
        for part in ("body", "head"):
            if not isinstance(getattr(model, part, None), nn.Module):
                raise TypeError(
                    f"{owner}: the model needs a `{part}` submodule (the representation `body` and the online "
                    f"`head`), as allmap.nets.lifelong.OMLConv and ANMLNet have; {type(model).__name__} has none."
                )
        if first_order and hypergrad not in (None, "first_order"):
            raise ValueError(f"{owner}: first_order=True contradicts hypergrad={hypergrad!r}; pass only one of them.")
        super().__init__(
            model,
            StreamSGD(inner_lr),
            inner_steps=inner_steps,
            loss=loss,
            adapt_only="head",
            hypergrad="first_order" if first_order else hypergrad,
            vectorize=False,
        )
        if not isinstance(reset_head, bool):
            raise TypeError(f"{owner}: expected reset_head to be True or False, got {reset_head!r}.")
        self.reset_head = reset_head

    # -- parts -----------------------------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """The representation ``body(x)`` (with the learner's own parameters)."""
        return functional_forward(self.model.body, _part(self.frozen_params(), "body"), x)

    def head_forward(self, params: Params, features: Tensor) -> Tensor:
        """The head with adapted ``params`` (names ``head.*``) on representation ``features``."""
        return functional_forward(self.model.head, _part(params, "head"), features)

    def initial_params(self, support_x: Tensor, support_y: Tensor) -> Params:
        """The head, with the rows of the support set's classes drawn afresh when ``reset_head`` is set."""
        params = super().initial_params(support_x, support_y)
        weight = params.get("head.weight")
        if not self.reset_head or weight is None or weight.dim() != 2 or not self.classification:
            return params
        rows = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
        rows[support_y.to(weight.device).long()] = True
        with torch.no_grad():  # Kaiming normal, the OML code's reset (std sqrt(2 / fan_in))
            fresh = torch.randn_like(weight) * math.sqrt(2.0 / weight.shape[1])
        return {**params, "head.weight": torch.where(rows.unsqueeze(1), fresh, weight)}

    def task_model(self, params: Params) -> TaskModel:
        return TaskModel(lambda x: self.head_forward(params, self.features(x)), params)

    # -- the mapping -------------------------------------------------------------------------------------
    def adapt_path(self, support_x: Tensor, support_y: Tensor, steps: Sequence[int]) -> list[TaskModel]:
        """Task models after the first ``k`` support examples (one SGD step each) for each ``k`` in ``steps``."""
        if max(steps) > support_x.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: asked for the head after {max(steps)} examples of the stream, but the "
                f"support set has {support_x.shape[0]}; lower inner_steps or eval.steps to at most that."
            )
        features = self.features(support_x) if max(steps) else support_x[:0]
        optimizer = self.optimizer()
        first_order = self.first_order

        def step(carry: tuple[Params, Any], t: int) -> tuple[Params, Any]:
            f, y = features[t - 1 : t], support_y[t - 1 : t]
            return inner_step(
                lambda p: self.loss_fn(self.head_forward(p, f), y), *carry, optimizer, first_order=first_order
            )

        start = self.initial_params(support_x, support_y)
        path = unroll(step, (start, optimizer.init(start)), max(steps), record=list(steps), view=lambda c: c[0])
        return [self.task_model(p) for p in path]

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> TaskModel:
        """The head after one SGD step on each of the first ``steps`` support examples (default
        ``inner_steps``), in order."""
        if steps is not None:
            check_steps(f"{type(self).__name__}.adapt", steps)
        return self.adapt_path(support_x, support_y, [self.inner_steps if steps is None else steps])[0]


class ANML(OML):
    """A neuromodulated meta-learning algorithm (Beaulieu et al. 2020): :class:`OML` around
    :class:`~allmap.nets.lifelong.ANMLNet`, whose neuromodulatory network gates the representation and is
    meta-learned with it; the head learns online as in OML."""

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        if not isinstance(getattr(getattr(model, "body", None), "nm", None), nn.Module):
            raise TypeError(
                f"ANML: the model's body needs a neuromodulatory network `nm` (allmap.nets.lifelong.ANMLNet); "
                f"{type(model).__name__} has none. Use the oml learner for an ungated representation."
            )
        super().__init__(model, **kwargs)
