"""Triton kernels of the gam_channel hot path (GAM's per-pixel channel MLP gate).

Registers two ops under `torch.ops.attnkernels_triton` with the schemas and the math of
`csrc/gam_channel_ops.cpp` (the contract, "gam_channel hot path"), and, on import, their
autograd (`attnkernels.ops.gam_channel`, which also holds the argument checks):

    gam_channel(x, w1, b1, w2, b2) -> x1
    gam_channel_backward(grad_x1, x, w1, b1, w2, b2) -> (grad_x, grad_w1, grad_b1, grad_w2, grad_b2)

At every pixel p of x (N, C, H, W): h = relu(w1 x + b1) (rd values), m = sigmoid(w2 h + b2)
(C values), x1 = x * m. w1 holds (rd, C), w2 (C, rd) values (nn.Linear weights), b1 rd and b2
C values, in any floating dtype: they are cast to acc(x) (float64 for float64 x, float32
otherwise) once on the host, and all arithmetic is in acc. x has any strides: the kernels read
it through its (n, c, pixel) strides, p = h*W + w, so NCHW (pixel stride 1) and channels_last
(channel stride 1) run without a copy; a tensor whose (h, w) strides do not flatten to one
pixel stride is made contiguous first. x1 and grad_x have x's dtype and layout
(channels_last when x is channels_last-dense and not NCHW-contiguous, NCHW otherwise); the
weight gradients have their weight's shape and dtype.

The two Linear layers are `tl.dot` GEMMs on tiles of BLOCK_P pixels: [BLOCK_P, C chunk] x
[C chunk, rd] for fc1 and [BLOCK_P, rd] x [rd, C chunk] for fc2, every dimension padded to a
power of two >= 16 (tl.dot's minimum) and masked; h, [BLOCK_P, rd], stays in registers. Operands
are in acc: fp32 multiplies exactly (input_precision="ieee": no TF32), fp64 in fp64; fp16/bf16
inputs run their fp32 operands on the TF32 tensor cores (x itself is exact in TF32; weights and
the computed h, g, dh round to TF32's 10-bit mantissa, the precision of fp16) with fp32
accumulation.

Kernels (all deterministic: no atomics, every reduction in a fixed order):
  * forward: one program per (n, block of BLOCK_P pixels): h over C chunks, then per C chunk
    m and x1 = x * m (x's second read of the chunk is an L2 hit).
  * backward, in three launches:
      1. one program per (n, pixel block): recompute h; per C chunk recompute m,
         g = grad_x1 * x * m * (1 - m) and accumulate dh = g w2 ([BLOCK_P, rd]);
         dh = relu_grad(dh, h); a second pass over the C chunks writes grad_x = grad_x1 * m + dh w1.
         h and dh (N*H*W, rd) are stored in acc for launch 2 (rd/C of x's size).
      2. weight gradients: one program per (C chunk, split of the (n, pixel block) tiles),
         each split a fixed, strided set of tiles: grad_w2 chunk += g^T h, grad_w1 chunk +=
         dh^T x (both tl.dot over the tile's pixels), grad_b2 += sum g, grad_b1 += sum dh
         (kept by the first C chunk's programs), m and g recomputed from the stored h. The
         register accumulators are written once per program as that split's partials.
      3. one sum over the splits, in order (`_common._sum_partials`).

Each of the three tiled launches (forward, grad_x, weight gradients) takes its blocks from
`_launch_blocks`: on a GPU measured once per shape and rd among the rule's, half the pixel
block and half the channel chunk, each launch on its own.

On a machine without a GPU set TRITON_INTERPRET=1 before importing this module; the ops
then run on CPU tensors under the Triton interpreter.
"""
from typing import Any

import torch
import triton
import triton.language as tl

from ..ops import register_hot_path
from ..ops._common import empty_like_layout
from ..ops.gam_channel import check_gam_channel, check_gam_channel_backward
from ..reference.formulas import accumulate_dtype
from ._common import (
    _acc_vector,
    _dot_block,
    _halved_blocks,
    _launch_choice,
    _like_param,
    _nonempty,
    _op_registrar,
    _pixel_block,
    _pixel_strides,
    _precision,
    _relu,
    _sigmoid,
    _splits,
    _sum_partials,
    _tile,
    _warps,
)
from ._compat import _dot, wrap_triton

HOT_PATH = "gam_channel"

__all__ = ["gam_channel", "gam_channel_backward"]


