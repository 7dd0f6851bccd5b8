"""shuffle_conv ops: fake implementations and autograd, for every backend's namespace, and
`shuffle_conv_bn_gate`, GAM's training-mode conv2 + BatchNorm + gate composed from them.

The C++/CUDA ops are `torch.ops.attnkernels.<name>` (schemas and math in csrc/attnkernels.cpp);
the Triton ops are `torch.ops.attnkernels_triton.<name>` (attnkernels/triton/shuffle_conv.py),
with the same names, signatures and math:

    out = shuffle_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift,
                       gate_x, out_scale, out_shift)   # raw z, or gate_x * sigmoid(out_scale*z + out_shift)
    grad_s, grad_weight, grad_bias, grad_in_scale, grad_in_shift = shuffle_conv_backward(
        grad_z, s, weight, groups, shuffle_groups, in_scale, in_shift)
    y = shuffle_conv_epilogue(z, gate_x, out_scale, out_shift)
    grad_z, grad_gate_x, grad_out_scale, grad_out_shift = shuffle_conv_epilogue_backward(
        grad_y, z, gate_x, out_scale, out_shift, mean, rstd)

Saved for backward: the conv's input s and the small parameters; a gated shuffle_conv also
saves gate_x and recomputes its z (one conv) in the backward instead of saving it.

`torch.ops.attnkernels_composite.shuffle_conv_bn_gate` is BatchNorm in training mode between
the conv and the gate: z's batch statistics are needed before the first output, so the
forward writes z (raw shuffle_conv), takes its statistics and runs the epilogue; the backward
recomputes z and passes the statistics' gradient through shuffle_conv_epilogue_backward. It
saves s, gate_x, the small parameters and the statistics: no full-size intermediate.

The conv itself runs either on the backend's own kernels ("direct") or on torch's conv2d
("library": oneDNN on CPU, cuDNN on GPUs) with the prologue and epilogue around it: see
`conv_algorithm`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import empty_like_layout, ops_for, register_once
from ..reference._base import memory_format_of
from ..reference.formulas import accumulate_dtype

FORWARD_OPS = ("shuffle_conv", "shuffle_conv_epilogue")
BACKWARD_OPS = ("shuffle_conv_backward", "shuffle_conv_epilogue_backward")
CONV_ALGORITHMS = ("direct", "library")

_registered: set[str] = set()


#: The smallest H*W at which "auto" runs a grouped conv on the direct CPU kernels.
CPU_DIRECT_MIN_PIXELS = 28 * 28


def conv_algorithm(conv: str, backend: str, groups: int, pixels: int) -> str:
    """"direct" or "library" for a requested `conv` ("auto", "direct", "library") on `backend`,
    for a conv with `groups` groups over H*W = `pixels`.

    "auto", from benchmarks/NOTES.md (session 10; GAM's convs, N=8, fp32, 2 cores): on CPU the
    direct conv wins grouped convs on large maps (GAM gc at 256x28x28: forward 9.5 vs 15.6 ms,
    forward+backward 37 vs 109 ms; oneDNN's grouped 7x7 backward is slow there) and loses
    elsewhere (groups 1, or maps of 14x14 and below with 512-2048 channels, where its weight
    gradient's per-chunk partials grow with C * C/r * 49). On GPUs cuDNN's tensor-core convs
    run bf16/fp16 where the direct kernels use CUDA cores.
    """
    if conv not in ("auto", *CONV_ALGORITHMS):
        raise ValueError(f"shuffle_conv: conv must be one of auto, {', '.join(CONV_ALGORITHMS)}; got {conv!r}")
    if conv != "auto":
        return conv
    if backend == "cpu" and groups > 1 and pixels >= CPU_DIRECT_MIN_PIXELS:
        return "direct"
    return "library"


# ----------------------------------------------------------------------------------------
# Fakes
# ----------------------------------------------------------------------------------------
def _raw_like(s: torch.Tensor, c_out: int) -> torch.Tensor:
    n, _, h, w = s.shape
    return torch.empty((n, c_out, h, w), dtype=accumulate_dtype(s.dtype), device=s.device,
                       memory_format=memory_format_of(s))


def _vector_grad(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if t is None:
        return like.new_empty((0,), dtype=accumulate_dtype(like.dtype))
    return t.new_empty((t.numel(),))


def _fake_shuffle_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x, out_scale, out_shift):
    return _raw_like(s, weight.shape[0]) if gate_x is None else empty_like_layout(gate_x)


def _fake_shuffle_conv_backward(grad_z, s, weight, groups, shuffle_groups, in_scale, in_shift):
    grad_bias = weight.new_empty((weight.shape[0],))
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    return empty_like_layout(s), grad_weight, grad_bias, _vector_grad(in_scale, s), _vector_grad(in_shift, s)


def _fake_epilogue(z, gate_x, out_scale, out_shift):
    return empty_like_layout(gate_x)


def _fake_epilogue_backward(grad_y, z, gate_x, out_scale, out_shift, mean, rstd):
    return empty_like_layout(z), empty_like_layout(gate_x), _vector_grad(out_scale, z), _vector_grad(out_shift, z)


_FAKES = {
    "shuffle_conv": _fake_shuffle_conv,
    "shuffle_conv_backward": _fake_shuffle_conv_backward,
    "shuffle_conv_epilogue": _fake_epilogue,
    "shuffle_conv_epilogue_backward": _fake_epilogue_backward,
}


# ----------------------------------------------------------------------------------------
# Autograd of the primitives
# ----------------------------------------------------------------------------------------
def _like(grad: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor | None:
    """A small parameter's gradient in its own shape, or None where there is no parameter."""
    return None if t is None else grad.reshape(t.shape).to(t.dtype)


def _register_autograd(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    def setup_conv(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x, out_scale, out_shift = inputs
        ctx.conv = (groups, shuffle_groups)
        ctx.save_for_backward(s, weight, bias, in_scale, in_shift, gate_x, out_scale, out_shift)

    def backward_conv(ctx: Any, grad_out: torch.Tensor):
        s, weight, bias, in_scale, in_shift, gate_x, out_scale, out_shift = ctx.saved_tensors
        groups, shuffle_groups = ctx.conv
        grad_gate = (None, None, None)
        if gate_x is not None:  # recompute z rather than save it; then the epilogue's backward
            z = ops.shuffle_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, None, None, None)
            grad_out, grad_gate_x, grad_scale, grad_shift = ops.shuffle_conv_epilogue_backward(
                grad_out, z, gate_x, out_scale, out_shift, None, None)
            grad_gate = (grad_gate_x, _like(grad_scale, out_scale), _like(grad_shift, out_shift))
        grad_s, grad_weight, grad_bias, grad_in_scale, grad_in_shift = ops.shuffle_conv_backward(
            grad_out, s, weight, groups, shuffle_groups, in_scale, in_shift)
        return (grad_s, grad_weight, _like(grad_bias, bias), None, None,
                _like(grad_in_scale, in_scale), _like(grad_in_shift, in_shift), *grad_gate)

    def setup_epilogue(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)  # z, gate_x, out_scale, out_shift

    def backward_epilogue(ctx: Any, grad_y: torch.Tensor):
        z, gate_x, out_scale, out_shift = ctx.saved_tensors
        grad_z, grad_gate_x, grad_scale, grad_shift = ops.shuffle_conv_epilogue_backward(
            grad_y, z, gate_x, out_scale, out_shift, None, None)
        return grad_z, grad_gate_x, _like(grad_scale, out_scale), _like(grad_shift, out_shift)

    torch.library.register_autograd(f"{namespace}::shuffle_conv", backward_conv, setup_context=setup_conv)
    torch.library.register_autograd(f"{namespace}::shuffle_conv_epilogue", backward_epilogue, setup_context=setup_epilogue)


def register(namespace: str, with_fakes: bool = True) -> None:
    """Give `namespace`'s shuffle_conv ops autograd (and fake impls); idempotent.

    Triton ops (torch.library.triton_op) trace their own fake implementation, so they
    take `with_fakes=False`.
    """
    register_once(namespace, with_fakes, _FAKES, _register_autograd, _registered)


# ----------------------------------------------------------------------------------------
# The library conv: torch's conv2d with the prologue in torch ops (on the small input)
# ----------------------------------------------------------------------------------------
def library_input(s, shuffle_groups, in_scale, in_shift, dtype) -> torch.Tensor:
    """The conv's input u for torch's conv2d, in `dtype`: s itself when there is no prologue
    and no shuffle; else relu(affine(s)) shuffled (GAM's conv2 input: rd channels, small)."""
    if in_scale is None and shuffle_groups == 1:
        return s.to(dtype)
    acc = accumulate_dtype(s.dtype)
    n, c, h, w = s.shape
    u = s.to(acc)
    if in_scale is not None:
        u = F.relu(u * in_scale.reshape(1, c, 1, 1).to(acc) + in_shift.reshape(1, c, 1, 1).to(acc))
    if shuffle_groups > 1:
        u = u.view(n, shuffle_groups, c // shuffle_groups, h, w).transpose(1, 2).reshape(n, c, h, w)
    return u.to(dtype)


def library_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, dtype) -> torch.Tensor:
    """The raw z = conv(u) + bias on torch's conv2d (oneDNN / cuDNN) in `dtype`."""
    u = library_input(s, shuffle_groups, in_scale, in_shift, dtype)
    b = None if bias is None else bias.reshape(-1).to(dtype)
    return F.conv2d(u, weight.to(dtype), b, padding=(weight.shape[-1] - 1) // 2, groups=groups)


def library_conv_backward(grad_z, s, weight, groups, shuffle_groups, in_scale, in_shift, dtype):
    """shuffle_conv_backward's outputs for the library conv: aten's convolution_backward for the
    GEMMs, the prologue's backward in torch ops on the small input (no autograd graph: this
    runs inside a registered backward, which torch.compile traces)."""
    u = library_input(s, shuffle_groups, in_scale, in_shift, dtype)
    p = (weight.shape[-1] - 1) // 2
    grad_u, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_z.to(dtype), u, weight.to(dtype), [weight.shape[0]], [1, 1], [p, p], [1, 1], False, [0, 0], groups,
        [True, True, True])
    acc = accumulate_dtype(s.dtype)
    n, c, h, w = s.shape
    du = grad_u.to(acc)
    if shuffle_groups > 1:  # the inverse permutation: view as (C/g, g), swap back
        du = du.view(n, c // shuffle_groups, shuffle_groups, h, w).transpose(1, 2).reshape(n, c, h, w)
    grad_in_scale = grad_in_shift = None
    if in_scale is not None:
        a, b = in_scale.reshape(1, c, 1, 1).to(acc), in_shift.reshape(1, c, 1, 1).to(acc)
        sf = s.to(acc)
        du = du * (sf * a + b > 0)
        grad_in_scale, grad_in_shift = (du * sf).sum((0, 2, 3)), du.sum((0, 2, 3))
        du = du * a
    grad_s = du.to(s.dtype).contiguous(memory_format=memory_format_of(s))
    return grad_s, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), grad_in_scale, grad_in_shift


# ----------------------------------------------------------------------------------------
# shuffle_conv_bn_gate: conv + BatchNorm (batch statistics) + sigmoid gate, for training
# ----------------------------------------------------------------------------------------
def _batch_affine(mean, var, bn_weight, bn_bias, eps):
    """BatchNorm folded to `scale * z + shift` from statistics (mean, var): (scale, shift, rstd)."""
    rstd = torch.rsqrt(var + eps)
    scale = rstd if bn_weight is None else rstd * bn_weight.reshape(-1).to(rstd.dtype)
    shift = -mean * scale
    if bn_bias is not None:
        shift = shift + bn_bias.reshape(-1).to(rstd.dtype)
    return scale, shift, rstd


def _raw_conv(ops, library, s, weight, bias, groups, shuffle_groups, in_scale, in_shift, dtype):
    if library:
        return library_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, dtype)
    return ops.shuffle_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, None, None, None)


@torch.library.custom_op("attnkernels_composite::shuffle_conv_bn_gate", mutates_args=())
def shuffle_conv_bn_gate(
    s: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    shuffle_groups: int,
    in_scale: torch.Tensor | None,
    in_shift: torch.Tensor | None,
    gate_x: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    bn_mean: torch.Tensor | None,
    bn_var: torch.Tensor | None,
    eps: float,
    backend: str,
    library: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`y = gate_x * sigmoid(bn(z))`, z = shuffle_conv's raw output, bn with z's batch
    statistics (or, given, bn_mean and bn_var: eval mode with running statistics).

    Returns (y, mean, var): the statistics used (C_out values, acc; z's biased batch
    statistics for the caller's running-stat update); they carry no gradient. `backend` names
    whose primitives run ("cpu", "cuda", "triton"); `library` runs the conv on torch's conv2d
    in gate_x's dtype.
    """
    ops = ops_for(backend)
    z = _raw_conv(ops, library, s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x.dtype)
    var, mean = _stats(z) if bn_mean is None else (bn_var.to(accumulate_dtype(z.dtype)), bn_mean.to(accumulate_dtype(z.dtype)))
    scale, shift, _ = _batch_affine(mean, var, bn_weight, bn_bias, eps)
    return ops.shuffle_conv_epilogue(z, gate_x, scale, shift), mean.clone(), var.clone()


def _stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z's per-channel biased variance and mean over (N, H, W), in acc(z): the mean, then the
    centred squares (two passes, no E[z^2] - mean^2 cancellation). Sums over each (n, c) row
    of H*W first: 5x faster on CPU than torch.var_mean over dims (0, 2, 3) (0.9 vs 4.7 ms
    at 8x256x28x28 fp32)."""
    n, c, h, w = z.shape
    rows = z.to(accumulate_dtype(z.dtype)).reshape(n, c, h * w)
    count = n * h * w
    mean = rows.sum(2).sum(0) / count
    centred = rows - mean[None, :, None]
    return (centred * centred).sum(2).sum(0) / count, mean


@shuffle_conv_bn_gate.register_fake
def _(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x, bn_weight, bn_bias, bn_mean, bn_var, eps, backend,
      library):
    stat = s.new_empty((weight.shape[0],), dtype=accumulate_dtype(s.dtype))
    return empty_like_layout(gate_x), stat, torch.empty_like(stat)


def _setup_bn_gate(ctx: Any, inputs: tuple, output: tuple) -> None:
    (s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x, bn_weight, bn_bias, bn_mean, _bn_var, eps, backend,
     library) = inputs
    _y, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.args = (groups, shuffle_groups, eps, backend, library, bn_mean is None)
    ctx.save_for_backward(s, weight, bias, in_scale, in_shift, gate_x, bn_weight, bn_bias, mean, var)


def _backward_bn_gate(ctx: Any, grad_y: torch.Tensor, _grad_mean, _grad_var):
    s, weight, bias, in_scale, in_shift, gate_x, bn_weight, bn_bias, mean, var = ctx.saved_tensors
    groups, shuffle_groups, eps, backend, library, batch_stats = ctx.args
    ops = ops_for(backend)
    z = _raw_conv(ops, library, s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x.dtype)
    scale, shift, rstd = _batch_affine(mean, var, bn_weight, bn_bias, eps)
    # With batch statistics grad_z carries their gradient too (mean and rstd given):
    # BatchNorm's training backward. Running statistics are constants.
    stats = (mean, rstd) if batch_stats else (None, None)
    grad_z, grad_gate_x, grad_scale, grad_shift = ops.shuffle_conv_epilogue_backward(
        grad_y, z, gate_x, scale, shift, *stats)
    # d/d bn_weight of scale * z + shift = rstd * (z - mean): sum dpre * (z - mean) * rstd.
    grad_bn_weight = _like((grad_scale - mean * grad_shift) * rstd, bn_weight)
    grad_bn_bias = _like(grad_shift, bn_bias)
    if library:
        conv_grads = library_conv_backward(grad_z, s, weight, groups, shuffle_groups, in_scale, in_shift, gate_x.dtype)
    else:
        conv_grads = ops.shuffle_conv_backward(grad_z, s, weight, groups, shuffle_groups, in_scale, in_shift)
    grad_s, grad_weight, grad_bias, grad_in_scale, grad_in_shift = conv_grads
    return (grad_s, grad_weight, _like(grad_bias, bias), None, None, _like(grad_in_scale, in_scale),
            _like(grad_in_shift, in_shift), grad_gate_x, grad_bn_weight, grad_bn_bias, None, None, None, None, None)


shuffle_conv_bn_gate.register_autograd(_backward_bn_gate, setup_context=_setup_bn_gate)
