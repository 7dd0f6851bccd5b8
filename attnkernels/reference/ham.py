"""HAM: hybrid attention module (Li et al. 2022): adaptive channel gate + channel-separated spatial gates."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import AttentionModule, check_odd_kernel
from .formulas import (
    eca_kernel_size,
    ham_important_channels,
    important_channel_mask,
    max_c,
    max_hw,
    mean_hw,
    sum_c,
)


class HAM(AttentionModule):
    """Hybrid attention module, exactly as docs/contract.md#ham writes it.

    ```
    a, m   = mean_hw(x), max_hw(x)
    f      = 0.5*(a + m) + alpha*a + beta*m
    Ac     = sigmoid(conv1d_over_C(f))
    F1     = x * Ac
    M      = important-channel mask of Ac (C_im top channels, the contract's rank rule; no gradient)
    G1, G2 = F1 * M, F1 * (1 - M)
    d1     = cat[sum_c(G1) / C_im,         max_c(G1)]
    d2     = cat[sum_c(G2) / max(C_sub,1), max_c(G2)]
    S1, S2 = sigmoid(relu(bn(spatial_conv(d1)))), sigmoid(relu(bn(spatial_conv(d2))))
    y      = G1 * S1 + G2 * S2
    ```
    The max over a group includes its zeroed channels. BN is called twice (group 1,
    then group 2): in training each call uses its own batch statistics and updates the
    running stats, like calling one nn.BatchNorm2d twice.

    Args:
        channels: C, the input's channel count.
        kernel_size: the 1-D conv's k; None picks ECA's `eca_kernel_size(C)`.
        separation_rate: lam, the share of important channels (0.6).
        spatial_kernel_size: the shared spatial conv's kernel size (7).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int | None = None,
        separation_rate: float = 0.6,
        spatial_kernel_size: int = 7,
    ) -> None:
        super().__init__(channels)
        k = eca_kernel_size(channels) if kernel_size is None else kernel_size
        check_odd_kernel(k, "kernel_size", "HAM")
        check_odd_kernel(spatial_kernel_size, "spatial_kernel_size", "HAM")
        if not 0.0 < float(separation_rate) < 1.0:
            raise ValueError(f"HAM: separation_rate must be in (0, 1), got {separation_rate}")
        self.kernel_size = k
        self.separation_rate = float(separation_rate)
        self.c_im = ham_important_channels(channels, self.separation_rate)
        self.c_sub = channels - self.c_im
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.beta = nn.Parameter(torch.tensor(0.5))
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)
        pad = (spatial_kernel_size - 1) // 2
        self.spatial_conv = nn.Conv2d(2, 1, spatial_kernel_size, padding=pad, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def channel_attention(self, x: torch.Tensor) -> torch.Tensor:
        """`Ac` (N, C): sigmoid of the 1-D conv over the adaptive mix of mean and max pooling."""
        n, c = x.shape[:2]
        a, m = mean_hw(x), max_hw(x)
        f = 0.5 * (a + m) + self.alpha * a + self.beta * m
        return torch.sigmoid(self.conv(f.view(n, 1, c))).view(n, c)

    def spatial_attention(self, d: torch.Tensor) -> torch.Tensor:
        """`S = sigmoid(relu(bn(spatial_conv(d))))` for one group's (N, 2, H, W) descriptor."""
        return torch.sigmoid(F.relu(self.bn(self.spatial_conv(d))))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        ac = self.channel_attention(x)
        f1 = x * ac[:, :, None, None]
        mask = important_channel_mask(ac.detach(), self.c_im).to(x.dtype)[:, :, None, None]
        g1, g2 = f1 * mask, f1 * (1 - mask)
        d1 = torch.cat([sum_c(g1) / self.c_im, max_c(g1)], dim=1)
        d2 = torch.cat([sum_c(g2) / max(self.c_sub, 1), max_c(g2)], dim=1)
        s1 = self.spatial_attention(d1)
        s2 = self.spatial_attention(d2)
        return g1 * s1 + g2 * s2

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, "
            f"separation_rate={self.separation_rate}, c_im={self.c_im}"
        )
