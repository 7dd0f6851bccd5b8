"""criss_cross hot path: CCNet's criss-cross attention, each pixel over its row and its column.

    y = criss_cross(q, k, v, x, gamma)   # gamma * out + x; out attends over H + W - 1 positions
    (the op: y, out, lse = criss_cross(q, k, v, x, gamma); grad_q, grad_k, grad_v, grad_gamma =
     criss_cross_backward(grad_y, q, k, v, gamma, out, lse))

The math is in csrc/criss_cross_ops.cpp with the schemas; kernels in csrc/cpu/criss_cross.cpp,
csrc/cuda/criss_cross.cu and attnkernels/triton/criss_cross.py. The kernels never write the
(N, H + W - 1, H, W) energies: a row pass and a column pass each hold one row's or one column's
block, and the column pass merges its softmax with the row pass's by their maxima and sums
(flash-style). Saved for backward: q, k, v, out (x-sized, before gamma) and lse, the (N, H*W)
log-sum-exp of each pixel's H + W - 1 energies; the backward recomputes the weights. RCCA
(`recurrence=2`) is the same op twice. grad_x = grad_y needs no op.

The arguments are nonlocal_attn's (q, k (N, D, H, W); v, x (N, C, H, W); gamma; an (N, H*W)
lse), and so are the checks and their words.
"""
from __future__ import annotations

from typing import Any

import torch

from ..reference._base import memory_format_of
from ..reference.formulas import accumulate_dtype
from . import _checks as check
from ._common import Registration, backend_ops, empty_like_layout
from .nonlocal_attn import check_nonlocal_attn, check_nonlocal_attn_backward

HOT_PATH = "criss_cross"

#: The public functions (re-exported by attnkernels.functional).
__all__ = ["criss_cross"]


# ----------------------------------------------------------------------------------------
# Public function (attnkernels.functional)
# ----------------------------------------------------------------------------------------
def criss_cross_ops(device: torch.device):
    return backend_ops(HOT_PATH, device, Reference)


def criss_cross(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor
) -> torch.Tensor:
    """Criss-cross attention: `y = gamma * out + x`, each pixel attending to its row and column.

    q, k are (N, D, H, W) and v, x (N, C, H, W), one dtype; no 1/sqrt(D) scaling. Pixel (h, w)
    weighs the keys of its column (h', w), h' != h, and of its row (h, w'), itself once, by one
    softmax over those H + W - 1 energies; out is that weighting of v. Energies, softmax and
    out in the accumulation dtype; out rounded to x's dtype, then `gamma * out + x` rounded
    once. gamma holds one value. y has x's dtype and memory format.
    """
    check_criss_cross(q, k, v, x, gamma)
    return criss_cross_ops(x.device).criss_cross(q, k, v, x, gamma)[0]


# ----------------------------------------------------------------------------------------
# Argument checks: nonlocal_attn's (the C++ ops call the same rules through
# csrc/include/attnkernels/criss_cross.h)
# ----------------------------------------------------------------------------------------
def check_criss_cross(q, k, v, x, gamma, op: str = "criss_cross") -> None:
    """q, k (N, D_qk, H, W) and v, x (N, D_v, H, W), one feature dtype on one device; gamma one value."""
    check_nonlocal_attn(q, k, v, x, gamma, op=op)


def check_criss_cross_backward(grad_y, q, k, v, gamma, out, lse, op: str = "criss_cross_backward") -> None:
    """criss_cross's arguments with out in x's place; grad_y like out; lse (N, H*W) in acc(out)."""
    check_nonlocal_attn_backward(grad_y, q, k, v, gamma, out, lse, op=op)


