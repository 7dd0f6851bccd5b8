"""MobileNetV2 (Sandler et al. 2018) with an attention module in every inverted-residual
block, on the linear projection's output (before the add where the block has one).

Bridge gets [expansion output (if the block expands), depthwise output], both after
BN + ReLU6. With `attention=None` the parameter count equals torchvision's
(3,504,872 at 1000 classes).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ._blocks import AttentionFactory, apply_attention, build, conv_bn

__all__ = ["InvertedResidual", "mobilenet_v2"]

# (expansion t, output channels c, repeats n, first stride s), Table 2 of the paper.
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _round_channels(value: float, divisor: int = 8) -> int:
    """Nearest multiple of `divisor` (at least `divisor`), bumped up if it lost over 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped when t = 1) -> 3x3 depthwise -> 1x1 linear projection.

    Args:
        in_ch, out_ch: input and output channels.
        stride: stride of the depthwise conv.
        make_attn: the model's attention factory (see `_blocks.attention_factory`).
        expand_ratio: t, the expansion factor of the hidden width.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        make_attn: AttentionFactory,
        *,
        expand_ratio: int,
    ) -> None:
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.expand = conv_bn(in_ch, hidden, 1, act=nn.ReLU6) if expand_ratio != 1 else None
        self.depthwise = conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6)
        self.project = conv_bn(hidden, out_ch, 1)
        self.residual = stride == 1 and in_ch == out_ch
        self.attn = make_attn(out_ch, [hidden] * (1 if self.expand is None else 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        bridges = []
        if self.expand is not None:
            h = self.expand(h)
            bridges.append(h)
        h = self.depthwise(h)
        bridges.append(h)
        out = apply_attention(self.attn, self.project(h), bridges)
        return x + out if self.residual else out


def mobilenet_v2(
    num_classes: int = 1000,
    attention: str | None = None,
    attention_kwargs: dict | None = None,
    *,
    width_mult: float = 1.0,
) -> nn.Module:
    """MobileNetV2: 3x3 stem of 32, the seven inverted-residual stages of the paper,
    1x1 conv to 1280, then dropout 0.2 and Linear.

    Args:
        num_classes: size of the classifier output (>= 1).
        attention: registry name of the module placed in every block, or None.
        attention_kwargs: extra keyword arguments for `attnkernels.reference.create`.
        width_mult: channel multiplier (1.0); widths are rounded to multiples of 8.
    """
    if not width_mult > 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult!r}")
    stem_ch = _round_channels(32 * width_mult)
    last_ch = _round_channels(1280 * max(1.0, width_mult))
    stages = [
        (partial(InvertedResidual, expand_ratio=t), _round_channels(c * width_mult), n, s)
        for t, c, n, s in _SETTINGS
    ]
    stem = [conv_bn(3, stem_ch, 3, 2, act=nn.ReLU6)]
    tail = [conv_bn(stages[-1][1], last_ch, 1, act=nn.ReLU6)]
    return build(num_classes, attention, attention_kwargs, stem, stem_ch, stages,
                 tail, head_ch=last_ch, dropout=0.2)
