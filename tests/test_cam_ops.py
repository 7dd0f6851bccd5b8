"""cam on the C++ / CUDA / reference backends, against its Reference ops.

The op through the public function (`attnkernels.functional.cam`) on a backend, forward and
autograd's gradients, against `attnkernels.ops.cam.Reference`'s forward and explicit backward
(csrc/cam_ops.cpp's formulas); the Reference against reference.CAM's own composition. The
Triton ops under the interpreter are in tests/test_cam_triton.py; the module in
tests/test_cam.py. On a GPU the CUDA and Triton backends run here too; only those cases skip
on machines without one.
"""
from __future__ import annotations

import pytest
import torch
from helpers import (
    LAYOUTS,
    assert_all_close,
    assert_cpp_error_like_python,
    assert_error_like_eager,
    assert_layout_of,
    backend_cases,
    grads_of,
    leaf,
    make_input,
    needs_gpu,
    on_backend,
    rounding_floor,
)

from attnkernels import backend
from attnkernels import functional as AF
from attnkernels import reference as R
from attnkernels.ops import cam as ops_module

Ref = ops_module.Reference
F64, F32 = torch.float64, torch.float32
CASES = backend_cases(cpu=("cpu", "reference"), cuda=("cuda", "triton", "reference"))
# C = 1, odd C, C over one block of rows; H != W; HW = 1; N = 1; P large enough (20x21) that the
# energies' spread flushes weights (see test_subnormal_weights_are_flushed). Past 128 channels
# with P >= C the CPU op multiplies only E's blocks on and above the diagonal (two and three row
# blocks, the last one partial); 140 x 30 is past 128 channels with P < C (one GEMM).
SHAPES = [(2, 16, 5, 6), (3, 1, 4, 4), (2, 7, 3, 5), (3, 33, 1, 1), (1, 70, 4, 9), (2, 12, 20, 21),
          (2, 150, 12, 13), (1, 300, 16, 20), (2, 140, 5, 6)]
TOL = {F64: {"rtol": 1e-10, "atol": 1e-10}, F32: {"rtol": 1e-4, "atol": 1e-4}}
NAMES = ["y", "grad_x", "grad_gamma"]


def shape_id(s) -> str:
    return "x".join(map(str, s))


def make_gamma(x: torch.Tensor, value: float = 0.7) -> torch.Tensor:
    return torch.tensor([value], dtype=x.dtype if x.dtype in (F64, F32) else F32, device=x.device)


# ----------------------------------------------------------------------------------------
# Runs: the backend through autograd, and the Reference's forward and explicit backward
# ----------------------------------------------------------------------------------------
def cam_run(x, gamma, g_y, backend_name):
    return grads_of(AF.cam, [x, gamma], g_y, backend_name)


def cam_want(x, gamma, g_y):
    y, attn = Ref.cam(x, gamma)
    return [y, *Ref.cam_backward(g_y, x, gamma, attn)]


def check_cam(x, gamma, backend_name, **kw) -> list[torch.Tensor]:
    """y and the gradients on the backend against the Reference (fp32: or as accurate, against
    fp64); returns the backend's results."""
    g_y = torch.randn_like(x)
    got = cam_run(x, gamma, g_y, backend_name)
    truths = lambda: cam_want(x.double(), gamma.double(), g_y.double())  # noqa: E731
    assert_all_close(got, cam_want(x, gamma, g_y), NAMES, truths, **(kw or TOL[F64 if x.dtype == F64 else F32]))
    return got


# ----------------------------------------------------------------------------------------
# The Reference against reference.CAM
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 16, 5, 6), (2, 12, 20, 21)], ids=shape_id)
def test_reference_is_cams_composition(shape) -> None:
    """Reference.cam is reference.CAM's forward (up to the flushed weights, each below 2.2e-308
    here), and its explicit backward is autograd's gradient of it."""
    m = R.CAM(shape[1]).double()
    with torch.no_grad():
        m.gamma.fill_(0.7)
    x = leaf(torch.randn(shape, dtype=F64), True)
    g = torch.randn_like(x)
    y = m(x)
    want = [y, *torch.autograd.grad(y, (x, m.gamma), g)]
    y_ref, attn = Ref.cam(x.detach(), m.gamma.detach())
    got = [y_ref, *Ref.cam_backward(g, x.detach(), m.gamma.detach(), attn)]
    assert_all_close(got, want, NAMES, **TOL[F64])


def test_subnormal_weights_are_flushed() -> None:
    """At 20x21 pixels, softmax(-E) underflows: the reference module's attention holds
    subnormal weights, the op's holds zeros in their place and nothing below the smallest
    normal number, and y moves by far less than a rounding."""
    x = torch.randn(2, 12, 20, 21)
    xf = x.flatten(2)
    e = xf @ xf.transpose(1, 2)
    eager = torch.softmax(e.amax(-1, keepdim=True) - e, dim=-1)
    tiny = torch.finfo(torch.float32).tiny
    assert ((eager > 0) & (eager < tiny)).any()  # the case this test is about
    _, attn = Ref.cam(x, make_gamma(x))
    assert not ((attn > 0) & (attn < tiny)).any()
    assert torch.equal(attn == 0, eager < tiny)


