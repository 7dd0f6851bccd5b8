"""Fused Triplet attention: the triplet ops for the three poolings and the apply."""
from __future__ import annotations

import torch

from .. import functional as AF
from ..reference import triplet as reference
from ..reference.formulas import accumulate_dtype
from ._fused import FusedModule, autograd_may_record, chosen_in_training, pick_inference, without_autocast
from .gam import uses_batch_stats


class Triplet(FusedModule, reference.Triplet):
    """`attnkernels.reference.Triplet` on the fused ops (same arguments and weights).

    Two passes over x, and none of the three gated copies of x is written:
      1. triplet_pool: [max, mean] over C, over H and over W from one read of x, the maps
         (N, 2, H, W), (N, 2, C, W), (N, 2, H, C).
      2. each gate's 7x7 conv (ham_spatial_conv), its BN (momentum 0.01) and the sigmoid in
         torch on its map; triplet_apply(x, s_hw, s_cw, s_hc) = (x*s_hw + x*s_cw + x*s_hc) / 3,
         one read of x and one write of y.
    Each BN runs as the reference runs it (batch statistics and running stats in training).
    Backward saves x and those small maps only.
    """

    hot_paths = ("ham_spatial", "triplet")

    @without_autocast
    @chosen_in_training
    def attend(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.hw, self.cw, self.hc)
        if not (autograd_may_record() or any(uses_batch_stats(branch.bn) for branch in branches)):
            # Inference (every BN on running stats: no state to update): the fused passes or
            # the reference's eager forward, measured.
            runs = {"fused": self.attend_fused, "eager": super().attend}
            return pick_inference("triplet", x, (), runs, "fused")(x)
        return self.attend_fused(x)

    def attend_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The forward on the fused ops (the class docstring's passes)."""
        acc = accumulate_dtype(x.dtype)
        maps = AF.triplet_pool(x)
        gates = [self.gate(branch, d).to(acc) for branch, d in zip((self.hw, self.cw, self.hc), maps)]
        return AF.triplet_apply(x, *gates)

    @staticmethod
    def gate(branch: reference.TripletGate, d: torch.Tensor) -> torch.Tensor:
        """`sigmoid(bn(conv(d)))` of one branch on its pooled map d."""
        z = AF.ham_spatial_conv(d, branch.conv.weight).to(branch.bn.weight.dtype)
        return torch.sigmoid(branch.bn(z))
