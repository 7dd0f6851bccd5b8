"""shuffle_conv hot path: GAM's grouped 7x7 convs read through the channel shuffle.

    z1 = shuffle_conv(x1, conv1.weight, conv1.bias, g)    # raw grouped conv (acc dtype)
    y  = shuffle_conv(z1, conv2.weight, conv2.bias, g, g, in_scale, in_shift,
                      gate_x=x1, out_scale=..., out_shift=...)   # BN1+ReLU+shuffle on load,
                                                                 # BN2+sigmoid+multiply epilogue
    y, mean, var = shuffle_conv_bn_gate(...)              # the same with BN2's batch statistics

The ops (schemas and math in csrc/shuffle_conv_ops.cpp; kernels in csrc/cpu/shuffle_conv.cpp,
csrc/cuda/shuffle_conv.cu and attnkernels/triton/shuffle_conv.py):

    out = shuffle_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift,
                       gate_x, out_scale, out_shift)   # raw z, or gate_x * sigmoid(out_scale*z + out_shift)
    grad_s, grad_weight, grad_bias, grad_in_scale, grad_in_shift = shuffle_conv_backward(
        grad_z, s, weight, groups, shuffle_groups, in_scale, in_shift)
    y = shuffle_conv_epilogue(z, gate_x, out_scale, out_shift)
    grad_z, grad_gate_x, grad_out_scale, grad_out_shift = shuffle_conv_epilogue_backward(
        grad_y, z, gate_x, out_scale, out_shift, mean, rstd)

Saved for backward: the conv's input s and the small parameters; a gated shuffle_conv also
saves gate_x and recomputes its z (one conv) in the backward instead of saving it.

`shuffle_conv_bn_gate` is a composite op (written here once, registered into each namespace):
BatchNorm in training mode between the conv and the gate. z's batch statistics are needed
before the first output, so the forward writes z (raw shuffle_conv), takes its statistics and
runs the epilogue; the backward recomputes z and passes the statistics' gradient through
shuffle_conv_epilogue_backward. It saves s, gate_x, the small parameters and the statistics:
no full-size intermediate.

The conv itself runs either on the backend's own kernels ("direct") or on torch's conv2d
("library": oneDNN on CPU, cuDNN on GPUs) with the prologue and epilogue around it: see
`conv_algorithm`.
"""
from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .. import budget, choose
from ..backend import select
from ..reference._base import memory_format_of
from ..reference.formulas import accumulate_dtype
from . import _checks as check
from ._common import Composite, Registration, backend_ops, empty_like_layout, fold_batch_norm

HOT_PATH = "shuffle_conv"

#: The public functions (re-exported by attnkernels.functional).
__all__ = ["ConvAlgorithm", "shuffle_conv", "shuffle_conv_bn_gate"]


class ConvAlgorithm(enum.IntEnum):
    """How a shuffle_conv runs its conv: the backend's own kernels ("direct"), or torch's
    conv2d (oneDNN / cuDNN) with the shuffle, prologue and epilogue fused around it ("library").
    shuffle_conv_bn_gate's `conv` argument takes the integer."""

    DIRECT = 0
    LIBRARY = 1


CONV_ALGORITHMS = tuple(a.name.lower() for a in ConvAlgorithm)

#: The smallest H*W at which "auto" runs a grouped conv on the direct CPU kernels.
CPU_DIRECT_MIN_PIXELS = 28 * 28


