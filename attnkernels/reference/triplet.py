"""Triplet attention (Misra et al.), in the official landskape-ai form."""
from __future__ import annotations

import torch
from torch import nn

from ._base import AttentionModule, check_odd_kernel
from .formulas import max_c, mean_c


class TripletGate(nn.Module):
    """One branch: `t * sigmoid(bn(conv(cat[max_c(t), mean_c(t)])))`, BN momentum 0.01."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, momentum=0.01)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        z = torch.cat([max_c(t), mean_c(t)], dim=1)
        return t * torch.sigmoid(self.bn(self.conv(z)))


class Triplet(AttentionModule):
    """Triplet attention: three gates over the three axis pairs, averaged.

    `cw` runs on `x.permute(0, 2, 1, 3)` (pooling over H), `hc` on `x.permute(0, 3, 2, 1)`
    (pooling over W), `hw` on x (pooling over C); each result is permuted back and
    `y = (hw + cw + hc) / 3`.

    Args:
        channels: C, the input's channel count.
        kernel_size: each gate's conv kernel size (7).
    """

    def __init__(self, channels: int, kernel_size: int = 7) -> None:
        super().__init__(channels)
        check_odd_kernel(kernel_size, "kernel_size", "Triplet")
        self.cw = TripletGate(kernel_size)
        self.hc = TripletGate(kernel_size)
        self.hw = TripletGate(kernel_size)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        y_cw = self.cw(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
        y_hc = self.hc(x.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)
        y_hw = self.hw(x)
        return (y_hw + y_cw + y_hc) / 3