# ----------------------------------------------------------------------------------------
# The reference backend: the ops in torch ops. They materialise the energies (the oracle, not a
# kernel). criss_cross is differentiable by autograd (what the `reference` backend runs);
# criss_cross_backward writes out csrc/criss_cross_ops.cpp's formulas without autograd.
# ----------------------------------------------------------------------------------------
def _energies(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e_col (N, H, W, H) with the pixel's own entry -inf, e_row (N, H, W, W)), in q's dtype."""
    h = q.shape[2]
    e_col = torch.einsum("ndhw,ndgw->nhwg", q, k)
    own = torch.eye(h, dtype=torch.bool, device=q.device)[None, :, None, :]
    return e_col.masked_fill(own, float("-inf")), torch.einsum("ndhw,ndhv->nhwv", q, k)


def _weights(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_col, P_row) = exp(e - lse), lse (N, H, W)."""
    e_col, e_row = _energies(q, k)
    return (e_col - lse[..., None]).exp(), (e_row - lse[..., None]).exp()


def _weighted(p_col: torch.Tensor, p_row: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_h' p_col v[:, :, h', w] + sum_w' p_row v[:, :, h, w']  (N, C, H, W)."""
    return torch.einsum("nhwg,ncgw->nchw", p_col, v) + torch.einsum("nhwv,nchv->nchw", p_row, v)


class Reference:
    """criss_cross's ops in torch ops, as the `reference` backend runs them."""

    @staticmethod
    def criss_cross(q, k, v, x, gamma):
        n, _, h, w = x.shape
        acc = accumulate_dtype(x.dtype)
        qa, ka, va = (t.to(acc) for t in (q, k, v))
        lse = torch.logsumexp(torch.cat(_energies(qa, ka), dim=-1), dim=-1)
        fmt = memory_format_of(x)
        out = _weighted(*_weights(qa, ka, lse), va).to(x.dtype)
        y = gamma.to(acc).reshape(()) * out.to(acc) + x.to(acc)
        return (y.to(x.dtype).contiguous(memory_format=fmt), out.contiguous(memory_format=fmt),
                lse.reshape(n, h * w).contiguous())

    @staticmethod
    def criss_cross_backward(grad_y, q, k, v, gamma, out, lse):
        n, _, h, w = out.shape
        acc = lse.dtype
        qa, ka, va, g = (t.to(acc) for t in (q, k, v, grad_y))
        gam = gamma.to(acc).reshape(())
        p_col, p_row = _weights(qa, ka, lse.reshape(n, h, w))
        d_o = gam * g
        r = (g * out.to(acc)).sum(1)  # R (N, H, W)
        dp_col = torch.einsum("nchw,ncgw->nhwg", d_o, va)
        dp_row = torch.einsum("nchw,nchv->nhwv", d_o, va)
        ds_col = p_col * (dp_col - gam * r[..., None])
        ds_row = p_row * (dp_row - gam * r[..., None])
        grad_q = torch.einsum("nhwg,ndgw->ndhw", ds_col, ka) + torch.einsum("nhwv,ndhv->ndhw", ds_row, ka)
        grad_k = torch.einsum("nhwg,ndhw->ndgw", ds_col, qa) + torch.einsum("nhwv,ndhw->ndhv", ds_row, qa)
        grad_v = torch.einsum("nhwg,nchw->ncgw", p_col, d_o) + torch.einsum("nhwv,nchw->nchv", p_row, d_o)
        grad_gamma = r.sum().reshape(gamma.shape).to(gamma.dtype)
        return (*(gt.to(t.dtype).contiguous(memory_format=memory_format_of(t))
                  for gt, t in ((grad_q, q), (grad_k, k), (grad_v, v))), grad_gamma)


# ----------------------------------------------------------------------------------------
# Fakes and autograd
# ----------------------------------------------------------------------------------------
def _fake_criss_cross(q, k, v, x, gamma):
    n, _, h, w = x.shape
    return empty_like_layout(x), empty_like_layout(x), x.new_empty((n, h * w), dtype=accumulate_dtype(x.dtype))


def _fake_criss_cross_backward(grad_y, q, k, v, gamma, out, lse):
    return empty_like_layout(q), empty_like_layout(k), empty_like_layout(v), torch.empty_like(gamma)


_FAKES = check.fakes_that_check(
    {"criss_cross": _fake_criss_cross, "criss_cross_backward": _fake_criss_cross_backward},
    {"criss_cross": check_criss_cross, "criss_cross_backward": check_criss_cross_backward},
)


def _register_autograd(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    def setup(ctx: Any, inputs: tuple, output: tuple) -> None:
        q, k, v, _x, gamma = inputs
        _y, out, lse = output
        ctx.mark_non_differentiable(out, lse)
        ctx.save_for_backward(q, k, v, gamma, out, lse)

    def backward(ctx: Any, grad_y: torch.Tensor, _grad_out, _grad_lse):
        q, k, v, gamma, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v, grad_gamma = ops.criss_cross_backward(grad_y, q, k, v, gamma, out, lse)
        return grad_q, grad_k, grad_v, grad_y, grad_gamma

    torch.library.register_autograd(f"{namespace}::criss_cross", backward, setup_context=setup)


REGISTRATION = Registration(_FAKES, _register_autograd)
