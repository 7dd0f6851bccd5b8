"""bam hot path: BAM's output, the one pass over x that combines its two branches.

    mc = channel MLP of channel_pool's mean     (torch, (N, C))
    ms = the spatial branch's convs              (torch, (N, 1, H, W): a C/16-channel map)
    y = bam_apply(x, mc, ms)                     # one read of x, one write of y: x * (1 + sigmoid(mc + ms))

Eager BAM broadcasts `mc + ms` to x's size and writes it, its sigmoid, `1 + .` and the product:
four x-sized tensors, all saved for backward. The math of every op is in csrc/bam_ops.cpp
with the schemas. Kernels: C++ CPU in csrc/cpu/bam.cpp (argument checks shared with CUDA in
csrc/include/attnkernels/bam.h), CUDA in csrc/cuda/bam.cu, Triton in attnkernels/triton/bam.py.
Saved for backward: x, mc and ms; no x-sized intermediate.

A hot path of `attnkernels.ops.HOT_PATHS`: loading the C++ library registers REGISTRATION
(fakes and autograd) in its namespace, and `attnkernels.backend` runs the public functions on
the chosen backend.
"""
from __future__ import annotations

from typing import Any

import torch

from ..reference._base import memory_format_of
from ..reference.formulas import accumulate_dtype
from . import _checks as check
from ._common import Registration, backend_ops, empty_like_layout

HOT_PATH = "bam"

#: The public functions (re-exported by attnkernels.functional).
__all__ = ["bam_apply"]


# ----------------------------------------------------------------------------------------
# Public functions (attnkernels.functional)
# ----------------------------------------------------------------------------------------
def bam_ops(device: torch.device):
    return backend_ops(HOT_PATH, device, Reference)


def bam_apply(x: torch.Tensor, mc: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
    """BAM's output `y = x * (1 + sigmoid(mc + ms))`, computed in the accumulation dtype of x.

    mc is the channel branch, (N, C) or (N, C, 1, 1); ms the spatial branch, (N, 1, H, W); both
    are cast to the accumulation dtype of x. One read of x and one write of y, which has x's
    dtype and memory format; the x-sized `sigmoid(mc + ms)` is never written.
    """
    check.feature_map("bam_apply", "x", x)
    acc = accumulate_dtype(x.dtype)
    if mc.dim() == 4 and tuple(mc.shape[2:]) == (1, 1):
        mc = mc.flatten(1)
    mc, ms = mc.to(acc).contiguous(), ms.to(acc).contiguous()
    check_bam_apply(x, mc, ms)
    return bam_ops(x.device).bam_apply(x, mc, ms)


# ----------------------------------------------------------------------------------------
# Argument checks of the ops (the reference backend, the fakes and the Triton ops use them;
# the C++ ops check the same rules in csrc/include/attnkernels/bam.h, in the same words)
# ----------------------------------------------------------------------------------------
def check_bam_apply(x, mc, ms, op: str = "bam_apply") -> None:
    """x (N, C, H, W) in a feature dtype; mc (N, C) and ms (N, 1, H, W) in acc(x), on x's device."""
    check.feature_map(op, "x", x)
    check.per_channel(op, "mc", mc, x)
    check.pixel_map(op, "ms", ms, x, 1)


def check_bam_apply_backward(grad_y, x, mc, ms, op: str = "bam_apply_backward") -> None:
    """bam_apply's arguments, and grad_y shaped like x in its dtype."""
    check_bam_apply(x, mc, ms, op)
    check.like_x(op, "grad_y", grad_y, x)


# ----------------------------------------------------------------------------------------
# The reference backend: the ops' signatures in plain PyTorch. bam_apply is differentiable by
# autograd (what the `reference` backend runs); bam_apply_backward writes out
# csrc/bam_ops.cpp's formulas without autograd, the oracle of the kernels' backward.
# ----------------------------------------------------------------------------------------
def _sig(mc: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
    """sigmoid(mc[n, c] + ms[n, 0, p]) broadcast to (N, C, H, W), in acc(x)."""
    return torch.sigmoid(mc[:, :, None, None] + ms)


class Reference:
    """bam's ops in torch ops, as the `reference` backend runs them."""

    @staticmethod
    def bam_apply(x, mc, ms):
        y = x.to(mc.dtype) * (1 + _sig(mc, ms))
        return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))

    @staticmethod
    def bam_apply_backward(grad_y, x, mc, ms):
        sig = _sig(mc, ms)
        g = grad_y.to(mc.dtype)
        grad_x = (g * (1 + sig)).to(x.dtype).contiguous(memory_format=memory_format_of(x))
        dz = (g * x.to(mc.dtype)) * (sig * (1 - sig))
        return grad_x, dz.sum((2, 3)), dz.sum(1, keepdim=True)


# ----------------------------------------------------------------------------------------
# Fakes and autograd
# ----------------------------------------------------------------------------------------
def _fake_apply(x, mc, ms):
    return empty_like_layout(x)


def _fake_apply_backward(grad_y, x, mc, ms):
    return empty_like_layout(x), torch.empty_like(mc), torch.empty_like(ms)


_FAKES = check.fakes_that_check(
    {"bam_apply": _fake_apply, "bam_apply_backward": _fake_apply_backward},
    {"bam_apply": check_bam_apply, "bam_apply_backward": check_bam_apply_backward},
)


def _register_autograd(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    def setup_apply(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)  # x, mc, ms

    def backward_apply(ctx: Any, grad_y: torch.Tensor):
        x, mc, ms = ctx.saved_tensors
        return ops.bam_apply_backward(grad_y, x, mc, ms)

    torch.library.register_autograd(f"{namespace}::bam_apply", backward_apply, setup_context=setup_apply)


REGISTRATION = Registration(_FAKES, _register_autograd)
