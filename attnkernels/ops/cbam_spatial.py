"""cbam_spatial hot path: CBAM's spatial half, given the channel gate a.

    d = cbam_spatial_pool(x, gate)       # one read of x: cat[mean_c(x*a), max_c(x*a)]
    s = sigmoid(bn(conv7x7(d)))          (torch, small maps)
    y = cbam_spatial_apply(x, gate, s)   # one read of x, one write of y: x*a*s

HAM's dual spatial pooling with a single group and no mask. The math of every op is in
csrc/cbam_spatial_ops.cpp with the schemas; the kernels share ham_spatial's (the one-group
case): C++ CPU in csrc/cpu/cbam_spatial.cpp, CUDA in csrc/cuda/cbam_spatial.cu, Triton in
attnkernels/triton/cbam_spatial.py. Saved for backward: x and the small maps (gate: (N, C);
d, s: (N, <=2, H, W)); no full-size intermediate.

A hot path of `attnkernels.ops.HOT_PATHS`: loading the C++ library and importing
`attnkernels.triton.cbam_spatial` register REGISTRATION (fakes and autograd) in their
namespaces, and `attnkernels.backend` runs the public functions on the chosen backend.
"""
from __future__ import annotations

from typing import Any

import torch

from ..reference._base import memory_format_of
from ..reference.formulas import accumulate_dtype
from . import _checks as check
from ._common import Registration, backend_ops, empty_like_layout

HOT_PATH = "cbam_spatial"

#: The public functions (re-exported by attnkernels.functional).
__all__ = ["cbam_spatial_pool", "cbam_spatial_apply"]


# ----------------------------------------------------------------------------------------
# Public functions (attnkernels.functional)
# ----------------------------------------------------------------------------------------
def _ops(device: torch.device):
    return backend_ops(HOT_PATH, device, Reference)