def conv_algorithm(conv: str, backend: str, groups: int, pixels: int) -> ConvAlgorithm:
    """The algorithm for a requested `conv` ("auto", "direct", "library") on `backend`, for a
    conv with `groups` groups over H*W = `pixels`.

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
        return ConvAlgorithm[conv.upper()]
    if backend == "cpu" and groups > 1 and pixels >= CPU_DIRECT_MIN_PIXELS:
        return ConvAlgorithm.DIRECT
    return ConvAlgorithm.LIBRARY


# As tuples and a dict: torch 2.11's dynamo cannot iterate an Enum class while tracing.
_ALGORITHMS = tuple(ConvAlgorithm)
_NAMES = {a: a.name.lower() for a in ConvAlgorithm}

#: What "auto" chooses between by measurement (attnkernels.choose): the two algorithms on the
#: chosen backend, and the eager composition of torch ops (the reference backend's ops).
EAGER = "eager"


def conv_plan(site: str, conv: str, s: torch.Tensor, weight: torch.Tensor, groups: int, shuffle_groups: int,
              run: Callable[..., Any], args: tuple, variants: dict[str, Callable[..., Any]] | None = None
              ) -> Callable[..., Any]:
    """The function that runs a shuffle_conv op at `site` as `fn(*args)`: `run(ops, algorithm,
    *args)` with an explicit `conv`, or on the reference backend, as asked; for "auto", chosen by
    `attnkernels.choose` among direct, library and eager (the reference backend's ops), the
    static rule (`conv_algorithm`) first, which wins ties and serves when nothing is measured.
    `variants` (suffix -> a function like `run`) adds "<algorithm>+<suffix>" candidates."""
    backend = select(HOT_PATH, s.device)
    ops = backend_ops(HOT_PATH, s.device, Reference)
    static = conv_algorithm(conv, backend, groups, s.shape[2] * s.shape[3])
    if conv != "auto" or ops is Reference:
        return functools.partial(run, ops, static)
    order = (static, *(a for a in _ALGORITHMS if a != static))
    runs = {_NAMES[a]: functools.partial(run, ops, a) for a in order}
    for suffix, variant in (variants or {}).items():
        runs.update({f"{_NAMES[a]}+{suffix}": functools.partial(variant, ops, a) for a in order})
    runs[EAGER] = functools.partial(run, Reference, ConvAlgorithm.LIBRARY)
    key = (backend, s.dtype, tuple(s.shape), memory_format_of(s), tuple(weight.shape), groups, shuffle_groups,
           *(t is not None for t in args[3:]), choose.autograd_records(args), *sorted(variants or ()))
    return choose.pick(site, key, runs, _NAMES[static], args)


# ----------------------------------------------------------------------------------------
# Public functions (attnkernels.functional)
# ----------------------------------------------------------------------------------------
def shuffle_conv(
    s: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    groups: int = 1,
    shuffle_groups: int = 1,
    in_scale: torch.Tensor | None = None,
    in_shift: torch.Tensor | None = None,
    gate_x: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    out_shift: torch.Tensor | None = None,
    conv: str = "auto",
) -> torch.Tensor:
    """A grouped k x k conv (stride 1, same padding) of s read through the channel shuffle
    (`shuffle_groups`; 1 for none) and an optional `relu(in_scale * s + in_shift)` on load.

    Without `gate_x`: the raw output `z = conv + bias` (N, C_out, H, W) in the accumulation
    dtype of s. With `gate_x`, `out_scale`, `out_shift`: `gate_x * sigmoid(out_scale * z +
    out_shift)` in gate_x's dtype (GAM's last step with BN2 folded); z is never written.
    `conv` picks the conv: "direct" (the backend's own kernels), "library" (torch's conv2d,
    oneDNN or cuDNN, with the prologue and epilogue around it), or "auto" (per backend, see
    `conv_algorithm`).
    """
    check_shuffle_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x, out_scale, out_shift)

    def run(ops, algorithm, s, weight, bias, in_scale, in_shift, gate_x, out_scale, out_shift):
        if ops is Reference or algorithm == ConvAlgorithm.DIRECT:
            return ops.shuffle_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x, out_scale,
                                    out_shift)
        dtype = s.dtype if gate_x is None else gate_x.dtype
        z = library_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, dtype)
        if gate_x is None:
            return z.to(accumulate_dtype(s.dtype))
        return ops.shuffle_conv_epilogue(z, gate_x, out_scale, out_shift)

    args = (s, weight, bias, in_scale, in_shift, gate_x, out_scale, out_shift)
    return conv_plan("shuffle_conv", conv, s, weight, groups, shuffle_groups, run, args)(*args)


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
    eps: float = 1e-5,
    conv: str = "auto",
    bn_mean: torch.Tensor | None = None,
    bn_var: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`shuffle_conv`, then BatchNorm, then the gate:
    `y = gate_x * sigmoid((z - mean) / sqrt(var + eps) * bn_weight + bn_bias)` (GAM's last step).

    mean and var are the batch statistics of z (training) unless `bn_mean` and `bn_var`
    (running statistics: eval) are given. Returns (y, mean, var), the statistics used, per
    channel in the accumulation dtype (z's biased batch statistics feed the running-stat
    update; no gradient flows through them as outputs, while y's gradient includes the batch
    statistics'). Saves no full-size intermediate: the backward recomputes z.
    """
    check_shuffle_conv_bn_gate(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x, bn_weight, bn_bias,
                               bn_mean, bn_var)

    def run(ops, algorithm, s, weight, bias, in_scale, in_shift, gate_x, bn_weight, bn_bias, bn_mean, bn_var):
        return ops.shuffle_conv_bn_gate(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x,
                                        bn_weight, bn_bias, bn_mean, bn_var, float(eps), int(algorithm))

    def run_saving_z(ops, algorithm, s, weight, bias, in_scale, in_shift, gate_x, bn_weight, bn_bias, bn_mean,
                     bn_var):
        # The op's steps as separate differentiable ops: autograd saves the conv's output z
        # (a full-size map in acc) where the op recomputes it in its backward (one conv).
        return shuffle_conv_bn_gate_sequence(ops, s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x,
                                             bn_weight, bn_bias, bn_mean, bn_var, float(eps), algorithm)

    args = (s, weight, bias, in_scale, in_shift, gate_x, bn_weight, bn_bias, bn_mean, bn_var)
    # Saving z trades memory for one conv in the backward: a candidate only when there is a
    # backward, and when the extra-memory budget (attnkernels.budget) holds z, (N, C_out, H, W)
    # in acc(s).
    z_bytes = s.shape[0] * weight.shape[0] * s.shape[2] * s.shape[3] * accumulate_dtype(s.dtype).itemsize
    saving_z_allowed = choose.autograd_records(args) and budget.allows(z_bytes)
    variants = {"save_z": run_saving_z} if saving_z_allowed else None
    return conv_plan("shuffle_conv_bn_gate", conv, s, weight, groups, shuffle_groups, run, args, variants)(*args)


