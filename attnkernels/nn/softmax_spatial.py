"""Fused SoftmaxSpatial: the 1x1 conv, spatial softmax and reweighting in one softmax_spatial op."""
from __future__ import annotations

import torch

from .. import functional as AF
from ..reference import softmax_spatial as reference
from ._fused import FusedModule, autograd_may_record, chosen_in_training, pick_inference, without_autocast


class SoftmaxSpatial(FusedModule, reference.SoftmaxSpatial):
    """`attnkernels.reference.SoftmaxSpatial` on the fused softmax_spatial op (same arguments
    and weights).

    One read of x gives the (N, g, H*W) logits and their softmax, a second (on the CPU per
    sample, while x[n] is in cache) writes `y = x * a * (H*W or 1)`. The logits, the softmax
    and the products stay in the accumulation dtype and round once, into y. Backward saves x
    and the (N, g, H, W) map a only.
    """

    hot_paths = ("softmax_spatial",)

    @without_autocast
    @chosen_in_training
    def attend(self, x: torch.Tensor) -> torch.Tensor:
        if not autograd_may_record():
            # Inference: the fused op or the reference's eager forward, measured.
            runs = {"fused": self.attend_fused, "eager": super().attend}
            return pick_inference("softmax_spatial", x, (self.conv.out_channels, self.rescale), runs, "fused")(x)
        return self.attend_fused(x)

    def attend_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The forward on the softmax_spatial op."""
        conv = self.conv
        weight = conv.weight.reshape(conv.out_channels, conv.in_channels)
        return AF.softmax_spatial(x, weight, conv.bias, self.rescale)
