"""CIFAR ResNeXt-29 8x64d (Xie et al. 2017, section 5.3): a 3x3 conv stem with 64
channels, then three stages of three bottleneck blocks with cardinality 8.

Blocks are `resnet.Bottleneck` with a grouped 3x3 conv: stage outputs 256/512/1024,
grouped widths 512/1024/2048 (8 groups of 64, doubling per stage). Attention and
Bridge placement as in the ImageNet Bottleneck.
"""
from __future__ import annotations

from functools import partial

from torch import nn

from ._blocks import build, conv_bn
from .resnet import Bottleneck

__all__ = ["resnext29_8x64d"]


def resnext29_8x64d(
    num_classes: int = 10, attention: str | None = None, attention_kwargs: dict | None = None
) -> nn.Module:
    """ResNeXt-29 (8x64d) for 32x32 inputs; 34.4M parameters at 10 classes.

    Args:
        num_classes: size of the classifier output (>= 1).
        attention: registry name of the module placed in every block, or None.
        attention_kwargs: extra keyword arguments for `attnkernels.reference.create`.
    """
    cardinality, base_width = 8, 64
    stages = []
    for i in range(3):  # grouped width and output double per stage; later stages stride 2
        block = partial(Bottleneck, width=cardinality * base_width * 2**i, groups=cardinality)
        stages.append((block, 256 * 2**i, 3, 1 if i == 0 else 2))
    stem = [conv_bn(3, 64, 3, act=nn.ReLU)]
    return build(num_classes, attention, attention_kwargs, stem, 64, stages)
