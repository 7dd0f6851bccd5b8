"""Triton kernels of the bam hot path (BAM's output, given its two branches mc and ms).

Registers two ops under `torch.ops.attnkernels_triton` with the schemas and the math of
`csrc/bam_ops.cpp`, with z = mc[n, c] + ms[n, 0, p] and sig = sigmoid(z) in acc(x):

    bam_apply(x, mc, ms) -> y                                          y = x * (1 + sig)
    bam_apply_backward(grad_y, x, mc, ms) -> (grad_x, grad_mc, grad_ms)

The kernels are ham_spatial's apply pair (`attnkernels/triton/ham_spatial.py`) with BAM's gate:
one program per (n, block of BLOCK_HW pixels), looping over C in chunks of BLOCK_C; the gate
1 + sig is recomputed per element from mc and ms, never written. The backward's two reductions
of dz = (grad_y * x) * (sig * (1 - sig)) are ham_spatial_apply_backward's: grad_ms (a sum over
C) accumulates elementwise in a [BLOCK_C, BLOCK_HW] tile summed once at the end; grad_mc (a sum
over pixels) is stored as per-pixel-block partials, (N, pixel blocks, C), summed over the pixel
blocks in a fixed order (`_grad_gate_buffer`, `_grad_gate`): deterministic, no atomics. Their
tiles are ham_spatial's rule (`_pixel_tiles`, `_pixel_warps`), measured on a GPU at this
module's own sites (`_launch_pixel_tiled("bam_apply", ...)`, "bam_apply_backward"). x has any
strides (NCHW, channels_last and sliced views run without a copy; offsets are 64-bit); y and
grad_x are shaped like x in x's dtype and layout; mc (N, C), ms (N, 1, H, W), grad_mc and
grad_ms are contiguous in acc(x) (float64 for float64 x, float32 otherwise; mc and ms of another
floating dtype or strides are cast first). The argument checks are the op module's
(`attnkernels.ops.bam.check_<op>`).

Importing this module registers the two ops (schemas from csrc/bam_ops.cpp through
`_op_registrar`) and, through `register_hot_path` at its end, their fakes and autograd
(`attnkernels.ops.bam.REGISTRATION`).

On a machine without a GPU set TRITON_INTERPRET=1 before importing this module; the ops
then run on CPU tensors under the Triton interpreter.
"""
import torch
import triton
import triton.language as tl

from ..ops import register_hot_path
from ..ops._common import empty_like_layout
from ..ops.bam import check_bam_apply, check_bam_apply_backward
from ..reference.formulas import accumulate_dtype
from ._common import _hw_offsets, _in_acc, _nchw_strides, _nonempty, _op_registrar, _pixel_block, _sigmoid
from ._compat import wrap_triton
from .ham_spatial import _grad_gate, _grad_gate_buffer, _launch_pixel_tiled

HOT_PATH = "bam"

__all__ = ["bam_apply", "bam_apply_backward"]


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _sig_tile(x_ptr, mc_ptr, ms, x_pix, n, start, C, sx_n, sx_c, hw_mask, BLOCK_C: tl.constexpr):
    """Channels c = start .. start + BLOCK_C of this pixel block: c, c < C, the tile's mask, and
    x (in acc) and sig = sigmoid(mc[n, c] + ms[p]) of the [BLOCK_C, BLOCK_HW] tile. Masked lanes
    load x = 0 and mc = 0 (ms is loaded 0 outside the map): their sig is finite unless mc is NaN."""
    ACC = mc_ptr.dtype.element_ty
    c = start + tl.arange(0, BLOCK_C)
    c_mask = c < C
    tile_mask = c_mask[:, None] & hw_mask[None, :]
    mc = tl.load(mc_ptr + n * C + c, mask=c_mask, other=0.0)
    offs = (n * sx_n + c.to(tl.int64) * sx_c)[:, None] + x_pix[None, :]
    v = tl.load(x_ptr + offs, mask=tile_mask, other=0.0).to(ACC)
    sig = _sigmoid(mc[:, None] + ms[None, :])
    return c, c_mask, tile_mask, v, sig


