"""cam hot path: DANet's channel attention (CAM), over each sample's C x C Gram matrix.

    y = cam(x, gamma)     # E = X X^T, attn = softmax(-E) over each row, y = gamma * (attn X) + x

X is x[n] viewed (C, H*W), read in the accumulation dtype (float32 for half inputs: the energies
are never rounded to x's dtype). Two matmuls forward, three backward; the C x C attention is
small next to x whenever C < H*W, and is what backward saves besides x (not `attn X`: grad_gamma
is `sum(attn * (grad_y X^T))`). Attention weights below the accumulation dtype's smallest normal
number are written as 0: DANet's `softmax(rowmax(E) - E)` drives most weights far below it, and
subnormal operands make a CPU matmul ten times slower (csrc/cam_ops.cpp states the bound).

The math of every op is in csrc/cam_ops.cpp with the schemas. Kernels: C++ CPU in
csrc/cpu/cam.cpp (argument checks shared with CUDA in csrc/include/attnkernels/cam.h), CUDA in
csrc/cuda/cam.cu, Triton in attnkernels/triton/cam.py.

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

HOT_PATH = "cam"

#: The public functions (re-exported by attnkernels.functional).
__all__ = ["cam"]


# ----------------------------------------------------------------------------------------
# Public function (attnkernels.functional)
# ----------------------------------------------------------------------------------------
def cam_ops(device: torch.device):
    return backend_ops(HOT_PATH, device, Reference)


def cam(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Channel attention: `y = gamma * (softmax(-X X^T) X) + x` per sample, X = x[n] as (C, H*W).

    Energies, softmax and `attn X` in the accumulation dtype of x; attention weights below its
    smallest normal number are 0. gamma holds one value. y has x's dtype and memory format.
    """
    check_cam(x, gamma)
    return cam_ops(x.device).cam(x, gamma)[0]


# ----------------------------------------------------------------------------------------
# Argument checks of the ops (the reference backend, the fakes and the Triton ops use them;
# the C++ ops check the same rules in csrc/include/attnkernels/cam.h, in the same words)
# ----------------------------------------------------------------------------------------
def check_cam(x, gamma, op: str = "cam") -> None:
    """x (N, C, H, W) in a feature dtype; gamma one floating value on x's device."""
    check.feature_map(op, "x", x)
    check.one_value(op, "gamma", gamma, x.device)


def check_cam_backward(grad_y, x, gamma, attn, op: str = "cam_backward") -> None:
    """cam's arguments; attn (N, C, C) in acc(x); grad_y shaped like x in its dtype."""
    check_cam(x, gamma, op)
    check.tensor(op, "attn", attn)
    n, c = x.shape[:2]
    if tuple(attn.shape) != (n, c, c):
        raise ValueError(f"{op}: attn must have shape (N, C, C) = ({n}, {c}, {c}), got {list(attn.shape)}")
    check.in_accumulation_dtype(op, "attn", attn, x)
    check.like_x(op, "grad_y", grad_y, x)


# ----------------------------------------------------------------------------------------
# The reference backend: the ops' signatures in plain PyTorch. cam is differentiable by
# autograd (what the `reference` backend runs); cam_backward writes out csrc/cam_ops.cpp's
# formulas without autograd, the oracle of the kernels' backward.
# ----------------------------------------------------------------------------------------
def flush_subnormal(attn: torch.Tensor) -> torch.Tensor:
    """attn with every weight below its dtype's smallest normal number set to 0 (NaN kept)."""
    return attn.masked_fill(attn < torch.finfo(attn.dtype).tiny, 0)


def _rows(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """An (N, C, H, W) tensor as (N, C, H*W) in acc."""
    return t.reshape(t.shape[0], t.shape[1], t.shape[2] * t.shape[3]).to(acc)


class Reference:
    """cam's ops in torch ops, as the `reference` backend runs them."""

    @staticmethod
    def cam(x, gamma):
        acc = accumulate_dtype(x.dtype)
        X = _rows(x, acc)
        E = X @ X.transpose(1, 2)
        # The row minimum, +inf taken as NaN: a row holding +inf is NaN, as the contract's
        # rowmax(E) - E is there (inf - inf). C = 0: nothing to shift.
        low = E.masked_fill(E == float("inf"), float("nan")).amin(-1, keepdim=True) if E.shape[-1] else E
        attn = flush_subnormal(torch.softmax(low - E, dim=-1))
        y = gamma.to(acc).reshape(()) * (attn @ X) + X
        return y.view(x.shape).to(x.dtype).contiguous(memory_format=memory_format_of(x)), attn

    @staticmethod
    def cam_backward(grad_y, x, gamma, attn):
        acc = attn.dtype
        X, g = _rows(x, acc), _rows(grad_y, acc)
        G = g @ X.transpose(1, 2)
        grad_gamma = (attn * G).sum().reshape(gamma.shape).to(gamma.dtype)
        gam = gamma.to(acc).reshape(())
        dA = gam * G
        dE = -attn * (dA - (dA * attn).sum(-1, keepdim=True))
        grad_x = g + gam * (attn.transpose(1, 2) @ g) + (dE + dE.transpose(1, 2)) @ X
        return grad_x.view(x.shape).to(x.dtype).contiguous(memory_format=memory_format_of(x)), grad_gamma


# ----------------------------------------------------------------------------------------
# Fakes and autograd
# ----------------------------------------------------------------------------------------
def _fake_cam(x, gamma):
    n, c = x.shape[:2]
    return empty_like_layout(x), x.new_empty((n, c, c), dtype=accumulate_dtype(x.dtype))


def _fake_cam_backward(grad_y, x, gamma, attn):
    return empty_like_layout(x), torch.empty_like(gamma)


_FAKES = check.fakes_that_check(
    {"cam": _fake_cam, "cam_backward": _fake_cam_backward},
    {"cam": check_cam, "cam_backward": check_cam_backward},
)


def _register_autograd(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    def setup(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, gamma = inputs
        _y, attn = output
        ctx.mark_non_differentiable(attn)
        ctx.save_for_backward(x, gamma, attn)

    def backward(ctx: Any, grad_y: torch.Tensor, _grad_attn):
        x, gamma, attn = ctx.saved_tensors
        return ops.cam_backward(grad_y, x, gamma, attn)

    torch.library.register_autograd(f"{namespace}::cam", backward, setup_context=setup)


REGISTRATION = Registration(_FAKES, _register_autograd)
