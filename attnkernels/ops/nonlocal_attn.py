"""nonlocal_attn hot path: PAM's HW x HW attention over all pixels, flash-style.

    y = nonlocal_attn(q, k, v, x, gamma)   # gamma * (v @ softmax(q^T k)^T) + x, no HW x HW tensor
    (the op: y, out, lse = nonlocal_attn(..., cpu_tile); grad_q, grad_k, grad_v, grad_gamma =
     nonlocal_attn_backward(grad_y, q, k, v, gamma, out, lse, cpu_tile))

The math is in csrc/nonlocal_attn_ops.cpp with the schemas; kernels in
csrc/cpu/nonlocal_attn.cpp, csrc/cuda/nonlocal_attn.cu and attnkernels/triton/nonlocal_attn.py.
Saved for backward: q, k, v, out (the attention output before gamma, x-sized) and lse, the
(N, H*W) per-row log-sum-exp; the backward recomputes the attention block by block. Nothing
of size (H*W)^2 exists, forward or backward. grad_x = grad_y needs no op.

The CPU kernels' thread split (`cpu_tile`: query rows per forward task, keys per backward
block) is chosen here, per shape and thread count, by measurement (`cpu_tile`, below).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .. import choose
from ..reference._base import memory_format_of
from ..reference.formulas import accumulate_dtype
from . import _checks as check
from ._common import Registration, backend_ops, empty_like_layout

HOT_PATH = "nonlocal_attn"

#: The public functions (re-exported by attnkernels.functional).
__all__ = ["nonlocal_attn"]


# ----------------------------------------------------------------------------------------
# Public function (attnkernels.functional)
# ----------------------------------------------------------------------------------------
def nonlocal_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor
) -> torch.Tensor:
    """Position attention over all H*W pixels: `y = gamma * (v @ softmax(q^T k, -1)^T) + x`.

    q, k are (N, D_qk, H, W) and v, x (N, D_v, H, W) (D_qk and D_v independent), viewed as
    (N, D, H*W); no 1/sqrt(D) scaling; energies and softmax in the accumulation dtype;
    gamma holds one value. The fused backends never hold the (H*W x H*W) attention matrix,
    forward or backward (online softmax; the backward recomputes it block by block).
    y has x's dtype and memory format.
    """
    check_nonlocal_attn(q, k, v, x, gamma)
    ops = backend_ops(HOT_PATH, x.device, Reference)

    def run(tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return ops.nonlocal_attn(q, k, v, x, gamma, tile)

    return run(cpu_tile("forward", ops, q, x, run))[0]


# ----------------------------------------------------------------------------------------
# The CPU kernels' thread split, by measurement
# ----------------------------------------------------------------------------------------
#: The tiles measured: query rows per forward task, keys per backward block (csrc/cpu/
#: nonlocal_attn.cpp). Smaller tiles give more tasks for a small N * H*W at a few us of ATen
#: overhead per tile; 512 makes larger GEMMs (5% faster forward at 4x512x28x28 on a 2-core EPYC,
#: benchmarks/NOTES.md) for 2 MB of tile per thread.
CPU_TILES = (512, 256, 128, 64, 32)
#: Where the static rule starts halving: the kernels' own default (cpu_tile=0).
RULE_TILE = 256
#: The largest cpu_tile the ops take (csrc/include/attnkernels/nonlocal_attn.h: 4 MB of tile
#: per thread at most).
MAX_CPU_TILE = 1024


def cpu_tile_rule(direction: str, n: int, hw: int, threads: int) -> int:
    """The static rule: halve the kernels' default tile (256, down to 32) until every thread
    has a task (two per thread in the forward, whose tasks are shorter), at most H*W."""
    wanted = 2 * threads if direction == "forward" else threads
    tile = RULE_TILE
    while tile > CPU_TILES[-1] and n * math.ceil(hw / tile) < wanted:
        tile //= 2
    return min(tile, hw)


def cpu_tile(direction: str, ops: Any, q: torch.Tensor, x: torch.Tensor, run: Callable[[int], Any]) -> int:
    """The cpu_tile to pass for the `direction` ("forward" or "backward") op that `run(tile)`
    runs: 0 unless `ops` are the C++ kernels on a CPU tensor; else the tile among CPU_TILES
    (at most H*W) that `attnkernels.choose` measures fastest the first time this shape, layout
    and thread count is seen, the static rule's in static mode and under tracing (the known
    winner, when torch.compile traces a shape measured before)."""
    if ops is not torch.ops.attnkernels or x.device.type != "cpu":
        return 0
    n, d_v, h, w = x.shape
    if not all(type(size) is int for size in (*x.shape, q.shape[1])) or n * h * w == 0:
        return 0  # symbolic sizes (tracing with dynamic shapes) key nothing: the default tile
    threads = _threads()
    static = cpu_tile_rule(direction, n, h * w, threads)
    key = (str(x.dtype).removeprefix("torch."), n, q.shape[1], d_v, h, w, _layout(q), _layout(x), threads)
    tiles = [static] + [min(t, h * w) for t in CPU_TILES]
    return choose.pick_setting(f"{HOT_PATH}.{direction}.cpu_tile", key, tiles, static, run, (q, x))


def _threads() -> int:
    return torch.get_num_threads()


# A constant while torch.compile traces (as choose.decide): dynamo cannot trace the call itself.
_threads._dynamo_marked_constant = True


def _layout(t: torch.Tensor) -> str:
    return "channels_last" if t.shape[1] > 1 and t.stride(1) == 1 else "nchw"


# ----------------------------------------------------------------------------------------
# Argument checks (the reference backend and the Triton ops share them; the C++ ops check the
# same rules in csrc/include/attnkernels/nonlocal_attn.h, in the same words)
# ----------------------------------------------------------------------------------------
def check_nonlocal_attn(q, k, v, x, gamma, cpu_tile: int = 0, op: str = "nonlocal_attn") -> None:
    """q, k (N, D_qk, H, W) and v, x (N, D_v, H, W) of one floating dtype on one device;
    gamma one floating value on that device; cpu_tile 0 (the default tile) to MAX_CPU_TILE."""
    check.feature_map(op, "x", x)
    n, _, h, w = x.shape
    for name, t in (("q", q), ("k", k), ("v", v)):
        check.tensor(op, name, t)
    if q.dim() != 4 or q.shape[0] != n or q.shape[1] < 1 or tuple(q.shape[2:]) != (h, w):
        raise ValueError(f"{op}: q must have shape (N, D_qk, H, W) = ({n}, D_qk, {h}, {w}), got {list(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have q's shape (N, D_qk, H, W) = {list(q.shape)}, got {list(k.shape)}")
    if v.shape != x.shape:
        raise ValueError(f"{op}: v must have x's shape (N, D_v, H, W) = {list(x.shape)}, got {list(v.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} must have x's dtype {check.dtype_name(x.dtype)}, got {check.dtype_name(t.dtype)}")
        check.device(op, name, t, x.device)
    check.one_value(op, "gamma", gamma, x.device)
    if not 0 <= cpu_tile <= MAX_CPU_TILE:
        raise ValueError(f"{op}: cpu_tile must be 0 (the default tile) or 1 to {MAX_CPU_TILE} pixels, got {cpu_tile}")


# ----------------------------------------------------------------------------------------
# Argument checks of the backward ops (worded as csrc/cpu/nonlocal_attn.cpp's; the Triton ops
# use them)
# ----------------------------------------------------------------------------------------
def check_nonlocal_attn_backward(grad_y, q, k, v, gamma, out, lse, cpu_tile: int = 0,
                                 op: str = "nonlocal_attn_backward") -> None:
    """nonlocal_attn's arguments with out in x's place (the C++ checks name it x too); grad_y
    shaped like out in its dtype; lse (N, H*W) in acc(out), on out's device."""
    check_nonlocal_attn(q, k, v, out, gamma, cpu_tile, op)
    check.like_x(op, "grad_y", grad_y, out)
    check.tensor(op, "lse", lse)
    n, _, h, w = out.shape
    if tuple(lse.shape) != (n, h * w):
        raise ValueError(f"{op}: lse must have shape (N, H*W) = ({n}, {h * w}), got {list(lse.shape)}")
    acc = accumulate_dtype(out.dtype)
    if lse.dtype != acc:
        raise TypeError(f"{op}: lse must be {check.dtype_name(acc)} (the accumulation dtype of x, "
                        f"{check.dtype_name(out.dtype)}), got {check.dtype_name(lse.dtype)}")
    check.device(op, "lse", lse, out.device)


