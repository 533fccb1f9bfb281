"""Backbones written so ``torch.func.functional_call`` can run them with any parameter dict."""

from allmap.nets.mlp import MLP

__all__ = ["MLP"]
