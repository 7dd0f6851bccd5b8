"""SoftmaxSpatial: the seed "Attention-based CNNs for image classification": conv, spatial softmax, reweight."""
from __future__ import annotations

import torch
from torch import nn

from ._base import AttentionModule, check_divides, check_positive_int
from .formulas import accumulate_dtype


class SoftmaxSpatial(AttentionModule):
    """Spatial softmax attention.

    `a = softmax over H*W of conv(x)` (N, g, H, W), conv Conv2d(C, g, 1, bias);
    channel c is weighted by map `c // (C/g)`; `y = x * a * (H*W)` when `rescale`
    (the mean weight is 1, so depth does not shrink activations), else `y = x * a`.
    The softmax runs in the accumulation dtype.

    Args:
        channels: C, the input's channel count.
        groups: g, the number of attention maps (1); must divide C.
        rescale: multiply by H*W (True).
    """

    def __init__(self, channels: int, groups: int = 1, rescale: bool = True) -> None:
        super().__init__(channels)
        check_positive_int(groups, "groups", "SoftmaxSpatial")
        check_divides(groups, "groups", channels, "channels", "SoftmaxSpatial")
        self.groups = groups
        self.rescale = bool(rescale)
        self.conv = nn.Conv2d(channels, groups, 1, bias=True)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = self.groups
        logits = self.conv(x).reshape(n, g, h * w).to(accumulate_dtype(x.dtype))
        a = torch.softmax(logits, dim=-1).to(x.dtype).view(n, g, 1, h, w)
        y = (x.reshape(n, g, c // g, h, w) * a).reshape(n, c, h, w)
        return y * (h * w) if self.rescale else y

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}, rescale={self.rescale}"
