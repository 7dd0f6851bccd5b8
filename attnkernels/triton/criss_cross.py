"""Triton kernels of the criss_cross hot path (CCNet's attention of each pixel over its row and
its column, flash-style: no (N, H + W - 1, H, W) energy tensor, forward or backward).

Registers two ops under `torch.ops.attnkernels_triton` with the schemas and the math of
`csrc/criss_cross_ops.cpp` (the contract, "CrissCross"), and, on import, their autograd
(`attnkernels.ops.criss_cross`, which also holds the argument checks):

    criss_cross(q, k, v, x, gamma) -> (y, out, lse)
    criss_cross_backward(grad_y, q, k, v, gamma, out, lse) -> (grad_q, grad_k, grad_v, grad_gamma)

Every kernel works on one *line* of the map: a row (h fixed, positions w) or a column (w
fixed, positions h). One jit function serves both: the host passes each tensor's (n, channel,
line, position) strides, (s_n, s_c, s_h, s_w) for rows and (s_n, s_c, s_w, s_h) for columns,
so any strides (NCHW, channels_last, slices) are read without a copy. COL (constexpr) marks
the column pass: its keys exclude the pixel itself (the row pass counted it), and it merges
with the row pass's results. Per-pixel (N, H*W) buffers (lse, R, the row pass's max and sum)
are contiguous in acc(x); the row pass's partial sums (N, C, H, W) or (N, D, H, W) are
NCHW-contiguous in acc. Memory: O(N C H W).

Forward, two launches:
  * row pass, one program per (n, h, block of BLOCK_M queries along w, chunk of BLOCK_C
    channels): online softmax over the row's keys in blocks of BLOCK_N (running max m_r and
    sum s_r per query, in acc), O_r = sum_w' exp(e_row - m_r) v unnormalised into an acc
    buffer; chunk 0 stores m_r, s_r.
  * column pass, one program per (n, w, block of queries along h, channel chunk): the same
    over keys h' != h (m_c, s_c, O_c), then the merge m = max(m_r, m_c),
    Z = s_r e^(m_r - m) + s_c e^(m_c - m), out = (O_r e^(m_r - m) + O_c e^(m_c - m)) / Z,
    lse = m + log Z; y = gamma * out (rounded to x's dtype) + x, in acc, rounded once.
    H == 1 leaves the column empty (m_c = -inf, s_c = 0): a -inf max subtracts 0, never -inf.
  Energies, softmax and accumulators in acc(x); fp32 tl.dot exact (input_precision "ieee"),
  fp64 in fp64, fp16/bf16 tiles to the tensor cores as they are with P rounded to v's dtype
  for its matmul (flash attention's rounding) and fp32 accumulation.

Backward (dS' = dS / gamma = P (G - R), G = sum_c grad_y v, so dS = gamma dS'):
  1. R[n, p] = sum_c grad_y * out and grad_gamma = sum R: nonlocal_attn's kernels (pixel-block
     partials, then one program sums them in order).
  2. grad_q: per line pass one program per (n, line, query block, D chunk) looping over the
     line's keys: recompute P = exp(S - lse), G, dS', grad_q += dS' k.
  3. grad_k: per (n, line, key block, D chunk) looping over the line's queries: dS'^T q.
  4. grad_v: per (n, line, key block, C chunk) looping over the queries: P^T grad_y.
  Each gradient's row pass writes (=) an acc buffer, its column pass adds (+=) its part and
  writes the gradient in its input's dtype and layout. A program owns its output tile for the
  whole pass (it loops over every query or key of its line): no two programs write one element
  in one launch, no atomics, every sum in a fixed order: deterministic.

Every launch over an x-sized tensor takes its blocks from the rule's (the tables below), half
BLOCK_M and half BLOCK_N, measured on a GPU once per shape and D (`_common._launch_choice`,
`_halved_blocks`); R's tile among the rule's, half and twice its values (`_launch_measured`).
Under the interpreter and static mode: the rules'.

On a machine without a GPU set TRITON_INTERPRET=1 before importing this module; the ops then
run on CPU tensors under the Triton interpreter.
"""
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ..ops import register_hot_path
from ..ops._common import empty_like_layout
from ..ops.criss_cross import check_criss_cross, check_criss_cross_backward
from ..reference.formulas import accumulate_dtype
from ._common import (
    _acc_vector,
    _div,
    _dot_block,
    _halved_blocks,
    _in_acc,
    _launch_choice,
    _launch_measured,
    _like_param,
    _nonempty,
    _op_registrar,
    _pixel_strides,
    _pow2,
    _precision,
    _tile,
    _warps,
)
from ._compat import _dot, wrap_triton
from .nonlocal_attn import _ROW_TILE_ELEMENTS, _SUM_BLOCK, _dot_warps, _row_blocks, _rowdot_kernel, _sum_kernel

