"""CIFAR ResNets of He et al. 2016 (section 4.2): 6n+2 layers, three stages of n basic
blocks at 16/32/64 channels, and option-A shortcuts that add no parameters.

Blocks are `resnet.BasicBlock`: attention after the second BN, before the add; Bridge
gets the first conv stage's output.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ._blocks import Backbone, build, conv_bn
from .resnet import BasicBlock

__all__ = ["resnet20", "resnet32", "resnet56", "resnet110"]


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by `stride`, then zero-pad channels on both sides."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.before = extra_channels // 2
        self.after = extra_channels - self.before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.before, self.after))


def option_a(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    """The parameter-free shortcut where the shape changes, else None (identity)."""
    if stride == 1 and in_ch == out_ch:
        return None
    return PadShortcut(stride, out_ch - in_ch)


def _cifar_resnet(
    n: int, num_classes: int, attention: str | None, attention_kwargs: dict | None
) -> Backbone:
    block = partial(BasicBlock, shortcut=option_a)
    stages = [(block, 16, n, 1), (block, 32, n, 2), (block, 64, n, 2)]
    stem = [conv_bn(3, 16, 3, act=nn.ReLU)]
    return build(num_classes, attention, attention_kwargs, stem, 16, stages)


def resnet20(
    num_classes: int = 10, attention: str | None = None, attention_kwargs: dict | None = None
) -> nn.Module:
    """CIFAR ResNet-20 (n=3, 0.27M parameters at 10 classes).

    Args:
        num_classes: size of the classifier output (>= 1).
        attention: registry name of the module placed in every block, or None.
        attention_kwargs: extra keyword arguments for `attnkernels.reference.create`.
    """
    return _cifar_resnet(3, num_classes, attention, attention_kwargs)


def resnet32(
    num_classes: int = 10, attention: str | None = None, attention_kwargs: dict | None = None
) -> nn.Module:
    """CIFAR ResNet-32 (n=5, 0.46M parameters); arguments as `resnet20`."""
    return _cifar_resnet(5, num_classes, attention, attention_kwargs)


def resnet56(
    num_classes: int = 10, attention: str | None = None, attention_kwargs: dict | None = None
) -> nn.Module:
    """CIFAR ResNet-56 (n=9, 0.85M parameters); arguments as `resnet20`."""
    return _cifar_resnet(9, num_classes, attention, attention_kwargs)


def resnet110(
    num_classes: int = 10, attention: str | None = None, attention_kwargs: dict | None = None
) -> nn.Module:
    """CIFAR ResNet-110 (n=18, 1.7M parameters); arguments as `resnet20`."""
    return _cifar_resnet(18, num_classes, attention, attention_kwargs)
