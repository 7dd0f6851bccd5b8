"""Triton kernels of the triplet hot path (Triplet attention's three poolings and its apply).

Registers four ops under `torch.ops.attnkernels_triton` with the schemas and the math of
`csrc/triplet_ops.cpp` (docs/contract.md#triplet; the tie and NaN rules of "Shared rules"), and,
on import, their fakes and autograd (`attnkernels.ops.triplet`):

    triplet_pool(x) -> (d_hw, d_cw, d_hc)
    triplet_pool_backward(grad_d_hw, grad_d_cw, grad_d_hc, x, d_hw, d_cw, d_hc) -> grad_x
    triplet_apply(x, s_hw, s_cw, s_hc) -> y
    triplet_apply_backward(grad_y, x, s_hw, s_cw, s_hc) -> (grad_x, grad_s_hw, grad_s_cw, grad_s_hc)

x is (N, C, H, W) with any strides: the kernels take every stride, so NCHW, channels_last and
sliced views run without a copy. Outputs shaped like x (y, grad_x) are in x's dtype and layout
(`empty_like_layout`, as the CPU ops). The maps d_* (N, 2, ., .), the gates s_* and their
gradients (N, 1, ., .) are NCHW-contiguous in acc(x): float64 for float64 x, float32
otherwise (map arguments of another floating dtype or strides are cast first). The argument
checks are the op module's (`attnkernels.ops.triplet.check_<op>`), worded as the C++ ops'.

One design for every op over x (`_tiles`): a program per (sample n, block of BLOCK_C channels,
tile of BLOCK_W columns w) walks the rows h = 0 .. H-1, one [BLOCK_C, BLOCK_W] tile of x per
row, so x is read once per pass. Of the three maps, the program owns its (c, w) block of the
cw plane (reduced over h: accumulated in registers across the rows, stored once at the end),
and holds, per row, its channels' part of the hw plane (reduced over c: a [BLOCK_W] partial
per channel block) and its columns' part of the hc plane (reduced over w: a [BLOCK_C] partial
per column tile). Partials go to a buffer (N, k, blocks, plane) that a second small kernel
combines over the blocks in order (`_combine_kernel`, or `_common._sum_partials` for sums
alone); with a single block (C <= BLOCK_C, or W <= BLOCK_W) the program stores the map itself.
Every reduction is in a fixed order: no atomics, the results do not depend on the launch.

  * pool: max and sum of each map; the max propagates NaN as torch.amax (`_max_update`,
    `_max_reduce`); the mean is the sum over the line divided by its length L (correctly
    rounded, `_common._div`).
  * pool backward: a first pass counts, per line, the elements tied with its max M (cnt,
    combined as the maps); a = grad_d[.., 0] / cnt and b = grad_d[.., 1] / L on the small maps
    in torch; a second pass writes grad_x = sum over hw, cw, hc of [x == M] * a + b (the
    literal product: a NaN M ties nothing, cnt = 0, and 0 * inf is NaN on the whole line).
  * apply: y = (x * s_hw + x * s_cw + x * s_hc) / 3, in that order; s_cw's tile is loaded once.
  * apply backward: g = grad_y / 3, grad_x = g * s_hw + g * s_cw + g * s_hc, and the three sums
    of g * x: grad_s_cw owned, grad_s_hw and grad_s_hc as partials.

Every launch over x goes through `_common._launch_measured` (the rule's tile, and on a GPU half
and twice its elements, measured once per shape; a launch function makes its own partials).

On a machine without a GPU set TRITON_INTERPRET=1 before importing this module; the ops then
run on CPU tensors under the Triton interpreter.
"""
from typing import Any, Callable, Optional

import torch
import triton
import triton.language as tl

from ..ops import register_hot_path
from ..ops._common import empty_like_layout
from ..ops.triplet import (
    check_triplet_apply,
    check_triplet_apply_backward,
    check_triplet_pool,
    check_triplet_pool_backward,
)
from ..reference.formulas import accumulate_dtype
from ._common import (
    _channel_block,
    _div,
    _in_acc,
    _launch_measured,
    _max_reduce,
    _max_update,
    _min_programs,
    _nonempty,
    _op_registrar,
    _pow2,
    _sum_partials,
)
from ._compat import wrap_triton

HOT_PATH = "triplet"

