"""Backbones written so ``torch.func.functional_call`` can run them with any parameter dict."""

from allmap.nets.conv import Conv4, MAMLConv
from allmap.nets.lifelong import ANMLNet, OMLConv
from allmap.nets.mlp import MLP
from allmap.nets.norm import BatchStatNorm

__all__ = ["MLP", "Conv4", "MAMLConv", "BatchStatNorm", "OMLConv", "ANMLNet"]
