"""Triton kernels of the cam hot path (DANet's channel attention over the C x C Gram matrix).

Registers two ops under `torch.ops.attnkernels_triton` with the schemas and the math of
`csrc/cam_ops.cpp` (the contract, "cam hot path"), and, on import, their autograd
(`attnkernels.ops.cam`, which also holds the argument checks):

    cam(x, gamma) -> (y, attn)
    cam_backward(grad_y, x, gamma, attn) -> (grad_x, grad_gamma)

Per sample X = x[n] viewed (C, P), P = H*W: E = X X^T, attn = softmax(rowmin(E) - E) with
weights below the smallest normal number of acc written as 0 (NaN kept), y = gamma * (attn X)
+ x. acc is float64 for float64 x, float32 otherwise; attn (N, C, C) is contiguous in acc. x
and grad_y have any strides: the kernels read them through their (n, c, pixel) strides
(`_common._pixel_strides`: NCHW and channels_last without a copy; a tensor whose (h, w)
strides do not flatten to one pixel stride is made contiguous first). y and grad_x have x's
dtype and layout (`empty_like_layout`), rounded once from acc.

Matmuls are `tl.dot` on tiles padded to powers of two >= 16 and masked, accumulated in acc
(`_compat._dot`). The Gram matrices E = X X^T and G = grad_y X^T take x's own tiles: fp16/bf16
go to the tensor cores as they are (products of half values are exact in fp32, so E is the
fp32 sum of exact products), fp32 multiplies exactly (input_precision "ieee"), fp64 in fp64.
The products with the C x C matrices (attn X, attn^T grad_y, (dE + dE^T) X) have acc operands
(x's tiles converted): for fp16/bf16 inputs on the TF32 tensor cores (x is exact there; attn
and dE round to TF32's 10-bit mantissa, fp16's precision), with fp32 accumulation.

Kernels (all deterministic: no atomics, every reduction in a fixed order):
  * `_gram_kernel`: out[n, i, j] = sum_p a[n, i, p] b[n, j, p], one program per (n, block of
    rows i, block of columns j), the pixels in chunks (`nonlocal_attn._contract`). E (a = b = x)
    forward, G (a = grad_y, b = x) backward.
  * `_softmax_kernel`: BLOCK_R rows of E per program, over the N*C rows of (N*C, C): the row's
    min (NaN-propagating) in a first pass over column chunks, its sum of exponentials in a
    second, the flushed weights written in a third (C up to thousands never sits whole in
    registers).
  * `_out_kernel`: y[n, i, p] = gamma * sum_j attn[n, i, j] X[n, j, p] + x[n, i, p], one program
    per (n, channel block i, pixel block p), the channels j in chunks.
  * backward `_rows_kernel`: per block of rows, r = rowsum(attn * G), rowsum(attn * dA) =
    gamma r (dA = gamma G), dE = -attn * (dA - gamma r), and the block's sum of r (grad_gamma's
    partial; the partials are summed in order by `_common._sum_partials`).
  * backward `_grad_x_kernel`: grad_x = g + gamma attn^T g + (dE + dE^T) X, both K = C
    products into one accumulator per (n, channel block, pixel block) tile.

The tl.dot launches (energy, out, the backward's gram and grad_x) take their blocks on a GPU
from the rule's, half the row block and half the column block, measured once per shape
(`_common._launch_choice`, `_halved_blocks`); the row kernels (softmax, the backward's rows)
their [rows, columns] tile among the rule's and half and twice its elements
(`_common._launch_measured`). Under the interpreter, tracing and static mode: the rules'.

On a machine without a GPU set TRITON_INTERPRET=1 before importing this module; the ops
then run on CPU tensors under the Triton interpreter.
"""
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from ..ops import register_hot_path
from ..ops._common import empty_like_layout
from ..ops.cam import check_cam, check_cam_backward
from ..reference.formulas import accumulate_dtype
from ._common import (
    _acc_vector,
    _div,
    _dot_block,
    _halved_blocks,
    _launch_choice,
    _launch_measured,
    _like_param,
    _max_reduce,
    _max_update,
    _nonempty,
    _op_registrar,
    _pixel_strides,
    _pow2,
    _precision,
    _sum_partials,
    _tile,
    _warps,
)
from ._compat import _dot, wrap_triton
from .nonlocal_attn import _contract, _dot_warps, _program

HOT_PATH = "cam"

__all__ = ["cam", "cam_backward"]


