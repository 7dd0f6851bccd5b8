"""Residual blocks whose tail `relu(attention(bn(z)) + shortcut)` runs as fused ops.

`attnkernels.fuse(model)` turns the blocks of `attnkernels.models` (`resnet.BasicBlock`,
`resnet.Bottleneck`: every ResNet, CIFAR ResNet and ResNeXt there) and of timm's ResNet family
(`timm.models.resnet.BasicBlock` and `Bottleneck`: resnet*, seresnet*, ecaresnet*, resnext*, ...)
into these classes when the block's attention is one whose gates read pooled statistics of
bn(z), which the tail computes from the statistics BatchNorm gathers anyway:
* none, SE or ECA (a channel gate on the mean of bn(z)): the block_tail ops
  (`attnkernels.ops.block_tail`);
* CBAM or HAM (a channel gate on the mean and max of bn(z), then spatial gates on the channel
  mean and max of the gated map): the spatial_tail ops (`attnkernels.ops.spatial_tail`).
The fused block holds the same submodules, parameters and buffers (state_dict unchanged) and
updates BatchNorm's running statistics and `num_batches_tracked` as nn.BatchNorm2d does.
Blocks with other attention are left to `fuse`'s module swap, and reported.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import backend as _backend
from ..models import resnet
from .. import functional as AF
from ..ops.block_tail import Gate, block_tail
from ..ops.spatial_tail import ChannelGate, SpatialGate, spatial_tail
from ..reference import cbam as reference_cbam
from ..reference import eca as reference_eca
from ..reference import ham as reference_ham
from ..reference import se as reference_se
from ..reference._base import memory_format_of
from ._fused import autograd_may_record, parameter_shapes, pick_on_copy
from .cbam import CBAM
from .eca import ECA
from .ham import HAM
from .se import SE

__all__ = ["BasicBlock", "Bottleneck", "TAIL_FUSED", "attention_tail", "batch_norm_tail", "fused_tail",
           "spatial_tail_gates", "tail_gate", "timm_tail_class", "unfused_tail", "why_tail_not_fused",
           "why_timm_tail_not_fused"]

# Exactly these classes (a subclass may change the forward): the reference modules and their
# fused versions, whose gates read the same parameters.
_SE_CLASSES = (reference_se.SE, SE)
_ECA_CLASSES = (reference_eca.ECA, ECA)
_CBAM_CLASSES = (reference_cbam.CBAM, CBAM)
_HAM_CLASSES = (reference_ham.HAM, HAM)
#: The attention whose tail the block_tail ops run (a channel gate on the mean of bn(z)), and
#: the attention whose tail the spatial_tail ops run (then spatial gates).
_CHANNEL_GATED = _SE_CLASSES + _ECA_CLASSES
_SPATIALLY_GATED = _CBAM_CLASSES + _HAM_CLASSES


def why_tail_not_fused(block: nn.Module) -> str | None:
    """Why a block of attnkernels.models cannot run its tail fused, or None if it can: its last
    norm must be exactly nn.BatchNorm2d, its attention none, SE, ECA, CBAM or HAM."""
    bn = (block.conv3 if hasattr(block, "conv3") else block.conv2)[1]
    if type(bn) is not nn.BatchNorm2d:
        return f"its last norm is {type(bn).__name__}, not nn.BatchNorm2d"
    return _why_attention_not(block.attn)


def _why_attention_not(attn: nn.Module | None) -> str | None:
    if attn is None or type(attn) in _CHANNEL_GATED or type(attn) in _SPATIALLY_GATED:
        return None
    return (f"attention {type(attn).__name__}: only blocks with no attention, SE, ECA, CBAM or HAM have a "
            "fused tail so far (their gates read pooled statistics of bn(z))")


def tail_gate(attn: nn.Module | None) -> Gate | None:
    """The gate of a block's channel attention (SE, ECA) as a function of the (N, C) mean of
    bn(z), or None for a block without attention. Raises ValueError for other attention."""
    if attn is not None and type(attn) not in _CHANNEL_GATED:
        raise ValueError(f"tail_gate: attention {type(attn).__name__}: only SE and ECA gate channels on the "
                         "mean of bn(z) alone (CBAM and HAM: spatial_tail_gates)")
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


def spatial_tail_gates(attn: nn.Module) -> tuple[ChannelGate, SpatialGate, int | None]:
    """CBAM's or HAM's gates as `spatial_tail` takes them: `(channel_gate, spatial_gate,
    important)`. The channel gate of the (N, C) mean and max of bn(z); the spatial gate of the
    per-group channel mean and max of the gated map; HAM's important-channel count (None for
    CBAM's one group). They read the module's own parameters, as its fused forward does."""
    if type(attn) in _CBAM_CLASSES:
        conv, bn = CBAM.spatial_conv_bn(attn)

        def cbam_spatial_gate(d: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(bn(AF.ham_spatial_conv(d, conv.weight).to(bn.weight.dtype)))

        return functools.partial(CBAM.channel_gate, attn), cbam_spatial_gate, None
    if type(attn) in _HAM_CLASSES:

        def ham_channel_gate(avg: torch.Tensor, max_: torch.Tensor) -> torch.Tensor:
            return AF.channel_gate(avg, max_, attn.conv.weight, attn.alpha, attn.beta, mode="mix")

        def ham_spatial_gate(d: torch.Tensor) -> torch.Tensor:
            return torch.cat(HAM.spatial_gates(attn, d[:, :2], d[:, 2:]), 1)

        return ham_channel_gate, ham_spatial_gate, attn.c_im
    raise ValueError(f"spatial_tail_gates: attention {type(attn).__name__}: only CBAM and HAM gate channels, "
                     "then pixels")


def _batch_norm_arguments(bn: nn.BatchNorm2d) -> tuple:
    """F.batch_norm's arguments for `bn` now, with nn.BatchNorm2d.forward's bookkeeping done
    (num_batches_tracked, momentum None for a cumulative average, batch statistics when it
    tracks none): (running_mean, running_var, weight, bias, training, momentum, eps)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return (bn.running_mean if track else None, bn.running_var if track else None, bn.weight, bn.bias,
            batch_stats, factor, bn.eps)


