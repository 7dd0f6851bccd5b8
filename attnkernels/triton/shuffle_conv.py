"""Triton kernels of the shuffle_conv hot path (GAM's spatial gate: a grouped k x k conv that
reads its input through the channel shuffle and a folded BatchNorm + ReLU, with GAM's epilogue).

Registers four ops under `torch.ops.attnkernels_triton` with the schemas and the math of
`csrc/shuffle_conv_ops.cpp` (the contract, "shuffle_conv hot path"), and, on import, their
autograd and the composite shuffle_conv_bn_gate (`attnkernels.ops.shuffle_conv`, which also
holds the argument checks):

    shuffle_conv(s, weight, bias?, groups, shuffle_groups, in_scale?, in_shift?, gate_x?, out_scale?, out_shift?)
        -> out
    shuffle_conv_backward(grad_z, s, weight, groups, shuffle_groups, in_scale?, in_shift?)
        -> (grad_s, grad_weight, grad_bias, grad_in_scale, grad_in_shift)
    shuffle_conv_epilogue(z, gate_x, out_scale, out_shift) -> y
    shuffle_conv_epilogue_backward(grad_y, z, gate_x, out_scale, out_shift, mean?, rstd?)
        -> (grad_z, grad_gate_x, grad_out_scale, grad_out_shift)

Notation as the contract: s (N, C_in, H, W), weight (C_out, Cg, k, k) with G = groups,
Cg = C_in / G, Og = C_out / G, P = (k - 1) / 2 (stride 1, zero padding); the conv's input
channel c reads s's channel pi(c) = (c % shuffle_groups) * (C_in / shuffle_groups) +
c / shuffle_groups, through u = relu(in_scale * s + in_shift) (the prologue, when given) inside
the image and 0 outside it. Small parameters of any floating dtype are cast to acc(s) once on
the host (float64 for float64 s, float32 otherwise); all arithmetic is in acc. Feature maps
have any strides: the conv kernels address every tensor by its four (n, c, h, w) strides (no
copy, sliced views included), the epilogue kernels by (n, c, pixel) strides when (h, w) flatten
to one and by (h, w) otherwise. Outputs take the layout of the tensor the contract names
(channels_last when it is channels_last-dense and not NCHW-contiguous, NCHW otherwise).

The conv is an implicit GEMM on tl.dot tiles: for each input-channel chunk and each of the
k*k taps, [BLOCK_P pixels, BLOCK_CI channels] of u (gathered through pi, shifted by the tap,
prologue applied on load) times [BLOCK_CI, BLOCK_O] of the tap's weights. Every dimension is
padded to a power of two >= 16 (tl.dot's minimum) and masked, so a group with Og or Cg below
16 pays for padding (GAM's conv1 with g = 4 has Og = 4). fp32 multiplies exactly
(input_precision="ieee"), fp64 in fp64; fp16/bf16 inputs run their fp32 operands on the TF32
tensor cores (s itself is exact in TF32; u after the prologue, the weights and grad_z round to
TF32's 10-bit mantissa, the precision of fp16) with fp32 accumulation.

Kernels (all deterministic: no atomics, every reduction in a fixed order; 1-D grids, pixel
blocks fastest):
  * shuffle_conv: one program per (n, group, block of BLOCK_O output channels, block of
    BLOCK_P pixels); bias, then the raw z (acc(s)) or gate_x * sigmoid(out_scale * z +
    out_shift) (gate_x's dtype) is stored; z is never written in the gated form.
  * shuffle_conv_backward, in three launches:
      1. grad_u by the transposed conv (the same implicit GEMM over output-channel chunks and
         taps, grad_z read at h - i + P, w - j + P), then the prologue's backward: grad_s at
         s's channel pi(c), and per-(n, pixel block) partials of sum du * s and sum du.
      2. grad_weight: one program per (tap, group, output block, input block, split of the
         (n, pixel block) tiles): [BLOCK_O, BLOCK_CI] += grad_z^T u over the split's pixels,
         u recomputed as in the forward; also grad_bias's partial sum of grad_z.
      3. the partials summed over the splits / pixel blocks in order (`_sum_partials`).
  * shuffle_conv_epilogue: elementwise, one program per (n, channel block, pixel block).
  * shuffle_conv_epilogue_backward: one elementwise launch writes grad_gate_x (and, without
    mean/rstd, grad_z = dpre * out_scale) and per-(n, pixel block) partials of sum dpre,
    sum dpre * z and sum dpre * (z - mean); after their ordered sum, with mean/rstd a second
    elementwise launch writes BatchNorm's training grad_z, which needs those sums first.

Blocks and warps follow static rules (`_conv_blocks`, `_epi_blocks` of _EPI_TILE elements). On
a GPU every launch is measured instead (`_common._launch_choice`): the first time s's (the
epilogues': gate_x's or z's) shape is seen at a launch, the rule's configuration and its
candidates each run once and the fastest is kept. The conv kernels' candidates halve one tl.dot
block (the forward its pixel or output block, grad_s its pixel or input block, grad_weight its
input or output block), the epilogue kernels' tiles have half and twice the rule's elements.
Under the interpreter, tracing or static mode the rule's configuration runs.

On a machine without a GPU set TRITON_INTERPRET=1 before importing this module; the ops
then run on CPU tensors under the Triton interpreter.
"""
from collections.abc import Callable
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from ..ops import _checks as check
from ..ops import register_hot_path
from ..ops._common import empty_like_layout
from ..ops.shuffle_conv import (
    check_epilogue,
    check_shuffle_conv,
    check_shuffle_conv_backward,
    check_shuffle_conv_epilogue_backward,
)
from ..reference._base import memory_format_of
from ..reference.formulas import accumulate_dtype
from ._common import (
    _acc_vector,
    _div,
    _dot_block,
    _halved_blocks,
    _hw_offsets,
    _launch_choice,
    _launch_measured,
    _like_param,
    _nchw_strides,
    _nonempty,
    _op_registrar,
    _pow2,
    _precision,
    _relu,
    _sigmoid,
    _splits,
    _sum_partials,
    _warps,
)
from ._compat import _dot, wrap_triton

