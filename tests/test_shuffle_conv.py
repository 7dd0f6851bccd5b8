"""shuffle_conv (GAM's grouped conv read through the channel shuffle, with BN/ReLU on load and
the bias / BN / sigmoid / multiply epilogue) on the C++ / CUDA / reference backends.

Every case runs `attnkernels.functional.shuffle_conv` (raw and gated) and
`shuffle_conv_bn_gate` (BatchNorm with batch statistics between conv and gate) on a fused
backend with both conv algorithms ("direct": the backend's own conv kernels; "library":
torch's conv2d with the prologue and epilogue fused around it) against the plain-PyTorch path
(shuffle, affine, ReLU, conv2d, BatchNorm, sigmoid as separate ops): the output and the gradient
of every input (s, weight, bias, in_scale, in_shift, gate_x, out_scale/out_shift or the BN's
weight and bias). Triton under the interpreter has its own file
(tests/test_shuffle_conv_triton.py); on a GPU the CUDA and Triton backends run here.
"""
from __future__ import annotations

import pytest
import torch
from helpers import (
    COMPILED_BACKENDS,
    LAYOUTS,
    assert_all_close,
    assert_bitwise_equal,
    assert_layout_of,
    backend_cases,
    load_compiled_ops,
    make_input,
    on_backend,
)

from attnkernels import backend
from attnkernels import functional as AF
from attnkernels.ops.shuffle_conv import ConvAlgorithm

CASES = backend_cases(cpu=("cpu",), cuda=("cuda", "triton"), algorithms=("direct", "library"))
# (N, C_in, C_out, groups, shuffle_groups, k, H, W): GAM's conv1 (C -> C/r, groups, no shuffle)
# and conv2 (C/r -> C, shuffled), k = 1, 3, 7 with images smaller than the kernel, H*W = 1,
# odd H != W, N = 1.
SHAPES = [
    (2, 24, 6, 2, 1, 3, 5, 7),
    (2, 8, 24, 4, 4, 7, 9, 6),
    (1, 12, 12, 3, 2, 7, 3, 2),
    (3, 6, 4, 1, 3, 1, 4, 5),
    (2, 4, 8, 2, 2, 5, 1, 1),
]


def conv_inputs(shape, layout: str, dtype: torch.dtype, device: str, prologue: bool):
    """s, weight, bias and (prologue) in_scale, in_shift, random and requiring grad; the
    shift is centred so the ReLU both passes and cuts."""
    n, c_in, c_out, groups, _, k, h, w = shape
    s = make_input((n, c_in, h, w), layout, dtype, device)
    weight = torch.randn(c_out, c_in // groups, k, k, dtype=dtype, device=device) / k
    bias = torch.randn(c_out, dtype=dtype, device=device)
    tensors = [s, weight, bias]
    if prologue:
        tensors += [torch.rand(c_in, dtype=dtype, device=device) + 0.5, torch.randn(c_in, dtype=dtype, device=device) * 0.5]
    return [t.detach().requires_grad_() for t in tensors]


def gate_inputs(shape, layout: str, dtype: torch.dtype, device: str):
    n, _, c_out, _, _, _, h, w = shape
    gate_x = make_input((n, c_out, h, w), layout, dtype, device)
    out_scale = torch.rand(c_out, dtype=dtype, device=device) + 0.5
    out_shift = torch.randn(c_out, dtype=dtype, device=device)
    return [t.detach().requires_grad_() for t in (gate_x, out_scale, out_shift)]


def run(fn, inputs, grad_out_of, backend_name: str):
    """fn(*inputs) on `backend_name`; the output(s) and the gradients of every input."""
    with backend.use_backend(backend_name):
        out = fn(*inputs)
    y = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(y, inputs, grad_out_of(y))
    return out, list(grads)


def tolerance(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-5}


def unpack(inputs, prologue: bool):
    s, weight, bias, *rest = inputs
    return s, weight, bias, (rest[0] if prologue else None), (rest[1] if prologue else None), rest[2 if prologue else 0 :]


@pytest.mark.parametrize("backend_name,device,algo", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "bn_relu"])
@pytest.mark.parametrize("gated", [False, True], ids=["raw", "gated"])
def test_op_matches_reference(backend_name, device, algo, shape, dtype, prologue, gated) -> None:
    """Raw z or the gated y, and the gradients of every input, NCHW inputs."""
    groups, shuffle_groups = shape[3], shape[4]
    inputs = conv_inputs(shape, "nchw", dtype, device, prologue) + (gate_inputs(shape, "nchw", dtype, device) if gated else [])

    def fn(*args):
        s, weight, bias, in_scale, in_shift, gate = unpack(args, prologue)
        return AF.shuffle_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, *(gate or [None] * 3), conv=algo)

    grad = {}

    def grad_of(y):
        return grad.setdefault("g", torch.randn_like(y))

    got = run(fn, inputs, grad_of, backend_name)
    want = run(fn, inputs, grad_of, "reference")
    names = ["out", "s", "weight", "bias"] + ["in_scale", "in_shift"] * prologue + ["gate_x", "out_scale", "out_shift"] * gated
    assert_all_close([got[0], *got[1]], [want[0], *want[1]], names, **tolerance(dtype))
    assert got[0].dtype == (dtype if gated else want[0].dtype)


