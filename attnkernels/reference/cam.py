"""CAM: DANet's channel attention module, as the official code computes it."""
from __future__ import annotations

import torch
from torch import nn

from ._base import AttentionModule
from .formulas import accumulate_dtype


class CAM(AttentionModule):
    """Channel attention over the (C x C) Gram matrix.

    ```
    X = x.view(N, C, HW);  E = X X^T                  # (N, C, C), in fp32 for half inputs
    A = softmax(rowmax(E) - E, dim=-1)                # equals softmax(-E)
    y = gamma * (A X).view(N, C, H, W) + x
    ```
    `gamma` has shape (1,) and starts at 0, as in DANet's code.

    Args:
        channels: C, the input's channel count.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.gamma = nn.Parameter(torch.zeros(1))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        xf = x.reshape(n, c, h * w).to(accumulate_dtype(x.dtype))
        energy = torch.bmm(xf, xf.transpose(1, 2))
        attention = torch.softmax(energy.amax(dim=-1, keepdim=True) - energy, dim=-1)
        out = torch.bmm(attention, xf).view(n, c, h, w).to(x.dtype)
        return self.gamma * out + x
