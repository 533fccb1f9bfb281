"""SNAIL: a Simple Neural AttentIve meta-Learner (Mishra, Rohaninejad, Chen & Abbeel, ICLR 2018).

The task model is a sequence model read at the query: the support set is fed as a sequence of
``(f_phi(x_i), onehot(y_i))`` pairs, the query as ``(f_phi(x), 0)`` (its label zeroed) at the end, and the
network's output at the query position is the class score vector. The network interleaves two causal blocks,
so that position ``t`` sees positions ``<= t`` only:

* a **TC block** ``TCBlock(T, D)``: ``ceil(log2 T)`` dense blocks with dilations ``2, 4, 8, ...``; a dense
  block with dilation ``r`` computes a gated causal convolution of kernel 2,
  ``a_t = tanh(W_f [h_{t-r}, h_t] + b_f) * sigmoid(W_g [h_{t-r}, h_t] + b_g)`` (``h_{t-r} = 0`` before the
  sequence starts), and appends its ``D`` channels to its input, ``h_t <- [h_t, a_t]``;
* an **attention block** ``AttentionBlock(K, V)``: causal single-head soft attention,
  ``p_t = softmax_{j <= t}(q_t . k_j / sqrt(K))`` (normalised over the keys ``j``), ``read_t = sum_j p_tj v_j``,
  with ``q, k`` affine maps of ``h`` to ``K`` channels and ``v`` to ``V``; it appends ``read_t`` to ``h_t``.

The Omniglot architecture of the paper (its appendix) is the conv4 embedding with a fully connected layer to
64 features, then ``AttentionBlock(64, 32), TCBlock(T, 128), AttentionBlock(256, 128), TCBlock(T, 128),
AttentionBlock(512, 256)`` and a 1x1 convolution (a linear map per position) to the N class scores, with
``T = N K + 1``; the meta-parameters are all of it, trained on the cross-entropy at the query position.

Several queries per support set: each query is its own sequence ``(support, query)`` in the paper. Since the
blocks are causal, the support positions' outputs do not depend on the query, so here one pass computes the
support prefix once and every query position as if it were the last element after that prefix: its causal
convolutions read the prefix (never another query) and its attention covers the support positions and itself.
That is exactly the paper's one-query sequences, batched: ``Q`` queries cost ``N K + Q`` positions instead of
``Q (N K + 1)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allmap.checks import check_int
from allmap.learners.base import Learner, TaskModel
from allmap.nets.conv import check_precision, runs_bfloat16
from allmap.tasks.batch import TaskBatch

__all__ = ["SNAIL", "TCBlock", "AttentionBlock", "DenseBlock", "causal_mask", "delayed"]


def delayed(h: Tensor, dilation: int, prefix: int) -> Tensor:
    """``h`` moved ``dilation`` positions later along dim -2, zero filled: the past input of a causal
    convolution. Positions ``>= prefix`` are queries, each the element right after the ``prefix`` support
    positions, so each reads the support position ``prefix - dilation`` (zero if there is none)."""
    lead, channels = h.shape[:-2], h.shape[-1]
    queries = h.shape[-2] - prefix
    shift = min(dilation, prefix)
    support = torch.cat([h.new_zeros(*lead, shift, channels), h[..., : prefix - shift, :]], dim=-2)
    if dilation <= prefix:
        past = h[..., prefix - dilation : prefix - dilation + 1, :].expand(*lead, queries, channels)
    else:
        past = h.new_zeros(*lead, queries, channels)
    return torch.cat([support, past], dim=-2)


def causal_mask(length: int, prefix: int, device: torch.device) -> Tensor:
    """``[length, length]`` boolean mask, True where position ``i`` may attend to position ``j``: ``j <= i``
    among the ``prefix`` support positions; a query position (``i >= prefix``) sees the support and itself."""
    i = torch.arange(length, device=device).unsqueeze(1)
    j = torch.arange(length, device=device).unsqueeze(0)
    return ((j <= i) & (j < prefix)) | (j == i)


class DenseBlock(nn.Module):
    """Gated causal convolution of kernel 2 and dilation ``dilation`` with ``filters`` output channels,
    concatenated to its input: ``[h_t, tanh(xf_t) * sigmoid(xg_t)]`` with
    ``[xf_t, xg_t] = W [h_{t-dilation}, h_t] + b`` (one linear map for both convolutions)."""

    def __init__(self, in_channels: int, dilation: int, filters: int) -> None:
        super().__init__()
        self.dilation = dilation
        self.conv = nn.Linear(2 * in_channels, 2 * filters)

    def forward(self, h: Tensor, prefix: int) -> Tensor:
        xf, xg = self.conv(torch.cat([delayed(h, self.dilation, prefix), h], dim=-1)).chunk(2, dim=-1)
        return torch.cat([h, torch.tanh(xf) * torch.sigmoid(xg)], dim=-1)


class TCBlock(nn.Module):
    """``ceil(log2 length)`` dense blocks of ``filters`` channels with dilations ``2, 4, ..., 2^ceil(log2
    length)``: a receptive field that covers a sequence of ``length`` positions."""

    def __init__(self, in_channels: int, length: int, filters: int) -> None:
        super().__init__()
        depth = max(1, math.ceil(math.log2(length)))
        self.blocks = nn.ModuleList(DenseBlock(in_channels + i * filters, 2 ** (i + 1), filters) for i in range(depth))
        self.out_channels = in_channels + depth * filters

    def forward(self, h: Tensor, prefix: int) -> Tensor:
        for block in self.blocks:
            h = block(h, prefix)
        return h


class AttentionBlock(nn.Module):
    """Causal soft attention with ``key_size`` keys and ``value_size`` values, concatenated to its input.

    ``p = softmax(q k^T / sqrt(key_size))`` over the keys (the last dimension), masked by
    :func:`causal_mask` built on the input's device; the read ``p v`` is appended to ``h``."""

    def __init__(self, in_channels: int, key_size: int, value_size: int) -> None:
        super().__init__()
        self.key_size = key_size
        self.query = nn.Linear(in_channels, key_size)
        self.key = nn.Linear(in_channels, key_size)
        self.value = nn.Linear(in_channels, value_size)
        self.out_channels = in_channels + value_size

    def weights(self, h: Tensor, prefix: int) -> Tensor:
        """Attention weights ``[..., L, L]``: row ``i`` is position ``i``'s distribution over the keys."""
        logits = self.query(h) @ self.key(h).transpose(-1, -2) / math.sqrt(self.key_size)
        mask = causal_mask(h.shape[-2], prefix, h.device)
        return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)

    def forward(self, h: Tensor, prefix: int) -> Tensor:
        return torch.cat([h, self.weights(h, prefix) @ self.value(h)], dim=-1)