def cbam_spatial_pool(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """CBAM's spatial pooling of the channel-refined map `F = x * gate`, in one read of x.

    `gate` is CBAM's channel gate a (N, C), cast to the accumulation dtype of x. Returns
    `d = cat[sum_c F / C, max_c F]` (N, 2, H, W) in the accumulation dtype: mean first, then
    max (NaN propagates through the max as torch.amax; ties share its gradient evenly).
    """
    check.feature_map("cbam_spatial_pool", "x", x)
    gate = gate.to(accumulate_dtype(x.dtype))
    check_cbam_spatial_pool(x, gate)
    return _ops(x.device).cbam_spatial_pool(x, gate)


def cbam_spatial_apply(x: torch.Tensor, gate: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """CBAM's output `y = (x * gate) * s`, computed in the accumulation dtype of x.

    gate is (N, C) and s the spatial gate (N, 1, H, W); both are cast to the accumulation
    dtype of x. y has x's dtype and memory format.
    """
    check.feature_map("cbam_spatial_apply", "x", x)
    acc = accumulate_dtype(x.dtype)
    gate, s = gate.to(acc), s.to(acc).contiguous()
    check_cbam_spatial_apply(x, gate, s)
    return _ops(x.device).cbam_spatial_apply(x, gate, s)


# ----------------------------------------------------------------------------------------
# Argument checks of the ops (the reference backend and the Triton ops share them; the C++
# ops check the same rules in csrc/include/attnkernels/cbam_spatial.h, in the same words)
# ----------------------------------------------------------------------------------------
def check_cbam_spatial_pool(x, gate, op: str = "cbam_spatial_pool") -> None:
    """x (N, C, H, W) in a feature dtype; gate (N, C) in acc(x), on x's device."""
    check.feature_map(op, "x", x)
    check.per_channel(op, "gate", gate, x)


def check_cbam_spatial_apply(x, gate, s, op: str = "cbam_spatial_apply") -> None:
    """x (N, C, H, W); gate (N, C) and s (N, 1, H, W) in acc(x), on x's device."""
    check.feature_map(op, "x", x)
    check.per_channel(op, "gate", gate, x)
    check.pixel_map(op, "s", s, x, 1)


def check_cbam_spatial_pool_backward(grad_d, x, gate, d, op: str = "cbam_spatial_pool_backward") -> None:
    """x (N, C, H, W); gate (N, C) and grad_d, d (N, 2, H, W) maps of x in acc(x), on x's device."""
    check.feature_map(op, "x", x)
    check.per_channel(op, "gate", gate, x)
    for name, t in (("grad_d", grad_d), ("d", d)):
        check.pixel_map(op, name, t, x, 2)


def check_cbam_spatial_apply_backward(grad_y, x, gate, s, op: str = "cbam_spatial_apply_backward") -> None:
    """cbam_spatial_apply's arguments, and grad_y shaped like x in its dtype."""
    check_cbam_spatial_apply(x, gate, s, op)
    check.like_x(op, "grad_y", grad_y, x)


# ----------------------------------------------------------------------------------------
# The reference backend: the ops' signatures in plain PyTorch. The forward ops are
# differentiable by autograd (what the `reference` backend runs); the backward ops write out
# csrc/cbam_spatial_ops.cpp's formulas without autograd, the oracle of the kernels' backward.
# ----------------------------------------------------------------------------------------
def _refined(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """F = x * gate in acc(x) (gate's dtype): the product every op forms, the same bits each time."""
    return x.to(gate.dtype) * gate[:, :, None, None]


class Reference:
    """cbam_spatial's ops in torch ops, as the `reference` backend runs them."""

    @staticmethod
    def cbam_spatial_pool(x, gate):
        f = _refined(x, gate)
        return torch.cat([f.sum(1, keepdim=True) / x.shape[1], f.amax(1, keepdim=True)], dim=1)

    @staticmethod
    def cbam_spatial_pool_backward(grad_d, x, gate, d):
        f = _refined(x, gate)
        tie = (f == d[:, 1:]).to(f.dtype)  # NaN ties nothing
        cnt = tie.sum(1, keepdim=True)  # 0 where the max is NaN: grad / 0 is inf or NaN, times 0 NaN
        df = grad_d[:, :1] / x.shape[1] + tie * (grad_d[:, 1:] / cnt)
        grad_x = (df * gate[:, :, None, None]).to(x.dtype).contiguous(memory_format=memory_format_of(x))
        grad_gate = (df * x.to(gate.dtype)).sum((2, 3))
        return grad_x, grad_gate

    @staticmethod
    def cbam_spatial_apply(x, gate, s):
        y = (_refined(x, gate) * s).to(x.dtype)
        return y.contiguous(memory_format=memory_format_of(x))

    @staticmethod
    def cbam_spatial_apply_backward(grad_y, x, gate, s):
        g = grad_y.to(gate.dtype)
        df = g * s
        grad_x = (df * gate[:, :, None, None]).to(x.dtype).contiguous(memory_format=memory_format_of(x))
        grad_gate = (df * x.to(gate.dtype)).sum((2, 3))
        grad_s = (g * _refined(x, gate)).sum(1, keepdim=True)
        return grad_x, grad_gate, grad_s


# ----------------------------------------------------------------------------------------
# Fakes and autograd
# ----------------------------------------------------------------------------------------
def _pixel_maps(x: torch.Tensor, channels: int) -> torch.Tensor:
    n, _, h, w = x.shape
    return x.new_empty((n, channels, h, w), dtype=accumulate_dtype(x.dtype))


def _like_gate(gate: torch.Tensor) -> torch.Tensor:
    # The kernels return contiguous (N, C) maps whatever gate's strides.
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _fake_pool(x, gate):
    return _pixel_maps(x, 2)


def _fake_pool_backward(grad_d, x, gate, d):
    return empty_like_layout(x), _like_gate(gate)


def _fake_apply(x, gate, s):
    return empty_like_layout(x)


def _fake_apply_backward(grad_y, x, gate, s):
    return empty_like_layout(x), _like_gate(gate), _pixel_maps(x, 1)


_FAKES = check.fakes_that_check({
    "cbam_spatial_pool": _fake_pool,
    "cbam_spatial_pool_backward": _fake_pool_backward,
    "cbam_spatial_apply": _fake_apply,
    "cbam_spatial_apply_backward": _fake_apply_backward,
}, {
    "cbam_spatial_pool": check_cbam_spatial_pool,
    "cbam_spatial_pool_backward": check_cbam_spatial_pool_backward,
    "cbam_spatial_apply": check_cbam_spatial_apply,
    "cbam_spatial_apply_backward": check_cbam_spatial_apply_backward,
})


def _register_autograd(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    def setup_pool(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs, output)  # x, gate, d

    def backward_pool(ctx: Any, grad_d: torch.Tensor):
        x, gate, d = ctx.saved_tensors
        return ops.cbam_spatial_pool_backward(grad_d, x, gate, d)

    def setup_apply(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)  # x, gate, s

    def backward_apply(ctx: Any, grad_y: torch.Tensor):
        x, gate, s = ctx.saved_tensors
        return ops.cbam_spatial_apply_backward(grad_y, x, gate, s)

    torch.library.register_autograd(f"{namespace}::cbam_spatial_pool", backward_pool, setup_context=setup_pool)
    torch.library.register_autograd(f"{namespace}::cbam_spatial_apply", backward_apply, setup_context=setup_apply)


REGISTRATION = Registration(_FAKES, _register_autograd)