# ----------------------------------------------------------------------------------------
# Argument checks (the reference backend and the Triton ops share them; the C++ ops check the
# same rules in csrc/include/attnkernels/shuffle_conv.h, in the same words)
# ----------------------------------------------------------------------------------------
def check_shuffle_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x, out_scale, out_shift,
                       op: str = "shuffle_conv") -> None:
    """s (N, C_in, H, W); weight (C_out, C_in/groups, k, k), k odd; groups divides C_in and
    C_out; shuffle_groups divides C_in; bias C_out values; in_scale/in_shift both or neither,
    C_in values; gate_x, out_scale, out_shift all or none (see `check_epilogue`)."""
    check.feature_map(op, "s", s)
    c_in = s.shape[1]
    for name, g in (("groups", groups), ("shuffle_groups", shuffle_groups)):
        if isinstance(g, bool) or not isinstance(g, int) or g < 1 or c_in % g:
            raise ValueError(f"{op}: {name} must be a positive divisor of s's {c_in} channels, got {g}")
    check.tensor(op, "weight", weight)
    w = weight.shape
    if weight.dim() != 4 or w[0] < 1 or w[0] % groups or w[1] != c_in // groups or w[2] != w[3] or w[2] % 2 == 0:
        raise ValueError(f"{op}: weight must have shape (C_out, C_in / groups, k, k) = (C_out, {c_in // groups}, k, k) "
                         f"with k odd and groups = {groups} dividing C_out, got {list(w)}")
    check.device(op, "weight", weight, s.device)
    c_out = w[0]
    if bias is not None:
        check.vector(op, "bias", bias, c_out, s.device, "C_out")
    if check.together(op, in_scale=in_scale, in_shift=in_shift):
        check.vector(op, "in_scale", in_scale, c_in, s.device, "C_in")
        check.vector(op, "in_shift", in_shift, c_in, s.device, "C_in")
    if check.together(op, gate_x=gate_x, out_scale=out_scale, out_shift=out_shift):
        check_epilogue(gate_x, out_scale, out_shift, (s.shape[0], c_out, *s.shape[2:]), s.device, op)


