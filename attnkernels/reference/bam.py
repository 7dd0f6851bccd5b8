"""BAM: bottleneck attention module (Park et al.), paper form with the sum of the two branches."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import AttentionModule, check_positive_int
from .formulas import mean_hw


class BAMChannelGate(nn.Module):
    """`mc = fc2(relu(bn(fc1(mean_hw(x)))))`: Linear C->rd, BatchNorm1d, ReLU, Linear rd->C."""

    def __init__(self, channels: int, rd: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, rd)
        self.bn = nn.BatchNorm1d(rd)
        self.fc2 = nn.Linear(rd, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.bn(self.fc1(mean_hw(x)))))[:, :, None, None]


class BAMSpatialGate(nn.Module):
    """`ms`: Conv1x1 C->rd, BN, ReLU, 2 x [Conv3x3 dilated, BN, ReLU], Conv1x1 rd->1."""

    def __init__(self, channels: int, rd: int, dilation: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, rd, 1)
        self.reduce_bn = nn.BatchNorm2d(rd)
        self.dilated = nn.ModuleList(
            nn.Conv2d(rd, rd, 3, padding=dilation, dilation=dilation) for _ in range(2)
        )
        self.dilated_bn = nn.ModuleList(nn.BatchNorm2d(rd) for _ in range(2))
        self.final = nn.Conv2d(rd, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.reduce_bn(self.reduce(x)))
        for conv, bn in zip(self.dilated, self.dilated_bn):
            s = F.relu(bn(conv(s)))
        return self.final(s)


class BAM(AttentionModule):
    """Bottleneck attention, the paper's sum form: `y = x * (1 + sigmoid(mc + ms))`.

    `mc` (N, C, 1, 1) from BAMChannelGate and `ms` (N, 1, H, W) from BAMSpatialGate
    broadcast to (N, C, H, W). `rd = C // reduction` must be >= 1.

    Args:
        channels: C, the input's channel count.
        reduction: the squeeze ratio of both branches (16).
        dilation: the spatial branch's dilation (4).
    """

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4) -> None:
        super().__init__(channels)
        check_positive_int(reduction, "reduction", "BAM")
        check_positive_int(dilation, "dilation", "BAM")
        rd = channels // reduction
        if rd < 1:
            raise ValueError(f"BAM: reduction ({reduction}) must not exceed channels ({channels})")
        self.channel = BAMChannelGate(channels, rd)
        self.spatial = BAMSpatialGate(channels, rd, dilation)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + torch.sigmoid(self.channel(x) + self.spatial(x)))
