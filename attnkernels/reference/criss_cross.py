"""CrissCross: CCNet's criss-cross attention (one pass; recurrence=2 gives RCCA)."""
from __future__ import annotations

import torch
from torch import nn

from ._base import AttentionModule, check_positive_int
from .formulas import accumulate_dtype
from .pam import qk_projection


class CrissCross(AttentionModule):
    """Criss-cross attention: each pixel attends to its row and its column.

    q, k: Conv1x1 C -> C/8, v: Conv1x1 C -> C. For pixel (h, w) the energies are
    `q[:, h, w] . k[:, h', w]` over its column and `q[:, h, w] . k[:, h, w']` over its
    row, the pixel itself counted once (its column entry is masked out); no scaling;
    softmax over those H + W - 1 positions; `out` is the same weighting of v;
    `y = gamma * out + x`. With `recurrence=R` the pass is applied R times with shared
    weights (RCCA is R = 2). `gamma` has shape (1,) and starts at 0, as in CCNet's code.

    Args:
        channels: C, the input's channel count (>= 8).
        recurrence: R, the number of passes (1).
    """

    def __init__(self, channels: int, recurrence: int = 1) -> None:
        super().__init__(channels)
        self.recurrence = check_positive_int(recurrence, "recurrence", "CrissCross")
        _, self.query, self.key, self.value = qk_projection(channels, "CrissCross")
        self.gamma = nn.Parameter(torch.zeros(1))

    def criss_cross(self, x: torch.Tensor) -> torch.Tensor:
        """One criss-cross pass, `gamma * out + x`."""
        h = x.shape[2]
        acc = accumulate_dtype(x.dtype)
        q, k, v = (proj(x).to(acc) for proj in (self.query, self.key, self.value))
        energy_col = torch.einsum("ndhw,ndgw->nhwg", q, k)  # g: the other rows of column w
        self_in_col = torch.eye(h, dtype=torch.bool, device=x.device)[None, :, None, :]
        energy_col = energy_col.masked_fill(self_in_col, float("-inf"))
        energy_row = torch.einsum("ndhw,ndhv->nhwv", q, k)  # v: the other columns of row h
        attention = torch.softmax(torch.cat([energy_col, energy_row], dim=-1), dim=-1)
        a_col, a_row = attention.split([h, x.shape[3]], dim=-1)
        out = torch.einsum("nhwg,ncgw->nchw", a_col, v) + torch.einsum("nhwv,nchv->nchw", a_row, v)
        return self.gamma * out.to(x.dtype) + x

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.recurrence):
            x = self.criss_cross(x)
        return x

    def extra_repr(self) -> str:
        return f"channels={self.channels}, recurrence={self.recurrence}"
