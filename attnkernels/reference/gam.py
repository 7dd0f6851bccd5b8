"""GAM: global attention mechanism (Liu et al. 2021), with the "gc" group-conv + shuffle variant."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import AttentionModule, check_divides, check_odd_kernel, check_positive_int
from .formulas import channel_shuffle


class GAM(AttentionModule):
    """Global attention: a per-pixel channel MLP gate, then a two-conv spatial gate.

    ```
    Mc = sigmoid(fc2(relu(fc1(x_nhwc))))     # Linear(C, rd), Linear(rd, C), at every pixel
    x1 = x * Mc
    s  = relu(bn1(conv1(x1)))                # Conv2d(C, rd, 7, padding 3, groups=g)
    s  = channel_shuffle(s, g) if g > 1
    Ms = sigmoid(bn2(conv2(s)))              # Conv2d(rd, C, 7, padding 3, groups=g)
    y  = x1 * Ms
    ```
    `rd = C // reduction`, rounded down as the published code's `int(C / rate)` (C = 24 at
    reduction 16 gives rd = 1), so C need not be a multiple of the reduction. Valid when rd >= 1
    and g divides both C and rd (conv1 maps C to rd channels in g groups, conv2 back, and the
    shuffle splits rd into g groups); otherwise ValueError.

    Args:
        channels: C, the input's channel count.
        reduction: r (16).
        groups: g of the two spatial convs (1; 4 is the paper's "gc" variant).
        kernel_size: the spatial convs' kernel size (7).
    """

    def __init__(
        self, channels: int, reduction: int = 16, groups: int = 1, kernel_size: int = 7
    ) -> None:
        super().__init__(channels)
        check_positive_int(reduction, "reduction", "GAM")
        check_positive_int(groups, "groups", "GAM")
        check_odd_kernel(kernel_size, "kernel_size", "GAM")
        rd = reduced_channels(channels, reduction, groups)
        self.groups = groups
        pad = (kernel_size - 1) // 2
        self.fc1 = nn.Linear(channels, rd)
        self.fc2 = nn.Linear(rd, channels)
        self.conv1 = nn.Conv2d(channels, rd, kernel_size, padding=pad, groups=groups)
        self.bn1 = nn.BatchNorm2d(rd)
        self.conv2 = nn.Conv2d(rd, channels, kernel_size, padding=pad, groups=groups)
        self.bn2 = nn.BatchNorm2d(channels)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        x_nhwc = x.permute(0, 2, 3, 1)
        mc = torch.sigmoid(self.fc2(F.relu(self.fc1(x_nhwc)))).permute(0, 3, 1, 2)
        x1 = x * mc
        s = F.relu(self.bn1(self.conv1(x1)))
        if self.groups > 1:
            s = channel_shuffle(s, self.groups)
        ms = torch.sigmoid(self.bn2(self.conv2(s)))
        return x1 * ms

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"


def reduced_channels(channels: int, reduction: int, groups: int) -> int:
    """GAM's hidden width rd = channels // reduction (rounded down), checked: rd >= 1, and
    `groups` divides both channels and rd. Raises ValueError naming the rule broken."""
    rd = channels // reduction
    if rd < 1:
        raise ValueError(
            f"GAM: channels // reduction must be >= 1, got {channels} // {reduction} = {rd}; "
            f"use a reduction of at most {channels}"
        )
    check_divides(groups, "groups", channels, "channels", "GAM")
    check_divides(groups, "groups", rd, "channels // reduction", "GAM")
    return rd
