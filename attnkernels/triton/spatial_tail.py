"""Triton kernels of the spatial_tail hot path (a residual block's tail with CBAM's or HAM's
attention, relu(s_g * (a * z + b) + shortcut)).

Registers six ops under `torch.ops.attnkernels_triton` with the schemas and the math of
`csrc/spatial_tail_ops.cpp`, everything in acc(z) (float64 for float64, float32 otherwise) and
rounded once; x1 = fma(a, z, b) is one `tl.fma` in every kernel, so that the backward's
x1 == dmax finds the pool's maxima again:

    spatial_tail_stats(z) -> (mean, m2, zmax, zmin, nmax, nmin)      per (n, c) plane
    spatial_tail_pool(z, a, b, mask) -> d                             per pixel and group
    spatial_tail_apply(z, shortcut, a, b, s, mask) -> out
    spatial_tail_backward_reduce(grad_out, out, z, a, b, s, mask) -> (grad_u, grad_s, s1, s2)
    spatial_tail_pool_backward(z, a, b, mask, dmax, gsum, gmax) -> (t1, t2)
    spatial_tail_backward_apply(grad_u, z, a, b, mask, s, dmax, gsum, gmax, beta, gamma,
                                zmax, kmax, zmin, kmin) -> grad_z

Groups: no mask, one (GROUPS = 1); an (N, C) bool mask, two (GROUPS = 2, group 0 where mask),
read as bytes. Per-pixel maps (N, G, H, W) are read per channel as its group's row.

Two kinds of kernel, both deterministic (no atomics, fixed-order reductions):
  * per (n, block of BLOCK_C channels), looping over H*W in tiles of BLOCK_HW (channel_gate's
    `_launch_tiled`, as block_tail's): stats, apply, pool_backward, backward_apply. Sums over
    pixels accumulate elementwise in a [BLOCK_C, BLOCK_HW] tile, summed once at the end. stats'
    m2 is block_tail's shifted per-lane Welford, combined from deviations; its extrema keep per
    lane a running maximum and its tie count (a larger value restarts the count), combined at
    the end over the lanes that hold the plane's extremum.
  * per (n, block of BLOCK_HW pixels), looping over C in chunks of BLOCK_C (ham_spatial's
    `_launch_pixel_tiled`): pool (sums, maxima and their ties over each group's channels, as
    above per lane) and backward_reduce (grad_s over channels; s1, s2 over pixels as per
    pixel-block partials (N, pixel blocks, C), summed in order by `_common._sum_partials`).
Each op launches at its own site (its name), measured on a GPU. Feature maps have any strides
(NCHW, channels_last and sliced views run without a copy; offsets are 64-bit); out, grad_u and
grad_z follow z's layout. (N, C) and pixel maps must be in acc(z) (the op module's checks,
`attnkernels.ops.spatial_tail.check_<op>`), any strides: read through .contiguous(). Empty maps
launch nothing (the contract's values for P = 0: mean NaN, m2 0, zmax -inf, zmin +inf, counts 0;
the pool's sums 0, maxima -inf and ties 0 where C = 0; sums over nothing 0).

Importing this module registers the six ops and, through `register_hot_path` at its end, their
fakes (`attnkernels.ops.spatial_tail.REGISTRATION`; the autograd is that module's Functions).

On a machine without a GPU set TRITON_INTERPRET=1 before importing this module; the ops then run
on CPU tensors under the Triton interpreter.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops import register_hot_path
from ..ops._common import empty_like_layout
from ..ops.spatial_tail import (
    check_spatial_tail_apply,
    check_spatial_tail_backward_apply,
    check_spatial_tail_backward_reduce,
    check_spatial_tail_pool,
    check_spatial_tail_pool_backward,
    check_spatial_tail_stats,
)
from ..reference.formulas import accumulate_dtype
from ._common import (
    _channel_block,
    _div,
    _hw_offsets,
    _max_reduce,
    _nchw_strides,
    _op_registrar,
    _pixel_block,
    _relu,
)
from ._compat import wrap_triton
from .channel_gate import _launch_tiled
from .ham_spatial import _grad_gate, _grad_gate_buffer, _launch_pixel_tiled

HOT_PATH = "spatial_tail"

__all__ = [
    "spatial_tail_stats",
    "spatial_tail_pool",
    "spatial_tail_apply",
    "spatial_tail_backward_reduce",
    "spatial_tail_pool_backward",
    "spatial_tail_backward_apply",
]


# ----------------------------------------------------------------------------------------
# Device-side helpers
# ----------------------------------------------------------------------------------------
@triton.jit
def _tile_offsets(row, hw, W, s_h, s_w, s_hw, FLAT: tl.constexpr):
    """[BLOCK_C, BLOCK_HW] int64 offsets of a tile: per-channel row starts + pixel offsets."""
    return row[:, None] + _hw_offsets(hw, W, s_h, s_w, s_hw, FLAT)[None, :]


@triton.jit
def _x1(a, z, b):
    """x1 = fma(a, z, b): a, b per channel ([BLOCK_C], acc), z a [BLOCK_C, BLOCK_HW] tile in
    acc. One rounding, the same in every kernel: the backward finds the pool's maxima by
    x1 == dmax."""
    a2, z2 = tl.broadcast(a[:, None], z)
    b2, _ = tl.broadcast(b[:, None], z)
    return tl.fma(a2, z2, b2)


@triton.jit
def _channel_args(a_ptr, b_ptr, mask_ptr, nc, c_mask, GROUPS: tl.constexpr):
    """a, b of channels nc ([BLOCK_C], 0 outside c_mask) and their group: in0, channel in
    group 0 (mask True; every channel where GROUPS == 1)."""
    a = tl.load(a_ptr + nc, mask=c_mask, other=0.0)
    b = tl.load(b_ptr + nc, mask=c_mask, other=0.0)
    if GROUPS == 1:
        in0 = c_mask
    else:
        in0 = tl.load(mask_ptr + nc, mask=c_mask, other=0) != 0
    return a, b, in0


@triton.jit
def _of_group(map_ptr, row, hw, hw_mask, HW, in0, GROUPS: tl.constexpr):
    """Each channel's group's row of a pixel map at pixels hw: map[n, g(c), hw], row = the
    offset of map[n, 0, 0]. [1, BLOCK_HW] for one group, [BLOCK_C, BLOCK_HW] for two."""
    v0 = tl.load(map_ptr + row + hw, mask=hw_mask, other=0.0)[None, :]
    if GROUPS == 1:
        v = v0
    else:
        v1 = tl.load(map_ptr + row + HW + hw, mask=hw_mask, other=0.0)[None, :]
        v = tl.where(in0[:, None], v0, v1)
    return v


@triton.jit
def _pool_gradient(x1, dmax_ptr, gsum_ptr, gmax_ptr, row, hw, hw_mask, HW, in0, GROUPS: tl.constexpr):
    """r = gsum_g + (x1 == dmax_g ? gmax_g : 0): the pooling's gradient w.r.t. x1."""
    dmax = _of_group(dmax_ptr, row, hw, hw_mask, HW, in0, GROUPS)
    gsum = _of_group(gsum_ptr, row, hw, hw_mask, HW, in0, GROUPS)
    gmax = _of_group(gmax_ptr, row, hw, hw_mask, HW, in0, GROUPS)
    return gsum + tl.where(x1 == dmax, gmax, 0.0)


