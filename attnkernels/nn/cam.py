"""Fused CAM: DANet's channel attention as one cam op (two matmuls and a row softmax)."""
from __future__ import annotations

import torch

from .. import functional as AF
from ..reference import cam as reference
from ._fused import FusedModule, autograd_may_record, chosen_in_training, pick_inference, without_autocast


class CAM(FusedModule, reference.CAM):
    """`attnkernels.reference.CAM` on the fused cam op (same arguments and weights).

    `cam` computes the C x C energies X X^T in the accumulation dtype, their row softmax
    `softmax(-E)` with weights below the smallest normal number flushed to 0 (DANet's
    softmax leaves most weights subnormal, and a CPU matmul on subnormals runs ten times
    slower), and `gamma * (attn X) + x` with the epilogue in the second matmul. Backward saves
    x and the (N, C, C) attention only (eager saves the energies twice besides).

    Inference (no autograd) runs the fused op or the reference's eager forward, whichever
    `attnkernels.choose` measures faster for x's shape.
    """

    hot_paths = ("cam",)

    @without_autocast
    @chosen_in_training
    def attend(self, x: torch.Tensor) -> torch.Tensor:
        if not autograd_may_record():
            runs = {"fused": self.attend_fused, "eager": super().attend}
            return pick_inference("cam", x, (), runs, "fused")(x)
        return self.attend_fused(x)

    def attend_fused(self, x: torch.Tensor) -> torch.Tensor:
        # y = gamma * out + x has the dtype torch promotes gamma and x to, as in the reference
        # (x's own outside autocast); the op writes y in x's dtype, so x is converted first.
        return AF.cam(x.to(torch.promote_types(x.dtype, self.gamma.dtype)), self.gamma)
