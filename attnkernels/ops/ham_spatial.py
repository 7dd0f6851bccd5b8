"""ham_spatial hot path: HAM's spatial half, given the channel gate Ac.

    d1, d2, mask = ham_spatial_pool(x, gate, c_im)       # one read of x: top-k mask, dual pooling
    z            = ham_spatial_conv(cat[d1, d2], weight)  # the shared 7x7 conv on the small maps
    s1, s2       = sigmoid(relu(bn(z[:N]))), sigmoid(relu(bn(z[N:])))  (torch, small maps)
    y            = ham_spatial_apply(x, gate, mask, s1, s2)  # one read of x, one write of y
    y            = ham_attention(x, ...)   # C++ CPU, inference: all of HAM per sample, BN folded

The math of every op is in csrc/ham_spatial_ops.cpp with the schemas; kernels in
csrc/cpu/ham_spatial.cpp (+ ham_spatial_conv.cpp), csrc/cuda/ham_spatial.cu and
attnkernels/triton/ham_spatial.py. Saved for backward: x and the small maps (gate, mask: (N, C);
d1, d2, s1, s2: (N, <=2, H, W)); no full-size intermediate. The mask is not differentiable
(docs/contract.md#ham: no gradient through the channel separation).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..backend import select
from ..reference._base import memory_format_of
from ..reference.formulas import accumulate_dtype, important_channel_mask
from . import _checks as check
from ._common import Registration, backend_ops, empty_like_layout
from .channel_gate import GateMode
from .channel_gate import Reference as ChannelGateReference

HOT_PATH = "ham_spatial"

#: The public functions (re-exported by attnkernels.functional).
__all__ = ["ham_spatial_pool", "ham_spatial_apply", "ham_spatial_conv"]


# ----------------------------------------------------------------------------------------
# Public functions (attnkernels.functional)
# ----------------------------------------------------------------------------------------
def _ops(device: torch.device):
    return backend_ops(HOT_PATH, device, Reference)


def ham_spatial_pool(
    x: torch.Tensor, gate: torch.Tensor, c_im: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HAM's channel separation and dual spatial pooling, in one read of x.

    `gate` is Ac (N, C). Returns `d1, d2` (N, 2, H, W) and `mask` (N, C), all in the
    accumulation dtype: mask marks the `c_im` top channels of gate per sample (the contract's
    tie rule), and with `G1 = x*gate*mask`, `G2 = x*gate*(1 - mask)`,
    `d1 = [sum_c G1 / c_im, max_c G1]`, `d2 = [sum_c G2 / max(C - c_im, 1), max_c G2]`
    (each max over all C channels, the zeroed ones included). No gradient flows to mask.
    """
    check.feature_map("ham_spatial_pool", "x", x)
    gate = gate.to(accumulate_dtype(x.dtype))
    check_ham_spatial_pool(x, gate, c_im)
    return _ops(x.device).ham_spatial_pool(x, gate, c_im)


def ham_spatial_apply(
    x: torch.Tensor, gate: torch.Tensor, mask: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor
) -> torch.Tensor:
    """HAM's output `y = G1*s1 + G2*s2` with `G1 = x*gate*mask`, `G2 = x*gate*(1 - mask)`.

    gate and mask are (N, C), s1 and s2 the groups' spatial gates (N, 1, H, W); all are
    cast to the accumulation dtype of x. y has x's dtype and memory format.
    """
    check.feature_map("ham_spatial_apply", "x", x)
    acc = accumulate_dtype(x.dtype)
    gate, mask, s1, s2 = (t.to(acc) for t in (gate, mask, s1, s2))
    s1, s2 = s1.contiguous(), s2.contiguous()
    check_ham_spatial_apply(x, gate, mask, s1, s2)
    return _ops(x.device).ham_spatial_apply(x, gate, mask, s1, s2)