# ----------------------------------------------------------------------------------------
# Host-side helpers: tiles
# ----------------------------------------------------------------------------------------
# Module attributes, so tests can force many small blocks (tl.dot needs every dimension >= 16:
# _common._dot_block). (BLOCK_M, BLOCK_N, BLOCK_K) of an [M, K] x [K, N] product, per input
# dtype. The Gram kernels: M, N channels, K pixels; half tiles go to the tensor cores as they
# are. The apply kernels (out, grad_x): M channels, N pixels, K channels, acc operands. fp32
# ("ieee") and fp64 dots run on the FMA units at 8 warps (`nonlocal_attn._dot_warps`).
_GRAM_BLOCKS = {
    torch.float16: (64, 64, 64),
    torch.bfloat16: (64, 64, 64),
    torch.float32: (64, 64, 32),
    torch.float64: (32, 32, 32),
}
_APPLY_BLOCKS = {
    torch.float16: (64, 64, 32),
    torch.bfloat16: (64, 64, 32),
    torch.float32: (64, 64, 32),
    torch.float64: (32, 32, 32),
}
# The row kernels' [BLOCK_R rows, BLOCK_J columns] tile: the rule's elements, the widest chunk.
_ROW_TILE_ELEMENTS = 2048
_MAX_ROW_BLOCK_J = 512


