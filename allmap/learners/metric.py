"""Shared machinery of the metric-based learners (ProtoNets, Matching Networks, Siamese networks).

A metric learner embeds the support set once with an encoder ``f_phi`` and classifies a query by comparing
its embedding to the support embeddings; no gradient step is taken at adaptation, so the map
``support set -> classifier`` is a forward pass and the meta-gradient is ordinary backpropagation.

Batched by construction: unless ``vectorize=False``, :meth:`MetricLearner.meta_loss` embeds the support and
query images of every task in a meta-batch with ONE encoder call (the fast path for convolutions), then
compares them per task with batched tensor operations. With ``vectorize=False`` it loops over tasks. Both
give the same value whenever the encoder does not mix examples (no BatchNorm in training mode); with
BatchNorm in training mode the batched path normalises over the whole meta-batch, the loop over one task's
support and query together (the ProtoNets reference implementation does the latter with one task per batch,
where the two agree). At test time call ``learner.eval()`` so BatchNorm uses its running statistics.

Test-time shifts (``test_shift=r``, off by default): in eval mode every image, support and query alike, is
embedded as the mean of the encoder's outputs over its ``(2r+1)^2`` copies moved by up to ``r`` pixels
(zero filled), ``f_bar(x) = mean_{|dy|, |dx| <= r} f_phi(shift_{dy,dx}(x))``; the learner's comparison then
uses ``f_bar``. Training (``learner.train()``) embeds each image once, so it does not change the
meta-gradient; evaluation costs ``(2r+1)^2`` encoder calls per image. On Omniglot it raises the accuracy of
ProtoNets trained with random shifts (docs/results.md).

Labels of a task are ``0 .. N-1`` and every class must appear in the support set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allmap.learners.base import Learner, TaskModel
from allmap.tasks.batch import TaskBatch
from allmap.tasks.episodes import translations

__all__ = ["MetricLearner"]


class MetricLearner(Learner):
    """Base of learners that classify queries by comparing embeddings with the support set.

    ``model`` is the encoder (named ``model`` like every learner's network, so configs build it the same
    way). Subclasses implement :meth:`logits` (batched over any leading task dimensions; a class without
    support examples must score ``-inf``) and may override :meth:`objective` (the per-task training loss;
    default cross-entropy of the logits). ``test_shift``: see the module docstring (images only).
    """

    per_task_loss = False  # batch_loss embeds the whole meta-batch in one encoder call
    labels = "support"  # labels name the support set's classes 0..N-1

    def __init__(self, model: nn.Module, vectorize: bool | None = None, test_shift: int = 0) -> None:
        super().__init__(loss="cross_entropy", vectorize=vectorize)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__}: expected model (the encoder) to be a torch.nn.Module, got "
                f"{type(model).__name__}."
            )
        if isinstance(test_shift, bool) or not isinstance(test_shift, int) or test_shift < 0:
            raise ValueError(
                f"{type(self).__name__}: expected test_shift (pixels of the test-time shifts) to be an integer "
                f">= 0, got {test_shift!r}. Use 0 for none, 1 for the 9 shifts by up to one pixel."
            )
        self.model = model
        self.test_shift = test_shift

    # -- what subclasses define ----------------------------------------------------------------------
    def logits(self, z_support: Tensor, onehot: Tensor, z_query: Tensor) -> Tensor:
        """Class scores ``[..., Nq, N]`` from support embeddings ``[..., Ns, D]``, their one-hot labels
        ``[..., Ns, N]`` and query embeddings ``[..., Nq, D]``."""
        raise NotImplementedError

    def objective(self, z_support: Tensor, onehot: Tensor, z_query: Tensor, query_y: Tensor) -> Tensor:
        """Per-task training loss ``[...]``: mean cross-entropy of :meth:`logits` over the queries."""
        logits = self.logits(z_support, onehot, z_query)
        nll = F.cross_entropy(logits.flatten(0, -2), query_y.flatten(), reduction="none")
        return nll.view(query_y.shape).mean(-1)

    @staticmethod
    def prototypes(z_support: Tensor, onehot: Tensor) -> Tensor:
        """Class means ``[..., N, D]`` of the support embeddings, weighted by ``onehot [..., Ns, N]`` (one-hot
        labels, or soft class weights); zero for a class without support examples."""
        counts = onehot.sum(-2).unsqueeze(-1)  # [..., N, 1]
        return (onehot.transpose(-1, -2) @ z_support) / counts.clamp_min(1)

    # -- the mapping ---------------------------------------------------------------------------------
    def embed(self, x: Tensor, example_dims: int) -> Tensor:
        """Encoder output ``[..., D]`` for inputs ``[..., *x]`` where ``*x`` has ``example_dims`` dims; in eval
        mode with ``test_shift`` the mean over the shifted copies of each image (one encoder call each)."""
        lead = x.shape[: x.dim() - example_dims]
        flat = x.reshape(-1, *x.shape[x.dim() - example_dims :])
        if self.test_shift and not self.training:
            if example_dims != 3 or self.test_shift >= min(flat.shape[-2:]):
                raise ValueError(
                    f"{type(self).__name__}: test_shift={self.test_shift} moves images [channels, height, width] by "
                    f"fewer pixels than their height and width, but the examples have shape {list(flat.shape[1:])}. "
                    "Set test_shift=0 for non-image inputs, or a smaller shift."
                )
            z = torch.stack([self.model(view) for view in translations(flat, self.test_shift)]).mean(0)
        else:
            z = self.model(flat)
        return z.reshape(*lead, -1)

    @staticmethod
    def _ways(support_y: Tensor) -> int:
        return int(support_y.max()) + 1

    @staticmethod
    def _ways_in_adapt(support_y: Tensor) -> tuple[int, bool]:
        """``(N, known)``: N = largest label + 1; inside ``vmap`` (where a tensor cannot become a Python
        number) the number of support examples, an upper bound whose extra classes have no support example
        and score ``-inf``."""
        try:
            return int(support_y.max()) + 1, True
        except RuntimeError:
            return support_y.shape[-1], False

    def adapt(self, support_x: Tensor, support_y: Tensor) -> TaskModel:
        """Embed the support set; the task model scores queries against it (``[Nq, N]`` class scores).

        Runs under ``torch.func.vmap`` too; there the scores have one column per support example (classes
        beyond N score ``-inf``), since N cannot be read from the labels inside ``vmap``.
        """
        dims = support_x.dim() - 1
        ways, known = self._ways_in_adapt(support_y)
        if known:
            self.check_support(support_x, support_y)
        onehot = F.one_hot(support_y, ways)
        z_support = self.embed(support_x, dims)
        onehot = onehot.to(z_support.dtype)
        return TaskModel(lambda x: self.logits(z_support, onehot, self.embed(x, dims)))

    def task_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        """Training loss of one task; support and query are embedded in one encoder call."""
        dims = support_x.dim() - 1
        z = self.embed(torch.cat([support_x, query_x]), dims)
        ns = support_x.shape[0]
        onehot = F.one_hot(support_y, self._ways(support_y)).to(z.dtype)
        return self.objective(z[:ns], onehot, z[ns:], query_y)

    def batch_loss(self, tasks: TaskBatch) -> Tensor:
        """Mean training loss over the tasks: one encoder call for the whole batch unless ``vectorize`` is
        ``False`` (no ``vmap`` is involved, so BatchNorm is no obstacle: ``None`` and ``True`` both batch)."""
        if self.execution.mode == "loop":
            return self.looped_loss(tasks)
        dims = tasks.support_x.dim() - 2
        z = self.embed(torch.cat([tasks.support_x, tasks.query_x], dim=1), dims)
        ns = tasks.shots
        onehot = F.one_hot(tasks.support_y, self._ways(tasks.support_y)).to(z.dtype)
        return self.objective(z[:, :ns], onehot, z[:, ns:], tasks.query_y).mean()

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", test_shift={self.test_shift}" if self.test_shift else "")

    def probe(self, x: Tensor) -> Tensor:
        return self.model(x)