HOT_PATH = "criss_cross"

__all__ = ["criss_cross", "criss_cross_backward"]


# ----------------------------------------------------------------------------------------
# Host-side helpers: tiles
# ----------------------------------------------------------------------------------------
# Module attributes, so tests can force many small blocks (tl.dot needs every dimension >= 16:
# _common._dot_block). (BLOCK_M queries, BLOCK_N keys along a line, BLOCK_C channels of v) per
# input dtype. Lines are short (a row or a column, not H*W), so the query and key blocks cover
# most of them; half inputs take wider channel chunks (each recomputes S), fp32 ("ieee": FMA
# dots) and fp64 smaller tiles, as nonlocal_attn's.
_FWD_BLOCKS = {
    torch.float16: (64, 64, 128),
    torch.bfloat16: (64, 64, 128),
    torch.float32: (64, 32, 64),
    torch.float64: (32, 32, 32),
}
# Backward: BLOCK_C is the chunk of the G = grad_y . v contraction and of grad_v's tile.
_BWD_BLOCKS = {
    torch.float16: (64, 64, 64),
    torch.bfloat16: (64, 64, 64),
    torch.float32: (32, 32, 32),
    torch.float64: (32, 32, 32),
}
# D (= C / 8 in CCNet) is contracted in chunks of at most this, and grad_q / grad_k tiled by it:
# FMA dots holding a wide D tile spilled in nonlocal_attn (its _MAX_FMA_BLOCK_DQK).
_MAX_BLOCK_D = 32


