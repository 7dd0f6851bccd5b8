"""Fused BAM: the channel branch on channel_pool's mean, the spatial branch's convs with their
BatchNorms folded in eval, and `y = x * (1 + sigmoid(mc + ms))` as one bam_apply pass over x."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as AF
from ..ops._common import fold_batch_norm
from ..ops.bam import bam_ops
from ..reference import bam as reference
from ..reference.formulas import accumulate_dtype
from ._fused import (
    FusedModule, autograd_may_record, cached_while_unchanged, chosen_in_training, module_tensors, pick_inference,
    without_autocast,
)


class BAM(FusedModule, reference.BAM):
    """`attnkernels.reference.BAM` on the fused ops (same arguments and weights).

    Eager BAM writes four x-sized tensors after its branches (`mc + ms` broadcast, its
    sigmoid, `1 + .`, the product) and saves them for backward. Here:
      1. mc: mean_hw(x) from channel_pool (one read of x), then the MLP (Linear, BatchNorm1d,
         ReLU, Linear) in torch on the (N, C) map;
      2. ms: the spatial branch in torch, on the C/16-channel maps after its first 1x1 conv;
      3. bam_apply(x, mc, ms): one read of x and one write of y; backward saves x, mc and ms.
    Training runs every BatchNorm as the reference does (batch statistics, running stats).

    Inference (eval with running stats everywhere, no autograd): each BatchNorm is an affine
    map that folds into the Linear or conv before it, so every conv writes its ReLU'd output
    in place (no BatchNorm pass); the folded weights are kept until a weight or running stat
    changes. Whether this beats the reference's eager forward for x's shape is measured once
    (`pick_inference`).
    """

    hot_paths = ("channel_gate", "bam")

    @without_autocast
    @chosen_in_training
    def attend(self, x: torch.Tensor) -> torch.Tensor:
        if self.folds_batch_norm() and not autograd_may_record():
            runs = {"folded": self.attend_folded, "eager": super().attend}
            return pick_inference("bam", x, (), runs, "folded")(x)
        return AF.bam_apply(x, self.channel_logits(x), self.spatial_logits(x))

    def folds_batch_norm(self) -> bool:
        """Eval with running stats in every BatchNorm: each is then an affine map."""
        return not self.training and all(bn.running_mean is not None for _, bn in self.layers_with_batch_norm())

    def layers_with_batch_norm(self) -> list[tuple[nn.Module, nn.Module]]:
        """(layer, the BatchNorm after it): fc1, the 1x1 reduce conv and the two dilated convs."""
        return [(self.channel.fc1, self.channel.bn), (self.spatial.reduce, self.spatial.reduce_bn),
                *zip(self.spatial.dilated, self.spatial.dilated_bn)]

    def channel_logits(self, x: torch.Tensor) -> torch.Tensor:
        """mc (N, C): the channel branch on mean_hw(x) (channel_pool: one read), in the
        parameters' dtype, as the reference rounds it."""
        c = self.channel
        mean = AF.channel_pool(x)[0].to(c.fc1.weight.dtype)
        return c.fc2(F.relu(c.bn(c.fc1(mean))))

    def spatial_logits(self, x: torch.Tensor) -> torch.Tensor:
        """ms (N, 1, H, W): the spatial branch in x's dtype, each conv's weights cast to it (an
        fp32 module given the bf16 output of an autocast layer, as the reference runs under
        autocast); the BatchNorms as the reference runs them."""
        sp = self.spatial
        s = F.relu(sp.reduce_bn(conv_in_dtype(sp.reduce, x)))
        for conv, bn in zip(sp.dilated, sp.dilated_bn):
            s = F.relu(bn(conv_in_dtype(conv, s)))
        return conv_in_dtype(sp.final, s)

    def attend_folded(self, x: torch.Tensor) -> torch.Tensor:
        """The inference forward: folded Linear and convs, each ReLU in place, then bam_apply on
        the backend directly (the module-level choice already measured it against eager). The
        channel branch runs in acc(x), the convs in x's dtype."""
        (w1, b1), *folded_convs = self.folded_weights(x)
        fc2 = self.channel.fc2
        h = F.relu_(F.linear(AF.channel_pool(x)[0], w1, b1))
        mc = F.linear(h, fc2.weight.to(h.dtype), fc2.bias.to(h.dtype))
        s = x
        for (w, b), conv in zip(folded_convs, (self.spatial.reduce, *self.spatial.dilated)):
            s = F.relu_(conv_in_dtype(conv, s, w, b))
        ms = conv_in_dtype(self.spatial.final, s)
        acc = accumulate_dtype(x.dtype)
        return bam_ops(x.device).bam_apply(x, mc.contiguous(), ms.to(acc).contiguous())

    @property
    def dilation(self) -> int:
        return self.spatial.dilated[0].dilation[0]

    def folded_weights(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(w, b)] of fc1, the 1x1 reduce conv and the two dilated convs with the BatchNorm
        after each folded in: `bn(W z + b) = (scale W) z + (scale b + shift)`, in acc(x);
        rebuilt only when a weight or statistic changes."""
        layers = self.layers_with_batch_norm()
        acc = accumulate_dtype(x.dtype)
        key = (acc, *(bn.eps for _, bn in layers))  # eps is a plain attribute: no version counter
        sources = module_tensors([m for pair in layers for m in pair])
        return cached_while_unchanged(self, "_folded_weights", key, sources,
                                      lambda: [folded(layer, bn, acc) for layer, bn in layers])


def folded(layer: nn.Module, bn: nn.Module, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) in `acc` of `bn(layer(z))` for a Linear or conv `layer` and an eval
    BatchNorm `bn`."""
    scale, shift, _ = fold_batch_norm(bn.running_mean.to(acc), bn.running_var.to(acc), bn.weight, bn.bias, bn.eps)
    w = layer.weight.to(acc) * scale.reshape(-1, *[1] * (layer.weight.dim() - 1))
    b = shift if layer.bias is None else layer.bias.to(acc) * scale + shift
    return w, b


def conv_in_dtype(conv: nn.Conv2d, t: torch.Tensor, weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """`conv` (or its geometry with the given weight and bias) on t, the weights cast to t's
    dtype."""
    weight = conv.weight if weight is None else weight
    bias = conv.bias if bias is None else bias
    return F.conv2d(t, weight.to(t.dtype), None if bias is None else bias.to(t.dtype), conv.stride, conv.padding,
                    conv.dilation)