def check_epilogue(gate_x, out_scale, out_shift, out_shape, where: torch.device, op: str) -> None:
    """gate_x (N, C_out, H, W) a feature map on the device; out_scale, out_shift C_out values."""
    check.feature_dtype(op, "gate_x", gate_x)
    if tuple(gate_x.shape) != tuple(out_shape):
        raise ValueError(f"{op}: gate_x must have the output's shape (N, C_out, H, W) = {list(out_shape)}, "
                         f"got {list(gate_x.shape)}")
    check.device(op, "gate_x", gate_x, where)
    check.vector(op, "out_scale", out_scale, out_shape[1], where, "C_out")
    check.vector(op, "out_shift", out_shift, out_shape[1], where, "C_out")


def check_shuffle_conv_epilogue(z, gate_x, out_scale, out_shift, op: str = "shuffle_conv_epilogue") -> None:
    """z (N, C, H, W) and the epilogue's arguments for it (`check_epilogue`)."""
    check.feature_map(op, "z", z)
    check_epilogue(gate_x, out_scale, out_shift, tuple(z.shape), z.device, op)


def check_shuffle_conv_bn_gate(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x, bn_weight,
                               bn_bias, bn_mean, bn_var, eps: float = 1e-5, conv: int = ConvAlgorithm.DIRECT,
                               op: str = "shuffle_conv") -> None:
    """The raw conv's arguments (`check_shuffle_conv`, no epilogue); gate_x the conv output's
    shape; BatchNorm's weight, bias and running statistics C_out values; conv a ConvAlgorithm;
    batch statistics (no running ones) over more than one value per channel, as BatchNorm asks.
    The op shuffle_conv_bn_gate's arguments in its schema's order."""
    check_shuffle_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, None, None, None, op)
    if isinstance(conv, bool) or not isinstance(conv, int) or conv not in ConvAlgorithm._value2member_map_:
        raise ValueError(f"{op}: conv must be 0 (direct) or 1 (library), got {conv}")
    c_out = weight.shape[0]
    check.feature_dtype(op, "gate_x", gate_x)
    want = (s.shape[0], c_out, *s.shape[2:])
    if tuple(gate_x.shape) != want:
        raise ValueError(f"{op}: gate_x must have the output's shape (N, C_out, H, W) = {list(want)}, "
                         f"got {list(gate_x.shape)}")
    check.device(op, "gate_x", gate_x, s.device)
    if not check.together(op, bn_mean=bn_mean, bn_var=bn_var):
        check_batch_statistics(s)
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("bn_mean", bn_mean), ("bn_var", bn_var)):
        if t is not None:
            check.vector(op, name, t, c_out, s.device, "C_out")


def check_batch_statistics(s: torch.Tensor, op: str = "shuffle_conv_bn_gate") -> None:
    """Batch statistics over N * H * W values per channel need more than one, as BatchNorm's."""
    n, _, h, w = s.shape
    if n * h * w == 1:
        raise ValueError(f"{op}: batch statistics need more than one value per channel (N * H * W = 1); "
                         "pass bn_mean and bn_var, or a larger batch")