def batch_norm_tail(z: torch.Tensor, shortcut: torch.Tensor, bn: nn.BatchNorm2d, gate: Gate | None) -> torch.Tensor:
    """`relu(bn(z) * gate(mean of bn(z)) + shortcut)` through `attnkernels.ops.block_tail`,
    with `bn`'s bookkeeping as nn.BatchNorm2d.forward does it (num_batches_tracked, momentum
    None for a cumulative average, batch statistics when it tracks none)."""
    return block_tail(z, shortcut, *_batch_norm_arguments(bn), gate)


def fused_tail(state: tuple[nn.BatchNorm2d, nn.Module | None], z: torch.Tensor, shortcut: torch.Tensor,
               backend: str | None = None) -> torch.Tensor:
    """`attention_tail` with (bn, attn) = state, on the pinned `backend` (None: automatic)."""
    bn, attn = state
    if backend is None:
        return attention_tail(z, shortcut, bn, attn)
    with _backend.use_backend(backend):
        return attention_tail(z, shortcut, bn, attn)


def unfused_tail(state: tuple[nn.BatchNorm2d, nn.Module | None], z: torch.Tensor,
                 shortcut: torch.Tensor) -> torch.Tensor:
    """`relu(attn(bn(z)) + shortcut)` with (bn, attn) = state, module by module, as eager."""
    bn, attn = state
    return torch.relu((bn(z) if attn is None else attn(bn(z))) + shortcut)


def attention_tail(z: torch.Tensor, shortcut: torch.Tensor, bn: nn.BatchNorm2d, attn: nn.Module | None) -> torch.Tensor:
    """`relu(attn(bn(z)) + shortcut)` fused: the block_tail ops for no attention, SE or ECA,
    the spatial_tail ops for CBAM or HAM; `bn`'s bookkeeping as nn.BatchNorm2d does it."""
    if attn is not None and type(attn) in _SPATIALLY_GATED:
        channel_gate, spatial_gate, important = spatial_tail_gates(attn)
        return spatial_tail(z, shortcut, *_batch_norm_arguments(bn), channel_gate=channel_gate,
                            spatial_gate=spatial_gate, important=important)
    return batch_norm_tail(z, shortcut, bn, tail_gate(attn))


class _TailFused(nn.Module):
    """What the fused blocks share: the pin and the tail. Subclasses say where z and its BN are,
    and set `tail_of`, the block class they fuse (`unfuse` turns them back into it)."""

    tail_of: ClassVar[type[nn.Module]]

    #: The pinned backend of the tail's ops (None: automatic), as `FusedModule.backend`.
    backend: str | None = None
    #: The hot paths the block runs (`fuse` checks a pinned backend on them).
    hot_paths: ClassVar[tuple[str, ...]] = ("block_tail", "spatial_tail")

    def tail(self, z: torch.Tensor, bn: nn.BatchNorm2d, attn: nn.Module | None, shortcut: torch.Tensor) -> torch.Tensor:
        """`relu(attn(bn(z)) + shortcut)`, fused where the shapes and dtypes allow and the
        fused tail measures faster than the unfused one (`pick_tail`)."""
        if type(bn) is not nn.BatchNorm2d or shortcut.dtype != z.dtype or shortcut.shape != z.shape:
            # The unfused tail, as eager: a norm swapped in after fuse (SyncBatchNorm, whose
            # statistics span processes) or a shortcut in another dtype (under autocast).
            return unfused_tail((bn, attn), z, shortcut)
        tails = {"fused": functools.partial(fused_tail, backend=self.backend), "eager": unfused_tail}
        return tails[self.pick_tail(z, bn, attn, shortcut, tails)]((bn, attn), z, shortcut)

    def pick_tail(self, z: torch.Tensor, bn: nn.BatchNorm2d, attn: nn.Module | None, shortcut: torch.Tensor,
                  tails: dict[str, Callable[..., torch.Tensor]]) -> str:
        """"fused" or "eager" (the unfused tail, what the block runs without this class), as
        `pick_on_copy` measures them at site "<Block> tail" for z's device, dtype, shape and
        layout, whether autograd records, BN's mode, the pin, and the attention's class and
        parameter shapes; timed on copies of bn and attn (their running statistics and
        gradients never see it). A torch.jit.trace records the fused tail."""
        if torch.jit.is_tracing():
            return "fused"
        key = (z.device.type, z.dtype, tuple(z.shape), memory_format_of(z), autograd_may_record(), bn.training,
               self.backend, type(attn).__name__, parameter_shapes(attn, holder=self))
        return pick_on_copy(f"{type(self).__name__} tail", key, tails, "fused", (bn, attn), lambda: (z, shortcut))

    def extra_repr(self) -> str:
        return "" if self.backend is None else f"backend={self.backend!r}"


