"""triplet hot path: Triplet attention's three poolings and its apply.

    d_hw, d_cw, d_hc = triplet_pool(x)      # one read of x: [max, mean] over C, over H, over W
    s_i = sigmoid(bn_i(conv_i(d_i)))        (torch, small maps; one gate per axis)
    y = triplet_apply(x, s_hw, s_cw, s_hc)  # one read of x, one write of y

The math of every op is in csrc/triplet_ops.cpp with the schemas. Kernels: C++ CPU in
csrc/cpu/triplet.cpp (one read of x for the three poolings; argument checks shared with CUDA in
csrc/include/attnkernels/triplet.h), CUDA in csrc/cuda/triplet.cu, Triton in
attnkernels/triton/triplet.py. Saved for backward: x and the small maps (d_hw
(N, 2, H, W), d_cw (N, 2, C, W), d_hc (N, 2, H, C), and the gates, one plane each); no
full-size intermediate.

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

HOT_PATH = "triplet"

#: The public functions (re-exported by attnkernels.functional).
__all__ = ["triplet_pool", "triplet_apply"]

#: The three gates, in the order every op sums them, and the plane each gate's map lies in:
#: (the dim of x that is the map's rows, the dim that is its columns).
GATES = {"hw": (2, 3), "cw": (1, 3), "hc": (2, 1)}


# ----------------------------------------------------------------------------------------
# Public functions (attnkernels.functional)
# ----------------------------------------------------------------------------------------
def _ops(device: torch.device):
    return backend_ops(HOT_PATH, device, Reference)


def triplet_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triplet attention's three poolings of x, in one read of x.

    Returns `(d_hw, d_cw, d_hc)` in the accumulation dtype of x: `[max, mean]` (max first, as
    Triplet's gates pool) over C as an (N, 2, H, W) map, over H as (N, 2, C, W), and over W as
    (N, 2, H, C): the planes the gates' convs run over. NaN propagates through the maxima as
    torch.amax; ties share their gradient evenly.
    """
    check_triplet_pool(x)
    return _ops(x.device).triplet_pool(x)


def triplet_apply(x: torch.Tensor, s_hw: torch.Tensor, s_cw: torch.Tensor, s_hc: torch.Tensor) -> torch.Tensor:
    """Triplet attention's output `y = (x * s_hw + x * s_cw + x * s_hc) / 3`, in the accumulation
    dtype of x, summed in that order.

    The gates are one-plane maps, each broadcast along the axis its pooling reduced: s_hw
    (N, 1, H, W), s_cw (N, 1, C, W), s_hc (N, 1, H, C); they are cast to the accumulation dtype
    of x. y has x's dtype and memory format.
    """
    check.feature_map("triplet_apply", "x", x)
    acc = accumulate_dtype(x.dtype)
    s_hw, s_cw, s_hc = (s.to(acc).contiguous() for s in (s_hw, s_cw, s_hc))
    check_triplet_apply(x, s_hw, s_cw, s_hc)
    return _ops(x.device).triplet_apply(x, s_hw, s_cw, s_hc)


# ----------------------------------------------------------------------------------------
# Argument checks of the ops (the reference backend and the fakes use them; the C++ ops check
# the same rules in csrc/include/attnkernels/triplet.h, in the same words)
# ----------------------------------------------------------------------------------------
def plane_shape(x: torch.Tensor, gate: str, k: int) -> tuple[int, int, int, int]:
    """The shape of gate `gate`'s k-plane map for x: (N, k, rows, columns) of its plane."""
    rows, cols = GATES[gate]
    return (x.shape[0], k, x.shape[rows], x.shape[cols])


_PLANE_NAMES = {"hw": "H, W", "cw": "C, W", "hc": "H, C"}


def _plane_map(op: str, name: str, t, x: torch.Tensor, gate: str, k: int) -> None:
    """t is gate `gate`'s (N, k, rows, columns) map of x in acc(x), on x's device."""
    check.tensor(op, name, t)
    want = plane_shape(x, gate, k)
    if tuple(t.shape) != want:
        raise ValueError(f"{op}: {name} must have shape (N, {k}, {_PLANE_NAMES[gate]}) = "
                         f"({', '.join(map(str, want))}), got {list(t.shape)}")
    check.in_accumulation_dtype(op, name, t, x)


