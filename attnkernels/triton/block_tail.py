"""Triton kernels of the block_tail hot path (a residual block's tail, relu(bn(z) * gate + shortcut)).

Registers three ops under `torch.ops.attnkernels_triton` with the schemas and the math of
`csrc/block_tail_ops.cpp`, everything in acc(z) (float64 for float64, float32 otherwise) and
rounded once:

    block_tail_stats(z) -> (mean, m2)             per (n, c): mean and sum of squared deviations
    block_tail_apply(x, y, a, b, c, relu) -> out  act(a[n, c] * x + b[n, c] + c[n, c] * y)
    block_tail_backward_reduce(grad_out, out, z) -> (grad_u, s1, s2)
        grad_u = out <= 0 ? 0 : grad_out;  s1 = sum_p grad_u;  s2 = sum_p grad_u * z

All three are channel_gate's per-(n, block of BLOCK_C channels) kernels looping over H*W in
tiles of BLOCK_HW, launched through its `_launch_tiled` (its tile rule, measured on a GPU at this
module's own sites: "block_tail_stats", "block_tail_apply", "block_tail_backward_reduce").
Reductions accumulate elementwise in a [BLOCK_C, BLOCK_HW] tile, in a fixed order, and are
summed once at the end: deterministic, no atomics. m2 is never sum z^2 - P mean^2: each lane of
the stats tile keeps Welford's running (mean, m2) of its own pixels, shifted by the plane's
first pixel, and the lanes of a channel are combined at the end as
m2 = sum_j m2_j + sum_j k_j (mean_j - mean)^2 (k_j pixels in lane j): deviations only. Feature maps have any strides (NCHW, channels_last and sliced views run without
a copy; offsets are 64-bit); out and grad_u follow x's and z's layout. (N, C) inputs a, b, c of
another floating dtype or strides are cast first. Empty maps launch nothing: stats gives mean NaN
(0 / 0, as torch.mean) and m2 0 where P = 0, backward_reduce's sums are 0. The argument checks
are the op module's (`attnkernels.ops.block_tail.check_<op>`).

Importing this module registers the three ops and, through `register_hot_path` at its end, their
fakes (`attnkernels.ops.block_tail.REGISTRATION`; the autograd is that module's two Functions).

On a machine without a GPU set TRITON_INTERPRET=1 before importing this module; the ops then run
on CPU tensors under the Triton interpreter.
"""
import torch
import triton
import triton.language as tl

from ..ops import register_hot_path
from ..ops._common import empty_like_layout
from ..ops.block_tail import check_block_tail_apply, check_block_tail_backward_reduce, check_block_tail_stats
from ..reference.formulas import accumulate_dtype
from ._common import _channel_block, _div, _hw_offsets, _in_acc, _nchw_strides, _op_registrar, _relu
from .channel_gate import _launch_tiled

HOT_PATH = "block_tail"

__all__ = ["block_tail_stats", "block_tail_apply", "block_tail_backward_reduce"]


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _tile_offsets(row, hw, W, s_h, s_w, s_hw, FLAT: tl.constexpr):
    """[BLOCK_C, BLOCK_HW] int64 offsets of a tile: per-channel row starts + pixel offsets."""
    return row[:, None] + _hw_offsets(hw, W, s_h, s_w, s_hw, FLAT)[None, :]