class BasicBlock(_TailFused, resnet.BasicBlock):
    """`attnkernels.models.resnet.BasicBlock` with its tail (conv2's BN, attention, add, ReLU) fused."""

    tail_of = resnet.BasicBlock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv2
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.tail(conv(self.conv1(x)), bn, self.attn, shortcut)


class Bottleneck(_TailFused, resnet.Bottleneck):
    """`attnkernels.models.resnet.Bottleneck` with its tail (conv3's BN, attention, add, ReLU) fused."""

    tail_of = resnet.Bottleneck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv3
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.tail(conv(self.conv2(self.conv1(x))), bn, self.attn, shortcut)


#: Block class -> its tail-fused class (exactly that class: a subclass may change the forward).
TAIL_FUSED: dict[type[nn.Module], type[nn.Module]] = {resnet.BasicBlock: BasicBlock, resnet.Bottleneck: Bottleneck}


# --- timm's ResNet blocks ------------------------------------------------------------------
# timm.models.resnet.Bottleneck: conv1 bn1 act1, conv2 bn2 drop_block act2 aa, conv3, then the
# tail bn3 -> se -> drop_path -> += downsample(x) -> act3; BasicBlock: conv1 bn1 drop_block act1
# aa, conv2, then bn2 -> se -> drop_path -> += downsample(x) -> act2. The fused forwards run
# the same modules up to the last conv, then the fused tail.


def _timm_tail_parts(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A timm block's last norm and its activation after the add."""
    bottleneck = hasattr(block, "conv3")
    return (block.bn3, block.act3) if bottleneck else (block.bn2, block.act2)


def why_timm_tail_not_fused(block: nn.Module, why_attention_not: Callable[[nn.Module], str | None]) -> str | None:
    """Why the tail of timm block `block` cannot run fused, or None if it can. The norm must be
    exactly nn.BatchNorm2d and the activation nn.ReLU, drop_path off; `why_attention_not(se)`
    says why its attention (a timm module) cannot become a fused SE, ECA or CBAM (None: it can)."""
    bn, act = _timm_tail_parts(block)
    if type(bn) is not nn.BatchNorm2d:
        return f"its last norm is {type(bn).__name__}, not nn.BatchNorm2d"
    if type(act) is not nn.ReLU:
        return f"its activation after the add is {type(act).__name__}, not nn.ReLU"
    if block.drop_path is not None and type(block.drop_path) is not nn.Identity:
        return "drop_path is on (stochastic depth scales the branch per sample)"
    se = block.se
    if se is None or type(se) in _CHANNEL_GATED or type(se) in _SPATIALLY_GATED:
        return None
    return why_attention_not(se)


class _TimmBottleneckForward(_TailFused):
    """The forward of a tail-fused timm Bottleneck."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(y)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.tail(self.conv3(y), self.bn3, self.se, shortcut)


class _TimmBasicBlockForward(_TailFused):
    """The forward of a tail-fused timm BasicBlock."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.tail(self.conv2(y), self.bn2, self.se, shortcut)


@functools.lru_cache(maxsize=None)
def timm_tail_class(block_cls: type[nn.Module]) -> type[nn.Module]:
    """The tail-fused class of timm's `Bottleneck` or `BasicBlock` (made on first use: timm is
    optional): a subclass holding the same attributes, whose forward runs the fused tail."""
    forward = _TimmBottleneckForward if block_cls.__name__ == "Bottleneck" else _TimmBasicBlockForward
    return type(block_cls.__name__, (forward, block_cls), {
        "__module__": __name__, "__qualname__": f"timm_{block_cls.__name__}", "tail_of": block_cls,
        "__doc__": f"timm's {block_cls.__name__} with its tail (last BN, attention, add, ReLU) fused."})


def __getattr__(name: str) -> type[nn.Module]:
    """`timm_Bottleneck` and `timm_BasicBlock` by name, so pickle finds the classes a model
    saved whole refers to (they are made on first use)."""
    if name in ("timm_Bottleneck", "timm_BasicBlock"):
        from timm.models import resnet as timm_resnet

        return timm_tail_class(getattr(timm_resnet, name[len("timm_"):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
