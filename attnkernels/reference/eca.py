"""ECA: efficient channel attention (Wang et al.). Same keys as timm's EcaModule."""
from __future__ import annotations

import torch
from torch import nn

from ._base import AttentionModule, check_odd_kernel
from .formulas import eca_kernel_size, mean_hw


class ECA(AttentionModule):
    """Efficient channel attention: a 1-D conv across channels of the pooled map.

    `y = x * sigmoid(conv1d_over_C(mean_hw(x)))`, zero padding at the channel ends;
    conv is Conv1d(1, 1, k, padding (k-1)//2, no bias).

    Args:
        channels: C, the input's channel count.
        kernel_size: k; None picks `eca_kernel_size(C, gamma, beta)`.
        gamma, beta: the adaptive kernel-size mapping's constants (2 and 1).
    """

    def __init__(
        self, channels: int, kernel_size: int | None = None, gamma: float = 2, beta: float = 1
    ) -> None:
        super().__init__(channels)
        k = eca_kernel_size(channels, gamma, beta) if kernel_size is None else kernel_size
        self.kernel_size = check_odd_kernel(k, "kernel_size", "ECA")
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        gate = torch.sigmoid(self.conv(mean_hw(x).view(n, 1, c)))
        return x * gate.view(n, c, 1, 1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"