HOT_PATH = "shuffle_conv"

__all__ = [
    "shuffle_conv",
    "shuffle_conv_backward",
    "shuffle_conv_epilogue",
    "shuffle_conv_epilogue_backward",
]


# ----------------------------------------------------------------------------------------
# Host-side helpers: tiles
# ----------------------------------------------------------------------------------------
# Module attributes, so tests can force many small blocks and splits (tl.dot needs every
# dimension >= 16: _common._dot_block). Per input dtype: (BLOCK_P pixels, widest BLOCK_CI
# input-channel chunk, widest BLOCK_O output-channel block).
_CONV_BLOCKS = {
    torch.float64: (32, 16, 32),
    torch.float32: (64, 32, 64),
    torch.float16: (64, 32, 64),
    torch.bfloat16: (64, 32, 64),
}
# The elementwise epilogue tiles [BLOCK_C, BLOCK_P]: elements per tile, widest pixel block,
# widest channel block when channels are the contiguous dimension.
_EPI_TILE = 2048
_EPI_MAX_BLOCK_P = 256
_EPI_MAX_BLOCK_C_CHANNELS_LAST = 64


def _conv_blocks(dtype: torch.dtype, hw: int, cg: int, og: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_CI, BLOCK_O)."""
    bp, bci, bo = _CONV_BLOCKS[dtype]
    return _dot_block(hw, bp), _dot_block(cg, bci), _dot_block(og, bo)


def _conv_config(blocks: tuple[int, int, int], warps: Callable[[int, int, int], int]) -> tuple[str, dict[str, int]]:
    """A conv launch configuration, blocks (BLOCK_P, BLOCK_CI, BLOCK_O) and `warps(*blocks)`
    warps: its name (as `choose.explain()` lists it; one name, one configuration, whichever
    conv kernel) and launch parameters."""
    bp, bci, bo = blocks
    num_warps = warps(bp, bci, bo)
    return f"p{bp}ci{bci}o{bo}/{num_warps}w", {"bp": bp, "bci": bci, "bo": bo, "num_warps": num_warps}


# Per conv launch site: the blocks of (BLOCK_P, BLOCK_CI, BLOCK_O) its candidates halve, and its
# warps by its fp32 accumulator tile.
_CONV_SITES: dict[str, tuple[tuple[int, ...], Callable[[int, int, int], int]]] = {
    "shuffle_conv": ((0, 2), lambda bp, bci, bo: _warps(bp * bo)),  # [BLOCK_P, BLOCK_O]
    "shuffle_conv_backward.grad_s": ((0, 1), lambda bp, bci, bo: _warps(bp * bci)),  # [BLOCK_P, BLOCK_CI]
    "shuffle_conv_backward.grad_weight": ((1, 2), lambda bp, bci, bo: _warps(bo * bci)),  # [BLOCK_O, BLOCK_CI]
}


def _conv_candidates(site: str, blocks: tuple[int, int, int]) -> dict[str, dict[str, int]]:
    """The configurations a GPU measures for the conv kernel at `site`: the rule's `blocks`
    (`_conv_blocks`), then each block of _CONV_SITES[site] halved (twice the programs, a smaller
    tile), where tl.dot allows it (`_common._halved_blocks`)."""
    dims, warps = _CONV_SITES[site]
    return dict(_conv_config(b, warps) for b in _halved_blocks(blocks, dims))


def _launch_conv(site: str, s: torch.Tensor, blocks: tuple[int, int, int], launch: Callable[..., Any],
                 params: tuple) -> Any:
    """`launch(bp=, bci=, bo=, num_warps=)` of the conv kernel at `site` and its result, in the
    rule's `blocks` or, on a GPU, the candidate (`_conv_candidates`) measured fastest once per
    s's shape and the conv's `params` (`_common._launch_choice`)."""
    return _launch_choice(site, s, lambda: _conv_config(blocks, _CONV_SITES[site][1]),
                          lambda: _conv_candidates(site, blocks), launch, params)


def _epi_blocks(t: torch.Tensor, elements: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) of epilogue tiles of `elements` (the rule's: _EPI_TILE; fewer on small
    maps): the long side along t's contiguous dimension."""
    _, c, h, w = t.shape
    hw = h * w
    if c > 1 and hw > 1 and t.stride(1) == 1:  # channels_last
        block_c = min(_pow2(c), _EPI_MAX_BLOCK_C_CHANNELS_LAST)
        return block_c, min(_pow2(hw), max(1, elements // block_c))
    block_p = min(_pow2(hw), _EPI_MAX_BLOCK_P)
    return min(_pow2(c), max(1, elements // block_p)), block_p


def _epi_warps(block_c: int, block_p: int) -> int:
    """4 warps up to the rule's _EPI_TILE values (16 per thread), 8 beyond: at 4, the backward
    kernels' fp64 tile of twice the values spilled 516-860 B per thread where the strides do not
    flatten (FLAT=False), over the 512 B limit (`make triton-aot`)."""
    return 4 if block_c * block_p <= _EPI_TILE else 8


def _launch_epilogue(site: str, t: torch.Tensor, launch: Callable[..., Any], params: tuple = ()) -> Any:
    """`launch(block_c=, block_hw=, num_warps=)` of one epilogue kernel over t's tiles and its
    result, in the rule's tile (_EPI_TILE elements) or, on a GPU, the one of the rule's, half and
    twice its elements measured fastest once per t's shape and `params` (`_common._launch_measured`)."""
    return _launch_measured(site, t, lambda elements: _epi_blocks(t, elements), _EPI_TILE, _epi_warps, launch, params)


# ----------------------------------------------------------------------------------------
# Conv kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _pixels(pb, H, W, BLOCK_P: tl.constexpr):
    """The pixel block's flat indices p, their rows ph and columns pw, and p < H*W."""
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    return p, p // W, p % W, p < H * W


@triton.jit
def _conv_program(num_g, num_b, num_pb):
    """(n (int64), group g, block b, pixel block pb) of a 1-D grid over (n, g, b, pb), pixel
    blocks fastest; b is an output block (forward) or an input block (grad_s)."""
    pid = tl.program_id(0)
    pb = pid % num_pb
    rest = pid // num_pb
    b = rest % num_b
    rest = rest // num_b
    return (rest // num_g).to(tl.int64), rest % num_g, b, pb


@triton.jit
def _pix_offsets(base, hh, ww, s_h, s_w, c, s_c):
    """Element offsets (int64) of the [BLOCK_P, channels] tile at pixels (hh, ww), channels c."""
    return base + hh.to(tl.int64)[:, None] * s_h + ww.to(tl.int64)[:, None] * s_w + c.to(tl.int64)[None, :] * s_c


@triton.jit
def _tap_pixels(ph, pw, p_mask, di, dj, H, W):
    """Pixels (ph + di, pw + dj) and whether they lie inside the image (the zero padding)."""
    hh = ph + di
    ww = pw + dj
    return hh, ww, p_mask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)


@triton.jit
def _shuffled(g, cl, Cg, SG, CPS):
    """s's channel pi(c) of the conv's input channel c = g*Cg + cl (CPS = C_in / shuffle_groups)."""
    c = g * Cg + cl
    return (c % SG) * CPS + c // SG


@triton.jit
def _load_u(
    s_ptr, s_base, cs, c_mask, hh, ww, inside, ss_c, ss_h, ss_w, sc, sh, PROLOGUE: tl.constexpr,
):
    """u [BLOCK_P, BLOCK_CI] at pixels (hh, ww) of s's channels cs, in acc: relu(sc * s + sh)
    with the prologue (sc, sh: cs's in_scale, in_shift), 0 outside the image and the chunk."""
    mask = inside[:, None] & c_mask[None, :]
    u = tl.load(s_ptr + _pix_offsets(s_base, hh, ww, ss_h, ss_w, cs, ss_c), mask=mask, other=0.0).to(sc.dtype)
    if PROLOGUE:  # the conv pads the prologue's output: relu(sh) must not leak into the padding
        u = tl.where(mask, _relu(u * sc[None, :] + sh[None, :]), 0.0)
    return u


@triton.jit
def _prologue_params(isc_ptr, ish_ptr, cs, c_mask, PROLOGUE: tl.constexpr):
    """in_scale, in_shift (acc) at s's channels cs; without the prologue (the pointers then
    address a dummy acc tensor) ones and zeros, of which _load_u only uses the dtype."""
    if PROLOGUE:
        sc = tl.load(isc_ptr + cs, mask=c_mask, other=0.0)
        sh = tl.load(ish_ptr + cs, mask=c_mask, other=0.0)
    else:
        sc = tl.full(cs.shape, 1.0, isc_ptr.dtype.element_ty)
        sh = tl.zeros(cs.shape, isc_ptr.dtype.element_ty)
    return sc, sh


@triton.jit
def _conv_kernel(
    s_ptr, w_ptr, bias_ptr, isc_ptr, ish_ptr, gx_ptr, osc_ptr, osh_ptr, out_ptr,
    H, W, Cg, Og, SG, CPS, num_g, num_ob, num_pb,
    ss_n, ss_c, ss_h, ss_w,
    sgx_n, sgx_c, sgx_h, sgx_w,
    so_n, so_c, so_h, so_w,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, PROLOGUE: tl.constexpr, GATED: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_O: tl.constexpr, IP: tl.constexpr,
):
    """z (or the gated output) for one (n, group g, output block, pixel block)."""
    ACC = w_ptr.dtype.element_ty
    P: tl.constexpr = (K - 1) // 2
    n, g, ob, pb = _conv_program(num_g, num_ob, num_pb)
    p, ph, pw, p_mask = _pixels(pb, H, W, BLOCK_P)
    ol = ob * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = ol < Og
    o = g * Og + ol
    s_base = n * ss_n

    acc = tl.zeros([BLOCK_P, BLOCK_O], dtype=ACC)
    for c0 in range(0, Cg, BLOCK_CI):
        cl = c0 + tl.arange(0, BLOCK_CI)
        c_mask = cl < Cg
        cs = _shuffled(g, cl, Cg, SG, CPS)
        sc, sh = _prologue_params(isc_ptr, ish_ptr, cs, c_mask, PROLOGUE)
        # weight[o, cl, i, j] as [BLOCK_CI, BLOCK_O], tap (i, j) added in the loop
        w_offs = o.to(tl.int64)[None, :] * (Cg * K * K) + cl[:, None] * (K * K)
        w_mask = c_mask[:, None] & o_mask[None, :]
        for t in range(K * K):
            hh, ww, inside = _tap_pixels(ph, pw, p_mask, t // K - P, t % K - P, H, W)
            u = _load_u(s_ptr, s_base, cs, c_mask, hh, ww, inside, ss_c, ss_h, ss_w, sc, sh, PROLOGUE)
            wt = tl.load(w_ptr + w_offs + t, mask=w_mask, other=0.0)
            acc = _dot(u, wt, acc, IP)

    z = acc
    if HAS_BIAS:
        z += tl.load(bias_ptr + o, mask=o_mask, other=0.0)[None, :]
    mask = p_mask[:, None] & o_mask[None, :]
    if GATED:
        gx = tl.load(gx_ptr + _pix_offsets(n * sgx_n, ph, pw, sgx_h, sgx_w, o, sgx_c), mask=mask, other=0.0).to(ACC)
        osc = tl.load(osc_ptr + o, mask=o_mask, other=0.0)
        osh = tl.load(osh_ptr + o, mask=o_mask, other=0.0)
        z = gx * _sigmoid(z * osc[None, :] + osh[None, :])
    out_offs = _pix_offsets(n * so_n, ph, pw, so_h, so_w, o, so_c)
    tl.store(out_ptr + out_offs, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_s_kernel(
    gz_ptr, s_ptr, w_ptr, isc_ptr, ish_ptr, gs_ptr, part_ptr,
    C_in, H, W, Cg, Og, SG, CPS, num_g, num_cb, num_pb,
    sz_n, sz_c, sz_h, sz_w,
    ss_n, ss_c, ss_h, ss_w,
    so_n, so_c, so_h, so_w,
    K: tl.constexpr, PROLOGUE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_O: tl.constexpr, IP: tl.constexpr,
):
    """grad_s at s's channels pi(c) for one (n, group g, input block c, pixel block), and with the
    prologue this (n, pixel block)'s partial sums of du * s and du (row n*num_pb + pb)."""
    ACC = w_ptr.dtype.element_ty
    P: tl.constexpr = (K - 1) // 2
    n, g, cb, pb = _conv_program(num_g, num_cb, num_pb)
    p, ph, pw, p_mask = _pixels(pb, H, W, BLOCK_P)
    cl = cb * BLOCK_CI + tl.arange(0, BLOCK_CI)
    c_mask = cl < Cg
    z_base = n * sz_n

    # grad_u[c, h, w] = sum_{o, i, j} weight[o, c, i, j] * grad_z[o, h - i + P, w - j + P]
    acc = tl.zeros([BLOCK_P, BLOCK_CI], dtype=ACC)
    for o0 in range(0, Og, BLOCK_O):
        ol = o0 + tl.arange(0, BLOCK_O)
        o_mask = ol < Og
        o = g * Og + ol
        w_offs = o.to(tl.int64)[:, None] * (Cg * K * K) + cl[None, :] * (K * K)  # [BLOCK_O, BLOCK_CI]
        w_mask = o_mask[:, None] & c_mask[None, :]
        for t in range(K * K):
            hh, ww, inside = _tap_pixels(ph, pw, p_mask, P - t // K, P - t % K, H, W)
            gz_offs = _pix_offsets(z_base, hh, ww, sz_h, sz_w, o, sz_c)
            gz = tl.load(gz_ptr + gz_offs, mask=inside[:, None] & o_mask[None, :], other=0.0).to(ACC)
            wt = tl.load(w_ptr + w_offs + t, mask=w_mask, other=0.0)
            acc = _dot(gz, wt, acc, IP)

    cs = _shuffled(g, cl, Cg, SG, CPS)
    mask = p_mask[:, None] & c_mask[None, :]
    grad_s = acc
    if PROLOGUE:
        sv = tl.load(s_ptr + _pix_offsets(n * ss_n, ph, pw, ss_h, ss_w, cs, ss_c), mask=mask, other=0.0).to(ACC)
        sc = tl.load(isc_ptr + cs, mask=c_mask, other=0.0)
        sh = tl.load(ish_ptr + cs, mask=c_mask, other=0.0)
        # relu's gradient (a NaN t passes it on, as torch's); acc is 0 on padding
        du = tl.where(sv * sc[None, :] + sh[None, :] <= 0, 0.0, acc)
        grad_s = du * sc[None, :]
        row = part_ptr + (n * num_pb + pb) * (2 * C_in)
        tl.store(row + cs, tl.sum(du * sv, axis=0), mask=c_mask)
        tl.store(row + C_in + cs, tl.sum(du, axis=0), mask=c_mask)
    offs = _pix_offsets(n * so_n, ph, pw, so_h, so_w, cs, so_c)
    tl.store(gs_ptr + offs, grad_s.to(gs_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_weight_kernel(
    gz_ptr, s_ptr, isc_ptr, ish_ptr, part_ptr,
    H, W, Cg, Og, SG, CPS, C_out, num_g, num_ob, num_cb, num_pb, num_tiles, num_splits, part_len,
    sz_n, sz_c, sz_h, sz_w,
    ss_n, ss_c, ss_h, ss_w,
    K: tl.constexpr, PROLOGUE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_O: tl.constexpr, IP: tl.constexpr,
):
    """One split's partial grad_weight[o, c, i, j] for one (tap, group, output block, input
    block): sum over the split's (n, pixel block) tiles sp, sp + num_splits, ... of
    grad_z[n, o, p] * u[n, c, p + tap]. The partial row holds grad_weight (C_out*Cg*k*k values),
    then grad_bias (C_out), kept from the programs of tap 0 and input block 0."""
    ACC = part_ptr.dtype.element_ty
    P: tl.constexpr = (K - 1) // 2
    pid = tl.program_id(0)
    t = pid % (K * K)
    rest = pid // (K * K)
    cb = rest % num_cb
    rest = rest // num_cb
    ob = rest % num_ob
    rest = rest // num_ob
    g = rest % num_g
    sp = rest // num_g
    ol = ob * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = ol < Og
    o = g * Og + ol
    cl = cb * BLOCK_CI + tl.arange(0, BLOCK_CI)
    c_mask = cl < Cg
    cs = _shuffled(g, cl, Cg, SG, CPS)
    sc, sh = _prologue_params(isc_ptr, ish_ptr, cs, c_mask, PROLOGUE)

    acc = tl.zeros([BLOCK_O, BLOCK_CI], dtype=ACC)
    acc_b = tl.zeros([BLOCK_O], dtype=ACC)
    for tile in range(sp, num_tiles, num_splits):
        n = (tile // num_pb).to(tl.int64)
        p, ph, pw, p_mask = _pixels(tile % num_pb, H, W, BLOCK_P)
        gz_offs = _pix_offsets(n * sz_n, ph, pw, sz_h, sz_w, o, sz_c)
        gz = tl.load(gz_ptr + gz_offs, mask=p_mask[:, None] & o_mask[None, :], other=0.0).to(ACC)
        hh, ww, inside = _tap_pixels(ph, pw, p_mask, t // K - P, t % K - P, H, W)
        u = _load_u(s_ptr, n * ss_n, cs, c_mask, hh, ww, inside, ss_c, ss_h, ss_w, sc, sh, PROLOGUE)
        acc = _dot(tl.trans(gz), u, acc, IP)
        acc_b += tl.sum(gz, axis=0)

    row = part_ptr + sp.to(tl.int64) * part_len
    w_offs = o.to(tl.int64)[:, None] * (Cg * K * K) + cl[None, :] * (K * K) + t
    tl.store(row + w_offs, acc, mask=o_mask[:, None] & c_mask[None, :])
    tl.store(row + C_out * Cg * K * K + o, acc_b, mask=o_mask & (t == 0) & (cb == 0))  # one copy of each


# ----------------------------------------------------------------------------------------
# Epilogue kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _epi_program(num_cb, num_pb, C, HW, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """(n (int64), pixel block pb, channels c, pixels hw, tile mask) of a 1-D grid over
    (n, channel block, pixel block), pixel blocks fastest."""
    pid = tl.program_id(0)
    pb = pid % num_pb
    rest = pid // num_pb
    c = (rest % num_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = (rest // num_cb).to(tl.int64)
    hw = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    return n, pb, c, hw, (c < C)[:, None] & (hw < HW)[None, :]


@triton.jit
def _epi_offsets(n, c, hw, W, s_n, s_c, s_h, s_w, s_hw, FLAT: tl.constexpr):
    """Element offsets (int64) of the [BLOCK_C, BLOCK_P] tile (n, c, hw)."""
    return n * s_n + c.to(tl.int64)[:, None] * s_c + _hw_offsets(hw, W, s_h, s_w, s_hw, FLAT)[None, :]


@triton.jit
def _epilogue_kernel(
    z_ptr, gx_ptr, osc_ptr, osh_ptr, y_ptr,
    C, HW, W, num_cb, num_pb,
    sz_n, sz_c, sz_h, sz_w, sz_hw,
    sg_n, sg_c, sg_h, sg_w, sg_hw,
    sy_n, sy_c, sy_h, sy_w, sy_hw,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """y = gate_x * sigmoid(out_scale * z + out_shift) on one tile."""
    ACC = osc_ptr.dtype.element_ty
    n, pb, c, hw, mask = _epi_program(num_cb, num_pb, C, HW, BLOCK_C, BLOCK_P)
    c_mask = c < C
    z = tl.load(z_ptr + _epi_offsets(n, c, hw, W, sz_n, sz_c, sz_h, sz_w, sz_hw, FLAT), mask=mask, other=0.0)
    gx = tl.load(gx_ptr + _epi_offsets(n, c, hw, W, sg_n, sg_c, sg_h, sg_w, sg_hw, FLAT), mask=mask, other=0.0)
    osc = tl.load(osc_ptr + c, mask=c_mask, other=0.0)
    osh = tl.load(osh_ptr + c, mask=c_mask, other=0.0)
    y = gx.to(ACC) * _sigmoid(z.to(ACC) * osc[:, None] + osh[:, None])
    y_offs = _epi_offsets(n, c, hw, W, sy_n, sy_c, sy_h, sy_w, sy_hw, FLAT)
    tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue_dpre(
    gy_ptr, z_ptr, gx_ptr, osc_ptr, osh_ptr, n, c, c_mask, hw, mask, W,
    sy_n, sy_c, sy_h, sy_w, sy_hw,
    sz_n, sz_c, sz_h, sz_w, sz_hw,
    sg_n, sg_c, sg_h, sg_w, sg_hw,
    FLAT: tl.constexpr,
):
    """(out_scale at c, z, grad_y * sg, dpre = grad_y * gate_x * sg * (1 - sg)) on a tile in
    acc, sg = sigmoid(out_scale * z + out_shift); 0 on padding."""
    ACC = osc_ptr.dtype.element_ty
    osc = tl.load(osc_ptr + c, mask=c_mask, other=0.0)
    osh = tl.load(osh_ptr + c, mask=c_mask, other=0.0)
    gy = tl.load(gy_ptr + _epi_offsets(n, c, hw, W, sy_n, sy_c, sy_h, sy_w, sy_hw, FLAT), mask=mask, other=0.0)
    z = tl.load(z_ptr + _epi_offsets(n, c, hw, W, sz_n, sz_c, sz_h, sz_w, sz_hw, FLAT), mask=mask, other=0.0)
    gx = tl.load(gx_ptr + _epi_offsets(n, c, hw, W, sg_n, sg_c, sg_h, sg_w, sg_hw, FLAT), mask=mask, other=0.0)
    gy = gy.to(ACC)
    z = z.to(ACC)
    sg = _sigmoid(z * osc[:, None] + osh[:, None])
    return osc, z, gy * sg, gy * gx.to(ACC) * sg * (1.0 - sg)


@triton.jit
def _epilogue_backward_kernel(
    gy_ptr, z_ptr, gx_ptr, osc_ptr, osh_ptr, mean_ptr, gz_ptr, ggx_ptr, part_ptr,
    C, HW, W, num_cb, num_pb, part_len,
    sy_n, sy_c, sy_h, sy_w, sy_hw,
    sz_n, sz_c, sz_h, sz_w, sz_hw,
    sg_n, sg_c, sg_h, sg_w, sg_hw,
    sgz_n, sgz_c, sgz_h, sgz_w, sgz_hw,
    sgg_n, sgg_c, sgg_h, sgg_w, sgg_hw,
    BN: tl.constexpr, FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad_gate_x, grad_z = dpre * out_scale (without BN), and this (n, pixel block)'s
    partial sums of dpre, dpre * z and (BN) dpre * (z - mean): row n*num_pb + pb of part_len
    = 2C (3C with BN) values."""
    n, pb, c, hw, mask = _epi_program(num_cb, num_pb, C, HW, BLOCK_C, BLOCK_P)
    c_mask = c < C
    osc, z, ggx, dpre = _epilogue_dpre(
        gy_ptr, z_ptr, gx_ptr, osc_ptr, osh_ptr, n, c, c_mask, hw, mask, W,
        sy_n, sy_c, sy_h, sy_w, sy_hw, sz_n, sz_c, sz_h, sz_w, sz_hw, sg_n, sg_c, sg_h, sg_w, sg_hw, FLAT,
    )
    ggx_offs = _epi_offsets(n, c, hw, W, sgg_n, sgg_c, sgg_h, sgg_w, sgg_hw, FLAT)
    tl.store(ggx_ptr + ggx_offs, ggx.to(ggx_ptr.dtype.element_ty), mask=mask)
    row = part_ptr + (n * num_pb + pb) * part_len
    tl.store(row + c, tl.sum(dpre, axis=1), mask=c_mask)
    tl.store(row + C + c, tl.sum(dpre * z, axis=1), mask=c_mask)
    if BN:
        mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
        centred = tl.where(mask, dpre * (z - mean[:, None]), 0.0)
        tl.store(row + 2 * C + c, tl.sum(centred, axis=1), mask=c_mask)
    else:
        gz_offs = _epi_offsets(n, c, hw, W, sgz_n, sgz_c, sgz_h, sgz_w, sgz_hw, FLAT)
        tl.store(gz_ptr + gz_offs, (dpre * osc[:, None]).to(gz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_grad_z_kernel(
    gy_ptr, z_ptr, gx_ptr, osc_ptr, osh_ptr, mean_ptr, rstd_ptr, sums_ptr, gz_ptr,
    C, HW, W, M, num_cb, num_pb,
    sy_n, sy_c, sy_h, sy_w, sy_hw,
    sz_n, sz_c, sz_h, sz_w, sz_hw,
    sg_n, sg_c, sg_h, sg_w, sg_hw,
    sgz_n, sgz_c, sgz_h, sgz_w, sgz_hw,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad_z = out_scale * (dpre - sum dpre / M - (z - mean) * rstd^2 * sum(dpre (z - mean)) / M):
    BatchNorm's training backward through z's own batch statistics, dpre recomputed."""
    n, pb, c, hw, mask = _epi_program(num_cb, num_pb, C, HW, BLOCK_C, BLOCK_P)
    c_mask = c < C
    osc, z, _, dpre = _epilogue_dpre(
        gy_ptr, z_ptr, gx_ptr, osc_ptr, osh_ptr, n, c, c_mask, hw, mask, W,
        sy_n, sy_c, sy_h, sy_w, sy_hw, sz_n, sz_c, sz_h, sz_w, sz_hw, sg_n, sg_c, sg_h, sg_w, sg_hw, FLAT,
    )
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    rstd = tl.load(rstd_ptr + c, mask=c_mask, other=0.0)
    mean_dpre = _div(tl.load(sums_ptr + c, mask=c_mask, other=0.0), M)
    mean_dpre_zc = _div(tl.load(sums_ptr + 2 * C + c, mask=c_mask, other=0.0), M)
    gz = osc[:, None] * (
        dpre - mean_dpre[:, None] - (z - mean[:, None]) * (rstd * rstd * mean_dpre_zc)[:, None]
    )
    gz_offs = _epi_offsets(n, c, hw, W, sgz_n, sgz_c, sgz_h, sgz_w, sgz_hw, FLAT)
    tl.store(gz_ptr + gz_offs, gz.to(gz_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------
_op = _op_registrar(HOT_PATH)


def _conv_geometry(s: torch.Tensor, weight: torch.Tensor, groups: int, shuffle_groups: int) -> dict:
    """The conv's sizes as kernel arguments."""
    n, c_in, h, w = s.shape
    return dict(
        N=n, C_in=c_in, H=h, W=w, C_out=weight.shape[0], K=weight.shape[2],
        Cg=c_in // groups, Og=weight.shape[0] // groups, SG=shuffle_groups, CPS=c_in // shuffle_groups,
    )


@_op("shuffle_conv")
def shuffle_conv(
    s: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    groups: int,
    shuffle_groups: int,
    in_scale: Optional[torch.Tensor],
    in_shift: Optional[torch.Tensor],
    gate_x: Optional[torch.Tensor],
    out_scale: Optional[torch.Tensor],
    out_shift: Optional[torch.Tensor],
) -> torch.Tensor:
    """z = bias + conv(relu(in_scale * s + in_shift) through the shuffle) in acc(s) and s's layout,
    or gate_x * sigmoid(out_scale * z + out_shift) in gate_x's dtype and layout."""
    check_shuffle_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x, out_scale, out_shift)
    _nonempty("shuffle_conv", "s", s)
    geo = _conv_geometry(s, weight, groups, shuffle_groups)
    n, c_out, h, w = geo["N"], geo["C_out"], geo["H"], geo["W"]
    gated = gate_x is not None
    acc = accumulate_dtype(s.dtype)
    wa = _acc_vector(weight, acc)
    vecs = [_acc_vector(t, acc, wa) for t in (bias, in_scale, in_shift, out_scale, out_shift)]
    if gated:
        out = empty_like_layout(gate_x)
        gx = gate_x
    else:
        out = torch.empty((n, c_out, h, w), dtype=acc, device=s.device, memory_format=memory_format_of(s))
        gx = out  # never read

    def launch(bp: int, bci: int, bo: int, num_warps: int) -> None:
        num_ob, num_pb = triton.cdiv(geo["Og"], bo), triton.cdiv(h * w, bp)
        wrap_triton(_conv_kernel)[(n * groups * num_ob * num_pb,)](
            s, wa, *vecs[:3], gx, *vecs[3:], out,
            h, w, geo["Cg"], geo["Og"], geo["SG"], geo["CPS"], groups, num_ob, num_pb,
            *s.stride(), *gx.stride(), *out.stride(),
            K=geo["K"], HAS_BIAS=bias is not None, PROLOGUE=in_scale is not None, GATED=gated,
            BLOCK_P=bp, BLOCK_CI=bci, BLOCK_O=bo, IP=_precision(s.dtype), num_warps=num_warps,
        )

    params = (c_out, geo["K"], groups, shuffle_groups, bias is not None, in_scale is not None, gated)
    _launch_conv("shuffle_conv", s, _conv_blocks(s.dtype, h * w, geo["Cg"], geo["Og"]), launch, params)
    return out


@_op("shuffle_conv_backward")
def shuffle_conv_backward(
    grad_z: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    groups: int,
    shuffle_groups: int,
    in_scale: Optional[torch.Tensor],
    in_shift: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_s, grad_weight, grad_bias, grad_in_scale, grad_in_shift) of the raw shuffle_conv:
    grad_s in s's dtype and layout; grad_weight weight's shape and dtype, grad_bias C_out values in
    weight's dtype; grad_in_scale, grad_in_shift their parameter's shape and dtype, or shape (0,)
    in acc(s) without the prologue."""
    check_shuffle_conv_backward(grad_z, s, weight, groups, shuffle_groups, in_scale, in_shift)
    _nonempty("shuffle_conv_backward", "s", s)
    geo = _conv_geometry(s, weight, groups, shuffle_groups)
    n, c_in, c_out, h, w, k = geo["N"], geo["C_in"], geo["C_out"], geo["H"], geo["W"], geo["K"]
    cg, og = geo["Cg"], geo["Og"]
    acc = accumulate_dtype(s.dtype)
    prologue = in_scale is not None
    ip = _precision(s.dtype)
    wa = _acc_vector(weight, acc)
    isc, ish = _acc_vector(in_scale, acc, wa), _acc_vector(in_shift, acc, wa)
    blocks = _conv_blocks(s.dtype, h * w, cg, og)
    params = (c_out, k, groups, shuffle_groups, prologue)

    # 1. grad_s (and the prologue's per-(n, pixel block) partials).
    grad_s = empty_like_layout(s)

    def grad_s_launch(bp: int, bci: int, bo: int, num_warps: int) -> torch.Tensor:
        num_cb, num_pb = triton.cdiv(cg, bci), triton.cdiv(h * w, bp)
        part_in = torch.empty((n * num_pb, 2 * c_in) if prologue else (1, 1), dtype=acc, device=s.device)
        wrap_triton(_grad_s_kernel)[(n * groups * num_cb * num_pb,)](
            grad_z, s, wa, isc, ish, grad_s, part_in,
            c_in, h, w, cg, og, geo["SG"], geo["CPS"], groups, num_cb, num_pb,
            *grad_z.stride(), *s.stride(), *grad_s.stride(),
            K=k, PROLOGUE=prologue, BLOCK_P=bp, BLOCK_CI=bci, BLOCK_O=bo, IP=ip, num_warps=num_warps,
        )
        return part_in

    part_in = _launch_conv("shuffle_conv_backward.grad_s", s, blocks, grad_s_launch, params)

    # 2. per-split partial grad_weight and grad_bias.
    part_len = c_out * cg * k * k + c_out

    def grad_weight_launch(bp: int, bci: int, bo: int, num_warps: int) -> torch.Tensor:
        num_ob, num_cb, num_pb = triton.cdiv(og, bo), triton.cdiv(cg, bci), triton.cdiv(h * w, bp)
        num_tiles = n * num_pb
        per_split = k * k * groups * num_ob * num_cb
        num_splits = _splits(num_tiles, per_split, s.device)
        part_w = torch.empty((num_splits, part_len), dtype=acc, device=s.device)
        wrap_triton(_grad_weight_kernel)[(num_splits * per_split,)](
            grad_z, s, isc, ish, part_w,
            h, w, cg, og, geo["SG"], geo["CPS"], c_out, groups, num_ob, num_cb, num_pb,
            num_tiles, num_splits, part_len,
            *grad_z.stride(), *s.stride(),
            K=k, PROLOGUE=prologue, BLOCK_P=bp, BLOCK_CI=bci, BLOCK_O=bo, IP=ip, num_warps=num_warps,
        )
        return part_w

    part_w = _launch_conv("shuffle_conv_backward.grad_weight", s, blocks, grad_weight_launch, params)

    # 3. the partials summed in order.
    total = _sum_partials(part_w)
    grad_weight = _like_param(total[: c_out * cg * k * k], weight)
    grad_bias = total[c_out * cg * k * k :].to(weight.dtype, copy=True)
    if prologue:
        sums = _sum_partials(part_in)
        grad_in_scale, grad_in_shift = _like_param(sums[:c_in], in_scale), _like_param(sums[c_in:], in_shift)
    else:
        grad_in_scale = torch.empty((0,), dtype=acc, device=s.device)
        grad_in_shift = torch.empty((0,), dtype=acc, device=s.device)
    return grad_s, grad_weight, grad_bias, grad_in_scale, grad_in_shift


@_op("shuffle_conv_epilogue")
def shuffle_conv_epilogue(
    z: torch.Tensor, gate_x: torch.Tensor, out_scale: torch.Tensor, out_shift: torch.Tensor
) -> torch.Tensor:
    """y = gate_x * sigmoid(out_scale * z + out_shift) in acc(z), in gate_x's dtype and layout."""
    op = "shuffle_conv_epilogue"
    check.feature_map(op, "z", z)
    check_epilogue(gate_x, out_scale, out_shift, tuple(z.shape), z.device, op)
    _nonempty(op, "z", z)
    n, c, h, w = z.shape
    acc = accumulate_dtype(z.dtype)
    osc, osh = _acc_vector(out_scale, acc), _acc_vector(out_shift, acc)
    y = empty_like_layout(gate_x)
    flat, strides = _nchw_strides(z, gate_x, y)

    def launch(block_c: int, block_hw: int, num_warps: int) -> None:
        num_cb, num_pb = triton.cdiv(c, block_c), triton.cdiv(h * w, block_hw)
        wrap_triton(_epilogue_kernel)[(n * num_cb * num_pb,)](
            z, gate_x, osc, osh, y,
            c, h * w, w, num_cb, num_pb, *strides,
            FLAT=flat, BLOCK_C=block_c, BLOCK_P=block_hw, num_warps=num_warps,
        )

    _launch_epilogue("shuffle_conv_epilogue", gate_x, launch)  # gate_x's layout sets the tiles, as y's
    return y


@_op("shuffle_conv_epilogue_backward")
def shuffle_conv_epilogue_backward(
    grad_y: torch.Tensor,
    z: torch.Tensor,
    gate_x: torch.Tensor,
    out_scale: torch.Tensor,
    out_shift: torch.Tensor,
    mean: Optional[torch.Tensor],
    rstd: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_z, grad_gate_x, grad_out_scale, grad_out_shift) of shuffle_conv_epilogue; with mean
    and rstd grad_z is BatchNorm's training gradient through z's batch statistics. grad_z in z's
    dtype and layout, grad_gate_x gate_x's; grad_out_scale, grad_out_shift their parameter's
    shape and dtype."""
    check_shuffle_conv_epilogue_backward(grad_y, z, gate_x, out_scale, out_shift, mean, rstd)
    _nonempty("shuffle_conv_epilogue_backward", "z", z)
    n, c, h, w = z.shape
    bn = mean is not None
    acc = accumulate_dtype(z.dtype)
    osc, osh = _acc_vector(out_scale, acc), _acc_vector(out_shift, acc)
    mu, rs = _acc_vector(mean, acc, osc), _acc_vector(rstd, acc, osc)
    grad_z, grad_gate_x = empty_like_layout(z), empty_like_layout(gate_x)

    # 1. grad_gate_x, grad_z without BN, the per-(n, pixel block) sums; then their ordered sum.
    flat, strides = _nchw_strides(grad_y, z, gate_x, grad_z, grad_gate_x)

    def grad_launch(block_c: int, block_hw: int, num_warps: int) -> torch.Tensor:
        num_cb, num_pb = triton.cdiv(c, block_c), triton.cdiv(h * w, block_hw)
        part = torch.empty((n * num_pb, (3 if bn else 2) * c), dtype=acc, device=z.device)
        wrap_triton(_epilogue_backward_kernel)[(n * num_cb * num_pb,)](
            grad_y, z, gate_x, osc, osh, mu, grad_z, grad_gate_x, part,
            c, h * w, w, num_cb, num_pb, part.shape[1], *strides,
            BN=bn, FLAT=flat, BLOCK_C=block_c, BLOCK_P=block_hw, num_warps=num_warps,
        )
        return part

    # keyed by bn too: with BN the kernel sums a third partial and leaves grad_z to step 2
    sums = _sum_partials(_launch_epilogue("shuffle_conv_epilogue_backward.grad", z, grad_launch, (bn,)))

    # 2. BatchNorm's grad_z, which needs every sum first.
    if bn:
        flat, strides = _nchw_strides(grad_y, z, gate_x, grad_z)

        def bn_launch(block_c: int, block_hw: int, num_warps: int) -> None:
            num_cb, num_pb = triton.cdiv(c, block_c), triton.cdiv(h * w, block_hw)
            wrap_triton(_bn_grad_z_kernel)[(n * num_cb * num_pb,)](
                grad_y, z, gate_x, osc, osh, mu, rs, sums, grad_z,
                c, h * w, w, n * h * w, num_cb, num_pb, *strides,
                FLAT=flat, BLOCK_C=block_c, BLOCK_P=block_hw, num_warps=num_warps,
            )

        _launch_epilogue("shuffle_conv_epilogue_backward.bn_grad_z", z, bn_launch)
    grad_out_scale, grad_out_shift = _like_param(sums[c : 2 * c], out_scale), _like_param(sums[:c], out_shift)
    return grad_z, grad_gate_x, grad_out_scale, grad_out_shift


# Importing this module gives the ops their autograd and the composite shuffle_conv_bn_gate.
register_hot_path(HOT_PATH, "attnkernels_triton")