@triton.jit
def _apply_kernel(
    x_ptr, mc_ptr, ms_ptr, y_ptr,
    C, HW, W, num_pb,
    sx_n, sx_c, sx_h, sx_w, sx_hw,
    so_n, so_c, so_h, so_w, so_hw,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n, pb, hw, hw_mask = _pixel_block(num_pb, HW, BLOCK_HW)
    x_pix = _hw_offsets(hw, W, sx_h, sx_w, sx_hw, FLAT)
    o_pix = _hw_offsets(hw, W, so_h, so_w, so_hw, FLAT)
    ms = tl.load(ms_ptr + n * HW + hw, mask=hw_mask, other=0.0)
    for start in range(0, C, BLOCK_C):
        c, c_mask, tile_mask, v, sig = _sig_tile(
            x_ptr, mc_ptr, ms, x_pix, n, start, C, sx_n, sx_c, hw_mask, BLOCK_C
        )
        o_offs = (n * so_n + c.to(tl.int64) * so_c)[:, None] + o_pix[None, :]
        tl.store(y_ptr + o_offs, (v * (1.0 + sig)).to(y_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _apply_backward_kernel(
    gy_ptr, x_ptr, mc_ptr, ms_ptr, gx_ptr, part_ptr, gms_ptr,
    C, HW, W, num_pb,
    sg_n, sg_c, sg_h, sg_w, sg_hw,
    sx_n, sx_c, sx_h, sx_w, sx_hw,
    so_n, so_c, so_h, so_w, so_hw,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    ACC = mc_ptr.dtype.element_ty
    n, pb, hw, hw_mask = _pixel_block(num_pb, HW, BLOCK_HW)
    g_pix = _hw_offsets(hw, W, sg_h, sg_w, sg_hw, FLAT)
    x_pix = _hw_offsets(hw, W, sx_h, sx_w, sx_hw, FLAT)
    o_pix = _hw_offsets(hw, W, so_h, so_w, so_hw, FLAT)
    ms = tl.load(ms_ptr + n * HW + hw, mask=hw_mask, other=0.0)
    acc_ms = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    part_row = (n * num_pb + pb) * C
    for start in range(0, C, BLOCK_C):
        c, c_mask, tile_mask, v, sig = _sig_tile(
            x_ptr, mc_ptr, ms, x_pix, n, start, C, sx_n, sx_c, hw_mask, BLOCK_C
        )
        c64 = c.to(tl.int64)
        gy = tl.load(gy_ptr + ((n * sg_n + c64 * sg_c)[:, None] + g_pix[None, :]), mask=tile_mask, other=0.0).to(ACC)
        o_offs = (n * so_n + c64 * so_c)[:, None] + o_pix[None, :]
        tl.store(gx_ptr + o_offs, (gy * (1.0 + sig)).to(gx_ptr.dtype.element_ty), mask=tile_mask)
        # Masked lanes: gy = x = 0, so dz = 0 (NaN only where mc[n, c] is NaN, whose sum is NaN anyway).
        dz = (gy * v) * (sig * (1.0 - sig))
        tl.store(part_ptr + part_row + c, tl.sum(dz, axis=1), mask=c_mask)
        acc_ms += dz
    tl.store(gms_ptr + n * HW + hw, tl.sum(acc_ms, axis=0), mask=hw_mask)


# ----------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------
_op = _op_registrar(HOT_PATH)


@_op("bam_apply")
def bam_apply(x: torch.Tensor, mc: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
    """y = x * (1 + sigmoid(mc[n, c] + ms[n, 0, p])), in acc(x), x's dtype and layout."""
    acc = accumulate_dtype(x.dtype)
    mca, msa = (_in_acc(t, acc) for t in (mc, ms))
    check_bam_apply(x, mca, msa)
    _nonempty("bam_apply", "x", x)
    n, c, h, w = x.shape
    y = empty_like_layout(x)
    flat, strides = _nchw_strides(x, y)

    def launch(block_c: int, block_hw: int, num_warps: int) -> None:
        num_pb = triton.cdiv(h * w, block_hw)
        wrap_triton(_apply_kernel)[(n * num_pb,)](
            x, mca, msa, y,
            c, h * w, w, num_pb, *strides,
            FLAT=flat, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps,
        )

    _launch_pixel_tiled("bam_apply", x, acc, launch)
    return y


@_op("bam_apply_backward")
def bam_apply_backward(
    grad_y: torch.Tensor, x: torch.Tensor, mc: torch.Tensor, ms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_mc, grad_ms) of bam_apply; grad_x in x's dtype and layout, grad_mc (N, C)
    and grad_ms (N, 1, H, W) the sums of dz over the pixels and over C, in acc(x)."""
    acc = accumulate_dtype(x.dtype)
    mca, msa = (_in_acc(t, acc) for t in (mc, ms))
    check_bam_apply_backward(grad_y, x, mca, msa)
    _nonempty("bam_apply_backward", "x", x)
    n, c, h, w = x.shape
    grad_x = empty_like_layout(x)
    grad_ms = torch.empty((n, 1, h, w), dtype=acc, device=x.device)
    flat, strides = _nchw_strides(grad_y, x, grad_x)

    def launch(block_c: int, block_hw: int, num_warps: int) -> torch.Tensor:
        num_pb = triton.cdiv(h * w, block_hw)
        partials = _grad_gate_buffer(n, num_pb, c, acc, x.device)
        wrap_triton(_apply_backward_kernel)[(n * num_pb,)](
            grad_y, x, mca, msa, grad_x, partials, grad_ms,
            c, h * w, w, num_pb, *strides,
            FLAT=flat, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps,
        )
        return _grad_gate(partials, num_pb, c)

    grad_mc = _launch_pixel_tiled("bam_apply_backward", x, acc, launch)
    return grad_x, grad_mc, grad_ms


# Importing this module gives the ops their autograd.
register_hot_path(HOT_PATH, "attnkernels_triton")