# ----------------------------------------------------------------------------------------
# Host-side helpers: tiles
# ----------------------------------------------------------------------------------------
# Module attributes, so tests can force many small blocks and splits (tl.dot needs every
# dimension >= 16: _common._dot_block). BLOCK_P pixels per tile, BLOCK_C channels per chunk,
# per input dtype.
_BLOCK_P = {torch.float64: 32, torch.float32: 64, torch.float16: 64, torch.bfloat16: 64}
_BLOCK_C = {torch.float64: 16, torch.float32: 32, torch.float16: 32, torch.bfloat16: 32}
# Largest [BLOCK_P, rd] tile (h and dh stay in registers): a wide rd narrows the pixel block.
# (The split count and the partials' sum tiles are _common's _MIN_SPLITS, _SUM_*.)
_MAX_HIDDEN_TILE = 8192
# num_warps of the two backward kernels (gam_channel_backward says why).
_BACKWARD_WARPS = 8


def _blocks(x: torch.Tensor, rd: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, BLOCK_R)."""
    n, c, h, w = x.shape
    block_r = _dot_block(rd)
    block_p = _dot_block(h * w, min(_BLOCK_P[x.dtype], _MAX_HIDDEN_TILE // block_r))
    block_c = _dot_block(c, _BLOCK_C[x.dtype])
    return block_p, block_c, block_r


def _config(block_p: int, block_c: int, block_r: int, num_warps: int) -> tuple[str, dict[str, int]]:
    """A launch configuration: its name (as `choose.explain()` lists it) and parameters."""
    return (f"p{block_p}c{block_c}r{block_r}/{num_warps}w",
            {"block_p": block_p, "block_c": block_c, "block_r": block_r, "num_warps": num_warps})


def _candidates(x: torch.Tensor, rd: int, warps) -> dict[str, dict[str, int]]:
    """The configurations a GPU measures for a per-(n, pixel block) kernel: the rule's
    (`_blocks`), then half the pixel block (twice the programs, for maps too small to fill the
    GPU) and half the channel chunk (smaller x and weight tiles per loop step), where tl.dot
    allows them (`_common._halved_blocks`). `warps(block_p, block_r)` gives each one's num_warps."""
    return dict(_config(p, c, r, warps(p, r)) for p, c, r in _halved_blocks(_blocks(x, rd), (0, 1)))


def _launch_blocks(site: str, x: torch.Tensor, rd: int, warps, launch) -> Any:
    """`launch(block_p=, block_c=, block_r=, num_warps=)`, and its result, in the configuration measured fastest
    on a GPU for this site, x's shape, dtype and layout and rd (`_common._launch_choice`); the
    rule's (the first candidate) under the interpreter, tracing and static mode."""
    def rule() -> tuple[str, dict[str, int]]:
        block_p, block_c, block_r = _blocks(x, rd)
        return _config(block_p, block_c, block_r, warps(block_p, block_r))

    return _launch_choice(site, x, rule, lambda: _candidates(x, rd, warps), launch, params=(rd,))


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _hidden(
    x_ptr, x_base, p, p_mask, sx_c, sx_p, w1_ptr, b1_ptr, r, r_mask, C,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, IP: tl.constexpr,
):
    """h [BLOCK_P, BLOCK_R] = relu(x^T w1^T + b1): fc1 at every pixel, over C in chunks.
    Padded rd columns are 0: selected, since x * 0 is NaN where x is infinite."""
    ACC = w1_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_P, BLOCK_R], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        xt = _tile(x_ptr, x_base, p, sx_p, p_mask, c, sx_c, c_mask).to(ACC)  # [BLOCK_P, BLOCK_C]
        w1t = _tile(w1_ptr, 0, c, 1, c_mask, r, C, r_mask)  # w1^T chunk [BLOCK_C, BLOCK_R]
        acc = _dot(xt, w1t, acc, IP)
    b1 = tl.load(b1_ptr + r, mask=r_mask, other=0.0)
    return tl.where(r_mask[None, :], _relu(acc + b1[None, :]), 0.0)