# ----------------------------------------------------------------------------------------
# The reference backend: the op's signature in plain PyTorch (differentiable by autograd)
# ----------------------------------------------------------------------------------------
class Reference:
    """nonlocal_attn in torch ops, as the `reference` backend runs it: the whole (H*W x H*W)
    attention in memory."""

    @staticmethod
    def nonlocal_attn(q, k, v, x, gamma, cpu_tile=0):
        n, c, h, w = x.shape
        acc = accumulate_dtype(x.dtype)
        qf, kf, vf = (t.reshape(n, t.shape[1], h * w).to(acc) for t in (q, k, v))
        energy = torch.bmm(qf.transpose(1, 2), kf)
        attention = torch.softmax(energy, dim=-1)
        out = torch.bmm(vf, attention.transpose(1, 2)).view(n, c, h, w).to(x.dtype)
        y = (gamma.reshape(()) * out + x).contiguous(memory_format=memory_format_of(x))
        return y, out.contiguous(memory_format=memory_format_of(x)), torch.logsumexp(energy.detach(), dim=-1)


# ----------------------------------------------------------------------------------------
# Fakes and autograd
# ----------------------------------------------------------------------------------------
def _fake_nonlocal_attn(q, k, v, x, gamma, cpu_tile=0):
    n, _, h, w = x.shape
    lse = x.new_empty((n, h * w), dtype=accumulate_dtype(x.dtype))
    return empty_like_layout(x), empty_like_layout(x), lse