@triton.jit
def _top_update(top, ties, v, valid):
    """A lane's running maximum of v (where valid) and its ties: a larger v restarts the count,
    an equal one adds to it; a NaN sticks (and, equal to nothing, ties nothing)."""
    up = valid & ((v > top) | (v != v))
    ties = tl.where(up, 1, tl.where(valid & (v == top), ties + 1, ties))
    return tl.where(up, v, top), ties


@triton.jit
def _top_reduce(top, ties, axis: tl.constexpr):
    """The lanes' maximum along axis (NaN if one lane is NaN) and its ties: the counts of the
    lanes whose maximum it is (0 for a NaN maximum, as x == NaN is false)."""
    best = _max_reduce(top, axis)
    count = tl.sum(tl.where(top == tl.expand_dims(best, axis), ties, 0), axis=axis)
    return best, count


# ----------------------------------------------------------------------------------------
# Kernels over (n, channel block), looping over H*W
# ----------------------------------------------------------------------------------------
@triton.jit
def _stats_kernel(
    z_ptr, mean_ptr, m2_ptr, zmax_ptr, zmin_ptr, nmax_ptr, nmin_ptr,
    C, HW, W, num_cb,
    sz_n, sz_c, sz_h, sz_w, sz_hw,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    ACC = mean_ptr.dtype.element_ty
    n, ch, c_mask = _channel_block(num_cb, C, BLOCK_C)
    z_row = n * sz_n + ch.to(tl.int64) * sz_c
    lane = tl.arange(0, BLOCK_HW)
    # block_tail's per-lane Welford on z - shift (the plane's first pixel): lane j holds
    # pixels j, j + BLOCK_HW, ...; in trip i each valid lane takes its (i + 1)-th pixel.
    shift = tl.load(z_ptr + z_row, mask=c_mask, other=0.0).to(ACC)[:, None]
    acc_sum = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    lane_mean = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    lane_m2 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    # The extrema per lane with their ties; the minimum as the maximum of -z (exact).
    top = tl.full([BLOCK_C, BLOCK_HW], float("-inf"), dtype=ACC)
    top_ties = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.int32)
    low = tl.full([BLOCK_C, BLOCK_HW], float("-inf"), dtype=ACC)
    low_ties = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.int32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + lane
        mask = c_mask[:, None] & (hw < HW)[None, :]
        v = tl.load(z_ptr + _tile_offsets(z_row, hw, W, sz_h, sz_w, sz_hw, FLAT), mask=mask, other=0.0).to(ACC)
        acc_sum += v  # masked lanes load 0
        inv_k = _div(tl.full([1, 1], 1.0, ACC), start // BLOCK_HW + 1)
        d = v - shift
        delta = d - lane_mean
        lane_mean = tl.where(mask, lane_mean + delta * inv_k, lane_mean)
        lane_m2 = tl.where(mask, lane_m2 + delta * (d - lane_mean), lane_m2)
        top, top_ties = _top_update(top, top_ties, v, mask)
        low, low_ties = _top_update(low, low_ties, -v, mask)
    mean = _div(tl.sum(acc_sum, axis=1), HW)
    # block_tail's combination of the lanes from deviations (k_j pixels in lane j).
    k = (tl.maximum(HW - lane + BLOCK_HW - 1, 0) // BLOCK_HW).to(ACC)[None, :]
    mean_d = _div(tl.sum(k * lane_mean, axis=1), HW)
    dev = tl.where(k > 0, lane_mean - mean_d[:, None], 0.0)
    m2 = tl.sum(lane_m2, axis=1) + tl.sum(k * dev * dev, axis=1)
    zmax, nmax = _top_reduce(top, top_ties, 1)
    neg_min, nmin = _top_reduce(low, low_ties, 1)
    out = n * C + ch
    tl.store(mean_ptr + out, mean, mask=c_mask)
    tl.store(m2_ptr + out, m2, mask=c_mask)
    tl.store(zmax_ptr + out, zmax, mask=c_mask)
    tl.store(zmin_ptr + out, -neg_min, mask=c_mask)
    tl.store(nmax_ptr + out, nmax.to(ACC), mask=c_mask)
    tl.store(nmin_ptr + out, nmin.to(ACC), mask=c_mask)


@triton.jit
def _apply_kernel(
    z_ptr, sc_ptr, a_ptr, b_ptr, s_ptr, mask_ptr, out_ptr,
    C, HW, W, num_cb,
    sz_n, sz_c, sz_h, sz_w, sz_hw,
    sy_n, sy_c, sy_h, sy_w, sy_hw,
    so_n, so_c, so_h, so_w, so_hw,
    GROUPS: tl.constexpr, FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    ACC = a_ptr.dtype.element_ty
    n, ch, c_mask = _channel_block(num_cb, C, BLOCK_C)
    a, b, in0 = _channel_args(a_ptr, b_ptr, mask_ptr, n * C + ch, c_mask, GROUPS)
    ch64 = ch.to(tl.int64)
    z_row, y_row, o_row = n * sz_n + ch64 * sz_c, n * sy_n + ch64 * sy_c, n * so_n + ch64 * so_c
    s_row = n * GROUPS * HW
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        hw_mask = hw < HW
        mask = c_mask[:, None] & hw_mask[None, :]
        z = tl.load(z_ptr + _tile_offsets(z_row, hw, W, sz_h, sz_w, sz_hw, FLAT), mask=mask, other=0.0).to(ACC)
        y = tl.load(sc_ptr + _tile_offsets(y_row, hw, W, sy_h, sy_w, sy_hw, FLAT), mask=mask, other=0.0).to(ACC)
        s = _of_group(s_ptr, s_row, hw, hw_mask, HW, in0, GROUPS)
        v = _relu(s * _x1(a, z, b) + y)
        tl.store(out_ptr + _tile_offsets(o_row, hw, W, so_h, so_w, so_hw, FLAT),
                 v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pool_backward_kernel(
    z_ptr, a_ptr, b_ptr, mask_ptr, dmax_ptr, gsum_ptr, gmax_ptr, t1_ptr, t2_ptr,
    C, HW, W, num_cb,
    sz_n, sz_c, sz_h, sz_w, sz_hw,
    GROUPS: tl.constexpr, FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    ACC = a_ptr.dtype.element_ty
    n, ch, c_mask = _channel_block(num_cb, C, BLOCK_C)
    nc = n * C + ch
    a, b, in0 = _channel_args(a_ptr, b_ptr, mask_ptr, nc, c_mask, GROUPS)
    z_row = n * sz_n + ch.to(tl.int64) * sz_c
    map_row = n * GROUPS * HW
    acc1 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    acc2 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        hw_mask = hw < HW
        mask = c_mask[:, None] & hw_mask[None, :]
        z = tl.load(z_ptr + _tile_offsets(z_row, hw, W, sz_h, sz_w, sz_hw, FLAT), mask=mask, other=0.0).to(ACC)
        r = _pool_gradient(_x1(a, z, b), dmax_ptr, gsum_ptr, gmax_ptr, map_row, hw, hw_mask, HW, in0, GROUPS)
        acc1 += tl.where(mask, r, 0.0)
        acc2 += tl.where(mask, r * z, 0.0)
    tl.store(t1_ptr + nc, tl.sum(acc1, axis=1), mask=c_mask)
    tl.store(t2_ptr + nc, tl.sum(acc2, axis=1), mask=c_mask)


@triton.jit
def _backward_apply_kernel(
    gu_ptr, z_ptr, a_ptr, b_ptr, mask_ptr, s_ptr, dmax_ptr, gsum_ptr, gmax_ptr,
    beta_ptr, gamma_ptr, zmax_ptr, kmax_ptr, zmin_ptr, kmin_ptr, gz_ptr,
    C, HW, W, num_cb,
    sg_n, sg_c, sg_h, sg_w, sg_hw,
    sz_n, sz_c, sz_h, sz_w, sz_hw,
    so_n, so_c, so_h, so_w, so_hw,
    GROUPS: tl.constexpr, FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    ACC = a_ptr.dtype.element_ty
    n, ch, c_mask = _channel_block(num_cb, C, BLOCK_C)
    nc = n * C + ch
    a, b, in0 = _channel_args(a_ptr, b_ptr, mask_ptr, nc, c_mask, GROUPS)
    beta = tl.load(beta_ptr + nc, mask=c_mask, other=0.0)[:, None]
    gamma = tl.load(gamma_ptr + nc, mask=c_mask, other=0.0)[:, None]
    zmax = tl.load(zmax_ptr + nc, mask=c_mask, other=0.0)[:, None]
    kmax = tl.load(kmax_ptr + nc, mask=c_mask, other=0.0)[:, None]
    zmin = tl.load(zmin_ptr + nc, mask=c_mask, other=0.0)[:, None]
    kmin = tl.load(kmin_ptr + nc, mask=c_mask, other=0.0)[:, None]
    ch64 = ch.to(tl.int64)
    g_row, z_row, o_row = n * sg_n + ch64 * sg_c, n * sz_n + ch64 * sz_c, n * so_n + ch64 * so_c
    map_row = n * GROUPS * HW
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        hw_mask = hw < HW
        mask = c_mask[:, None] & hw_mask[None, :]
        gu = tl.load(gu_ptr + _tile_offsets(g_row, hw, W, sg_h, sg_w, sg_hw, FLAT), mask=mask, other=0.0).to(ACC)
        z = tl.load(z_ptr + _tile_offsets(z_row, hw, W, sz_h, sz_w, sz_hw, FLAT), mask=mask, other=0.0).to(ACC)
        s = _of_group(s_ptr, map_row, hw, hw_mask, HW, in0, GROUPS)
        r = _pool_gradient(_x1(a, z, b), dmax_ptr, gsum_ptr, gmax_ptr, map_row, hw, hw_mask, HW, in0, GROUPS)
        # In the contract's order: the extrema's gradients go to their ties.
        gz = (a[:, None] * (gu * s + r) + beta * z + gamma
              + tl.where(z == zmax, kmax, 0.0) + tl.where(z == zmin, kmin, 0.0))
        tl.store(gz_ptr + _tile_offsets(o_row, hw, W, so_h, so_w, so_hw, FLAT),
                 gz.to(gz_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Kernels over (n, pixel block), looping over C
# ----------------------------------------------------------------------------------------
@triton.jit
def _pool_kernel(
    z_ptr, a_ptr, b_ptr, mask_ptr, d_ptr,
    C, HW, W, num_pb,
    sz_n, sz_c, sz_h, sz_w, sz_hw,
    GROUPS: tl.constexpr, FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    ACC = d_ptr.dtype.element_ty
    n, pb, hw, hw_mask = _pixel_block(num_pb, HW, BLOCK_HW)
    z_pix = _hw_offsets(hw, W, sz_h, sz_w, sz_hw, FLAT)
    sum0 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    top0 = tl.full([BLOCK_C, BLOCK_HW], float("-inf"), dtype=ACC)
    ties0 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.int32)
    if GROUPS == 2:
        sum1 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
        top1 = tl.full([BLOCK_C, BLOCK_HW], float("-inf"), dtype=ACC)
        ties1 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.int32)
    for start in range(0, C, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_mask = c < C
        tile_mask = c_mask[:, None] & hw_mask[None, :]
        a, b, in0 = _channel_args(a_ptr, b_ptr, mask_ptr, n * C + c, c_mask, GROUPS)
        offs = (n * sz_n + c.to(tl.int64) * sz_c)[:, None] + z_pix[None, :]
        x1 = _x1(a, tl.load(z_ptr + offs, mask=tile_mask, other=0.0).to(ACC), b)
        m0 = tile_mask & in0[:, None]
        sum0 += tl.where(m0, x1, 0.0)
        top0, ties0 = _top_update(top0, ties0, x1, m0)
        if GROUPS == 2:
            m1 = tile_mask & (in0 == 0)[:, None]
            sum1 += tl.where(m1, x1, 0.0)
            top1, ties1 = _top_update(top1, ties1, x1, m1)
    # d[n, 3g + k, p]: the group's sum, maximum and the maximum's ties.
    row = n * (3 * GROUPS) * HW + hw
    best0, count0 = _top_reduce(top0, ties0, 0)
    tl.store(d_ptr + row, tl.sum(sum0, axis=0), mask=hw_mask)
    tl.store(d_ptr + row + HW, best0, mask=hw_mask)
    tl.store(d_ptr + row + 2 * HW, count0.to(ACC), mask=hw_mask)
    if GROUPS == 2:
        best1, count1 = _top_reduce(top1, ties1, 0)
        tl.store(d_ptr + row + 3 * HW, tl.sum(sum1, axis=0), mask=hw_mask)
        tl.store(d_ptr + row + 4 * HW, best1, mask=hw_mask)
        tl.store(d_ptr + row + 5 * HW, count1.to(ACC), mask=hw_mask)


@triton.jit
def _backward_reduce_kernel(
    go_ptr, out_ptr, z_ptr, a_ptr, b_ptr, s_ptr, mask_ptr, gu_ptr, gs_ptr, p1_ptr, p2_ptr,
    C, HW, W, num_pb,
    sg_n, sg_c, sg_h, sg_w, sg_hw,
    so_n, so_c, so_h, so_w, so_hw,
    sz_n, sz_c, sz_h, sz_w, sz_hw,
    su_n, su_c, su_h, su_w, su_hw,
    GROUPS: tl.constexpr, FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    ACC = a_ptr.dtype.element_ty
    n, pb, hw, hw_mask = _pixel_block(num_pb, HW, BLOCK_HW)
    g_pix = _hw_offsets(hw, W, sg_h, sg_w, sg_hw, FLAT)
    o_pix = _hw_offsets(hw, W, so_h, so_w, so_hw, FLAT)
    z_pix = _hw_offsets(hw, W, sz_h, sz_w, sz_hw, FLAT)
    u_pix = _hw_offsets(hw, W, su_h, su_w, su_hw, FLAT)
    map_row = n * GROUPS * HW
    acc0 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    if GROUPS == 2:
        acc1 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    part_row = (n * num_pb + pb) * C
    for start in range(0, C, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_mask = c < C
        tile_mask = c_mask[:, None] & hw_mask[None, :]
        a, b, in0 = _channel_args(a_ptr, b_ptr, mask_ptr, n * C + c, c_mask, GROUPS)
        c64 = c.to(tl.int64)
        go = tl.load(go_ptr + (n * sg_n + c64 * sg_c)[:, None] + g_pix[None, :], mask=tile_mask, other=0.0)
        out = tl.load(out_ptr + (n * so_n + c64 * so_c)[:, None] + o_pix[None, :], mask=tile_mask, other=0.0)
        z = tl.load(z_ptr + (n * sz_n + c64 * sz_c)[:, None] + z_pix[None, :], mask=tile_mask, other=0.0).to(ACC)
        # relu's backward on its output: a NaN out passes the gradient (NaN <= 0 is false).
        gu = tl.where(out <= 0, 0.0, go.to(ACC))
        tl.store(gu_ptr + (n * su_n + c64 * su_c)[:, None] + u_pix[None, :],
                 gu.to(gu_ptr.dtype.element_ty), mask=tile_mask)
        gx = gu * _x1(a, z, b)
        acc0 += tl.where(tile_mask & in0[:, None], gx, 0.0)
        if GROUPS == 2:
            acc1 += tl.where(tile_mask & (in0 == 0)[:, None], gx, 0.0)
        gs = tl.where(tile_mask, gu * _of_group(s_ptr, map_row, hw, hw_mask, HW, in0, GROUPS), 0.0)
        tl.store(p1_ptr + part_row + c, tl.sum(gs, axis=1), mask=c_mask)
        tl.store(p2_ptr + part_row + c, tl.sum(gs * z, axis=1), mask=c_mask)  # masked lanes: 0 * 0
    tl.store(gs_ptr + map_row + hw, tl.sum(acc0, axis=0), mask=hw_mask)
    if GROUPS == 2:
        tl.store(gs_ptr + map_row + HW + hw, tl.sum(acc1, axis=0), mask=hw_mask)


# ----------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------
_op = _op_registrar(HOT_PATH)


def _groups(mask: Optional[torch.Tensor]) -> int:
    return 1 if mask is None else 2


def _mask_bytes(mask: Optional[torch.Tensor], placeholder: torch.Tensor) -> torch.Tensor:
    """The (N, C) bool mask as contiguous bytes (1: group 0); with no mask a placeholder the
    kernels never read (GROUPS = 1)."""
    return placeholder if mask is None else mask.contiguous().view(torch.uint8)


def _small(*ts: torch.Tensor) -> list[torch.Tensor]:
    """(N, C) and pixel maps, checked to be in acc, read contiguous."""
    return [t.contiguous() for t in ts]


def _per_channel(z: torch.Tensor, fill=None) -> torch.Tensor:
    """An (N, C) map of z in acc(z), contiguous: empty, or filled with `fill`."""
    shape, acc = z.shape[:2], accumulate_dtype(z.dtype)
    if fill is None:
        return torch.empty(shape, dtype=acc, device=z.device)
    return torch.full(shape, fill, dtype=acc, device=z.device)


def _pixel_maps(z: torch.Tensor, k: int) -> torch.Tensor:
    n, _, h, w = z.shape
    return torch.empty((n, k, h, w), dtype=accumulate_dtype(z.dtype), device=z.device)


@_op("spatial_tail_stats")
def spatial_tail_stats(z: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(mean, m2, zmax, zmin, nmax, nmin) of each (n, c) plane of z: (N, C) each, acc(z)."""
    check_spatial_tail_stats(z)
    if z.numel() == 0:  # no launch: the contract's P = 0 values (N or C = 0: empty maps)
        return tuple(_per_channel(z, v) for v in (float("nan"), 0.0, float("-inf"), float("inf"), 0.0, 0.0))
    outs = tuple(_per_channel(z) for _ in range(6))
    flat, strides = _nchw_strides(z)
    _launch_tiled("spatial_tail_stats", _stats_kernel, z, outs[0].dtype, (z, *outs), strides, FLAT=flat)
    return outs


@_op("spatial_tail_pool")
def spatial_tail_pool(z: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """d (N, 3G, H, W) in acc(z): per group g, the sum of x1 over its channels, their maximum
    and the maximum's ties."""
    check_spatial_tail_pool(z, a, b, mask)
    groups = _groups(mask)
    d = _pixel_maps(z, 3 * groups)
    if z.numel() == 0:  # no launch: C = 0 leaves every group empty (N or H*W = 0: d is empty)
        d[:, 0::3], d[:, 1::3], d[:, 2::3] = 0.0, float("-inf"), 0.0
        return d
    a, b = _small(a, b)
    n, c, h, w = z.shape
    flat, strides = _nchw_strides(z)
    mbytes = _mask_bytes(mask, a)

    def launch(block_c: int, block_hw: int, num_warps: int) -> None:
        num_pb = triton.cdiv(h * w, block_hw)
        wrap_triton(_pool_kernel)[(n * num_pb,)](
            z, a, b, mbytes, d, c, h * w, w, num_pb, *strides,
            GROUPS=groups, FLAT=flat, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps,
        )

    _launch_pixel_tiled("spatial_tail_pool", z, d.dtype, launch)
    return d


@_op("spatial_tail_apply")
def spatial_tail_apply(z: torch.Tensor, shortcut: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor,
                       mask: Optional[torch.Tensor]) -> torch.Tensor:
    """out = relu(s_g * x1 + shortcut) in acc(z); z's dtype and layout."""
    check_spatial_tail_apply(z, shortcut, a, b, s, mask)
    out = empty_like_layout(z)
    if z.numel() == 0:
        return out
    a, b, s = _small(a, b, s)
    flat, strides = _nchw_strides(z, shortcut, out)
    _launch_tiled("spatial_tail_apply", _apply_kernel, z, a.dtype, (z, shortcut, a, b, s, _mask_bytes(mask, a), out),
                  strides, GROUPS=_groups(mask), FLAT=flat)
    return out


@_op("spatial_tail_backward_reduce")
def spatial_tail_backward_reduce(grad_out: torch.Tensor, out: torch.Tensor, z: torch.Tensor, a: torch.Tensor,
                                 b: torch.Tensor, s: torch.Tensor, mask: Optional[torch.Tensor]
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_u = out <= 0 ? 0 : grad_out (z's dtype and layout); grad_s (N, G, H, W) = per group
    sum_c grad_u * x1; s1 = sum_p grad_u * s_g, s2 = sum_p grad_u * s_g * z (N, C); in acc(z)."""
    check_spatial_tail_backward_reduce(grad_out, out, z, a, b, s, mask)
    groups = _groups(mask)
    grad_u = empty_like_layout(z)
    if z.numel() == 0:  # no launch: sums over no channels or no pixels are 0
        return grad_u, _pixel_maps(z, groups).zero_(), _per_channel(z, 0.0), _per_channel(z, 0.0)
    a, b, s = _small(a, b, s)
    acc = a.dtype
    n, c, h, w = z.shape
    grad_s = _pixel_maps(z, groups)
    flat, strides = _nchw_strides(grad_out, out, z, grad_u)
    mbytes = _mask_bytes(mask, a)

    def launch(block_c: int, block_hw: int, num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
        num_pb = triton.cdiv(h * w, block_hw)
        p1, p2 = (_grad_gate_buffer(n, num_pb, c, acc, z.device) for _ in range(2))
        wrap_triton(_backward_reduce_kernel)[(n * num_pb,)](
            grad_out, out, z, a, b, s, mbytes, grad_u, grad_s, p1, p2, c, h * w, w, num_pb, *strides,
            GROUPS=groups, FLAT=flat, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps,
        )
        return _grad_gate(p1, num_pb, c), _grad_gate(p2, num_pb, c)

    s1, s2 = _launch_pixel_tiled("spatial_tail_backward_reduce", z, acc, launch)
    return grad_u, grad_s, s1, s2


@_op("spatial_tail_pool_backward")
def spatial_tail_pool_backward(z: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor],
                               dmax: torch.Tensor, gsum: torch.Tensor, gmax: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """t1 = sum_p r, t2 = sum_p r * z (N, C) in acc(z), r = gsum_g + (x1 == dmax_g ? gmax_g : 0)."""
    groups = check_spatial_tail_pool_backward(z, a, b, mask, dmax, gsum, gmax)
    if z.numel() == 0:  # no launch: sums over no pixels are 0
        return _per_channel(z, 0.0), _per_channel(z, 0.0)
    a, b, dmax, gsum, gmax = _small(a, b, dmax, gsum, gmax)
    t1, t2 = _per_channel(z), _per_channel(z)
    flat, strides = _nchw_strides(z)
    _launch_tiled("spatial_tail_pool_backward", _pool_backward_kernel, z, a.dtype,
                  (z, a, b, _mask_bytes(mask, a), dmax, gsum, gmax, t1, t2), strides, GROUPS=groups, FLAT=flat)
    return t1, t2


@_op("spatial_tail_backward_apply")
def spatial_tail_backward_apply(grad_u: torch.Tensor, z: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                                mask: Optional[torch.Tensor], s: torch.Tensor, dmax: torch.Tensor, gsum: torch.Tensor,
                                gmax: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor, zmax: torch.Tensor,
                                kmax: torch.Tensor, zmin: torch.Tensor, kmin: torch.Tensor) -> torch.Tensor:
    """grad_z = a * (grad_u * s_g + r) + beta * z + gamma + (z == zmax ? kmax : 0)
    + (z == zmin ? kmin : 0), in acc(z); z's dtype and layout."""
    check_spatial_tail_backward_apply(grad_u, z, a, b, mask, s, dmax, gsum, gmax, beta, gamma, zmax, kmax, zmin, kmin)
    grad_z = empty_like_layout(z)
    if z.numel() == 0:
        return grad_z
    small = _small(a, b, s, dmax, gsum, gmax, beta, gamma, zmax, kmax, zmin, kmin)
    a = small[0]
    flat, strides = _nchw_strides(grad_u, z, grad_z)
    _launch_tiled("spatial_tail_backward_apply", _backward_apply_kernel, z, a.dtype,
                  (grad_u, z, *small[:2], _mask_bytes(mask, a), *small[2:], grad_z), strides,
                  GROUPS=_groups(mask), FLAT=flat)
    return grad_z


# Importing this module gives the ops their fakes (the autograd is ops/spatial_tail.py's Functions).
register_hot_path(HOT_PATH, "attnkernels_triton")
