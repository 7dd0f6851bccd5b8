"""channel_gate hot path: ECA, SE's pooling and MLP, HAM's channel half.

    avg, max = channel_pool(x)                          # one read of x
    gate     = channel_gate(avg, max, weight, mode=...)  # (N, C): mix, 1-D conv over C, sigmoid
    y        = channel_rescale(x, gate)                  # one read of x, one write of y
    y        = channel_attention(x, weight, mode=...)    # the three in one (per sample on CPU)
    y        = channel_mlp_attention(x, w1, b1, w2, b2)  # SE: pool, MLP gate, rescale in one
                                                         # (b1 (N, rd): Bridge's per-sample term)

The math of every op is in csrc/channel_gate_ops.cpp with the schemas; kernels in
csrc/cpu/channel_gate.cpp, csrc/cuda/channel_gate.cu and attnkernels/triton/channel_gate.py.
This module holds the public functions, their checks, the `reference` backend, the fakes and
the autograd. Saved for backward: x and the (N, C) pooled maps and gate only.
"""
from __future__ import annotations

import enum
from typing import Any

import torch
import torch.nn.functional as F

from .. import choose
from ..backend import select
from ..reference._base import memory_format_of
from ..reference.formulas import accumulate_dtype
from . import _checks as check
from ._common import Composite, Registration, backend_ops, empty_like_layout, namespace

HOT_PATH = "channel_gate"

#: The public functions (re-exported by attnkernels.functional).
__all__ = ["GATE_MODES", "GateMode", "channel_pool", "channel_gate", "channel_rescale", "channel_attention", "channel_mlp_attention"]


class GateMode(enum.IntEnum):
    """What channel_gate's 1-D conv reads: f = avg, f = max, or HAM's adaptive mix
    f = 0.5*(avg + max) + alpha*avg + beta*max. The ops take the integer; the public functions
    the name. csrc/include/attnkernels/channel_gate.h has the same enum."""

    AVG = 0
    MAX = 1
    MIX = 2

    @classmethod
    def parse(cls, op: str, mode: str) -> GateMode:
        """The mode named `mode` ("avg", "max", "mix")."""
        # A table built at import, not `for m in cls`: torch.compile on torch 2.11 cannot
        # iterate an enum class (a graph break, so fullgraph=True failed).
        names = _GATE_MODES_BY_NAME
        if not isinstance(mode, str) or mode not in names:
            raise ValueError(f"{op}: mode must be one of {', '.join(names)}; got {mode!r}")
        return names[mode]

    @classmethod
    def check(cls, op: str, mode) -> GateMode:
        """The op argument `mode` (an int) as a GateMode."""
        if isinstance(mode, bool) or not isinstance(mode, int) or mode not in cls._value2member_map_:
            raise ValueError(f"{op}: mode must be 0 (avg), 1 (max) or 2 (mix), got {mode}")
        return cls(mode)


# GateMode.parse's table.
_GATE_MODES_BY_NAME = {m.name.lower(): m for m in GateMode}

#: channel_gate's pooling modes by name (the public functions' `mode`).
GATE_MODES = {m.name.lower(): int(m) for m in GateMode}


# ----------------------------------------------------------------------------------------
# Public functions (attnkernels.functional)
# ----------------------------------------------------------------------------------------
def channel_gate_ops(device: torch.device):
    """The channel_gate ops that run on `device` now: the chosen backend's namespace, or the
    Reference class (the same names and signatures)."""
    return backend_ops(HOT_PATH, device, Reference)


def channel_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and max of x (N, C, H, W) over H*W: two (N, C) maps in the accumulation dtype."""
    check_channel_pool(x)
    return channel_gate_ops(x.device).channel_pool(x)


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
    elements, e.g. a Conv1d(1, 1, k) weight); "mix" needs the scalars alpha and beta: one
    floating value each, of any shape (0-d, or (1,) as some checkpoints store them), on the
    inputs' device. Their gradients come back in their own shapes, on every backend.
    """
    m, alpha, beta = _gate_mode("channel_gate", alpha, beta, mode)
    check_channel_gate(avg, max, weight, alpha, beta, m)
    return channel_gate_ops(avg.device).channel_gate(avg, max, weight, alpha, beta, m)


