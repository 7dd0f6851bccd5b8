"""block_tail hot path: a residual block's tail `relu(bn(z) * gate + shortcut)` in four passes.

    mean, m2 = block_tail_stats(z)                        # one read of z: BatchNorm's statistics
                                                          # and the gate's pooled mean, together
    gate = gate_fn(scale * mean + shift)                  # torch, (N, C): any channel gate (SE, ECA)
    out = block_tail_apply(z, shortcut, scale * gate,     # one read of z and shortcut, one write
                           shift * gate, 1, relu=True)
  backward:
    grad_u, s1, s2 = block_tail_backward_reduce(grad_out, out, z)   # grad_u is grad_shortcut
    grad_z = block_tail_apply(grad_u, z, a', b', c', relu=False)    # BatchNorm's, the gate's and
                                                                    # the pooling's gradients at once

BatchNorm is affine per channel, `bn(z) = scale * z + shift`, so the mean of bn(z) over a plane
is `scale * mean[n, c] + shift`: the gate's input comes from the pass that gathers BatchNorm's
batch statistics. Eager runs BN's statistics, BN, the pooling, the rescale, the add and the
ReLU as six passes forward, and about as many backward. The math of the ops is in
csrc/block_tail_ops.cpp with the schemas; kernels in csrc/cpu/block_tail.cpp,
csrc/cuda/block_tail.cu and attnkernels/triton/block_tail.py. This module holds the public
function `block_tail`, the ops' checks, the `Reference` backend, the fakes and the autograd.

The autograd is two torch.autograd.Functions around the gate, which stays ordinary autograd
code (any module): `_TailStats` (statistics; its backward writes grad_z) and `_TailApply` (the
apply; its backward runs the reduce pass). The gate's gradient is only known after the reduce
pass, and grad_z needs it, so `_TailApply.backward` hands `_TailStats.backward` what it needs
through the gradients of two outputs of `_TailStats` that only `_TailApply` reads: the grad of
`z_link` (a view of z) carries grad_u, the grad of `link` ((N, C, 3), zeros forward) carries
gate * s1, gate * s2 and gate. Autograd runs `_TailApply.backward` first, the gate's backward
next, `_TailStats.backward` last. Saved for backward: z and out, as eager saves them, and
(N, C) and (C,) maps; no other x-sized tensor.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..reference._base import memory_format_of
from ..reference.formulas import accumulate_dtype
from . import _checks as check
from ._common import Registration, as_layout, backend_ops, empty_like_layout, fold_batch_norm

HOT_PATH = "block_tail"

#: The public functions (re-exported by attnkernels.functional).
__all__ = ["block_tail"]

#: `gate(avg)`: (N, C) mean of bn(z) over H*W, in acc(z) -> the (N, C) (or (N, C, 1, 1)) gate.
Gate = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------
# Public functions (attnkernels.functional)
# ----------------------------------------------------------------------------------------
def block_tail_ops(device: torch.device):
    """The block_tail ops that run on `device` now: the chosen backend's namespace, or the
    Reference class (the same names and signatures)."""
    return backend_ops(HOT_PATH, device, Reference)


def block_tail(
    z: torch.Tensor,
    shortcut: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    gate: Gate | None = None,
) -> torch.Tensor:
    """`relu(batch_norm(z) * gate(avg) + shortcut)`, the tail of a residual block, fused.

    BatchNorm's arguments are `torch.nn.functional.batch_norm`'s: with `training` it normalises
    with the batch's statistics and, where running_mean and running_var are given, updates them
    in place as F.batch_norm does (`momentum` weighs the new value; the variance is unbiased);
    otherwise it uses the running statistics. `gate`, if given, is any differentiable function
    (an SE or ECA module's MLP or 1-D conv with its sigmoid) of `avg`, the (N, C) mean of
    bn(z) over H*W in the accumulation dtype, returning an (N, C) or (N, C, 1, 1) gate; without
    it the tail is `relu(batch_norm(z) + shortcut)`. Computed in the accumulation dtype and
    rounded once; the result has z's dtype and layout. Differentiable in z, shortcut, weight,
    bias and the gate's parameters. z is (N, C, H, W) in a feature dtype; shortcut has z's
    shape and dtype.
    """
    op = "block_tail"
    check_block_tail(op, z, shortcut, running_mean, running_var, weight, bias, training)
    ops = block_tail_ops(z.device)
    z_link, link, avg, scale, shift = _TailStats.apply(
        z, weight, bias, running_mean, running_var, training, momentum, eps, gate is not None, ops)
    g = None if gate is None else per_channel_values(op, "gate", gate(avg), z)
    return _TailApply.apply(z_link, link, shortcut, g, scale, shift, ops)


def per_channel_values(op: str, name: str, g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Gate function `name`'s output as an (N, C) map in acc(z)."""
    n, c = z.shape[:2]
    if not isinstance(g, torch.Tensor) or g.numel() != n * c or tuple(g.shape[:2]) != (n, c):
        shape = list(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
        raise ValueError(f"{op}: {name} must return an (N, C) = ({n}, {c}) or (N, C, 1, 1) tensor, got {shape}")
    return g.reshape(n, c).to(accumulate_dtype(z.dtype))


# ----------------------------------------------------------------------------------------
# Argument checks of the ops (the reference backend, the fakes and the Triton ops use them;
# the C++ ops check the same rules in csrc/include/attnkernels/block_tail.h, in the same words)
# ----------------------------------------------------------------------------------------
def check_block_tail(op, z, shortcut, running_mean, running_var, weight, bias, training) -> None:
    """The public function's arguments: z a feature map, shortcut like it, BatchNorm's (C,)
    tensors on z's device; running statistics required in eval."""
    check.feature_map(op, "z", z)
    check.like_x(op, "shortcut", shortcut, z)
    channels = z.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None:
            check.vector(op, name, t, channels, z.device, "C")
    if not training and (running_mean is None or running_var is None):
        raise ValueError(f"{op}: running_mean and running_var are needed when training is False")
    if training and z.numel() // max(channels, 1) <= 1 and z.numel() > 0:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, got z of shape {list(z.shape)}")


def check_block_tail_stats(z, op: str = "block_tail_stats") -> None:
    """z (N, C, H, W) in a feature dtype."""
    check.feature_map(op, "z", z)


def check_block_tail_apply(x, y, a, b, c, relu, op: str = "block_tail_apply") -> None:
    """x a feature map; y shaped like x in its dtype; a, b, c (N, C) in acc(x); on x's device."""
    check.feature_map(op, "x", x)
    check.like_x(op, "y", y, x)
    for name, t in (("a", a), ("b", b), ("c", c)):
        check.per_channel(op, name, t, x)


def check_block_tail_backward_reduce(grad_out, out, z, op: str = "block_tail_backward_reduce") -> None:
    """z a feature map; grad_out and out shaped like z in its dtype, on z's device."""
    check.feature_map(op, "z", z)
    check.like_x(op, "grad_out", grad_out, z)
    check.like_x(op, "out", out, z)


# ----------------------------------------------------------------------------------------
# The reference backend: the ops' signatures in plain PyTorch (csrc/block_tail_ops.cpp's
# formulas), what the `reference` backend runs under the same autograd Functions.
# ----------------------------------------------------------------------------------------
def _per_pixel(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, None, None]


class Reference:
    """block_tail's ops in torch ops, as the `reference` backend runs them."""

    @staticmethod
    def block_tail_stats(z):
        zf = z.to(accumulate_dtype(z.dtype))
        mean = zf.mean((2, 3))
        m2 = (zf - _per_pixel(mean)).square().sum((2, 3))
        return mean, m2

    @staticmethod
    def block_tail_apply(x, y, a, b, c, relu):
        acc = a.dtype
        out = _per_pixel(a) * x.to(acc) + _per_pixel(b) + _per_pixel(c) * y.to(acc)
        if relu:
            out = torch.relu(out)
        return as_layout(out, memory_format_of(x), x.dtype)  # never a no-op .to: see as_layout

    @staticmethod
    def block_tail_backward_reduce(grad_out, out, z):
        grad_u = torch.where(out <= 0, torch.zeros_like(grad_out), grad_out)
        grad_u = grad_u.contiguous(memory_format=memory_format_of(z))
        acc = accumulate_dtype(z.dtype)
        g = grad_u.to(acc)
        return grad_u, g.sum((2, 3)), (g * z.to(acc)).sum((2, 3))


# ----------------------------------------------------------------------------------------
# Autograd: two Functions around the gate (see the module docstring)
# ----------------------------------------------------------------------------------------
class _TailStats(torch.autograd.Function):
    """z -> (z_link, link, avg, scale, shift): BatchNorm's statistics and folded affine, the
    mean of bn(z) per (n, c) (`pooled`), and the two links `_TailApply` reads."""

    @staticmethod
    def forward(ctx: Any, z, weight, bias, running_mean, running_var, training, momentum, eps, pooled, ops):
        n, c, h, w = z.shape
        acc = accumulate_dtype(z.dtype)
        mean_nc = m2_nc = None
        if training or pooled:
            mean_nc, m2_nc = ops.block_tail_stats(z)
        mean, var = batch_norm_statistics(z, mean_nc, m2_nc, running_mean, running_var, training, momentum)
        scale, shift, rstd = fold_batch_norm(mean, var, weight, bias, eps)
        avg = scale * mean_nc + shift if pooled else z.new_zeros((n, c), dtype=acc)
        ctx.save_for_backward(z, weight, mean, rstd, mean_nc if pooled else None)
        ctx.training, ctx.pooled = training, pooled
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.ops = ops
        ctx.mark_non_differentiable(scale, shift)
        return z.view_as(z), z.new_zeros((n, c, 3), dtype=acc), avg, scale, shift

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_u, grad_link, grad_avg, _grad_scale, _grad_shift):
        z, weight, mean, rstd, mean_nc = ctx.saved_tensors
        n, c, h, w = z.shape
        pixels, count = h * w, n * h * w
        if grad_u is None or grad_link is None:  # the tail's output was not used
            return (None,) * 10
        gs1, gs2, gate = grad_link.unbind(-1)  # gate * s1, gate * s2, gate
        ga = torch.zeros_like(gs1) if grad_avg is None or not ctx.pooled else grad_avg
        # With g = dL/d bn(z) = gate * grad_u + ga / P and zhat = (z - mean) * rstd:
        # G1 = sum_{n,p} g,  G2 = sum_{n,p} g * zhat, from the reduce pass's s1, s2 alone.
        g1 = (gs1 + ga).sum(0)
        g2 = rstd * (gs2 - mean * gs1).sum(0)
        if ctx.pooled:
            g2 = g2 + rstd * (ga * (mean_nc - mean)).sum(0)
        wr = rstd if weight is None else rstd * weight.to(rstd.dtype)
        a = wr * gate
        if ctx.training:
            # BatchNorm's training backward: wr * (g - G1 / count - zhat * G2 / count).
            k = wr * rstd * g2 / count
            b = wr * (ga / max(pixels, 1) - g1 / count) + k * mean
            cz = (-k).expand(n, c).contiguous()
        else:
            b = wr * ga / max(pixels, 1)
            cz = torch.zeros_like(a)
        grad_z = ctx.ops.block_tail_apply(grad_u, z, a.contiguous(), b.contiguous(), cz, False)
        grad_weight = g2.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = g1.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_z, grad_weight, grad_bias, None, None, None, None, None, None, None


def batch_norm_statistics(z, mean_nc, m2_nc, running_mean, running_var, training, momentum):
    """BatchNorm's (mean, var) (C,) in acc(z): in training the batch's, from the planes' (mean,
    m2) by Chan's combination (exact, no sum-of-squares cancellation), updating the running
    statistics where given; otherwise the running statistics."""
    acc = accumulate_dtype(z.dtype)
    if not training:
        return running_mean.to(acc), running_var.to(acc)
    n, c, h, w = z.shape
    count = n * h * w
    mean = mean_nc.mean(0) if n else z.new_full((c,), float("nan"), dtype=acc)
    m2 = m2_nc.sum(0) + h * w * (mean_nc - mean).square().sum(0)
    if running_mean is not None and running_var is not None:
        update_running_stats(running_mean, running_var, mean, m2, count, momentum)
    return mean, m2 / count


def update_running_stats(running_mean, running_var, mean, m2, count, momentum) -> None:
    """F.batch_norm's update: r = (1 - momentum) * r + momentum * batch (unbiased variance)."""
    with torch.no_grad():
        unbiased = m2 / (count - 1) if count > 1 else torch.full_like(m2, float("nan"))
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


class _TailApply(torch.autograd.Function):
    """(z_link, link, shortcut, gate, scale, shift) -> relu((scale * z + shift) * gate + shortcut)."""

    @staticmethod
    def forward(ctx: Any, z_link, link, shortcut, gate, scale, shift, ops):
        n, c = z_link.shape[:2]
        ones = torch.ones((n, c), dtype=scale.dtype, device=scale.device)
        g = ones if gate is None else gate
        a, b = (scale * g).contiguous(), (shift * g).contiguous()
        out = ops.block_tail_apply(z_link, shortcut, a, b, ones, True)
        ctx.save_for_backward(out, z_link, gate, scale, shift)
        ctx.ops = ops
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out):
        out, z, gate, scale, shift = ctx.saved_tensors
        grad_u, s1, s2 = ctx.ops.block_tail_backward_reduce(grad_out, out, z)
        g = torch.ones_like(s1) if gate is None else gate
        grad_gate = None if gate is None else scale * s2 + shift * s1  # sum_p grad_u * bn(z)
        link = torch.stack((g * s1, g * s2, g), -1)
        return grad_u, link, grad_u, grad_gate, None, None, None


# ----------------------------------------------------------------------------------------
# Fakes
# ----------------------------------------------------------------------------------------
def _per_channel_like(z: torch.Tensor) -> torch.Tensor:
    return z.new_empty(z.shape[:2], dtype=accumulate_dtype(z.dtype))


def _fake_stats(z):
    return _per_channel_like(z), _per_channel_like(z)


def _fake_apply(x, y, a, b, c, relu):
    return empty_like_layout(x)


def _fake_backward_reduce(grad_out, out, z):
    return empty_like_layout(z), _per_channel_like(z), _per_channel_like(z)


_FAKES = check.fakes_that_check(
    {"block_tail_stats": _fake_stats, "block_tail_apply": _fake_apply,
     "block_tail_backward_reduce": _fake_backward_reduce},
    {"block_tail_stats": check_block_tail_stats, "block_tail_apply": check_block_tail_apply,
     "block_tail_backward_reduce": check_block_tail_backward_reduce},
)


def _register_autograd(namespace: str) -> None:
    """Nothing per op: the passes are differentiated together by `_TailStats` and `_TailApply`."""


REGISTRATION = Registration(_FAKES, _register_autograd)
