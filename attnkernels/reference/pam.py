"""PAM: DANet's position attention module; the spatial half of CSM."""
from __future__ import annotations

import torch
from torch import nn

from ._base import AttentionModule
from .formulas import accumulate_dtype


def qk_projection(channels: int, owner: str) -> tuple[int, nn.Conv2d, nn.Conv2d, nn.Conv2d]:
    """The query/key (C -> C//8) and value (C -> C) 1x1 projections of PAM and CrissCross."""
    d = channels // 8
    if d < 1:
        raise ValueError(f"{owner}: channels must be >= 8 (query/key width is channels // 8), got {channels}")
    return d, nn.Conv2d(channels, d, 1), nn.Conv2d(channels, d, 1), nn.Conv2d(channels, channels, 1)


class PAM(AttentionModule):
    """Position attention: every pixel attends to every pixel.

    ```
    q, k, v = query(x), key(x), value(x)   viewed as (N, D, HW); D = C//8 for q, k and C for v
    E = q^T k                              # (N, HW, HW), no 1/sqrt(D) scaling
    A = softmax(E, dim=-1)                 # over keys
    y = gamma * (v @ A^T).view(N, C, H, W) + x
    ```
    The energies and softmax run in the accumulation dtype (fp32 for half inputs).
    This reference materialises the (HW x HW) matrix; the fused kernel does not.
    `gamma` has shape (1,) and starts at 0, as in DANet's code.

    Args:
        channels: C, the input's channel count (>= 8).
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        _, self.query, self.key, self.value = qk_projection(channels, "PAM")
        self.gamma = nn.Parameter(torch.zeros(1))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        acc = accumulate_dtype(x.dtype)
        q = self.query(x).reshape(n, -1, h * w).to(acc)
        k = self.key(x).reshape(n, -1, h * w).to(acc)
        v = self.value(x).reshape(n, c, h * w).to(acc)
        attention = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)
        out = torch.bmm(v, attention.transpose(1, 2)).view(n, c, h, w).to(x.dtype)
        return self.gamma * out + x