@triton.jit
def _program_hidden(
    x_ptr, sx_n, sx_c, sx_p, w1_ptr, b1_ptr, C, RD, HW, num_pb,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, IP: tl.constexpr,
):
    """The start of the per-(n, pixel block) kernels: n, p, p_mask (_common._pixel_block), the
    rd columns r and r < RD, x's base n*sx_n, and h at the block's pixels (_hidden)."""
    n, _, p, p_mask = _pixel_block(num_pb, HW, BLOCK_P)
    r = tl.arange(0, BLOCK_R)
    r_mask = r < RD
    x_base = n * sx_n
    h = _hidden(x_ptr, x_base, p, p_mask, sx_c, sx_p, w1_ptr, b1_ptr, r, r_mask, C, BLOCK_P, BLOCK_C, BLOCK_R, IP)
    return n, p, p_mask, r, r_mask, x_base, h


@triton.jit
def _store_pc(ptr, n, s_n, p, s_p, p_mask, c, s_c, c_mask, v):
    """Store the [BLOCK_P, BLOCK_C] tile v at (n, pixels p, channels c) in ptr's dtype, inside the masks."""
    offs = n * s_n + p.to(tl.int64)[:, None] * s_p + c.to(tl.int64)[None, :] * s_c
    tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def _gate(h, w2_ptr, b2_ptr, c, c_mask, r, r_mask, RD, IP: tl.constexpr):
    """m [BLOCK_P, BLOCK_C] = sigmoid(h w2^T + b2) for the channel chunk c: fc2 and the gate;
    0 on padded channels (selected: an infinite h times their zero weights is NaN)."""
    w2t = _tile(w2_ptr, 0, r, 1, r_mask, c, RD, c_mask)  # w2^T chunk [BLOCK_R, BLOCK_C]
    pre = tl.dot(h, w2t, input_precision=IP, out_dtype=h.dtype)
    b2 = tl.load(b2_ptr + c, mask=c_mask, other=0.0)
    return tl.where(c_mask[None, :], _sigmoid(pre + b2[None, :]), 0.0)


@triton.jit
def _forward_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, x1_ptr,
    C, RD, HW, num_pb,
    sx_n, sx_c, sx_p,
    so_n, so_c, so_p,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, IP: tl.constexpr,
):
    """x1 = x * sigmoid(w2 relu(w1 x + b1) + b2) for one (n, pixel block)."""
    ACC = w1_ptr.dtype.element_ty
    n, p, p_mask, r, r_mask, x_base, h = _program_hidden(
        x_ptr, sx_n, sx_c, sx_p, w1_ptr, b1_ptr, C, RD, HW, num_pb, BLOCK_P, BLOCK_C, BLOCK_R, IP,
    )
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        m = _gate(h, w2_ptr, b2_ptr, c, c_mask, r, r_mask, RD, IP)
        xt = _tile(x_ptr, x_base, p, sx_p, p_mask, c, sx_c, c_mask).to(ACC)
        _store_pc(x1_ptr, n, so_n, p, so_p, p_mask, c, so_c, c_mask, xt * m)


