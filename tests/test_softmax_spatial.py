"""softmax_spatial (SoftmaxSpatial's conv, spatial softmax and reweighting) on the C++ / CUDA /
reference backends, against the reference module.

The op runs through `attnkernels.functional.softmax_spatial` and the fused module
`attnkernels.nn.SoftmaxSpatial`; both are checked against `attnkernels.reference.SoftmaxSpatial`
(forward, the gradient of x and of the conv's weight and bias): g = 1, between and C, rescale
on and off, odd sizes, H*W = 1, every layout, NaN, gradcheck, opcheck, torch.compile, half
precision, determinism and what backward saves. Triton under the interpreter has its own file
(tests/test_softmax_spatial_triton.py); on a GPU the CUDA and Triton backends run here. Only
CUDA cases skip, on machines without a GPU.
"""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    COMPILED_BACKENDS,
    LAYOUTS,
    assert_all_close,
    assert_bitwise_equal,
    assert_error_like_eager,
    assert_keeps_reference_interface,
    assert_layout_of,
    backend_cases,
    compiled_and_eager,
    forward_backward,
    full_size_saved,
    fused_pair,
    make_input,
    needs_gpu,
    on_backend,
    without_reference,
)

from attnkernels import backend, fuse, unfuse
from attnkernels import functional as AF
from attnkernels import nn as fused
from attnkernels import reference as R

CASES = backend_cases(cpu=("cpu", "reference"), cuda=("cuda", "triton", "reference"))
# (N, C, H, W, g): g = 1, g = C, g between; H*W = 1; odd C and H != W; N = 1; the benchmark's
# C = 256 at 28 x 28.
SHAPES = [(2, 24, 5, 7, 1), (2, 24, 5, 7, 24), (3, 24, 6, 5, 6), (2, 16, 1, 1, 4), (1, 33, 17, 19, 3),
          (2, 256, 28, 28, 1)]
NAMES = ["y", "grad_x", "grad_weight", "grad_bias"]


def pair(c: int, g: int, rescale: bool, dtype: torch.dtype, device: str):
    """(fused, reference) SoftmaxSpatial with the same random weights."""
    return fused_pair(fused.SoftmaxSpatial, R.SoftmaxSpatial, c, dtype=dtype, device=device, groups=g,
                      rescale=rescale)


def op_args(module) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's (weight, bias) of a module: its conv weight as (g, C), its bias."""
    conv = module.conv
    return conv.weight.reshape(conv.out_channels, conv.in_channels), conv.bias


def op_run(module, x: torch.Tensor, grad_y: torch.Tensor, backend_name: str):
    """[y, grad_x, grad of conv.weight, grad of conv.bias] of the op with module's weights."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with backend.use_backend(backend_name):
        y = AF.softmax_spatial(x, *op_args(module), module.rescale)
    y.backward(grad_y)
    return [y.detach(), x.grad, module.conv.weight.grad, module.conv.bias.grad]


def module_run(module, x: torch.Tensor, grad_y: torch.Tensor, backend_name: str | None = None):
    y, grads = forward_backward(module, x, grad_y, backend_name)
    return [y, *grads]


def tolerance(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-5}


def assert_results_close(got, want, dtype: torch.dtype) -> None:
    """[y, grad_x, grad_weight, grad_bias] agree. The exact grad_bias is 0 (a softmax does not
    change when every logit of a row shifts by the same bias: sum_p dL = 0), so both results
    are rounding noise of sums as large as grad_weight's terms: checked against that scale."""
    for name, a, b in zip(NAMES[:3], got[:3], want[:3]):
        # fp32: the softmax of C-term logits is peaked and dL cancels (dA - sum_p a dA), so the
        # absolute error scales with the tensor's largest value.
        tol = tolerance(dtype)
        tol["atol"] *= max(b.abs().max().item(), 1.0)
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")
    scale = max(want[2].abs().max().item(), 1.0)
    noise = {"rtol": 0.0, "atol": (1e-11 if dtype == torch.float64 else 1e-5) * scale}
    torch.testing.assert_close(got[3], want[3], **noise, msg=lambda m: f"grad_bias: {m}")
    assert got[3].shape == want[3].shape and got[3].dtype == want[3].dtype


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "plain"])
def test_op_matches_reference_module(backend_name, device, shape, dtype, rescale) -> None:
    """y and the gradients of x, the conv weight and bias, against the reference module."""
    n, c, h, w, g = shape
    f, ref = pair(c, g, rescale, dtype, device)
    x = torch.randn(n, c, h, w, dtype=dtype, device=device)
    grad_y = torch.randn_like(x)
    got = op_run(f, x, grad_y, backend_name)
    want = module_run(ref, x, grad_y)
    assert_results_close(got, want, dtype)


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("groups", [1, 3, 12])
def test_module_layouts(backend_name, device, layout, groups) -> None:
    """The fused module on NCHW, channels_last and strided x: the reference's numbers, and y
    and grad_x in x's layout."""
    f, ref = pair(12, groups, True, torch.float64, device)
    x = make_input((2, 12, 5, 7), layout, torch.float64, device)
    grad_y = torch.randn(2, 12, 5, 7, dtype=torch.float64, device=device)
    got = module_run(f, x, grad_y, backend_name)
    assert_results_close(got, module_run(ref, x, grad_y), torch.float64)
    assert_layout_of(got[0], x)
    assert_layout_of(got[1], x)