def _dot_blocks(table: dict, x: torch.Tensor, m: int, n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of an [m, k] x [k, n] product: the table's for x's dtype, each
    at most the power of two covering its dimension (and at least 16)."""
    bm, bn, bk = table[x.dtype]
    return _dot_block(m, bm), _dot_block(n, bn), _dot_block(k, bk)


def _dot_config(bm: int, bn: int, bk: int, num_warps: int) -> tuple[str, dict[str, int]]:
    """A tl.dot launch configuration: its name (as `choose.explain()` lists it) and parameters."""
    return f"cam_m{bm}n{bn}k{bk}/{num_warps}w", {"bm": bm, "bn": bn, "bk": bk, "num_warps": num_warps}


def _launch_dot(site: str, x: torch.Tensor, blocks: tuple[int, int, int], launch: Callable[..., Any]) -> Any:
    """`launch(bm=, bn=, bk=, num_warps=)` in the configuration measured fastest on a GPU for this
    site and x's shape, dtype and layout, among the rule's `blocks`, half BLOCK_M and half
    BLOCK_N (`_common._halved_blocks`); the rule's under the interpreter, tracing and static mode."""
    def config(bm: int, bn: int, bk: int) -> tuple[str, dict[str, int]]:
        return _dot_config(bm, bn, bk, _dot_warps(x.dtype, bm * bn))

    return _launch_choice(site, x, lambda: config(*blocks),
                          lambda: dict(config(*b) for b in _halved_blocks(blocks, (0, 1))), launch)


def _row_tiles(c: int, rows: int) -> Callable[[int], tuple[int, int]]:
    """The row kernels' tiles of `elements` values at most: (BLOCK_R, BLOCK_J) over `rows` rows
    of c columns."""
    def tiles(elements: int) -> tuple[int, int]:
        block_j = min(_pow2(c), _MAX_ROW_BLOCK_J)
        return min(_pow2(rows), max(1, elements // block_j)), block_j

    return tiles


def _launch_rows(site: str, x: torch.Tensor, launch: Callable[..., Any]) -> Any:
    """`launch(block_c=, block_hw=, num_warps=)` of a row kernel over the N*C rows of C values
    (block_c rows, block_hw columns), measured on a GPU (`_common._launch_measured`). 8 warps
    from 8192 fp32 or 4096 fp64 values a tile (compiled for sm_90, the fp64 backward rows at
    [64, 64] and 4 warps spilled 368 B per thread)."""
    n, c = x.shape[:2]
    words = accumulate_dtype(x.dtype).itemsize // 4  # an fp64 tile holds twice the registers

    return _launch_measured(site, x, _row_tiles(c, n * c), _ROW_TILE_ELEMENTS,
                            lambda block_r, block_j: _warps(block_r * block_j * words), launch)


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _gram_kernel(
    a_ptr, b_ptr, out_ptr,
    C, HW, num_mb, num_nb,
    sa_n, sa_c, sa_p,
    sb_n, sb_c, sb_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IP: tl.constexpr,
):
    """out[n, i, j] = sum_p a[n, i, p] b[n, j, p] (acc, out (N, C, C) contiguous) for this
    program's rows i and columns j."""
    ACC = out_ptr.dtype.element_ty
    n, mb, nb = _program(num_nb, num_mb)
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    j = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    i_mask = i < C
    j_mask = j < C
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    acc = _contract(
        a_ptr, n * sa_n, i, sa_c, i_mask, sa_p,
        b_ptr, n * sb_n, j, sb_c, j_mask, sb_p,
        HW, acc, BLOCK_K, IP,
    )
    offs = n * C * C + i.to(tl.int64)[:, None] * C + j[None, :]
    tl.store(out_ptr + offs, acc, mask=i_mask[:, None] & j_mask[None, :])


@triton.jit
def _tiny(ACC: tl.constexpr):
    """The smallest normal number of ACC (float32 or float64), from its bits: exact."""
    if ACC == tl.float64:
        t = tl.full([1], 0x0010000000000000, tl.int64).to(tl.float64, bitcast=True)
    else:
        t = tl.full([1], 0x00800000, tl.int32).to(tl.float32, bitcast=True)
    return t


@triton.jit
def _row_block(R, BLOCK_R: tl.constexpr):
    """This program's BLOCK_R rows (int64) of the (R, C) row-major matrices, and r < R."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    return r, r < R


@triton.jit
def _softmax_kernel(e_ptr, attn_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    """attn = flush(exp(rowmin(E) - E) / Z) for this program's rows of E (R = N*C rows of C)."""
    ACC = attn_ptr.dtype.element_ty
    r, r_mask = _row_block(R, BLOCK_R)
    # 1. m = max(-E) = -rowmin(E), NaN-propagating (a NaN row stays NaN, as torch's amin), and
    # +inf taken as NaN: a row holding +inf is NaN, as the contract's rowmax(E) - E is there
    # (inf - inf), where exp(rowmin - inf) would weigh it 0. Padded columns add -inf to -E.
    neg = tl.full([BLOCK_R, BLOCK_J], float("-inf"), dtype=ACC)
    for j0 in range(0, C, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        mask = r_mask[:, None] & (j < C)[None, :]
        e = tl.load(e_ptr + r[:, None] * C + j[None, :], mask=mask, other=float("inf"))
        neg = _max_update(neg, tl.where(mask & (e == float("inf")), float("nan"), -e))
    lo = -_max_reduce(neg, 1)
    # 2. Z = sum_j exp(rowmin - E); padded columns add 0.
    z = tl.zeros([BLOCK_R, BLOCK_J], dtype=ACC)
    for j0 in range(0, C, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        mask = r_mask[:, None] & (j < C)[None, :]
        e = tl.load(e_ptr + r[:, None] * C + j[None, :], mask=mask, other=0.0)
        z += tl.where(mask, tl.exp(lo[:, None] - e), 0.0)
    zs = tl.sum(z, axis=1)
    # 3. The weights, those below the smallest normal number 0 (NaN < tiny is false: kept).
    tiny = _tiny(ACC)
    for j0 in range(0, C, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        mask = r_mask[:, None] & (j < C)[None, :]
        offs = r[:, None] * C + j[None, :]
        e = tl.load(e_ptr + offs, mask=mask, other=0.0)
        a = _div(tl.exp(lo[:, None] - e), zs[:, None])
        tl.store(attn_ptr + offs, tl.where(a < tiny, 0.0, a), mask=mask)


@triton.jit
def _out_kernel(
    attn_ptr, x_ptr, gamma_ptr, y_ptr,
    C, HW, num_mb, num_nb,
    sx_n, sx_c, sx_p,
    sy_n, sy_c, sy_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IP: tl.constexpr,
):
    """y[n, i, p] = gamma * sum_j attn[n, i, j] X[n, j, p] + x[n, i, p] for this program's
    channels i and pixels p, in acc, rounded once to y's dtype."""
    ACC = attn_ptr.dtype.element_ty
    n, mb, nb = _program(num_nb, num_mb)
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    p = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    i_mask = i < C
    p_mask = p < HW
    a_base = n * C * C
    x_base = n * sx_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < C
        at = _tile(attn_ptr, a_base, i, C, i_mask, k, 1, k_mask)  # attn [BLOCK_M, BLOCK_K]
        xt = _tile(x_ptr, x_base, k, sx_c, k_mask, p, sx_p, p_mask).to(ACC)  # X [BLOCK_K, BLOCK_N]
        acc = _dot(at, xt, acc, IP)
    gamma = tl.load(gamma_ptr)
    xi = _tile(x_ptr, x_base, i, sx_c, i_mask, p, sx_p, p_mask).to(ACC)
    offs = n * sy_n + i.to(tl.int64)[:, None] * sy_c + p.to(tl.int64)[None, :] * sy_p
    tl.store(y_ptr + offs, (gamma * acc + xi).to(y_ptr.dtype.element_ty), mask=i_mask[:, None] & p_mask[None, :])


@triton.jit
def _rows_kernel(
    attn_ptr, g_ptr, gamma_ptr, de_ptr, part_ptr, R, C,
    BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """For this program's rows of attn and G = grad_y X^T: dA = gamma G, dE = -attn * (dA -
    rowsum(dA * attn)), and part[program] = sum of attn * G over the rows (grad_gamma's partial)."""
    ACC = attn_ptr.dtype.element_ty
    r, r_mask = _row_block(R, BLOCK_R)
    gamma = tl.load(gamma_ptr)
    sg = tl.zeros([BLOCK_R, BLOCK_J], dtype=ACC)
    for j0 in range(0, C, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        mask = r_mask[:, None] & (j < C)[None, :]
        offs = r[:, None] * C + j[None, :]
        a = tl.load(attn_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        sg += a * g
    r_sum = tl.sum(sg, axis=1)
    rd = gamma * r_sum  # rowsum(dA * attn), dA = gamma G: gamma factored out (one accumulator)
    for j0 in range(0, C, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        mask = r_mask[:, None] & (j < C)[None, :]
        offs = r[:, None] * C + j[None, :]
        a = tl.load(attn_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        tl.store(de_ptr + offs, -a * (gamma * g - rd[:, None]), mask=mask)
    tl.store(part_ptr + tl.program_id(0), tl.sum(r_sum, axis=0))


@triton.jit
def _grad_x_kernel(
    de_ptr, attn_ptr, x_ptr, gy_ptr, gamma_ptr, gx_ptr,
    C, HW, num_mb, num_nb,
    sx_n, sx_c, sx_p,
    sg_n, sg_c, sg_p,
    so_n, so_c, so_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IP: tl.constexpr,
):
    """grad_x[n, i, p] = g[i, p] + sum_j (gamma attn[j, i]) g[j, p] + (dE[i, j] + dE[j, i]) X[j, p]
    for this program's channels i and pixels p, in acc, rounded once to grad_x's dtype."""
    ACC = attn_ptr.dtype.element_ty
    n, mb, nb = _program(num_nb, num_mb)
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    p = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    i_mask = i < C
    p_mask = p < HW
    a_base = n * C * C
    x_base = n * sx_n
    g_base = n * sg_n
    gamma = tl.load(gamma_ptr)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < C
        s = _tile(de_ptr, a_base, i, C, i_mask, k, 1, k_mask) + _tile(de_ptr, a_base, i, 1, i_mask, k, C, k_mask)
        xt = _tile(x_ptr, x_base, k, sx_c, k_mask, p, sx_p, p_mask).to(ACC)
        acc = _dot(s, xt, acc, IP)
        at = gamma * _tile(attn_ptr, a_base, i, 1, i_mask, k, C, k_mask)  # gamma attn^T [BLOCK_M, BLOCK_K]
        gt = _tile(gy_ptr, g_base, k, sg_c, k_mask, p, sg_p, p_mask).to(ACC)
        acc = _dot(at, gt, acc, IP)
    gi = _tile(gy_ptr, g_base, i, sg_c, i_mask, p, sg_p, p_mask).to(ACC)
    offs = n * so_n + i.to(tl.int64)[:, None] * so_c + p.to(tl.int64)[None, :] * so_p
    tl.store(gx_ptr + offs, (gi + acc).to(gx_ptr.dtype.element_ty), mask=i_mask[:, None] & p_mask[None, :])


# ----------------------------------------------------------------------------------------
# Host-side launches shared by the ops
# ----------------------------------------------------------------------------------------
def _gram(site: str, a: torch.Tensor, sa: tuple, b: torch.Tensor, sb: tuple, x: torch.Tensor,
          acc: torch.dtype) -> torch.Tensor:
    """(N, C, C) contiguous in acc: a[n] b[n]^T over the pixels (a, b read through their
    (n, c, pixel) strides sa, sb); x, the op's input, keys the measured launch."""
    n, c, h, w = x.shape
    hw = h * w
    out = torch.empty((n, c, c), dtype=acc, device=x.device)

    def launch(bm: int, bn: int, bk: int, num_warps: int) -> None:
        num_mb, num_nb = triton.cdiv(c, bm), triton.cdiv(c, bn)
        wrap_triton(_gram_kernel)[(n * num_mb * num_nb,)](
            a, b, out, c, hw, num_mb, num_nb, *sa, *sb,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IP=_precision(x.dtype), num_warps=num_warps,
        )

    _launch_dot(site, x, _dot_blocks(_GRAM_BLOCKS, x, c, c, hw), launch)
    return out


def _apply(site: str, x: torch.Tensor, kernel, args: tuple, strides: tuple) -> None:
    """A launch of an apply kernel (`_out_kernel`, `_grad_x_kernel`): one program per (n,
    channel block, pixel block), the channels j in chunks; `args` its tensors, `strides` its
    (n, c, pixel) stride triples."""
    n, c, h, w = x.shape
    hw = h * w

    def launch(bm: int, bn: int, bk: int, num_warps: int) -> None:
        num_mb, num_nb = triton.cdiv(c, bm), triton.cdiv(hw, bn)
        wrap_triton(kernel)[(n * num_mb * num_nb,)](
            *args, c, hw, num_mb, num_nb, *strides,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IP=_precision(x.dtype), num_warps=num_warps,
        )

    _launch_dot(site, x, _dot_blocks(_APPLY_BLOCKS, x, c, hw, c), launch)


# ----------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------
_op = _op_registrar(HOT_PATH)


@_op("cam")
def cam(x: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, attn): attn = flush(softmax(rowmin(E) - E)), E = X X^T, in acc; y = gamma attn X + x
    in x's dtype and layout."""
    check_cam(x, gamma)
    _nonempty("cam", "x", x)
    n, c = x.shape[:2]
    acc = accumulate_dtype(x.dtype)
    y = empty_like_layout(x)
    xs, sx = _pixel_strides(x)
    _, sy = _pixel_strides(y)
    g = _acc_vector(gamma, acc)

    energy = _gram("cam_energy", xs, sx, xs, sx, x, acc)
    attn = torch.empty((n, c, c), dtype=acc, device=x.device)

    def softmax(block_c: int, block_hw: int, num_warps: int) -> None:
        wrap_triton(_softmax_kernel)[(triton.cdiv(n * c, block_c),)](
            energy, attn, n * c, c, BLOCK_R=block_c, BLOCK_J=block_hw, num_warps=num_warps,
        )

    _launch_rows("cam_softmax", x, softmax)
    _apply("cam_out", x, _out_kernel, (attn, xs, g, y), (*sx, *sy))
    return y, attn


@_op("cam_backward")
def cam_backward(
    grad_y: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, attn: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_gamma) of cam: grad_x in x's dtype and layout, grad_gamma in gamma's shape
    and dtype."""
    check_cam_backward(grad_y, x, gamma, attn)
    _nonempty("cam_backward", "x", x)
    n, c = x.shape[:2]
    acc = accumulate_dtype(x.dtype)
    grad_x = empty_like_layout(x)
    (xs, sx), (gy, sg), (_, so) = _pixel_strides(x), _pixel_strides(grad_y), _pixel_strides(grad_x)
    attn = attn.contiguous()
    g = _acc_vector(gamma, acc)

    # 1. G = grad_y X^T. 2. dE and the row blocks' partials of grad_gamma (their count follows
    # the tile), summed in order. 3. grad_x.
    gram = _gram("cam_backward_gram", gy, sg, xs, sx, x, acc)
    d_energy = torch.empty_like(gram)

    def rows(block_c: int, block_hw: int, num_warps: int) -> torch.Tensor:
        programs = triton.cdiv(n * c, block_c)
        part = torch.empty((programs, 1), dtype=acc, device=x.device)
        wrap_triton(_rows_kernel)[(programs,)](
            attn, gram, g, d_energy, part, n * c, c, BLOCK_R=block_c, BLOCK_J=block_hw, num_warps=num_warps,
        )
        return part

    part = _launch_rows("cam_backward_rows", x, rows)
    grad_gamma = _like_param(_sum_partials(part), gamma)
    _apply("cam_backward_grad_x", x, _grad_x_kernel, (d_energy, attn, xs, gy, g, grad_x), (*sx, *sg, *so))
    return grad_x, grad_gamma


# Importing this module gives the ops their autograd.
register_hot_path(HOT_PATH, "attnkernels_triton")
