"""Fused PAM: the 1x1 projections in one conv, then the nonlocal_attn op (no HW x HW matrix)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import functional as AF
from ..reference import pam as reference
from ._fused import FusedModule


class PAM(FusedModule, reference.PAM):
    """`attnkernels.reference.PAM` on the fused nonlocal_attn op (same arguments and weights).

    The query, key and value 1x1 convs run as one conv over x (one read of x, one GEMM;
    q, k and v are channel slices of its output, which the kernels read in place), then
    `nonlocal_attn` computes `gamma * (v @ softmax(q^T k)^T) + x` flash-style: the
    (H*W x H*W) attention never exists, forward or backward. Backward saves q, k, v, the
    attention output and one log-sum-exp per pixel.
    """

    hot_paths = ("nonlocal_attn",)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.projections(x)
        return AF.nonlocal_attn(q, k, v, x, self.gamma)

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """query(x), key(x), value(x) from one conv with the three weights stacked."""
        convs = (self.query, self.key, self.value)
        weight = torch.cat([c.weight for c in convs])
        bias = torch.cat([c.bias for c in convs])
        qkv = F.conv2d(x, weight, bias)
        d = self.query.out_channels
        return qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
