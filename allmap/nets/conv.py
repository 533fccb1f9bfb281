"""The four-block convolutional backbones of the few-shot literature, runnable by ``functional_call``.

* :class:`Conv4` (Vinyals et al. 2016; Snell et al. 2017): four blocks of 3x3 convolution (``hidden``
  filters, padding 1) + BatchNorm + ReLU + 2x2 max-pool. On 28x28 Omniglot images the output is
  ``hidden x 1 x 1``, a 64-d embedding for ``hidden=64``; on 84x84 mini-ImageNet it is ``hidden x 5 x 5``.
* :class:`MAMLConv` (Finn et al. 2017, the Omniglot network of the MAML code): the same blocks with
  stride-2 convolutions instead of max-pooling, followed by a mean over the remaining spatial positions.

Both split into ``body`` (the embedding) and ``head`` (a linear classifier, absent when ``out_features`` is
``None``), so ANIL can adapt the head by name and metric learners can use the body alone. Every layer is a
plain ``nn.Module`` with no in-place parameter use, so ``torch.func.functional_call`` and ``vmap`` run them;
MAML-family learners switch BatchNorm to batch statistics (see ``allmap.learners.base.use_batch_statistics``).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from allmap.checks import check_int
from allmap.nets.norm import under_vmap

__all__ = ["Conv4", "MAMLConv", "nhwc", "check_precision", "PRECISIONS", "native_bfloat16", "runs_bfloat16"]


def _check(owner: str, in_channels: int, hidden: int, out_features: int | None) -> None:
    check_int(owner, "in_channels", in_channels)
    check_int(owner, "hidden", hidden)
    if out_features is not None:
        check_int(owner, "out_features", out_features, what="None for an embedding only")


PRECISIONS = ("float32", "bfloat16", "auto")


def check_precision(owner: str, precision: str) -> None:
    """Raise unless ``precision`` is one of :data:`PRECISIONS`: ``"float32"``, ``"bfloat16"`` mixed
    precision, or ``"auto"`` (bfloat16 where the device computes it natively, float32 elsewhere)."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"{owner}: expected precision to be one of {', '.join(PRECISIONS)}, got {precision!r}. "
            "'bfloat16' runs the blocks under torch.autocast (mixed precision: weights and the "
            "returned embedding stay float32); 'auto' does so only where bfloat16 is native to the device."
        )


