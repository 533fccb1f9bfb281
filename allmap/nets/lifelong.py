"""The networks of lifelong meta-learning: OML's representation + linear head, and ANML's gated version.

* :class:`OMLConv` (Javed & White 2019): a stack of 3x3 convolutions with ReLU and no normalisation (the
  representation, ``body``), flattened, and one linear layer (the prediction head, ``head``). The OML code
  runs six convolutions of 256 filters on 84x84 images (strides 2,1,2,1,2,2, a 256x3x3 = 2,304-d
  representation); on 28x28 images four convolutions with strides 2,1,2,1 reach the same 3x3 grid.
* :class:`ANMLNet` (Beaulieu et al. 2020): a neuromodulatory network ``nm`` of the same shape whose
  sigmoid output gates the prediction network's representation element by element,
  ``features(x) = rln(x) * sigmoid(nm(x))``, followed by the same linear head.

Both split into ``body`` (everything before the head) and ``head``, so the lifelong learners adapt the head
by name and the continual meta-test computes ``body`` features once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from allmap.checks import check_int

__all__ = ["OMLConv", "ANMLNet", "conv_stack"]

STRIDES = (2, 1, 2, 1)


def _side(owner: str, size: int, strides: tuple[int, ...] = STRIDES) -> int:
    """Side of the feature map after the convolutions, or an error if the images are too small."""
    side = check_int(owner, "image_size", size)
    for s in strides:
        side = (side - 3) // s + 1
    if side < 1:
        raise ValueError(
            f"{owner}: image_size {size} is too small for {len(strides)} 3x3 convolutions; use 19 or more."
        )
    return side


def conv_stack(in_channels: int, hidden: int, strides: tuple[int, ...] = STRIDES) -> nn.Sequential:
    """``[conv3x3(hidden, stride s, no padding) -> ReLU]`` for each ``s`` in ``strides``, then flatten."""
    layers: list[nn.Module] = []
    for i, s in enumerate(strides):
        layers += [nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, stride=s), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten())


def _check_images(owner: str, x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"{owner}: expected images [batch, channels, height, width], got shape {list(x.shape)}.")


class OMLConv(nn.Module):
    """OML's network: ``head(body(x))``, ``body`` four ReLU convolutions (no normalisation), ``head`` linear.

    Args:
        in_channels: 1 for Omniglot.
        hidden: filters per convolution (256 in the OML code at 84x84).
        out_features: outputs of the head (1,000 in the OML code: one per possible class); ``None`` for the
            representation alone (an embedding for metric learners such as ProtoNets).
        image_size: side of the square input images; fixes the size of the representation,
            ``hidden * s * s`` with ``s`` the side after the convolutions (3 for 28x28).

    Example:
        >>> OMLConv(hidden=8, out_features=10)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, in_channels: int = 1, hidden: int = 64, out_features: int | None = 1000, image_size: int = 28
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("hidden", hidden)):
            check_int("OMLConv", name, value)
        if out_features is not None:
            check_int("OMLConv", "out_features", out_features, what="None for the representation alone")
        side = _side("OMLConv", image_size)
        self.features = hidden * side * side
        self.body = conv_stack(in_channels, hidden)
        self.head = nn.Linear(self.features, out_features) if out_features else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        _check_images("OMLConv", x)
        return self.head(self.body(x))


class Gated(nn.Module):
    """``rln(x) * sigmoid(nm(x))``: ANML's neuromodulated representation."""

    def __init__(self, rln: nn.Module, nm: nn.Module) -> None:
        super().__init__()
        self.rln = rln
        self.nm = nm

    def forward(self, x: Tensor) -> Tensor:
        return self.rln(x) * torch.sigmoid(self.nm(x))


class ANMLNet(nn.Module):
    """ANML's network: a prediction network whose representation a neuromodulatory network gates.

    ``body(x) = rln(x) * sigmoid(nm(x))`` with ``rln`` the convolutions of :class:`OMLConv` and ``nm`` a
    second convolution stack (``nm_hidden`` filters) followed by a linear layer to the representation's size;
    ``head`` is linear. Beaulieu et al. use 3 convolutions (256 filters, prediction; 112, modulation) with
    instance normalisation at 28x28; here the two stacks are the four ReLU convolutions of
    :class:`OMLConv`, so that ANML and OML differ only by the modulation.

    Example:
        >>> ANMLNet(hidden=8, nm_hidden=4, out_features=10)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        nm_hidden: int = 32,
        out_features: int = 1000,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("hidden", hidden),
            ("nm_hidden", nm_hidden),
            ("out_features", out_features),
        ):
            check_int("ANMLNet", name, value)
        side = _side("ANMLNet", image_size)
        self.features = hidden * side * side
        nm = nn.Sequential(conv_stack(in_channels, nm_hidden), nn.Linear(nm_hidden * side * side, self.features))
        self.body = Gated(conv_stack(in_channels, hidden), nm)
        self.head = nn.Linear(self.features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        _check_images("ANMLNet", x)
        return self.head(self.body(x))