# ----------------------------------------------------------------------------------------
# Against the Reference: shapes, dtypes, layouts
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_op_matches_reference(backend_name, device, dtype, layout, shape) -> None:
    x = make_input(shape, layout, dtype, device)
    y, grad_x, grad_gamma = check_cam(x, make_gamma(x), backend_name)
    assert grad_gamma.shape == (1,)
    for t in (y, grad_x):
        assert t.dtype == dtype
        assert_layout_of(t, x)


@pytest.mark.parametrize("backend_name,device", CASES)
def test_gamma_zero_and_other_shapes(backend_name, device) -> None:
    """gamma = 0 (DANet's initialisation): y = x, grad_gamma = sum(grad_y * out) is live; gamma
    as a 0-d and a (1, 1, 1) tensor of another dtype."""
    x = make_input((2, 9, 4, 5), "nchw", F64, device)
    _, grad_x, grad_gamma = check_cam(x, make_gamma(x, 0.0), backend_name)
    assert grad_gamma.abs().item() > 0
    for gamma in (torch.tensor(0.3, dtype=F64, device=device), torch.full((1, 1, 1), 0.3, device=device)):
        g_y = torch.randn_like(x)
        got = cam_run(x, gamma, g_y, backend_name)
        want = cam_want(x, gamma.double(), g_y)
        assert got[2].shape == gamma.shape and got[2].dtype == gamma.dtype
        torch.testing.assert_close(got[0], want[0], **TOL[F64])
        torch.testing.assert_close(got[2].double(), want[2].reshape(gamma.shape), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_half_precision_error_like_eager(device, dtype, layout) -> None:
    """fp16/bf16: the fused results' error against fp64 (on the same rounded inputs) is no
    worse than twice reference.CAM's eager same-precision path's (energies in fp32, out rounded
    to x's dtype before gamma * out + x), plus two units of rounding at the result's scale."""
    x = make_input((2, 48, 6, 7), layout, dtype, device) * 0.3
    gamma = torch.tensor([0.7], device=device)
    g_y = torch.randn_like(x)

    def eager(x, gamma):
        n, c, h, w = x.shape
        xf = x.reshape(n, c, h * w).float()
        e = xf @ xf.transpose(1, 2)
        out = (torch.softmax(e.amax(-1, keepdim=True) - e, dim=-1) @ xf).view(n, c, h, w).to(x.dtype)
        return gamma.to(x.dtype) * out + x

    got = grads_of(AF.cam, [x, gamma], g_y, device)
    exact = grads_of(lambda x, gamma: Ref.cam(x, gamma)[0], [x.double(), gamma.double()], g_y.double(), "reference")
    low = grads_of(eager, [x, gamma], g_y, "reference")
    assert_error_like_eager(got, low, exact, floor=rounding_floor(dtype), names=NAMES)


# ----------------------------------------------------------------------------------------
# NaN and inf
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_poisons_its_sample_only(backend_name, device, layout) -> None:
    """A NaN in x[1]: every energy of sample 1 that meets it is NaN, so sample 1's y and grad_x
    are NaN as the reference's; sample 0 stays finite."""
    x = make_input((2, 9, 4, 5), layout, F64, device)
    x[1, 2, 1, 1] = float("nan")
    y, grad_x, _ = check_cam(x, make_gamma(x), backend_name, **TOL[F64], equal_nan=True)
    assert torch.isnan(y[1]).any() and torch.isfinite(y[0]).all() and torch.isfinite(grad_x[0]).all()


# ----------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile, determinism, saved tensors, empty inputs
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(backend_name, device, layout) -> None:
    x = leaf(make_input((2, 5, 3, 4), layout, F64, device) * 0.5, True)
    gamma = leaf(make_gamma(x), True)
    assert torch.autograd.gradcheck(on_backend(AF.cam, backend_name), (x, gamma), eps=1e-6, atol=1e-7)


def _op_samples():
    samples = {"cam": [], "cam_backward": []}
    for layout, dtype in (("nchw", F64), ("channels_last", F64), ("sliced", F64), ("channels_last", torch.float16)):
        x = make_input((2, 6, 5, 3), layout, dtype, "cpu") * 0.5
        gamma = make_gamma(x)
        grad = dtype == F64  # autograd's check wants fp64
        samples["cam"].append((leaf(x, grad), leaf(gamma, grad)))
        attn = Ref.cam(x, gamma)[1]
        samples["cam_backward"].append((torch.randn_like(x), leaf(x), leaf(gamma), leaf(attn)))
    return samples


@pytest.mark.parametrize("op_name", list(_op_samples()))
def test_opcheck(op_name, compiled_ops) -> None:
    op = getattr(compiled_ops, op_name).default
    for args in _op_samples()[op_name]:
        torch.library.opcheck(op, args)


def cam_block(x, w, gamma):
    """A 1x1 conv, then the public cam, as a network uses it."""
    return AF.cam(torch.nn.functional.conv2d(x, w), gamma)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_compile_fullgraph_on_cpu(layout, compiled_ops) -> None:
    torch._dynamo.reset()
    x = make_input((2, 24, 7, 5), layout, F32, "cpu")
    w, gamma, g = torch.randn(24, 24, 1, 1) * 0.1, torch.tensor([0.5]), torch.randn(2, 24, 7, 5)
    compiled = torch.compile(cam_block, fullgraph=True)
    eager = grads_of(cam_block, [x, w, gamma], g, "cpu")
    got = grads_of(compiled, [x, w, gamma], g, "cpu")
    assert_all_close(got, eager, ["y", "grad_x", "grad_w", "grad_gamma"], **TOL[F32])


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_deterministic(backend_name, device, layout) -> None:
    """Bitwise the same results twice."""
    x = make_input((3, 37, 13, 11), layout, F32, device)
    gamma, g_y = make_gamma(x), torch.randn_like(x)
    first = cam_run(x, gamma, g_y, backend_name)
    assert all(torch.equal(a, b) for a, b in zip(first, cam_run(x, gamma, g_y, backend_name)))


@pytest.mark.parametrize("backend_name,device", CASES)
def test_empty_inputs(backend_name, device) -> None:
    """No pixels or no channels: y and grad_x are empty; grad_gamma is 0."""
    for shape in ((2, 3, 0, 4), (2, 0, 3, 4), (0, 3, 2, 2)):
        x = torch.randn(shape, device=device)
        y, grad_x, grad_gamma = cam_run(x, make_gamma(x), torch.randn_like(x), backend_name)
        assert y.shape == grad_x.shape == x.shape and grad_gamma.item() == 0


def test_saves_x_and_the_attention_only() -> None:
    """Backward keeps x and the (N, C, C) attention: no x-sized intermediate but x."""
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    gamma = torch.tensor([0.5], requires_grad=True)
    saved = []
    with backend.use_backend("cpu"), torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t) or t, lambda t: t
    ):
        AF.cam(x, gamma)
    full = [t for t in saved if t.numel() >= x.numel()]
    assert full and all(t.data_ptr() == x.data_ptr() for t in full), [tuple(t.shape) for t in full]
    assert sorted(tuple(t.shape) for t in saved if t.numel() < x.numel()) == [(1,), (2, 16, 16)]