# ----------------------------------------------------------------------------------------
# Argument checks of the backward ops (worded as csrc/cpu/shuffle_conv.cpp's; the Triton ops
# use them)
# ----------------------------------------------------------------------------------------
def check_shuffle_conv_backward(grad_z, s, weight, groups, shuffle_groups, in_scale, in_shift,
                                op: str = "shuffle_conv_backward") -> None:
    """The raw conv's arguments (no bias, no epilogue), and grad_z a floating (N, C_out, H, W)
    map on s's device."""
    check_shuffle_conv(s, weight, None, groups, shuffle_groups, in_scale, in_shift, None, None, None, op)
    check.feature_map(op, "grad_z", grad_z)
    n, _, h, w = s.shape
    c_out = weight.shape[0]
    if tuple(grad_z.shape) != (n, c_out, h, w):
        raise ValueError(f"{op}: grad_z must have the output's shape (N, C_out, H, W) = ({n}, {c_out}, {h}, {w}), "
                         f"got {list(grad_z.shape)}")
    check.device(op, "grad_z", grad_z, s.device)


def check_shuffle_conv_epilogue_backward(grad_y, z, gate_x, out_scale, out_shift, mean, rstd,
                                         op: str = "shuffle_conv_epilogue_backward") -> None:
    """z (N, C, H, W) with the epilogue's arguments for it (`check_epilogue`); grad_y a floating
    map of z's shape on its device; mean and rstd both or neither, C values each."""
    check_shuffle_conv_epilogue(z, gate_x, out_scale, out_shift, op)
    check.feature_map(op, "grad_y", grad_y)
    if grad_y.shape != z.shape:
        raise ValueError(f"{op}: grad_y must have z's shape {list(z.shape)}, got {list(grad_y.shape)}")
    check.device(op, "grad_y", grad_y, z.device)
    if check.together(op, mean=mean, rstd=rstd):
        c = z.shape[1]
        check.vector(op, "mean", mean, c, z.device, "C")
        check.vector(op, "rstd", rstd, c, z.device, "C")


# ----------------------------------------------------------------------------------------
# The library conv: torch's conv2d with the prologue in torch ops (on the small input)
# ----------------------------------------------------------------------------------------
def library_input(s, shuffle_groups, in_scale, in_shift, dtype) -> torch.Tensor:
    """The conv's input u for torch's conv2d, in `dtype`: s itself when there is no prologue
    and no shuffle; else relu(affine(s)) shuffled (GAM's conv2 input: rd channels, small).
    Read from s in s's layout (docs/contract.md), so that torch's autograd, which differentiates
    this path when there is no epilogue, gives grad s in it too: conv2d and the elementwise ops
    would follow a sliced channels_last view's strides."""
    s = s.contiguous(memory_format=memory_format_of(s))  # a copy only for a view dense in neither
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
    """The raw z = conv(u) + bias on torch's conv2d (oneDNN / cuDNN) in `dtype`, in s's layout
    (conv2d keeps channels_last for a sliced channels_last view; the contract says NCHW)."""
    u = library_input(s, shuffle_groups, in_scale, in_shift, dtype)
    b = None if bias is None else bias.reshape(-1).to(dtype)
    z = F.conv2d(u, weight.to(dtype), b, padding=(weight.shape[-1] - 1) // 2, groups=groups)
    return z.contiguous(memory_format=memory_format_of(s))


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
        du = torch.where(sf * a + b <= 0, 0.0, du)  # relu's gradient by torch's rule (docs/contract.md)
        grad_in_scale, grad_in_shift = (du * sf).sum((0, 2, 3)), du.sum((0, 2, 3))
        du = du * a
    grad_s = du.to(s.dtype).contiguous(memory_format=memory_format_of(s))
    return grad_s, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), grad_in_scale, grad_in_shift


# ----------------------------------------------------------------------------------------
# shuffle_conv_bn_gate: conv + BatchNorm (batch statistics) + sigmoid gate, for training
# ----------------------------------------------------------------------------------------
def _raw_conv(ops, algorithm, s, weight, bias, groups, shuffle_groups, in_scale, in_shift, dtype):
    if algorithm == ConvAlgorithm.LIBRARY:
        return library_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, dtype)
    return ops.shuffle_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, None, None, None)


