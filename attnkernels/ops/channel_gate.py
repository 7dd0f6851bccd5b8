"""channel_gate ops: fake implementations and autograd, for every backend's namespace.

The C++/CUDA ops are `torch.ops.attnkernels.<name>` (schemas in csrc/attnkernels.cpp);
the Triton ops are `torch.ops.attnkernels_triton.<name>` (attnkernels/triton/channel_gate.py),
with the same names, signatures and math. `register(namespace)` gives a namespace's forward
ops their autograd, whose backward is that namespace's registered backward op, and (for the
C++ namespace) fake implementations for torch.compile. Saved for backward: x and the (N, C)
pooled maps and gate only; no full-size intermediate.
"""
from __future__ import annotations

from typing import Any

import torch

# The same rules as the reference modules and csrc/include/attnkernels/common.h: the
# accumulation dtype, and the layout of a full-size output (channels_last in, out).
from . import empty_like_layout, register_once
from ..reference.formulas import accumulate_dtype

FORWARD_OPS = ("channel_pool", "channel_gate", "channel_rescale")
BACKWARD_OPS = ("channel_pool_backward", "channel_gate_backward", "channel_rescale_backward")

_registered: set[str] = set()


def _per_channel(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[:2], dtype=accumulate_dtype(x.dtype))


def _fake_channel_pool(x):
    return _per_channel(x), _per_channel(x)


def _fake_channel_pool_backward(grad_avg, grad_max, x, max):
    return empty_like_layout(x)


def _fake_channel_gate(avg, max, weight, alpha, beta, mode):
    return torch.empty_like(avg)


def _fake_channel_gate_backward(grad_gate, gate, avg, max, weight, alpha, beta, mode):
    ab_dtype = alpha.dtype if mode == 2 else avg.dtype
    scalar = avg.new_empty((), dtype=ab_dtype)
    return torch.empty_like(avg), torch.empty_like(avg), torch.empty_like(weight), scalar, scalar.clone()


def _fake_channel_rescale(x, gate):
    return empty_like_layout(x)


def _fake_channel_rescale_backward(grad_y, x, gate):
    return empty_like_layout(x), torch.empty_like(gate)


def _fake_channel_attention(x, weight, alpha, beta, mode):
    return _fake_channel_rescale(x, None), _per_channel(x), _per_channel(x), _per_channel(x)


def _fake_channel_mlp_attention(x, w1, b1, w2, b2):
    return _fake_channel_rescale(x, None), _per_channel(x), _per_channel(x)


_FAKES = {
    "channel_pool": _fake_channel_pool,
    "channel_pool_backward": _fake_channel_pool_backward,
    "channel_gate": _fake_channel_gate,
    "channel_gate_backward": _fake_channel_gate_backward,
    "channel_rescale": _fake_channel_rescale,
    "channel_rescale_backward": _fake_channel_rescale_backward,
    "channel_attention": _fake_channel_attention,
    "channel_mlp_attention": _fake_channel_mlp_attention,
}


def _mlp_gate_backward(grad_gate, avg, gate, w1, b1, w2, b2):
    """Gradients of `gate = sigmoid(w2 @ relu(w1 @ avg + b1) + b2)` (SE's MLP on (N, C) maps,
    in the accumulation dtype): (grad_avg, grad_w1, grad_b1, grad_w2, grad_b2), each
    parameter gradient in its parameter's shape and dtype (a bias's is None if it is None)."""
    acc = avg.dtype
    rd, c = w1.shape[0], avg.shape[1]
    w1a, w2a = w1.reshape(rd, c).to(acc), w2.reshape(c, rd).to(acc)
    h_pre = avg @ w1a.T
    if b1 is not None:
        h_pre = h_pre + b1.reshape(rd).to(acc)
    h = torch.relu(h_pre)
    dz = grad_gate * gate * (1 - gate)
    dh = (dz @ w2a) * (h_pre > 0)
    grad_w1 = (dh.T @ avg).to(w1.dtype).reshape(w1.shape)
    grad_w2 = (dz.T @ h).to(w2.dtype).reshape(w2.shape)
    grad_b1 = None if b1 is None else dh.sum(0).to(b1.dtype).reshape(b1.shape)
    grad_b2 = None if b2 is None else dz.sum(0).to(b2.dtype).reshape(b2.shape)
    return dh @ w1a, grad_w1, grad_b1, grad_w2, grad_b2


