"""nonlocal_attn ops: fake implementations and autograd, for every backend's namespace.

The C++/CUDA ops are `torch.ops.attnkernels.<name>` (schemas and math in csrc/attnkernels.cpp);
the Triton ops are `torch.ops.attnkernels_triton.<name>` (attnkernels/triton/nonlocal_attn.py),
with the same names, signatures and math:

    y, out, lse = nonlocal_attn(q, k, v, x, gamma)   # y = gamma * softmax(q^T k) v + x, flash-style
    grad_q, grad_k, grad_v, grad_gamma = nonlocal_attn_backward(grad_y, q, k, v, gamma, out, lse)

Saved for backward: q, k, v, out (the attention output before gamma, x-sized) and lse, the
(N, H*W) per-row log-sum-exp; the backward recomputes the attention block by block. Nothing
of size (H*W)^2 exists, forward or backward. grad_x = grad_y needs no op.
"""
from __future__ import annotations

from typing import Any

import torch

from . import empty_like_layout, register_once
from ..reference.formulas import accumulate_dtype

FORWARD_OPS = ("nonlocal_attn",)
BACKWARD_OPS = ("nonlocal_attn_backward",)

_registered: set[str] = set()


def _fake_nonlocal_attn(q, k, v, x, gamma):
    n, _, h, w = x.shape
    lse = x.new_empty((n, h * w), dtype=accumulate_dtype(x.dtype))
    return empty_like_layout(x), empty_like_layout(x), lse


def _fake_nonlocal_attn_backward(grad_y, q, k, v, gamma, out, lse):
    return empty_like_layout(q), empty_like_layout(k), empty_like_layout(v), torch.empty_like(gamma)


_FAKES = {
    "nonlocal_attn": _fake_nonlocal_attn,
    "nonlocal_attn_backward": _fake_nonlocal_attn_backward,
}


def _register_autograd(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    def setup(ctx: Any, inputs: tuple, output: tuple) -> None:
        q, k, v, _x, gamma = inputs
        _y, out, lse = output
        ctx.mark_non_differentiable(out, lse)
        ctx.save_for_backward(q, k, v, gamma, out, lse)

    def backward(ctx: Any, grad_y: torch.Tensor, _grad_out, _grad_lse):
        q, k, v, gamma, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v, grad_gamma = ops.nonlocal_attn_backward(grad_y, q, k, v, gamma, out, lse)
        return grad_q, grad_k, grad_v, grad_y, grad_gamma

    torch.library.register_autograd(f"{namespace}::nonlocal_attn", backward, setup_context=setup)


def register(namespace: str, with_fakes: bool = True) -> None:
    """Give `namespace`'s nonlocal_attn op autograd (and fake impls); idempotent.

    Triton ops (torch.library.triton_op) trace their own fake implementation, so they
    take `with_fakes=False`.
    """
    register_once(namespace, with_fakes, _FAKES, _register_autograd, _registered)
