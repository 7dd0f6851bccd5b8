"""Triton kernels of the softmax_spatial hot path (SoftmaxSpatial's conv, spatial softmax, reweighting).

Registers two ops under `torch.ops.attnkernels_triton` with the schemas and the math of
`csrc/softmax_spatial_ops.cpp` (the contract, "softmax_spatial hot path"), and, on import, their
autograd (`attnkernels.ops.softmax_spatial`, which also holds the argument checks):

    softmax_spatial(x, weight, bias, rescale) -> (y, a)
    softmax_spatial_backward(grad_y, x, weight, a, rescale) -> (grad_x, grad_weight, grad_bias)

x (N, C, H, W) has any strides: the kernels read it through its (n, c, pixel) strides, p = h*W + w,
so NCHW and channels_last run without a copy (`_common._pixel_strides`). weight (g, C) and bias
(g) of any floating dtype are cast to acc(x) once on the host; every sum, the logits and the
softmax are in acc, rounded once into y and grad_x (x's dtype and layout). a, the (N, g, H, W)
softmax map, is acc and NCHW-contiguous.

The C -> g products are plain reductions over channel chunks ([BLOCK_C, BLOCK_P] tiles times a
weight column, summed over the chunk), not tl.dot: g runs from 1 (tl.dot needs every dimension
>= 16) to C, and each logit is one column of the product.

Kernels (all deterministic: no atomics, every reduction in a fixed order):
  * forward: 1. logits, one program per (n, map j, pixel block), into a;
    2. the softmax, one program per (n, j) row, in place (max, sum of exp, normalise: three
       passes over the row's P values); 3. y = (x * a) * s, one program per (n, channel block,
       pixel block).
  * backward: 1. dA = s * sum over the group's channels of grad_y * x, per (n, j, pixel block);
    2. dL = a * (dA - sum_p a dA), per (n, j) row, in place; 3. grad_x = grad_y * a * s +
    sum_j weight[j, c] dL[j], per (n, channel block, pixel block); 4. weight gradients: one
    program per (split, j, channel block) sums x dL (and, channel block 0, dL) over a fixed,
    strided set of (n, pixel block) tiles into that split's partials; 5. one sum over the
    splits, in order (`_common._sum_partials`).

The five [BLOCK_C, BLOCK_P]-tiled launches over x (forward steps 1 and 3, backward steps 1, 3
and 4) take their tile from `_launch_tiles`: on a GPU measured once per shape, each launch on
its own, among the static rule and half and twice its channels per tile.

On a machine without a GPU set TRITON_INTERPRET=1 before importing this module; the ops then run
on CPU tensors under the Triton interpreter.
"""
from typing import Any

import torch
import triton
import triton.language as tl

from ..ops import register_hot_path
from ..ops._common import empty_like_layout
from ..ops.softmax_spatial import check_softmax_spatial, check_softmax_spatial_backward
from ..reference.formulas import accumulate_dtype
from ._common import _acc_vector, _in_acc, _launch_measured, _like_param, _nonempty, _op_registrar, _pixel_strides, \
    _pow2, _splits, _sum_partials, _tile
from ._compat import wrap_triton

HOT_PATH = "softmax_spatial"

__all__ = ["softmax_spatial", "softmax_spatial_backward"]

# Module attributes, so tests can force many small blocks: pixels per tile, channels per chunk
# (tiles of BLOCK_C x BLOCK_P values: the static rule's; a GPU also measures half and twice the
# channels, `_launch_tiles`), and the row block of the softmax passes.
_BLOCK_P = 64
_BLOCK_C = 16
_BLOCK_ROW = 1024


def _tiles(c: int, hw: int, elements: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) of a tile of `elements` values at most: min(H*W, _BLOCK_P) pixels
    (powers of two), the rest channels, no more than C needs."""
    block_p = min(_pow2(hw), _BLOCK_P)
    return min(_pow2(c), max(1, elements // block_p)), block_p


def _rule_elements(hw: int) -> int:
    """The static rule's tile size: _BLOCK_C channels of min(H*W, _BLOCK_P) pixels."""
    return _BLOCK_C * min(_pow2(hw), _BLOCK_P)


