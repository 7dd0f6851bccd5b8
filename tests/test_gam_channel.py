"""gam_channel (GAM's per-pixel MLP gate) on the C++ / CUDA / reference backends, against the reference.

The op runs through `attnkernels.functional.gam_channel` (fused backend vs the plain-PyTorch
path: permute, two nn.Linear, ReLU, sigmoid, multiply); forward and the gradients of x and of
the four MLP weights (autograd through the registered backward op). Triton under the
interpreter has its own file (tests/test_gam_channel_triton.py); on a GPU the CUDA and Triton
backends run here. Only CUDA cases skip, on machines without a GPU.
"""
from __future__ import annotations

import functools

import pytest
import torch
from helpers import (
    COMPILED_BACKENDS,
    LAYOUTS,
    assert_all_close,
    assert_bitwise_equal,
    assert_error_like_eager,
    assert_layout_of,
    backend_cases,
    make_input,
    needs_gpu,
    on_backend,
    op_forward_backward,
    without_reference,
)

from attnkernels import backend
from attnkernels import functional as AF

CASES = backend_cases(cpu=("cpu", "reference"), cuda=("cuda", "triton", "reference"))
# (N, C, rd, H, W): H*W not a multiple of the CPU's 256-pixel tile, HW = 1, rd = 1, C odd,
# N = 1, and GAM's C = 256, rd = 16 at 28 x 28 (several tiles per sample).
SHAPES = [(2, 48, 3, 5, 7), (1, 16, 1, 1, 1), (3, 33, 4, 17, 19), (2, 256, 16, 28, 28)]
WEIGHT_NAMES = ("w1", "b1", "w2", "b2")


def op_inputs(shape, layout: str, dtype: torch.dtype, device: str, weight_dtype: torch.dtype | None = None):
    """x in `layout` and the MLP's weights (rd, C), rd, (C, rd), C, all requiring grad."""
    n, c, rd, h, w = shape
    x = make_input((n, c, h, w), layout, dtype, device)
    wd = weight_dtype or dtype
    weights = [torch.empty(s, dtype=wd, device=device).uniform_(-0.6, 0.6) for s in ((rd, c), (rd,), (c, rd), (c,))]
    return [t.detach().requires_grad_() for t in (x, *weights)]


def gam_forward_backward(inputs, grad_x1: torch.Tensor, backend_name: str):
    return op_forward_backward(AF.gam_channel, inputs, grad_x1, backend_name)


def tolerance(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-11, "atol": 1e-11} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 2e-5}


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_op_matches_reference(backend_name, device, shape, dtype, layout) -> None:
    """x1 and the gradients of x, w1, b1, w2, b2; x1 in x's layout."""
    inputs = op_inputs(shape, layout, dtype, device)
    grad_x1 = torch.randn_like(inputs[0])
    x1, grads = gam_forward_backward(inputs, grad_x1, backend_name)
    x1_ref, grads_ref = gam_forward_backward(inputs, grad_x1, "reference")
    tol = tolerance(dtype)
    torch.testing.assert_close(x1, x1_ref, **tol)

    @functools.cache
    def truths():  # float64 gradients: which of two float32 reductions is the more accurate
        inputs64 = [t.detach().double().requires_grad_() for t in inputs]
        return gam_forward_backward(inputs64, grad_x1.double(), "reference")[1]

    assert_all_close(grads, grads_ref, [f"grad_{name}" for name in ("x", *WEIGHT_NAMES)],
                     truths=truths if dtype == torch.float32 else None, **tol)
    assert all(got.dtype == want.dtype and got.shape == want.shape for got, want in zip(grads, grads_ref))
    assert_layout_of(x1, inputs[0])


@pytest.mark.parametrize("backend_name,device", CASES)
def test_weights_in_another_dtype(backend_name, device) -> None:
    """fp64 x with fp32 weights: the MLP runs in x's accumulation dtype, each weight's
    gradient comes back in that weight's dtype."""
    inputs = op_inputs((2, 24, 3, 4, 5), "nchw", torch.float64, device, weight_dtype=torch.float32)
    grad_x1 = torch.randn_like(inputs[0])
    x1, grads = gam_forward_backward(inputs, grad_x1, backend_name)
    want_inputs = [inputs[0]] + [w.detach().double().requires_grad_() for w in inputs[1:]]
    x1_ref, grads_ref = gam_forward_backward(want_inputs, grad_x1, "reference")
    torch.testing.assert_close(x1, x1_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, grads_ref):
        assert got.dtype == (torch.float64 if got.shape == inputs[0].shape else torch.float32)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend_name,device", CASES)
def test_propagates_nan(backend_name, device) -> None:
    """A NaN in x[n, c, p] reaches every channel of pixel p (through the MLP), no other pixel."""
    x, *weights = (t.detach() for t in op_inputs((2, 16, 2, 3, 4), "nchw", torch.float32, device))
    x[1, 5, 2, 3] = float("nan")
    with backend.use_backend(backend_name):
        x1 = AF.gam_channel(x, *weights)
    nan = torch.isnan(x1)
    assert nan[1, :, 2, 3].all() and nan.sum() == 16


