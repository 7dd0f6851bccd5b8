"""softmax_spatial hot path: SoftmaxSpatial's 1x1 conv, spatial softmax and reweighting, fused.

    y = softmax_spatial(x, weight, bias, rescale)   # x * softmax_p(conv(x))[c // (C/g)] * (H*W or 1)
    (the ops: y, a = softmax_spatial(...); grad_x, grad_weight, grad_bias =
     softmax_spatial_backward(grad_y, x, weight, a, rescale))

The math is in csrc/softmax_spatial_ops.cpp with the schemas; kernels in
csrc/cpu/softmax_spatial.cpp, csrc/cuda/softmax_spatial.cu and attnkernels/triton/softmax_spatial.py.
Saved for backward: x, the (g, C) weight and a, the (N, g, H, W) softmax map in acc(x) (g/C of
x's size); nothing else x-sized: the backward needs no recompute of the logits.
"""
from __future__ import annotations

from typing import Any

import torch

from ..reference._base import memory_format_of
from ..reference.formulas import accumulate_dtype
from . import _checks as check
from ._common import Registration, backend_ops, empty_like_layout

HOT_PATH = "softmax_spatial"

#: The public functions (re-exported by attnkernels.functional).
__all__ = ["softmax_spatial"]


# ----------------------------------------------------------------------------------------
# Public function (attnkernels.functional)
# ----------------------------------------------------------------------------------------
def softmax_spatial(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, rescale: bool = True) -> torch.Tensor:
    """SoftmaxSpatial's attention: `y = x * a[c // (C/g)] * (H*W if rescale else 1)`.

    `a = softmax over the H*W pixels of (weight @ x + bias)` per sample and map: weight is the
    1x1 conv's (g, C) weight (g divides C), bias its g values, both used in the accumulation
    dtype of x. The fused backends compute the logits and the softmax from one read of x and
    the reweighting from a second, keep a in acc and round once, when they write y (x's dtype
    and layout). Backward saves x and the (N, g, H, W) map a only.
    """
    check_softmax_spatial(x, weight, bias, rescale)
    return backend_ops(HOT_PATH, x.device, Reference).softmax_spatial(x, weight, bias, rescale)[0]


# ----------------------------------------------------------------------------------------
# Argument checks (the reference backend and the Triton ops share them; the C++ ops check the
# same rules in csrc/include/attnkernels/softmax_spatial.h, in the same words)
# ----------------------------------------------------------------------------------------
def _check_weight(op: str, x, weight) -> int:
    """x (N, C, H, W) and weight (g, C), g dividing C, on x's device; returns g."""
    check.feature_map(op, "x", x)
    check.tensor(op, "weight", weight)
    c = x.shape[1]
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != c or c % weight.shape[0] != 0:
        raise ValueError(f"{op}: weight must have shape (g, C) = (g, {c}) with g dividing C, got {list(weight.shape)}")
    check.device(op, "weight", weight, x.device)
    return weight.shape[0]


def check_softmax_spatial(x, weight, bias, rescale: bool = True, op: str = "softmax_spatial") -> None:
    """x (N, C, H, W); weight (g, C) with g dividing C; bias g values."""
    g = _check_weight(op, x, weight)
    check.vector(op, "bias", bias, g, x.device, "g")


# ----------------------------------------------------------------------------------------
# Argument checks of the backward op (worded as csrc/include/attnkernels/softmax_spatial.h's;
# the Triton ops use them)
# ----------------------------------------------------------------------------------------
def check_softmax_spatial_backward(grad_y, x, weight, a, rescale: bool = True,
                                   op: str = "softmax_spatial_backward") -> None:
    """x and weight as for softmax_spatial; grad_y shaped like x in its dtype; a (N, g, H, W)
    in acc(x), on x's device."""
    g = _check_weight(op, x, weight)
    check.like_x(op, "grad_y", grad_y, x)
    check.pixel_map(op, "a", a, x, g)


# ----------------------------------------------------------------------------------------
# The reference backend: the op's signature in plain PyTorch (differentiable by autograd)
# ----------------------------------------------------------------------------------------
class Reference:
    """softmax_spatial in torch ops (acc(x)), as the `reference` backend runs it."""

    @staticmethod
    def softmax_spatial(x, weight, bias, rescale):
        acc = accumulate_dtype(x.dtype)
        n, c, h, w = x.shape
        g = weight.shape[0]
        xf = x.to(acc).reshape(n, c, h * w)
        logits = torch.einsum("jc,ncp->njp", weight.to(acc), xf) + bias.reshape(g, 1).to(acc)
        a = torch.softmax(logits, dim=-1)
        y = xf.reshape(n, g, c // g, h * w) * a[:, :, None]
        if rescale:
            y = y * (h * w)
        y = y.reshape(n, c, h, w).to(x.dtype).contiguous(memory_format=memory_format_of(x))
        return y, a.detach().reshape(n, g, h, w)


# ----------------------------------------------------------------------------------------
# Fakes and autograd
# ----------------------------------------------------------------------------------------
def _fake_softmax_spatial(x, weight, bias, rescale):
    n, _, h, w = x.shape
    return empty_like_layout(x), x.new_empty((n, weight.shape[0], h, w), dtype=accumulate_dtype(x.dtype))


def _fake_softmax_spatial_backward(grad_y, x, weight, a, rescale):
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    return empty_like_layout(x), grad_weight, weight.new_empty((weight.shape[0],))


_FAKES = check.fakes_that_check(
    {"softmax_spatial": _fake_softmax_spatial, "softmax_spatial_backward": _fake_softmax_spatial_backward},
    {"softmax_spatial": check_softmax_spatial, "softmax_spatial_backward": check_softmax_spatial_backward},
)


def _register_autograd(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    def setup(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, bias, rescale = inputs
        _y, a = output
        ctx.mark_non_differentiable(a)
        ctx.save_for_backward(x, weight, a)
        ctx.rescale = rescale
        ctx.bias_shape, ctx.bias_dtype = bias.shape, bias.dtype

    def backward(ctx: Any, grad_y: torch.Tensor, _grad_a):
        x, weight, a = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = ops.softmax_spatial_backward(grad_y, x, weight, a, ctx.rescale)
        return grad_x, grad_weight, grad_bias.reshape(ctx.bias_shape).to(ctx.bias_dtype), None

    torch.library.register_autograd(f"{namespace}::softmax_spatial", backward, setup_context=setup)


REGISTRATION = Registration(_FAKES, _register_autograd)