def channel_rescale(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """`y = x * gate[:, :, None, None]`, computed in the accumulation dtype, in x's dtype and layout.

    `gate` (N, C) is cast to the accumulation dtype of x if it is not already.
    """
    check.feature_map("channel_rescale", "x", x)
    gate = gate.to(accumulate_dtype(x.dtype))
    check_channel_rescale(x, gate)
    return channel_gate_ops(x.device).channel_rescale(x, gate)


def channel_attention(
    x: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    mode: str = "avg",
) -> torch.Tensor:
    """The whole ECA-style gate: `channel_rescale(x, channel_gate(*channel_pool(x), ...))`.

    alpha and beta ("mix"): one value each, of any shape, as for `channel_gate`.

    On the C++ CPU backend this is one kernel that pools, gates and rescales each sample while
    it is in cache; elsewhere the three ops run in turn (one composite op).
    """
    m, alpha, beta = _gate_mode("channel_attention", alpha, beta, mode)
    check_channel_attention(x, weight, alpha, beta, m)
    args = (x, weight, alpha, beta, m)
    return _attention("channel_attention", channel_attention_sequence, args, (weight.numel(), m))(*args)


def channel_mlp_attention(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
) -> torch.Tensor:
    """SE's whole gate: `y = x * sigmoid(w2 @ relu(w1 @ mean_hw(x) + b1) + b2)`.

    `w1` holds (rd, C) values and `w2` (C, rd) (e.g. the weights of SE's 1x1 convs fc1 and
    fc2); the MLP runs in the accumulation dtype of x. `b1` holds rd values shared by every
    sample, or is (N, rd): one row per sample (Bridge adds its bridges' pooled terms there).
    On the C++ CPU backend one kernel pools, gates and rescales each sample while it is in
    cache; elsewhere channel_pool, the MLP in torch and channel_rescale run in turn (one
    composite op).
    """
    check_mlp_args(x, w1, b1, w2, b2)
    args = (x, w1, b1, w2, b2)
    key = (tuple(w1.shape), b1 is not None and tuple(b1.shape), b2 is not None)
    return _attention("channel_mlp_attention", channel_mlp_attention_sequence, args, key)(*args)


def _attention(op: str, sequence, args: tuple, key: tuple):
    """The function that runs whole-gate op `op` (channel_attention, channel_mlp_attention) as
    `fn(*args)` and returns y: on the reference backend its reference; else chosen by
    `attnkernels.choose` (key: the backend, x's dtype, shape and layout, then `key`) among the
    backend's op ("fused", the static choice), on CPU also its three passes in turn
    (`sequence`: the C++ op is one per-sample kernel there) and the eager torch composition."""
    x = args[0]
    backend = select(HOT_PATH, x.device)
    if backend == "reference":
        return lambda *a: getattr(Reference, op)(*a)[0]
    ops = namespace(backend)
    runs = {"fused": lambda *a: getattr(ops, op)(*a)[0]}
    if backend == "cpu":
        runs["passes"] = lambda *a: sequence(ops, *a)[0]
    runs["eager"] = lambda *a: getattr(Reference, op)(*a)[0]
    full_key = (backend, x.dtype, tuple(x.shape), memory_format_of(x), *key, choose.autograd_records(args))
    return choose.pick(op, full_key, runs, "fused", args)


def _gate_mode(op: str, alpha, beta, mode: str):
    """The public `mode` name as a GateMode, and (alpha, beta): None unless mode is "mix"."""
    m = GateMode.parse(op, mode)
    if m == GateMode.MIX and (alpha is None or beta is None):
        raise ValueError(f"{op}: mode 'mix' needs alpha and beta")
    return (m, alpha, beta) if m == GateMode.MIX else (m, None, None)


# ----------------------------------------------------------------------------------------
# Argument checks of the ops (the reference backend and the Triton ops share them; the C++
# ops check the same rules in csrc/include/attnkernels/channel_gate.h, in the same words)
# ----------------------------------------------------------------------------------------
def check_channel_pool(x) -> None:
    check.feature_map("channel_pool", "x", x)


def check_channel_gate(avg, max, weight, alpha, beta, mode, op: str = "channel_gate") -> GateMode:
    """channel_gate's inputs: avg and max (N, C) in one accumulation dtype, k odd taps,
    alpha and beta (one value each) for the mix; returns mode as a GateMode."""
    mode = GateMode.check(op, mode)
    check.tensor(op, "avg", avg)
    if avg.dim() != 2:
        raise ValueError(f"{op}: avg must be (N, C), got {list(avg.shape)}")
    check.tensor(op, "max", max)
    if max.shape != avg.shape or max.dtype != avg.dtype:
        raise ValueError(f"{op}: max must match avg's shape {list(avg.shape)} and dtype "
                         f"{check.dtype_name(avg.dtype)}, got {list(max.shape)} {check.dtype_name(max.dtype)}")
    if avg.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: avg must be float32 or float64 (an accumulation dtype), got {check.dtype_name(avg.dtype)}")
    check.device(op, "max", max, avg.device)
    _check_gate_params(op, weight, alpha, beta, mode, avg.device)
    return mode


def _check_gate_params(op: str, weight, alpha, beta, mode: GateMode, where: torch.device) -> None:
    """The gate's parameters: k odd taps, and for the mix alpha and beta, one floating value
    each of any shape (0-d or (1,): the autograd returns their gradients in their own shapes);
    all on `where`."""
    check.tensor(op, "weight", weight)
    if weight.numel() % 2 == 0:
        raise ValueError(f"{op}: weight must hold an odd number of taps, got {weight.numel()}")
    check.device(op, "weight", weight, where)
    if mode != GateMode.MIX:
        return
    if alpha is None or beta is None:
        raise ValueError(f"{op}: mode 2 (mix) needs alpha and beta")
    for name, t in (("alpha", alpha), ("beta", beta)):
        check.tensor(op, name, t)
    if alpha.numel() != 1 or beta.numel() != 1:
        raise ValueError(f"{op}: alpha and beta must hold one value each")
    check.device(op, "alpha", alpha, where)
    check.device(op, "beta", beta, where)


def check_channel_rescale(x, gate, op: str = "channel_rescale") -> None:
    check.feature_map(op, "x", x)
    check.per_channel(op, "gate", gate, x)


def check_channel_attention(x, weight, alpha, beta, mode) -> None:
    op = "channel_attention"
    check.feature_map(op, "x", x)
    _check_gate_params(op, weight, alpha, beta, GateMode.check(op, mode), x.device)


def check_mlp_args(x, w1, b1, w2, b2, op: str = "channel_mlp_attention") -> None:
    """SE's MLP gate: w1 holds rd*C values with rd = w1.size(0), w2 C*rd, the optional biases
    rd (or b1 (N, rd), one row per sample) and C values, all floating and on x's device."""
    check.feature_map(op, "x", x)
    c = x.shape[1]
    for name, t in (("w1", w1), ("w2", w2)):
        check.tensor(op, name, t)
    if w1.dim() < 1 or w1.shape[0] < 1 or w1.numel() != w1.shape[0] * c:
        raise ValueError(f"{op}: w1 must hold (rd, C) = (rd, {c}) values, got shape {list(w1.shape)}")
    rd = w1.shape[0]
    if w2.dim() < 1 or w2.shape[0] != c or w2.numel() != c * rd:
        raise ValueError(f"{op}: w2 must hold (C, rd) = ({c}, {rd}) values, got shape {list(w2.shape)}")
    if b1 is not None:
        _check_b1(op, b1, rd, x)
    if b2 is not None:
        check.vector(op, "b2", b2, c, x.device, "C")
    for name, t in (("w1", w1), ("w2", w2)):
        check.device(op, name, t, x.device)


def _check_b1(op: str, b1, rd: int, x) -> None:
    """b1: rd values shared by every sample, or (N, rd), one row per sample; on x's device."""
    check.tensor(op, "b1", b1)
    if b1.numel() != rd and tuple(b1.shape) != (x.shape[0], rd):
        raise ValueError(f"{op}: b1 must hold rd = {rd} values or be (N, rd) = ({x.shape[0]}, {rd}), "
                         f"got shape {list(b1.shape)}")
    check.device(op, "b1", b1, x.device)


def b1_is_per_sample(b1, rd: int) -> bool:
    """Whether channel_mlp_attention's b1 is (N, rd), one row per sample, rather than rd shared
    values (with N = 1 both read alike)."""
    return b1 is not None and b1.numel() != rd


# ----------------------------------------------------------------------------------------
# Argument checks of the backward ops (worded as csrc/cpu/channel_gate.cpp's; the Triton ops
# use them)
# ----------------------------------------------------------------------------------------
def check_channel_pool_backward(grad_avg, grad_max, x, max, op: str = "channel_pool_backward") -> None:
    """x (N, C, H, W); grad_avg, max and (when given) grad_max (N, C) maps of x."""
    check.feature_map(op, "x", x)
    check.per_channel(op, "grad_avg", grad_avg, x)
    check.per_channel(op, "max", max, x)
    if grad_max is not None:
        check.per_channel(op, "grad_max", grad_max, x)


def check_channel_gate_backward(grad_gate, gate, avg, max, weight, alpha, beta, mode,
                                op: str = "channel_gate_backward") -> GateMode:
    """channel_gate's arguments, and grad_gate and gate shaped like avg in its dtype, on its
    device; returns mode as a GateMode."""
    mode = check_channel_gate(avg, max, weight, alpha, beta, mode, op)
    for name, t in (("grad_gate", grad_gate), ("gate", gate)):
        check.tensor(op, name, t)
    if not (grad_gate.shape == gate.shape == avg.shape and grad_gate.dtype == gate.dtype == avg.dtype):
        raise ValueError(f"{op}: grad_gate and gate must match avg's shape {list(avg.shape)} and dtype "
                         f"{check.dtype_name(avg.dtype)}")
    for name, t in (("grad_gate", grad_gate), ("gate", gate)):
        check.device(op, name, t, avg.device)
    return mode


def check_channel_rescale_backward(grad_y, x, gate, op: str = "channel_rescale_backward") -> None:
    """channel_rescale's arguments, and grad_y shaped like x in its dtype."""
    check_channel_rescale(x, gate, op)
    check.like_x(op, "grad_y", grad_y, x)


# ----------------------------------------------------------------------------------------
# Composites: the three ops in turn, for every namespace without a per-sample kernel
# ----------------------------------------------------------------------------------------
def mlp_gate(avg: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    """SE's gate on pooled (N, C) maps: `sigmoid(w2 @ relu(w1 @ avg + b1) + b2)` in avg's dtype;
    b1 holds rd values or is (N, rd)."""
    rd = w1.shape[0]
    acc = avg.dtype
    h = F.relu(F.linear(avg, w1.reshape(rd, -1).to(acc), None if b1 is None else _b1_rows(b1, rd).to(acc)))
    return torch.sigmoid(F.linear(h, w2.reshape(-1, rd).to(acc), None if b2 is None else b2.reshape(-1).to(acc)))


def _b1_rows(b1: torch.Tensor, rd: int) -> torch.Tensor:
    """b1 as (rd,) when shared, (N, rd) when per sample: F.linear's bias broadcasts either."""
    return b1.reshape(-1, rd) if b1_is_per_sample(b1, rd) else b1.reshape(rd)


def channel_attention_sequence(ops, x, weight, alpha, beta, mode):
    """channel_attention as pool, gate, rescale on the ops of namespace `ops`: (y, avg, max, gate)."""
    avg, max_ = ops.channel_pool(x)
    gate = ops.channel_gate(avg, max_, weight, alpha, beta, mode)
    return ops.channel_rescale(x, gate), avg, max_, gate


def channel_mlp_attention_sequence(ops, x, w1, b1, w2, b2):
    """channel_mlp_attention as pool, SE's MLP (torch ops), rescale on namespace `ops`: (y, avg, gate).
    Checks its arguments first: the ops it calls see neither w1, w2 nor the biases."""
    check_mlp_args(x, w1, b1, w2, b2)
    avg, _ = ops.channel_pool(x)
    gate = mlp_gate(avg, w1, b1, w2, b2)
    return ops.channel_rescale(x, gate), avg, gate


_COMPOSITES = {
    "channel_attention": Composite(
        "channel_attention(Tensor x, Tensor weight, Tensor? alpha, Tensor? beta, int mode) "
        "-> (Tensor y, Tensor avg, Tensor max, Tensor gate)",
        channel_attention_sequence),
    "channel_mlp_attention": Composite(
        "channel_mlp_attention(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2) "
        "-> (Tensor y, Tensor avg, Tensor gate)",
        channel_mlp_attention_sequence),
}


# ----------------------------------------------------------------------------------------
# The reference backend: the ops' signatures in plain PyTorch (differentiable by autograd)
# ----------------------------------------------------------------------------------------
class Reference:
    """channel_gate's ops in torch ops, as the `reference` backend runs them."""

    @staticmethod
    def channel_pool(x):
        acc = accumulate_dtype(x.dtype)
        return x.mean(dim=(2, 3), dtype=acc), x.amax(dim=(2, 3)).to(acc)

    @staticmethod
    def channel_gate(avg, max, weight, alpha, beta, mode):
        if mode == GateMode.AVG:
            f = avg
        elif mode == GateMode.MAX:
            f = max
        else:  # alpha and beta as 0-d values, whatever their one-element shape
            a, b = alpha.reshape(()).to(avg.dtype), beta.reshape(()).to(avg.dtype)
            f = 0.5 * (avg + max) + a * avg + b * max
        k = weight.numel()
        z = F.conv1d(f[:, None, :], weight.reshape(1, 1, k).to(avg.dtype), padding=(k - 1) // 2)
        return torch.sigmoid(z[:, 0, :])

    @staticmethod
    def channel_rescale(x, gate):
        y = (x.to(gate.dtype) * gate[:, :, None, None]).to(x.dtype)
        return y.contiguous(memory_format=memory_format_of(x))

    @staticmethod
    def channel_attention(x, weight, alpha, beta, mode):
        return channel_attention_sequence(Reference, x, weight, alpha, beta, mode)

    @staticmethod
    def channel_mlp_attention(x, w1, b1, w2, b2):
        return channel_mlp_attention_sequence(Reference, x, w1, b1, w2, b2)


# ----------------------------------------------------------------------------------------
# Fakes
# ----------------------------------------------------------------------------------------
def _per_channel(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[:2], dtype=accumulate_dtype(x.dtype))


def _fake_channel_pool(x):
    return _per_channel(x), _per_channel(x)


def _fake_channel_pool_backward(grad_avg, grad_max, x, max):
    return empty_like_layout(x)


def _fake_channel_gate(avg, max, weight, alpha, beta, mode):
    return torch.empty_like(avg)


def _fake_channel_gate_backward(grad_gate, gate, avg, max, weight, alpha, beta, mode):
    ab_dtype = alpha.dtype if mode == GateMode.MIX else avg.dtype
    scalar = avg.new_empty((), dtype=ab_dtype)
    return torch.empty_like(avg), torch.empty_like(avg), torch.empty_like(weight), scalar, scalar.clone()


def _fake_channel_rescale(x, gate):
    return empty_like_layout(x)


def _fake_channel_rescale_backward(grad_y, x, gate):
    return empty_like_layout(x), torch.empty_like(gate)


def _fake_channel_attention(x, weight, alpha, beta, mode):
    return empty_like_layout(x), _per_channel(x), _per_channel(x), _per_channel(x)


def _fake_channel_mlp_attention(x, w1, b1, w2, b2):
    return empty_like_layout(x), _per_channel(x), _per_channel(x)


_FAKES = check.fakes_that_check({
    "channel_pool": _fake_channel_pool,
    "channel_pool_backward": _fake_channel_pool_backward,
    "channel_gate": _fake_channel_gate,
    "channel_gate_backward": _fake_channel_gate_backward,
    "channel_rescale": _fake_channel_rescale,
    "channel_rescale_backward": _fake_channel_rescale_backward,
    "channel_attention": _fake_channel_attention,
    "channel_mlp_attention": _fake_channel_mlp_attention,
}, {
    "channel_pool": check_channel_pool,
    "channel_pool_backward": check_channel_pool_backward,
    "channel_gate": check_channel_gate,
    "channel_gate_backward": check_channel_gate_backward,
    "channel_rescale": check_channel_rescale,
    "channel_rescale_backward": check_channel_rescale_backward,
    "channel_attention": check_channel_attention,
    "channel_mlp_attention": check_mlp_args,
})


# ----------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------
def _mlp_gate_backward(grad_gate, avg, gate, w1, b1, w2, b2):
    """Gradients of `gate = sigmoid(w2 @ relu(w1 @ avg + b1) + b2)` (SE's MLP on (N, C) maps,
    in the accumulation dtype; b1 shared or (N, rd)): (grad_avg, grad_w1, grad_b1, grad_w2,
    grad_b2), each parameter gradient in its parameter's shape and dtype (a bias's is None if
    it is None)."""
    acc = avg.dtype
    rd, c = w1.shape[0], avg.shape[1]
    w1a, w2a = w1.reshape(rd, c).to(acc), w2.reshape(c, rd).to(acc)
    h_pre = avg @ w1a.T
    if b1 is not None:
        h_pre = h_pre + _b1_rows(b1, rd).to(acc)
    h = torch.relu(h_pre)
    dz = grad_gate * gate * (1 - gate)
    dh = torch.where(h_pre <= 0, 0.0, dz @ w2a)  # relu's gradient by torch's rule (docs/contract.md)
    grad_w1 = (dh.T @ avg).to(w1.dtype).reshape(w1.shape)
    grad_w2 = (dz.T @ h).to(w2.dtype).reshape(w2.shape)
    # A per-sample b1 (N, rd) gets each sample's own row; a shared one their sum.
    grad_b1 = None
    if b1 is not None:
        grad_b1 = (dh if b1_is_per_sample(b1, rd) else dh.sum(0)).to(b1.dtype).reshape(b1.shape)
    grad_b2 = None if b2 is None else dz.sum(0).to(b2.dtype).reshape(b2.shape)
    return dh @ w1a, grad_w1, grad_b1, grad_w2, grad_b2


def _mix_grads(grad_alpha: torch.Tensor, grad_beta: torch.Tensor, alpha, beta, has_mix: bool):
    """channel_gate_backward's 0-d grad_alpha and grad_beta in alpha's and beta's own shapes
    (e.g. (1,)), or None without the mix."""
    if not has_mix:
        return None, None
    return grad_alpha.reshape(alpha.shape), grad_beta.reshape(beta.shape)


def _mean_hw_grad(grad_avg: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mean_hw's gradient, (N, C, 1, 1) in x's dtype: grad_avg / HW on every pixel."""
    return (grad_avg / (x.shape[2] * x.shape[3])).to(x.dtype)[:, :, None, None]


def _register_autograd(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    def setup_pool(ctx: Any, inputs: tuple, output: tuple) -> None:
        (x,) = inputs
        ctx.save_for_backward(x, output[1])
        ctx.set_materialize_grads(False)  # an unused max then costs no tie-counting pass

    def backward_pool(ctx: Any, grad_avg: torch.Tensor | None, grad_max: torch.Tensor | None):
        x, max_ = ctx.saved_tensors
        if grad_max is None:
            # The mean alone spreads grad_avg / HW evenly: returned broadcast (stride 0), as
            # torch's own mean backward does, so no x-sized tensor is written here and
            # autograd adds it to x's other gradient in one pass (Bridge: the rescale's).
            if grad_avg is None:
                return None
            return _mean_hw_grad(grad_avg, x).expand(x.shape)
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
        grad_alpha, grad_beta = _mix_grads(grad_alpha, grad_beta, alpha, beta, ctx.has_mix)
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
        # Mode avg uses no max: skip the tie-counting pass. grad_x is ours: add in place, so
        # no third x-sized tensor is alive at the peak.
        grad_max_in = None if ctx.mode == GateMode.AVG else grad_max_in
        grad_x.add_(ops.channel_pool_backward(grad_avg_in, grad_max_in, x, max_))
        grad_alpha, grad_beta = _mix_grads(grad_alpha, grad_beta, alpha, beta, ctx.has_mix)
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
        grad_avg_in, grad_w1, grad_b1, grad_w2, grad_b2 = _mlp_gate_backward(grad_gate, avg, gate, w1, b1, w2, b2)
        # mean_hw's backward spreads grad_avg evenly: added in place, no third x-sized tensor.
        grad_x.add_(_mean_hw_grad(grad_avg_in, x))
        return (grad_x, grad_w1, grad_b1 if ctx.has_bias[0] else None,
                grad_w2, grad_b2 if ctx.has_bias[1] else None)

    for name, backward, setup in (
        ("channel_pool", backward_pool, setup_pool),
        ("channel_gate", backward_gate, setup_gate),
        ("channel_rescale", backward_rescale, setup_rescale),
        ("channel_attention", backward_attention, setup_attention),
        ("channel_mlp_attention", backward_mlp_attention, setup_mlp_attention),
    ):
        torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=setup)


REGISTRATION = Registration(_FAKES, _register_autograd, _COMPOSITES)
