"""gam_channel ops: fake implementations and autograd, for every backend's namespace.

The C++/CUDA ops are `torch.ops.attnkernels.<name>` (schemas and math in csrc/attnkernels.cpp);
the Triton ops are `torch.ops.attnkernels_triton.<name>` (attnkernels/triton/gam_channel.py),
with the same names, signatures and math:

    x1 = gam_channel(x, w1, b1, w2, b2)   # x * sigmoid(fc2(relu(fc1(x)))) per pixel, one read of x
    grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = gam_channel_backward(grad_x1, x, w1, b1, w2, b2)

Saved for backward: x and the four small weights; the backward recomputes the MLP's hidden
and output maps from x (2*C*rd multiply-adds per pixel) instead of saving them.
"""
from __future__ import annotations

from typing import Any

import torch

from . import empty_like_layout, register_once

FORWARD_OPS = ("gam_channel",)
BACKWARD_OPS = ("gam_channel_backward",)

_registered: set[str] = set()


def _fake_gam_channel(x, w1, b1, w2, b2):
    return empty_like_layout(x)


def _fake_gam_channel_backward(grad_x1, x, w1, b1, w2, b2):
    return (empty_like_layout(x), *(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (w1, b1, w2, b2)))


_FAKES = {"gam_channel": _fake_gam_channel, "gam_channel_backward": _fake_gam_channel_backward}


def _register_autograd(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    def setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)  # x, w1, b1, w2, b2

    def backward(ctx: Any, grad_x1: torch.Tensor):
        return ops.gam_channel_backward(grad_x1, *ctx.saved_tensors)

    torch.library.register_autograd(f"{namespace}::gam_channel", backward, setup_context=setup)


def register(namespace: str, with_fakes: bool = True) -> None:
    """Give `namespace`'s gam_channel op autograd (and fake impls); idempotent.

    Triton ops (torch.library.triton_op) trace their own fake implementation, so they
    take `with_fakes=False`.
    """
    register_once(namespace, with_fakes, _FAKES, _register_autograd, _registered)
