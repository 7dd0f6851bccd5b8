"""Triton kernels of the nonlocal_attn hot path (PAM's HW x HW position attention, flash-style).

Registers two ops under `torch.ops.attnkernels_triton` with the schemas and the math of
`csrc/nonlocal_attn_ops.cpp` (the contract, "nonlocal_attn hot path"), and, on import, their
autograd (`attnkernels.ops.nonlocal_attn`, which also holds the argument checks):

    nonlocal_attn(q, k, v, x, gamma, cpu_tile=0) -> (y, out, lse)
    nonlocal_attn_backward(grad_y, q, k, v, gamma, out, lse, cpu_tile=0) -> (grad_q, grad_k, grad_v, grad_gamma)

S = q^T k per sample (no 1/sqrt(D) scaling), P = softmax over the keys j, out = v P^T,
y = gamma * out + x. q, k are (N, D_qk, H, W), v, x (N, D_v, H, W), one dtype, any strides:
the kernels read every tensor through its (n, d, p) strides, p = h*W + w, so NCHW (pixel
stride 1) and channels_last (d stride 1) run without a copy; a tensor whose (h, w) strides
do not flatten to one pixel stride is made contiguous first. y, out and every gradient have
their tensor's dtype and layout (channels_last when it is channels_last-dense and not
NCHW-contiguous, NCHW-contiguous otherwise); lse (N, H*W) and the R rows below are
contiguous in acc(x): float64 for float64 inputs, float32 otherwise (an lse of another floating
dtype or strides is cast first).

Matmuls are `tl.dot` on [rows, d] x [d, cols] tiles, every dimension padded to a power of
two >= 16 (tl.dot's minimum) and masked. Energies, softmax and every accumulator are in acc:
fp32 inputs multiply exactly (input_precision="ieee": no TF32), fp64 in fp64; fp16/bf16
tiles go to the tensor cores as they are, with P (forward) and dS (backward) rounded to the
input dtype for their matmul, as flash attention does, and fp32 accumulation. Nothing of
size HW x HW is ever stored.

Kernels (all deterministic: no atomics, every reduction in a fixed order). The grids are
1-D (no 65535 limit), pixel blocks fastest, so neighbouring programs share their sample's
K/V (or Q) tiles in L2.
  * forward: one program per (n, D_v chunk of BLOCK_DV, block of BLOCK_M queries); online
    softmax over the keys in blocks of BLOCK_N (running max and sum per query row, in acc)
    into a [BLOCK_M, BLOCK_DV] accumulator. D_v is tiled by recomputing S and P per D_v
    chunk (no lse pre-pass: S costs D_qk per (i, j) pair against BLOCK_DV for the P v
    product, and PAM's D_qk = C/8 keeps it small; the exponentials are the price, hence
    wide chunks); chunk 0 stores lse. Masked keys get S = -inf; a row whose real energies hold a
    NaN stays NaN (NaN - max is NaN in the exponent); an all -inf row gives NaN, as torch.
    D_qk up to _MAX_BLOCK_DQK is one tile held for the whole key loop, wider D_qk loops.
  * backward, in four launches:
      1. R[n,i] = sum_c grad_y * out: one program per (n, pixel block) looping over D_v;
         each also stores its block's sum of R, and one program sums those partials in
         order: grad_gamma.
      2. grad_q: one program per (n, D_qk chunk, query block) looping over key blocks:
         recompute S, P = exp(S - lse), G = sum_c grad_y v (loop over D_v chunks of
         BLOCK_DV), dS / gamma = P * (G - R) (dS = P * (dP - gamma * R), dP = gamma * G),
         grad_q += (dS / gamma) k, times gamma once at the end: dS / gamma is what fp16/bf16
         tiles round for their matmul, and PAM's gamma starts at 0, where gamma * P * (G - R)
         would fall into fp16's subnormals.
      3. grad_k: one program per (n, D_qk chunk, key block) looping over query blocks, the
         same in transposed form: grad_k += dS^T q. When D_v fits one BLOCK_DV chunk (and
         D_qk one chunk), it also accumulates grad_v = gamma * P^T grad_y^T from the same
         grad_y tile;
      4. otherwise grad_v has its own kernel: one program per (n, D_v chunk of
         BLOCK_DV_V, key block), recomputing P^T per chunk (S only: no G).
    A D_qk wider than one chunk makes steps 2 and 3 recompute dP per D_qk chunk (C >= 2048
    in PAM); every program recomputes its P from lse, never from a stored matrix.
    On a GPU, the forward and steps 2-4 each run the blocks measured fastest, once per shape and
    D_qk, among the rule's (the tables below), half BLOCK_M and half BLOCK_N
    (`_common._launch_choice`); the D_v chunks stay the rule's, so whether step 4 fuses into
    step 3 does not depend on the choice. Step 1's tile likewise, among the rule's and half and
    twice its values (`_common._launch_measured`). Under the interpreter and static mode: the
    rules'.

On a machine without a GPU set TRITON_INTERPRET=1 before importing this module; the ops
then run on CPU tensors under the Triton interpreter.
"""
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ..ops import register_hot_path
from ..ops._common import empty_like_layout
from ..ops.nonlocal_attn import check_nonlocal_attn, check_nonlocal_attn_backward
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
    _min_programs,
    _nonempty,
    _op_registrar,
    _pixel_strides,
    _pow2,
    _precision,
    _tile,
    _warps,
)
from ._compat import _dot, wrap_triton