def ham_spatial_conv(d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """HAM's shared spatial conv: `conv2d(d, weight, padding=(k-1)//2)` without bias, for the
    small (N, Cd, H, W) maps d in an accumulation dtype, weight (1, Cd, k, k) cast to d's dtype.

    On the C++ CPU backend a kernel of its own (oneDNN's setup costs more than this
    ~100-multiply-add-per-pixel conv itself); on every other backend torch's conv2d (cuDNN on
    GPUs), as the reference runs it.
    """
    check_ham_spatial_conv(d, weight)
    if select(HOT_PATH, d.device) == "cpu":
        return torch.ops.attnkernels.ham_spatial_conv(d, weight)
    return Reference.ham_spatial_conv(d, weight)


def has_ham_attention(device: torch.device) -> bool:
    """Whether `ham_attention` (HAM's inference forward per sample in one op) runs on `device`
    now: on the C++ CPU backend only."""
    return select(HOT_PATH, device) == "cpu"


def ham_attention(
    x: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    c_im: int,
    spatial_weight: torch.Tensor,
    bn_scale: torch.Tensor,
    bn_shift: torch.Tensor,
) -> torch.Tensor:
    """HAM's whole forward in inference, one sample at a time while x[n] stays in cache (C++ CPU
    backend only: see `has_ham_attention`): channel_pool, channel_gate (mix), ham_spatial_pool,
    `S_g = sigmoid(relu(bn_scale * ham_spatial_conv(d_g, spatial_weight) + bn_shift))` with the
    eval-mode BatchNorm folded to (bn_scale, bn_shift), and ham_spatial_apply. Not differentiable.
    """
    check_ham_attention(x, weight, alpha, beta, c_im, spatial_weight, bn_scale, bn_shift)
    if not has_ham_attention(x.device):
        raise RuntimeError(f"ham_attention runs on the C++ CPU backend only, not on {select(HOT_PATH, x.device)}")
    return torch.ops.attnkernels.ham_attention(x, weight, alpha, beta, c_im, spatial_weight, bn_scale, bn_shift)


# ----------------------------------------------------------------------------------------
# Argument checks of the ops (the reference backend and the Triton ops share them; the C++
# ops check the same rules in csrc/include/attnkernels/ham_spatial.h, in the same words)
# ----------------------------------------------------------------------------------------
def check_c_im(op: str, c_im, c: int) -> None:
    """HAM's important-channel count C_im, 1 <= c_im <= C (a SymInt under torch.compile's
    dynamic shapes, as the schema's int may be)."""
    if isinstance(c_im, bool) or not isinstance(c_im, (int, torch.SymInt)) or not 1 <= c_im <= c:
        raise ValueError(f"{op}: c_im must be in [1, C] = [1, {c}], got {c_im}")


def check_ham_spatial_pool(x, gate, c_im, op: str = "ham_spatial_pool") -> None:
    check.feature_map(op, "x", x)
    check.per_channel(op, "gate", gate, x)
    check_c_im(op, c_im, x.shape[1])


def check_ham_spatial_apply(x, gate, mask, s1, s2, op: str = "ham_spatial_apply") -> None:
    check.feature_map(op, "x", x)
    check.per_channel(op, "gate", gate, x)
    check.per_channel(op, "mask", mask, x)
    check.pixel_map(op, "s1", s1, x, 1)
    check.pixel_map(op, "s2", s2, x, 1)


def check_ham_spatial_conv(d, weight, op: str = "ham_spatial_conv") -> None:
    """d (N, Cd, H, W) in an accumulation dtype; weight (1, Cd, k, k), k odd, floating, on d's device."""
    check.tensor(op, "d", d)
    if d.dim() != 4:
        raise ValueError(f"{op}: d must be 4-D (N, Cd, H, W), got {d.dim()}-D")
    if d.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: d must be float32 or float64 (an accumulation dtype), got {check.dtype_name(d.dtype)}")
    check.tensor(op, "weight", weight)
    w = weight.shape
    if weight.dim() != 4 or w[0] != 1 or w[1] != d.shape[1] or w[2] != w[3] or w[2] % 2 == 0:
        raise ValueError(f"{op}: weight must have shape (1, Cd, k, k) with Cd = {d.shape[1]} and k odd, got {list(w)}")
    check.device(op, "weight", weight, d.device)


def check_ham_attention(x, weight, alpha, beta, c_im, spatial_weight, bn_scale, bn_shift,
                        op: str = "ham_attention") -> None:
    """x (N, C, H, W); c_im in [1, C]; weight k odd taps; alpha, beta, bn_scale, bn_shift one value
    each; spatial_weight (1, 2, k, k), k odd; every parameter floating, on x's device."""
    check.feature_map(op, "x", x)
    check_c_im(op, c_im, x.shape[1])
    params = {"weight": weight, "alpha": alpha, "beta": beta, "spatial_weight": spatial_weight,
              "bn_scale": bn_scale, "bn_shift": bn_shift}
    for name, t in params.items():
        check.tensor(op, name, t)
    if weight.numel() % 2 == 0:
        raise ValueError(f"{op}: weight must hold an odd number of taps, got {weight.numel()}")
    if any(t.numel() != 1 for t in (alpha, beta, bn_scale, bn_shift)):
        raise ValueError(f"{op}: alpha, beta, bn_scale and bn_shift must hold one value each")
    sw = spatial_weight.shape
    if spatial_weight.dim() != 4 or sw[0] != 1 or sw[1] != 2 or sw[2] != sw[3] or sw[2] % 2 == 0:
        raise ValueError(f"{op}: spatial_weight must have shape (1, 2, k, k) with k odd, got {list(sw)}")
    for name, t in params.items():
        check.device(op, name, t, x.device)


# ----------------------------------------------------------------------------------------
# Argument checks of the backward ops (worded as csrc/cpu/ham_spatial.cpp's; the Triton ops
# use them)
# ----------------------------------------------------------------------------------------
def check_ham_spatial_pool_backward(grad_d1, grad_d2, x, gate, mask, d1, d2, c_im,
                                    op: str = "ham_spatial_pool_backward") -> None:
    """x (N, C, H, W); gate, mask (N, C) and grad_d1, grad_d2, d1, d2 (N, 2, H, W) maps of x; c_im in [1, C]."""
    check.feature_map(op, "x", x)
    check.per_channel(op, "gate", gate, x)
    check.per_channel(op, "mask", mask, x)
    for name, t in (("grad_d1", grad_d1), ("grad_d2", grad_d2), ("d1", d1), ("d2", d2)):
        check.pixel_map(op, name, t, x, 2)
    check_c_im(op, c_im, x.shape[1])


def check_ham_spatial_apply_backward(grad_y, x, gate, mask, s1, s2, op: str = "ham_spatial_apply_backward") -> None:
    """ham_spatial_apply's arguments, and grad_y shaped like x in its dtype."""
    check_ham_spatial_apply(x, gate, mask, s1, s2, op)
    check.like_x(op, "grad_y", grad_y, x)


def check_ham_spatial_conv_backward(grad_z, d, weight, op: str = "ham_spatial_conv_backward") -> None:
    """ham_spatial_conv's arguments, and grad_z (N, 1, H, W) in d's dtype, on d's device."""
    check_ham_spatial_conv(d, weight, op)
    check.tensor(op, "grad_z", grad_z)
    n, _, h, w = d.shape
    if tuple(grad_z.shape) != (n, 1, h, w) or grad_z.dtype != d.dtype:
        raise ValueError(f"{op}: grad_z must have shape (N, 1, H, W) = ({n}, 1, {h}, {w}) and dtype "
                         f"{check.dtype_name(d.dtype)}, got {list(grad_z.shape)} {check.dtype_name(grad_z.dtype)}")
    check.device(op, "grad_z", grad_z, d.device)


# ----------------------------------------------------------------------------------------
# The reference backend: the ops' signatures in plain PyTorch (differentiable by autograd)
# ----------------------------------------------------------------------------------------
class Reference:
    """ham_spatial's ops in torch ops, as the `reference` backend runs them."""

    @staticmethod
    def ham_spatial_pool(x, gate, c_im):
        c = x.shape[1]
        mask = important_channel_mask(gate.detach(), c_im).to(gate.dtype)
        f1 = x.to(gate.dtype) * gate[:, :, None, None]
        m = mask[:, :, None, None]
        g1, g2 = f1 * m, f1 * (1 - m)
        d1 = torch.cat([g1.sum(1, keepdim=True) / c_im, g1.amax(1, keepdim=True)], dim=1)
        d2 = torch.cat([g2.sum(1, keepdim=True) / max(c - c_im, 1), g2.amax(1, keepdim=True)], dim=1)
        return d1, d2, mask

    @staticmethod
    def ham_spatial_apply(x, gate, mask, s1, s2):
        f1 = x.to(gate.dtype) * gate[:, :, None, None]
        m = mask[:, :, None, None]
        y = (f1 * m * s1 + f1 * (1 - m) * s2).to(x.dtype)
        return y.contiguous(memory_format=memory_format_of(x))

    @staticmethod
    def ham_spatial_conv(d, weight):
        return F.conv2d(d, weight.to(d.dtype), padding=(weight.shape[-1] - 1) // 2)

    @staticmethod
    def ham_attention(x, weight, alpha, beta, c_im, spatial_weight, bn_scale, bn_shift):
        """ham_attention's steps in turn (no kernel runs it on this backend: it serves as the
        op's decomposition, for `attnkernels.export.decompositions`)."""
        avg, max_ = ChannelGateReference.channel_pool(x)
        gate = ChannelGateReference.channel_gate(avg, max_, weight, alpha, beta, GateMode.MIX)
        d1, d2, mask = Reference.ham_spatial_pool(x, gate, c_im)
        scale, shift = (t.reshape(1, -1, 1, 1).to(d1.dtype) for t in (bn_scale, bn_shift))
        z1, z2 = (Reference.ham_spatial_conv(d, spatial_weight) for d in (d1, d2))
        s1, s2 = (torch.sigmoid(F.relu(z * scale + shift)) for z in (z1, z2))
        return Reference.ham_spatial_apply(x, gate, mask, s1, s2)


# ----------------------------------------------------------------------------------------
# Fakes and autograd
# ----------------------------------------------------------------------------------------
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


_FAKES = check.fakes_that_check({
    "ham_spatial_pool": _fake_pool,
    "ham_spatial_pool_backward": _fake_pool_backward,
    "ham_spatial_apply": _fake_apply,
    "ham_spatial_apply_backward": _fake_apply_backward,
    "ham_spatial_conv": _fake_conv,
    "ham_spatial_conv_backward": _fake_conv_backward,
    "ham_attention": _fake_ham_attention,
}, {
    "ham_spatial_pool": check_ham_spatial_pool,
    "ham_spatial_pool_backward": check_ham_spatial_pool_backward,
    "ham_spatial_apply": check_ham_spatial_apply,
    "ham_spatial_apply_backward": check_ham_spatial_apply_backward,
    "ham_spatial_conv": check_ham_spatial_conv,
    "ham_spatial_conv_backward": check_ham_spatial_conv_backward,
    "ham_attention": check_ham_attention,
})


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


REGISTRATION = Registration(_FAKES, _register_autograd)