__all__ = [
    "triplet_pool",
    "triplet_pool_backward",
    "triplet_apply",
    "triplet_apply_backward",
]


# ----------------------------------------------------------------------------------------
# Host-side helpers: tiles
# ----------------------------------------------------------------------------------------
# Elements of one [BLOCK_C, BLOCK_W] tile, per accumulation dtype: a program holds about five
# such tiles (x, the cw accumulators or gates, the output). Module attributes, so tests can
# force many small tiles and blocks.
_TILE_ELEMENTS = {torch.float32: 2048, torch.float64: 1024}
# Widest column tile where w is x's contiguous dimension (NCHW): wide rows coalesce, and a
# plane wider than this splits the hc map into partials.
_MAX_BLOCK_W = 128
# Widest channel block where channels are x's contiguous dimension (channels_last), before the
# tile is filled up to its elements along c when W is narrow.
_MAX_BLOCK_C_CHANNELS_LAST = 64
# Narrowest channel block the program count may shrink a block to (more hw partials below).
_MIN_BLOCK_C = 16
# Tile of the combine kernel: up to _COMBINE_BLOCK_P plane entries, _COMBINE_TILE elements.
_COMBINE_BLOCK_P = 256
_COMBINE_TILE = 2048


def _tiles(x: torch.Tensor, acc: torch.dtype, tile: Optional[int] = None) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_W) of the per-(n, channel block, column tile) programs, `tile` elements
    at most (default: _TILE_ELEMENTS of acc).

    The tile's long side follows x's contiguous dimension (C for channels_last, W otherwise) so
    loads coalesce; the channel block shrinks while the grid has fewer programs than the device
    runs at once, down to _MIN_BLOCK_C scaled as `tile` is to the rule's: the measured
    candidates (half and twice the rule's elements) then differ also where that floor binds
    (more programs, or fewer hw partials).
    """
    n, c, h, w = x.shape
    rule = _TILE_ELEMENTS[acc]
    tile = rule if tile is None else tile
    min_block_c = max(1, _MIN_BLOCK_C * tile // rule)
    if c > 1 and h * w > 1 and x.stride(1) == 1:  # channels are contiguous
        block_c = min(_pow2(c), _MAX_BLOCK_C_CHANNELS_LAST, tile)
        block_w = min(_pow2(w), max(1, tile // block_c))
        block_c = min(_pow2(c), max(block_c, tile // block_w))  # keep the tile full
    else:
        block_w = min(_pow2(w), _MAX_BLOCK_W, tile)
        block_c = min(_pow2(c), max(1, tile // block_w))
    min_programs = _min_programs(x.device)
    while block_c > min_block_c and n * triton.cdiv(c, block_c) * triton.cdiv(w, block_w) < min_programs:
        block_c //= 2
    return block_c, block_w


def _tile_warps(block_c: int, block_w: int) -> int:
    """8 warps from 2048 elements (about five fp32 tiles live at once), else 4."""
    return 8 if block_c * block_w >= 2048 else 4


def _launch_tiled(op: str, x: torch.Tensor, acc: torch.dtype, launch: Callable[..., Any]) -> Any:
    """`launch(block_c=, block_hw=, num_warps=)` (block_hw: the tile's BLOCK_W columns) of one op's
    kernels over x, in the tile configuration measured fastest on a GPU for this op, x's shape,
    dtype and layout (`_common._launch_measured`; candidates: the rule's tile, half and twice
    its elements)."""
    return _launch_measured(op, x, lambda elements: _tiles(x, acc, elements), _TILE_ELEMENTS[acc],
                            _tile_warps, launch)


class _Grid:
    """The launch geometry of one tile configuration over x: blocks, grid, and the strides."""

    def __init__(self, x: torch.Tensor, block_c: int, block_w: int):
        self.n, self.c, self.h, self.w = (int(v) for v in x.shape)
        self.num_cb = triton.cdiv(self.c, block_c)
        self.num_wt = triton.cdiv(self.w, block_w)
        self.size = (self.n * self.num_cb * self.num_wt,)

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        """The kernels' (C, H, W, num_cb, num_wt) arguments."""
        return self.c, self.h, self.w, self.num_cb, self.num_wt

    def split_hw(self) -> bool:
        """Whether the hw plane (reduced over c) comes in per-channel-block partials."""
        return self.num_cb > 1

    def split_hc(self) -> bool:
        """Whether the hc plane (reduced over w) comes in per-column-tile partials."""
        return self.num_wt > 1


def _partials_or(out: torch.Tensor, split: bool, n: int, k: int, blocks: int, plane: int) -> torch.Tensor:
    """Where a program stores its part of a map reduced across programs: a (N, k, blocks,
    plane) buffer of partials if split, else the map `out` itself (its layout is the buffer's
    with one block)."""
    if not split:
        return out
    return torch.empty((n, k, blocks, plane), dtype=out.dtype, device=out.device)


def _combine(part: torch.Tensor, d: torch.Tensor, length: int) -> None:
    """d (N, 2, plane) = [max over blocks (NaN-propagating), sum over blocks / length] of the
    (N, 2, blocks, plane) partials, blocks in order."""
    n, _, blocks, plane = part.shape
    block_p = min(_pow2(plane), _COMBINE_BLOCK_P)
    block_b = min(_pow2(blocks), max(1, _COMBINE_TILE // block_p))
    num_pb = triton.cdiv(plane, block_p)
    wrap_triton(_combine_kernel)[(n * num_pb,)](
        part, d, blocks, plane, length, num_pb, BLOCK_B=block_b, BLOCK_P=block_p,
    )


def _summed(part: torch.Tensor, split: bool) -> torch.Tensor:
    """(N, plane) sums of (N, blocks, plane) partials in order; the buffer itself unsplit."""
    return _sum_partials(part) if split else part.reshape(part.shape[0], part.shape[-1])


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _wide(n, v):
    """The int v as an int64 scalar (n: an int64 scalar), so that products of sizes (a plane,
    a partials buffer's plane) past 2**31 stay exact."""
    return n * 0 + v


@triton.jit
def _program(C, W, num_cb, num_wt, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    """This program's sample n (int64), channel block cb, column tile wt, its channels c and
    columns w with their masks. The grid is 1-D over (n, cb, wt), column tiles fastest."""
    pid = tl.program_id(0)
    wt = pid % num_wt
    rest = pid // num_wt
    cb = rest % num_cb
    n = (rest // num_cb).to(tl.int64)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    w = wt * BLOCK_W + tl.arange(0, BLOCK_W)
    return n, cb, wt, c, c < C, w, w < W


@triton.jit
def _cw_offsets(c, w, s_c, s_w):
    """int64 offsets of the [BLOCK_C, BLOCK_W] tile (c, w) of a row, strides s_c, s_w."""
    return c.to(tl.int64)[:, None] * s_c + w.to(tl.int64)[None, :] * s_w


@triton.jit
def _pool_kernel(
    x_ptr, cw_ptr, hw_ptr, hc_ptr,
    C, H, W, num_cb, num_wt,
    sx_n, sx_c, sx_h, sx_w,
    SPLIT_HW: tl.constexpr, SPLIT_HC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """d_cw of the program's (c, w) block; per row h its partial (or, unsplit, final) hw and hc.
    hw_ptr: (N, 2, num_cb, H*W) partials or d_hw; hc_ptr: (N, 2, num_wt, H*C) or d_hc."""
    ACC = cw_ptr.dtype.element_ty
    n, cb, wt, c, c_mask, w, w_mask = _program(C, W, num_cb, num_wt, BLOCK_C, BLOCK_W)
    mask = c_mask[:, None] & w_mask[None, :]
    x_cw = _cw_offsets(c, w, sx_c, sx_w)
    x_row = n * sx_n  # int64, advanced by sx_h per row
    HW = _wide(n, H) * W
    HC = _wide(n, H) * C
    hw_at = (n * 2 * num_cb + cb) * HW + w  # plane 0 at row 0; plane 1 is num_cb*HW further
    hc_at = (n * 2 * num_wt + wt) * HC + c
    cw_max = tl.full([BLOCK_C, BLOCK_W], float("-inf"), dtype=ACC)
    cw_sum = tl.zeros([BLOCK_C, BLOCK_W], dtype=ACC)
    for h in range(0, H):
        v = tl.load(x_ptr + x_row + x_cw, mask=mask, other=0.0).to(ACC)
        vm = tl.where(mask, v, float("-inf"))
        cw_max = _max_update(cw_max, vm)
        cw_sum += v  # masked lanes are 0
        hw_max = _max_reduce(vm, 0)
        hw_sum = tl.sum(v, axis=0)
        hc_max = _max_reduce(vm, 1)
        hc_sum = tl.sum(v, axis=1)
        if not SPLIT_HW:
            hw_sum = _div(hw_sum, C)
        if not SPLIT_HC:
            hc_sum = _div(hc_sum, W)
        tl.store(hw_ptr + hw_at, hw_max, mask=w_mask)
        tl.store(hw_ptr + hw_at + num_cb * HW, hw_sum, mask=w_mask)
        tl.store(hc_ptr + hc_at, hc_max, mask=c_mask)
        tl.store(hc_ptr + hc_at + num_wt * HC, hc_sum, mask=c_mask)
        x_row += sx_h
        hw_at += W
        hc_at += C
    cw_at = (n * 2 * C + c.to(tl.int64))[:, None] * W + w[None, :]  # d_cw[n, 0, c, w]
    tl.store(cw_ptr + cw_at, cw_max, mask=mask)
    tl.store(cw_ptr + cw_at + _wide(n, C) * W, _div(cw_sum, H), mask=mask)


@triton.jit
def _combine_kernel(part_ptr, d_ptr, B, P, L, num_pb, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    """d[n, 0, p] = max_b part[n, 0, b, p] (NaN-propagating), d[n, 1, p] = sum_b part[n, 1, b, p]
    / L, for this program's sample n and BLOCK_P entries p; the blocks b in a fixed order."""
    ACC = d_ptr.dtype.element_ty
    n, p, p_mask = _channel_block(num_pb, P, BLOCK_P)
    mx = tl.full([BLOCK_B, BLOCK_P], float("-inf"), dtype=ACC)
    sm = tl.zeros([BLOCK_B, BLOCK_P], dtype=ACC)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        mask = (b < B)[:, None] & p_mask[None, :]
        at = (n * 2 * B + b)[:, None] * P + p[None, :]
        mx = _max_update(mx, tl.load(part_ptr + at, mask=mask, other=float("-inf")))
        sm += tl.load(part_ptr + at + _wide(n, B) * P, mask=mask, other=0.0)
    tl.store(d_ptr + n * 2 * P + p, _max_reduce(mx, 0), mask=p_mask)
    tl.store(d_ptr + n * 2 * P + P + p, _div(tl.sum(sm, axis=0), L), mask=p_mask)


@triton.jit
def _count_kernel(
    x_ptr, d_hw_ptr, d_cw_ptr, d_hc_ptr, cnt_cw_ptr, cnt_hw_ptr, cnt_hc_ptr,
    C, H, W, num_cb, num_wt,
    sx_n, sx_c, sx_h, sx_w,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """The tie counts cnt = #{x == M} of the three maps' lines (M: plane 0 of d_*; a NaN M
    ties nothing): cnt_cw (N, C, W) of the program's block; per row, the hw counts of its
    channels (N, num_cb, H*W) and the hc counts of its columns (N, num_wt, H*C), in acc."""
    ACC = cnt_cw_ptr.dtype.element_ty
    n, cb, wt, c, c_mask, w, w_mask = _program(C, W, num_cb, num_wt, BLOCK_C, BLOCK_W)
    mask = c_mask[:, None] & w_mask[None, :]
    x_cw = _cw_offsets(c, w, sx_c, sx_w)
    x_row = n * sx_n
    HW = _wide(n, H) * W
    HC = _wide(n, H) * C
    cw_at = (n * C + c.to(tl.int64))[:, None] * W + w[None, :]  # (n, c, w) of a one-plane map
    M_cw = tl.load(d_cw_ptr + cw_at + n * C * W, mask=mask, other=0.0)  # d_cw[n, 0, c, w]
    M_hw_at = n * 2 * HW + w  # d_hw[n, 0, 0, w]
    M_hc_at = n * 2 * HC + c
    cnt_hw_at = (n * num_cb + cb) * HW + w
    cnt_hc_at = (n * num_wt + wt) * HC + c
    cnt_cw = tl.zeros([BLOCK_C, BLOCK_W], dtype=tl.int32)
    for h in range(0, H):
        v = tl.load(x_ptr + x_row + x_cw, mask=mask, other=0.0).to(ACC)
        M_hw = tl.load(d_hw_ptr + M_hw_at, mask=w_mask, other=0.0)
        M_hc = tl.load(d_hc_ptr + M_hc_at, mask=c_mask, other=0.0)
        cnt_cw += (mask & (v == M_cw)).to(tl.int32)
        tie_hw = (mask & (v == M_hw[None, :])).to(tl.int32)
        tie_hc = (mask & (v == M_hc[:, None])).to(tl.int32)
        tl.store(cnt_hw_ptr + cnt_hw_at, tl.sum(tie_hw, axis=0).to(ACC), mask=w_mask)
        tl.store(cnt_hc_ptr + cnt_hc_at, tl.sum(tie_hc, axis=1).to(ACC), mask=c_mask)
        x_row += sx_h
        M_hw_at += W
        M_hc_at += C
        cnt_hw_at += W
        cnt_hc_at += C
    tl.store(cnt_cw_ptr + cw_at, cnt_cw.to(ACC), mask=mask)


@triton.jit
def _pool_grad_kernel(
    x_ptr, gx_ptr, d_hw_ptr, d_cw_ptr, d_hc_ptr,
    a_hw_ptr, a_cw_ptr, a_hc_ptr, b_hw_ptr, b_cw_ptr, b_hc_ptr,
    C, H, W, num_cb, num_wt,
    sx_n, sx_c, sx_h, sx_w,
    so_n, so_c, so_h, so_w,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """grad_x = sum over hw, cw, hc (in that order) of [x == M] * a + b, with M plane 0 of d_*,
    a = grad_d[.., 0] / cnt and b = grad_d[.., 1] / L one-plane maps (N, rows, cols)."""
    ACC = a_hw_ptr.dtype.element_ty
    n, cb, wt, c, c_mask, w, w_mask = _program(C, W, num_cb, num_wt, BLOCK_C, BLOCK_W)
    mask = c_mask[:, None] & w_mask[None, :]
    x_cw = _cw_offsets(c, w, sx_c, sx_w)
    o_cw = _cw_offsets(c, w, so_c, so_w)
    x_row = n * sx_n
    o_row = n * so_n
    HW = _wide(n, H) * W
    HC = _wide(n, H) * C
    cw_at = (n * C + c.to(tl.int64))[:, None] * W + w[None, :]
    M_cw = tl.load(d_cw_ptr + cw_at + n * C * W, mask=mask, other=0.0)
    a_cw = tl.load(a_cw_ptr + cw_at, mask=mask, other=0.0)
    b_cw = tl.load(b_cw_ptr + cw_at, mask=mask, other=0.0)
    hw_at = n * HW + w  # (n, h, w) of a one-plane map; d_hw's plane 0 is n * HW further
    hc_at = n * HC + c
    for h in range(0, H):
        v = tl.load(x_ptr + x_row + x_cw, mask=mask, other=0.0).to(ACC)
        M_hw = tl.load(d_hw_ptr + hw_at + n * HW, mask=w_mask, other=0.0)
        a_hw = tl.load(a_hw_ptr + hw_at, mask=w_mask, other=0.0)
        b_hw = tl.load(b_hw_ptr + hw_at, mask=w_mask, other=0.0)
        M_hc = tl.load(d_hc_ptr + hc_at + n * HC, mask=c_mask, other=0.0)
        a_hc = tl.load(a_hc_ptr + hc_at, mask=c_mask, other=0.0)
        b_hc = tl.load(b_hc_ptr + hc_at, mask=c_mask, other=0.0)
        # The indicator is a literal product: 0 * inf (a NaN M's line) is NaN.
        t_hw = (v == M_hw[None, :]).to(ACC) * a_hw[None, :] + b_hw[None, :]
        t_cw = (v == M_cw).to(ACC) * a_cw + b_cw
        t_hc = (v == M_hc[:, None]).to(ACC) * a_hc[:, None] + b_hc[:, None]
        gx = t_hw + t_cw + t_hc
        tl.store(gx_ptr + o_row + o_cw, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        x_row += sx_h
        o_row += so_h
        hw_at += W
        hc_at += C


@triton.jit
def _apply_kernel(
    x_ptr, y_ptr, s_hw_ptr, s_cw_ptr, s_hc_ptr,
    C, H, W, num_cb, num_wt,
    sx_n, sx_c, sx_h, sx_w,
    so_n, so_c, so_h, so_w,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """y = (x * s_hw + x * s_cw + x * s_hc) / 3 in acc, summed in that order."""
    ACC = s_hw_ptr.dtype.element_ty
    n, cb, wt, c, c_mask, w, w_mask = _program(C, W, num_cb, num_wt, BLOCK_C, BLOCK_W)
    mask = c_mask[:, None] & w_mask[None, :]
    x_cw = _cw_offsets(c, w, sx_c, sx_w)
    o_cw = _cw_offsets(c, w, so_c, so_w)
    x_row = n * sx_n
    o_row = n * so_n
    s_cw = tl.load(s_cw_ptr + (n * C + c.to(tl.int64))[:, None] * W + w[None, :], mask=mask, other=0.0)
    hw_at = n * H * W + w
    hc_at = n * H * C + c
    for h in range(0, H):
        v = tl.load(x_ptr + x_row + x_cw, mask=mask, other=0.0).to(ACC)
        s_hw = tl.load(s_hw_ptr + hw_at, mask=w_mask, other=0.0)
        s_hc = tl.load(s_hc_ptr + hc_at, mask=c_mask, other=0.0)
        y = v * s_hw[None, :] + v * s_cw + v * s_hc[:, None]
        tl.store(y_ptr + o_row + o_cw, _div(y, 3.0).to(y_ptr.dtype.element_ty), mask=mask)
        x_row += sx_h
        o_row += so_h
        hw_at += W
        hc_at += C


@triton.jit
def _apply_grad_kernel(
    gy_ptr, x_ptr, gx_ptr, s_hw_ptr, s_cw_ptr, s_hc_ptr, gs_cw_ptr, gs_hw_ptr, gs_hc_ptr,
    C, H, W, num_cb, num_wt,
    sg_n, sg_c, sg_h, sg_w,
    sx_n, sx_c, sx_h, sx_w,
    so_n, so_c, so_h, so_w,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """g = grad_y / 3; grad_x = g * s_hw + g * s_cw + g * s_hc; the sums of g * x: grad_s_cw
    (N, 1, C, W) of the program's block, per row the hw sums of its channels (N, num_cb, H*W)
    and the hc sums of its columns (N, num_wt, H*C), in acc."""
    ACC = s_hw_ptr.dtype.element_ty
    n, cb, wt, c, c_mask, w, w_mask = _program(C, W, num_cb, num_wt, BLOCK_C, BLOCK_W)
    mask = c_mask[:, None] & w_mask[None, :]
    g_cw = _cw_offsets(c, w, sg_c, sg_w)
    x_cw = _cw_offsets(c, w, sx_c, sx_w)
    o_cw = _cw_offsets(c, w, so_c, so_w)
    g_row = n * sg_n
    x_row = n * sx_n
    o_row = n * so_n
    HW = _wide(n, H) * W
    HC = _wide(n, H) * C
    cw_at = (n * C + c.to(tl.int64))[:, None] * W + w[None, :]
    s_cw = tl.load(s_cw_ptr + cw_at, mask=mask, other=0.0)
    hw_at = n * HW + w
    hc_at = n * HC + c
    gs_hw_at = (n * num_cb + cb) * HW + w
    gs_hc_at = (n * num_wt + wt) * HC + c
    gs_cw = tl.zeros([BLOCK_C, BLOCK_W], dtype=ACC)
    for h in range(0, H):
        g = _div(tl.load(gy_ptr + g_row + g_cw, mask=mask, other=0.0).to(ACC), 3.0)
        v = tl.load(x_ptr + x_row + x_cw, mask=mask, other=0.0).to(ACC)
        s_hw = tl.load(s_hw_ptr + hw_at, mask=w_mask, other=0.0)
        s_hc = tl.load(s_hc_ptr + hc_at, mask=c_mask, other=0.0)
        gx = g * s_hw[None, :] + g * s_cw + g * s_hc[:, None]
        tl.store(gx_ptr + o_row + o_cw, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        gxv = g * v  # masked lanes: 0 * 0
        gs_cw += gxv
        tl.store(gs_hw_ptr + gs_hw_at, tl.sum(gxv, axis=0), mask=w_mask)
        tl.store(gs_hc_ptr + gs_hc_at, tl.sum(gxv, axis=1), mask=c_mask)
        g_row += sg_h
        x_row += sx_h
        o_row += so_h
        hw_at += W
        hc_at += C
        gs_hw_at += W
        gs_hc_at += C
    tl.store(gs_cw_ptr + cw_at, gs_cw, mask=mask)


# ----------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------
_op = _op_registrar(HOT_PATH)


def _map(x: torch.Tensor, k: int, rows: int, cols: int, acc: torch.dtype) -> torch.Tensor:
    """An (N, k, rows, cols) map of x in acc, NCHW-contiguous."""
    return torch.empty((x.shape[0], k, rows, cols), dtype=acc, device=x.device)


@_op("triplet_pool")
def triplet_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_hw, d_cw, d_hc): [max, mean] of x over C, over H and over W, in acc(x), in one read of
    x (NaN propagates through the maxima as torch.amax)."""
    check_triplet_pool(x)
    _nonempty("triplet_pool", "x", x)
    acc = accumulate_dtype(x.dtype)
    n, c, h, w = x.shape
    d_hw, d_cw, d_hc = _map(x, 2, h, w, acc), _map(x, 2, c, w, acc), _map(x, 2, h, c, acc)

    def launch(block_c: int, block_hw: int, num_warps: int) -> None:
        grid = _Grid(x, block_c, block_hw)
        part_hw = _partials_or(d_hw, grid.split_hw(), n, 2, grid.num_cb, h * w)
        part_hc = _partials_or(d_hc, grid.split_hc(), n, 2, grid.num_wt, h * c)
        wrap_triton(_pool_kernel)[grid.size](
            x, d_cw, part_hw, part_hc, *grid.dims, *x.stride(),
            SPLIT_HW=grid.split_hw(), SPLIT_HC=grid.split_hc(), BLOCK_C=block_c, BLOCK_W=block_hw,
            num_warps=num_warps,
        )
        if grid.split_hw():
            _combine(part_hw, d_hw, c)
        if grid.split_hc():
            _combine(part_hc, d_hc, w)

    _launch_tiled("triplet_pool", x, acc, launch)
    return d_hw, d_cw, d_hc


@_op("triplet_pool_backward")
def triplet_pool_backward(
    grad_d_hw: torch.Tensor,
    grad_d_cw: torch.Tensor,
    grad_d_hc: torch.Tensor,
    x: torch.Tensor,
    d_hw: torch.Tensor,
    d_cw: torch.Tensor,
    d_hc: torch.Tensor,
) -> torch.Tensor:
    """grad_x of triplet_pool: per map, the mean's gradient shared evenly over its line and the
    max's over the elements tied with it (a NaN max gives NaN, as torch.amax); summed over the
    maps hw, cw, hc in that order, in x's dtype and layout."""
    acc = accumulate_dtype(x.dtype)
    gd_hw, gd_cw, gd_hc, m_hw, m_cw, m_hc = (_in_acc(t, acc) for t in (grad_d_hw, grad_d_cw, grad_d_hc, d_hw, d_cw,
                                                                         d_hc))
    check_triplet_pool_backward(gd_hw, gd_cw, gd_hc, x, m_hw, m_cw, m_hc)
    _nonempty("triplet_pool_backward", "x", x)
    n, c, h, w = x.shape
    grad_x = empty_like_layout(x)

    def launch(block_c: int, block_hw: int, num_warps: int) -> None:
        grid = _Grid(x, block_c, block_hw)
        cnt_cw = _map(x, 1, c, w, acc)
        cnt_hw = torch.empty((n, grid.num_cb, h * w), dtype=acc, device=x.device)
        cnt_hc = torch.empty((n, grid.num_wt, h * c), dtype=acc, device=x.device)
        wrap_triton(_count_kernel)[grid.size](
            x, m_hw, m_cw, m_hc, cnt_cw, cnt_hw, cnt_hc, *grid.dims, *x.stride(),
            BLOCK_C=block_c, BLOCK_W=block_hw, num_warps=num_warps,
        )
        cnt = {"hw": _summed(cnt_hw, grid.split_hw()).view(n, h, w), "cw": cnt_cw.view(n, c, w),
               "hc": _summed(cnt_hc, grid.split_hc()).view(n, h, c)}
        # a = grad_d[.., 0] / cnt (inf or NaN where cnt = 0) and b = grad_d[.., 1] / L: small maps.
        gd = {"hw": gd_hw, "cw": gd_cw, "hc": gd_hc}
        length = {"hw": c, "cw": h, "hc": w}
        a = {k: (gd[k][:, 0] / cnt[k]).contiguous() for k in gd}
        b = {k: (gd[k][:, 1] / length[k]).contiguous() for k in gd}
        wrap_triton(_pool_grad_kernel)[grid.size](
            x, grad_x, m_hw, m_cw, m_hc, a["hw"], a["cw"], a["hc"], b["hw"], b["cw"], b["hc"],
            *grid.dims, *x.stride(), *grad_x.stride(),
            BLOCK_C=block_c, BLOCK_W=block_hw, num_warps=num_warps,
        )

    _launch_tiled("triplet_pool_backward", x, acc, launch)
    return grad_x


@_op("triplet_apply")
def triplet_apply(x: torch.Tensor, s_hw: torch.Tensor, s_cw: torch.Tensor, s_hc: torch.Tensor) -> torch.Tensor:
    """y = (x * s_hw + x * s_cw + x * s_hc) / 3 in acc(x), summed in that order; x's dtype and
    layout."""
    acc = accumulate_dtype(x.dtype)
    g_hw, g_cw, g_hc = (_in_acc(t, acc) for t in (s_hw, s_cw, s_hc))
    check_triplet_apply(x, g_hw, g_cw, g_hc)
    _nonempty("triplet_apply", "x", x)
    y = empty_like_layout(x)

    def launch(block_c: int, block_hw: int, num_warps: int) -> None:
        grid = _Grid(x, block_c, block_hw)
        wrap_triton(_apply_kernel)[grid.size](
            x, y, g_hw, g_cw, g_hc, *grid.dims, *x.stride(), *y.stride(),
            BLOCK_C=block_c, BLOCK_W=block_hw, num_warps=num_warps,
        )

    _launch_tiled("triplet_apply", x, acc, launch)
    return y


@_op("triplet_apply_backward")
def triplet_apply_backward(
    grad_y: torch.Tensor, x: torch.Tensor, s_hw: torch.Tensor, s_cw: torch.Tensor, s_hc: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_s_hw, grad_s_cw, grad_s_hc) of triplet_apply: g = grad_y / 3, grad_x =
    g * s_hw + g * s_cw + g * s_hc in x's dtype and layout; grad_s_* the sums of g * x over the
    gate's broadcast axis, (N, 1, ., .) in acc(x)."""
    acc = accumulate_dtype(x.dtype)
    g_hw, g_cw, g_hc = (_in_acc(t, acc) for t in (s_hw, s_cw, s_hc))
    check_triplet_apply_backward(grad_y, x, g_hw, g_cw, g_hc)
    _nonempty("triplet_apply_backward", "x", x)
    n, c, h, w = x.shape
    grad_x = empty_like_layout(x)
    grad_s_cw = _map(x, 1, c, w, acc)

    def launch(block_c: int, block_hw: int, num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
        grid = _Grid(x, block_c, block_hw)
        part_hw = torch.empty((n, grid.num_cb, h * w), dtype=acc, device=x.device)
        part_hc = torch.empty((n, grid.num_wt, h * c), dtype=acc, device=x.device)
        wrap_triton(_apply_grad_kernel)[grid.size](
            grad_y, x, grad_x, g_hw, g_cw, g_hc, grad_s_cw, part_hw, part_hc,
            *grid.dims, *grad_y.stride(), *x.stride(), *grad_x.stride(),
            BLOCK_C=block_c, BLOCK_W=block_hw, num_warps=num_warps,
        )
        return (_summed(part_hw, grid.split_hw()).view(n, 1, h, w),
                _summed(part_hc, grid.split_hc()).view(n, 1, h, c))

    grad_s_hw, grad_s_hc = _launch_tiled("triplet_apply_backward", x, acc, launch)
    return grad_x, grad_s_hw, grad_s_cw, grad_s_hc


# Importing this module gives the ops their autograd.
register_hot_path(HOT_PATH, "attnkernels_triton")
