"""Triton kernels of the ham_spatial hot path (HAM's spatial half, given the channel gate Ac).

Registers four ops under `torch.ops.attnkernels_triton` with the schemas and the math of
`csrc/ham_spatial_ops.cpp` (the ops' math; docs/contract.md#ham for the tie and NaN rules), and, on
import, their autograd (`attnkernels.ops.ham_spatial`):

    ham_spatial_pool(x, gate, c_im) -> (d1, d2, mask)
    ham_spatial_pool_backward(grad_d1, grad_d2, x, gate, mask, d1, d2, c_im) -> (grad_x, grad_gate)
    ham_spatial_apply(x, gate, mask, s1, s2) -> y
    ham_spatial_apply_backward(grad_y, x, gate, mask, s1, s2) -> (grad_x, grad_gate, grad_s1, grad_s2)

x is (N, C, H, W) with any strides: the kernels take every stride, so NCHW, channels_last
and sliced views run without a copy. Outputs shaped like x are channels_last when x is
channels_last-dense and not NCHW-contiguous, NCHW-contiguous otherwise. gate and mask are
(N, C), d1, d2 (N, 2, H, W) and s1, s2 (N, 1, H, W), all contiguous in acc(x): float64 for
float64 x, float32 otherwise (inputs of another floating dtype or strides are cast first). The
argument checks are the op module's (`check_<op>`), worded as the C++ ops'.

Kernels (all deterministic: no atomics, every reduction in a fixed order):
  * mask: one program per (n, block of channels c), looping over the channels j in chunks;
    counts the j that rank before each c ([BLOCK_C, BLOCK_J] comparisons, no sort).
  * pool, pool backward, apply, apply backward: one program per (n, block of BLOCK_HW
    pixels), looping over C in chunks of BLOCK_C. Reductions over C (d1, d2, tie counts,
    grad_s1, grad_s2) accumulate elementwise in a [BLOCK_C, BLOCK_HW] tile and are summed
    once at the end. The backward's tie counts need the whole channel max first: a first
    pass over C counts, a second writes grad_x.
  * grad_gate (a reduction over pixels, in pixel-block programs): each program stores its
    block's partial sums, (N, pixel blocks, C), and one program per (n, channel block) sums
    them over the pixel blocks in order (`_common._sum_partials`). With a single pixel block
    the partials are the result.

On a machine without a GPU set TRITON_INTERPRET=1 before importing this module; the ops
then run on CPU tensors under the Triton interpreter.
"""
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from ..ops import register_hot_path
from ..ops._common import empty_like_layout
from ..ops.ham_spatial import (
    check_ham_spatial_apply,
    check_ham_spatial_apply_backward,
    check_ham_spatial_pool,
    check_ham_spatial_pool_backward,
)
from ..reference.formulas import accumulate_dtype
from ._common import (
    _channel_block,
    _div,
    _hw_offsets,
    _in_acc,
    _launch_measured,
    _max_reduce,
    _max_update,
    _min_programs,
    _nchw_strides,
    _nonempty,
    _op_registrar,
    _pixel_block,
    _pow2,
    _sum_partials,
)
from ._compat import wrap_triton

HOT_PATH = "ham_spatial"

__all__ = [
    "ham_spatial_pool",
    "ham_spatial_pool_backward",
    "ham_spatial_apply",
    "ham_spatial_apply_backward",
]


# ----------------------------------------------------------------------------------------
# Host-side helpers: tiles
# ----------------------------------------------------------------------------------------
# Elements of one [BLOCK_C, BLOCK_HW] tile, per accumulation dtype (registers per thread stay
# modest at 4 warps). Module attributes, so tests can force many small tiles and blocks.
_TILE_ELEMENTS = {torch.float32: 2048, torch.float64: 1024}
# Pixels per program when pixels are x's contiguous dimension (NCHW): wide enough to
# coalesce, narrow enough that a feature map spreads over many programs.
_MAX_BLOCK_HW = 256
_MIN_BLOCK_HW = 8
# Widest channel chunk when channels are x's contiguous dimension (channels_last).
_MAX_BLOCK_C_CHANNELS_LAST = 64
# Channels per mask program, and the [BLOCK_C, BLOCK_J] comparisons each chunk holds.
_MASK_BLOCK_C = 64
_MASK_TILE_ELEMENTS = 2048
# Elements of the [BLOCK_P, BLOCK_C] tile that sums grad_gate's pixel-block partials.
_SUM_TILE_ELEMENTS = 2048


