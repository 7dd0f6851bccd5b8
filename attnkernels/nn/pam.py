"""Fused PAM: the 1x1 projections in one conv, then the nonlocal_attn op (no HW x HW matrix)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as AF
from ..reference import pam as reference
from ._fused import FusedModule, autograd_may_record, chosen_in_training, pick_inference, without_autocast


class PAM(FusedModule, reference.PAM):
    """`attnkernels.reference.PAM` on the fused nonlocal_attn op (same arguments and weights).

    The query, key and value 1x1 convs run as one conv over x (one read of x, one GEMM;
    q, k and v are channel slices of its output, which the kernels read in place), then
    `nonlocal_attn` computes `gamma * (v @ softmax(q^T k)^T) + x` flash-style: the
    (H*W x H*W) attention never exists, forward or backward. Backward saves q, k, v, the
    attention output and one log-sum-exp per pixel.

    Under torch.autocast the projections run in x's dtype too (`without_autocast`): the op
    needs q, k, v in x's dtype, and x is the residual, whose rounding would show in y.

    Inference (no autograd) runs the fused path or the reference's eager forward, whichever
    `attnkernels.choose` measures faster for x's shape: on a CPU both are bound by the same
    two GEMMs' FLOPs (the fused path's gain there is memory and the backward).
    """

    hot_paths = ("nonlocal_attn",)

    @without_autocast
    @chosen_in_training
    def attend(self, x: torch.Tensor) -> torch.Tensor:
        if not autograd_may_record():
            runs = {"fused": self.attend_fused, "eager": super().attend}
            return pick_inference("pam", x, (self.query.out_channels,), runs, "fused")(x)
        return self.attend_fused(x)

    def attend_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The forward on the fused ops: one conv for q, k, v, then the nonlocal_attn op."""
        # y = gamma * out + x has the dtype torch promotes gamma (shape (1,)) and x to, as in the
        # reference: x's own, except for an fp32 module given a half x under autocast, where it
        # is fp32. The op writes y in x's dtype, so x (the full-size residual) is converted then:
        # a half y converted afterwards would carry a rounding the reference's y does not.
        x = x.to(torch.promote_types(x.dtype, self.gamma.dtype))
        q, k, v = qkv_projections(self, x)
        return AF.nonlocal_attn(q, k, v, x, self.gamma)



def qkv_projections(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """module.query(x), .key(x), .value(x) (PAM's and CrissCross's 1x1 convs) from one conv with
    the three weights stacked, in x's dtype: one read of x, one GEMM; q, k and v are channel
    slices of its output, which the kernels read in place.

    The weights are cast to x's dtype, a no-op unless an fp32 module gets a half x under
    autocast: casting the small weights, not x, leaves the full-size input as it is.
    """
    convs = (module.query, module.key, module.value)
    weight = torch.cat([c.weight for c in convs]).to(x.dtype)
    bias = torch.cat([c.bias for c in convs]).to(x.dtype)
    qkv = F.conv2d(x, weight, bias)
    d = module.query.out_channels
    return qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
