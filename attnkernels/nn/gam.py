"""Fused GAM: gam_channel for the channel gate, shuffle_conv for the two-conv spatial gate."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .. import functional as AF
from ..ops._common import fold_batch_norm
from ..reference import gam as reference
from ..reference.formulas import accumulate_dtype
from ._fused import FusedModule, autograd_may_record, chosen_in_training, pick_inference, without_autocast


class GAM(FusedModule, reference.GAM):
    """`attnkernels.reference.GAM` on the fused ops (same arguments and weights).

    * `x1 = gam_channel(x, fc1, fc2)`: the per-pixel MLP gate from one read of x; only x1 is
      written (backward recomputes the MLP from x).
    * `z1 = shuffle_conv(x1, conv1)`: the raw grouped 7x7 conv (rd channels, the accumulation
      dtype: a small map).
    * BN1 (batch statistics in training, running ones in eval, running stats updated exactly as
      nn.BatchNorm2d does) is folded to a per-channel affine on z1, in torch ops on the small map.
    * `y = shuffle_conv(z1, conv2, ...)`: BN1's affine + ReLU and the channel shuffle applied as
      conv2 loads z1, BN2 + sigmoid + `x1 *` in its epilogue (inference); with autograd or in
      a torch.jit.trace, `shuffle_conv_bn_gate` (BN2's batch statistics of conv2's output in
      training), whose backward recomputes conv2's output instead of saving it.
    Backward saves x, x1 and the small maps only: conv2's output is recomputed.

    When bn1 or bn2 is a SyncBatchNorm that syncs (training in a process group,
    `syncs_batch_stats`), the forward is the reference one, so the batch statistics span the
    processes as SyncBatchNorm computes them (the folds above see this process's batch only).

    `conv_algorithm` ("auto", "direct", "library") picks the convs' GEMM: the backend's own
    kernels or torch's conv2d (oneDNN / cuDNN) with the rest fused around it. A plain
    attribute, not state_dict.
    """

    hot_paths = ("gam_channel", "shuffle_conv")
    conv_algorithm: str = "auto"

    @without_autocast
    @chosen_in_training
    def attend(self, x: torch.Tensor) -> torch.Tensor:
        if syncs_batch_stats(self.bn1) or syncs_batch_stats(self.bn2):
            return super().attend(x)
        if not (uses_batch_stats(self.bn1) or uses_batch_stats(self.bn2) or autograd_may_record()):
            # Inference: the fused ops or the reference's eager forward, measured (on a GPU the
            # composition of library convs and fused ops can lose to eager's; first GPU run).
            runs = {"fused": self.attend_fused, "eager": super().attend}
            params = (self.groups, self.fc1.weight.shape[0], self.conv_algorithm)
            return pick_inference("gam", x, params, runs, "fused")(x)
        return self.attend_fused(x)

    def attend_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The forward on the fused ops (the class docstring's steps)."""
        g, conv = self.groups, self.conv_algorithm
        x1 = AF.gam_channel(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        z1 = AF.shuffle_conv(x1, self.conv1.weight, self.conv1.bias, g, conv=conv)
        in_scale, in_shift = batch_norm_affine(self.bn1, z1)
        c2, bn = self.conv2, self.bn2
        batch_stats = uses_batch_stats(bn)
        if batch_stats or autograd_may_record():
            # One op for conv2 + BN2 + gate whose backward recomputes conv2's output.
            running = (None, None) if batch_stats else (bn.running_mean, bn.running_var)
            y, mean, var = AF.shuffle_conv_bn_gate(
                z1, c2.weight, c2.bias, g, g, in_scale, in_shift, x1, bn.weight, bn.bias, bn.eps, conv, *running)
            if batch_stats:
                update_running_stats(bn, mean, var, z1.numel() // z1.shape[1])
            return y
        # Inference (no autograd, no trace): BN2 folded into the conv's epilogue, conv2's
        # output never written.
        out_scale, out_shift = batch_norm_affine(bn, None, accumulate_dtype(z1.dtype))
        return AF.shuffle_conv(z1, c2.weight, c2.bias, g, g, in_scale, in_shift, x1, out_scale, out_shift, conv=conv)


def syncs_batch_stats(bn: nn.Module) -> bool:
    """Whether `bn` is a SyncBatchNorm that gathers batch statistics across processes now:
    in training, in an initialized process group (nn.SyncBatchNorm's own test; it then also
    checks the device and the world size)."""
    return isinstance(bn, nn.SyncBatchNorm) and bn.training and dist.is_available() and dist.is_initialized()


def uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """Whether `bn` normalizes with batch statistics now (training, or no running stats)."""
    return bn.training or bn.running_mean is None


def batch_norm_affine(
    bn: nn.BatchNorm2d, z: torch.Tensor | None, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`bn(z)` as `z * scale + shift` per channel, (scale, shift) in z's dtype (or `dtype`).

    With batch statistics (`uses_batch_stats`) they come from z (differentiable: the
    gradient reaches z through them) and the running stats are updated as nn.BatchNorm2d
    does; otherwise from the running stats (z may be None).
    """
    if uses_batch_stats(bn):
        var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
        update_running_stats(bn, mean.detach(), var.detach(), z.numel() // z.shape[1])
    else:
        mean, var = bn.running_mean.to(dtype), bn.running_var.to(dtype)
    scale, shift, _ = fold_batch_norm(mean, var, bn.weight, bn.bias, bn.eps)
    return scale, shift


@torch.no_grad()
def update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """What nn.BatchNorm2d's training forward does to its buffers, given the batch's mean and
    biased variance over `count` values per channel (raises, as it does, for count 1)."""
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {count} values per channel")
    if not (bn.training and bn.track_running_stats and bn.running_mean is not None):
        return
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
    # var * count first: in a torch.jit.trace count is an int64 tensor, whose true division
    # by count - 1 would round the correction to float32.
    unbiased = var * count / (count - 1)
    bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)
