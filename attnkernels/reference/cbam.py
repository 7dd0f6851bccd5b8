"""CBAM: convolutional block attention (Woo et al.), in timm's layout; loads timm's CbamModule weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import AttentionModule, check_odd_kernel, check_positive_int
from .formulas import max_c, max_hw, mean_c, mean_hw


class CBAMChannelGate(nn.Module):
    """`a = sigmoid(fc2(relu(fc1(mean_hw))) + fc2(relu(fc1(max_hw))))`, shared bias-free MLP."""

    def __init__(self, channels: int, rd: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=False)
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.fc2(F.relu(self.fc1(mean_hw(x, keepdim=True))))
        mx = self.fc2(F.relu(self.fc1(max_hw(x, keepdim=True))))
        return torch.sigmoid(avg + mx)


class CBAMSpatialGate(nn.Module):
    """`s = sigmoid(bn(conv(cat[mean_c(x), max_c(x)])))`, conv Conv2d(2, 1, k, no bias), bn BatchNorm2d(1)."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = torch.cat([mean_c(x), max_c(x)], dim=1)
        return torch.sigmoid(self.bn(self.conv(d)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # timm nests conv and bn in a ConvNormAct: spatial.conv.conv.* and spatial.conv.bn.*.
        for key in [k for k in state_dict if k.startswith(prefix + "conv.")]:
            rest = key[len(prefix + "conv."):]
            if rest.startswith(("conv.", "bn.")):
                state_dict[prefix + rest] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CBAM(AttentionModule):
    """Convolutional block attention: channel gate, then spatial gate.

    `rd = max(1, int(C / reduction + 0.5))`; `x1 = x * a` with `a` from CBAMChannelGate;
    `y = x1 * s` with `s = sigmoid(bn(conv7x7(cat[mean_c(x1), max_c(x1)])))`.
    Keys `channel.fc1/fc2`, `spatial.conv`, `spatial.bn`; timm's `spatial.conv.conv` and
    `spatial.conv.bn` keys are renamed on load, so timm's CbamModule state_dict loads strictly.

    Args:
        channels: C, the input's channel count.
        reduction: the MLP's squeeze ratio (16).
        spatial_kernel_size: the spatial conv's kernel size (7).
    """

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel_size: int = 7) -> None:
        super().__init__(channels)
        check_positive_int(reduction, "reduction", "CBAM")
        check_odd_kernel(spatial_kernel_size, "spatial_kernel_size", "CBAM")
        rd = max(1, int(channels / reduction + 0.5))
        self.channel = CBAMChannelGate(channels, rd)
        self.spatial = CBAMSpatialGate(spatial_kernel_size)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        x1 = x * self.channel(x)
        return x1 * self.spatial(x1)