@pytest.mark.parametrize("backend_name,device,algo", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_op_layouts(backend_name, device, algo, layout) -> None:
    """channels_last and sliced s and gate_x: same numbers; outputs in the input's layout."""
    shape = (2, 8, 12, 4, 4, 3, 5, 6)
    inputs = conv_inputs(shape, layout, torch.float64, device, True) + gate_inputs(shape, layout, torch.float64, device)

    def fn(*args):
        s, weight, bias, in_scale, in_shift, gate = unpack(args, True)
        return AF.shuffle_conv(s, weight, bias, 4, 4, in_scale, in_shift, *gate, conv=algo)

    g = torch.randn(2, 12, 5, 6, dtype=torch.float64, device=device)
    got = run(fn, inputs, lambda y: g, backend_name)
    want = run(fn, inputs, lambda y: g, "reference")
    assert_all_close([got[0], *got[1]], [want[0], *want[1]], ["y"] + [f"grad{i}" for i in range(8)],
                     **tolerance(torch.float64))
    assert_layout_of(got[0], inputs[0])


@pytest.mark.parametrize("backend_name,device,algo", CASES)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_bn_gate_matches_reference(backend_name, device, algo, shape, dtype, affine) -> None:
    """shuffle_conv_bn_gate: y, z's batch statistics, and every gradient (the statistics'
    gradient included: the reference runs F.batch_norm in training mode)."""
    groups, shuffle_groups = shape[3], shape[4]
    c_out = shape[2]
    inputs = conv_inputs(shape, "nchw", dtype, device, True) + gate_inputs(shape, "nchw", dtype, device)[:1]
    if affine:
        inputs += [t.requires_grad_() for t in (torch.rand(c_out, dtype=dtype, device=device) + 0.5,
                                                torch.randn(c_out, dtype=dtype, device=device))]

    def fn(*args):
        s, weight, bias, in_scale, in_shift, rest = unpack(args, True)
        bn = rest[1:] if affine else [None, None]
        return AF.shuffle_conv_bn_gate(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, rest[0], *bn, 1e-5, conv=algo)

    grad = {}
    got = run(fn, inputs, lambda y: grad.setdefault("g", torch.randn_like(y)), backend_name)
    want = run(fn, inputs, lambda y: grad.setdefault("g", torch.randn_like(y)), "reference")
    names = ["y", "mean", "var", "s", "weight", "bias", "in_scale", "in_shift", "gate_x"] + ["bn_weight", "bn_bias"] * affine
    assert_all_close([*got[0], *got[1]], [*want[0], *want[1]], names, **tolerance(dtype))


@pytest.mark.parametrize("backend_name,device,algo", CASES)
def test_gradcheck(backend_name, device, algo) -> None:
    """fp64 gradcheck of the gated conv and of shuffle_conv_bn_gate, every input."""
    shape = (2, 4, 8, 2, 2, 3, 3, 4)
    inputs = conv_inputs(shape, "nchw", torch.float64, device, True) + gate_inputs(shape, "nchw", torch.float64, device)

    def gated(*args):
        s, weight, bias, in_scale, in_shift, gate = unpack(args, True)
        return AF.shuffle_conv(s, weight, bias, 2, 2, in_scale, in_shift, *gate, conv=algo)

    def bn_gate(*args):
        s, weight, bias, in_scale, in_shift, (gate_x, bn_weight, bn_bias) = unpack(args, True)
        return AF.shuffle_conv_bn_gate(s, weight, bias, 2, 2, in_scale, in_shift, gate_x, bn_weight, bn_bias, conv=algo)[0]

    # The library algorithm is cuDNN's conv on a GPU, whose weight gradient may sum in a
    # different order each call: reentrant to rounding, not bitwise.
    nondet_tol = 1e-10 if algo == "library" and device == "cuda" else 0.0
    for fn in (gated, bn_gate):
        assert torch.autograd.gradcheck(on_backend(fn, backend_name), inputs, eps=1e-6, atol=1e-6, nondet_tol=nondet_tol)


@pytest.mark.parametrize("backend_name,device,algo", CASES)
def test_propagates_nan(backend_name, device, algo) -> None:
    """A NaN in s reaches the outputs whose k x k window holds it, in every channel of its group."""
    shape = (1, 4, 4, 2, 1, 3, 6, 6)
    s, weight, bias = (t.detach() for t in conv_inputs(shape, "nchw", torch.float32, device, False))
    s[0, 0, 2, 2] = float("nan")
    with backend.use_backend(backend_name):
        z = AF.shuffle_conv(s, weight, bias, 2, 1, conv=algo)
    nan = torch.isnan(z)
    assert nan[0, :2, 1:4, 1:4].all() and nan.sum() == 2 * 9


@pytest.mark.parametrize("backend_name,device,algo", [c for c in CASES if c.values[2] == "direct"])
def test_deterministic(backend_name, device, algo) -> None:
    shape = (4, 32, 64, 4, 4, 7, 21, 19)
    inputs = conv_inputs(shape, "nchw", torch.float32, device, True) + gate_inputs(shape, "nchw", torch.float32, device)
    g = torch.randn(4, 64, 21, 19, device=device)

    def fn(*args):
        s, weight, bias, in_scale, in_shift, gate = unpack(args, True)
        return AF.shuffle_conv(s, weight, bias, 4, 4, in_scale, in_shift, *gate, conv=algo)

    assert_bitwise_equal(run(fn, inputs, lambda y: g, backend_name), run(fn, inputs, lambda y: g, backend_name))


def _op_samples():
    shape = (2, 4, 8, 2, 2, 3, 3, 4)
    s, weight, bias, in_scale, in_shift = (t.detach() for t in conv_inputs(shape, "nchw", torch.float64, "cpu", True))
    gate_x, out_scale, out_shift = (t.detach() for t in gate_inputs(shape, "nchw", torch.float64, "cpu"))
    z = load_compiled_ops().shuffle_conv(s, weight, bias, 2, 2, in_scale, in_shift, None, None, None)
    mean, rstd = z.mean((0, 2, 3)), z.var((0, 2, 3), correction=0).add(1e-5).rsqrt()
    grad = lambda *ts: tuple(t.clone().requires_grad_() for t in ts)  # noqa: E731
    s_cl = s.contiguous(memory_format=torch.channels_last)
    return {
        "shuffle_conv": [
            (*grad(s, weight, bias), 2, 2, *grad(in_scale, in_shift), None, None, None),
            (*grad(s_cl, weight), None, 2, 1, None, None, *grad(gate_x, out_scale, out_shift)),
        ],
        "shuffle_conv_backward": [(torch.randn_like(z), s, weight, 2, 2, in_scale, in_shift),
                                  (torch.randn_like(z), s, weight, 2, 1, None, None)],
        "shuffle_conv_epilogue": [grad(z, gate_x, out_scale, out_shift)],
        "shuffle_conv_epilogue_backward": [(torch.randn_like(z), z, gate_x, out_scale, out_shift, None, None),
                                           (torch.randn_like(z), z, gate_x, out_scale, out_shift, mean, rstd)],
    }


@pytest.mark.parametrize(
    "op_name", ["shuffle_conv", "shuffle_conv_backward", "shuffle_conv_epilogue", "shuffle_conv_epilogue_backward"]
)
def test_opcheck(op_name, compiled_ops) -> None:
    op = getattr(compiled_ops, op_name).default
    for args in _op_samples()[op_name]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("conv", list(ConvAlgorithm), ids=lambda a: a.name.lower())
def test_opcheck_bn_gate(conv, compiled_ops) -> None:
    """The composite op (written once in Python over the namespace's primitives, registered
    into it) passes opcheck too, batch statistics and running ones; conv a ConvAlgorithm int."""
    shape = (2, 4, 8, 2, 2, 3, 3, 4)
    s, weight, bias, in_scale, in_shift = conv_inputs(shape, "nchw", torch.float64, "cpu", True)
    gate_x = gate_inputs(shape, "nchw", torch.float64, "cpu")[0]
    bn_weight, bn_bias = (torch.randn(8, dtype=torch.float64).requires_grad_() for _ in range(2))
    op = compiled_ops.shuffle_conv_bn_gate.default
    torch.library.opcheck(op, (s, weight, bias, 2, 2, in_scale, in_shift, gate_x, bn_weight, bn_bias, None, None, 1e-5,
                               int(conv)))
    running = (torch.randn(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64) + 0.5)
    torch.library.opcheck(op, (s, weight, bias, 2, 2, in_scale, in_shift, gate_x, bn_weight, bn_bias, *running, 1e-5,
                               int(conv)))


@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_op_input_errors(backend_name, compiled_ops) -> None:
    """The C++/CUDA ops name the argument and what they expected."""
    device = "cuda" if backend_name == "cuda" else "cpu"
    op = compiled_ops.shuffle_conv
    s, weight, bias, in_scale, in_shift = (t.detach() for t in conv_inputs(SHAPES[1], "nchw", torch.float32, device, True))
    with pytest.raises(ValueError, match=r"shuffle_conv: groups must be a positive divisor of s's 8 channels, got 3"):
        op(s, weight, bias, 3, 4, None, None, None, None, None)
    with pytest.raises(ValueError, match=r"shuffle_conv: shuffle_groups must be a positive divisor of s's 8 channels, got 5"):
        op(s, weight, bias, 4, 5, None, None, None, None, None)
    with pytest.raises(ValueError, match=r"shuffle_conv: weight must have shape \(C_out, C_in / groups, k, k\)"):
        op(s, weight[..., :6, :6], bias, 4, 4, None, None, None, None, None)
    with pytest.raises(ValueError, match=r"shuffle_conv: in_scale and in_shift must be given together"):
        op(s, weight, bias, 4, 4, in_scale, None, None, None, None)
    with pytest.raises(ValueError, match=r"shuffle_conv: in_scale must hold C_in = 8 values"):
        op(s, weight, bias, 4, 4, in_scale[:3], in_shift, None, None, None)
    with pytest.raises(ValueError, match=r"shuffle_conv: bias must hold C_out = 24 values"):
        op(s, weight, bias[:5], 4, 4, None, None, None, None, None)
    gate_x = torch.randn(2, 24, 9, 6, device=device)
    with pytest.raises(ValueError, match=r"shuffle_conv: gate_x must have the output's shape"):
        op(s, weight, bias, 4, 4, None, None, gate_x[:, :5], torch.ones(24, device=device), torch.zeros(24, device=device))
    with pytest.raises(ValueError, match=r"shuffle_conv: out_scale must hold C_out = 24 values"):
        op(s, weight, bias, 4, 4, None, None, gate_x, torch.ones(3, device=device), torch.zeros(24, device=device))


def test_functional_argument_errors() -> None:
    s, weight, bias = (t.detach() for t in conv_inputs(SHAPES[1], "nchw", torch.float32, "cpu", False))
    with pytest.raises(ValueError, match=r"shuffle_conv: groups must be a positive divisor of s's 8 channels, got 3"):
        AF.shuffle_conv(s, weight, bias, 3)
    with pytest.raises(ValueError, match=r"shuffle_conv: weight must have shape"):
        AF.shuffle_conv(s, weight[..., :6], bias, 4)
    with pytest.raises(ValueError, match=r"shuffle_conv: gate_x, out_scale and out_shift must be given together"):
        AF.shuffle_conv(s, weight, bias, 4, 4, gate_x=torch.randn(2, 24, 9, 6))
    with pytest.raises(ValueError, match=r"shuffle_conv: conv must be one of auto, direct, library"):
        AF.shuffle_conv(s, weight, bias, 4, conv="winograd")
