"""Fused ECA: channel_pool + channel_gate + channel_rescale, two passes over x."""
from __future__ import annotations

import torch

from .. import functional as AF
from ..reference import eca as reference
from ._fused import FusedModule, chosen_in_training, without_autocast


class ECA(FusedModule, reference.ECA):
    """`attnkernels.reference.ECA` on the fused channel_gate ops (same arguments and weights).

    One pass pools x over H*W, a tiny kernel runs the 1-D conv and sigmoid, one pass
    writes `y = x * gate`. Backward saves x and (N, C) maps only.
    """

    hot_paths = ("channel_gate",)

    @without_autocast
    @chosen_in_training
    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return AF.channel_attention(x, self.conv.weight, mode="avg")
