"""spatial_tail hot path: a residual block's tail with CBAM's or HAM's attention, in six passes.

    mean, m2, zmax, zmin, nmax, nmin = spatial_tail_stats(z)     # one read of z: BatchNorm's
                                                                 # statistics, the gate's pooling
    gate = channel_gate(avg, max)        # torch, (N, C): CBAM's MLP, HAM's 1-D conv on the mix
    a, b = gate * scale, gate * shift    # x1 = bn(z) * gate = a * z + b
    d = spatial_tail_pool(z, a, b, mask)          # one read of z: per pixel and channel group,
                                                  # sum, max and its ties of x1
    s = spatial_gate(mean_c, max_c)      # torch, (N, G, H, W): the 7x7 conv, BN, sigmoid
    out = spatial_tail_apply(z, shortcut, a, b, s, mask)   # relu(s_g * x1 + shortcut)
  backward:
    grad_u, grad_s, s1, s2 = spatial_tail_backward_reduce(grad_out, out, z, a, b, s, mask)
    t1, t2 = spatial_tail_pool_backward(z, a, b, mask, dmax, gsum, gmax)     # after the spatial
                                                                            # gate's backward
    grad_z = spatial_tail_backward_apply(grad_u, z, a, b, mask, s, dmax, gsum, gmax, beta, gamma,
                                         zmax, kmax, zmin, kmin)

BatchNorm is affine per channel, `bn(z) = scale * z + shift`: the mean of bn(z) over a plane is
`scale * mean + shift` and its maximum `scale * zmax + shift` (`scale * zmin + shift` where
scale < 0), so the channel gate's inputs come from the pass that gathers BatchNorm's batch
statistics. CBAM has one channel group; HAM two, its `important` top channels of the gate and
the rest, each with its own spatial gate. Eager runs BN's statistics, BN, both poolings, both
rescales, the add and the ReLU as nine passes forward, and more backward. The math of the ops
is in csrc/spatial_tail_ops.cpp with the schemas; kernels in csrc/cpu/spatial_tail.cpp,
csrc/cuda/spatial_tail.cu and attnkernels/triton/spatial_tail.py. This module holds the public
function `spatial_tail`, the ops' checks, the `Reference` backend, the fakes and the autograd.

The autograd is three torch.autograd.Functions around the gates, which stay ordinary autograd
code: `_Stats` (statistics; its backward writes grad_z), `_Pool` (the pooling; its backward
sums the pooling's gradient per plane) and `_Apply` (its backward runs the reduce pass). grad_z
needs every other gradient, so it is written last, in one pass: `_Apply` and `_Pool` hand
`_Stats.backward` what it needs through the gradients of outputs of `_Stats` only they read
(`block_tail`'s scheme): `z_link` (a view of z) carries grad_u, `link` (N, C, 3) carries a, b
and the mask, `plink` (N, G, 4, H, W) carries s and the pooling's maps. The gradients of a and
b themselves (per-plane sums: `x1 = a * z + b` is affine in them) flow as ordinary autograd
into the gates and BatchNorm's scale and shift, whose gradients `_Stats.backward` turns into
BatchNorm's. Saved for backward: z and out, as eager saves them, and small maps.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..reference._base import memory_format_of
from ..reference.formulas import accumulate_dtype
from . import _checks as check
from ._common import Registration, as_layout, backend_ops, empty_like_layout, fold_batch_norm
from .block_tail import batch_norm_statistics, check_block_tail, per_channel_values

HOT_PATH = "spatial_tail"

#: The public functions (re-exported by attnkernels.functional).
__all__ = ["spatial_tail", "top_channels"]

#: `channel_gate(avg, max)`: the (N, C) mean and max of bn(z) over H*W, in acc(z) -> the gate.
ChannelGate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: `spatial_gate(d)`: d (N, 2G, H, W) in acc(z), per group its mean and max over the group's
#: channels of x1 -> s (N, G, H, W), the group's spatial gate.
SpatialGate = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------
# Public functions (attnkernels.functional)
# ----------------------------------------------------------------------------------------
def spatial_tail_ops(device: torch.device):
    """The spatial_tail ops that run on `device` now: the chosen backend's namespace, or the
    Reference class (the same names and signatures)."""
    return backend_ops(HOT_PATH, device, Reference)


def spatial_tail(
    z: torch.Tensor,
    shortcut: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    channel_gate: ChannelGate,
    spatial_gate: SpatialGate,
    important: int | None = None,
) -> torch.Tensor:
    """`relu(x1 * s + shortcut)`, `x1 = batch_norm(z) * channel_gate(avg, max)`, fused: the tail
    of a residual block whose attention gates channels, then pixels (CBAM, HAM).

    BatchNorm's arguments are `torch.nn.functional.batch_norm`'s (as `block_tail`'s).
    `channel_gate(avg, max)` is any differentiable function of the (N, C) mean and max of
    bn(z) over H*W (in the accumulation dtype) returning the (N, C) (or (N, C, 1, 1)) gate.
    Without `important` the channels form one group (CBAM); with it two (HAM): the `important`
    channels with the largest gate per sample (ties to the lower index) and the rest, and the
    group maps are HAM's, whose maxima include the other group's zeroed channels.
    `spatial_gate(d)` gets d (N, 2G, H, W): per group, the mean over its channels of x1 and the
    maximum, and returns s (N, G, H, W) (or (N, 1, H, W) per group, concatenated). Computed in
    the accumulation dtype and rounded once; the result has z's dtype and layout.
    Differentiable in z, shortcut, weight, bias and the gates' parameters.
    """
    op = "spatial_tail"
    check_block_tail(op, z, shortcut, running_mean, running_var, weight, bias, training)
    channels = z.shape[1]
    if important is not None and not (isinstance(important, int) and 1 <= important <= channels):
        raise ValueError(f"{op}: important must be an int in [1, C] = [1, {channels}], got {important!r}")
    groups = 1 if important is None else 2
    ops = spatial_tail_ops(z.device)
    z_link, link, plink, avg, max_, scale, shift = _Stats.apply(
        z, weight, bias, running_mean, running_var, training, momentum, eps, groups, ops)
    gate = per_channel_values(op, "channel_gate", channel_gate(avg, max_), z)
    mask = None if important is None else top_channels(gate.detach(), important)
    a, b = gate * scale, gate * shift
    # Channels outside each group: HAM's group maxima include them as zeros.
    others = (0,) if important is None else (channels - important, important)
    dsum, dmax = _Pool.apply(z_link, a, b, plink, mask, others, ops)
    # Per group its channel mean and max (Python counts: no host-to-device copy per call).
    d = torch.stack([m for g, o in enumerate(others) for m in (dsum[:, g] / max(channels - o, 1), dmax[:, g])], 1)
    s = spatial_gate(d)
    n, _, h, w = z.shape
    if not isinstance(s, torch.Tensor) or s.numel() != n * groups * h * w:
        got = list(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise ValueError(f"{op}: spatial_gate must return an (N, G, H, W) = ({n}, {groups}, {h}, {w}) tensor, got {got}")
    s = s.reshape(n, groups, h, w).to(dsum.dtype)
    return _Apply.apply(z_link, link, plink, shortcut, a, b, s, mask, ops)


def top_channels(gate: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean (N, C) mask of the `k` channels with the largest `gate` per sample, ties to the
    lower channel index: the contract's top-k rank rule (docs/contract.md), which
    `attnkernels.reference.formulas.important_channel_mask` computes literally, in a stable
    sort instead of C * C comparisons."""
    order = torch.sort(gate, dim=1, descending=True, stable=True).indices
    return torch.zeros_like(gate, dtype=torch.bool).scatter_(1, order[:, :k], True)


# ----------------------------------------------------------------------------------------
# Argument checks of the ops (the reference backend, the fakes and the Triton ops use them;
# the C++ ops check the same rules in csrc/include/attnkernels/spatial_tail.h, in the same words)
# ----------------------------------------------------------------------------------------
def _check_mask(op: str, mask, z: torch.Tensor) -> int:
    """None (one group) or an (N, C) bool mask on z's device (two groups); returns G."""
    if mask is None:
        return 1
    if not isinstance(mask, torch.Tensor):  # not check.tensor: that one requires a floating dtype
        raise TypeError(f"{op}: mask must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(z.shape[:2]):
        raise ValueError(f"{op}: mask must have shape (N, C) = ({z.shape[0]}, {z.shape[1]}), got {list(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be bool, got {check.dtype_name(mask.dtype)}")
    check.device(op, "mask", mask, z.device)
    return 2


def _check_x1(op: str, z, a, b, mask) -> int:
    check.feature_map(op, "z", z)
    check.per_channel(op, "a", a, z)
    check.per_channel(op, "b", b, z)
    return _check_mask(op, mask, z)


def check_spatial_tail_stats(z, op: str = "spatial_tail_stats") -> None:
    """z (N, C, H, W) in a feature dtype."""
    check.feature_map(op, "z", z)


def check_spatial_tail_pool(z, a, b, mask, op: str = "spatial_tail_pool") -> None:
    """z a feature map; a, b (N, C) in acc(z); mask None or (N, C) bool; on z's device."""
    _check_x1(op, z, a, b, mask)


def check_spatial_tail_apply(z, shortcut, a, b, s, mask, op: str = "spatial_tail_apply") -> None:
    """The pool's arguments; shortcut like z; s (N, G, H, W) in acc(z)."""
    groups = _check_x1(op, z, a, b, mask)
    check.like_x(op, "shortcut", shortcut, z)
    check.pixel_map(op, "s", s, z, groups)


def check_spatial_tail_backward_reduce(grad_out, out, z, a, b, s, mask, op: str = "spatial_tail_backward_reduce") -> None:
    """The pool's arguments; grad_out and out like z; s (N, G, H, W) in acc(z)."""
    groups = _check_x1(op, z, a, b, mask)
    check.like_x(op, "grad_out", grad_out, z)
    check.like_x(op, "out", out, z)
    check.pixel_map(op, "s", s, z, groups)


def check_spatial_tail_pool_backward(z, a, b, mask, dmax, gsum, gmax, op: str = "spatial_tail_pool_backward") -> int:
    """The pool's arguments; dmax, gsum, gmax (N, G, H, W) in acc(z). Returns G."""
    groups = _check_x1(op, z, a, b, mask)
    for name, t in (("dmax", dmax), ("gsum", gsum), ("gmax", gmax)):
        check.pixel_map(op, name, t, z, groups)
    return groups


def check_spatial_tail_backward_apply(grad_u, z, a, b, mask, s, dmax, gsum, gmax, beta, gamma, zmax, kmax, zmin, kmin,
                                      op: str = "spatial_tail_backward_apply") -> None:
    """pool_backward's arguments; grad_u like z; s (N, G, H, W); the rest (N, C) in acc(z)."""
    groups = check_spatial_tail_pool_backward(z, a, b, mask, dmax, gsum, gmax, op)
    check.like_x(op, "grad_u", grad_u, z)
    check.pixel_map(op, "s", s, z, groups)
    for name, t in (("beta", beta), ("gamma", gamma), ("zmax", zmax), ("kmax", kmax), ("zmin", zmin), ("kmin", kmin)):
        check.per_channel(op, name, t, z)


# ----------------------------------------------------------------------------------------
# The reference backend: the ops' signatures in plain PyTorch (csrc/spatial_tail_ops.cpp's
# formulas), what the `reference` backend runs under the same autograd Functions.
# ----------------------------------------------------------------------------------------
def _per_pixel(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, None, None]


def _x1(z: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fma(a, z, b) in acc, as near as torch gets: the product and sum in float64, so for
    float32 acc the product is exact and the sum rounds twice (float64, then float32), almost
    always as one fma; for float64 acc both round (torch has no fma), a unit apart from the
    kernels' x1 now and then. The reference's backward ops find the reference's own pool
    maxima again; a test must not mix one backend's dmax with another's backward."""
    wide = torch.float64
    return (_per_pixel(a).to(wide) * z.to(wide) + _per_pixel(b).to(wide)).to(a.dtype)


def _member(mask: torch.Tensor | None, z: torch.Tensor, g: int) -> torch.Tensor:
    """(N, C, 1, 1) bool: channel c is in group g."""
    if mask is None:
        return torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)[:, :, None, None]
    return _per_pixel(mask if g == 0 else ~mask)


def _of_group(maps: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """maps (N, G, H, W) -> (N, C, H, W): each channel's group's map."""
    if mask is None:
        return maps[:, :1]
    return torch.where(_per_pixel(mask), maps[:, :1], maps[:, 1:2])


class Reference:
    """spatial_tail's ops in torch ops, as the `reference` backend runs them."""

    @staticmethod
    def spatial_tail_stats(z):
        acc = accumulate_dtype(z.dtype)
        n, c, h, w = z.shape
        if h * w == 0:
            full = lambda v: torch.full((n, c), v, dtype=acc, device=z.device)  # noqa: E731
            return full(float("nan")), full(0.0), full(float("-inf")), full(float("inf")), full(0.0), full(0.0)
        zf = z.to(acc)
        mean = zf.mean((2, 3))
        m2 = (zf - _per_pixel(mean)).square().sum((2, 3))
        zmax, zmin = zf.amax((2, 3)), zf.amin((2, 3))
        nmax = (zf == _per_pixel(zmax)).sum((2, 3)).to(acc)
        nmin = (zf == _per_pixel(zmin)).sum((2, 3)).to(acc)
        return mean, m2, zmax, zmin, nmax, nmin

    @staticmethod
    def spatial_tail_pool(z, a, b, mask):
        x1 = _x1(z, a, b)
        n, c, h, w = z.shape
        maps = []
        for g in range(1 if mask is None else 2):
            member = _member(mask, z, g)
            total = torch.where(member, x1, 0).sum(1)
            if c == 0:
                top = torch.full((n, h, w), float("-inf"), dtype=x1.dtype, device=z.device)
            else:
                top = torch.where(member, x1, float("-inf")).amax(1)
            ties = (member & (x1 == top[:, None])).sum(1).to(x1.dtype)
            maps += [total, top, ties]
        return torch.stack(maps, 1)

    @staticmethod
    def spatial_tail_apply(z, shortcut, a, b, s, mask):
        out = torch.relu(_of_group(s, mask) * _x1(z, a, b) + shortcut.to(a.dtype))
        return as_layout(out, memory_format_of(z), z.dtype)  # never a no-op .to: see as_layout

    @staticmethod
    def spatial_tail_backward_reduce(grad_out, out, z, a, b, s, mask):
        grad_u = torch.where(out <= 0, torch.zeros_like(grad_out), grad_out)
        grad_u = grad_u.contiguous(memory_format=memory_format_of(z))
        g = grad_u.to(a.dtype)
        x1 = _x1(z, a, b)
        grad_s = torch.stack([torch.where(_member(mask, z, k), g * x1, 0).sum(1)
                              for k in range(1 if mask is None else 2)], 1)
        gs = g * _of_group(s, mask)
        return grad_u, grad_s, gs.sum((2, 3)), (gs * z.to(a.dtype)).sum((2, 3))

    @staticmethod
    def spatial_tail_pool_backward(z, a, b, mask, dmax, gsum, gmax):
        r = _pool_gradient(z, a, b, mask, dmax, gsum, gmax)
        return r.sum((2, 3)), (r * z.to(a.dtype)).sum((2, 3))

    @staticmethod
    def spatial_tail_backward_apply(grad_u, z, a, b, mask, s, dmax, gsum, gmax, beta, gamma, zmax, kmax, zmin, kmin):
        zf = z.to(a.dtype)
        r = _pool_gradient(z, a, b, mask, dmax, gsum, gmax)
        grad_x1 = grad_u.to(a.dtype) * _of_group(s, mask) + r
        grad_z = (_per_pixel(a) * grad_x1 + _per_pixel(beta) * zf + _per_pixel(gamma)
                  + torch.where(zf == _per_pixel(zmax), _per_pixel(kmax), 0)
                  + torch.where(zf == _per_pixel(zmin), _per_pixel(kmin), 0))
        return grad_z.to(z.dtype).contiguous(memory_format=memory_format_of(z))


def _pool_gradient(z, a, b, mask, dmax, gsum, gmax) -> torch.Tensor:
    """r = gsum_g + (x1 == dmax_g ? gmax_g : 0), (N, C, H, W) in acc."""
    hit = _x1(z, a, b) == _of_group(dmax, mask)
    return _of_group(gsum, mask) + torch.where(hit, _of_group(gmax, mask), 0)


# ----------------------------------------------------------------------------------------
# Autograd: three Functions around the gates (see the module docstring)
#
# No Function's forward may return a tensor that is also one of its intermediates, such as
# the result of a `.contiguous()` or a `.to()` that had nothing to do (they return their
# input itself): torch.compile before torch 2.14 (2.11 measured) makes every intermediate of
# an autograd.Function's forward an extra output of the traced Function, and autograd gives a
# tensor returned twice its gradient at the later place, which the traced backward ignores;
# the real output's gradient arrives as zeros, and grad_z, weight's and bias's come out wrong.
# (torch 2.14 leaves out the intermediates that alias an output.) So the outputs are the
# results of real computations (the ops': new tensors, the Reference backend's too), and a
# layout is fixed by `as_layout` (ops._common), never by a `.contiguous()` that may have
# nothing to do.
# ----------------------------------------------------------------------------------------
class _Stats(torch.autograd.Function):
    """z -> (z_link, link, plink, avg, max, scale, shift): BatchNorm's statistics and folded
    affine, the mean and max of bn(z) per (n, c), and the links `_Pool` and `_Apply` read."""

    @staticmethod
    def forward(ctx: Any, z, weight, bias, running_mean, running_var, training, momentum, eps, groups, ops):
        n, c, h, w = z.shape
        acc = accumulate_dtype(z.dtype)
        mean_nc, m2_nc, zmax, zmin, nmax, nmin = ops.spatial_tail_stats(z)
        mean, var = batch_norm_statistics(z, mean_nc, m2_nc, running_mean, running_var, training, momentum)
        scale, shift, rstd = fold_batch_norm(mean, var, weight, bias, eps)
        # max over a plane of bn(z): at z's maximum where scale >= 0, at its minimum where not.
        # Where scale == 0 every pixel ties (bn(z) = shift): the maximum's gradient splits over
        # the whole plane, whose mean z is then the derivative by scale.
        upward = scale >= 0
        at = torch.where(upward, zmax, zmin)
        at = torch.where(scale == 0, mean_nc, at)
        ties = torch.where(upward, nmax, nmin)
        avg, max_ = scale * mean_nc + shift, scale * at + shift
        ctx.save_for_backward(z, weight, mean, rstd, scale, mean_nc, at, ties, zmax, zmin)
        ctx.training = training
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.ops = ops
        link = z.new_zeros((n, c, 3), dtype=acc)
        plink = z.new_zeros((n, groups, 4, h, w), dtype=acc)
        return z.view_as(z), link, plink, avg, max_, scale, shift

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_u, grad_link, grad_plink, grad_avg, grad_max, grad_scale, grad_shift):
        z, weight, mean, rstd, scale, mean_nc, at, ties, zmax, zmin = ctx.saved_tensors
        n, c, h, w = z.shape
        pixels, count = h * w, n * h * w
        a, b, member = grad_link.unbind(-1)  # carried values (see _Apply.backward)
        mask = None if grad_plink.shape[1] == 1 else member > 0
        s, dmax, gsum, gmax = grad_plink.unbind(2)
        # avg = scale * mean_nc + shift and max = scale * at + shift are this Function's own.
        g_scale = grad_scale + (grad_avg * mean_nc + grad_max * at).sum(0)
        g_shift = grad_shift + (grad_avg + grad_max).sum(0)
        wgt = torch.ones_like(rstd) if weight is None else weight.to(rstd.dtype)
        beta = torch.zeros_like(mean)
        gamma = grad_avg * scale / max(pixels, 1)
        if ctx.training:
            # scale = w * rstd(var), shift = bias - mean * scale; mean and var are z's batch
            # statistics: d mean / dz = 1 / count, d var / dz = 2 (z - mean) / count.
            grad_var = (g_scale - mean * g_shift) * (-0.5 * wgt * rstd ** 3)
            grad_mean = -scale * g_shift
            beta = 2 * grad_var / count
            gamma = gamma + grad_mean / count - beta * mean
        # The maximum's gradient, split among its ties (zero where scale == 0: bn(z) is flat).
        k = grad_max * scale / ties.clamp_min(1)
        upward = scale >= 0
        kmax, kmin = torch.where(upward, k, 0), torch.where(upward, 0, k)
        grad_z = ctx.ops.spatial_tail_backward_apply(
            grad_u, z, a.contiguous(), b.contiguous(), mask, s.contiguous(), dmax.contiguous(), gsum.contiguous(),
            gmax.contiguous(), beta.expand(n, c).contiguous(), gamma.contiguous(), zmax, kmax.contiguous(), zmin,
            kmin.contiguous())
        grad_weight = ((g_scale - g_shift * mean) * rstd).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = g_shift.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_z, grad_weight, grad_bias, None, None, None, None, None, None, None


class _Pool(torch.autograd.Function):
    """(z_link, a, b, plink, mask, others) -> (dsum, dmax) (N, G, H, W): per pixel and channel
    group, the sum of x1 and its maximum, floored at 0 for a group with `others` > 0 channels
    outside it (HAM's zeroed channels)."""

    @staticmethod
    def forward(ctx: Any, z_link, a, b, plink, mask, others, ops):
        d = ops.spatial_tail_pool(z_link, a, b, mask)
        dsum, top, ties = as_layout(d[:, 0::3]), d[:, 1::3], d[:, 2::3]
        dmax = torch.stack([top[:, g].clamp_min(0) if o > 0 else top[:, g] for g, o in enumerate(others)], 1)
        ctx.save_for_backward(z_link, a, b, mask, top, ties)
        ctx.others, ctx.ops = others, ops
        return dsum, dmax

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_sum, grad_max):
        z, a, b, mask, top, ties = ctx.saved_tensors
        # torch.amax's split among ties; a floored group's maximum 0 ties with its zeroed
        # channels too, and a negative member maximum loses to them.
        shares = []
        for g, others in enumerate(ctx.others):
            group_top, group_ties = top[:, g], ties[:, g]
            share = torch.where(group_ties > 0, 1 / group_ties, 0)
            if others > 0:
                share = torch.where(group_top > 0, share, torch.where(group_top == 0, 1 / (group_ties + others), 0))
            shares.append(share)
        gmax = (grad_max * torch.stack(shares, 1)).contiguous()
        gsum = grad_sum.contiguous()
        t1, t2 = ctx.ops.spatial_tail_pool_backward(z, a, b, mask, top.contiguous(), gsum, gmax)
        carried = top.new_zeros((*top.shape[:2], 4, *top.shape[2:]))
        carried[:, :, 1], carried[:, :, 2], carried[:, :, 3] = top, gsum, gmax
        return None, t2, t1, carried, None, None, None


class _Apply(torch.autograd.Function):
    """(z_link, link, plink, shortcut, a, b, s, mask, ops) -> relu(s_g * (a * z + b) + shortcut)."""

    @staticmethod
    def forward(ctx: Any, z_link, link, plink, shortcut, a, b, s, mask, ops):
        out = ops.spatial_tail_apply(z_link, shortcut, a, b, s, mask)
        ctx.save_for_backward(out, z_link, a, b, s, mask)
        ctx.ops = ops
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out):
        out, z, a, b, s, mask = ctx.saved_tensors
        grad_u, grad_s, s1, s2 = ctx.ops.spatial_tail_backward_reduce(grad_out, out, z, a, b, s, mask)
        member = torch.ones_like(a) if mask is None else mask.to(a.dtype)
        link = torch.stack((a, b, member), -1)
        carried = s.new_zeros((*s.shape[:2], 4, *s.shape[2:]))
        carried[:, :, 0] = s
        # x1 = a * z + b: d/da = sum_p grad_x1 * z, d/db = sum_p grad_x1, grad_x1 = grad_u * s_g.
        return grad_u, link, carried, grad_u, s2, s1, grad_s, None, None