def _launch_tiles(site: str, x: torch.Tensor, maps: int, launch) -> Any:
    """`launch(block_c=, block_hw=, num_warps=)`, and its result, of one of the [BLOCK_C, BLOCK_P]-tiled kernels
    over x (BLOCK_HW is BLOCK_P), in the configuration a GPU measured fastest for this site,
    x's shape, dtype and layout and the map count (`_common._launch_measured`); the static
    rule's (`_BLOCK_C` channels) under the interpreter, tracing and static mode."""
    c, hw = x.shape[1], x.shape[2] * x.shape[3]
    return _launch_measured(site, x, lambda elements: _tiles(c, hw, elements), _rule_elements(hw), _tile_warps,
                            launch, params=(maps,))


def _tile_warps(block_c: int, block_p: int) -> int:
    """4 warps up to 1024 values per tile (the rule's 16 x 64: 8 per thread), 8 beyond (at 4,
    the group sum's 32 x 64 tile spilled on sm_90)."""
    return 4 if block_c * block_p <= 1024 else 8


def _row_block(hw: int) -> int:
    """BLOCK_ROW of the softmax passes: a power of two no larger than needed."""
    return min(_pow2(hw), _BLOCK_ROW)


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _group_sum_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, out_ptr,
    C, G, HW, num_pb, num_maps,
    sx_n, sx_c, sx_p, sy_n, sy_c, sy_p, scale,
    LOGITS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One (n, j, pixel block) of an (N, g, HW) acc map, summed over channels in chunks:
    LOGITS: out = sum_c w[j, c] x[n, c, p] + bias[j] over all C channels (y, bias unused);
    else:   out = scale * sum_{c in group j} y[n, c, p] x[n, c, p]   (w, bias unused)."""
    ACC = out_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pb = pid % num_pb
    row = pid // num_pb  # n * g + j
    n = (row // num_maps).to(tl.int64)
    j = row % num_maps
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < HW
    if LOGITS:
        c_begin = 0
        c_end = C
    else:
        c_begin = j * G
        c_end = c_begin + G
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for c0 in range(c_begin, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < c_end
        xt = _tile(x_ptr, n * sx_n, c, sx_c, c_mask, p, sx_p, p_mask).to(ACC)  # [BLOCK_C, BLOCK_P]
        if LOGITS:
            wc = tl.load(w_ptr + j * C + c, mask=c_mask, other=0.0)
            acc += tl.where(c_mask[:, None], xt * wc[:, None], 0.0)  # x * 0 would be NaN for infinite x
        else:
            acc += xt * _tile(y_ptr, n * sy_n, c, sy_c, c_mask, p, sy_p, p_mask).to(ACC)
    total = tl.sum(acc, axis=0)
    if LOGITS:
        total += tl.load(bias_ptr + j)
    else:
        total *= scale
    tl.store(out_ptr + row.to(tl.int64) * HW + p, total, mask=p_mask)


@triton.jit
def _softmax_rows_kernel(v_ptr, HW, BLOCK: tl.constexpr):
    """Row r of v (rows of HW acc values) in place: softmax over the row. A NaN or +inf entry,
    or a row of -inf only, makes the row NaN (the sum of exp is NaN), as torch.softmax."""
    ACC = v_ptr.dtype.element_ty
    base = v_ptr + tl.program_id(0).to(tl.int64) * HW
    m = tl.full([BLOCK], float("-inf"), ACC)
    for p0 in range(0, HW, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.load(base + p, mask=p < HW, other=float("-inf")))
    row_max = tl.max(m, axis=0)  # a NaN left out here still reaches the sum below
    s = tl.zeros([BLOCK], ACC)
    for p0 in range(0, HW, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        s += tl.where(p < HW, tl.exp(tl.load(base + p, mask=p < HW, other=0.0) - row_max), 0.0)
    total = tl.sum(s, axis=0)
    for p0 in range(0, HW, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        e = tl.exp(tl.load(base + p, mask=p < HW, other=0.0) - row_max)
        tl.store(base + p, e / total, mask=p < HW)


@triton.jit
def _softmax_grad_rows_kernel(a_ptr, d_ptr, HW, BLOCK: tl.constexpr):
    """Row r of d in place: d = a * (d - sum_p a d), the softmax's gradient."""
    ACC = d_ptr.dtype.element_ty
    off = tl.program_id(0).to(tl.int64) * HW
    s = tl.zeros([BLOCK], ACC)
    for p0 in range(0, HW, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        mask = p < HW
        s += tl.load(a_ptr + off + p, mask=mask, other=0.0) * tl.load(d_ptr + off + p, mask=mask, other=0.0)
    total = tl.sum(s, axis=0)
    for p0 in range(0, HW, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        mask = p < HW
        av = tl.load(a_ptr + off + p, mask=mask)
        tl.store(d_ptr + off + p, av * (tl.load(d_ptr + off + p, mask=mask) - total), mask=mask)


@triton.jit
def _elementwise_kernel(
    x_ptr, a_ptr, w_ptr, dl_ptr, out_ptr,
    C, G, HW, num_pb, num_cb, num_maps,
    sx_n, sx_c, sx_p, so_n, so_c, so_p, scale,
    BACKWARD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One (n, channel block, pixel block) of an x-sized output, with f = a[n, c // G, p] * scale:
    forward:  out = (x * a) * scale, x the input;
    BACKWARD: out = x * a * scale + sum_j w[j, c] dl[n, j, p], x the incoming gradient grad_y."""
    ACC = a_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pb = pid % num_pb
    cb = (pid // num_pb) % num_cb
    n = (pid // num_pb // num_cb).to(tl.int64)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < HW
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mask = c_mask[:, None] & p_mask[None, :]
    xt = _tile(x_ptr, n * sx_n, c, sx_c, c_mask, p, sx_p, p_mask).to(ACC)
    a_rows = n * num_maps + c // G
    at = _tile(a_ptr, 0, a_rows, HW, c_mask, p, 1, p_mask)
    out = xt * at * scale
    if BACKWARD:
        for j in range(0, num_maps):
            wc = tl.load(w_ptr + j * C + c, mask=c_mask, other=0.0)
            dl = tl.load(dl_ptr + (n * num_maps + j) * HW + p, mask=p_mask, other=0.0)
            out += wc[:, None] * dl[None, :]
    offs = n * so_n + c.to(tl.int64)[:, None] * so_c + p.to(tl.int64)[None, :] * so_p
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_weights_kernel(
    x_ptr, dl_ptr, part_ptr,
    C, HW, num_pb, num_cb, num_maps, num_tiles, num_splits,
    sx_n, sx_c, sx_p,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One split's partial grad_weight[j, channel block] = sum x dL and (channel block 0)
    grad_bias[j] = sum dL, over the (n, pixel block) tiles sp, sp + num_splits, ... The partial
    row holds grad_weight (g, C) then grad_bias g values."""
    ACC = part_ptr.dtype.element_ty
    pid = tl.program_id(0)
    cb = pid % num_cb
    j = (pid // num_cb) % num_maps
    sp = pid // num_cb // num_maps
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc_w = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    acc_b = tl.zeros([BLOCK_P], dtype=ACC)
    for t in range(sp, num_tiles, num_splits):
        n = (t // num_pb).to(tl.int64)
        p = (t % num_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < HW
        dl = tl.load(dl_ptr + (n * num_maps + j) * HW + p, mask=p_mask, other=0.0)
        xt = _tile(x_ptr, n * sx_n, c, sx_c, c_mask, p, sx_p, p_mask).to(ACC)
        acc_w += xt * dl[None, :]
        acc_b += dl
    row = part_ptr + sp.to(tl.int64) * (num_maps * C + num_maps)
    tl.store(row + j * C + c, tl.sum(acc_w, axis=1), mask=c_mask)
    tl.store(row + num_maps * C + j, tl.sum(acc_b, axis=0), mask=cb == 0)


# ----------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------
_op = _op_registrar(HOT_PATH)


def _scale(hw: int, rescale: bool) -> float:
    """s = H*W or 1 (an integer: exact in the fp32 scalar a launch passes)."""
    return float(hw) if rescale else 1.0


@_op("softmax_spatial")
def softmax_spatial(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, rescale: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, a): a = softmax over the pixels of weight x + bias (N, g, H, W, acc), y = (x * a) * s
    in x's dtype and layout."""
    check_softmax_spatial(x, weight, bias, rescale)
    _nonempty("softmax_spatial", "x", x)
    n, c, h, w = x.shape
    g, hw = weight.shape[0], h * w
    acc = accumulate_dtype(x.dtype)
    y = empty_like_layout(x)
    a = torch.empty((n, g, h, w), dtype=acc, device=x.device)
    (x, sx), (_, so) = _pixel_strides(x), _pixel_strides(y)
    wa, ba = _acc_vector(weight, acc), _acc_vector(bias, acc)

    def logits(block_c: int, block_hw: int, num_warps: int) -> None:
        num_pb = triton.cdiv(hw, block_hw)
        wrap_triton(_group_sum_kernel)[(n * g * num_pb,)](
            x, wa, ba, x, a, c, c // g, hw, num_pb, g, *sx, *sx, 1.0,
            LOGITS=True, BLOCK_P=block_hw, BLOCK_C=block_c, num_warps=num_warps,
        )

    def apply(block_c: int, block_hw: int, num_warps: int) -> None:
        num_pb, num_cb = triton.cdiv(hw, block_hw), triton.cdiv(c, block_c)
        wrap_triton(_elementwise_kernel)[(n * num_cb * num_pb,)](
            x, a, wa, a, y, c, c // g, hw, num_pb, num_cb, g, *sx, *so, _scale(hw, rescale),
            BACKWARD=False, BLOCK_P=block_hw, BLOCK_C=block_c, num_warps=num_warps,
        )

    _launch_tiles("softmax_spatial.logits", x, g, logits)
    wrap_triton(_softmax_rows_kernel)[(n * g,)](a, hw, BLOCK=_row_block(hw))
    _launch_tiles("softmax_spatial.apply", x, g, apply)
    return y, a


@_op("softmax_spatial_backward")
def softmax_spatial_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, rescale: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) of softmax_spatial from x and the saved map a; grad_x in
    x's dtype and layout, grad_weight (g, C) and grad_bias (g) in weight's dtype."""
    check_softmax_spatial_backward(grad_y, x, weight, a, rescale)
    _nonempty("softmax_spatial_backward", "x", x)
    n, c, h, w = x.shape
    g, hw = weight.shape[0], h * w
    acc = accumulate_dtype(x.dtype)
    a = _in_acc(a, acc)
    grad_x = empty_like_layout(x)
    (gy, sg), (x, sx), (_, so) = _pixel_strides(grad_y), _pixel_strides(x), _pixel_strides(grad_x)
    wa = _acc_vector(weight, acc)
    s = _scale(hw, rescale)

    # 1. dA, 2. dL in place.
    dl = torch.empty((n, g, hw), dtype=acc, device=x.device)

    def grad_logits(block_c: int, block_hw: int, num_warps: int) -> None:
        num_pb = triton.cdiv(hw, block_hw)
        wrap_triton(_group_sum_kernel)[(n * g * num_pb,)](
            x, wa, wa, gy, dl, c, c // g, hw, num_pb, g, *sx, *sg, s,
            LOGITS=False, BLOCK_P=block_hw, BLOCK_C=block_c, num_warps=num_warps,
        )

    def grad_input(block_c: int, block_hw: int, num_warps: int) -> None:
        num_pb, num_cb = triton.cdiv(hw, block_hw), triton.cdiv(c, block_c)
        wrap_triton(_elementwise_kernel)[(n * num_cb * num_pb,)](
            gy, a, wa, dl, grad_x, c, c // g, hw, num_pb, num_cb, g, *sg, *so, s,
            BACKWARD=True, BLOCK_P=block_hw, BLOCK_C=block_c, num_warps=num_warps,
        )

    _launch_tiles("softmax_spatial_backward.grad_logits", x, g, grad_logits)
    wrap_triton(_softmax_grad_rows_kernel)[(n * g,)](a, dl, hw, BLOCK=_row_block(hw))
    # 3. grad_x.
    _launch_tiles("softmax_spatial_backward.grad_x", x, g, grad_input)
    # 4. per-split partial weight gradients (the splits, hence the partials' shape, follow the
    # tile), 5. their sum in order.
    def grad_weights(block_c: int, block_hw: int, num_warps: int) -> torch.Tensor:
        num_pb, num_cb = triton.cdiv(hw, block_hw), triton.cdiv(c, block_c)
        num_tiles = n * num_pb
        num_splits = _splits(num_tiles, g * num_cb, x.device)
        part = torch.empty((num_splits, g * c + g), dtype=acc, device=x.device)
        wrap_triton(_grad_weights_kernel)[(num_splits * g * num_cb,)](
            x, dl, part, c, hw, num_pb, num_cb, g, num_tiles, num_splits, *sx,
            BLOCK_P=block_hw, BLOCK_C=block_c, num_warps=num_warps,
        )
        return part

    part = _launch_tiles("softmax_spatial_backward.grad_weights", x, g, grad_weights)
    total = _sum_partials(part)
    grad_weight, grad_bias = torch.split(total, [g * c, g])
    return grad_x, _like_param(grad_weight, weight), grad_bias.to(weight.dtype, copy=True)


# Importing this module gives the ops their autograd.
register_hot_path(HOT_PATH, "attnkernels_triton")
