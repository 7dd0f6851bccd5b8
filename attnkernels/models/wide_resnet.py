"""Wide ResNet WRN-16-8 (Zagoruyko & Komodakis 2016): pre-activation basic blocks,
widths 128/256/512, two blocks per stage, 1x1 conv shortcut where the shape changes.

Attention sits on the second conv's output, before the add. Bridge gets the tensor fed
to the second conv (first conv -> BN -> ReLU): in pre-activation order that is the
first conv stage's finished output, the analogue of BasicBlock's bridge.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ._blocks import AttentionFactory, apply_attention, build, conv_bn

__all__ = ["PreActBlock", "wide_resnet16_8"]


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; where the shape changes the 1x1 shortcut conv reads the
    pre-activated input (as the WRN reference code does).

    Args:
        in_ch, out_ch: input and output channels.
        stride: stride of the first conv.
        make_attn: the model's attention factory (see `_blocks.attention_factory`).
        dropout: dropout probability between the convs (0 disables it).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        make_attn: AttentionFactory,
        *,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.preact = _bn_relu(in_ch)
        self.conv1 = conv_bn(in_ch, out_ch, 3, stride, act=nn.ReLU)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        reshapes = stride != 1 or in_ch != out_ch
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False) if reshapes else None
        self.attn = make_attn(out_ch, [out_ch])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.preact(x)
        b1 = self.conv1(a)
        out = apply_attention(self.attn, self.conv2(self.dropout(b1)), (b1,))
        return out + (x if self.shortcut is None else self.shortcut(a))


def wide_resnet16_8(
    num_classes: int = 10,
    attention: str | None = None,
    attention_kwargs: dict | None = None,
    *,
    dropout: float = 0.0,
) -> nn.Module:
    """WRN-16-8 for 32x32 inputs; 10,961,370 parameters at 10 classes.

    Args:
        num_classes: size of the classifier output (>= 1).
        attention: registry name of the module placed in every block, or None.
        attention_kwargs: extra keyword arguments for `attnkernels.reference.create`.
        dropout: dropout probability inside each block (0, the default, disables it).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    block = partial(PreActBlock, dropout=dropout)
    stages = [(block, 128, 2, 1), (block, 256, 2, 2), (block, 512, 2, 2)]
    stem = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)]  # no BN-ReLU: the first block pre-activates
    # Pre-activation nets end with a final BN-ReLU before pooling.
    return build(num_classes, attention, attention_kwargs, stem, 16, stages, tail=[_bn_relu(512)])
