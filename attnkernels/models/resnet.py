"""ImageNet ResNets (He et al. 2016) in torchvision's v1.5 layout, with an attention module
in every block.

The 3x3 conv carries the stride (v1.5). The attention module sits on the block's output,
after the last BN and before the residual add; Bridge receives the outputs of the
block's earlier conv stages (after BN + ReLU). With `attention=None` the parameter
counts equal torchvision's.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from torch import nn

from ._blocks import AttentionFactory, Backbone, apply_attention, build, conv_bn

__all__ = ["BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50", "resnet101"]


#: `shortcut(in_ch, out_ch, stride)` -> the module on the skip path, None for identity.
ShortcutFn = Callable[[int, int, int], Optional[nn.Module]]


def projection(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    """1x1 conv + BN shortcut where the shape changes, else None (identity)."""
    if stride == 1 and in_ch == out_ch:
        return None
    return conv_bn(in_ch, out_ch, 1, stride)


class _Residual(nn.Module):
    """Shared tail of the post-activation blocks: `relu(branch + shortcut(x))`."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, shortcut: ShortcutFn) -> None:
        super().__init__()
        self.shortcut = shortcut(in_ch, out_ch, stride)
        self.relu = nn.ReLU(inplace=True)

    def add(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Add the (projected) input to the branch output and apply ReLU."""
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class BasicBlock(_Residual):
    """Two 3x3 conv-BN stages; attention on the second's output; Bridge gets [conv1 output].

    Args:
        in_ch, out_ch: input and output channels.
        stride: stride of the first conv.
        make_attn: the model's attention factory (see `_blocks.attention_factory`).
        shortcut: builds the skip path's module (default: `projection`).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        make_attn: AttentionFactory,
        *,
        shortcut: ShortcutFn = projection,
    ) -> None:
        super().__init__(in_ch, out_ch, stride, shortcut)
        self.conv1 = conv_bn(in_ch, out_ch, 3, stride, act=nn.ReLU)
        self.conv2 = conv_bn(out_ch, out_ch, 3)
        self.attn = make_attn(out_ch, [out_ch])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.conv1(x)
        out = apply_attention(self.attn, self.conv2(b1), (b1,))
        return self.add(x, out)


class Bottleneck(_Residual):
    """1x1 -> 3x3 (stride, groups) -> 1x1 conv-BN stages; attention on the last one's output;
    Bridge gets [conv1 output, conv2 output] (both `width` channels).

    Args:
        in_ch, out_ch: input and output channels.
        stride: stride of the 3x3 conv.
        make_attn: the model's attention factory.
        width: channels of the inner (3x3) conv.
        groups: groups of the 3x3 conv (ResNeXt's cardinality).
        shortcut: builds the skip path's module (default: `projection`).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        make_attn: AttentionFactory,
        *,
        width: int,
        groups: int = 1,
        shortcut: ShortcutFn = projection,
    ) -> None:
        super().__init__(in_ch, out_ch, stride, shortcut)
        self.conv1 = conv_bn(in_ch, width, 1, act=nn.ReLU)
        self.conv2 = conv_bn(width, width, 3, stride, groups, act=nn.ReLU)
        self.conv3 = conv_bn(width, out_ch, 1)
        self.attn = make_attn(out_ch, [width, width])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.conv1(x)
        b2 = self.conv2(b1)
        out = apply_attention(self.attn, self.conv3(b2), (b1, b2))
        return self.add(x, out)


def _resnet(
    bottleneck: bool,
    counts: tuple[int, int, int, int],
    num_classes: int,
    attention: str | None,
    attention_kwargs: dict | None,
) -> Backbone:
    stages = []
    for i, count in enumerate(counts):
        width = 64 * 2**i  # Bottleneck expands its 3x3 width by 4 at the output
        block = partial(Bottleneck, width=width) if bottleneck else BasicBlock
        stages.append((block, width * (4 if bottleneck else 1), count, 1 if i == 0 else 2))
    stem = [conv_bn(3, 64, 7, 2, act=nn.ReLU), nn.MaxPool2d(3, 2, 1)]
    return build(num_classes, attention, attention_kwargs, stem, 64, stages)


def resnet18(
    num_classes: int = 1000, attention: str | None = None, attention_kwargs: dict | None = None
) -> nn.Module:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]); 11,689,512 parameters at 1000 classes.

    Args:
        num_classes: size of the classifier output (>= 1).
        attention: registry name of the module placed in every block, or None.
        attention_kwargs: extra keyword arguments for `attnkernels.reference.create`.
    """
    return _resnet(False, (2, 2, 2, 2), num_classes, attention, attention_kwargs)


def resnet34(
    num_classes: int = 1000, attention: str | None = None, attention_kwargs: dict | None = None
) -> nn.Module:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]); arguments as `resnet18`."""
    return _resnet(False, (3, 4, 6, 3), num_classes, attention, attention_kwargs)


def resnet50(
    num_classes: int = 1000, attention: str | None = None, attention_kwargs: dict | None = None
) -> nn.Module:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]); 25,557,032 parameters at 1000 classes;
    arguments as `resnet18`."""
    return _resnet(True, (3, 4, 6, 3), num_classes, attention, attention_kwargs)


def resnet101(
    num_classes: int = 1000, attention: str | None = None, attention_kwargs: dict | None = None
) -> nn.Module:
    """ResNet-101 (Bottleneck, [3, 4, 23, 3]); arguments as `resnet18`."""
    return _resnet(True, (3, 4, 23, 3), num_classes, attention, attention_kwargs)