@triton.jit
def _stats_kernel(
    z_ptr, mean_ptr, m2_ptr,
    C, HW, W, num_cb,
    sz_n, sz_c, sz_h, sz_w, sz_hw,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    ACC = mean_ptr.dtype.element_ty
    n, ch, c_mask = _channel_block(num_cb, C, BLOCK_C)
    z_row = n * sz_n + ch.to(tl.int64) * sz_c
    lane = tl.arange(0, BLOCK_HW)
    # Welford per lane on z - shift (the plane's first pixel): lane j holds pixels j,
    # j + BLOCK_HW, ...; in trip i each valid lane takes its (i + 1)-th pixel, so one reciprocal
    # serves the tile. The shift keeps the lanes' values near 0 when |mean| >> std, where
    # Welford's rounding grows with |mean| / std.
    shift = tl.load(z_ptr + z_row, mask=c_mask, other=0.0).to(ACC)[:, None]
    acc_sum = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    lane_mean = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    lane_m2 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
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
    # The mean as the contract sums it (an inf pixel gives an inf mean, as torch.mean).
    mean = _div(tl.sum(acc_sum, axis=1), HW)
    # The lanes combined from deviations: m2 = sum_j m2_j + sum_j k_j (mean_j - mean_d)^2, with
    # k_j = ceil((HW - j) / BLOCK_HW) pixels in lane j (0 past the plane) and mean_d their mean.
    k = (tl.maximum(HW - lane + BLOCK_HW - 1, 0) // BLOCK_HW).to(ACC)[None, :]
    mean_d = _div(tl.sum(k * lane_mean, axis=1), HW)
    dev = tl.where(k > 0, lane_mean - mean_d[:, None], 0.0)
    m2 = tl.sum(lane_m2, axis=1) + tl.sum(k * dev * dev, axis=1)
    out = n * C + ch
    tl.store(mean_ptr + out, mean, mask=c_mask)
    tl.store(m2_ptr + out, m2, mask=c_mask)


@triton.jit
def _apply_kernel(
    x_ptr, y_ptr, a_ptr, b_ptr, c_ptr, out_ptr,
    C, HW, W, num_cb,
    sx_n, sx_c, sx_h, sx_w, sx_hw,
    sy_n, sy_c, sy_h, sy_w, sy_hw,
    so_n, so_c, so_h, so_w, so_hw,
    RELU: tl.constexpr, FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    ACC = a_ptr.dtype.element_ty
    n, ch, c_mask = _channel_block(num_cb, C, BLOCK_C)
    nc = n * C + ch
    a = tl.load(a_ptr + nc, mask=c_mask, other=0.0)[:, None]
    b = tl.load(b_ptr + nc, mask=c_mask, other=0.0)[:, None]
    c = tl.load(c_ptr + nc, mask=c_mask, other=0.0)[:, None]
    ch64 = ch.to(tl.int64)
    x_row, y_row, o_row = n * sx_n + ch64 * sx_c, n * sy_n + ch64 * sy_c, n * so_n + ch64 * so_c
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        x = tl.load(x_ptr + _tile_offsets(x_row, hw, W, sx_h, sx_w, sx_hw, FLAT), mask=mask, other=0.0).to(ACC)
        y = tl.load(y_ptr + _tile_offsets(y_row, hw, W, sy_h, sy_w, sy_hw, FLAT), mask=mask, other=0.0).to(ACC)
        v = a * x + b + c * y
        if RELU:
            v = _relu(v)
        tl.store(out_ptr + _tile_offsets(o_row, hw, W, so_h, so_w, so_hw, FLAT),
                 v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_reduce_kernel(
    go_ptr, out_ptr, z_ptr, gu_ptr, s1_ptr, s2_ptr,
    C, HW, W, num_cb,
    sg_n, sg_c, sg_h, sg_w, sg_hw,
    so_n, so_c, so_h, so_w, so_hw,
    sz_n, sz_c, sz_h, sz_w, sz_hw,
    su_n, su_c, su_h, su_w, su_hw,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    ACC = s1_ptr.dtype.element_ty
    n, ch, c_mask = _channel_block(num_cb, C, BLOCK_C)
    ch64 = ch.to(tl.int64)
    g_row, o_row = n * sg_n + ch64 * sg_c, n * so_n + ch64 * so_c
    z_row, u_row = n * sz_n + ch64 * sz_c, n * su_n + ch64 * su_c
    acc1 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    acc2 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        go = tl.load(go_ptr + _tile_offsets(g_row, hw, W, sg_h, sg_w, sg_hw, FLAT), mask=mask, other=0.0)
        out = tl.load(out_ptr + _tile_offsets(o_row, hw, W, so_h, so_w, so_hw, FLAT), mask=mask, other=0.0)
        z = tl.load(z_ptr + _tile_offsets(z_row, hw, W, sz_h, sz_w, sz_hw, FLAT), mask=mask, other=0.0).to(ACC)
        # relu's backward on its output: a NaN out passes the gradient (NaN <= 0 is false).
        gu = tl.where(out <= 0, 0.0, go.to(ACC))
        tl.store(gu_ptr + _tile_offsets(u_row, hw, W, su_h, su_w, su_hw, FLAT),
                 gu.to(gu_ptr.dtype.element_ty), mask=mask)
        acc1 += gu  # masked lanes: 0
        acc2 += gu * z
    nc = n * C + ch
    tl.store(s1_ptr + nc, tl.sum(acc1, axis=1), mask=c_mask)
    tl.store(s2_ptr + nc, tl.sum(acc2, axis=1), mask=c_mask)


# ----------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------
_op = _op_registrar(HOT_PATH)


def _per_channel(z: torch.Tensor, fill=None) -> torch.Tensor:
    """An (N, C) map of z in acc(z), contiguous: empty, or filled with `fill`."""
    shape, acc = z.shape[:2], accumulate_dtype(z.dtype)
    if fill is None:
        return torch.empty(shape, dtype=acc, device=z.device)
    return torch.full(shape, fill, dtype=acc, device=z.device)


@_op("block_tail_stats")
def block_tail_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, m2) of each (n, c) plane of z: (N, C) each, contiguous, acc(z)."""
    check_block_tail_stats(z)
    if z.numel() == 0:  # no launch: P = 0 gives mean 0 / 0 = NaN and m2 0 (N or C = 0: empty maps)
        return _per_channel(z, float("nan")), _per_channel(z, 0.0)
    mean, m2 = _per_channel(z), _per_channel(z)
    flat, strides = _nchw_strides(z)
    _launch_tiled("block_tail_stats", _stats_kernel, z, mean.dtype, (z, mean, m2), strides, FLAT=flat)
    return mean, m2


@_op("block_tail_apply")
def block_tail_apply(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                     relu: bool) -> torch.Tensor:
    """out = act(a * x + b + c * y) with (N, C) a, b, c, in acc(x); x's dtype and layout."""
    acc = accumulate_dtype(x.dtype)
    a, b, c = (_in_acc(t, acc) for t in (a, b, c))
    check_block_tail_apply(x, y, a, b, c, relu)
    out = empty_like_layout(x)
    if x.numel() == 0:
        return out
    flat, strides = _nchw_strides(x, y, out)
    _launch_tiled("block_tail_apply", _apply_kernel, x, acc, (x, y, a, b, c, out), strides,
                  RELU=bool(relu), FLAT=flat)
    return out


@_op("block_tail_backward_reduce")
def block_tail_backward_reduce(grad_out: torch.Tensor, out: torch.Tensor, z: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_u = out <= 0 ? 0 : grad_out (out's dtype, z's layout); s1 = sum_p grad_u and
    s2 = sum_p grad_u * z, (N, C) in acc(z)."""
    check_block_tail_backward_reduce(grad_out, out, z)
    grad_u = empty_like_layout(z)
    if z.numel() == 0:  # no launch: sums over no pixels are 0
        return grad_u, _per_channel(z, 0.0), _per_channel(z, 0.0)
    s1, s2 = _per_channel(z), _per_channel(z)
    flat, strides = _nchw_strides(grad_out, out, z, grad_u)
    _launch_tiled("block_tail_backward_reduce", _backward_reduce_kernel, z, s1.dtype,
                  (grad_out, out, z, grad_u, s1, s2), strides, FLAT=flat)
    return grad_u, s1, s2


# Importing this module gives the ops their fakes (the autograd is ops/block_tail.py's Functions).
register_hot_path(HOT_PATH, "attnkernels_triton")
