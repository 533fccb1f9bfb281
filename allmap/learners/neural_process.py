"""Neural processes: the conditional neural process (CNP, Garnelo et al., ICML 2018) and the attentive neural
process (ANP, Kim et al., ICLR 2019) for regression, and the CNP for few-shot classification
(:class:`CNPClassifier`).

The task model is a network conditioned on the support (context) set. For regression it predicts a Gaussian
for every query (target) point: ``pred = [mean, std]`` with ``std = 0.1 + 0.9 softplus(raw)`` (the floor of the
DeepMind neural-processes notebooks). Both are trained on the Gaussian negative log-likelihood of the targets
(the ANP on its ELBO); evaluation scores their predictive distribution (:mod:`allmap.engine.predictive`).

CNP and ANP batch the meta-batch themselves (``per_task_loss = False``): every task of a meta-batch has the same
number of context and target points, so one encoder call embeds every context point of the meta-batch, as
the notebooks' batched code does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allmap.learners.base import Learner, TaskModel
from allmap.learners.metric import MetricLearner
from allmap.nets.mlp import MLP
from allmap.tasks.batch import TaskBatch

__all__ = ["CNP", "ANP", "CNPClassifier", "NeuralProcess", "MultiheadCrossAttention"]


def _sizes(owner: str, name: str, sizes: Sequence[int]) -> list[int]:
    sizes = list(sizes)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"{owner}: expected {name} as a list of positive layer widths, got {sizes!r}.")
    return sizes


def _std(raw: Tensor, min_std: float) -> Tensor:
    """``min_std + (1 - min_std) softplus(raw)``: a predictive std bounded away from zero (the notebooks' 0.1)."""
    return min_std + (1 - min_std) * F.softplus(raw)


class NeuralProcess(Learner):
    """Shared machinery of CNP and ANP: the Gaussian head, the task model and the batched meta-loss.

    Subclasses implement :meth:`predict` (batched ``[B, N, 2 * y_dim]`` predictions from a context) and may
    override :meth:`objective` (the training loss of a meta-batch; default the Gaussian NLL of the targets).
    """

    per_task_loss = False  # batch_loss runs the whole meta-batch in one pass

    def __init__(self, model: nn.Module, x_dim: int, y_dim: int, min_std: float) -> None:
        super().__init__(loss="gaussian_nll")
        name = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name}: expected model (the context encoder) to be a torch.nn.Module, got {model!r}.")
        for key, value in (("x_dim", x_dim), ("y_dim", y_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected {key} to be a positive integer, got {value!r}.")
        if not 0 < min_std < 1:
            raise ValueError(f"{name}: expected min_std (the floor of the predictive std) in (0, 1), got {min_std!r}.")
        self.model, self.x_dim, self.y_dim, self.min_std = model, x_dim, y_dim, float(min_std)
        self.width = self._encoder_width()

    def _encoder_width(self) -> int:
        """The width of the encoder's output for one ``[x, y]`` pair (a clear error if it takes another input)."""
        p = next(self.model.parameters(), None)
        probe = torch.zeros(1, self.x_dim + self.y_dim, dtype=p.dtype if p is not None else None)
        try:
            with torch.no_grad():
                out = self.model(probe.to(p.device) if p is not None else probe)
        except RuntimeError as err:
            raise ValueError(
                f"{type(self).__name__}: the encoder (model) must map a pair [x, y] of x_dim + y_dim = "
                f"{self.x_dim + self.y_dim} features to a representation, e.g. model: {{name: mlp, sizes: "
                f"[{self.x_dim + self.y_dim}, 128, 128, 128, 128]}}; it failed on that input: {err}"
            ) from None
        return int(out.shape[-1])

    def gaussian(self, out: Tensor) -> Tensor:
        """``[mean, std]`` from a decoder's output ``[..., 2 * y_dim]`` of mean and raw std."""
        mean, raw = out.chunk(2, dim=-1)
        return torch.cat([mean, _std(raw, self.min_std)], dim=-1)

    def predict(self, context_x: Tensor, context_y: Tensor, x: Tensor) -> Tensor:
        """Predictions ``[B, N, 2 * y_dim]`` at ``x [B, N, x_dim]`` given contexts ``[B, Nc, *]``."""
        raise NotImplementedError

    def objective(self, tasks: TaskBatch) -> Tensor:
        """The training loss of a meta-batch: the Gaussian NLL per target point, averaged."""
        return self.loss_fn(self.predict(tasks.support_x, tasks.support_y, tasks.query_x), tasks.query_y)

    def batch_loss(self, tasks: TaskBatch) -> Tensor:
        return self.objective(tasks)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> TaskModel:
        """The task model of one context set: ``x [N, x_dim] -> [mean, std] [N, 2 * y_dim]``."""
        sx, sy = support_x[None], support_y[None]
        return TaskModel(lambda x: self.predict(sx, sy, x[None])[0])

    def probe(self, x: Tensor) -> Tensor:
        p = next(self.parameters())
        sx = torch.zeros(1, 1, self.x_dim, dtype=p.dtype, device=p.device)
        return self.predict(sx, torch.zeros(1, 1, self.y_dim, dtype=p.dtype, device=p.device), x[None].to(p.dtype))[0]

    def pairs(self, x: Tensor, y: Tensor) -> Tensor:
        """``[x, y]`` concatenated ``[B, N, x_dim + y_dim]``, with a clear error for targets without a last
        dimension."""
        if y.dim() != x.dim():
            raise ValueError(
                f"{type(self).__name__}: expected targets [tasks, points, y_dim] like the inputs "
                f"[tasks, points, x_dim], got shapes {list(y.shape)} and {list(x.shape)}. Add the last "
                "dimension with y.unsqueeze(-1)."
            )
        return torch.cat([x, y.to(x.dtype)], dim=-1)

    def extra_repr(self) -> str:
        return f"x_dim={self.x_dim}, y_dim={self.y_dim}, min_std={self.min_std}, {super().extra_repr()}"


class CNP(NeuralProcess):
    """Conditional neural process (Garnelo et al., "Conditional Neural Processes", ICML 2018).

    Every context pair is encoded, ``r_i = h([x_i, y_i])``, and the encodings are averaged,
    ``r = (1/Nc) sum_i r_i`` (a representation invariant to the order of the context); the decoder maps
    ``[r, x]`` to a Gaussian, ``g([r, x]) = [mean, raw]``, ``std = 0.1 + 0.9 softplus(raw)``. Trained on the
    NLL of the targets, ``-(1/T) sum_t log N(y_t; mean_t, std_t^2)``.

    Args:
        model: the encoder ``h``, on pairs of ``x_dim + y_dim`` features (the paper's 1-d regression:
            ``MLP([2, 128, 128, 128, 128])``, four layers of 128, the last linear).
        x_dim, y_dim: input and target dimensions (from the task family in configs).
        decoder: hidden widths of the decoder ``g``; its output layer has ``2 * y_dim`` units (the paper:
            ``[128, 128]``, so ``[128, 128, 2]`` in all).
        min_std: the floor of the predictive std.

    Example:
        >>> import torch, allmap
        >>> cnp = allmap.CNP(allmap.nets.MLP([2, 128, 128, 128, 128]))
        >>> tasks = allmap.tasks.GPRegression().sample(64, torch.Generator().manual_seed(0))
        >>> cnp.meta_backward(tasks).shape
        torch.Size([])
    """

    def __init__(
        self,
        model: nn.Module,
        x_dim: int = 1,
        y_dim: int = 1,
        decoder: Sequence[int] = (128, 128),
        min_std: float = 0.1,
    ) -> None:
        super().__init__(model, x_dim, y_dim, min_std)
        self.decoder = MLP([self.width + x_dim, *_sizes("CNP", "decoder", decoder), 2 * y_dim])

    def represent(self, context_x: Tensor, context_y: Tensor) -> Tensor:
        """The mean encoding ``r [B, width]`` of each context set."""
        return self.model(self.pairs(context_x, context_y)).mean(-2)

    def predict(self, context_x: Tensor, context_y: Tensor, x: Tensor) -> Tensor:
        r = self.represent(context_x, context_y)
        r = r[..., None, :].expand(*x.shape[:-1], r.shape[-1])
        return self.gaussian(self.decoder(torch.cat([r, x], dim=-1)))


class CNPClassifier(MetricLearner):
    """The conditional neural process for few-shot classification (Garnelo et al. 2018, its Omniglot task).

    The observations are the support images with their labels; the encoder ``h`` (``model``, e.g. conv4)
    embeds each image, and the aggregation is by class: ``r_c = (1/|S_c|) sum_{i: y_i = c} h(x_i)``, a
    representation of class ``c`` invariant to the order of its examples. The decoder ``g`` (an MLP) maps
    the concatenation ``[r_c, h(x)]`` for a target ``x`` to the logit of class ``c``, and the predictive
    distribution is categorical, ``p(y = c | x, S) = softmax_c g([r_c, h(x)])``, trained on its
    log-likelihood of the targets (the query cross-entropy). One ``g`` scores every class, so the
    prediction is equivariant to relabelling the classes and a model runs at any number of ways. ``g``'s
    first layer on the concatenation is computed as the sum of its two halves, ``W_r r_c + W_x h(x)``
    (one product per class and per target, not per pair).

    Args:
        model: the encoder ``h`` (images to ``features``-dimensional vectors).
        features: the width of ``h``'s output (64 for conv4-64 on 28x28 images).
        decoder: hidden widths of ``g``; its output layer has one unit (``[128, 128]``: ``[128, 128, 1]``).
        vectorize, test_shift: as for every metric learner (:class:`~allmap.learners.metric.MetricLearner`).

    Example:
        >>> import torch, allmap
        >>> learner = allmap.CNPClassifier(allmap.nets.MLP([2, 16, 8]), features=8)
        >>> tasks = allmap.tasks.Logistic2D(shots=10).sample(4, torch.Generator().manual_seed(0))
        >>> learner.meta_loss(tasks).backward()
    """

    def __init__(
        self,
        model: nn.Module,
        features: int = 64,
        decoder: Sequence[int] = (128, 128),
        vectorize: bool | None = None,
        test_shift: int = 0,
    ) -> None:
        super().__init__(model, vectorize=vectorize, test_shift=test_shift)
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(
                f"CNPClassifier: expected features (the width of the encoder's output) to be a positive "
                f"integer, got {features!r}."
            )
        hidden = _sizes("CNPClassifier", "decoder", decoder)
        self.features = features
        self.class_in = nn.Linear(features, hidden[0])  # g's first layer, the half that reads r_c
        self.target_in = nn.Linear(features, hidden[0], bias=False)  # ... and the half that reads h(x)
        self.decoder = nn.Sequential(nn.ReLU(), MLP([*hidden, 1]))

    def logits(self, z_support: Tensor, onehot: Tensor, z_query: Tensor) -> Tensor:
        if z_support.shape[-1] != self.features:
            raise ValueError(
                f"CNPClassifier: the encoder outputs {z_support.shape[-1]} features per image but the decoder "
                f"was built for features={self.features}; set learner.features={z_support.shape[-1]}."
            )
        r = self.class_in(self.prototypes(z_support, onehot))  # [..., N, H]
        scores = self.decoder(r.unsqueeze(-3) + self.target_in(z_query).unsqueeze(-2)).squeeze(-1)  # [..., Nq, N]
        empty = onehot.sum(-2).unsqueeze(-2) == 0  # classes without support examples (inside vmap only)
        return scores.masked_fill(empty, float("-inf"))

    def extra_repr(self) -> str:
        return f"features={self.features}, {super().extra_repr()}"


class MultiheadCrossAttention(nn.Module):
    """Multihead dot-product attention of queries over keys (Vaswani et al. 2017), as the ANP notebook's
    ``multihead_attention``: per head ``softmax(q W_q (k W_k)^T / sqrt(d_h)) v W_v``, softmax over the keys
    (the context points), the heads concatenated and projected by ``W_o``; no biases. Weights are initialised
    as the notebook's (normal, std ``d^-0.5``)."""

    def __init__(self, dim: int, value_dim: int, heads: int = 8) -> None:
        super().__init__()
        if value_dim % heads:
            raise ValueError(f"ANP: expected the value width ({value_dim}) to be divisible by heads, got {heads}.")
        self.heads = heads
        self.wq = nn.Linear(dim, value_dim, bias=False)
        self.wk = nn.Linear(dim, value_dim, bias=False)
        self.wv = nn.Linear(value_dim, value_dim, bias=False)
        self.wo = nn.Linear(value_dim, value_dim, bias=False)
        for w, fan in ((self.wq, dim), (self.wk, dim), (self.wv, value_dim), (self.wo, value_dim)):
            nn.init.normal_(w.weight, std=fan**-0.5)

    def _split(self, t: Tensor) -> Tensor:  # [B, N, H * d] -> [B, H, N, d]
        return t.unflatten(-1, (self.heads, -1)).transpose(-2, -3)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        q, k, v = self._split(self.wq(query)), self._split(self.wk(key)), self._split(self.wv(value))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # over the keys
        return self.wo((weights @ v).transpose(-2, -3).flatten(-2))


class ANP(NeuralProcess):
    """Attentive neural process (Kim et al., "Attentive Neural Processes", ICLR 2019).

    Two paths encode the context. The deterministic path attends: each target ``x`` gets
    ``r(x) = MultiheadCrossAttention(a(x), a(x_C), h([x_C, y_C]))``, with ``h`` the encoder (``model``) and
    ``a`` an MLP shared by queries and keys. The latent path averages ``e([x_i, y_i])`` over a set and maps it
    to a Gaussian ``q(z | set)`` (``std = 0.1 + 0.9 sigmoid``). The decoder maps ``[r(x), z, x]`` to
    ``[mean, std]``. Training maximises the ELBO of the targets ``T`` (which include the context ``C``),
    ``(1/|T|) sum_t E_{q(z|T)} log p(y_t | x_t, r, z) - KL(q(z|T) || q(z|C)) / |T|``, with one reparameterised
    sample of ``z ~ q(z|T)`` per task (``learner.train()``); in ``learner.eval()`` the ELBO is taken at the mean
    of ``q(z|T)``, a deterministic validation loss.

    At test time ``z`` comes from the prior ``q(z|C)``: the task model's ``distribution(x)`` is the
    Monte-Carlo mixture of ``samples`` draws ``z_s ~ q(z|C)``, ``p(y|x) ~ (1/S) sum_s N(y; mean_s, std_s^2)``,
    so evaluation's log-likelihood is the Monte-Carlo estimate of the marginal predictive density per point
    (not importance sampled); calling the task model predicts at the prior's mean.

    Args:
        model: the deterministic encoder ``h`` on ``[x, y]`` (the paper: four layers of 128).
        x_dim, y_dim: input and target dimensions.
        latent: hidden widths of the latent encoder ``e`` (the paper: ``[128, 128, 128, 128]``).
        latent_dim: the dimension of ``z`` (128).
        attention: hidden widths of ``a`` (``[128, 128]``); its output width must equal the encoder's.
        heads: attention heads (8).
        decoder: hidden widths of the decoder (``[128, 128]``; output ``2 * y_dim``).
        samples: Monte-Carlo draws of ``z`` in the test-time predictive distribution.
        min_std: the floor of the predictive std.
    """

    def __init__(
        self,
        model: nn.Module,
        x_dim: int = 1,
        y_dim: int = 1,
        latent: Sequence[int] = (128, 128, 128, 128),
        latent_dim: int = 128,
        attention: Sequence[int] = (128, 128),
        heads: int = 8,
        decoder: Sequence[int] = (128, 128),
        samples: int = 32,
        min_std: float = 0.1,
    ) -> None:
        super().__init__(model, x_dim, y_dim, min_std)
        latent, attention = _sizes("ANP", "latent", latent), _sizes("ANP", "attention", attention)
        for key, value in (("latent_dim", latent_dim), ("heads", heads), ("samples", samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ANP: expected {key} to be a positive integer, got {value!r}.")
        if attention[-1] != self.width:
            raise ValueError(
                f"ANP: the attention MLP's output width ({attention[-1]}) must equal the encoder's ({self.width}); "
                f"set attention: [..., {self.width}]."
            )
        self.latent_dim, self.samples = latent_dim, samples
        self.latent_encoder = MLP([x_dim + y_dim, *latent])
        self.latent_head = MLP([latent[-1], (latent[-1] + latent_dim) // 2, 2 * latent_dim])
        self.keys = MLP([x_dim, *attention])
        self.attention = MultiheadCrossAttention(attention[-1], self.width, heads)
        self.decoder = MLP([self.width + latent_dim + x_dim, *_sizes("ANP", "decoder", decoder), 2 * y_dim])

    def latent_distribution(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, std)`` ``[B, latent_dim]`` of ``q(z | set)`` for sets ``[B, N, *]``."""
        mean, raw = self.latent_head(self.latent_encoder(self.pairs(x, y)).mean(-2)).chunk(2, dim=-1)
        return mean, 0.1 + 0.9 * torch.sigmoid(raw)

    def deterministic(self, context_x: Tensor, context_y: Tensor, x: Tensor) -> Tensor:
        """``r(x) [B, N, width]``: the context encodings attended by each target."""
        return self.attention(self.keys(x), self.keys(context_x), self.model(self.pairs(context_x, context_y)))

    def decode(self, r: Tensor, z: Tensor, x: Tensor) -> Tensor:
        """``[mean, std]`` ``[..., N, 2 * y_dim]`` from ``r [..., N, width]``, ``z [..., latent_dim]``, ``x``."""
        z = z[..., None, :].expand(*x.shape[:-1], z.shape[-1])
        return self.gaussian(self.decoder(torch.cat([r, z, x], dim=-1)))

    def predict(self, context_x: Tensor, context_y: Tensor, x: Tensor) -> Tensor:
        """Predictions at the prior's mean ``z = E q(z | context)``."""
        return self.decode(
            self.deterministic(context_x, context_y, x), self.latent_distribution(context_x, context_y)[0], x
        )

    def objective(self, tasks: TaskBatch, noise: Tensor | None = None) -> Tensor:
        """The negative ELBO per target point (see the class docstring), averaged over tasks. ``noise
        [B, latent_dim]`` is the reparameterisation noise (default: drawn in training mode, zero in eval)."""
        sx, sy, qx, qy = tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y
        prior_mean, prior_std = self.latent_distribution(sx, sy)
        post_mean, post_std = self.latent_distribution(qx, qy)
        if noise is None:
            noise = torch.randn_like(post_mean) if self.training else torch.zeros_like(post_mean)
        pred = self.decode(self.deterministic(sx, sy, qx), post_mean + post_std * noise, qx)
        kl = (
            prior_std.log()
            - post_std.log()
            + (post_std.pow(2) + (post_mean - prior_mean).pow(2)) / (2 * prior_std.pow(2))
            - 0.5
        ).sum(-1)  # KL(q(z|T) || q(z|C)) per task
        return self.loss_fn(pred, qy) + kl.mean() / qx.shape[-2]

    def adapt(self, support_x: Tensor, support_y: Tensor) -> TaskModel:
        """The task model of one context set: called, ``[mean, std]`` at the prior's mean; its
        ``distribution(x)`` is the mixture over ``samples`` draws of ``z`` from the prior."""
        sx, sy = support_x[None], support_y[None]
        mean, std = self.latent_distribution(sx, sy)

        def distribution(x: Tensor) -> tuple[Tensor, Tensor]:
            z = mean + std * torch.randn(self.samples, self.latent_dim, dtype=mean.dtype, device=mean.device)
            xs = x[None].expand(self.samples, *x.shape)
            pred = self.decode(self.deterministic(sx, sy, x[None]).expand(self.samples, -1, -1), z, xs)
            return pred.chunk(2, dim=-1)

        return TaskModel(
            lambda x: self.decode(self.deterministic(sx, sy, x[None]), mean, x[None])[0], None, distribution
        )

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, samples={self.samples}, {super().extra_repr()}"
