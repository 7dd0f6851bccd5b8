"""gam_channel hot path: GAM's channel gate, a per-pixel C -> C/r -> C MLP, from one read of x.

    x1 = gam_channel(x, w1, b1, w2, b2)   # x * sigmoid(fc2(relu(fc1(x)))) per pixel
    (the ops: x1 = gam_channel(...); grad_x, grad_w1, grad_b1, grad_w2, grad_b2 =
     gam_channel_backward(grad_x1, x, w1, b1, w2, b2))

The math is in csrc/gam_channel_ops.cpp with the schemas; kernels in csrc/cpu/gam_channel.cpp,
csrc/cuda/gam_channel.cu and attnkernels/triton/gam_channel.py. Saved for backward: x and the
four small weights; the backward recomputes the MLP's hidden and output maps from x
(2*C*rd multiply-adds per pixel) instead of saving them.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..reference._base import memory_format_of
from ..reference.formulas import accumulate_dtype
from . import _checks as check
from ._common import Registration, backend_ops, empty_like_layout

HOT_PATH = "gam_channel"

#: The public functions (re-exported by attnkernels.functional).
__all__ = ["gam_channel"]


# ----------------------------------------------------------------------------------------
# Public function (attnkernels.functional)
# ----------------------------------------------------------------------------------------
def gam_channel(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """GAM's channel gate: `x1 = x * sigmoid(fc2(relu(fc1(x))))` at every pixel.

    w1 (rd, C), b1 (rd), w2 (C, rd), b2 (C) are the two nn.Linear layers' weights, used in the
    accumulation dtype of x. The fused backends read x once and write only x1 (the MLP's
    hidden and output maps never reach memory; backward recomputes them from x).
    """
    check_gam_channel(x, w1, b1, w2, b2)
    return backend_ops(HOT_PATH, x.device, Reference).gam_channel(x, w1, b1, w2, b2)


# ----------------------------------------------------------------------------------------
# Argument checks (the reference backend and the Triton ops share them; the C++ ops check the
# same rules in csrc/include/attnkernels/gam_channel.h, in the same words)
# ----------------------------------------------------------------------------------------
def check_gam_channel(x, w1, b1, w2, b2, op: str = "gam_channel") -> None:
    """x (N, C, H, W); w1 (rd, C), b1 rd, w2 (C, rd), b2 C values (nn.Linear weights)."""
    check.feature_map(op, "x", x)
    c = x.shape[1]
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        check.tensor(op, name, t)
    if w1.dim() != 2 or w1.shape[0] < 1 or w1.shape[1] != c:
        raise ValueError(f"{op}: w1 must have shape (rd, C) = (rd, {c}), got {list(w1.shape)}")
    rd = w1.shape[0]
    if w2.dim() != 2 or tuple(w2.shape) != (c, rd):
        raise ValueError(f"{op}: w2 must have shape (C, rd) = ({c}, {rd}), got {list(w2.shape)}")
    check.vector(op, "w1", w1, rd * c, x.device, "rd * C")
    check.vector(op, "w2", w2, c * rd, x.device, "C * rd")
    check.vector(op, "b1", b1, rd, x.device, "rd")
    check.vector(op, "b2", b2, c, x.device, "C")


# ----------------------------------------------------------------------------------------
# Argument checks of the backward ops (worded as csrc/cpu/gam_channel.cpp's; the Triton ops
# use them)
# ----------------------------------------------------------------------------------------
def check_gam_channel_backward(grad_x1, x, w1, b1, w2, b2, op: str = "gam_channel_backward") -> None:
    """gam_channel's arguments, and grad_x1 shaped like x in its dtype."""
    check_gam_channel(x, w1, b1, w2, b2, op)
    check.like_x(op, "grad_x1", grad_x1, x)


# ----------------------------------------------------------------------------------------
# The reference backend: the op's signature in plain PyTorch (differentiable by autograd)
# ----------------------------------------------------------------------------------------
class Reference:
    """gam_channel in torch ops (acc(x)), as the `reference` backend runs it."""

    @staticmethod
    def gam_channel(x, w1, b1, w2, b2):
        acc = accumulate_dtype(x.dtype)
        rd, c = w1.shape[0], x.shape[1]
        xf = x.to(acc).permute(0, 2, 3, 1)
        h = F.relu(F.linear(xf, w1.reshape(rd, c).to(acc), b1.reshape(rd).to(acc)))
        m = torch.sigmoid(F.linear(h, w2.reshape(c, rd).to(acc), b2.reshape(c).to(acc))).permute(0, 3, 1, 2)
        return (x.to(acc) * m).to(x.dtype).contiguous(memory_format=memory_format_of(x))


# ----------------------------------------------------------------------------------------
# Fakes and autograd
# ----------------------------------------------------------------------------------------
def _fake_gam_channel(x, w1, b1, w2, b2):
    return empty_like_layout(x)


def _fake_gam_channel_backward(grad_x1, x, w1, b1, w2, b2):
    return (empty_like_layout(x), *(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (w1, b1, w2, b2)))


_FAKES = check.fakes_that_check(
    {"gam_channel": _fake_gam_channel, "gam_channel_backward": _fake_gam_channel_backward},
    {"gam_channel": check_gam_channel, "gam_channel_backward": check_gam_channel_backward},
)


def _register_autograd(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    def setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)  # x, w1, b1, w2, b2

    def backward(ctx: Any, grad_x1: torch.Tensor):
        return ops.gam_channel_backward(grad_x1, *ctx.saved_tensors)

    torch.library.register_autograd(f"{namespace}::gam_channel", backward, setup_context=setup)


REGISTRATION = Registration(_FAKES, _register_autograd)
