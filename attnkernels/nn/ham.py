"""Fused HAM: channel_gate ops for the channel half, ham_spatial ops for the spatial half."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import functional as AF
from ..ops import ham_spatial
from ..ops._common import fold_batch_norm
from ..reference import ham as reference
from ..reference.formulas import accumulate_dtype
from ._fused import (
    FusedModule, autograd_may_record, cached_while_unchanged, chosen_in_training, module_tensors, pick_inference,
    without_autocast,
)


class HAM(FusedModule, reference.HAM):
    """`attnkernels.reference.HAM` on the fused ops (same arguments and weights).

    With autograd (training), three passes over x: channel pooling (channel_pool), the top-k
    channel separation with the dual spatial pooling (ham_spatial_pool), and the apply
    (ham_spatial_apply). Between
    them only (N, C) and (N, <=2, H, W) maps exist: the 1-D conv + sigmoid gate
    (channel_gate), and the shared 7x7 conv (ham_spatial_conv) + the reference module's BN,
    ReLU and sigmoid, BN called on group 1 then group 2 exactly as the reference calls it
    (batch statistics and running stats included; a SyncBatchNorm there syncs them across
    processes as it does in the reference). Backward saves x and those small maps only.
    Inference on the CPU backend can run all of it per sample in one op (`runs_per_sample`):
    there `attnkernels.choose` measures that op, the three passes and the reference's eager
    forward the first time a shape is seen (static rule: the per-sample op).
    """

    @without_autocast
    @chosen_in_training
    def attend(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_per_sample(x):
            runs = {"per_sample": self.attend_per_sample, "passes": self.attend_passes, "eager": super().attend}
            params = (self.conv.weight.numel(), tuple(self.spatial_conv.weight.shape))
            return pick_inference("ham_attention", x, params, runs, "per_sample")(x)
        return self.attend_passes(x)

    def attend_passes(self, x: torch.Tensor) -> torch.Tensor:
        """The three differentiable passes (training, and inference where they win)."""
        avg, max_ = AF.channel_pool(x)
        ac = AF.channel_gate(avg, max_, self.conv.weight, self.alpha, self.beta, mode="mix")
        d1, d2, mask = AF.ham_spatial_pool(x, ac, self.c_im)
        s1, s2 = self.spatial_gates(d1, d2)
        acc = accumulate_dtype(x.dtype)
        return AF.ham_spatial_apply(x, ac, mask, s1.to(acc), s2.to(acc))

    def runs_per_sample(self, x: torch.Tensor) -> bool:
        """Inference on the C++ CPU backend (eval mode, no autograd, not inside torch.jit.trace,
        BN with running stats): the whole forward runs one sample at a time in one op
        (ham_attention), so x crosses memory once. Training and everything else run the three
        differentiable passes."""
        return (
            not self.training
            and not autograd_may_record()
            and self.bn.running_mean is not None
            and ham_spatial.has_ham_attention(x.device)
        )

    def attend_per_sample(self, x: torch.Tensor) -> torch.Tensor:
        """The inference forward in one op, with BN folded: `bn(z) = z * scale + shift`, the
        fold kept while BN's parameters and stats are unchanged (`cached_while_unchanged`)."""
        bn, acc = self.bn, accumulate_dtype(x.dtype)

        def fold() -> tuple[torch.Tensor, torch.Tensor]:
            return fold_batch_norm(bn.running_mean.to(acc), bn.running_var.to(acc), bn.weight, bn.bias, bn.eps)[:2]

        # eps is a plain attribute: no version counter
        scale, shift = cached_while_unchanged(self, "_folded_bn", (acc, bn.eps), module_tensors([bn]), fold)
        return ham_spatial.ham_attention(
            x, self.conv.weight, self.alpha, self.beta, self.c_im, self.spatial_conv.weight, scale, shift
        )

    def spatial_gates(self, d1: torch.Tensor, d2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`S1, S2 = sigmoid(relu(bn(spatial_conv(d))))` for both groups: one conv call over
        the stacked maps, then BN on group 1 and on group 2 in turn, as the reference calls it."""
        n = d1.shape[0]
        z = AF.ham_spatial_conv(torch.cat([d1, d2]), self.spatial_conv.weight).to(self.bn.weight.dtype)
        return torch.sigmoid(F.relu(self.bn(z[:n]))), torch.sigmoid(F.relu(self.bn(z[n:])))