class SNAIL(Learner):
    """SNAIL for N-way K-shot classification: a causal sequence model over the labelled support set and the
    query (see the module docstring for the blocks and the update of each position).

    Args:
        model: the embedding ``f_phi`` of one example, ``[n, *x] -> [n, features]`` (the paper's Omniglot
            embedding is ``allmap.nets.Conv4(out_features=64)``: conv4-64 and a linear layer to 64).
        y_dim: N, the number of classes (label one-hots and class scores); filled in from the task family.
        shots: K, support examples per class; with N it sets the sequence length ``T = N K + 1`` that each
            TC block covers (``ceil(log2 T)`` dense blocks). Other support sizes run too, with that depth.
        features: size of the embedding ``f_phi(x)``.
        filters: channels of each dense block (``D`` of ``TCBlock(T, D)``; 128 in the paper).
        attention: ``(key_size, value_size)`` of the three attention blocks (the paper's
            ``(64, 32), (256, 128), (512, 256)``).
        precision: ``"float32"`` (default), ``"bfloat16"``: the sequence blocks run under
            ``torch.autocast`` with bfloat16 (weights and class scores stay float32), faster on CPUs with
            native bfloat16, or ``"auto"``: bfloat16 only where it is native
            (:func:`allmap.nets.conv.native_bfloat16`); float64 inputs are never cast, so gradient checks stay
            exact. The embedding has its own setting (``Conv4(precision=...)``).
        vectorize: ``False`` loops over tasks; otherwise one embedding call and one sequence pass cover the
            whole meta-batch.

    Example:
        >>> import torch, allmap
        >>> from allmap.learners.snail import SNAIL
        >>> from allmap.tasks import Episodes, gaussian_classes
        >>> learner = SNAIL(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8)), y_dim=3,
        ...                 features=8, filters=4, attention=((4, 2), (4, 2), (4, 2)))
        >>> tasks = Episodes(gaussian_classes(), ways=3, shots=1, queries=2).sample(4, torch.Generator())
        >>> learner.meta_loss(tasks).backward()
    """

    per_task_loss = False  # batch_loss embeds the whole meta-batch in one call and runs one sequence pass
    labels = "outputs"  # labels 0..N-1 index the N class scores (and the N label channels)

    def __init__(
        self,
        model: nn.Module,
        y_dim: int,
        shots: int = 1,
        features: int = 64,
        filters: int = 128,
        attention: tuple[tuple[int, int], ...] | list[list[int]] = ((64, 32), (256, 128), (512, 256)),
        precision: str = "float32",
        loss: str = "cross_entropy",
        vectorize: bool | None = None,
    ) -> None:
        super().__init__(loss=loss, vectorize=vectorize)
        if not self.classification:
            raise ValueError(f"SNAIL: classifies with labels as inputs; expected loss='cross_entropy', got {loss!r}.")
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"SNAIL: expected model (the embedding) to be a torch.nn.Module, got {type(model).__name__}."
            )
        for name, value in (("y_dim", y_dim), ("shots", shots), ("features", features), ("filters", filters)):
            check_int("SNAIL", name, value)
        check_precision("SNAIL", precision)
        self.precision = precision
        pairs = [tuple(p) for p in attention]
        if len(pairs) != 3 or any(len(p) != 2 or min(p) < 1 for p in pairs):
            raise ValueError(
                f"SNAIL: expected attention to be three (key_size, value_size) pairs of positive sizes, got "
                f"{attention!r}. The paper uses [[64, 32], [256, 128], [512, 256]]."
            )
        self.model, self.ways, self.features = model, int(y_dim), int(features)
        length = self.ways * int(shots) + 1
        channels = self.features + self.ways
        blocks: list[nn.Module] = []
        for i, (keys, values) in enumerate(pairs):
            blocks.append(AttentionBlock(channels, keys, values))
            channels = blocks[-1].out_channels
            if i < 2:
                blocks.append(TCBlock(channels, length, filters))
                channels = blocks[-1].out_channels
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Linear(channels, self.ways)  # the paper's final 1x1 convolution

    # -- the sequence model --------------------------------------------------------------------------
    def embed(self, x: Tensor, example_dims: int) -> Tensor:
        """``f_phi`` of inputs ``[..., *x]`` (``*x`` has ``example_dims`` dims) as ``[..., features]``."""
        lead = x.shape[: x.dim() - example_dims]
        z = self.model(x.reshape(-1, *x.shape[x.dim() - example_dims :]))
        if z.dim() != 2 or z.shape[-1] != self.features:
            raise ValueError(
                f"SNAIL: expected the embedding model to return [examples, {self.features}] (features="
                f"{self.features}), got {list(z.shape)}. Set learner.features to the model's output size."
            )
        return z.reshape(*lead, self.features)

    def scores(self, z_support: Tensor, support_y: Tensor, z_query: Tensor) -> Tensor:
        """Class scores ``[..., Q, N]`` of the queries from support embeddings ``[..., S, F]``, support labels
        ``[..., S]`` and query embeddings ``[..., Q, F]``: one pass over the sequence (support, queries)."""
        classes = torch.arange(self.ways, device=support_y.device)
        onehot = (support_y.unsqueeze(-1) == classes).to(z_support.dtype)  # vmappable one-hot
        zero = z_query.new_zeros(*z_query.shape[:-1], self.ways)  # the query's label is unknown: zeros
        h = torch.cat([torch.cat([z_support, onehot], -1), torch.cat([z_query, zero], -1)], dim=-2)
        return self.sequence(h, z_support.shape[-2])[..., z_support.shape[-2] :, :]

    def sequence(self, h: Tensor, prefix: int) -> Tensor:
        """Outputs ``[..., L, N]`` of the blocks and the final linear map at every position of a sequence
        ``h [..., L, features + N]`` whose first ``prefix`` positions are the support set and the rest
        queries (each read as the element right after the support set; ``prefix = L``: a plain causal
        sequence). Position ``t``'s output depends only on positions ``<= t`` (queries: on the support set and
        that query)."""
        dtype = h.dtype
        with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=runs_bfloat16(self.precision, h)):
            for block in self.blocks:
                h = block(h, prefix)
            out = self.out(h)
        return out.to(dtype)

    # -- the mapping ---------------------------------------------------------------------------------
    def adapt(self, support_x: Tensor, support_y: Tensor) -> TaskModel:
        """Embed the support set; the task model runs the sequence (support, queries) for queries ``x``."""
        dims = support_x.dim() - 1
        z_support = self.embed(support_x, dims)
        return TaskModel(lambda x: self.scores(z_support, support_y, self.embed(x, dims)))

    def task_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        """Query cross-entropy of one task; support and query are embedded in one call."""
        dims = support_x.dim() - 1
        z = self.embed(torch.cat([support_x, query_x]), dims)
        ns = support_x.shape[0]
        return self.loss_fn(self.scores(z[:ns], support_y, z[ns:]), query_y)

    def batch_loss(self, tasks: TaskBatch) -> Tensor:
        """Mean query cross-entropy over the tasks: one embedding call and one sequence pass for the whole
        meta-batch unless ``vectorize`` is ``False`` (then a loop over tasks)."""
        if self.execution.mode == "loop":
            return self.looped_loss(tasks)
        dims = tasks.support_x.dim() - 2
        z = self.embed(torch.cat([tasks.support_x, tasks.query_x], dim=1), dims)
        ns = tasks.shots
        logits = self.scores(z[:, :ns], tasks.support_y, z[:, ns:])
        return F.cross_entropy(logits.flatten(0, 1), tasks.query_y.flatten())

    def probe(self, x: Tensor) -> Tensor:
        return self.embed(x, x.dim() - 1).new_zeros(len(x), self.ways)
