"""Triton kernels of the channel_gate hot path (ECA, SE's pooling, HAM's channel half).

Registers six ops under `torch.ops.attnkernels_triton` with the schemas and the math of
`csrc/channel_gate_ops.cpp` (the ops' math; docs/contract.md#shared-rules for accumulation, NaN and tie rules), and,
on import, their autograd and the hot path's composite ops (`attnkernels.ops.channel_gate`):

    channel_pool(x) -> (avg, max)
    channel_pool_backward(grad_avg, grad_max?, x, max) -> grad_x
    channel_gate(avg, max, weight, alpha?, beta?, mode) -> gate
    channel_gate_backward(grad_gate, gate, avg, max, weight, alpha?, beta?, mode)
        -> (grad_avg, grad_max, grad_weight, grad_alpha, grad_beta)
    channel_rescale(x, gate) -> y
    channel_rescale_backward(grad_y, x, gate) -> (grad_x, grad_gate)

x is (N, C, H, W) with any strides: the kernels take every stride, so NCHW, channels_last
and sliced views run without a copy. Outputs shaped like x are channels_last when x is
channels_last-dense and not NCHW-contiguous, NCHW-contiguous otherwise. (N, C) tensors are
contiguous in the accumulation dtype acc(x): float64 for float64 x, float32 otherwise; (N, C)
inputs of another floating dtype or strides are cast first. The argument checks are the op
module's (`check_<op>`), worded as the C++ ops'.

Kernels (all deterministic: no atomics, every reduction in a fixed order):
  * pooling, rescale, rescale backward, pool backward: one program per (n, block of
    BLOCK_C channels), looping over H*W in tiles of BLOCK_HW; reductions accumulate
    elementwise in a [BLOCK_C, BLOCK_HW] tile and are summed once at the end.
  * gate forward/backward: one program per sample n holding all C channels; the 1-D conv
    is a static loop over the k taps with shifted, masked loads (zero padding).
    grad_weight/grad_alpha/grad_beta: per-sample partials, then one program sums them
    over n in a fixed order (`_common._sum_partials`).

On a machine without a GPU set TRITON_INTERPRET=1 before importing this module; the ops
then run on CPU tensors under the Triton interpreter.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops import register_hot_path
from ..ops._common import empty_like_layout
from ..ops.channel_gate import (
    GateMode,
    check_channel_gate,
    check_channel_gate_backward,
    check_channel_pool,
    check_channel_pool_backward,
    check_channel_rescale,
    check_channel_rescale_backward,
)
from ..reference.formulas import accumulate_dtype
from ._common import (
    _acc_vector,
    _channel_block,
    _div,
    _hw_offsets,
    _in_acc,
    _launch_measured,
    _like_param,
    _max_reduce,
    _max_update,
    _min_programs,
    _nchw_strides,
    _nonempty,
    _op_registrar,
    _pow2,
    _sigmoid,
    _sum_partials,
)
from ._compat import wrap_triton

HOT_PATH = "channel_gate"

__all__ = [
    "channel_pool",
    "channel_pool_backward",
    "channel_gate",
    "channel_gate_backward",
    "channel_rescale",
    "channel_rescale_backward",
]

# GateMode's values as kernel constants (jit code reads a global only as a constexpr).
_AVG = tl.constexpr(int(GateMode.AVG))
_MAX = tl.constexpr(int(GateMode.MAX))
_MIX = tl.constexpr(int(GateMode.MIX))


# ----------------------------------------------------------------------------------------
# Host-side helpers: dtypes, layouts, tiles
# ----------------------------------------------------------------------------------------
def _gate_warps(block_c: int) -> int:
    return 4 if block_c <= 1024 else 8


# Elements of one [BLOCK_C, BLOCK_HW] tile, per accumulation dtype (registers per thread stay
# modest at 4 warps). Module attributes, so tests can force many small tiles and blocks.
_TILE_ELEMENTS = {torch.float32: 2048, torch.float64: 1024}
# Widest channel block when channels are x's contiguous dimension (channels_last).
_MAX_BLOCK_C_CHANNELS_LAST = 64


def _tiles(x: torch.Tensor, acc: torch.dtype, tile: Optional[int] = None) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) for the per-(n, channel block) kernels, `tile` elements at most
    (default: _TILE_ELEMENTS of acc).

    The tile's long side follows x's contiguous dimension (H*W for NCHW, C for
    channels_last) so loads coalesce; the channel block shrinks while the grid has fewer
    programs than the device can run at once.
    """
    n, c, h, w = x.shape
    hw = h * w
    tile = _TILE_ELEMENTS[acc] if tile is None else tile
    min_programs = _min_programs(x.device)
    if c > 1 and hw > 1 and x.stride(1) == 1:  # channels are contiguous
        block_c = min(_pow2(c), _MAX_BLOCK_C_CHANNELS_LAST, tile)
        while block_c > 16 and n * triton.cdiv(c, block_c) < min_programs:
            block_c //= 2
        block_hw = min(_pow2(hw), max(1, tile // block_c))
    else:
        block_hw = min(_pow2(hw), tile)
        block_c = min(_pow2(c), max(1, tile // block_hw))
        while block_c > 1 and n * triton.cdiv(c, block_c) < min_programs:
            block_c //= 2
    return block_c, block_hw


def _tile_warps(block_c: int, block_hw: int) -> int:
    """4 warps at the rule's tile (16 values per thread), 8 beyond it."""
    return 8 if block_c * block_hw > 2048 else 4


def _launch_tiled(op: str, kernel, x: torch.Tensor, acc: torch.dtype, pointers: tuple, strides: list,
                  **constexprs) -> None:
    """Launch one per-(n, channel block) kernel over x: `kernel[(N * channel blocks,)](*pointers,
    C, H*W, W, num_cb, *strides, **constexprs, BLOCK_C, BLOCK_HW)`, in the tile configuration
    measured fastest on a GPU for this op, x's shape, dtype and layout (`_launch_measured`)."""
    n, c, h, w = x.shape

    def launch(block_c: int, block_hw: int, num_warps: int) -> None:
        num_cb = triton.cdiv(c, block_c)
        wrap_triton(kernel)[(n * num_cb,)](
            *pointers, c, h * w, w, num_cb, *strides,
            **constexprs, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps,
        )

    _launch_measured(op, x, lambda elements: _tiles(x, acc, elements), _TILE_ELEMENTS[acc], _tile_warps, launch)


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _pool_kernel(
    x_ptr, avg_ptr, max_ptr,
    C, HW, W, num_cb,
    sx_n, sx_c, sx_h, sx_w, sx_hw,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    ACC = avg_ptr.dtype.element_ty
    n, c, c_mask = _channel_block(num_cb, C, BLOCK_C)
    x_row = n * sx_n + c.to(tl.int64) * sx_c

    acc_sum = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    acc_max = tl.full([BLOCK_C, BLOCK_HW], float("-inf"), dtype=ACC)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        offs = x_row[:, None] + _hw_offsets(hw, W, sx_h, sx_w, sx_hw, FLAT)[None, :]
        v = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(ACC)
        acc_sum += tl.where(mask, v, 0.0)
        acc_max = _max_update(acc_max, v)

    total = tl.sum(acc_sum, axis=1)
    mx = _max_reduce(acc_max, 1)
    out = n * C + c
    tl.store(avg_ptr + out, _div(total, HW), mask=c_mask)
    tl.store(max_ptr + out, mx, mask=c_mask)


@triton.jit
def _pool_backward_kernel(
    gavg_ptr, gmax_ptr, x_ptr, max_ptr, gx_ptr,
    C, HW, W, num_cb,
    sx_n, sx_c, sx_h, sx_w, sx_hw,
    so_n, so_c, so_h, so_w, so_hw,
    HAS_MAX: tl.constexpr, FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    ACC = gavg_ptr.dtype.element_ty
    n, c, c_mask = _channel_block(num_cb, C, BLOCK_C)
    nc = n * C + c
    x_row = n * sx_n + c.to(tl.int64) * sx_c
    o_row = n * so_n + c.to(tl.int64) * so_c

    share_avg = _div(tl.load(gavg_ptr + nc, mask=c_mask, other=0.0), HW)
    if HAS_MAX:
        mx = tl.load(max_ptr + nc, mask=c_mask, other=0.0)
        # Pass 1: count the ties x == max per channel.
        ties = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.int32)
        for start in range(0, HW, BLOCK_HW):
            hw = start + tl.arange(0, BLOCK_HW)
            mask = c_mask[:, None] & (hw < HW)[None, :]
            offs = x_row[:, None] + _hw_offsets(hw, W, sx_h, sx_w, sx_hw, FLAT)[None, :]
            v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            ties += (mask & (v == mx[:, None])).to(tl.int32)
        count = tl.sum(ties, axis=1)
        # count == 0 only when max is NaN: the share is then NaN (or inf) and, multiplied in
        # below, makes the whole plane's gradient NaN, exactly as torch.amax's backward.
        share_max = _div(tl.load(gmax_ptr + nc, mask=c_mask, other=0.0), count.to(ACC))

    # Pass 2: write grad_x.
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        g = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC) + share_avg[:, None]
        if HAS_MAX:
            offs = x_row[:, None] + _hw_offsets(hw, W, sx_h, sx_w, sx_hw, FLAT)[None, :]
            v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            g += (v == mx[:, None]).to(ACC) * share_max[:, None]
        o_offs = o_row[:, None] + _hw_offsets(hw, W, so_h, so_w, so_hw, FLAT)[None, :]
        tl.store(gx_ptr + o_offs, g.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rescale_kernel(
    x_ptr, gate_ptr, y_ptr,
    C, HW, W, num_cb,
    sx_n, sx_c, sx_h, sx_w, sx_hw,
    so_n, so_c, so_h, so_w, so_hw,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    ACC = gate_ptr.dtype.element_ty
    n, c, c_mask = _channel_block(num_cb, C, BLOCK_C)
    x_row = n * sx_n + c.to(tl.int64) * sx_c
    o_row = n * so_n + c.to(tl.int64) * so_c
    gate = tl.load(gate_ptr + n * C + c, mask=c_mask, other=0.0)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        x_offs = x_row[:, None] + _hw_offsets(hw, W, sx_h, sx_w, sx_hw, FLAT)[None, :]
        o_offs = o_row[:, None] + _hw_offsets(hw, W, so_h, so_w, so_hw, FLAT)[None, :]
        v = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(ACC)
        tl.store(y_ptr + o_offs, (v * gate[:, None]).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rescale_backward_kernel(
    gy_ptr, x_ptr, gate_ptr, gx_ptr, ggate_ptr,
    C, HW, W, num_cb,
    sg_n, sg_c, sg_h, sg_w, sg_hw,
    sx_n, sx_c, sx_h, sx_w, sx_hw,
    so_n, so_c, so_h, so_w, so_hw,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    ACC = gate_ptr.dtype.element_ty
    n, c, c_mask = _channel_block(num_cb, C, BLOCK_C)
    nc = n * C + c
    g_row = n * sg_n + c.to(tl.int64) * sg_c
    x_row = n * sx_n + c.to(tl.int64) * sx_c
    o_row = n * so_n + c.to(tl.int64) * so_c
    gate = tl.load(gate_ptr + nc, mask=c_mask, other=0.0)
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        g_offs = g_row[:, None] + _hw_offsets(hw, W, sg_h, sg_w, sg_hw, FLAT)[None, :]
        x_offs = x_row[:, None] + _hw_offsets(hw, W, sx_h, sx_w, sx_hw, FLAT)[None, :]
        o_offs = o_row[:, None] + _hw_offsets(hw, W, so_h, so_w, so_hw, FLAT)[None, :]
        gy = tl.load(gy_ptr + g_offs, mask=mask, other=0.0).to(ACC)
        v = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(ACC)
        tl.store(gx_ptr + o_offs, (gy * gate[:, None]).to(gx_ptr.dtype.element_ty), mask=mask)
        acc += gy * v  # masked lanes load 0 * 0
    tl.store(ggate_ptr + nc, tl.sum(acc, axis=1), mask=c_mask)


@triton.jit
def _gate_input(avg_ptr, max_ptr, base, idx, C, alpha, beta, MODE: tl.constexpr):
    """f[n, idx] of the gate's mode, 0 outside 0 <= idx < C (the conv's zero padding)."""
    inside = (idx >= 0) & (idx < C)
    if MODE == _AVG:
        f = tl.load(avg_ptr + base + idx, mask=inside, other=0.0)
    elif MODE == _MAX:
        f = tl.load(max_ptr + base + idx, mask=inside, other=0.0)
    else:
        a = tl.load(avg_ptr + base + idx, mask=inside, other=0.0)
        m = tl.load(max_ptr + base + idx, mask=inside, other=0.0)
        f = 0.5 * (a + m) + alpha * a + beta * m
    return tl.where(inside, f, 0.0)


@triton.jit
def _gate_dz(gg_ptr, gate_ptr, base, idx, C):
    """dz[n, idx] = grad_gate * gate * (1 - gate), 0 outside 0 <= idx < C."""
    inside = (idx >= 0) & (idx < C)
    gg = tl.load(gg_ptr + base + idx, mask=inside, other=0.0)
    g = tl.load(gate_ptr + base + idx, mask=inside, other=0.0)
    return tl.where(inside, gg * g * (1.0 - g), 0.0)


@triton.jit
def _gate_kernel(
    avg_ptr, max_ptr, w_ptr, alpha_ptr, beta_ptr, gate_ptr,
    C,
    K: tl.constexpr, PAD: tl.constexpr, MODE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ACC = gate_ptr.dtype.element_ty
    n = tl.program_id(0).to(tl.int64)
    base = n * C
    c = tl.arange(0, BLOCK_C)
    if MODE == _MIX:
        alpha = tl.load(alpha_ptr)
        beta = tl.load(beta_ptr)
    else:
        alpha = 0.0
        beta = 0.0
    z = tl.zeros([BLOCK_C], dtype=ACC)
    for j in tl.static_range(K):
        w = tl.load(w_ptr + j)
        z += w * _gate_input(avg_ptr, max_ptr, base, c + (j - PAD), C, alpha, beta, MODE)
    tl.store(gate_ptr + base + c, _sigmoid(z), mask=c < C)


@triton.jit
def _gate_backward_kernel(
    gg_ptr, gate_ptr, avg_ptr, max_ptr, w_ptr, alpha_ptr, beta_ptr,
    gavg_ptr, gmax_ptr, part_ptr,
    C,
    K: tl.constexpr, PAD: tl.constexpr, MODE: tl.constexpr, NPART: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    ACC = gavg_ptr.dtype.element_ty
    n = tl.program_id(0).to(tl.int64)
    base = n * C
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    if MODE == _MIX:
        alpha = tl.load(alpha_ptr)
        beta = tl.load(beta_ptr)
    else:
        alpha = 0.0
        beta = 0.0
    part_row = part_ptr + n * NPART

    dz = _gate_dz(gg_ptr, gate_ptr, base, c, C)
    df = tl.zeros([BLOCK_C], dtype=ACC)
    for j in tl.static_range(K):
        w = tl.load(w_ptr + j)
        # df[c] = sum_j w[j] dz[c - j + PAD]
        df += w * _gate_dz(gg_ptr, gate_ptr, base, c + (PAD - j), C)
        # grad_weight[j] partial of sample n = sum_c dz[c] f[c + j - PAD]
        f_j = _gate_input(avg_ptr, max_ptr, base, c + (j - PAD), C, alpha, beta, MODE)
        tl.store(part_row + j, tl.sum(dz * f_j, axis=0))
    df = tl.where(c_mask, df, 0.0)

    if MODE == _AVG:
        tl.store(gavg_ptr + base + c, df, mask=c_mask)
        tl.store(gmax_ptr + base + c, tl.zeros([BLOCK_C], dtype=ACC), mask=c_mask)
    elif MODE == _MAX:
        tl.store(gavg_ptr + base + c, tl.zeros([BLOCK_C], dtype=ACC), mask=c_mask)
        tl.store(gmax_ptr + base + c, df, mask=c_mask)
    else:
        a = tl.load(avg_ptr + base + c, mask=c_mask, other=0.0)
        m = tl.load(max_ptr + base + c, mask=c_mask, other=0.0)
        tl.store(gavg_ptr + base + c, df * (0.5 + alpha), mask=c_mask)
        tl.store(gmax_ptr + base + c, df * (0.5 + beta), mask=c_mask)
        tl.store(part_row + K, tl.sum(tl.where(c_mask, df * a, 0.0), axis=0))
        tl.store(part_row + K + 1, tl.sum(tl.where(c_mask, df * m, 0.0), axis=0))


# ----------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------
_op = _op_registrar(HOT_PATH)


@_op("channel_pool")
def channel_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(avg, max) over H*W: (N, C) each, contiguous, acc(x); max propagates NaN."""
    check_channel_pool(x)
    _nonempty("channel_pool", "x", x)
    n, c, h, w = x.shape
    acc = accumulate_dtype(x.dtype)
    avg = torch.empty((n, c), dtype=acc, device=x.device)
    mx = torch.empty((n, c), dtype=acc, device=x.device)
    flat, strides = _nchw_strides(x)
    _launch_tiled("channel_pool", _pool_kernel, x, acc, (x, avg, mx), strides, FLAT=flat)
    return avg, mx


@_op("channel_pool_backward")
def channel_pool_backward(
    grad_avg: torch.Tensor, grad_max: Optional[torch.Tensor], x: torch.Tensor, max: torch.Tensor
) -> torch.Tensor:
    """grad_x = grad_avg/(H*W) + [x == max] * grad_max/count (ties share evenly; a NaN max gives NaN, as torch.amax)."""
    acc = accumulate_dtype(x.dtype)
    gavg, mx = _in_acc(grad_avg, acc), _in_acc(max, acc)
    gmax = None if grad_max is None else _in_acc(grad_max, acc)
    check_channel_pool_backward(gavg, gmax, x, mx)
    _nonempty("channel_pool_backward", "x", x)
    has_max = gmax is not None
    grad_x = empty_like_layout(x)
    flat, strides = _nchw_strides(x, grad_x)
    _launch_tiled("channel_pool_backward", _pool_backward_kernel, x, acc,
                  (gavg, gmax if has_max else gavg, x, mx, grad_x), strides, HAS_MAX=has_max, FLAT=flat)
    return grad_x


# Elements of the [BLOCK_N, BLOCK_P] tile that sums the per-sample partials (test hook).
_SUM_ROWS_ELEMENTS = 4096


def _sum_rows_blocks(npart: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_P) of the fixed-order sum of an (N, npart) partials buffer: every
    column in one program, BLOCK_N samples at a time.

    Independent of N, so a new batch size compiles nothing new."""
    block_p = _pow2(npart)
    return max(1, _SUM_ROWS_ELEMENTS // block_p), block_p


def _gate_scalars(alpha, beta, mode: GateMode, acc: torch.dtype, dummy: torch.Tensor):
    if mode != GateMode.MIX:
        return dummy, dummy
    return _acc_vector(alpha, acc), _acc_vector(beta, acc)


@_op("channel_gate")
def channel_gate(
    avg: torch.Tensor,
    max: torch.Tensor,
    weight: torch.Tensor,
    alpha: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    mode: int,
) -> torch.Tensor:
    """gate = sigmoid(conv1d_over_C(f)), f by mode (GateMode: avg, max, mix); (N, C) acc."""
    acc = accumulate_dtype(avg.dtype)
    a, m = _in_acc(avg, acc), _in_acc(max, acc)
    mode = check_channel_gate(a, m, weight, alpha, beta, mode)
    _nonempty("channel_gate", "avg", avg)
    n, c = avg.shape
    k = weight.numel()
    wt = _acc_vector(weight, acc)
    al, be = _gate_scalars(alpha, beta, mode, acc, wt)
    gate = torch.empty((n, c), dtype=acc, device=avg.device)
    block_c = _pow2(c)
    wrap_triton(_gate_kernel)[(n,)](
        a, m, wt, al, be, gate,
        c,
        K=k, PAD=(k - 1) // 2, MODE=int(mode), BLOCK_C=block_c, num_warps=_gate_warps(block_c),
    )
    return gate


@_op("channel_gate_backward")
def channel_gate_backward(
    grad_gate: torch.Tensor,
    gate: torch.Tensor,
    avg: torch.Tensor,
    max: torch.Tensor,
    weight: torch.Tensor,
    alpha: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    mode: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_avg, grad_max, grad_weight, grad_alpha, grad_beta) of channel_gate."""
    acc = accumulate_dtype(avg.dtype)
    gg, g, a, m = (_in_acc(t, acc) for t in (grad_gate, gate, avg, max))
    mode = check_channel_gate_backward(gg, g, a, m, weight, alpha, beta, mode)
    _nonempty("channel_gate_backward", "avg", avg)
    n, c = avg.shape
    k = weight.numel()
    wt = _acc_vector(weight, acc)
    al, be = _gate_scalars(alpha, beta, mode, acc, wt)

    npart = k + 2 if mode == GateMode.MIX else k
    grad_avg = torch.empty((n, c), dtype=acc, device=avg.device)
    grad_max = torch.empty((n, c), dtype=acc, device=avg.device)
    partials = torch.empty((n, npart), dtype=acc, device=avg.device)
    block_c = _pow2(c)
    wrap_triton(_gate_backward_kernel)[(n,)](
        gg, g, a, m, wt, al, be,
        grad_avg, grad_max, partials,
        c,
        K=k, PAD=(k - 1) // 2, MODE=int(mode), NPART=npart, BLOCK_C=block_c,
        num_warps=_gate_warps(block_c),
    )
    sums = _sum_partials(partials, _sum_rows_blocks(npart))

    grad_weight = _like_param(sums[:k], weight)
    if mode == GateMode.MIX:
        grad_alpha = sums[k].to(alpha.dtype, copy=True)
        grad_beta = sums[k + 1].to(beta.dtype, copy=True)
    else:
        grad_alpha = torch.zeros((), dtype=acc, device=avg.device)
        grad_beta = torch.zeros((), dtype=acc, device=avg.device)
    return grad_avg, grad_max, grad_weight, grad_alpha, grad_beta


@_op("channel_rescale")
def channel_rescale(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """y = x * gate[:, :, None, None], multiplied in acc(x), x's dtype and layout."""
    acc = accumulate_dtype(x.dtype)
    gt = _in_acc(gate, acc)
    check_channel_rescale(x, gt)
    _nonempty("channel_rescale", "x", x)
    y = empty_like_layout(x)
    flat, strides = _nchw_strides(x, y)
    _launch_tiled("channel_rescale", _rescale_kernel, x, acc, (x, gt, y), strides, FLAT=flat)
    return y


@_op("channel_rescale_backward")
def channel_rescale_backward(
    grad_y: torch.Tensor, x: torch.Tensor, gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_x = grad_y * gate (x's dtype and layout); grad_gate = sum_hw grad_y * x ((N, C) acc)."""
    acc = accumulate_dtype(x.dtype)
    gt = _in_acc(gate, acc)
    check_channel_rescale_backward(grad_y, x, gt)
    _nonempty("channel_rescale_backward", "x", x)
    grad_x = empty_like_layout(x)
    grad_gate = torch.empty(x.shape[:2], dtype=acc, device=x.device)
    flat, strides = _nchw_strides(grad_y, x, grad_x)
    _launch_tiled("channel_rescale_backward", _rescale_backward_kernel, x, acc,
                  (grad_y, x, gt, grad_x, grad_gate), strides, FLAT=flat)
    return grad_x, grad_gate


# Importing this module gives the ops their autograd and the hot path's composite ops.
register_hot_path(HOT_PATH, "attnkernels_triton")
