"""The fused functional API: one function per op of each hot path, on the chosen backend.

Each function runs on the backend `attnkernels.backend.select` picks for the tensor's
device (C++, CUDA, Triton, or the plain-PyTorch reference below) and is differentiable.

channel_gate hot path (ECA; SE's and CBAM's pooling; HAM's channel half):
    avg, max = channel_pool(x)                          # one read of x
    gate     = channel_gate(avg, max, weight, mode=...)  # (N, C): mix, 1-D conv over C, sigmoid
    y        = channel_rescale(x, gate)                  # one read of x, one write of y
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import select
from .reference._base import memory_format_of
from .reference.formulas import accumulate_dtype

#: channel_gate's pooling modes: f = avg, f = max, or HAM's 0.5*(avg+max) + alpha*avg + beta*max.
GATE_MODES = {"avg": 0, "max": 1, "mix": 2}

__all__ = ["GATE_MODES", "channel_pool", "channel_gate", "channel_rescale", "channel_attention"]


def _ops(backend: str):
    return torch.ops.attnkernels_triton if backend == "triton" else torch.ops.attnkernels


def channel_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and max of x (N, C, H, W) over H*W: two (N, C) maps in the accumulation dtype."""
    backend = select("channel_gate", x.device)
    if backend == "reference":
        acc = accumulate_dtype(x.dtype)
        return x.mean(dim=(2, 3), dtype=acc), x.amax(dim=(2, 3)).to(acc)
    return _ops(backend).channel_pool(x)


def channel_gate(
    avg: torch.Tensor,
    max: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    mode: str = "avg",
) -> torch.Tensor:
    """`sigmoid(conv1d_over_C(f))` (N, C), f chosen by `mode` ("avg", "max", "mix").

    `weight` holds the k taps of the zero-padded 1-D conv (k odd, any shape with k
    elements, e.g. a Conv1d(1, 1, k) weight); "mix" needs the scalars alpha and beta.
    """
    alpha, beta = _check_gate_args("channel_gate", weight, alpha, beta, mode)
    backend = select("channel_gate", avg.device)
    if backend == "reference":
        return _reference_gate(avg, max, weight, alpha, beta, mode)
    return _ops(backend).channel_gate(avg, max, weight, alpha, beta, GATE_MODES[mode])


def channel_rescale(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """`y = x * gate[:, :, None, None]`, computed in the accumulation dtype, in x's dtype and layout.

    `gate` (N, C) is cast to the accumulation dtype of x if it is not already.
    """
    gate = gate.to(accumulate_dtype(x.dtype))
    backend = select("channel_gate", x.device)
    if backend == "reference":
        y = (x.to(gate.dtype) * gate[:, :, None, None]).to(x.dtype)
        return y.contiguous(memory_format=memory_format_of(x))
    return _ops(backend).channel_rescale(x, gate)


def channel_attention(
    x: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    mode: str = "avg",
) -> torch.Tensor:
    """The whole ECA-style gate: `channel_rescale(x, channel_gate(*channel_pool(x), ...))`.

    On the C++/CUDA backends this is one op (the CPU kernel pools, gates and rescales each
    sample while it is in cache); elsewhere the three ops run in turn.
    """
    backend = select("channel_gate", x.device)
    if backend in ("cpu", "cuda"):
        alpha, beta = _check_gate_args("channel_attention", weight, alpha, beta, mode)
        return torch.ops.attnkernels.channel_attention(x, weight, alpha, beta, GATE_MODES[mode])[0]
    avg, max_ = channel_pool(x)
    return channel_rescale(x, channel_gate(avg, max_, weight, alpha, beta, mode))


def _check_gate_args(op: str, weight, alpha, beta, mode: str):
    """Validate the gate's mode and taps; return (alpha, beta), None unless mode is "mix"."""
    if mode not in GATE_MODES:
        raise ValueError(f"{op}: mode must be one of {', '.join(GATE_MODES)}; got {mode!r}")
    if mode == "mix" and (alpha is None or beta is None):
        raise ValueError(f"{op}: mode 'mix' needs alpha and beta")
    if weight.numel() % 2 == 0:
        raise ValueError(f"{op}: weight must hold an odd number of taps, got {weight.numel()}")
    return (alpha, beta) if mode == "mix" else (None, None)


def _reference_gate(avg, max_, weight, alpha, beta, mode: str) -> torch.Tensor:
    if mode == "avg":
        f = avg
    elif mode == "max":
        f = max_
    else:
        f = 0.5 * (avg + max_) + alpha.to(avg.dtype) * avg + beta.to(avg.dtype) * max_
    k = weight.numel()
    z = F.conv1d(f[:, None, :], weight.reshape(1, 1, k).to(avg.dtype), padding=(k - 1) // 2)
    return torch.sigmoid(z[:, 0, :])
