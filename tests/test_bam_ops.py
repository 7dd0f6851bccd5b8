"""bam on the C++ / CUDA / reference backends, against its Reference ops.

bam_apply through the public function (`attnkernels.functional.bam_apply`) on a backend,
forward and autograd's gradients, against `attnkernels.ops.bam.Reference`'s forward and
explicit backward (csrc/bam_ops.cpp's formulas); the Reference against BAM's own composition.
The Triton ops under the interpreter are in tests/test_bam_triton.py; the module in
tests/test_bam.py. On a GPU the CUDA and Triton backends run here too; only those cases skip on
machines without one.
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
from attnkernels.ops import bam as ops_module

Ref = ops_module.Reference
F64, F32 = torch.float64, torch.float32
CASES = backend_cases(cpu=("cpu", "reference"), cuda=("cuda", "triton", "reference"))
# C = 1, odd C, C a multiple of the vector width and not; H != W; HW = 1; N = 1; several pixel
# blocks of the CPU kernels (H*W = 1320 > 1024).
SHAPES = [(2, 24, 7, 5), (3, 1, 4, 4), (2, 3, 6, 6), (2, 37, 5, 9), (3, 16, 1, 1), (1, 40, 3, 4), (2, 19, 33, 40)]
# Planes past one CUDA block of pixels and of channels, on a GPU only.
CUDA_LARGE_SHAPES = [(2, 300, 45, 47), (1, 1030, 17, 3)]
TOL = {F64: {"rtol": 1e-12, "atol": 1e-12}, F32: {"rtol": 2e-5, "atol": 2e-6}}
NAMES = ["y", "grad_x", "grad_mc", "grad_ms"]


def shape_id(s) -> str:
    return "x".join(map(str, s))


def acc_of(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else F32


def make_branches(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BAM's branch outputs mc (N, C) and ms (N, 1, H, W), in acc(x): logits of either sign,
    spread so that sigmoid(mc + ms) runs from near 0 to near 1."""
    n, c, h, w = x.shape
    mc = torch.randn(n, c, dtype=acc_of(x.dtype), device=x.device) * 2
    ms = torch.randn(n, 1, h, w, dtype=acc_of(x.dtype), device=x.device) * 2
    return mc, ms


# ----------------------------------------------------------------------------------------
# Runs: the backend through autograd, and the Reference's forward and explicit backward
# ----------------------------------------------------------------------------------------
def apply_run(x, mc, ms, g_y, backend_name):
    return grads_of(AF.bam_apply, [x, mc, ms], g_y, backend_name)


def apply_want(x, mc, ms, g_y):
    return [Ref.bam_apply(x, mc, ms), *Ref.bam_apply_backward(g_y, x, mc, ms)]


def in_f64(*ts):
    return [t.double() for t in ts]


def check_apply(x, mc, ms, backend_name, **kw) -> list[torch.Tensor]:
    """y and the three gradients on the backend against the Reference (fp32: or as accurate,
    against fp64); returns the backend's results."""
    g_y = torch.randn_like(x)
    got = apply_run(x, mc, ms, g_y, backend_name)
    truths = lambda: apply_want(*in_f64(x, mc, ms, g_y))  # noqa: E731
    assert_all_close(got, apply_want(x, mc, ms, g_y), NAMES, truths, **(kw or TOL[acc_of(x.dtype)]))
    return got


# ----------------------------------------------------------------------------------------
# The Reference against BAM's composition
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_is_bams_output(layout) -> None:
    """Reference.bam_apply is `x * (1 + sigmoid(mc + ms))` as reference.BAM writes it, and its
    explicit backward is autograd's gradient of that."""
    x = leaf(make_input((2, 10, 5, 6), layout, F64, "cpu"), True)
    mc, ms = (leaf(t, True) for t in make_branches(x))
    eager = x * (1 + torch.sigmoid(mc[:, :, None, None] + ms))
    g_y = torch.randn_like(x)
    want = [eager, *torch.autograd.grad(eager, (x, mc, ms), g_y)]
    got = [Ref.bam_apply(x, mc, ms), *Ref.bam_apply_backward(g_y, x, mc, ms)]
    assert_all_close(got, want, NAMES, **TOL[F64])