@pytest.mark.parametrize("backend_name,device", CASES)
def test_weights_in_another_dtype(backend_name, device) -> None:
    """fp64 x with fp32 weight and bias: the op runs in x's accumulation dtype; each weight
    gradient comes back in its weight's dtype."""
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.empty(2, 8, device=device).uniform_(-0.6, 0.6).requires_grad_()
    bias = torch.empty(2, device=device).uniform_(-0.6, 0.6).requires_grad_()
    grad_y = torch.randn_like(x)
    with backend.use_backend(backend_name):
        y = AF.softmax_spatial(x, weight, bias, True)
    grads = torch.autograd.grad(y, (x, weight, bias), grad_y)
    wide = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    with backend.use_backend("reference"):
        y_want = AF.softmax_spatial(*wide, True)
    grads_want = torch.autograd.grad(y_want, wide, grad_y)
    torch.testing.assert_close(y, y_want, rtol=1e-12, atol=1e-12)
    assert [t.dtype for t in grads] == [torch.float64, torch.float32, torch.float32]
    for got, want in zip(grads[:2], grads_want[:2]):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert grads[2].abs().max() < 1e-5  # grad_bias is exactly 0 (see assert_results_close)


@pytest.mark.parametrize("backend_name,device", CASES)
def test_propagates_nan(backend_name, device) -> None:
    """A NaN in x[n, c, p] makes every logit of pixel p NaN, so every map of sample n and,
    through the softmax's sums, all of y[n]; the other sample stays finite. As the reference."""
    f, ref = pair(16, 2, True, torch.float32, device)
    x = torch.randn(2, 16, 3, 4, device=device)
    x[1, 5, 2, 3] = float("nan")
    with backend.use_backend(backend_name):
        y = f(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all()
    torch.testing.assert_close(y, ref(x), equal_nan=True, **tolerance(torch.float32))


@pytest.mark.parametrize("backend_name,device", CASES)
def test_infinite_logits_as_torch(backend_name, device) -> None:
    """An infinite logit (huge bias): +inf makes the map's row NaN (inf - inf), -inf in every
    entry too (0/0), as torch.softmax; the other maps are untouched."""
    f, ref = pair(8, 4, False, torch.float64, device)
    with torch.no_grad():
        ref.conv.bias[1] = float("inf")
        ref.conv.bias[2] = -float("inf")
        f.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64, device=device)
    with backend.use_backend(backend_name):
        y = f(x)
    want = ref(x)
    assert torch.isnan(want[:, 2:6]).all() and torch.isfinite(want[:, :2]).all()
    torch.testing.assert_close(y, want, equal_nan=True, **tolerance(torch.float64))