def shuffle_conv_bn_gate_sequence(ops, s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x,
                                  bn_weight, bn_bias, bn_mean, bn_var, eps, conv):
    """shuffle_conv_bn_gate on the ops of namespace `ops`: the raw conv (algorithm `conv`, a
    ConvAlgorithm), z's statistics (or the running ones given), BN folded into the epilogue.
    Returns (y, mean, var): the statistics used (C_out values, acc)."""
    if bn_mean is None:
        check_batch_statistics(s)
    z = _raw_conv(ops, conv, s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x.dtype)
    acc = accumulate_dtype(z.dtype)
    var, mean = _stats(z) if bn_mean is None else (bn_var.to(acc), bn_mean.to(acc))
    scale, shift, _ = fold_batch_norm(mean, var, bn_weight, bn_bias, eps)
    return ops.shuffle_conv_epilogue(z, gate_x, scale, shift), mean.clone(), var.clone()


_COMPOSITES = {
    "shuffle_conv_bn_gate": Composite(
        "shuffle_conv_bn_gate(Tensor s, Tensor weight, Tensor? bias, int groups, int shuffle_groups, "
        "Tensor? in_scale, Tensor? in_shift, Tensor gate_x, Tensor? bn_weight, Tensor? bn_bias, Tensor? bn_mean, "
        "Tensor? bn_var, float eps, int conv) -> (Tensor y, Tensor mean, Tensor var)",
        shuffle_conv_bn_gate_sequence),
}


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

# ----------------------------------------------------------------------------------------
# The reference backend: the ops' signatures in plain PyTorch (differentiable by autograd)
# ----------------------------------------------------------------------------------------
class Reference:
    """shuffle_conv's ops in torch ops (acc(s)), as the `reference` backend runs them; its conv
    is torch's conv2d whatever the algorithm asked for."""

    @staticmethod
    def shuffle_conv(s, weight, bias, groups, shuffle_groups, in_scale=None, in_shift=None, gate_x=None,
                     out_scale=None, out_shift=None):
        acc = accumulate_dtype(s.dtype)
        u = library_input(s, shuffle_groups, in_scale, in_shift, acc)
        k = weight.shape[-1]
        z = F.conv2d(u, weight.to(acc), None if bias is None else bias.reshape(-1).to(acc), padding=(k - 1) // 2,
                     groups=groups)
        if gate_x is None:
            return z.contiguous(memory_format=memory_format_of(s))
        return Reference.shuffle_conv_epilogue(z, gate_x, out_scale, out_shift)

    @staticmethod
    def shuffle_conv_epilogue(z, gate_x, out_scale, out_shift):
        """`gate_x * sigmoid(out_scale * z + out_shift)` in acc(z), in gate_x's dtype and layout."""
        acc = accumulate_dtype(z.dtype)
        c = z.shape[1]
        pre = z.to(acc) * out_scale.reshape(1, c, 1, 1).to(acc) + out_shift.reshape(1, c, 1, 1).to(acc)
        y = gate_x.to(acc) * torch.sigmoid(pre)
        return y.to(gate_x.dtype).contiguous(memory_format=memory_format_of(gate_x))

    @staticmethod
    def shuffle_conv_bn_gate(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x, bn_weight, bn_bias,
                             bn_mean, bn_var, eps, conv):
        z = Reference.shuffle_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift)
        if bn_mean is None:  # as BatchNorm: the sum over count (torch.var_mean's running update
            mean = z.mean((0, 2, 3))  # makes the mean of [inf, 0.3, inf] NaN), then centred squares
            var = (z - mean[None, :, None, None]).square().mean((0, 2, 3))
        else:
            var, mean = bn_var.to(z.dtype), bn_mean.to(z.dtype)
        w, b = (None if t is None else t.to(z.dtype) for t in (bn_weight, bn_bias))
        running = bn_mean is not None
        y = F.batch_norm(z, mean.detach() if running else None, var.detach() if running else None, w, b,
                         training=not running, eps=eps)
        y = (gate_x.to(z.dtype) * torch.sigmoid(y)).to(gate_x.dtype).contiguous(memory_format=memory_format_of(gate_x))
        return y, mean.detach(), var.detach()


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