@functools.cache
def native_bfloat16(device_type: str) -> bool:
    """Whether this machine's ``device_type`` computes bfloat16 natively: CPUs with AVX-512 BF16 or AMX,
    CUDA GPUs that support it. Elsewhere torch emulates bfloat16, many times slower than float32."""
    if device_type == "cpu":
        return any(
            getattr(torch.cpu, name, lambda: False)()
            for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return False


def runs_bfloat16(precision: str, x: Tensor) -> bool:
    """Whether a block set to ``precision`` runs ``x`` under bfloat16 autocast: float32 inputs only (float64
    stays exact, so gradient checks do), with ``"bfloat16"`` always and with ``"auto"`` where it is native."""
    if x.dtype != torch.float32:
        return False
    return precision == "bfloat16" or (precision == "auto" and native_bfloat16(x.device.type))


def nhwc(x: Tensor) -> Tensor:
    """``x [N, C, H, W]`` in NHWC (``channels_last``) memory layout, with NHWC strides even where the layout
    is ambiguous. A one-channel batch is contiguous in both layouts, so ``x.contiguous(channels_last)``
    leaves its NCHW strides, and a convolution whose weight is not NHWC either (MAML's adapted weights
    ``theta - lr * g`` are not) then runs NCHW: the first conv4 block, the largest, would run its
    BatchNorm and max-pooling in NCHW, several times slower than in NHWC."""
    if x.is_contiguous(memory_format=torch.channels_last) and x.stride(1) == 1:
        return x
    return x.clone(memory_format=torch.channels_last)  # NHWC strides for one channel too


class _Blocks(nn.Module):
    def __init__(
        self,
        in_channels: int,
        hidden: int,
        pool: bool,
        channels_last: bool = False,
        blocks: int = 4,
        precision: str = "float32",
        readout: str = "mean",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(blocks):
            cin = in_channels if i == 0 else hidden
            layers += [nn.Conv2d(cin, hidden, 3, stride=1 if pool else 2, padding=1), nn.BatchNorm2d(hidden)]
            # max-pool before ReLU: the same function (ReLU is monotone, so they commute) with a ReLU over
            # a quarter of the elements, a saving on CPU where elementwise ops are a share of the step.
            layers += [nn.MaxPool2d(2), nn.ReLU()] if pool else [nn.ReLU()]
        self.layers = nn.Sequential(*layers)
        self.pool = pool
        self.flatten = pool or readout == "flatten"
        self.channels_last = channels_last
        self.precision = precision
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        # vmap cannot reorder memory (grad transforms can); compiled graphs pick their own layouts
        if self.channels_last and not torch.compiler.is_compiling() and not under_vmap():
            x = nhwc(x)
        # bfloat16: convolutions, BatchNorm and pooling of float32 inputs run in bfloat16 (autocast leaves
        # float64 alone, so gradient checks stay exact); the embedding is returned in float32, so distances,
        # heads and losses downstream keep full precision.
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=runs_bfloat16(self.precision, x)):
            h = self.layers(x)
        # Conv4 flattens what is left (1x1 on Omniglot); the MAML network averages over space.
        h = h.flatten(1) if self.flatten else h.mean(dim=(-2, -1))
        return h.to(x.dtype)


class Conv4(nn.Module):
    """Conv4: 4 x [conv3x3(hidden) -> BatchNorm -> ReLU -> maxpool 2x2], flattened; optional linear head.

    Args:
        in_channels: 1 for Omniglot, 3 for colour images.
        hidden: filters per block (64 in the papers).
        out_features: classes of the linear head, or ``None`` for the embedding alone.
        flat_features: size of the flattened body output, needed for the head when images are not 28x28
            (``hidden * 25`` for 84x84); default ``hidden`` (28x28 inputs).
        channels_last: store the weights and run the convolutions in NHWC memory layout (the same
            function; not applied under ``torch.func.vmap``). NHWC is faster for small convolutions on
            CPU, such as a ProtoNets episode's or a second-order MAML task's (see docs/results.md). Off by
            default: torch's NHWC BatchNorm on CPU accumulates its statistics less precisely in float32,
            and second-order meta-gradients amplify that error (``benchmarks/peers.py`` compares both
            layouts with the float64 meta-gradient).
        precision: ``"float32"`` (default), ``"bfloat16"``: mixed precision, the blocks under
            ``torch.autocast`` with bfloat16 (about 8 significant bits), weights and output in float32, or
            ``"auto"``: bfloat16 where the device computes it natively (:func:`native_bfloat16`), float32
            elsewhere. bfloat16 is faster on CPUs with native bfloat16 (such as AVX-512 BF16;
            ``benchmarks/mixed_precision.py`` measures it) and many times slower where it is emulated; it
            changes results at the level of bfloat16 rounding.

    Example:
        >>> import torch
        >>> Conv4(out_features=5)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        out_features: int | None = None,
        flat_features: int | None = None,
        channels_last: bool = False,
        precision: str = "float32",
    ) -> None:
        super().__init__()
        _check("Conv4", in_channels, hidden, out_features)
        check_precision("Conv4", precision)
        self.body = _Blocks(in_channels, hidden, pool=True, channels_last=channels_last, precision=precision)
        self.head = nn.Linear(flat_features or hidden, out_features) if out_features else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"Conv4: expected images [batch, channels, height, width], got shape {list(x.shape)}.")
        return self.head(self.body(x))


class MAMLConv(nn.Module):
    """The MAML Omniglot network: 4 x [conv3x3(hidden, stride 2) -> BatchNorm -> ReLU], spatial mean, linear.

    Args:
        readout: ``"mean"`` averages the last feature map over space (the MAML code: ``hidden`` features);
            ``"flatten"`` keeps every position (the Reptile code's Omniglot network: ``hidden x 2 x 2``
            features on 28x28 images), a head with ``image_size``-dependent inputs.
        image_size: height and width of the input images (for the flattened head's size).
        The others as :class:`Conv4`.

    Example:
        >>> import torch
        >>> MAMLConv(out_features=20)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 20])
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        out_features: int | None = 5,
        channels_last: bool = False,
        precision: str = "float32",
        readout: str = "mean",
        image_size: int = 28,
    ) -> None:
        super().__init__()
        _check("MAMLConv", in_channels, hidden, out_features)
        check_precision("MAMLConv", precision)
        if readout not in ("mean", "flatten"):
            raise ValueError(f"MAMLConv: expected readout to be 'mean' or 'flatten', got {readout!r}.")
        side = check_int("MAMLConv", "image_size", image_size)
        for _ in range(4):  # each stride-2 block: ceil(side / 2)
            side = (side - 1) // 2 + 1
        self.body = _Blocks(
            in_channels, hidden, pool=False, channels_last=channels_last, precision=precision, readout=readout
        )
        features = hidden * side * side if readout == "flatten" else hidden
        self.head = nn.Linear(features, out_features) if out_features else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"MAMLConv: expected images [batch, channels, height, width], got shape {list(x.shape)}.")
        return self.head(self.body(x))