def _pixel_tiles(x: torch.Tensor, acc: torch.dtype, tile: Optional[int] = None) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) for the per-(n, pixel block) kernels, `tile` elements at most
    (default: _TILE_ELEMENTS of acc).

    The tile's long side follows x's contiguous dimension (C for channels_last, H*W
    otherwise) so loads coalesce; the pixel block shrinks while the grid has fewer programs
    than the device can run at once.
    """
    n, c, h, w = x.shape
    hw = h * w
    tile = _TILE_ELEMENTS[acc] if tile is None else tile
    min_programs = _min_programs(x.device)
    if c > 1 and hw > 1 and x.stride(1) == 1:  # channels are contiguous
        block_c = min(_pow2(c), _MAX_BLOCK_C_CHANNELS_LAST, tile)
        block_hw = min(_pow2(hw), max(1, tile // block_c))
        while block_hw > 1 and n * triton.cdiv(hw, block_hw) < min_programs:
            block_hw //= 2
        block_c = min(_pow2(c), max(block_c, tile // block_hw))  # keep the tile full
    else:
        block_hw = min(_pow2(hw), _MAX_BLOCK_HW, tile)
        while block_hw > _MIN_BLOCK_HW and n * triton.cdiv(hw, block_hw) < min_programs:
            block_hw //= 2
        block_c = min(_pow2(c), max(1, tile // block_hw))
    return block_c, block_hw


def _pixel_warps(block_c: int, block_hw: int) -> int:
    """Warps per pixel-tile program: 8 for tiles of 2048+ elements, whose fp32 accumulators
    spill at 4 warps on sm_90 (ptxas: ~165 registers per thread at 4 warps, ~100 at 8)."""
    return 8 if block_c * block_hw >= 2048 else 4


def _launch_pixel_tiled(op: str, x: torch.Tensor, acc: torch.dtype, launch) -> Any:
    """`launch(block_c, block_hw, num_warps)` of one per-(n, pixel block) kernel over x, in the
    tile configuration measured fastest on a GPU for this op, x's shape, dtype and layout
    (`_common._launch_measured`; candidates: the rule's tile, half and twice its elements)."""
    return _launch_measured(op, x, lambda elements: _pixel_tiles(x, acc, elements), _TILE_ELEMENTS[acc],
                            _pixel_warps, launch)


def _mask_blocks(c: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_J) of the rank-count kernel."""
    block_c = min(_pow2(c), _MASK_BLOCK_C)
    return block_c, min(_pow2(c), max(1, _MASK_TILE_ELEMENTS // block_c))


def _sum_blocks(npb: int, c: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of the fixed-order sum of (N, npb, C) partials."""
    block_c = min(_pow2(c), 128)
    return min(_pow2(npb), max(1, _SUM_TILE_ELEMENTS // block_c)), block_c


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _mask_kernel(
    gate_ptr, mask_ptr, C, c_im, num_cb,
    BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
):
    ACC = mask_ptr.dtype.element_ty
    n, c, c_mask = _channel_block(num_cb, C, BLOCK_C)
    row = n * C
    g_c = tl.load(gate_ptr + row + c, mask=c_mask, other=0.0)
    before = tl.zeros([BLOCK_C, BLOCK_J], dtype=tl.int32)
    for start in range(0, C, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)
        j_mask = j < C
        g_j = tl.load(gate_ptr + row + j, mask=j_mask, other=0.0)
        # j ranks before c: a larger gate, or an equal one at a lower index (docs/contract.md#top-k-rank-rule).
        ranks = (g_j[None, :] > g_c[:, None]) | ((g_j[None, :] == g_c[:, None]) & (j[None, :] < c[:, None]))
        before += (ranks & j_mask[None, :]).to(tl.int32)
    count = tl.sum(before, axis=1)
    tl.store(mask_ptr + row + c, (count < c_im).to(ACC), mask=c_mask)


@triton.jit
def _load_groups(x_ptr, gate_ptr, mask_ptr, x_pix, n, c, C, sx_n, sx_c, tile_mask, c_mask, ONE_GROUP: tl.constexpr):
    """x, gate, mask and F1 = x*gate, G1 = F1*mask, G2 = F1*(1 - mask) of one [BLOCK_C, BLOCK_HW]
    tile, in acc. Masked lanes are 0 (out-of-range lanes load 0 everywhere).

    ONE_GROUP (cbam_spatial, csrc/cbam_spatial_ops.cpp): one group of all C channels and no
    mask. mask_ptr is not read, G1 = F1 itself (not F1 * 1), and no G2 is formed: the returned
    m and g2 are placeholders (gate and F1), which a ONE_GROUP caller never uses."""
    ACC = gate_ptr.dtype.element_ty
    nc = n * C + c
    gate = tl.load(gate_ptr + nc, mask=c_mask, other=0.0)
    if ONE_GROUP:
        m = gate  # placeholder, unused
    else:
        m = tl.load(mask_ptr + nc, mask=c_mask, other=0.0)
    offs = (n * sx_n + c.to(tl.int64) * sx_c)[:, None] + x_pix[None, :]
    v = tl.load(x_ptr + offs, mask=tile_mask, other=0.0).to(ACC)
    f1 = v * gate[:, None]
    if ONE_GROUP:
        g1 = f1
        g2 = f1  # placeholder, unused
    else:
        # Literal products, as the contract writes them: 0 * NaN stays NaN.
        g1 = f1 * m[:, None]
        g2 = f1 * (1.0 - m)[:, None]
    return v, gate, m, f1, g1, g2


# Every pixel kernel below takes ONE_GROUP (tl.constexpr): False for ham_spatial's two groups;
# True for cbam_spatial (attnkernels/triton/cbam_spatial.py), one group G1 = F1 over all C
# channels (the divisor c_im = C) and no mask: mask_ptr and every second-group pointer (d2,
# grad_d2, s2, grad_s2) are neither read nor written, so callers pass any tensor there, and
# c_sub is unused. With ONE_GROUP False the kernels are ham_spatial's, unchanged.
@triton.jit
def _pool_kernel(
    x_ptr, gate_ptr, mask_ptr, d1_ptr, d2_ptr,
    C, HW, W, num_pb, c_im, c_sub,
    sx_n, sx_c, sx_h, sx_w, sx_hw,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ONE_GROUP: tl.constexpr,
):
    ACC = d1_ptr.dtype.element_ty
    n, pb, hw, hw_mask = _pixel_block(num_pb, HW, BLOCK_HW)
    x_pix = _hw_offsets(hw, W, sx_h, sx_w, sx_hw, FLAT)

    sum1 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    if not ONE_GROUP:
        sum2 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    max1 = tl.full([BLOCK_C, BLOCK_HW], float("-inf"), dtype=ACC)
    if not ONE_GROUP:
        max2 = tl.full([BLOCK_C, BLOCK_HW], float("-inf"), dtype=ACC)
    for start in range(0, C, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_mask = c < C
        tile_mask = c_mask[:, None] & hw_mask[None, :]
        _, _, _, _, g1, g2 = _load_groups(
            x_ptr, gate_ptr, mask_ptr, x_pix, n, c, C, sx_n, sx_c, tile_mask, c_mask, ONE_GROUP
        )
        sum1 += g1  # masked lanes are 0
        if not ONE_GROUP:
            sum2 += g2
        max1 = _max_update(max1, tl.where(tile_mask, g1, float("-inf")))
        if not ONE_GROUP:
            max2 = _max_update(max2, tl.where(tile_mask, g2, float("-inf")))

    out = n * 2 * HW + hw  # d[n, 0, p]; d[n, 1, p] is HW further
    tl.store(d1_ptr + out, _div(tl.sum(sum1, axis=0), c_im), mask=hw_mask)
    tl.store(d1_ptr + out + HW, _max_reduce(max1, 0), mask=hw_mask)
    if not ONE_GROUP:
        tl.store(d2_ptr + out, _div(tl.sum(sum2, axis=0), c_sub), mask=hw_mask)
        tl.store(d2_ptr + out + HW, _max_reduce(max2, 0), mask=hw_mask)


@triton.jit
def _pool_backward_kernel(
    gd1_ptr, gd2_ptr, x_ptr, gate_ptr, mask_ptr, d1_ptr, d2_ptr, gx_ptr, part_ptr,
    C, HW, W, num_pb, c_im, c_sub,
    sx_n, sx_c, sx_h, sx_w, sx_hw,
    so_n, so_c, so_h, so_w, so_hw,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ONE_GROUP: tl.constexpr,
):
    ACC = gate_ptr.dtype.element_ty
    n, pb, hw, hw_mask = _pixel_block(num_pb, HW, BLOCK_HW)
    x_pix = _hw_offsets(hw, W, sx_h, sx_w, sx_hw, FLAT)
    o_pix = _hw_offsets(hw, W, so_h, so_w, so_hw, FLAT)
    at = n * 2 * HW + hw
    mx1 = tl.load(d1_ptr + at + HW, mask=hw_mask, other=0.0)
    if not ONE_GROUP:
        mx2 = tl.load(d2_ptr + at + HW, mask=hw_mask, other=0.0)

    # Pass 1: count the channels tied at each pixel's max, per group (all C channels).
    ties1 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.int32)
    if not ONE_GROUP:
        ties2 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.int32)
    for start in range(0, C, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_mask = c < C
        tile_mask = c_mask[:, None] & hw_mask[None, :]
        _, _, _, _, g1, g2 = _load_groups(
            x_ptr, gate_ptr, mask_ptr, x_pix, n, c, C, sx_n, sx_c, tile_mask, c_mask, ONE_GROUP
        )
        ties1 += (tile_mask & (g1 == mx1[None, :])).to(tl.int32)
        if not ONE_GROUP:
            ties2 += (tile_mask & (g2 == mx2[None, :])).to(tl.int32)
    # A count of 0 (NaN max) makes the share inf or NaN, and [G == max] * share NaN on the
    # whole pixel, exactly as torch.amax's backward. Out-of-range pixels divide by 1.
    count1 = tl.where(hw_mask, tl.sum(ties1, axis=0), 1).to(ACC)
    if not ONE_GROUP:
        count2 = tl.where(hw_mask, tl.sum(ties2, axis=0), 1).to(ACC)
    share_avg1 = _div(tl.load(gd1_ptr + at, mask=hw_mask, other=0.0), c_im)
    if not ONE_GROUP:
        share_avg2 = _div(tl.load(gd2_ptr + at, mask=hw_mask, other=0.0), c_sub)
    share_max1 = _div(tl.load(gd1_ptr + at + HW, mask=hw_mask, other=0.0), count1)
    if not ONE_GROUP:
        share_max2 = _div(tl.load(gd2_ptr + at + HW, mask=hw_mask, other=0.0), count2)

    # Pass 2: grad_x, and this pixel block's partial grad_gate.
    part_row = (n * num_pb + pb) * C
    for start in range(0, C, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_mask = c < C
        tile_mask = c_mask[:, None] & hw_mask[None, :]
        v, gate, m, _, g1, g2 = _load_groups(
            x_ptr, gate_ptr, mask_ptr, x_pix, n, c, C, sx_n, sx_c, tile_mask, c_mask, ONE_GROUP
        )
        dg1 = share_avg1[None, :] + (g1 == mx1[None, :]).to(ACC) * share_max1[None, :]
        if ONE_GROUP:
            df1 = dg1  # dF = dG1: no mask to pass through
        else:
            dg2 = share_avg2[None, :] + (g2 == mx2[None, :]).to(ACC) * share_max2[None, :]
            df1 = dg1 * m[:, None] + dg2 * (1.0 - m)[:, None]
        o_offs = (n * so_n + c.to(tl.int64) * so_c)[:, None] + o_pix[None, :]
        tl.store(gx_ptr + o_offs, (df1 * gate[:, None]).to(gx_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(part_ptr + part_row + c, tl.sum(df1 * v, axis=1), mask=c_mask)  # masked lanes: v = 0


@triton.jit
def _apply_kernel(
    x_ptr, gate_ptr, mask_ptr, s1_ptr, s2_ptr, y_ptr,
    C, HW, W, num_pb,
    sx_n, sx_c, sx_h, sx_w, sx_hw,
    so_n, so_c, so_h, so_w, so_hw,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ONE_GROUP: tl.constexpr,
):
    n, pb, hw, hw_mask = _pixel_block(num_pb, HW, BLOCK_HW)
    x_pix = _hw_offsets(hw, W, sx_h, sx_w, sx_hw, FLAT)
    o_pix = _hw_offsets(hw, W, so_h, so_w, so_hw, FLAT)
    s1 = tl.load(s1_ptr + n * HW + hw, mask=hw_mask, other=0.0)
    if not ONE_GROUP:
        s2 = tl.load(s2_ptr + n * HW + hw, mask=hw_mask, other=0.0)
    for start in range(0, C, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_mask = c < C
        tile_mask = c_mask[:, None] & hw_mask[None, :]
        _, _, _, _, g1, g2 = _load_groups(
            x_ptr, gate_ptr, mask_ptr, x_pix, n, c, C, sx_n, sx_c, tile_mask, c_mask, ONE_GROUP
        )
        if ONE_GROUP:
            y = g1 * s1[None, :]  # F * s alone: no F * 0 * s2 term (NaN where F is not finite)
        else:
            y = g1 * s1[None, :] + g2 * s2[None, :]
        o_offs = (n * so_n + c.to(tl.int64) * so_c)[:, None] + o_pix[None, :]
        tl.store(y_ptr + o_offs, y.to(y_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _apply_backward_kernel(
    gy_ptr, x_ptr, gate_ptr, mask_ptr, s1_ptr, s2_ptr, gx_ptr, part_ptr, gs1_ptr, gs2_ptr,
    C, HW, W, num_pb,
    sg_n, sg_c, sg_h, sg_w, sg_hw,
    sx_n, sx_c, sx_h, sx_w, sx_hw,
    so_n, so_c, so_h, so_w, so_hw,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ONE_GROUP: tl.constexpr,
):
    ACC = gate_ptr.dtype.element_ty
    n, pb, hw, hw_mask = _pixel_block(num_pb, HW, BLOCK_HW)
    g_pix = _hw_offsets(hw, W, sg_h, sg_w, sg_hw, FLAT)
    x_pix = _hw_offsets(hw, W, sx_h, sx_w, sx_hw, FLAT)
    o_pix = _hw_offsets(hw, W, so_h, so_w, so_hw, FLAT)
    s1 = tl.load(s1_ptr + n * HW + hw, mask=hw_mask, other=0.0)
    if not ONE_GROUP:
        s2 = tl.load(s2_ptr + n * HW + hw, mask=hw_mask, other=0.0)
    acc_s1 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    if not ONE_GROUP:
        acc_s2 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    part_row = (n * num_pb + pb) * C
    for start in range(0, C, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_mask = c < C
        tile_mask = c_mask[:, None] & hw_mask[None, :]
        v, gate, m, _, g1, g2 = _load_groups(
            x_ptr, gate_ptr, mask_ptr, x_pix, n, c, C, sx_n, sx_c, tile_mask, c_mask, ONE_GROUP
        )
        g_offs = (n * sg_n + c.to(tl.int64) * sg_c)[:, None] + g_pix[None, :]
        gy = tl.load(gy_ptr + g_offs, mask=tile_mask, other=0.0).to(ACC)
        if ONE_GROUP:
            df1 = gy * s1[None, :]
        else:
            df1 = gy * (m[:, None] * s1[None, :] + (1.0 - m)[:, None] * s2[None, :])
        o_offs = (n * so_n + c.to(tl.int64) * so_c)[:, None] + o_pix[None, :]
        tl.store(gx_ptr + o_offs, (df1 * gate[:, None]).to(gx_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(part_ptr + part_row + c, tl.sum(df1 * v, axis=1), mask=c_mask)  # masked lanes: 0 * 0
        acc_s1 += gy * g1
        if not ONE_GROUP:
            acc_s2 += gy * g2
    tl.store(gs1_ptr + n * HW + hw, tl.sum(acc_s1, axis=0), mask=hw_mask)
    if not ONE_GROUP:
        tl.store(gs2_ptr + n * HW + hw, tl.sum(acc_s2, axis=0), mask=hw_mask)


# ----------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------
_op = _op_registrar(HOT_PATH)


def _grad_gate_buffer(n: int, npb: int, c: int, acc: torch.dtype, device: torch.device) -> torch.Tensor:
    """Pixel-block partials of grad_gate; with one pixel block they are grad_gate itself."""
    shape = (n, c) if npb == 1 else (n, npb, c)
    return torch.empty(shape, dtype=acc, device=device)


def _grad_gate(partials: torch.Tensor, npb: int, c: int) -> torch.Tensor:
    """grad_gate (N, C): the (N, npb, C) pixel-block partials summed in order."""
    return partials if npb == 1 else _sum_partials(partials, _sum_blocks(npb, c))


@_op("ham_spatial_pool")
def ham_spatial_pool(
    x: torch.Tensor, gate: torch.Tensor, c_im: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mask (N, C): the c_im top channels of gate (docs/contract.md#top-k-rank-rule); d1, d2 (N, 2, H, W):
    [sum_c / divisor, max_c] of G1 = x*gate*mask and G2 = x*gate*(1 - mask), in acc(x)."""
    acc = accumulate_dtype(x.dtype)
    gt = _in_acc(gate, acc)
    check_ham_spatial_pool(x, gt, c_im)
    _nonempty("ham_spatial_pool", "x", x)
    n, c, h, w = x.shape
    mask = torch.empty((n, c), dtype=acc, device=x.device)
    d1 = torch.empty((n, 2, h, w), dtype=acc, device=x.device)
    d2 = torch.empty((n, 2, h, w), dtype=acc, device=x.device)

    block_c, block_j = _mask_blocks(c)
    num_cb = triton.cdiv(c, block_c)
    wrap_triton(_mask_kernel)[(n * num_cb,)](gt, mask, c, c_im, num_cb, BLOCK_C=block_c, BLOCK_J=block_j)

    flat, strides = _nchw_strides(x)

    def launch(block_c: int, block_hw: int, num_warps: int) -> None:
        num_pb = triton.cdiv(h * w, block_hw)
        wrap_triton(_pool_kernel)[(n * num_pb,)](
            x, gt, mask, d1, d2,
            c, h * w, w, num_pb, c_im, max(c - c_im, 1), *strides,
            FLAT=flat, BLOCK_C=block_c, BLOCK_HW=block_hw, ONE_GROUP=False, num_warps=num_warps,
        )

    _launch_pixel_tiled("ham_spatial_pool", x, acc, launch)
    return d1, d2, mask


@_op("ham_spatial_pool_backward")
def ham_spatial_pool_backward(
    grad_d1: torch.Tensor,
    grad_d2: torch.Tensor,
    x: torch.Tensor,
    gate: torch.Tensor,
    mask: torch.Tensor,
    d1: torch.Tensor,
    d2: torch.Tensor,
    c_im: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_gate) of ham_spatial_pool: means share evenly over C, each max over the
    channels tied with it (a NaN max gives NaN, as torch.amax); no gradient through mask."""
    acc = accumulate_dtype(x.dtype)
    gd1, gd2, gt, mk, m1, m2 = (_in_acc(t, acc) for t in (grad_d1, grad_d2, gate, mask, d1, d2))
    check_ham_spatial_pool_backward(gd1, gd2, x, gt, mk, m1, m2, c_im)
    _nonempty("ham_spatial_pool_backward", "x", x)
    n, c, h, w = x.shape
    grad_x = empty_like_layout(x)
    flat, strides = _nchw_strides(x, grad_x)

    def launch(block_c: int, block_hw: int, num_warps: int) -> torch.Tensor:
        num_pb = triton.cdiv(h * w, block_hw)
        partials = _grad_gate_buffer(n, num_pb, c, acc, x.device)
        wrap_triton(_pool_backward_kernel)[(n * num_pb,)](
            gd1, gd2, x, gt, mk, m1, m2, grad_x, partials,
            c, h * w, w, num_pb, c_im, max(c - c_im, 1), *strides,
            FLAT=flat, BLOCK_C=block_c, BLOCK_HW=block_hw, ONE_GROUP=False, num_warps=num_warps,
        )
        return _grad_gate(partials, num_pb, c)

    return grad_x, _launch_pixel_tiled("ham_spatial_pool_backward", x, acc, launch)


@_op("ham_spatial_apply")
def ham_spatial_apply(
    x: torch.Tensor, gate: torch.Tensor, mask: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor
) -> torch.Tensor:
    """y = F1*mask*s1 + F1*(1 - mask)*s2 with F1 = x*gate, in acc(x), x's dtype and layout."""
    acc = accumulate_dtype(x.dtype)
    gt, mk, sp1, sp2 = (_in_acc(t, acc) for t in (gate, mask, s1, s2))
    check_ham_spatial_apply(x, gt, mk, sp1, sp2)
    _nonempty("ham_spatial_apply", "x", x)
    n, c, h, w = x.shape
    y = empty_like_layout(x)
    flat, strides = _nchw_strides(x, y)

    def launch(block_c: int, block_hw: int, num_warps: int) -> None:
        num_pb = triton.cdiv(h * w, block_hw)
        wrap_triton(_apply_kernel)[(n * num_pb,)](
            x, gt, mk, sp1, sp2, y,
            c, h * w, w, num_pb, *strides,
            FLAT=flat, BLOCK_C=block_c, BLOCK_HW=block_hw, ONE_GROUP=False, num_warps=num_warps,
        )

    _launch_pixel_tiled("ham_spatial_apply", x, acc, launch)
    return y


@_op("ham_spatial_apply_backward")
def ham_spatial_apply_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    gate: torch.Tensor,
    mask: torch.Tensor,
    s1: torch.Tensor,
    s2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_gate, grad_s1, grad_s2) of ham_spatial_apply; grad_x in x's dtype and
    layout, the rest in acc(x) (grad_s1, grad_s2: (N, 1, H, W) sums over C)."""
    acc = accumulate_dtype(x.dtype)
    gt, mk, sp1, sp2 = (_in_acc(t, acc) for t in (gate, mask, s1, s2))
    check_ham_spatial_apply_backward(grad_y, x, gt, mk, sp1, sp2)
    _nonempty("ham_spatial_apply_backward", "x", x)
    n, c, h, w = x.shape
    grad_x = empty_like_layout(x)
    grad_s1 = torch.empty((n, 1, h, w), dtype=acc, device=x.device)
    grad_s2 = torch.empty((n, 1, h, w), dtype=acc, device=x.device)
    flat, strides = _nchw_strides(grad_y, x, grad_x)

    def launch(block_c: int, block_hw: int, num_warps: int) -> torch.Tensor:
        num_pb = triton.cdiv(h * w, block_hw)
        partials = _grad_gate_buffer(n, num_pb, c, acc, x.device)
        wrap_triton(_apply_backward_kernel)[(n * num_pb,)](
            grad_y, x, gt, mk, sp1, sp2, grad_x, partials, grad_s1, grad_s2,
            c, h * w, w, num_pb, *strides,
            FLAT=flat, BLOCK_C=block_c, BLOCK_HW=block_hw, ONE_GROUP=False, num_warps=num_warps,
        )
        return _grad_gate(partials, num_pb, c)

    grad_gate = _launch_pixel_tiled("ham_spatial_apply_backward", x, acc, launch)
    return grad_x, grad_gate, grad_s1, grad_s2


# Importing this module gives the ops their autograd.
register_hot_path(HOT_PATH, "attnkernels_triton")