HOT_PATH = "nonlocal_attn"

__all__ = ["nonlocal_attn", "nonlocal_attn_backward"]


# ----------------------------------------------------------------------------------------
# Host-side helpers: tiles
# ----------------------------------------------------------------------------------------
# Module attributes, so tests can force many small blocks (tl.dot needs every dimension >= 16:
# _common._dot_block). Forward (BLOCK_M queries, BLOCK_N keys, widest D_v chunk BLOCK_DV) per
# input dtype. Each D_v chunk recomputes S and its exponentials (the exp unit, not the tensor
# cores, bounds a half-precision flash forward), so half inputs take wide chunks: a [64, 256]
# fp32 accumulator at 8 warps (64 registers per thread). fp32 ("ieee": FMA, not TF32) and
# fp64 dots keep smaller tiles.
_FWD_BLOCKS = {
    torch.float16: (64, 64, 256),
    torch.bfloat16: (64, 64, 256),
    torch.float32: (64, 32, 64),
    torch.float64: (32, 32, 32),
}
# Backward (BLOCK_M queries, BLOCK_N keys, BLOCK_DV: the D_v chunk of the dP = grad_y^T v
# contractions, BLOCK_DV_V: the D_v chunk of the grad_v kernel, which recomputes S and P per
# chunk). grad_q holds a [BLOCK_M, D_qk] and grad_k a [BLOCK_N, D_qk] accumulator next to the
# S, P, dP tiles; grad_v fuses into the grad_k kernel when D_v fits one BLOCK_DV chunk.
_BWD_BLOCKS = {
    torch.float16: (64, 64, 64, 256),
    torch.bfloat16: (64, 64, 64, 256),
    torch.float32: (32, 32, 32, 64),
    torch.float64: (32, 32, 32, 32),
}
# Widest D_qk tile: wider D_qk loops over chunks (forward) or tiles the gradient (backward).
_MAX_BLOCK_DQK = 128
# fp32 ("ieee") and fp64 tl.dot run on the FMA units, not the tensor cores: each thread keeps,
# in registers, the operand rows and columns of its share of the output. Compiled for sm_90
# (scripts/triton_aot/, `make triton-aot`), the fp32 forward at C = 1024 (D_qk = 128 as one
# [64, 128] q tile, 4 warps) got 56 registers and spilled 3.9 KB per thread (7.8 KB on sm_80),
# and the backward at D_qk = 64-128 spilled 450-660 B on sm_80. So FMA dots contract D_qk in
# the forward in chunks of at most _MAX_FMA_BLOCK_DQK (the q chunk is reloaded per key block, from
# L1/L2: 128 registers, no spill), the backward's dP = grad_y^T v in D_v chunks of 32 (fp32
# _BWD_BLOCKS: the gradient tile keeps D_qk whole, so dP is not recomputed per D_qk chunk), and
# every FMA-dot kernel runs 8 warps, which halves each thread's share.
_MAX_FMA_BLOCK_DQK = 32
_FMA_DOT_WARPS = 8


def _fma_dots(dtype: torch.dtype) -> bool:
    """Whether tl.dot on this input dtype runs on the FMA units (fp32 exact, fp64)."""
    return dtype in (torch.float32, torch.float64)


def _dot_warps(dtype: torch.dtype, *tiles: int) -> int:
    """num_warps of a kernel whose tiles meet in tl.dot: 8 for FMA dots, else by tile size."""
    return _FMA_DOT_WARPS if _fma_dots(dtype) else _warps(*tiles)


# The R kernel's [BLOCK_C, BLOCK_P] tile and the grad_gamma sum's block.
_ROW_TILE_ELEMENTS = 2048
_MAX_ROW_BLOCK_P = 64
_SUM_BLOCK = 1024


