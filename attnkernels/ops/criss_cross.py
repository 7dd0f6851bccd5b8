"""criss_cross hot path (work in progress, not in HOT_PATHS): CCNet's criss-cross attention.

    y, out, lse = criss_cross(q, k, v, x, gamma)   # each pixel over its row and its column

The math is in csrc/criss_cross_ops.cpp. This file so far holds the Reference ops (the oracle
of the kernels, forward and explicit backward); the checks, fakes, autograd and the kernels
follow the recipe in CONTRIBUTING.md.
"""
from __future__ import annotations

import torch

from ..reference._base import memory_format_of

HOT_PATH = "criss_cross"


def _energies(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e_col (N, H, W, H) with the pixel's own entry -inf, e_row (N, H, W, W)), in q's dtype."""
    h = q.shape[2]
    e_col = torch.einsum("ndhw,ndgw->nhwg", q, k)
    own = torch.eye(h, dtype=torch.bool, device=q.device)[None, :, None, :]
    return e_col.masked_fill(own, float("-inf")), torch.einsum("ndhw,ndhv->nhwv", q, k)


def _weighted(p_col: torch.Tensor, p_row: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_h' p_col v[:, :, h', w] + sum_w' p_row v[:, :, h, w']  (N, C, H, W)."""
    return torch.einsum("nhwg,ncgw->nchw", p_col, v) + torch.einsum("nhwv,nchv->nchw", p_row, v)


class Reference:
    """criss_cross's ops in torch ops (they materialise the energies: the oracle, not a kernel)."""

    @staticmethod
    def criss_cross(q, k, v, x, gamma):
        acc = torch.promote_types(x.dtype, torch.float32)
        qa, ka, va = (t.to(acc) for t in (q, k, v))
        e_col, e_row = _energies(qa, ka)
        lse = torch.logsumexp(torch.cat([e_col, e_row], dim=-1), dim=-1)
        p_col, p_row = (e_col - lse[..., None]).exp(), (e_row - lse[..., None]).exp()
        fmt = memory_format_of(x)
        out = _weighted(p_col, p_row, va).to(x.dtype).contiguous(memory_format=fmt)
        y = (gamma.to(x.dtype).reshape(()) * out + x).contiguous(memory_format=fmt)
        return y, out, lse.contiguous()

    @staticmethod
    def criss_cross_backward(grad_y, q, k, v, gamma, out, lse):
        acc = lse.dtype
        qa, ka, va, g = (t.to(acc) for t in (q, k, v, grad_y))
        gam = gamma.to(acc).reshape(())
        e_col, e_row = _energies(qa, ka)
        p_col, p_row = (e_col - lse[..., None]).exp(), (e_row - lse[..., None]).exp()
        d_o = gam * g
        r = (g * out.to(acc)).sum(1)  # (N, H, W)
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