@triton.jit
def _grad_x_kernel(
    gy_ptr, x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, gx_ptr, h_ptr, dh_ptr,
    C, RD, HW, num_pb,
    sg_n, sg_c, sg_p,
    sx_n, sx_c, sx_p,
    so_n, so_c, so_p,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, IP: tl.constexpr,
):
    """grad_x = grad_x1 * m + dh w1 for one (n, pixel block); stores h and dh (rows n*HW + p)."""
    ACC = w1_ptr.dtype.element_ty
    n, p, p_mask, r, r_mask, x_base, h = _program_hidden(
        x_ptr, sx_n, sx_c, sx_p, w1_ptr, b1_ptr, C, RD, HW, num_pb, BLOCK_P, BLOCK_C, BLOCK_R, IP,
    )
    g_base = n * sg_n

    dh = tl.zeros([BLOCK_P, BLOCK_R], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        m = _gate(h, w2_ptr, b2_ptr, c, c_mask, r, r_mask, RD, IP)
        gy = _tile(gy_ptr, g_base, p, sg_p, p_mask, c, sg_c, c_mask).to(ACC)
        xt = _tile(x_ptr, x_base, p, sx_p, p_mask, c, sx_c, c_mask).to(ACC)
        g = gy * xt * m * (1.0 - m)  # fc2's output gradient; 0 on padding (gy loads 0)
        w2c = _tile(w2_ptr, 0, c, RD, c_mask, r, 1, r_mask)  # w2 chunk [BLOCK_C, BLOCK_R]
        dh = _dot(g, w2c, dh, IP)
    dh = tl.where(h <= 0, 0.0, dh)  # relu's gradient; a NaN h passes it on, as torch's

    rows = n * HW + p.to(tl.int64)
    hd_offs = rows[:, None] * RD + r[None, :]
    hd_mask = p_mask[:, None] & r_mask[None, :]
    tl.store(h_ptr + hd_offs, h, mask=hd_mask)
    tl.store(dh_ptr + hd_offs, dh, mask=hd_mask)

    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        m = _gate(h, w2_ptr, b2_ptr, c, c_mask, r, r_mask, RD, IP)
        gy = _tile(gy_ptr, g_base, p, sg_p, p_mask, c, sg_c, c_mask).to(ACC)
        w1c = _tile(w1_ptr, 0, r, C, r_mask, c, 1, c_mask)  # w1 chunk [BLOCK_R, BLOCK_C]
        gx = gy * m
        gx = _dot(dh, w1c, gx, IP)
        _store_pc(gx_ptr, n, so_n, p, so_p, p_mask, c, so_c, c_mask, gx)


@triton.jit
def _grad_weights_kernel(
    gy_ptr, x_ptr, w2_ptr, b2_ptr, h_ptr, dh_ptr, part_ptr,
    C, RD, HW, num_pb, num_cb, num_tiles, num_splits, part_len,
    sg_n, sg_c, sg_p,
    sx_n, sx_c, sx_p,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, IP: tl.constexpr,
):
    """One split's partial grad_w2, grad_b2, grad_w1 (and, chunk 0, grad_b1) for one C chunk.

    The partial row holds grad_w2 (C, rd), grad_w1 (rd, C), grad_b2 C, grad_b1 rd values, in
    that order. Split `sp` takes the (n, pixel block) tiles sp, sp + num_splits, ...
    """
    ACC = part_ptr.dtype.element_ty
    pid = tl.program_id(0)
    sp = pid // num_cb
    cb = pid % num_cb
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    r = tl.arange(0, BLOCK_R)
    r_mask = r < RD
    acc_w2 = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
    acc_w1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    acc_b2 = tl.zeros([BLOCK_C], dtype=ACC)
    acc_b1 = tl.zeros([BLOCK_R], dtype=ACC)
    for t in range(sp, num_tiles, num_splits):
        n = (t // num_pb).to(tl.int64)
        p = (t % num_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < HW
        rows = n * HW + p.to(tl.int64)
        h = _tile(h_ptr, 0, rows, RD, p_mask, r, 1, r_mask)  # [BLOCK_P, BLOCK_R], padding 0
        dh = _tile(dh_ptr, 0, rows, RD, p_mask, r, 1, r_mask)
        m = _gate(h, w2_ptr, b2_ptr, c, c_mask, r, r_mask, RD, IP)
        gy = _tile(gy_ptr, n * sg_n, p, sg_p, p_mask, c, sg_c, c_mask).to(ACC)
        xt = _tile(x_ptr, n * sx_n, p, sx_p, p_mask, c, sx_c, c_mask).to(ACC)
        g = gy * xt * m * (1.0 - m)  # 0 on padded pixels and channels
        acc_w2 = _dot(tl.trans(g), h, acc_w2, IP)
        acc_w1 = _dot(tl.trans(dh), xt, acc_w1, IP)
        acc_b2 += tl.sum(g, axis=0)
        acc_b1 += tl.sum(dh, axis=0)

    row = part_ptr + sp.to(tl.int64) * part_len
    tl.store(row + c[:, None] * RD + r[None, :], acc_w2, mask=c_mask[:, None] & r_mask[None, :])
    tl.store(row + C * RD + r[:, None] * C + c[None, :], acc_w1, mask=r_mask[:, None] & c_mask[None, :])
    tl.store(row + 2 * C * RD + c, acc_b2, mask=c_mask)
    tl.store(row + 2 * C * RD + C + r, acc_b1, mask=r_mask & (cb == 0))  # every chunk has it: keep one


# ----------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------
_op = _op_registrar(HOT_PATH)


@_op("gam_channel")
def gam_channel(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """x1 = x * sigmoid(w2 relu(w1 x + b1) + b2) at every pixel, in x's dtype and layout."""
    check_gam_channel(x, w1, b1, w2, b2)
    _nonempty("gam_channel", "x", x)
    n, c, h, w = x.shape
    rd = w1.shape[0]
    acc = accumulate_dtype(x.dtype)
    x1 = empty_like_layout(x)
    (x, sx), (_, so) = _pixel_strides(x), _pixel_strides(x1)
    w1a, b1a, w2a, b2a = (_acc_vector(t, acc) for t in (w1, b1, w2, b2))

    def launch(block_p: int, block_c: int, block_r: int, num_warps: int) -> None:
        num_pb = triton.cdiv(h * w, block_p)
        wrap_triton(_forward_kernel)[(n * num_pb,)](
            x, w1a, b1a, w2a, b2a, x1,
            c, rd, h * w, num_pb, *sx, *so,
            BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_R=block_r, IP=_precision(x.dtype), num_warps=num_warps,
        )

    _launch_blocks("gam_channel", x, rd, lambda block_p, block_r: _warps(block_p * block_r), launch)
    return x1


@_op("gam_channel_backward")
def gam_channel_backward(
    grad_x1: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_w1, grad_b1, grad_w2, grad_b2) of gam_channel, h and m recomputed from x;
    grad_x in x's dtype and layout, each weight gradient in its weight's shape and dtype."""
    check_gam_channel_backward(grad_x1, x, w1, b1, w2, b2)
    _nonempty("gam_channel_backward", "x", x)
    n, c, h, w = x.shape
    rd = w1.shape[0]
    hw = h * w
    acc = accumulate_dtype(x.dtype)
    ip = _precision(x.dtype)
    grad_x = empty_like_layout(x)
    (gy, sg), (x, sx), (_, so) = _pixel_strides(grad_x1), _pixel_strides(x), _pixel_strides(grad_x)
    w1a, b1a, w2a, b2a = (_acc_vector(t, acc) for t in (w1, b1, w2, b2))
    # The backward kernels hold h, dh, the gradient tiles and (launch 2) two weight accumulators
    # at once: compiled for sm_90/sm_80 (scripts/triton_aot/) at 4 warps, fp32 rd = 64 reached 255
    # registers and spilled 256-720 B per thread in grad_x and up to 10.6 KB in grad_weights
    # (sm_80); at 8 warps they spill nothing (fp32) or under 100 B.
    def warps(block_p: int, block_r: int) -> int:
        return _BACKWARD_WARPS

    # 1. grad_x, and h, dh for the weight gradients (per pixel: whatever launch 1's tiles).
    hid = torch.empty((n * hw, rd), dtype=acc, device=x.device)
    dhid = torch.empty((n * hw, rd), dtype=acc, device=x.device)

    def grad_input(block_p: int, block_c: int, block_r: int, num_warps: int) -> None:
        num_pb = triton.cdiv(hw, block_p)
        wrap_triton(_grad_x_kernel)[(n * num_pb,)](
            gy, x, w1a, b1a, w2a, b2a, grad_x, hid, dhid,
            c, rd, hw, num_pb, *sg, *sx, *so,
            BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_R=block_r, IP=ip, num_warps=num_warps,
        )

    _launch_blocks("gam_channel_backward.grad_x", x, rd, warps, grad_input)

    # 2. per-split partial weight gradients (the splits, hence the partials' shape, follow the
    # blocks), 3. their sum in order.
    def grad_weights(block_p: int, block_c: int, block_r: int, num_warps: int) -> torch.Tensor:
        num_pb, num_cb = triton.cdiv(hw, block_p), triton.cdiv(c, block_c)
        num_tiles = n * num_pb
        num_splits = _splits(num_tiles, num_cb, x.device)
        part_len = 2 * c * rd + c + rd
        part = torch.empty((num_splits, part_len), dtype=acc, device=x.device)
        wrap_triton(_grad_weights_kernel)[(num_splits * num_cb,)](
            gy, x, w2a, b2a, hid, dhid, part,
            c, rd, hw, num_pb, num_cb, num_tiles, num_splits, part_len, *sg, *sx,
            BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_R=block_r, IP=ip, num_warps=num_warps,
        )
        return part

    part = _launch_blocks("gam_channel_backward.grad_weights", x, rd, warps, grad_weights)
    total = _sum_partials(part)
    grad_w2, grad_w1, grad_b2, grad_b1 = torch.split(total, [c * rd, rd * c, c, rd])
    return (grad_x, _like_param(grad_w1, w1), _like_param(grad_b1, b1), _like_param(grad_w2, w2),
            _like_param(grad_b2, b2))


# Importing this module gives the ops their autograd.
register_hot_path(HOT_PATH, "attnkernels_triton")