# ----------------------------------------------------------------------------------------
# Bad input: the C++ kernels raise the Python checks' errors, word for word
# ----------------------------------------------------------------------------------------
def _t(*shape, dtype=F32, device="cpu"):
    return torch.rand(*shape, dtype=dtype, device=device)


def _valid(op: str) -> dict:
    """Valid float32 arguments of `op`, by schema name."""
    x, gamma = _t(2, 3, 4, 4), _t(1)
    return {
        "cam": {"x": x, "gamma": gamma},
        "cam_backward": {"grad_y": _t(2, 3, 4, 4), "x": x, "gamma": gamma, "attn": _t(2, 3, 3)},
    }[op]


# (op, the arguments that differ from _valid's, the error, the message's start)
BAD_INPUTS = [
    ("cam", {"x": _t(2, 3, 4)}, ValueError, "x must be 4-D (N, C, H, W), got 3-D"),
    ("cam", {"x": _t(2, 3, 4, 4).int()}, TypeError, "x must be a floating-point tensor, got Int"),
    ("cam", {"gamma": _t(2)}, ValueError, "gamma must hold one value, got shape [2]"),
    ("cam", {"gamma": torch.ones(1, dtype=torch.int64)}, TypeError, "gamma must be a floating-point tensor, got Long"),
    ("cam", {"gamma": _t(1, device="meta")}, ValueError, "gamma must be on cpu, got meta"),
    ("cam_backward", {"attn": _t(2, 3, 4)}, ValueError, "attn must have shape (N, C, C) = (2, 3, 3), got [2, 3, 4]"),
    ("cam_backward", {"attn": _t(2, 3, 3, dtype=F64)}, TypeError,
     "attn must be Float (the accumulation dtype of x, Float), got Double"),
    ("cam_backward", {"attn": _t(2, 3, 3, device="meta")}, ValueError, "attn must be on cpu, got meta"),
    ("cam_backward", {"grad_y": _t(2, 3, 4, 5)}, ValueError,
     "grad_y must match x's shape [2, 3, 4, 4] and dtype Float, got [2, 3, 4, 5] Float"),
    ("cam_backward", {"grad_y": _t(2, 3, 4, 4, device="meta")}, ValueError, "grad_y must be on cpu, got meta"),
    ("cam_backward", {"gamma": _t(1, 2)}, ValueError, "gamma must hold one value, got shape [1, 2]"),
]


@pytest.mark.parametrize("op,changed,error,start",
                         [pytest.param(*case, id=f"{case[0]}-{i}") for i, case in enumerate(BAD_INPUTS)])
def test_bad_inputs(compiled_ops, op, changed, error, start) -> None:
    """The C++ CPU kernel (called below the dispatcher's meta routing), and the Python check the
    reference and Triton backends and the fakes run, raise the same error with the same words."""
    assert_cpp_error_like_python(compiled_ops, ops_module, op, _valid(op) | changed, error, start)