def _blocks(table: dict, x: torch.Tensor, length: int, channels: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_C) of a line pass over lines of `length` positions."""
    bm, bn, bc = table[x.dtype]
    return _dot_block(length, bm), _dot_block(length, bn), _dot_block(channels, bc)


def _line_config(bm: int, bn: int, bc: int, num_warps: int) -> tuple[str, dict[str, int]]:
    """A line kernel's launch configuration: its name (every parameter spelled out, in a form of
    its own: one name, one launch, `_common._TILE_CONFIGS`) and parameters."""
    return f"cc_m{bm}n{bn}c{bc}/{num_warps}w", {"bm": bm, "bn": bn, "bc": bc, "num_warps": num_warps}


_Warps = Callable[[int, int, int], int]


def _launch_line(site: str, x: torch.Tensor, d: int, blocks: tuple[int, int, int], warps: _Warps,
                 launch: Callable[..., None]) -> None:
    """`launch(bm=, bn=, bc=, num_warps=)` with the rule's `blocks`, half BLOCK_M or half BLOCK_N,
    the one measured fastest on a GPU for this site, x's shape and D; the rule's elsewhere."""
    _launch_choice(site, x, lambda: _line_config(*blocks, warps(*blocks)),
                   lambda: dict(_line_config(*b, warps(*b)) for b in _halved_blocks(blocks, (0, 1))),
                   launch, params=(d,))


def _passes(t: torch.Tensor) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """t's (n, channel, line, position) strides for the row pass and for the column pass."""
    s_n, s_c, s_h, s_w = t.stride()
    return (s_n, s_c, s_h, s_w), (s_n, s_c, s_w, s_h)


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _line_program(num_lines, num_b, num_a):
    """(n (int64), line (int64), b, a) of a 1-D grid over (n, line, b, a), a fastest."""
    pid = tl.program_id(0)
    a = pid % num_a
    rest = pid // num_a
    b = rest % num_b
    rest = rest // num_b
    return (rest // num_lines).to(tl.int64), (rest % num_lines).to(tl.int64), b, a


@triton.jit
def _contract_line(a_ptr, a_base, a_pos, a_s_pos, a_mask, a_s_c,
                   b_ptr, b_base, b_pos, b_s_pos, b_mask, b_s_c,
                   C, acc, BLOCK: tl.constexpr, IP: tl.constexpr):
    """acc + sum_c a[c, a_pos] b[c, b_pos] ([a positions, b positions]), c < C in chunks of BLOCK."""
    for c0 in range(0, C, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        c_mask = c < C
        a = _tile(a_ptr, a_base, a_pos, a_s_pos, a_mask, c, a_s_c, c_mask)
        b = _tile(b_ptr, b_base, c, b_s_c, c_mask, b_pos, b_s_pos, b_mask)
        acc = _dot(a, b, acc, IP)
    return acc


@triton.jit
def _keys_of(i, i_mask, j, j_mask, COL: tl.constexpr):
    """[queries, keys] mask of live energies: real positions, and in a column not the pixel itself."""
    valid = i_mask[:, None] & j_mask[None, :]
    if COL:
        valid = valid & (i[:, None] != j[None, :])
    return valid


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, x_ptr, gamma_ptr, y_ptr, out_ptr, lse_ptr, o_ptr, m_ptr, s_ptr,
    L, NL, D, C, num_mb, num_cb,
    sq_n, sq_d, sq_l, sq_p,
    sk_n, sk_d, sk_l, sk_p,
    sv_n, sv_c, sv_l, sv_p,
    sx_n, sx_c, sx_l, sx_p,
    sy_n, sy_c, sy_l, sy_p,
    so_n, so_c, so_l, so_p,
    HW, sr_l, sr_p,
    COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, IP: tl.constexpr,
):
    """One line pass of the forward for BLOCK_M queries i and BLOCK_C channels c of line `line`.
    Row pass: O_r (o_ptr, acc), m_r, s_r. Column pass: the merge into out, y, lse."""
    ACC = lse_ptr.dtype.element_ty
    n, line, cb, mb = _line_program(NL, num_cb, num_mb)
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    i_mask = i < L
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    q_base = n * sq_n + line * sq_l
    k_base = n * sk_n + line * sk_l
    v_base = n * sv_n + line * sv_l

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    for j0 in range(0, L, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_mask = j < L
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        s = _contract_line(q_ptr, q_base, i, sq_p, i_mask, sq_d,
                           k_ptr, k_base, j, sk_p, j_mask, sk_d, D, s, BLOCK_D, IP)
        # Padded keys, and the pixel itself in its column: no weight (a select: a NaN there is
        # not the pixel's energy, the reference's masked_fill drops it too).
        keep = j_mask[None, :]
        if COL:
            keep = keep & (i[:, None] != j[None, :])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A max still -inf (every energy so far masked or -inf) subtracts 0: exp gives 0, not
        # NaN. NaN energies stay NaN through exp.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = _tile(v_ptr, v_base, j, sv_p, j_mask, c, sv_c, c_mask)  # v^T [BLOCK_N, BLOCK_C]
        acc = _dot(p.to(vt.dtype), vt, acc * alpha[:, None], IP)
        m_i = m_new

    tile_mask = i_mask[:, None] & c_mask[None, :]
    o_offs = n * so_n + line * so_l + i.to(tl.int64)[:, None] * so_p + c.to(tl.int64)[None, :] * so_c
    px = n * HW + line * sr_l + i.to(tl.int64) * sr_p
    if COL:
        o_r = tl.load(o_ptr + o_offs, mask=tile_mask, other=0.0)
        m_r = tl.load(m_ptr + px, mask=i_mask, other=0.0)
        s_r = tl.load(s_ptr + px, mask=i_mask, other=1.0)
        m = tl.maximum(m_r, m_i)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        a_r = tl.exp(m_r - m_safe)
        a_c = tl.exp(m_i - m_safe)
        z = s_r * a_r + l_i * a_c
        out = _div(o_r * a_r[:, None] + acc * a_c[:, None], z[:, None])  # Z = 0: 0/0 = NaN, as torch
        out = out.to(out_ptr.dtype.element_ty)
        gamma = tl.load(gamma_ptr)
        xt = _tile(x_ptr, n * sx_n + line * sx_l, i, sx_p, i_mask, c, sx_c, c_mask).to(ACC)
        y = gamma * out.to(ACC) + xt  # out rounded first, then y rounded once
        y_offs = n * sy_n + line * sy_l + i.to(tl.int64)[:, None] * sy_p + c.to(tl.int64)[None, :] * sy_c
        tl.store(out_ptr + y_offs, out, mask=tile_mask)
        tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=tile_mask)
        # An energy of +inf: torch.logsumexp's +inf (z is NaN, inf - inf).
        tl.store(lse_ptr + px, tl.where(m == float("inf"), m, m + tl.log(z)), mask=i_mask & (cb == 0))
    else:
        tl.store(o_ptr + o_offs, acc, mask=tile_mask)
        tl.store(m_ptr + px, m_i, mask=i_mask & (cb == 0))
        tl.store(s_ptr + px, l_i, mask=i_mask & (cb == 0))


@triton.jit
def _finish(val, acc_ptr, dst_ptr, base, pos, s_pos, pos_mask, ch, s_ch, ch_mask,
            ab, sa_p, sa_c, COL: tl.constexpr):
    """Row pass: val into the acc buffer (=). Column pass: val + the row pass's acc buffer into
    the gradient (its dtype and strides)."""
    mask = pos_mask[:, None] & ch_mask[None, :]
    a_offs = ab + pos.to(tl.int64)[:, None] * sa_p + ch.to(tl.int64)[None, :] * sa_c
    if COL:
        val += tl.load(acc_ptr + a_offs, mask=mask, other=0.0)
        offs = base + pos.to(tl.int64)[:, None] * s_pos + ch.to(tl.int64)[None, :] * s_ch
        tl.store(dst_ptr + offs, val.to(dst_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(acc_ptr + a_offs, val, mask=mask)


@triton.jit
def _grad_q_kernel(
    gy_ptr, q_ptr, k_ptr, v_ptr, gamma_ptr, lse_ptr, r_ptr, acc_ptr, gq_ptr,
    L, NL, D, C, num_mb, num_db, HW, sr_l, sr_p,
    sg_n, sg_c, sg_l, sg_p,
    sq_n, sq_d, sq_l, sq_p,
    sk_n, sk_d, sk_l, sk_p,
    sv_n, sv_c, sv_l, sv_p,
    sa_n, sa_d, sa_l, sa_p,
    so_n, so_d, so_l, so_p,
    COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, IP: tl.constexpr,
):
    """grad_q[e, i] (this line's part) = gamma * sum_j dS'[i, j] k[e, j], queries i, D chunk e."""
    ACC = lse_ptr.dtype.element_ty
    n, line, db, mb = _line_program(NL, num_db, num_mb)
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    i_mask = i < L
    e = db * BLOCK_D + tl.arange(0, BLOCK_D)
    e_mask = e < D
    q_base = n * sq_n + line * sq_l
    k_base = n * sk_n + line * sk_l
    v_base = n * sv_n + line * sv_l
    g_base = n * sg_n + line * sg_l
    px = n * HW + line * sr_l + i.to(tl.int64) * sr_p
    lse_i = tl.load(lse_ptr + px, mask=i_mask, other=0.0)
    r_i = tl.load(r_ptr + px, mask=i_mask, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for j0 in range(0, L, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_mask = j < L
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        s = _contract_line(q_ptr, q_base, i, sq_p, i_mask, sq_d,
                           k_ptr, k_base, j, sk_p, j_mask, sk_d, D, s, BLOCK_D, IP)
        valid = _keys_of(i, i_mask, j, j_mask, COL)
        p = tl.where(valid, tl.exp(s - lse_i[:, None]), 0.0)
        dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        dp = _contract_line(gy_ptr, g_base, i, sg_p, i_mask, sg_c,
                            v_ptr, v_base, j, sv_p, j_mask, sv_c, C, dp, BLOCK_C, IP)  # G
        ds = tl.where(valid, p * (dp - r_i[:, None]), 0.0)  # dS / gamma
        kk = _tile(k_ptr, k_base, e, sk_d, e_mask, j, sk_p, j_mask)  # k [BLOCK_D, BLOCK_N]
        dq = _dot(ds.to(kk.dtype), tl.trans(kk), dq, IP)

    gamma = tl.load(gamma_ptr)
    _finish(dq * gamma, acc_ptr, gq_ptr, n * so_n + line * so_l, i, so_p, i_mask, e, so_d, e_mask,
            n * sa_n + line * sa_l, sa_p, sa_d, COL)


@triton.jit
def _grad_k_kernel(
    gy_ptr, q_ptr, k_ptr, v_ptr, gamma_ptr, lse_ptr, r_ptr, acc_ptr, gk_ptr,
    L, NL, D, C, num_nb, num_db, HW, sr_l, sr_p,
    sg_n, sg_c, sg_l, sg_p,
    sq_n, sq_d, sq_l, sq_p,
    sk_n, sk_d, sk_l, sk_p,
    sv_n, sv_c, sv_l, sv_p,
    sa_n, sa_d, sa_l, sa_p,
    so_n, so_d, so_l, so_p,
    COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, IP: tl.constexpr,
):
    """grad_k[e, j] (this line's part) = gamma * sum_i dS'[i, j] q[e, i], keys j, D chunk e."""
    ACC = lse_ptr.dtype.element_ty
    n, line, db, nb = _line_program(NL, num_db, num_nb)
    j = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    j_mask = j < L
    e = db * BLOCK_D + tl.arange(0, BLOCK_D)
    e_mask = e < D
    q_base = n * sq_n + line * sq_l
    k_base = n * sk_n + line * sk_l
    v_base = n * sv_n + line * sv_l
    g_base = n * sg_n + line * sg_l

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for i0 in range(0, L, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        i_mask = i < L
        px = n * HW + line * sr_l + i.to(tl.int64) * sr_p
        lse_i = tl.load(lse_ptr + px, mask=i_mask, other=0.0)
        r_i = tl.load(r_ptr + px, mask=i_mask, other=0.0)
        st = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
        st = _contract_line(k_ptr, k_base, j, sk_p, j_mask, sk_d,
                            q_ptr, q_base, i, sq_p, i_mask, sq_d, D, st, BLOCK_D, IP)
        valid = _keys_of(j, j_mask, i, i_mask, COL)
        pt = tl.where(valid, tl.exp(st - lse_i[None, :]), 0.0)  # P^T [BLOCK_N, BLOCK_M]
        dpt = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
        dpt = _contract_line(v_ptr, v_base, j, sv_p, j_mask, sv_c,
                             gy_ptr, g_base, i, sg_p, i_mask, sg_c, C, dpt, BLOCK_C, IP)  # G^T
        dst = tl.where(valid, pt * (dpt - r_i[None, :]), 0.0)  # (dS / gamma)^T
        qq = _tile(q_ptr, q_base, e, sq_d, e_mask, i, sq_p, i_mask)  # q [BLOCK_D, BLOCK_M]
        dk = _dot(dst.to(qq.dtype), tl.trans(qq), dk, IP)

    gamma = tl.load(gamma_ptr)
    _finish(dk * gamma, acc_ptr, gk_ptr, n * so_n + line * so_l, j, so_p, j_mask, e, so_d, e_mask,
            n * sa_n + line * sa_l, sa_p, sa_d, COL)


@triton.jit
def _grad_v_kernel(
    gy_ptr, q_ptr, k_ptr, gamma_ptr, lse_ptr, acc_ptr, gv_ptr,
    L, NL, D, C, num_nb, num_cb, HW, sr_l, sr_p,
    sg_n, sg_c, sg_l, sg_p,
    sq_n, sq_d, sq_l, sq_p,
    sk_n, sk_d, sk_l, sk_p,
    sa_n, sa_c, sa_l, sa_p,
    so_n, so_c, so_l, so_p,
    COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, IP: tl.constexpr,
):
    """grad_v[c, j] (this line's part) = gamma * sum_i P[i, j] grad_y[c, i], keys j, C chunk c."""
    ACC = lse_ptr.dtype.element_ty
    n, line, cb, nb = _line_program(NL, num_cb, num_nb)
    j = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    j_mask = j < L
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    q_base = n * sq_n + line * sq_l
    k_base = n * sk_n + line * sk_l
    g_base = n * sg_n + line * sg_l

    dv = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
    for i0 in range(0, L, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        i_mask = i < L
        px = n * HW + line * sr_l + i.to(tl.int64) * sr_p
        lse_i = tl.load(lse_ptr + px, mask=i_mask, other=0.0)
        st = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
        st = _contract_line(k_ptr, k_base, j, sk_p, j_mask, sk_d,
                            q_ptr, q_base, i, sq_p, i_mask, sq_d, D, st, BLOCK_D, IP)
        pt = tl.where(_keys_of(j, j_mask, i, i_mask, COL), tl.exp(st - lse_i[None, :]), 0.0)
        gt = _tile(gy_ptr, g_base, i, sg_p, i_mask, c, sg_c, c_mask)  # grad_y^T [BLOCK_M, BLOCK_C]
        dv = _dot(pt.to(gt.dtype), gt, dv, IP)

    gamma = tl.load(gamma_ptr)
    _finish(dv * gamma, acc_ptr, gv_ptr, n * so_n + line * so_l, j, so_p, j_mask, c, so_c, c_mask,
            n * sa_n + line * sa_l, sa_p, sa_c, COL)


# ----------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------
_op = _op_registrar(HOT_PATH)


def _lines(h: int, w: int) -> tuple[tuple[str, bool, int, int, tuple[int, int]], ...]:
    """The two passes: (name, COL, line length, line count, (line, position) strides of a
    contiguous (N, H*W) buffer)."""
    return (("row", False, w, h, (w, 1)), ("col", True, h, w, (1, w)))


@_op("criss_cross")
def criss_cross(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = gamma * out + x, out the softmax over each pixel's column (itself excluded) and row
    of q.k weighing v; y, out in x's dtype and layout, lse (N, H*W) contiguous in acc(x)."""
    check_criss_cross(q, k, v, x, gamma)
    _nonempty("criss_cross", "x", x)
    n, c, h, w = x.shape
    d = q.shape[1]
    acc = accumulate_dtype(x.dtype)
    y, out = empty_like_layout(x), empty_like_layout(x)
    lse = torch.empty((n, h * w), dtype=acc, device=x.device)
    # The row pass's O_r (unnormalised), max and sum per pixel, for the column pass.
    o_r = torch.empty((n, c, h, w), dtype=acc, device=x.device)
    m_r = torch.empty((n, h * w), dtype=acc, device=x.device)
    s_r = torch.empty((n, h * w), dtype=acc, device=x.device)
    g = _acc_vector(gamma, acc)
    bd = _dot_block(d, _MAX_BLOCK_D)
    ip = _precision(x.dtype)
    strides = [_passes(t) for t in (q, k, v, x, y, o_r)]

    for name, col, length, count, sr in _lines(h, w):
        pick = int(col)

        def launch(bm: int, bn: int, bc: int, num_warps: int, col=col, length=length, count=count, sr=sr,
                   pick=pick) -> None:
            num_mb, num_cb = triton.cdiv(length, bm), triton.cdiv(c, bc)
            wrap_triton(_forward_kernel)[(n * count * num_cb * num_mb,)](
                q, k, v, x, g, y, out, lse, o_r, m_r, s_r,
                length, count, d, c, num_mb, num_cb,
                *(st for s in strides for st in s[pick]),
                h * w, *sr,
                COL=col, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_C=bc, IP=ip, num_warps=num_warps,
            )

        _launch_line(f"criss_cross.{name}", x, d, _blocks(_FWD_BLOCKS, x, length, c),
                     lambda bm, bn, bc: _dot_warps(x.dtype, bm * bc, bm * bn), launch)
    return y, out, lse


@_op("criss_cross_backward")
def criss_cross_backward(
    grad_y: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_k, grad_v, grad_gamma) of criss_cross, P recomputed from lse line by line;
    each gradient in its input's dtype and layout (grad_gamma: gamma's shape and dtype)."""
    acc = accumulate_dtype(out.dtype)
    ls = _in_acc(lse, acc)
    check_criss_cross_backward(grad_y, q, k, v, gamma, out, ls)
    _nonempty("criss_cross_backward", "v", v)
    n, c, h, w = v.shape
    d, hw = q.shape[1], h * w
    grad_q, grad_k, grad_v = empty_like_layout(q), empty_like_layout(k), empty_like_layout(v)
    g = _acc_vector(gamma, acc)
    ip = _precision(v.dtype)

    # 1. R = sum_c grad_y * out, grad_gamma = sum R (pixel-block partials summed in order):
    # nonlocal_attn's kernels, the tile measured on a GPU (the rule's, half and twice its values).
    r = torch.empty((n, hw), dtype=acc, device=v.device)
    (gy_p, sg_p), (out_p, so_p) = _pixel_strides(grad_y), _pixel_strides(out)

    def launch_rows(block_c: int, block_hw: int, num_warps: int) -> torch.Tensor:
        num_pb = triton.cdiv(hw, block_hw)
        partials = torch.empty((n * num_pb,), dtype=acc, device=v.device)
        wrap_triton(_rowdot_kernel)[(n * num_pb,)](
            gy_p, out_p, r, partials, hw, c, num_pb, *sg_p, *so_p,
            BLOCK_C=block_c, BLOCK_P=block_hw, num_warps=num_warps,
        )
        return partials

    partials = _launch_measured("criss_cross_backward.rows", v, lambda elements: _row_blocks(hw, c, elements),
                                _ROW_TILE_ELEMENTS, lambda block_c, block_p: _warps(block_c * block_p), launch_rows)
    total = torch.empty((1,), dtype=acc, device=v.device)
    wrap_triton(_sum_kernel)[(1,)](partials, total, partials.numel(), BLOCK=min(_pow2(partials.numel()), _SUM_BLOCK))
    grad_gamma = _like_param(total, gamma)

    # 2-4. Each gradient: the row pass into an acc buffer, the column pass adds and converts.
    bd = _dot_block(d, _MAX_BLOCK_D)
    num_db = triton.cdiv(d, bd)
    acc_q = torch.empty((n, d, h, w), dtype=acc, device=v.device)
    acc_k = torch.empty((n, d, h, w), dtype=acc, device=v.device)
    acc_v = torch.empty((n, c, h, w), dtype=acc, device=v.device)
    sgy, sq, sk, sv, saq, sak, sav, sgq, sgk, sgv = (
        _passes(t) for t in (grad_y, q, k, v, acc_q, acc_k, acc_v, grad_q, grad_k, grad_v))

    for name, col, length, count, sr in _lines(h, w):
        pick = int(col)
        blocks = _blocks(_BWD_BLOCKS, v, length, c)
        common = dict(COL=col, BLOCK_D=bd, IP=ip)

        def launch_q(bm: int, bn: int, bc: int, num_warps: int, length=length, count=count, sr=sr, pick=pick,
                     common=common) -> None:
            num_mb = triton.cdiv(length, bm)
            wrap_triton(_grad_q_kernel)[(n * count * num_db * num_mb,)](
                grad_y, q, k, v, g, ls, r, acc_q, grad_q,
                length, count, d, c, num_mb, num_db, hw, *sr,
                *sgy[pick], *sq[pick], *sk[pick], *sv[pick], *saq[pick], *sgq[pick],
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc, num_warps=num_warps, **common,
            )

        def launch_k(bm: int, bn: int, bc: int, num_warps: int, length=length, count=count, sr=sr, pick=pick,
                     common=common) -> None:
            num_nb = triton.cdiv(length, bn)
            wrap_triton(_grad_k_kernel)[(n * count * num_db * num_nb,)](
                grad_y, q, k, v, g, ls, r, acc_k, grad_k,
                length, count, d, c, num_nb, num_db, hw, *sr,
                *sgy[pick], *sq[pick], *sk[pick], *sv[pick], *sak[pick], *sgk[pick],
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc, num_warps=num_warps, **common,
            )

        def launch_v(bm: int, bn: int, bc: int, num_warps: int, length=length, count=count, sr=sr, pick=pick,
                     common=common) -> None:
            num_nb, num_cb = triton.cdiv(length, bn), triton.cdiv(c, bc)
            wrap_triton(_grad_v_kernel)[(n * count * num_cb * num_nb,)](
                grad_y, q, k, g, ls, acc_v, grad_v,
                length, count, d, c, num_nb, num_cb, hw, *sr,
                *sgy[pick], *sq[pick], *sk[pick], *sav[pick], *sgv[pick],
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc, num_warps=num_warps, **common,
            )

        # Each site's blocks measured on a GPU once per shape and D. A column candidate re-reads
        # the row pass's buffers and rewrites only its gradient: safe to run several times.
        _launch_line(f"criss_cross_backward.grad_q_{name}", v, d, blocks,
                     lambda bm, bn, bc: _dot_warps(v.dtype, bm * bd, bm * bn, bm * bc), launch_q)
        _launch_line(f"criss_cross_backward.grad_k_{name}", v, d, blocks,
                     lambda bm, bn, bc: _dot_warps(v.dtype, bn * bd, bn * bm, bn * bc), launch_k)
        _launch_line(f"criss_cross_backward.grad_v_{name}", v, d, blocks,
                     lambda bm, bn, bc: _dot_warps(v.dtype, bn * bc, bn * bm), launch_v)
    return grad_q, grad_k, grad_v, grad_gamma


# Importing this module gives the ops their autograd.
register_hot_path(HOT_PATH, "attnkernels_triton")