def check_triplet_pool(x, op: str = "triplet_pool") -> None:
    """x (N, C, H, W) in a feature dtype."""
    check.feature_map(op, "x", x)


def check_triplet_apply(x, s_hw, s_cw, s_hc, op: str = "triplet_apply") -> None:
    """x (N, C, H, W); the gates s_hw (N, 1, H, W), s_cw (N, 1, C, W), s_hc (N, 1, H, C) in acc(x)."""
    check.feature_map(op, "x", x)
    for gate, s in zip(GATES, (s_hw, s_cw, s_hc)):
        _plane_map(op, f"s_{gate}", s, x, gate, 1)


def check_triplet_pool_backward(grad_d_hw, grad_d_cw, grad_d_hc, x, d_hw, d_cw, d_hc,
                                op: str = "triplet_pool_backward") -> None:
    """x (N, C, H, W); the maps d_* and their gradients grad_d_* as triplet_pool returns them."""
    check.feature_map(op, "x", x)
    for gate, g, d in zip(GATES, (grad_d_hw, grad_d_cw, grad_d_hc), (d_hw, d_cw, d_hc)):
        _plane_map(op, f"grad_d_{gate}", g, x, gate, 2)
        _plane_map(op, f"d_{gate}", d, x, gate, 2)


def check_triplet_apply_backward(grad_y, x, s_hw, s_cw, s_hc, op: str = "triplet_apply_backward") -> None:
    """triplet_apply's arguments, and grad_y shaped like x in its dtype."""
    check_triplet_apply(x, s_hw, s_cw, s_hc, op)
    check.like_x(op, "grad_y", grad_y, x)


# ----------------------------------------------------------------------------------------
# The reference backend: the ops' signatures in plain PyTorch. The forward ops are
# differentiable by autograd (what the `reference` backend runs); the backward ops write out
# csrc/triplet_ops.cpp's formulas without autograd, the oracle of the kernels' backward.
# ----------------------------------------------------------------------------------------
def in_plane(t: torch.Tensor, gate: str) -> torch.Tensor:
    """An x-shaped tensor seen with gate `gate`'s pooled axis at dim 1 and its plane at dims
    2, 3 (the reference module's permutes): pooling over dim 1 gives the gate's map."""
    return {"hw": t, "cw": t.permute(0, 2, 1, 3), "hc": t.permute(0, 3, 2, 1)}[gate]


def _broadcast(s: torch.Tensor, gate: str) -> torch.Tensor:
    """Gate `gate`'s one-plane map s broadcast against x (N, C, H, W)."""
    return {"hw": s, "cw": s.permute(0, 2, 1, 3), "hc": s.permute(0, 3, 2, 1)}[gate]


