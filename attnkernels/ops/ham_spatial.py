"""ham_spatial ops: fake implementations and autograd, for every backend's namespace.

The C++/CUDA ops are `torch.ops.attnkernels.<name>` (schemas and math in csrc/attnkernels.cpp);
the Triton ops are `torch.ops.attnkernels_triton.<name>` (attnkernels/triton/ham_spatial.py),
with the same names, signatures and math:

    d1, d2, mask = ham_spatial_pool(x, gate, c_im)       # one read of x
    y            = ham_spatial_apply(x, gate, mask, s1, s2)  # one read of x, one write of y
    z            = ham_spatial_conv(d, weight)           # C++ CPU only: the 7x7 conv on the small maps

Saved for backward: x and the small maps (gate, mask: (N, C); d1, d2, s1, s2: (N, <=2, H, W));
no full-size intermediate. The mask is not differentiable (SPEC: no gradient through M).
"""
from __future__ import annotations

from typing import Any

import torch

from . import empty_like_layout, register_once
from ..reference.formulas import accumulate_dtype

FORWARD_OPS = ("ham_spatial_pool", "ham_spatial_apply", "ham_spatial_conv")
BACKWARD_OPS = ("ham_spatial_pool_backward", "ham_spatial_apply_backward", "ham_spatial_conv_backward")

_registered: set[str] = set()


def _pixel_maps(x: torch.Tensor, channels: int) -> torch.Tensor:
    n, _, h, w = x.shape
    return x.new_empty((n, channels, h, w), dtype=accumulate_dtype(x.dtype))


def _like_gate(gate: torch.Tensor) -> torch.Tensor:
    # The kernels return contiguous (N, C) maps whatever gate's strides.
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _fake_pool(x, gate, c_im):
    return _pixel_maps(x, 2), _pixel_maps(x, 2), _like_gate(gate)


def _fake_pool_backward(grad_d1, grad_d2, x, gate, mask, d1, d2, c_im):
    return empty_like_layout(x), _like_gate(gate)


def _fake_apply(x, gate, mask, s1, s2):
    return empty_like_layout(x)


def _fake_apply_backward(grad_y, x, gate, mask, s1, s2):
    return empty_like_layout(x), _like_gate(gate), _pixel_maps(x, 1), _pixel_maps(x, 1)


def _fake_conv(d, weight):
    return d.new_empty((d.shape[0], 1, d.shape[2], d.shape[3]))


def _fake_conv_backward(grad_z, d, weight):
    return torch.empty_like(d), torch.empty_like(weight)


def _fake_ham_attention(x, weight, alpha, beta, c_im, spatial_weight, bn_scale, bn_shift):
    return empty_like_layout(x)


_FAKES = {
    "ham_spatial_pool": _fake_pool,
    "ham_spatial_pool_backward": _fake_pool_backward,
    "ham_spatial_apply": _fake_apply,
    "ham_spatial_apply_backward": _fake_apply_backward,
    "ham_spatial_conv": _fake_conv,
    "ham_spatial_conv_backward": _fake_conv_backward,
    "ham_attention": _fake_ham_attention,
}


def _register_autograd(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    def setup_pool(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, gate, c_im = inputs
        d1, d2, mask = output
        ctx.c_im = c_im
        ctx.mark_non_differentiable(mask)
        ctx.save_for_backward(x, gate, mask, d1, d2)
        ctx.set_materialize_grads(False)

    def backward_pool(ctx: Any, grad_d1: torch.Tensor | None, grad_d2: torch.Tensor | None, _grad_mask):
        if grad_d1 is None and grad_d2 is None:
            return None, None, None
        x, gate, mask, d1, d2 = ctx.saved_tensors
        grad_d1 = torch.zeros_like(d1) if grad_d1 is None else grad_d1
        grad_d2 = torch.zeros_like(d2) if grad_d2 is None else grad_d2
        grad_x, grad_gate = ops.ham_spatial_pool_backward(grad_d1, grad_d2, x, gate, mask, d1, d2, ctx.c_im)
        return grad_x, grad_gate, None

    def setup_apply(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)  # x, gate, mask, s1, s2

    def backward_apply(ctx: Any, grad_y: torch.Tensor):
        x, gate, mask, s1, s2 = ctx.saved_tensors
        grad_x, grad_gate, grad_s1, grad_s2 = ops.ham_spatial_apply_backward(grad_y, x, gate, mask, s1, s2)
        return grad_x, grad_gate, None, grad_s1, grad_s2

    def setup_conv(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)  # d, weight

    def backward_conv(ctx: Any, grad_z: torch.Tensor):
        d, weight = ctx.saved_tensors
        return ops.ham_spatial_conv_backward(grad_z, d, weight)

    if hasattr(ops, "ham_spatial_conv"):  # the small-map conv has a C++ CPU kernel only
        torch.library.register_autograd(f"{namespace}::ham_spatial_conv", backward_conv, setup_context=setup_conv)
    torch.library.register_autograd(f"{namespace}::ham_spatial_pool", backward_pool, setup_context=setup_pool)
    torch.library.register_autograd(f"{namespace}::ham_spatial_apply", backward_apply, setup_context=setup_apply)


def register(namespace: str, with_fakes: bool = True) -> None:
    """Give `namespace`'s ham_spatial ops autograd (and fake impls); idempotent.

    Triton ops (torch.library.triton_op) trace their own fake implementation, so they
    take `with_fakes=False`.
    """
    register_once(namespace, with_fakes, _FAKES, _register_autograd, _registered)
