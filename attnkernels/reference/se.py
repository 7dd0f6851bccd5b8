"""SE: squeeze-and-excitation (Hu et al.); the channel half of CSM. Same keys as timm's SEModule."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import AttentionModule, check_positive_int
from .formulas import make_divisible, mean_hw


class SE(AttentionModule):
    """Squeeze-and-excitation channel gate.

    `rd = make_divisible(C / reduction, 8)`;
    `y = x * sigmoid(fc2(relu(fc1(mean_hw(x)))))` with fc1 Conv2d(C, rd, 1) and
    fc2 Conv2d(rd, C, 1), both with bias.

    Args:
        channels: C, the input's channel count.
        reduction: the squeeze ratio (16).
        divisor: rd is rounded to a multiple of this (8, as timm).
    """

    def __init__(self, channels: int, reduction: int = 16, divisor: int = 8) -> None:
        super().__init__(channels)
        check_positive_int(reduction, "reduction", "SE")
        check_positive_int(divisor, "divisor", "SE")
        rd = make_divisible(channels / reduction, divisor)
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=True)
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=True)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(mean_hw(x, keepdim=True)))))
        return x * gate
