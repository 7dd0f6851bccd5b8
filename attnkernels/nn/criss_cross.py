"""Fused CrissCross (CCNet; RCCA with recurrence=2): the 1x1 projections in one conv, then the
criss_cross op, once per recurrence."""
from __future__ import annotations

import torch

from .. import functional as AF
from ..reference import criss_cross as reference
from ._fused import FusedModule, autograd_may_record, chosen_in_training, pick_inference, without_autocast
from .pam import qkv_projections


class CrissCross(FusedModule, reference.CrissCross):
    """`attnkernels.reference.CrissCross` on the fused criss_cross op (same arguments and weights).

    Each pass runs the query, key and value 1x1 convs as one conv over x, then `criss_cross`:
    each pixel's softmax over its row and column (H + W - 1 energies) and `gamma * out + x`,
    with no (N, H + W - 1, H, W) energy tensor, forward or backward (a row pass, then a column
    pass that merges its softmax with the row's). Backward saves q, k, v, out and one
    log-sum-exp per pixel per pass. `recurrence=2` (RCCA) is the op twice, shared weights.

    Under torch.autocast the projections run in x's dtype too (`without_autocast`), as in
    the fused PAM. Inference (no autograd) runs the fused path or the reference's eager
    forward, whichever `attnkernels.choose` measures faster for x's shape.
    """

    hot_paths = ("criss_cross",)

    @without_autocast
    @chosen_in_training
    def attend(self, x: torch.Tensor) -> torch.Tensor:
        if not autograd_may_record():
            runs = {"fused": self.attend_fused, "eager": super().attend}
            params = (self.query.out_channels, self.recurrence)
            return pick_inference("criss_cross", x, params, runs, "fused")(x)
        return self.attend_fused(x)

    def attend_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The forward on the fused ops: per pass, one conv for q, k, v, then the criss_cross op."""
        # y's dtype is gamma's and x's promotion, as in the reference (see PAM.attend_fused).
        x = x.to(torch.promote_types(x.dtype, self.gamma.dtype))
        for _ in range(self.recurrence):
            q, k, v = qkv_projections(self, x)
            x = AF.criss_cross(q, k, v, x, self.gamma)
        return x