class Reference:
    """triplet's ops in torch ops, as the `reference` backend runs them."""

    @staticmethod
    def triplet_pool(x):
        xa = x.to(accumulate_dtype(x.dtype))
        maps = []
        for gate in GATES:
            t = in_plane(xa, gate)
            maps.append(torch.cat([t.amax(1, keepdim=True), t.sum(1, keepdim=True) / t.shape[1]], dim=1))
        return tuple(m.contiguous() for m in maps)

    @staticmethod
    def triplet_pool_backward(grad_d_hw, grad_d_cw, grad_d_hc, x, d_hw, d_cw, d_hc):
        xa = x.to(d_hw.dtype)
        grad_x = torch.zeros_like(xa)
        for gate, g, d in zip(GATES, (grad_d_hw, grad_d_cw, grad_d_hc), (d_hw, d_cw, d_hc)):
            t = in_plane(xa, gate)
            m = d[:, :1]
            tie = (t == m).to(t.dtype)  # NaN ties nothing
            cnt = tie.sum(1, keepdim=True)  # 0 where the max is NaN: g / 0 is inf or NaN, times 0 NaN
            grad_t = tie * (g[:, :1] / cnt) + g[:, 1:] / t.shape[1]
            grad_x = grad_x + in_plane(grad_t, gate)  # in_plane is its own inverse for every gate
        return grad_x.to(x.dtype).contiguous(memory_format=memory_format_of(x))

    @staticmethod
    def triplet_apply(x, s_hw, s_cw, s_hc):
        xa = x.to(s_hw.dtype)
        y = xa * _broadcast(s_hw, "hw") + xa * _broadcast(s_cw, "cw") + xa * _broadcast(s_hc, "hc")
        return (y / 3).to(x.dtype).contiguous(memory_format=memory_format_of(x))

    @staticmethod
    def triplet_apply_backward(grad_y, x, s_hw, s_cw, s_hc):
        g = grad_y.to(s_hw.dtype) / 3
        grad_x = g * _broadcast(s_hw, "hw") + g * _broadcast(s_cw, "cw") + g * _broadcast(s_hc, "hc")
        gx = g * x.to(s_hw.dtype)
        grad_s = [in_plane(gx, gate).sum(1, keepdim=True).contiguous() for gate in GATES]
        return (grad_x.to(x.dtype).contiguous(memory_format=memory_format_of(x)), *grad_s)


# ----------------------------------------------------------------------------------------
# Fakes and autograd
# ----------------------------------------------------------------------------------------
def _maps(x: torch.Tensor, k: int) -> list[torch.Tensor]:
    acc = accumulate_dtype(x.dtype)
    return [x.new_empty(plane_shape(x, gate, k), dtype=acc) for gate in GATES]


def _fake_pool(x):
    return tuple(_maps(x, 2))


def _fake_pool_backward(grad_d_hw, grad_d_cw, grad_d_hc, x, d_hw, d_cw, d_hc):
    return empty_like_layout(x)


def _fake_apply(x, s_hw, s_cw, s_hc):
    return empty_like_layout(x)


def _fake_apply_backward(grad_y, x, s_hw, s_cw, s_hc):
    return (empty_like_layout(x), *_maps(x, 1))


_FAKES = check.fakes_that_check({
    "triplet_pool": _fake_pool,
    "triplet_pool_backward": _fake_pool_backward,
    "triplet_apply": _fake_apply,
    "triplet_apply_backward": _fake_apply_backward,
}, {
    "triplet_pool": check_triplet_pool,
    "triplet_pool_backward": check_triplet_pool_backward,
    "triplet_apply": check_triplet_apply,
    "triplet_apply_backward": check_triplet_apply_backward,
})


def _register_autograd(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    def setup_pool(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.save_for_backward(inputs[0], *output)  # x, d_hw, d_cw, d_hc

    def backward_pool(ctx: Any, grad_d_hw, grad_d_cw, grad_d_hc):
        if grad_d_hw is None and grad_d_cw is None and grad_d_hc is None:
            return None
        x, d_hw, d_cw, d_hc = ctx.saved_tensors
        # An unused map's gradient arrives as None: its zeros add nothing.
        grads = [torch.zeros_like(d) if g is None else g
                 for g, d in zip((grad_d_hw, grad_d_cw, grad_d_hc), (d_hw, d_cw, d_hc))]
        return ops.triplet_pool_backward(*grads, x, d_hw, d_cw, d_hc)

    def setup_apply(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)  # x, s_hw, s_cw, s_hc

    def backward_apply(ctx: Any, grad_y: torch.Tensor):
        x, s_hw, s_cw, s_hc = ctx.saved_tensors
        return ops.triplet_apply_backward(grad_y, x, s_hw, s_cw, s_hc)

    torch.library.register_autograd(f"{namespace}::triplet_pool", backward_pool, setup_context=setup_pool)
    torch.library.register_autograd(f"{namespace}::triplet_apply", backward_apply, setup_context=setup_apply)


REGISTRATION = Registration(_FAKES, _register_autograd)