def _fake_nonlocal_attn_backward(grad_y, q, k, v, gamma, out, lse, cpu_tile=0):
    return empty_like_layout(q), empty_like_layout(k), empty_like_layout(v), torch.empty_like(gamma)


_FAKES = check.fakes_that_check(
    {"nonlocal_attn": _fake_nonlocal_attn, "nonlocal_attn_backward": _fake_nonlocal_attn_backward},
    {"nonlocal_attn": check_nonlocal_attn, "nonlocal_attn_backward": check_nonlocal_attn_backward},
)


def _register_autograd(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    def setup(ctx: Any, inputs: tuple, output: tuple) -> None:
        q, k, v, _x, gamma, _cpu_tile = inputs
        _y, out, lse = output
        ctx.mark_non_differentiable(out, lse)
        ctx.save_for_backward(q, k, v, gamma, out, lse)

    def backward(ctx: Any, grad_y: torch.Tensor, _grad_out, _grad_lse):
        q, k, v, gamma, out, lse = ctx.saved_tensors

        def run(tile: int) -> tuple[torch.Tensor, ...]:
            return ops.nonlocal_attn_backward(grad_y, q, k, v, gamma, out, lse, tile)

        grad_q, grad_k, grad_v, grad_gamma = run(cpu_tile("backward", ops, q, out, run))
        return grad_q, grad_k, grad_v, grad_y, grad_gamma, None

    torch.library.register_autograd(f"{namespace}::nonlocal_attn", backward, setup_context=setup)


REGISTRATION = Registration(_FAKES, _register_autograd)
