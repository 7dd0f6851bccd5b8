"""Bridge: bridge attention (BA-Net), the seed "Enhanced channel-wise attention"."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._base import AttentionModule, check_feature_map, check_positive_int, memory_format_of
from .formulas import mean_hw


class Bridge(AttentionModule):
    """Channel attention from the pooled maps of a block's earlier layers and its output.

    `rd = max(C // reduction, 1)`; for each input t in `[*bridges, x]`:
    `u += bn_i(proj_i(mean_hw(t)))` (proj_i Linear(C_i, rd, no bias), bn_i BatchNorm1d(rd));
    `a = sigmoid(fc(relu(u)))` (fc Linear(rd, C, no bias)); `y = x * a`.
    `forward(x, *bridges)` takes one bridge per entry of `bridge_channels`, in order;
    a bridge may have its own spatial size (it is mean-pooled).

    Args:
        channels: C, the channel count of x.
        bridge_channels: C_i of each bridge map, in the order forward receives them.
        reduction: the squeeze ratio (16).
    """

    takes_bridges = True

    def __init__(self, channels: int, bridge_channels: Sequence[int] = (), reduction: int = 16) -> None:
        super().__init__(channels)
        check_positive_int(reduction, "reduction", "Bridge")
        if isinstance(bridge_channels, int) or not isinstance(bridge_channels, Sequence):
            raise TypeError(f"Bridge: bridge_channels must be a sequence of ints, got {bridge_channels!r}")
        for i, c in enumerate(bridge_channels):
            check_positive_int(c, f"bridge_channels[{i}]", "Bridge")
        self.bridge_channels = list(bridge_channels)
        rd = max(channels // reduction, 1)
        inputs = [*self.bridge_channels, channels]
        self.proj = nn.ModuleList(nn.Linear(c, rd, bias=False) for c in inputs)
        self.bn = nn.ModuleList(nn.BatchNorm1d(rd) for _ in inputs)
        self.fc = nn.Linear(rd, channels, bias=False)

    def forward(self, x: torch.Tensor, *bridges: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        self.check_bridges(x, bridges)
        return self.attend(x, *bridges).contiguous(memory_format=memory_format_of(x))

    def check_bridges(self, x: torch.Tensor, bridges: Sequence[torch.Tensor]) -> None:
        """One bridge per `bridge_channels` entry, each 4-D with its channels, x's batch, dtype, device."""
        if len(bridges) != len(self.bridge_channels):
            raise ValueError(
                f"Bridge: expected {len(self.bridge_channels)} bridge maps "
                f"(bridge_channels={self.bridge_channels}), got {len(bridges)}"
            )
        for i, (t, c) in enumerate(zip(bridges, self.bridge_channels)):
            name = f"bridges[{i}]"
            check_feature_map(t, name, "Bridge", c)
            if t.shape[0] != x.shape[0] or t.dtype != x.dtype or t.device != x.device:
                raise ValueError(
                    f"Bridge: {name} must match x in batch size, dtype and device; got "
                    f"{tuple(t.shape)} {t.dtype} {t.device} vs x {tuple(x.shape)} {x.dtype} {x.device}"
                )

    def attend(self, x: torch.Tensor, *bridges: torch.Tensor) -> torch.Tensor:
        u = 0
        for t, proj, bn in zip([*bridges, x], self.proj, self.bn):
            u = u + bn(proj(mean_hw(t)))
        a = torch.sigmoid(self.fc(F.relu(u)))
        return x * a[:, :, None, None]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, bridge_channels={self.bridge_channels}"