# ----------------------------------------------------------------------------------------
# Fakes
# ----------------------------------------------------------------------------------------
def _per_channel_like(z: torch.Tensor) -> torch.Tensor:
    return z.new_empty(z.shape[:2], dtype=accumulate_dtype(z.dtype))


def _pixel_maps(z: torch.Tensor, k: int) -> torch.Tensor:
    n, _, h, w = z.shape
    return z.new_empty((n, k, h, w), dtype=accumulate_dtype(z.dtype))


def _groups(mask) -> int:
    return 1 if mask is None else 2


def _fake_stats(z):
    return tuple(_per_channel_like(z) for _ in range(6))


def _fake_pool(z, a, b, mask):
    return _pixel_maps(z, 3 * _groups(mask))


def _fake_apply(z, shortcut, a, b, s, mask):
    return empty_like_layout(z)


def _fake_backward_reduce(grad_out, out, z, a, b, s, mask):
    return empty_like_layout(z), _pixel_maps(z, _groups(mask)), _per_channel_like(z), _per_channel_like(z)


def _fake_pool_backward(z, a, b, mask, dmax, gsum, gmax):
    return _per_channel_like(z), _per_channel_like(z)


def _fake_backward_apply(grad_u, z, *rest):
    return empty_like_layout(z)


_FAKES = check.fakes_that_check(
    {"spatial_tail_stats": _fake_stats, "spatial_tail_pool": _fake_pool, "spatial_tail_apply": _fake_apply,
     "spatial_tail_backward_reduce": _fake_backward_reduce, "spatial_tail_pool_backward": _fake_pool_backward,
     "spatial_tail_backward_apply": _fake_backward_apply},
    {"spatial_tail_stats": check_spatial_tail_stats, "spatial_tail_pool": check_spatial_tail_pool,
     "spatial_tail_apply": check_spatial_tail_apply, "spatial_tail_backward_reduce": check_spatial_tail_backward_reduce,
     "spatial_tail_pool_backward": check_spatial_tail_pool_backward,
     "spatial_tail_backward_apply": check_spatial_tail_backward_apply},
)


def _register_autograd(namespace: str) -> None:
    """Nothing per op: the passes are differentiated together by `_Stats`, `_Pool` and `_Apply`."""


REGISTRATION = Registration(_FAKES, _register_autograd)