def _fake_bn_gate(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x, bn_weight, bn_bias, bn_mean,
                  bn_var, eps, conv):
    stat = s.new_empty((weight.shape[0],), dtype=accumulate_dtype(s.dtype))
    return empty_like_layout(gate_x), stat, torch.empty_like(stat)


_FAKES = check.fakes_that_check({
    "shuffle_conv_bn_gate": _fake_bn_gate,
    "shuffle_conv": _fake_shuffle_conv,
    "shuffle_conv_backward": _fake_shuffle_conv_backward,
    "shuffle_conv_epilogue": _fake_epilogue,
    "shuffle_conv_epilogue_backward": _fake_epilogue_backward,
}, {
    "shuffle_conv_bn_gate": check_shuffle_conv_bn_gate,
    "shuffle_conv": check_shuffle_conv,
    "shuffle_conv_backward": check_shuffle_conv_backward,
    "shuffle_conv_epilogue": check_shuffle_conv_epilogue,
    "shuffle_conv_epilogue_backward": check_shuffle_conv_epilogue_backward,
})



# ----------------------------------------------------------------------------------------
# Autograd
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

    def setup_bn_gate(ctx: Any, inputs: tuple, output: tuple) -> None:
        (s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x, bn_weight, bn_bias, bn_mean, _bn_var, eps,
         conv) = inputs
        _y, mean, var = output
        ctx.mark_non_differentiable(mean, var)
        ctx.args = (groups, shuffle_groups, eps, conv, bn_mean is None)
        ctx.save_for_backward(s, weight, bias, in_scale, in_shift, gate_x, bn_weight, bn_bias, mean, var)

    def backward_bn_gate(ctx: Any, grad_y: torch.Tensor, _grad_mean, _grad_var):
        s, weight, bias, in_scale, in_shift, gate_x, bn_weight, bn_bias, mean, var = ctx.saved_tensors
        groups, shuffle_groups, eps, conv, batch_stats = ctx.args
        z = _raw_conv(ops, conv, s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x.dtype)
        scale, shift, rstd = fold_batch_norm(mean, var, bn_weight, bn_bias, eps)
        # With batch statistics grad_z carries their gradient too (mean and rstd given):
        # BatchNorm's training backward. Running statistics are constants.
        stats = (mean, rstd) if batch_stats else (None, None)
        grad_z, grad_gate_x, grad_scale, grad_shift = ops.shuffle_conv_epilogue_backward(
            grad_y, z, gate_x, scale, shift, *stats)
        # d/d bn_weight of scale * z + shift = rstd * (z - mean): sum dpre * (z - mean) * rstd.
        grad_bn_weight = _like((grad_scale - mean * grad_shift) * rstd, bn_weight)
        grad_bn_bias = _like(grad_shift, bn_bias)
        if conv == ConvAlgorithm.LIBRARY:
            conv_grads = library_conv_backward(grad_z, s, weight, groups, shuffle_groups, in_scale, in_shift, gate_x.dtype)
        else:
            conv_grads = ops.shuffle_conv_backward(grad_z, s, weight, groups, shuffle_groups, in_scale, in_shift)
        grad_s, grad_weight, grad_bias, grad_in_scale, grad_in_shift = conv_grads
        return (grad_s, grad_weight, _like(grad_bias, bias), None, None, _like(grad_in_scale, in_scale),
                _like(grad_in_shift, in_shift), grad_gate_x, grad_bn_weight, grad_bn_bias, None, None, None, None)

    for name, backward, setup in (
        ("shuffle_conv", backward_conv, setup_conv),
        ("shuffle_conv_epilogue", backward_epilogue, setup_epilogue),
        ("shuffle_conv_bn_gate", backward_bn_gate, setup_bn_gate),
    ):
        torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=setup)



REGISTRATION = Registration(_FAKES, _register_autograd, _COMPOSITES)
