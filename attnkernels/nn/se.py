"""Fused SE: pooling, the (tiny) MLP and the rescale in one channel_mlp_attention op."""
from __future__ import annotations

import torch

from .. import functional as AF
from ..reference import se as reference
from ._fused import FusedModule, chosen_in_training, without_autocast


class SE(FusedModule, reference.SE):
    """`attnkernels.reference.SE` on the fused channel_gate ops (same arguments and weights).

    On the C++ backend one op pools each sample, runs the MLP on its (C,) row and rescales
    it while x[n] is still in cache; elsewhere channel_pool, the MLP in torch and
    channel_rescale run in turn. Backward saves x and (N, C) maps only.
    """

    hot_paths = ("channel_gate",)

    @without_autocast
    @chosen_in_training
    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return AF.channel_mlp_attention(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