@pytest.mark.parametrize("backend_name,device", without_reference(CASES))
def test_gradcheck(backend_name, device) -> None:
    inputs = op_inputs((2, 7, 3, 3, 5), "nchw", torch.float64, device)
    assert torch.autograd.gradcheck(on_backend(AF.gam_channel, backend_name), inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend_name,device", without_reference(CASES))
def test_deterministic(backend_name, device) -> None:
    """Bitwise the same output and gradients run after run (the weight gradients are sums
    over every pixel of the batch: fixed partial slots summed in order)."""
    inputs = op_inputs((4, 64, 8, 23, 29), "nchw", torch.float32, device)
    grad_x1 = torch.randn_like(inputs[0])
    assert_bitwise_equal(gam_forward_backward(inputs, grad_x1, backend_name),
                         gam_forward_backward(inputs, grad_x1, backend_name))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_error_like_eager(device, dtype) -> None:
    """fp16/bf16 x and weights: error against fp64 no worse than twice the eager
    same-precision path's (which rounds the hidden and gate maps to the input dtype)."""
    exact_inputs = op_inputs((2, 64, 4, 9, 11), "nchw", torch.float64, device)
    grad_x1 = torch.randn_like(exact_inputs[0])
    exact = gam_forward_backward(exact_inputs, grad_x1, "reference")
    low_inputs = [t.detach().to(dtype).requires_grad_() for t in exact_inputs]
    fused_backend = "cpu" if device == "cpu" else "cuda"
    low = gam_forward_backward(low_inputs, grad_x1.to(dtype), fused_backend)

    def eager_path(x, w1, b1, w2, b2):  # the reference module's own ops, in the low dtype
        x_nhwc = x.permute(0, 2, 3, 1)
        m = torch.sigmoid(torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x_nhwc, w1, b1)), w2, b2))
        return x * m.permute(0, 3, 1, 2)

    y = eager_path(*low_inputs)
    eager = (y.detach(), list(torch.autograd.grad(y, low_inputs, grad_x1.to(dtype))))
    names = ["x1", "x", *WEIGHT_NAMES]
    assert_error_like_eager([low[0], *low[1]], [eager[0], *eager[1]], [exact[0], *exact[1]], floor=2e-3, names=names)


def _op_samples():
    x, w1, b1, w2, b2 = (t.detach() for t in op_inputs((2, 12, 3, 4, 3), "nchw", torch.float64, "cpu"))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    return {
        "gam_channel": [
            tuple(t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)),
            (x_cl.requires_grad_(), w1, b1, w2, b2),
        ],
        "gam_channel_backward": [(torch.randn_like(x), x, w1, b1, w2, b2)],
    }


@pytest.mark.parametrize("op_name", ["gam_channel", "gam_channel_backward"])
def test_opcheck(op_name, compiled_ops) -> None:
    op = getattr(compiled_ops, op_name).default
    for args in _op_samples()[op_name]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_op_input_errors(backend_name, compiled_ops) -> None:
    """The C++/CUDA ops name the argument and what they expected."""
    device = "cuda" if backend_name == "cuda" else "cpu"
    op = compiled_ops.gam_channel
    x, w1, b1, w2, b2 = (t.detach() for t in op_inputs((2, 12, 3, 4, 3), "nchw", torch.float32, device))
    with pytest.raises(ValueError, match=r"gam_channel: x must be 4-D"):
        op(x[0], w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"gam_channel: w1 must have shape \(rd, C\) = \(rd, 12\)"):
        op(x, w1[:, :5], b1, w2, b2)
    with pytest.raises(ValueError, match=r"gam_channel: w2 must have shape \(C, rd\) = \(12, 3\)"):
        op(x, w1, b1, w2[:, :2], b2)
    with pytest.raises(ValueError, match=r"gam_channel: b1 must hold rd = 3 values"):
        op(x, w1, b1[:2], w2, b2)
    with pytest.raises(TypeError, match=r"gam_channel: x must be a floating-point tensor"):
        op(x.int(), w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"gam_channel_backward: grad_x1 must match x's shape"):
        compiled_ops.gam_channel_backward(x[:1], x, w1, b1, w2, b2)


def test_functional_argument_errors() -> None:
    x, w1, b1, w2, b2 = (t.detach() for t in op_inputs((2, 12, 3, 4, 3), "nchw", torch.float32, "cpu"))
    with pytest.raises(ValueError, match=r"gam_channel: w1 must have shape \(rd, C\) = \(rd, 12\)"):
        AF.gam_channel(x, w1.t(), b1, w2, b2)
    with pytest.raises(ValueError, match=r"gam_channel: b2 must hold C = 12 values"):
        AF.gam_channel(x, w1, b1, w2, b2[:3])
    with pytest.raises(ValueError, match=r"gam_channel: x must be 4-D"):
        AF.gam_channel(x[0], w1, b1, w2, b2)


def test_float32_check_falls_back_to_accuracy() -> None:
    """assert_all_close with truths: a float32 result outside the tolerance passes only if it is
    no further from the float64 truth than twice the reference's error (plus two roundings)."""
    truth = torch.randn(64, dtype=torch.float64) * 50
    want = (truth + 1e-4 * torch.randn(64, dtype=torch.float64)).float()  # the reference's own error
    err = (want.double() - truth).abs().max()
    as_good = (truth + err * torch.sign(torch.randn(64, dtype=torch.float64))).float()
    worse = (truth + 4 * err).float()
    tol = tolerance(torch.float32)
    with pytest.raises(AssertionError):  # outside tol (1e-4 over values near 50 is >= 2e-5 + 1e-4 * |x|)
        assert_all_close([as_good], [want], ["g"], **tol)
    assert_all_close([as_good], [want], ["g"], truths=lambda: [truth], **tol)
    with pytest.raises(AssertionError, match="g"):
        assert_all_close([worse], [want], ["g"], truths=lambda: [truth], **tol)