# ----------------------------------------------------------------------------------------
# Against the Reference: shapes, dtypes, layouts
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_ops_match_reference(backend_name, device, dtype, layout, shape) -> None:
    x = make_input(shape, layout, dtype, device)
    y, grad_x, grad_mc, grad_ms = check_apply(x, *make_branches(x), backend_name)
    assert grad_mc.shape == shape[:2] and grad_ms.shape == (shape[0], 1, *shape[2:])
    assert grad_mc.dtype == grad_ms.dtype == acc_of(dtype)
    for t in (y, grad_x):
        assert t.dtype == dtype
        assert_layout_of(t, x)


@pytest.mark.parametrize("backend_name,device", [c for c in CASES if c.values[1] == "cuda"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", CUDA_LARGE_SHAPES, ids=shape_id)
def test_large_planes_match_reference(backend_name, device, layout, shape) -> None:
    x = make_input(shape, layout, F64, device)
    check_apply(x, *make_branches(x), backend_name)


@pytest.mark.parametrize("backend_name,device", CASES)
def test_expanded_and_strided_arguments(backend_name, device) -> None:
    """mc as (N, C, 1, 1) and as a transposed view, ms as a strided view, and autograd's
    expanded gradient (loss = y[:, -1].sum())."""
    x = make_input((2, 11, 6, 7), "sliced", F64, device)
    mc = torch.randn(11, 2, dtype=F64, device=device).t()
    ms = torch.randn(2, 1, 7, 6, dtype=F64, device=device).transpose(2, 3)
    for mc_arg in (mc, mc[:, :, None, None]):
        leaves = [leaf(t, True) for t in (x, mc_arg, ms)]
        with backend.use_backend(backend_name):
            got = torch.autograd.grad(AF.bam_apply(*leaves)[:, -1].sum(), leaves)
        ref_leaves = [leaf(t, True) for t in (x, mc, ms)]
        want = torch.autograd.grad(Ref.bam_apply(*ref_leaves)[:, -1].sum(), ref_leaves)
        torch.testing.assert_close(got[0], want[0], **TOL[F64])
        torch.testing.assert_close(got[1].reshape(2, 11), want[1], **TOL[F64])
        torch.testing.assert_close(got[2], want[2], **TOL[F64])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_half_precision_error_like_eager(device, dtype, layout) -> None:
    """fp16/bf16: the fused results' error against fp64 (on the same rounded inputs) is no
    worse than twice the same-precision eager composition's (`x * (1 + sigmoid(mc + ms))` in
    x's dtype, as reference.BAM runs it), plus two units of rounding at the result's scale."""
    x = make_input((4, 96, 14, 10), layout, dtype, device)
    mc, ms = make_branches(x)  # fp32, as the public function takes them
    g_y = torch.randn_like(x)

    def eager(x, mc, ms):
        return x * (1 + torch.sigmoid(mc[:, :, None, None] + ms))

    got = grads_of(AF.bam_apply, [x, mc, ms], g_y, device)
    exact = grads_of(eager, in_f64(x, mc, ms), g_y.double(), "reference")
    low = grads_of(eager, [t.to(dtype) for t in (x, mc, ms)], g_y, "reference")
    assert_error_like_eager(got, low, exact, floor=rounding_floor(dtype), names=NAMES)


# ----------------------------------------------------------------------------------------
# NaN and inf
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_and_inf(backend_name, device, layout) -> None:
    """NaN in x poisons its y, its grad_mc and grad_ms entries only; inf in x passes through
    y; saturated logits (mc + ms = +-inf) give sig = 1 or 0 and a zero dz, as torch.sigmoid."""
    x = make_input((2, 9, 4, 5), layout, F64, device)
    x[1, 2, 1, 1] = float("nan")
    x[0, 4, 2, 3], x[0, 5, 0, 0] = float("inf"), float("-inf")
    mc, ms = make_branches(x)
    mc[0, 7], ms[1, 0, 3, 4] = float("inf"), float("-inf")
    y, _, grad_mc, grad_ms = check_apply(x, mc, ms, backend_name, **TOL[F64], equal_nan=True)
    assert torch.isnan(y[1, 2, 1, 1]) and torch.isnan(grad_mc[1, 2]) and torch.isnan(grad_ms[1, 0, 1, 1])
    assert torch.isfinite(grad_mc[0, :4]).all() and torch.isfinite(grad_ms[1, 0, 0]).all()
    assert y[0, 4, 2, 3] == float("inf") and y[0, 5, 0, 0] == float("-inf")


# ----------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile, determinism, saved tensors
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(backend_name, device, layout) -> None:
    x = leaf(make_input((2, 5, 3, 4), layout, F64, device), True)
    mc, ms = (leaf(t, True) for t in make_branches(x))
    assert torch.autograd.gradcheck(on_backend(AF.bam_apply, backend_name), (x, mc, ms), eps=1e-6, atol=1e-7)


def _op_samples():
    samples = {"bam_apply": [], "bam_apply_backward": []}
    for layout, dtype in (("nchw", F64), ("channels_last", F64), ("sliced", F64), ("channels_last", torch.float16)):
        x = make_input((2, 6, 5, 3), layout, dtype, "cpu")
        mc, ms = make_branches(x)
        grad = dtype == F64  # autograd's check wants fp64
        samples["bam_apply"].append((leaf(x, grad), leaf(mc, grad), leaf(ms, grad)))
        samples["bam_apply_backward"].append((torch.randn_like(x), leaf(x), leaf(mc), leaf(ms)))
    return samples


@pytest.mark.parametrize("op_name", list(_op_samples()))
def test_opcheck(op_name, compiled_ops) -> None:
    op = getattr(compiled_ops, op_name).default
    for args in _op_samples()[op_name]:
        torch.library.opcheck(op, args)


def bam_tail(x, w_c, w_s):
    """A BAM-shaped use of the public function: mc from the mean over the pixels, ms from a
    3x3 conv of x standing in for the spatial branch."""
    mc = x.mean((2, 3)) @ w_c
    ms = torch.nn.functional.conv2d(x, w_s, padding=1)
    return AF.bam_apply(x, mc, ms)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_compile_fullgraph_on_cpu(layout, compiled_ops) -> None:
    torch._dynamo.reset()
    x = make_input((2, 24, 7, 5), layout, F32, "cpu")
    w_c, w_s, g = torch.randn(24, 24) * 0.2, torch.randn(1, 24, 3, 3) * 0.1, torch.randn(2, 24, 7, 5)
    compiled = torch.compile(bam_tail, fullgraph=True)
    eager = grads_of(bam_tail, [x, w_c, w_s], g, "cpu")
    got = grads_of(compiled, [x, w_c, w_s], g, "cpu")
    assert_all_close(got, eager, ["y", "grad_x", "grad_w_c", "grad_w_s"], **TOL[F32])


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_deterministic(backend_name, device, layout) -> None:
    """Bitwise the same results twice, and on the cpu backend with one thread as with several:
    several pixel blocks per sample, so grad_mc sums partials."""
    x = make_input((3, 37, 33, 40), layout, F32, device)
    mc, ms = make_branches(x)
    g_y = torch.randn_like(x)
    first, runs = apply_run(x, mc, ms, g_y, backend_name), [apply_run(x, mc, ms, g_y, backend_name)]
    if backend_name == "cpu":  # the fixed pixel blocks: the thread count changes nothing
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            runs.append(apply_run(x, mc, ms, g_y, backend_name))
        finally:
            torch.set_num_threads(threads)
    for other in runs:
        assert all(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("backend_name,device", CASES)
def test_empty_inputs(backend_name, device) -> None:
    """No pixels or no channels: y and grad_x are empty, grad_mc and grad_ms are zeros."""
    for shape in ((2, 3, 0, 4), (2, 0, 3, 4)):
        x = torch.randn(shape, device=device)
        mc, ms = make_branches(x)
        y, grad_x, grad_mc, grad_ms = apply_run(x, mc, ms, torch.randn_like(x), backend_name)
        assert y.shape == grad_x.shape == x.shape
        assert torch.equal(grad_mc, torch.zeros_like(mc)) and torch.equal(grad_ms, torch.zeros_like(ms))


def test_saves_no_full_size_tensor_but_x() -> None:
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    w_c, w_s = torch.randn(16, 16, requires_grad=True), torch.randn(1, 16, 3, 3, requires_grad=True)
    saved = []
    with backend.use_backend("cpu"), torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t) or t, lambda t: t
    ):
        bam_tail(x, w_c, w_s)
    full = [t for t in saved if t.numel() >= x.numel()]
    assert full and all(t.data_ptr() == x.data_ptr() for t in full), [tuple(t.shape) for t in full]


# ----------------------------------------------------------------------------------------
# Bad input: the C++ kernels raise the Python checks' errors, word for word
# ----------------------------------------------------------------------------------------
def _t(*shape, dtype=F32, device="cpu"):
    return torch.rand(*shape, dtype=dtype, device=device)


def _valid(op: str) -> dict:
    """Valid float32 arguments of `op`, by schema name."""
    x, mc, ms = _t(2, 3, 4, 4), _t(2, 3), _t(2, 1, 4, 4)
    return {
        "bam_apply": {"x": x, "mc": mc, "ms": ms},
        "bam_apply_backward": {"grad_y": _t(2, 3, 4, 4), "x": x, "mc": mc, "ms": ms},
    }[op]


# (op, the arguments that differ from _valid's, the error, the message's start)
BAD_INPUTS = [
    ("bam_apply", {"x": _t(2, 3, 4)}, ValueError, "x must be 4-D (N, C, H, W), got 3-D"),
    ("bam_apply", {"x": _t(2, 3, 4, 4).int()}, TypeError, "x must be a floating-point tensor, got Int"),
    ("bam_apply", {"x": _t(2, 3, 4, 4) > 0.5}, TypeError, "x must be a floating-point tensor, got Bool"),
    ("bam_apply", {"mc": _t(2, 4)}, ValueError, "mc must have shape (N, C) = (2, 3), got [2, 4]"),
    ("bam_apply", {"mc": _t(2, 3, 1, 1)}, ValueError, "mc must have shape (N, C)"),
    ("bam_apply", {"mc": _t(2, 3, dtype=F64)}, TypeError,
     "mc must be Float (the accumulation dtype of x, Float), got Double"),
    ("bam_apply", {"x": _t(2, 3, 4, 4, dtype=torch.float16), "mc": _t(2, 3, dtype=torch.float16)},
     TypeError, "mc must be Float (the accumulation dtype of x, Half), got Half"),
    ("bam_apply", {"mc": _t(2, 3, device="meta")}, ValueError, "mc must be on cpu, got meta"),
    ("bam_apply", {"ms": _t(2, 2, 4, 4)}, ValueError,
     "ms must have shape (N, 1, H, W) = (2, 1, 4, 4), got [2, 2, 4, 4]"),
    ("bam_apply", {"ms": _t(2, 1, 4)}, ValueError, "ms must have shape (N, 1, H, W)"),
    ("bam_apply", {"ms": _t(2, 1, 4, 4, dtype=torch.float16)}, TypeError,
     "ms must be Float (the accumulation dtype of x, Float), got Half"),
    ("bam_apply", {"ms": _t(2, 1, 4, 4, device="meta")}, ValueError, "ms must be on cpu, got meta"),
    ("bam_apply_backward", {"grad_y": _t(2, 3, 4, 5)}, ValueError,
     "grad_y must match x's shape [2, 3, 4, 4] and dtype Float, got [2, 3, 4, 5] Float"),
    ("bam_apply_backward", {"grad_y": _t(2, 3, 4, 4, dtype=F64)}, ValueError,
     "grad_y must match x's shape [2, 3, 4, 4] and dtype Float, got [2, 3, 4, 4] Double"),
    ("bam_apply_backward", {"grad_y": _t(2, 3, 4, 4, device="meta")}, ValueError,
     "grad_y must be on cpu, got meta"),
    ("bam_apply_backward", {"ms": _t(2, 1, 5, 4)}, ValueError, "ms must have shape (N, 1, H, W)"),
    ("bam_apply_backward", {"mc": _t(3, 3)}, ValueError, "mc must have shape (N, C)"),
]


@pytest.mark.parametrize("op,changed,error,start",
                         [pytest.param(*case, id=f"{case[0]}-{i}") for i, case in enumerate(BAD_INPUTS)])
def test_bad_inputs(compiled_ops, op, changed, error, start) -> None:
    """The C++ CPU kernel (called below the dispatcher's meta routing), and the Python check the
    reference and Triton backends and the fakes run, raise the same error with the same words."""
    assert_cpp_error_like_python(compiled_ops, ops_module, op, _valid(op) | changed, error, start)
