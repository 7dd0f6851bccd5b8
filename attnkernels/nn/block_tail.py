"""Residual blocks whose tail `relu(attention(bn(z)) + shortcut)` runs as the block_tail ops.

`attnkernels.fuse(model)` turns the blocks of `attnkernels.models` (`resnet.BasicBlock`,
`resnet.Bottleneck`: every ResNet, CIFAR ResNet and ResNeXt there) into these classes when the
block's attention is none, SE or ECA: a channel gate on the mean of bn(z), which the tail
computes from the statistics BatchNorm gathers anyway (`attnkernels.ops.block_tail`). The
fused block holds the same submodules, parameters and buffers (state_dict unchanged) and
updates BatchNorm's running statistics and `num_batches_tracked` as nn.BatchNorm2d does.
Blocks with other attention are left to `fuse`'s module swap, and reported.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import backend as _backend
from ..models import resnet
from ..ops.block_tail import Gate, block_tail
from ..reference import eca as reference_eca
from ..reference import se as reference_se
from .eca import ECA
from .se import SE

__all__ = ["BasicBlock", "Bottleneck", "TAIL_FUSED", "batch_norm_tail", "tail_gate", "why_tail_not_fused"]

# Exactly these classes (a subclass may change the forward): the reference modules and their
# fused versions, whose gates read the same parameters.
_SE_CLASSES = (reference_se.SE, SE)
_ECA_CLASSES = (reference_eca.ECA, ECA)


def why_tail_not_fused(attn: nn.Module | None) -> str | None:
    """Why a block with attention `attn` cannot run its tail fused, or None if it can."""
    if attn is None or type(attn) in _SE_CLASSES or type(attn) in _ECA_CLASSES:
        return None
    return (f"attention {type(attn).__name__}: only blocks with no attention, SE or ECA have a fused tail "
            "so far (their gate reads the mean of bn(z))")


def tail_gate(attn: nn.Module | None) -> Gate | None:
    """The gate of a block's channel attention as a function of the (N, C) mean of bn(z), or
    None for a block without attention. Raises ValueError for attention it cannot express."""
    problem = why_tail_not_fused(attn)
    if problem is not None:
        raise ValueError(f"tail_gate: {problem}")
    if attn is None:
        return None
    if type(attn) in _SE_CLASSES:
        fc1, fc2 = attn.fc1, attn.fc2

        def se_gate(avg: torch.Tensor) -> torch.Tensor:
            # SE's 1x1 convs on an (N, C, 1, 1) map are linear layers on (N, C).
            avg = avg.to(fc1.weight.dtype)
            hidden = F.relu(F.linear(avg, fc1.weight.flatten(1), fc1.bias))
            return torch.sigmoid(F.linear(hidden, fc2.weight.flatten(1), fc2.bias))

        return se_gate
    conv = attn.conv

    def eca_gate(avg: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(conv(avg.to(conv.weight.dtype).unsqueeze(1))).squeeze(1)

    return eca_gate


def batch_norm_tail(z: torch.Tensor, shortcut: torch.Tensor, bn: nn.BatchNorm2d, gate: Gate | None) -> torch.Tensor:
    """`relu(bn(z) * gate(mean of bn(z)) + shortcut)` through `attnkernels.ops.block_tail`,
    with `bn`'s bookkeeping as nn.BatchNorm2d.forward does it (num_batches_tracked, momentum
    None for a cumulative average, batch statistics when it tracks none)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return block_tail(z, shortcut, bn.running_mean if track else None, bn.running_var if track else None,
                      bn.weight, bn.bias, batch_stats, factor, bn.eps, gate)


class _TailFused(nn.Module):
    """What the fused blocks share: the pin and the tail. Subclasses say where z and its BN are."""

    #: The pinned backend of the tail's ops (None: automatic), as `FusedModule.backend`.
    backend: str | None = None
    #: The hot paths the block runs (`fuse` checks a pinned backend on them).
    hot_paths: ClassVar[tuple[str, ...]] = ("block_tail",)

    def tail(self, z: torch.Tensor, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        """`relu(attn(bn(z)) + shortcut(x))`, fused where the shapes and dtypes allow."""
        shortcut = x if self.shortcut is None else self.shortcut(x)
        if shortcut.dtype != z.dtype or shortcut.shape != z.shape or not isinstance(bn, nn.BatchNorm2d):
            # e.g. under autocast (z in bf16, the shortcut in fp32): the unfused tail, as eager.
            return self.relu(self.attn(bn(z)) + shortcut if self.attn is not None else bn(z) + shortcut)
        gate = tail_gate(self.attn)
        if self.backend is None:
            return batch_norm_tail(z, shortcut, bn, gate)
        with _backend.use_backend(self.backend):
            return batch_norm_tail(z, shortcut, bn, gate)

    def extra_repr(self) -> str:
        return "" if self.backend is None else f"backend={self.backend!r}"


class BasicBlock(_TailFused, resnet.BasicBlock):
    """`attnkernels.models.resnet.BasicBlock` with its tail (conv2's BN, attention, add, ReLU) fused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv2
        return self.tail(conv(self.conv1(x)), bn, x)


class Bottleneck(_TailFused, resnet.Bottleneck):
    """`attnkernels.models.resnet.Bottleneck` with its tail (conv3's BN, attention, add, ReLU) fused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv3
        return self.tail(conv(self.conv2(self.conv1(x))), bn, x)


#: Block class -> its tail-fused class (exactly that class: a subclass may change the forward).
TAIL_FUSED: dict[type[nn.Module], type[nn.Module]] = {resnet.BasicBlock: BasicBlock, resnet.Bottleneck: Bottleneck}