def _register_autograd(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    def setup_pool(ctx: Any, inputs: tuple, output: tuple) -> None:
        (x,) = inputs
        ctx.save_for_backward(x, output[1])
        ctx.set_materialize_grads(False)  # an unused max then costs no tie-counting pass

    def backward_pool(ctx: Any, grad_avg: torch.Tensor | None, grad_max: torch.Tensor | None):
        x, max_ = ctx.saved_tensors
        if grad_avg is None:
            grad_avg = torch.zeros_like(max_)
        return ops.channel_pool_backward(grad_avg, grad_max, x, max_)

    def setup_gate(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        avg, max_, weight, alpha, beta, mode = inputs
        ctx.mode = mode
        ctx.has_mix = alpha is not None and beta is not None
        ctx.save_for_backward(avg, max_, weight, alpha, beta, output)

    def backward_gate(ctx: Any, grad_gate: torch.Tensor):
        avg, max_, weight, alpha, beta, gate = ctx.saved_tensors
        grads = ops.channel_gate_backward(grad_gate, gate, avg, max_, weight, alpha, beta, ctx.mode)
        grad_avg, grad_max, grad_weight, grad_alpha, grad_beta = grads
        if not ctx.has_mix:
            grad_alpha = grad_beta = None
        return grad_avg, grad_max, grad_weight, grad_alpha, grad_beta, None

    def setup_rescale(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, gate = inputs
        ctx.save_for_backward(x, gate)

    def backward_rescale(ctx: Any, grad_y: torch.Tensor):
        x, gate = ctx.saved_tensors
        return ops.channel_rescale_backward(grad_y, x, gate)

    def setup_attention(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, alpha, beta, mode = inputs
        _, avg, max_, gate = output
        ctx.mode = mode
        ctx.has_mix = alpha is not None and beta is not None
        ctx.save_for_backward(x, weight, alpha, beta, avg, max_, gate)
        ctx.set_materialize_grads(False)

    def backward_attention(ctx: Any, grad_y, grad_avg, grad_max, grad_gate_out):
        # Only y is meant to be differentiated; avg, max and gate are saved statistics.
        x, weight, alpha, beta, avg, max_, gate = ctx.saved_tensors
        if grad_y is None:
            return None, None, None, None, None
        grad_x, grad_gate = ops.channel_rescale_backward(grad_y, x, gate)
        grads = ops.channel_gate_backward(grad_gate, gate, avg, max_, weight, alpha, beta, ctx.mode)
        grad_avg_in, grad_max_in, grad_weight, grad_alpha, grad_beta = grads
        # Mode 0 uses no max: skip the tie-counting pass. grad_x is ours: add in place, so
        # no third x-sized tensor is alive at the peak.
        grad_x.add_(ops.channel_pool_backward(grad_avg_in, None if ctx.mode == 0 else grad_max_in, x, max_))
        if not ctx.has_mix:
            grad_alpha = grad_beta = None
        return grad_x, grad_weight, grad_alpha, grad_beta, None

    def setup_mlp_attention(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, w1, b1, w2, b2 = inputs
        _, avg, gate = output
        ctx.has_bias = (b1 is not None, b2 is not None)
        ctx.save_for_backward(x, w1, b1, w2, b2, avg, gate)
        ctx.set_materialize_grads(False)

    def backward_mlp_attention(ctx: Any, grad_y, grad_avg, grad_gate_out):
        # Only y is meant to be differentiated; avg and gate are saved statistics.
        x, w1, b1, w2, b2, avg, gate = ctx.saved_tensors
        if grad_y is None:
            return None, None, None, None, None
        grad_x, grad_gate = ops.channel_rescale_backward(grad_y, x, gate)
        grads = _mlp_gate_backward(grad_gate, avg, gate, w1, b1, w2, b2)
        grad_avg_in, grad_w1, grad_b1, grad_w2, grad_b2 = grads
        # mean_hw's backward spreads grad_avg evenly: added in place, no third x-sized tensor.
        hw = x.shape[2] * x.shape[3]
        grad_x.add_((grad_avg_in / hw).to(grad_x.dtype)[:, :, None, None])
        return (
            grad_x,
            grad_w1,
            grad_b1 if ctx.has_bias[0] else None,
            grad_w2,
            grad_b2 if ctx.has_bias[1] else None,
        )

    if hasattr(ops, "channel_attention"):  # the per-sample ops exist in the C++ library only
        torch.library.register_autograd(
            f"{namespace}::channel_attention", backward_attention, setup_context=setup_attention
        )
        torch.library.register_autograd(
            f"{namespace}::channel_mlp_attention", backward_mlp_attention, setup_context=setup_mlp_attention
        )
    for name, backward, setup in (
        ("channel_pool", backward_pool, setup_pool),
        ("channel_gate", backward_gate, setup_gate),
        ("channel_rescale", backward_rescale, setup_rescale),
    ):
        torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=setup)


def register(namespace: str, with_fakes: bool = True) -> None:
    """Give `namespace`'s channel_gate ops autograd (and fake impls); idempotent.

    Triton ops (torch.library.triton_op) trace their own fake implementation, so they
    take `with_fakes=False`.
    """
    register_once(namespace, with_fakes, _FAKES, _register_autograd, _registered)