@pytest.mark.parametrize("backend_name,device", without_reference(CASES))
@pytest.mark.parametrize("groups,rescale", [(1, True), (3, False), (6, True)])
def test_gradcheck(backend_name, device, groups, rescale) -> None:
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.empty(groups, 6, dtype=torch.float64, device=device).uniform_(-0.6, 0.6).requires_grad_()
    bias = torch.empty(groups, dtype=torch.float64, device=device).uniform_(-0.6, 0.6).requires_grad_()
    fn = on_backend(lambda *t: AF.softmax_spatial(*t, rescale), backend_name)
    assert torch.autograd.gradcheck(fn, (x, weight, bias), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend_name,device", without_reference(CASES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_deterministic(backend_name, device, layout) -> None:
    """Bitwise the same output and gradients run after run (grad_weight and grad_bias sum over
    every pixel of the batch: fixed partial slots summed in order)."""
    f, _ = pair(64, 4, True, torch.float32, device)
    x = make_input((5, 64, 23, 29), layout, torch.float32, device)
    grad_y = torch.randn(5, 64, 23, 29, device=device)
    one = module_run(f, x, grad_y, backend_name)
    two = module_run(f, x, grad_y, backend_name)
    assert_bitwise_equal((one[0], one[1:]), (two[0], two[1:]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("groups", [1, 8])
def test_half_precision_error_like_eager(device, dtype, groups) -> None:
    """fp16/bf16 x and weights: the error against fp64 no worse than twice the eager
    same-precision module's (which rounds the logits, a and x * a to the input dtype)."""
    f, ref = pair(64, groups, True, torch.float64, device)
    x = torch.randn(2, 64, 9, 11, dtype=torch.float64, device=device)
    grad_y = torch.randn_like(x)
    exact = module_run(ref, x, grad_y)
    fused_backend = "cpu" if device == "cpu" else "cuda"
    low = module_run(copy.deepcopy(f).to(dtype), x.to(dtype), grad_y.to(dtype), fused_backend)
    eager = module_run(copy.deepcopy(ref).to(dtype), x.to(dtype), grad_y.to(dtype))
    assert all(t.dtype == dtype for t in low)
    assert_error_like_eager(low, eager, exact, floor=2e-3, names=NAMES)


@pytest.mark.parametrize("groups", [1, 4])
def test_backward_saves_only_x(groups) -> None:
    """Nothing x-sized is saved but x itself (a is (N, g, H, W), in any dtype)."""
    f, _ = pair(16, groups, True, torch.float32, "cpu")
    for layout in ("nchw", "channels_last"):
        x = make_input((2, 16, 8, 8), layout, torch.float32, "cpu").requires_grad_()
        assert full_size_saved(f, x, "cpu") == {x.untyped_storage().data_ptr()}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("groups,rescale", [(1, True), (4, False)])
def test_compile_fullgraph_on_cpu(layout, groups, rescale) -> None:
    """torch.compile(fullgraph=True) over the fused module: no graph break, the same numbers."""
    f, _ = pair(24, groups, rescale, torch.float32, "cpu")
    (y, grads), (y_eager, grads_eager) = compiled_and_eager(f, layout)
    assert_all_close([y, *grads], [y_eager, *grads_eager], NAMES, rtol=1e-5, atol=1e-6)


def test_state_dict_fuse_and_unfuse() -> None:
    """The fused module keeps the reference's keys and interface; fuse() swaps a reference
    SoftmaxSpatial inside a model for the fused one, unfuse() swaps it back."""
    f, ref = pair(8, 2, True, torch.float32, "cpu")
    assert_keeps_reference_interface(f, ref)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), R.SoftmaxSpatial(8, groups=2))
    x = torch.randn(2, 3, 6, 6)
    want = model(x)
    fuse(model)
    assert type(model[1]) is fused.SoftmaxSpatial
    with backend.use_backend("cpu"):
        torch.testing.assert_close(model(x), want, rtol=2e-5, atol=2e-6)
    unfuse(model)
    assert type(model[1]) is R.SoftmaxSpatial


def _op_samples():
    x = torch.randn(2, 12, 4, 3, dtype=torch.float64)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w3, b3 = torch.randn(3, 12, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    w12, b12 = torch.randn(12, 12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    a3 = torch.softmax(torch.randn(2, 3, 12, dtype=torch.float64), -1).reshape(2, 3, 4, 3)
    return {
        "softmax_spatial": [
            (x.clone().requires_grad_(), w3.clone().requires_grad_(), b3.clone().requires_grad_(), True),
            (x_cl.clone().requires_grad_(), w12, b12, False),
            (x[:, :, 1:, ::2], w3, b3, True),
        ],
        "softmax_spatial_backward": [(torch.randn_like(x), x, w3, a3, True), (torch.randn_like(x_cl), x_cl, w3, a3, False)],
    }


@pytest.mark.parametrize("op_name", ["softmax_spatial", "softmax_spatial_backward"])
def test_opcheck(op_name, compiled_ops) -> None:
    op = getattr(compiled_ops, op_name).default
    for args in _op_samples()[op_name]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_op_input_errors(backend_name, compiled_ops) -> None:
    """The C++/CUDA ops name the op, the argument and what they expected."""
    device = "cuda" if backend_name == "cuda" else "cpu"
    op, back = compiled_ops.softmax_spatial, compiled_ops.softmax_spatial_backward
    x = torch.randn(2, 12, 4, 3, device=device)
    w, b = torch.randn(3, 12, device=device), torch.randn(3, device=device)
    a = torch.rand(2, 3, 4, 3, device=device)
    with pytest.raises(ValueError, match=r"softmax_spatial: x must be 4-D"):
        op(x[0], w, b, True)
    with pytest.raises(TypeError, match=r"softmax_spatial: x must be a floating-point tensor"):
        op(x.int(), w, b, True)
    with pytest.raises(ValueError, match=r"softmax_spatial: weight must have shape \(g, C\) = \(g, 12\) with g dividing C"):
        op(x, w[:, :5], b, True)
    with pytest.raises(ValueError, match=r"softmax_spatial: weight must have shape \(g, C\) = \(g, 12\) with g dividing C"):
        op(x, torch.randn(5, 12, device=device), torch.randn(5, device=device), True)
    with pytest.raises(ValueError, match=r"softmax_spatial: bias must hold g = 3 values"):
        op(x, w, b[:2], True)
    with pytest.raises(ValueError, match=r"softmax_spatial_backward: grad_y must match x's shape"):
        back(x[:1], x, w, a, True)
    with pytest.raises(ValueError, match=r"softmax_spatial_backward: a must have shape \(N, 3, H, W\) = \(2, 3, 4, 3\)"):
        back(x, x, w, a[:, :2], True)
    with pytest.raises(TypeError, match=r"softmax_spatial_backward: a must be Float \(the accumulation dtype of x"):
        back(x, x, w, a.double(), True)
    with pytest.raises(ValueError, match=r"softmax_spatial: weight must be on cpu, got meta"):
        op(x.cpu(), w.cpu().to("meta"), b.cpu(), True)


def test_functional_argument_errors() -> None:
    """The same words from the Python checks (reference backend, fakes, Triton)."""
    x = torch.randn(2, 12, 4, 3)
    w, b = torch.randn(3, 12), torch.randn(3)
    with backend.use_backend("reference"):
        with pytest.raises(ValueError, match=r"softmax_spatial: weight must have shape \(g, C\) = \(g, 12\) with g dividing C"):
            AF.softmax_spatial(x, w.t(), b, True)
        with pytest.raises(ValueError, match=r"softmax_spatial: bias must hold g = 3 values"):
            AF.softmax_spatial(x, w, b[:1], True)
        with pytest.raises(ValueError, match=r"softmax_spatial: x must be 4-D"):
            AF.softmax_spatial(x[0], w, b, True)
        with pytest.raises(TypeError, match=r"softmax_spatial: bias must be a floating-point tensor"):
            AF.softmax_spatial(x, w, b.int(), True)