def _dqk_block(dqk: int, dtype: torch.dtype | None = None) -> tuple[int, bool]:
    """(BLOCK_DQK, whether D_qk is one tile). With the input dtype (the forward), FMA dots take
    chunks of at most _MAX_FMA_BLOCK_DQK; else (the backward's gradient tiles) _MAX_BLOCK_DQK."""
    cap = _MAX_FMA_BLOCK_DQK if dtype is not None and _fma_dots(dtype) else _MAX_BLOCK_DQK
    block = _dot_block(dqk, cap)
    return block, dqk <= block


def _forward_blocks(x: torch.Tensor, hw: int, dv: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_DV) of the forward; on small maps the D_v chunks narrow (to
    64) while the grid has fewer programs than the GPU runs at once."""
    bm, bn, bdv = _FWD_BLOCKS[x.dtype]
    bm, bn, bdv = _dot_block(hw, bm), _dot_block(hw, bn), _dot_block(dv, bdv)
    n = x.shape[0]
    min_programs = _min_programs(x.device)
    while bdv > 64 and n * triton.cdiv(hw, bm) * triton.cdiv(dv, bdv) < min_programs:
        bdv //= 2
    return bm, bn, bdv


_Warps = Callable[[int, int, int], int]  # (BLOCK_M, BLOCK_N, BLOCK_DV) -> a kernel's num_warps


def _dot_config(bm: int, bn: int, bdv: int, num_warps: int) -> tuple[str, dict[str, int]]:
    """A launch configuration of a tl.dot kernel (forward, grad_q, grad_k, grad_v): its name (as
    `choose.explain()` lists it) and parameters. One form for all four: a name spells out every
    parameter, so a name shared by two kernels means the same launch (`_common._TILE_CONFIGS`)."""
    return f"m{bm}n{bn}dv{bdv}/{num_warps}w", {"bm": bm, "bn": bn, "bdv": bdv, "num_warps": num_warps}


def _dot_candidates(blocks: tuple[int, int, int], warps: _Warps) -> dict[str, dict[str, int]]:
    """The configurations a GPU measures for a tl.dot kernel: the rule's `blocks` (BLOCK_M,
    BLOCK_N, BLOCK_DV), then half the query block (twice the programs, a smaller accumulator) and
    half the key block (smaller S and P tiles, more loop trips), where tl.dot allows them
    (`_common._halved_blocks`); `warps` gives each one's num_warps. BLOCK_DV stays the rule's:
    the backward fuses grad_v into grad_k by it. A twice-as-long key block went over sm_90's
    shared memory at half precision."""
    return dict(_dot_config(*b, warps(*b)) for b in _halved_blocks(blocks, (0, 1)))


def _launch_dot(site: str, x: torch.Tensor, dqk: int, blocks: tuple[int, int, int], warps: _Warps,
                launch: Callable[..., None]) -> None:
    """`launch(bm=, bn=, bdv=, num_warps=)` in the configuration of `_dot_candidates(blocks,
    warps)` measured fastest on a GPU for this site, x's shape, dtype and layout and D_qk
    (`_common._launch_choice`); the rule's `blocks` under the interpreter, tracing and static mode."""
    _launch_choice(site, x, lambda: _dot_config(*blocks, warps(*blocks)),
                   lambda: _dot_candidates(blocks, warps), launch, params=(dqk,))


