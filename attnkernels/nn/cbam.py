"""Fused CBAM: channel_gate's pooling for the channel half, cbam_spatial ops for the spatial half."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as AF
from ..reference import cbam as reference
from ..reference.formulas import accumulate_dtype
from ._fused import (
    FusedModule, autograd_may_record, chosen_in_training, eager_attend, pick_inference, without_autocast,
)
from .gam import uses_batch_stats


class CBAM(FusedModule, reference.CBAM):
    """`attnkernels.reference.CBAM` on the fused ops (same arguments and weights).

    Three passes over x, and x1 = x * a is never written:
      1. channel_pool: mean and max over H*W, (N, C) each; the shared MLP in torch on those rows
         gives the channel gate a = sigmoid(mlp(avg) + mlp(max)).
      2. cbam_spatial_pool(x, a): mean and max over C of x * a, (N, 2, H, W); the 7x7 conv
         (ham_spatial_conv), the module's BN and the sigmoid in torch give s (N, 1, H, W).
      3. cbam_spatial_apply(x, a, s): y = x * a * s, one read of x and one write of y.
    BN runs as the reference runs it (batch statistics and running stats in training).
    Backward saves x and those small maps only.

    Made by `attnkernels.fuse` from timm's `CbamModule`, it holds timm's own `channel` and
    `spatial` submodules (state_dict keys `spatial.conv.conv.*`, `spatial.conv.bn.*`), which
    `spatial_conv_bn` reads through.
    """

    hot_paths = ("channel_gate", "cbam_spatial")

    @without_autocast
    @chosen_in_training
    def attend(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.spatial_conv_bn()[1]
        if not (autograd_may_record() or uses_batch_stats(bn)):
            # Inference (BN on running stats: no state to update): the fused passes or the
            # reference's eager forward, measured.
            runs = {"fused": self.attend_fused, "eager": functools.partial(eager_attend(self), self)}
            return pick_inference("cbam", x, (self.channel.fc1.weight.shape[0],), runs, "fused")(x)
        return self.attend_fused(x)

    def attend_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The forward on the fused ops (the class docstring's passes)."""
        avg, max_ = AF.channel_pool(x)
        a = self.channel_gate(avg, max_)
        d = AF.cbam_spatial_pool(x, a)
        conv, bn = self.spatial_conv_bn()
        z = AF.ham_spatial_conv(d, conv.weight).to(bn.weight.dtype)
        s = torch.sigmoid(bn(z))
        return AF.cbam_spatial_apply(x, a, s.to(accumulate_dtype(x.dtype)))

    def channel_gate(self, avg: torch.Tensor, max_: torch.Tensor) -> torch.Tensor:
        """`a = sigmoid(fc2(relu(fc1(avg))) + fc2(relu(fc1(max))))` (N, C) in the pooled maps'
        (accumulation) dtype: both rows through the shared bias-free MLP in one product each."""
        fc1, fc2 = self.channel.fc1, self.channel.fc2
        n, acc = avg.shape[0], avg.dtype
        w1, w2 = fc1.weight.flatten(1).to(acc), fc2.weight.flatten(1).to(acc)
        h = F.relu(F.linear(torch.cat([avg, max_]), w1))
        z = F.linear(h, w2)
        return torch.sigmoid(z[:n] + z[n:])

    def spatial_conv_bn(self) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
        """The spatial gate's conv and BN: `spatial.conv`, `spatial.bn` (the reference's), or
        timm's ConvNormAct `spatial.conv.conv`, `spatial.conv.bn`."""
        conv = self.spatial.conv
        if isinstance(conv, nn.Conv2d):
            return conv, self.spatial.bn
        return conv.conv, conv.bn