def _backward_blocks(v: torch.Tensor, hw: int, dv: int, num_db: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_DV, BLOCK_DV_V) of the backward kernels; on small maps the
    query block (grad_q's programs) and the key block (grad_k's) narrow, to 32, while the
    grid has fewer programs than the GPU runs at once."""
    bm, bn, bdv, bdv_v = _BWD_BLOCKS[v.dtype]
    bm, bn = _dot_block(hw, bm), _dot_block(hw, bn)
    bdv, bdv_v = _dot_block(dv, bdv), _dot_block(dv, bdv_v)
    n = v.shape[0]
    min_programs = _min_programs(v.device)
    while bm > 32 and n * num_db * triton.cdiv(hw, bm) < min_programs:
        bm //= 2
    while bn > 32 and n * num_db * triton.cdiv(hw, bn) < min_programs:
        bn //= 2
    return bm, bn, bdv, bdv_v


def _row_blocks(hw: int, dv: int, elements: int | None = None) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) of the R kernel's tiles of `elements` values at most (the rule's:
    _ROW_TILE_ELEMENTS)."""
    elements = _ROW_TILE_ELEMENTS if elements is None else elements
    block_p = min(_pow2(hw), _MAX_ROW_BLOCK_P)
    return min(_pow2(dv), max(1, elements // block_p)), block_p


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _program(num_a, num_b):
    """(n (int64), b, a) of a 1-D grid over (n, b, a), a fastest."""
    pid = tl.program_id(0)
    a = pid % num_a
    rest = pid // num_a
    return (rest // num_b).to(tl.int64), rest % num_b, a


@triton.jit
def _contract(
    a_ptr, a_base, a_rows, a_s_row, a_row_mask, a_s_d,
    b_ptr, b_base, b_cols, b_s_col, b_col_mask, b_s_d,
    D, acc, BLOCK_D: tl.constexpr, IP: tl.constexpr,
):
    """acc + sum_d a[d, row] * b[d, col] over d < D in chunks of BLOCK_D (padding loads 0)."""
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        a = _tile(a_ptr, a_base, a_rows, a_s_row, a_row_mask, d, a_s_d, d_mask)
        b = _tile(b_ptr, b_base, d, b_s_d, d_mask, b_cols, b_s_col, b_col_mask)
        acc = _dot(a, b, acc, IP)
    return acc


@triton.jit
def _p_shift(lse):
    """The backward's shift of P = exp(S - lse): NaN for an lse of +inf (an energy of +inf), as
    torch.softmax's row is NaN there (its sum is inf - inf), not exp(S - inf) = 0."""
    return tl.where(lse == float("inf"), float("nan"), lse)


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, x_ptr, gamma_ptr, y_ptr, out_ptr, lse_ptr,
    HW, DQK, DV, num_mb, num_cb,
    sq_n, sq_d, sq_p,
    sk_n, sk_d, sk_p,
    sv_n, sv_d, sv_p,
    sx_n, sx_d, sx_p,
    so_n, so_d, so_p,
    ONE_DQK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, IP: tl.constexpr,
):
    ACC = lse_ptr.dtype.element_ty
    n, cb, mb = _program(num_mb, num_cb)
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    i_mask = i < HW
    c = cb * BLOCK_DV + tl.arange(0, BLOCK_DV)
    c_mask = c < DV
    q_base = n * sq_n
    k_base = n * sk_n
    v_base = n * sv_n
    d = tl.arange(0, BLOCK_DQK)
    d_mask = d < DQK
    if ONE_DQK:  # q^T [BLOCK_M, D_qk] stays in registers for the whole key loop
        qt = _tile(q_ptr, q_base, i, sq_p, i_mask, d, sq_d, d_mask)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    for j0 in range(0, HW, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_mask = j < HW
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        if ONE_DQK:
            kk = _tile(k_ptr, k_base, d, sk_d, d_mask, j, sk_p, j_mask)
            s = _dot(qt, kk, s, IP)
        else:
            s = _contract(
                q_ptr, q_base, i, sq_p, i_mask, sq_d,
                k_ptr, k_base, j, sk_p, j_mask, sk_d,
                DQK, s, BLOCK_DQK, IP,
            )
        s = tl.where(j_mask[None, :], s, float("-inf"))  # padded keys: no weight
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row still at -inf (every energy so far -inf) subtracts 0, not -inf: exp gives 0,
        # not NaN, and later finite keys still count. NaN energies stay NaN through exp.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = _tile(v_ptr, v_base, j, sv_p, j_mask, c, sv_d, c_mask)  # v^T [BLOCK_N, BLOCK_DV]
        acc = acc * alpha[:, None]
        acc = _dot(p.to(vt.dtype), vt, acc, IP)
        m_i = m_new

    out = _div(acc, l_i[:, None])  # an all -inf row: 0/0 = NaN, as torch's softmax
    gamma = tl.load(gamma_ptr)
    xt = _tile(x_ptr, n * sx_n, i, sx_p, i_mask, c, sx_d, c_mask).to(ACC)
    y = gamma * out + xt  # in acc, rounded once
    offs = n * so_n + i.to(tl.int64)[:, None] * so_p + c.to(tl.int64)[None, :] * so_d
    tile_mask = i_mask[:, None] & c_mask[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=tile_mask)
    # An energy of +inf: torch.logsumexp's +inf (l_i is NaN, inf - inf).
    tl.store(lse_ptr + n * HW + i, tl.where(m_i == float("inf"), m_i, m_i + tl.log(l_i)), mask=i_mask & (cb == 0))


@triton.jit
def _rowdot_kernel(
    gy_ptr, out_ptr, r_ptr, part_ptr,
    HW, DV, num_pb,
    sg_n, sg_d, sg_p,
    so_n, so_d, so_p,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """R[n, p] = sum_c grad_y * out, and part[program] = this pixel block's sum of R."""
    ACC = r_ptr.dtype.element_ty
    pid = tl.program_id(0)
    n = (pid // num_pb).to(tl.int64)
    p = (pid % num_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < HW
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for c0 in range(0, DV, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < DV
        g = _tile(gy_ptr, n * sg_n, c, sg_d, c_mask, p, sg_p, p_mask).to(ACC)
        o = _tile(out_ptr, n * so_n, c, so_d, c_mask, p, so_p, p_mask).to(ACC)
        acc += g * o  # masked lanes: 0 * 0
    r = tl.sum(acc, axis=0)
    tl.store(r_ptr + n * HW + p, r, mask=p_mask)
    tl.store(part_ptr + pid, tl.sum(r, axis=0))


@triton.jit
def _sum_kernel(part_ptr, out_ptr, NP, BLOCK: tl.constexpr):
    """out[0] = sum of NP partials, one program, a fixed order: deterministic."""
    acc = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
    for start in range(0, NP, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + idx, mask=idx < NP, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


@triton.jit
def _grad_q_kernel(
    gy_ptr, q_ptr, k_ptr, v_ptr, gamma_ptr, lse_ptr, r_ptr, gq_ptr,
    HW, DQK, DV, num_mb, num_db,
    sg_n, sg_d, sg_p,
    sq_n, sq_d, sq_p,
    sk_n, sk_d, sk_p,
    sv_n, sv_d, sv_p,
    so_n, so_d, so_p,
    ONE_DQK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, IP: tl.constexpr,
):
    """grad_q[:, e, i] = gamma * sum_j (dS / gamma)[i, j] k[e, j] for this program's query block i
    and D_qk chunk e."""
    ACC = lse_ptr.dtype.element_ty
    n, db, mb = _program(num_mb, num_db)
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    i_mask = i < HW
    e = db * BLOCK_DQK + tl.arange(0, BLOCK_DQK)
    e_mask = e < DQK
    q_base = n * sq_n
    k_base = n * sk_n
    v_base = n * sv_n
    g_base = n * sg_n
    lse_i = _p_shift(tl.load(lse_ptr + n * HW + i, mask=i_mask, other=0.0))
    r_i = tl.load(r_ptr + n * HW + i, mask=i_mask, other=0.0)
    gamma = tl.load(gamma_ptr)
    if ONE_DQK:
        qt = _tile(q_ptr, q_base, i, sq_p, i_mask, e, sq_d, e_mask)

    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=ACC)
    for j0 in range(0, HW, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_mask = j < HW
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        kk = _tile(k_ptr, k_base, e, sk_d, e_mask, j, sk_p, j_mask)  # k [BLOCK_DQK, BLOCK_N]
        if ONE_DQK:
            s = _dot(qt, kk, s, IP)
        else:
            s = _contract(
                q_ptr, q_base, i, sq_p, i_mask, sq_d,
                k_ptr, k_base, j, sk_p, j_mask, sk_d,
                DQK, s, BLOCK_DQK, IP,
            )
        valid = i_mask[:, None] & j_mask[None, :]
        p = tl.where(valid, tl.exp(s - lse_i[:, None]), 0.0)
        dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        dp = _contract(  # sum_c grad_y[c, i] v[c, j]
            gy_ptr, g_base, i, sg_p, i_mask, sg_d,
            v_ptr, v_base, j, sv_p, j_mask, sv_d,
            DV, dp, BLOCK_DV, IP,
        )
        ds = tl.where(valid, p * (dp - r_i[:, None]), 0.0)  # dS / gamma
        dq = _dot(ds.to(kk.dtype), tl.trans(kk), dq, IP)

    offs = n * so_n + i.to(tl.int64)[:, None] * so_p + e.to(tl.int64)[None, :] * so_d
    tl.store(gq_ptr + offs, (dq * gamma).to(gq_ptr.dtype.element_ty), mask=i_mask[:, None] & e_mask[None, :])


@triton.jit
def _grad_k_kernel(
    gy_ptr, q_ptr, k_ptr, v_ptr, gamma_ptr, lse_ptr, r_ptr, gk_ptr, gv_ptr,
    HW, DQK, DV, num_nb, num_db,
    sg_n, sg_d, sg_p,
    sq_n, sq_d, sq_p,
    sk_n, sk_d, sk_p,
    sv_n, sv_d, sv_p,
    sok_n, sok_d, sok_p,
    sov_n, sov_d, sov_p,
    ONE_DQK: tl.constexpr, FUSE_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, IP: tl.constexpr,
):
    """grad_k[:, e, j] = gamma * sum_i (dS / gamma)[i, j] q[e, i] for this program's key block j and D_qk
    chunk e; with FUSE_V (D_v and D_qk one chunk each) also grad_v[:, :, j]."""
    ACC = lse_ptr.dtype.element_ty
    n, db, nb = _program(num_nb, num_db)
    j = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    j_mask = j < HW
    e = db * BLOCK_DQK + tl.arange(0, BLOCK_DQK)
    e_mask = e < DQK
    q_base = n * sq_n
    k_base = n * sk_n
    v_base = n * sv_n
    g_base = n * sg_n
    gamma = tl.load(gamma_ptr)
    if ONE_DQK:
        kt = _tile(k_ptr, k_base, j, sk_p, j_mask, e, sk_d, e_mask)  # k^T [BLOCK_N, BLOCK_DQK]
    c = tl.arange(0, BLOCK_DV)
    c_mask = c < DV
    if FUSE_V:
        vt = _tile(v_ptr, v_base, j, sv_p, j_mask, c, sv_d, c_mask)  # v^T [BLOCK_N, BLOCK_DV]
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)

    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=ACC)
    for i0 in range(0, HW, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        i_mask = i < HW
        lse_i = _p_shift(tl.load(lse_ptr + n * HW + i, mask=i_mask, other=0.0))
        r_i = tl.load(r_ptr + n * HW + i, mask=i_mask, other=0.0)
        st = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
        qq = _tile(q_ptr, q_base, e, sq_d, e_mask, i, sq_p, i_mask)  # q [BLOCK_DQK, BLOCK_M]
        if ONE_DQK:
            st = _dot(kt, qq, st, IP)
        else:
            st = _contract(
                k_ptr, k_base, j, sk_p, j_mask, sk_d,
                q_ptr, q_base, i, sq_p, i_mask, sq_d,
                DQK, st, BLOCK_DQK, IP,
            )
        valid = j_mask[:, None] & i_mask[None, :]
        pt = tl.where(valid, tl.exp(st - lse_i[None, :]), 0.0)  # P^T [BLOCK_N, BLOCK_M]
        dpt = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
        if FUSE_V:
            gg = _tile(gy_ptr, g_base, c, sg_d, c_mask, i, sg_p, i_mask)  # grad_y [BLOCK_DV, BLOCK_M]
            dpt = _dot(vt, gg, dpt, IP)
            dv = _dot(pt.to(gg.dtype), tl.trans(gg), dv, IP)
        else:
            dpt = _contract(
                v_ptr, v_base, j, sv_p, j_mask, sv_d,
                gy_ptr, g_base, i, sg_p, i_mask, sg_d,
                DV, dpt, BLOCK_DV, IP,
            )
        dst = tl.where(valid, pt * (dpt - r_i[None, :]), 0.0)  # (dS / gamma)^T
        dk = _dot(dst.to(qq.dtype), tl.trans(qq), dk, IP)

    offs = n * sok_n + j.to(tl.int64)[:, None] * sok_p + e.to(tl.int64)[None, :] * sok_d
    tl.store(gk_ptr + offs, (dk * gamma).to(gk_ptr.dtype.element_ty), mask=j_mask[:, None] & e_mask[None, :])
    if FUSE_V:
        offs = n * sov_n + j.to(tl.int64)[:, None] * sov_p + c.to(tl.int64)[None, :] * sov_d
        tl.store(gv_ptr + offs, (dv * gamma).to(gv_ptr.dtype.element_ty), mask=j_mask[:, None] & c_mask[None, :])


@triton.jit
def _grad_v_kernel(
    gy_ptr, q_ptr, k_ptr, gamma_ptr, lse_ptr, gv_ptr,
    HW, DQK, DV, num_nb, num_cb,
    sg_n, sg_d, sg_p,
    sq_n, sq_d, sq_p,
    sk_n, sk_d, sk_p,
    so_n, so_d, so_p,
    ONE_DQK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, IP: tl.constexpr,
):
    """grad_v[:, c, j] = gamma * sum_i P[i, j] grad_y[c, i] for this program's key block j and D_v chunk c."""
    ACC = lse_ptr.dtype.element_ty
    n, cb, nb = _program(num_nb, num_cb)
    j = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    j_mask = j < HW
    c = cb * BLOCK_DV + tl.arange(0, BLOCK_DV)
    c_mask = c < DV
    q_base = n * sq_n
    k_base = n * sk_n
    g_base = n * sg_n
    d = tl.arange(0, BLOCK_DQK)
    d_mask = d < DQK
    if ONE_DQK:
        kt = _tile(k_ptr, k_base, j, sk_p, j_mask, d, sk_d, d_mask)

    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    for i0 in range(0, HW, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        i_mask = i < HW
        lse_i = _p_shift(tl.load(lse_ptr + n * HW + i, mask=i_mask, other=0.0))
        st = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
        if ONE_DQK:
            qq = _tile(q_ptr, q_base, d, sq_d, d_mask, i, sq_p, i_mask)
            st = _dot(kt, qq, st, IP)
        else:
            st = _contract(
                k_ptr, k_base, j, sk_p, j_mask, sk_d,
                q_ptr, q_base, i, sq_p, i_mask, sq_d,
                DQK, st, BLOCK_DQK, IP,
            )
        pt = tl.where(j_mask[:, None] & i_mask[None, :], tl.exp(st - lse_i[None, :]), 0.0)
        gt = _tile(gy_ptr, g_base, i, sg_p, i_mask, c, sg_d, c_mask)  # grad_y^T [BLOCK_M, BLOCK_DV]
        dv = _dot(pt.to(gt.dtype), gt, dv, IP)

    gamma = tl.load(gamma_ptr)
    offs = n * so_n + j.to(tl.int64)[:, None] * so_p + c.to(tl.int64)[None, :] * so_d
    tl.store(gv_ptr + offs, (dv * gamma).to(gv_ptr.dtype.element_ty), mask=j_mask[:, None] & c_mask[None, :])


# ----------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------
_op = _op_registrar(HOT_PATH)


@_op("nonlocal_attn")
def nonlocal_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, cpu_tile: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = gamma * out + x with out[n, c, i] = sum_j softmax_j(q^T k)[i, j] v[n, c, j];
    y, out in x's dtype and layout, lse (N, H*W) = log sum_j exp(S[n, i, j]) in acc(x).
    cpu_tile (the C++ CPU kernels' thread split) is checked and not used."""
    check_nonlocal_attn(q, k, v, x, gamma, cpu_tile)
    _nonempty("nonlocal_attn", "x", x)
    n, dv, h, w = x.shape
    hw, dqk = h * w, q.shape[1]
    acc = accumulate_dtype(x.dtype)
    y = empty_like_layout(x)
    out = empty_like_layout(x)
    lse = torch.empty((n, hw), dtype=acc, device=x.device)
    (q, sq), (k, sk), (v, sv), (x, sx) = (_pixel_strides(t) for t in (q, k, v, x))
    _, so = _pixel_strides(y)
    g = _acc_vector(gamma, acc)

    bdqk, one_dqk = _dqk_block(dqk, x.dtype)

    def launch(bm: int, bn: int, bdv: int, num_warps: int) -> None:
        num_mb, num_cb = triton.cdiv(hw, bm), triton.cdiv(dv, bdv)
        wrap_triton(_forward_kernel)[(n * num_cb * num_mb,)](
            q, k, v, x, g, y, out, lse,
            hw, dqk, dv, num_mb, num_cb,
            *sq, *sk, *sv, *sx, *so,
            ONE_DQK=one_dqk, BLOCK_M=bm, BLOCK_N=bn, BLOCK_DQK=bdqk, BLOCK_DV=bdv,
            IP=_precision(x.dtype), num_warps=num_warps,
        )

    # The blocks: on a GPU measured once per shape and D_qk (`_launch_dot`).
    _launch_dot("nonlocal_attn", x, dqk, _forward_blocks(x, hw, dv),
                lambda bm, bn, bdv: _dot_warps(x.dtype, bm * bdv, bm * bn), launch)
    return y, out, lse


@_op("nonlocal_attn_backward")
def nonlocal_attn_backward(
    grad_y: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cpu_tile: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_k, grad_v, grad_gamma) of nonlocal_attn, P recomputed from lse block by
    block; each gradient in its input's dtype and layout (grad_gamma: gamma's shape and dtype)."""
    acc = accumulate_dtype(out.dtype)
    ls = _in_acc(lse, acc)
    check_nonlocal_attn_backward(grad_y, q, k, v, gamma, out, ls, cpu_tile)
    _nonempty("nonlocal_attn_backward", "v", v)
    n, dv, h, w = v.shape
    hw, dqk = h * w, q.shape[1]
    grad_q, grad_k, grad_v = empty_like_layout(q), empty_like_layout(k), empty_like_layout(v)
    (gy, sg), (q, sq), (k, sk), (v, sv), (out, so) = (_pixel_strides(t) for t in (grad_y, q, k, v, out))
    _, sgq = _pixel_strides(grad_q)
    _, sgk = _pixel_strides(grad_k)
    _, sgv = _pixel_strides(grad_v)
    g = _acc_vector(gamma, acc)
    ip = _precision(v.dtype)

    # 1. R = sum_c grad_y * out, and grad_gamma = sum R (pixel-block partials, fixed order).
    # The tile: on a GPU measured once per shape (the rule's, half and twice its values).
    r = torch.empty((n, hw), dtype=acc, device=v.device)

    def launch_rows(block_c: int, block_hw: int, num_warps: int) -> torch.Tensor:
        num_pb = triton.cdiv(hw, block_hw)
        partials = torch.empty((n * num_pb,), dtype=acc, device=v.device)
        wrap_triton(_rowdot_kernel)[(n * num_pb,)](
            gy, out, r, partials, hw, dv, num_pb, *sg, *so, BLOCK_C=block_c, BLOCK_P=block_hw, num_warps=num_warps,
        )
        return partials

    partials = _launch_measured("nonlocal_attn_backward.rows", v, lambda elements: _row_blocks(hw, dv, elements),
                                _ROW_TILE_ELEMENTS, lambda block_c, block_p: _warps(block_c * block_p), launch_rows)
    total = torch.empty((1,), dtype=acc, device=v.device)
    wrap_triton(_sum_kernel)[(1,)](partials, total, partials.numel(), BLOCK=min(_pow2(partials.numel()), _SUM_BLOCK))
    grad_gamma = _like_param(total, gamma)

    bdqk, one_dqk = _dqk_block(dqk)
    num_db = triton.cdiv(dqk, bdqk)
    bm, bn, bdv, bdv_v = _backward_blocks(v, hw, dv, num_db)
    fuse_v = one_dqk and dv <= bdv  # every candidate keeps BLOCK_DV: the choice never changes it
    # Steps 2-4: each launch's blocks measured on a GPU once per shape and D_qk (`_launch_dot`);
    # each writes only its own gradients, so its candidates can run on the real arguments.

    # 2. grad_q over query blocks.
    def launch_grad_q(bm: int, bn: int, bdv: int, num_warps: int) -> None:
        num_mb = triton.cdiv(hw, bm)
        wrap_triton(_grad_q_kernel)[(n * num_db * num_mb,)](
            gy, q, k, v, g, ls, r, grad_q,
            hw, dqk, dv, num_mb, num_db,
            *sg, *sq, *sk, *sv, *sgq,
            ONE_DQK=one_dqk, BLOCK_M=bm, BLOCK_N=bn, BLOCK_DQK=bdqk, BLOCK_DV=bdv, IP=ip, num_warps=num_warps,
        )

    _launch_dot("nonlocal_attn_backward.grad_q", v, dqk, (bm, bn, bdv),
                lambda bm, bn, bdv: _dot_warps(v.dtype, bm * bdqk, bm * bn, bm * bdv), launch_grad_q)

    # 3. grad_k over key blocks (and grad_v when D_v fits one chunk).
    def launch_grad_k(bm: int, bn: int, bdv: int, num_warps: int) -> None:
        num_nb = triton.cdiv(hw, bn)
        wrap_triton(_grad_k_kernel)[(n * num_db * num_nb,)](
            gy, q, k, v, g, ls, r, grad_k, grad_v,
            hw, dqk, dv, num_nb, num_db,
            *sg, *sq, *sk, *sv, *sgk, *sgv,
            ONE_DQK=one_dqk, FUSE_V=fuse_v, BLOCK_M=bm, BLOCK_N=bn, BLOCK_DQK=bdqk, BLOCK_DV=bdv, IP=ip,
            num_warps=num_warps,
        )

    _launch_dot("nonlocal_attn_backward.grad_k", v, dqk, (bm, bn, bdv),
                lambda bm, bn, bdv: _dot_warps(v.dtype, bn * bdqk + (bn * bdv if fuse_v else 0), bn * bm),
                launch_grad_k)

    # 4. grad_v over (key block, D_v chunk) otherwise.
    def launch_grad_v(bm: int, bn: int, bdv: int, num_warps: int) -> None:
        num_nb, num_cb = triton.cdiv(hw, bn), triton.cdiv(dv, bdv)
        wrap_triton(_grad_v_kernel)[(n * num_cb * num_nb,)](
            gy, q, k, g, ls, grad_v,
            hw, dqk, dv, num_nb, num_cb,
            *sg, *sq, *sk, *sgv,
            ONE_DQK=one_dqk, BLOCK_M=bm, BLOCK_N=bn, BLOCK_DQK=bdqk, BLOCK_DV=bdv, IP=ip, num_warps=num_warps,
        )

    if not fuse_v:
        _launch_dot("nonlocal_attn_backward.grad_v", v, dqk, (bm, bn, bdv_v),
                    lambda bm, bn, bdv: _dot_warps(v.dtype, bn * bdv, bn * bm), launch_grad_v)
    return grad_q, grad_k, grad_v, grad_gamma


# Importing this module gives the ops their autograd.
register_hot_path(HOT_PATH, "attnkernels_triton")
