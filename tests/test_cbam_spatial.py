"""cbam_spatial on the C++ / CUDA / reference backends, against its Reference ops.

Every op through the public functions (`attnkernels.functional.cbam_spatial_pool`, `..._apply`)
on a backend, forward and autograd's gradients, against `attnkernels.ops.cbam_spatial.Reference`'s
forward and explicit backward (csrc/cbam_spatial_ops.cpp's formulas). The Reference itself is
checked against CBAM's composition in tests/test_cbam_spatial_reference.py; the Triton ops
under the interpreter in tests/test_cbam_spatial_triton.py. On a GPU the CUDA and Triton
backends run here too; only those cases skip on machines without one.
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
    on_backend,
    rounding_floor,
)

from attnkernels import backend
from attnkernels import functional as AF
from attnkernels.ops import cbam_spatial as ops_module

Ref = ops_module.Reference
F64, F32 = torch.float64, torch.float32
CASES = backend_cases(cpu=("cpu", "reference"), cuda=("cuda", "triton", "reference"))
# C = 1, odd C, C a multiple of the vector width and not; H != W; HW = 1; N = 1; two pixel
# blocks of the CPU kernels (H*W = 1320 > 1024).
SHAPES = [(2, 24, 7, 5), (3, 1, 4, 4), (2, 3, 6, 6), (2, 37, 5, 9), (3, 16, 1, 1), (1, 40, 3, 4), (2, 19, 33, 40)]
TOL = {F64: {"rtol": 1e-12, "atol": 1e-12}, F32: {"rtol": 2e-5, "atol": 2e-6}}
POOL_NAMES, APPLY_NAMES = ["d", "grad_x", "grad_gate"], ["y", "grad_x", "grad_gate", "grad_s"]


def shape_id(s) -> str:
    return "x".join(map(str, s))


def acc_of(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else F32


def make_gate(x: torch.Tensor) -> torch.Tensor:
    """CBAM's channel gate a (N, C) in (0, 1), in acc(x)."""
    return torch.rand(x.shape[:2], dtype=acc_of(x.dtype), device=x.device) * 0.9 + 0.05


def make_s(x: torch.Tensor) -> torch.Tensor:
    """A spatial gate s (N, 1, H, W) in (0, 1), in acc(x)."""
    n, _, h, w = x.shape
    return torch.rand(n, 1, h, w, dtype=acc_of(x.dtype), device=x.device) * 0.9 + 0.05


# ----------------------------------------------------------------------------------------
# Runs: the backend through autograd, and the Reference's forward and explicit backward
# ----------------------------------------------------------------------------------------
def pool_run(x, gate, g_d, backend_name):
    return grads_of(AF.cbam_spatial_pool, [x, gate], g_d, backend_name)


def apply_run(x, gate, s, g_y, backend_name):
    return grads_of(AF.cbam_spatial_apply, [x, gate, s], g_y, backend_name)


def pool_want(x, gate, g_d):
    d = Ref.cbam_spatial_pool(x, gate)
    return [d, *Ref.cbam_spatial_pool_backward(g_d, x, gate, d)]


def apply_want(x, gate, s, g_y):
    return [Ref.cbam_spatial_apply(x, gate, s), *Ref.cbam_spatial_apply_backward(g_y, x, gate, s)]


def in_f64(*ts):
    return [t.double() for t in ts]


def check_pool(x, gate, backend_name, g_d=None, **kw) -> list[torch.Tensor]:
    """The pool's d and gradients on the backend against the Reference (fp32: or as accurate,
    against fp64); returns the backend's results."""
    g_d = torch.randn_like(Ref.cbam_spatial_pool(x, gate)) if g_d is None else g_d
    got = pool_run(x, gate, g_d, backend_name)
    truths = lambda: pool_want(*in_f64(x, gate, g_d))  # noqa: E731
    assert_all_close(got, pool_want(x, gate, g_d), POOL_NAMES, truths, **(kw or TOL[acc_of(x.dtype)]))
    return got


def check_apply(x, gate, s, backend_name, **kw) -> list[torch.Tensor]:
    g_y = torch.randn_like(x)
    got = apply_run(x, gate, s, g_y, backend_name)
    truths = lambda: apply_want(*in_f64(x, gate, s, g_y))  # noqa: E731
    assert_all_close(got, apply_want(x, gate, s, g_y), APPLY_NAMES, truths, **(kw or TOL[acc_of(x.dtype)]))
    return got


# ----------------------------------------------------------------------------------------
# Against the Reference: shapes, dtypes, layouts
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_ops_match_reference(backend_name, device, dtype, layout, shape) -> None:
    x = make_input(shape, layout, dtype, device)
    gate = make_gate(x)
    d, grad_x, _ = check_pool(x, gate, backend_name)
    y, grad_x_apply, _, _ = check_apply(x, gate, make_s(x), backend_name)
    assert d.shape == (shape[0], 2, *shape[2:]) and d.dtype == acc_of(dtype) and d.is_contiguous()
    for t in (grad_x, y, grad_x_apply):
        assert t.dtype == dtype
        assert_layout_of(t, x)


@pytest.mark.parametrize("backend_name,device", CASES)
def test_expanded_and_strided_arguments(backend_name, device) -> None:
    """gate and s as strided views, and autograd's expanded gradients (loss = d[:, 1].sum())."""
    x = make_input((2, 11, 6, 7), "sliced", F64, device)
    gate = torch.rand(11, 2, dtype=F64, device=device).t()
    s = torch.rand(2, 1, 7, 6, dtype=F64, device=device).transpose(2, 3)
    for fn, args in ((AF.cbam_spatial_pool, (x, gate)), (AF.cbam_spatial_apply, (x, gate, s))):
        leaves = [leaf(t, True) for t in args]
        with backend.use_backend(backend_name):
            out = fn(*leaves)
        got = torch.autograd.grad(out[:, -1].sum(), leaves)
        ref_leaves = [leaf(t, True) for t in args]
        want = torch.autograd.grad(getattr(Ref, fn.__name__)(*ref_leaves)[:, -1].sum(), ref_leaves)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **TOL[F64])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA tests need a GPU"))])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_half_precision_error_like_eager(device, dtype, layout) -> None:
    """fp16/bf16: the fused results' error against fp64 (on the same rounded inputs) is no
    worse than twice the same-precision eager composition's (x*a, then mean/amax cat; x*a*s),
    plus two units of rounding at the result's scale."""
    x = make_input((4, 96, 14, 14), layout, dtype, device)
    gate, s = make_gate(x), make_s(x)  # fp32, as the public functions take them
    g_d = torch.randn(4, 2, 14, 14, dtype=F32, device=device)
    g_y = torch.randn_like(x)

    def pool_eager(x, a):
        f = x * a[:, :, None, None]
        return torch.cat([f.mean(1, keepdim=True), f.amax(1, keepdim=True)], dim=1)

    def apply_eager(x, a, s):
        return x * a[:, :, None, None] * s

    for fused, eager, args, g in ((AF.cbam_spatial_pool, pool_eager, (x, gate), g_d),
                                  (AF.cbam_spatial_apply, apply_eager, (x, gate, s), g_y)):
        got = grads_of(fused, list(args), g, device)
        exact = grads_of(eager, in_f64(*args), g.double(), "reference")
        low = grads_of(eager, [t.to(dtype) for t in args], g.to(dtype), "reference")
        names = [fused.__name__, "grad_x", "grad_gate", "grad_s"][: len(got)]
        assert_error_like_eager(got, low, exact, floor=rounding_floor(dtype), names=names)


@pytest.mark.parametrize("dtype", [F64, F32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pool_is_hams_one_group_case_bit_for_bit(compiled_ops, dtype, layout) -> None:
    """The one-group kernels compute ham_spatial_pool's d1 with c_im = C (mask 1) exactly."""
    x = make_input((2, 21, 33, 40), layout, dtype, "cpu")
    gate = make_gate(x)
    assert torch.equal(compiled_ops.cbam_spatial_pool(x, gate), compiled_ops.ham_spatial_pool(x, gate, 21)[0])


# ----------------------------------------------------------------------------------------
# Ties, NaN and inf
# ----------------------------------------------------------------------------------------
def tied_inputs(device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x, gate) whose F ties at the max: all C channels equal (one gate value per sample);
    channels 1 and C-2 equal, above the others, with the same gate; ReLU zeros (a pixel whose
    channels are all negative ties all of them at F = 0)."""
    n, c, h, w = 2, 13, 5, 6
    same = torch.randn(n, 1, h, w, dtype=F64, device=device).expand(n, c, h, w).contiguous()
    flat_gate = torch.rand(n, 1, dtype=F64, device=device).expand(n, c).contiguous()
    some = torch.randn(n, c, h, w, dtype=F64, device=device)
    some[:, c - 2] = some[:, 1] = some.abs().amax(1) + 1
    some_gate = torch.rand(n, c, dtype=F64, device=device) * 0.5
    some_gate[:, c - 2] = some_gate[:, 1] = 0.9
    relu = torch.relu(torch.randn(n, 3, h, w, dtype=F64, device=device))
    return [(same, flat_gate), (some, some_gate), (relu, torch.rand(n, 3, dtype=F64, device=device) + 0.1)]


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_ties_share_the_max_gradient(backend_name, device, layout) -> None:
    for x, gate in tied_inputs(device):
        x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        d = check_pool(x, gate, backend_name)[0]
        f = x * gate[:, :, None, None]
        assert (f == d[:, 1:]).sum(1).max() > 1  # the input really ties


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_and_inf_in_x(backend_name, device, layout) -> None:
    """NaN: d's max and every channel's gradient at its pixel are NaN (torch.amax); the other
    pixels stay finite. inf, -inf: they pass through the sum, the max and y = F * s."""
    x = make_input((2, 9, 4, 5), layout, F64, device)
    x[1, 2, 1, 1] = float("nan")
    x[0, 4, 2, 3], x[0, 5, 0, 0], x[1, 0, 3, 4] = float("inf"), float("-inf"), float("inf")
    gate = make_gate(x)
    tol = {**TOL[F64], "equal_nan": True}
    d, grad_x, _ = check_pool(x, gate, backend_name, **tol)
    check_apply(x, gate, make_s(x), backend_name, **tol)
    assert torch.isnan(d[1, 1, 1, 1]) and torch.isnan(grad_x[1, :, 1, 1]).all()
    assert torch.isfinite(d[1, :, 0]).all() and torch.isfinite(grad_x[1, :, 0]).all()
    assert d[0, 1, 2, 3] == float("inf") and d[0, 0, 0, 0] == float("-inf")


# ----------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile, determinism
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(backend_name, device, layout) -> None:
    x = leaf(make_input((2, 5, 3, 4), layout, F64, device), True)
    gate, s = leaf(make_gate(x), True), leaf(make_s(x), True)
    assert torch.autograd.gradcheck(on_backend(AF.cbam_spatial_pool, backend_name), (x, gate), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(on_backend(AF.cbam_spatial_apply, backend_name), (x, gate, s), eps=1e-6, atol=1e-7)


def _op_samples():
    samples = {name: [] for name in ("cbam_spatial_pool", "cbam_spatial_pool_backward", "cbam_spatial_apply",
                                      "cbam_spatial_apply_backward")}
    for layout, dtype in (("nchw", F64), ("channels_last", F64), ("sliced", F64), ("channels_last", torch.float16)):
        x = make_input((2, 6, 5, 3), layout, dtype, "cpu")
        gate, s = make_gate(x), make_s(x)
        d = Ref.cbam_spatial_pool(x, gate)
        grad = dtype == F64  # autograd's check wants fp64
        samples["cbam_spatial_pool"].append((leaf(x, grad), leaf(gate, grad)))
        samples["cbam_spatial_pool_backward"].append((torch.randn_like(d), leaf(x), leaf(gate), leaf(d)))
        samples["cbam_spatial_apply"].append((leaf(x, grad), leaf(gate, grad), leaf(s, grad)))
        samples["cbam_spatial_apply_backward"].append((torch.randn_like(x), leaf(x), leaf(gate), leaf(s)))
    return samples


@pytest.mark.parametrize("op_name", list(_op_samples()))
def test_opcheck(op_name, compiled_ops) -> None:
    op = getattr(compiled_ops, op_name).default
    for args in _op_samples()[op_name]:
        torch.library.opcheck(op, args)


def cbam_spatial_half(x, gate, w):
    """CBAM's spatial half on the public functions, a 3x3 conv standing in for its 7x7."""
    d = AF.cbam_spatial_pool(x, gate)
    s = torch.sigmoid(torch.nn.functional.conv2d(d, w, padding=1))
    return AF.cbam_spatial_apply(x, gate, s)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_compile_fullgraph_on_cpu(layout, compiled_ops) -> None:
    torch._dynamo.reset()
    x = make_input((2, 24, 7, 5), layout, F32, "cpu")
    gate, w, g = make_gate(x), torch.randn(1, 2, 3, 3), torch.randn(2, 24, 7, 5)
    compiled = torch.compile(cbam_spatial_half, fullgraph=True)
    eager = grads_of(cbam_spatial_half, [x, gate, w], g, "cpu")
    got = grads_of(compiled, [x, gate, w], g, "cpu")
    assert_all_close(got, eager, ["y", "grad_x", "grad_gate", "grad_w"], **TOL[F32])


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_deterministic(backend_name, device, layout) -> None:
    """Bitwise the same results twice, and on the cpu backend with one thread as with several:
    two pixel blocks per sample, so grad_gate sums partials."""
    x = make_input((3, 37, 33, 40), layout, F32, device)
    gate, s = make_gate(x), make_s(x)
    g_d, g_y = torch.randn(3, 2, 33, 40, device=device), torch.randn_like(x)

    def run():
        return pool_run(x, gate, g_d, backend_name) + apply_run(x, gate, s, g_y, backend_name)

    first, runs = run(), [run()]
    if backend_name == "cpu":  # the fixed pixel blocks: the thread count changes nothing
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            runs.append(run())
        finally:
            torch.set_num_threads(threads)
    for other in runs:
        assert all(torch.equal(a, b) for a, b in zip(first, other))


def test_saves_no_full_size_tensor_but_x() -> None:
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    gate, w = make_gate(x).requires_grad_(), torch.randn(1, 2, 3, 3)
    saved = []
    with backend.use_backend("cpu"), torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t) or t, lambda t: t
    ):
        cbam_spatial_half(x, gate, w)
    full = [t for t in saved if t.numel() >= x.numel()]
    assert full and all(t.data_ptr() == x.data_ptr() for t in full), [tuple(t.shape) for t in full]


# ----------------------------------------------------------------------------------------
# Bad input: the C++ kernels raise the Python checks' errors, word for word
# ----------------------------------------------------------------------------------------
def _t(*shape, dtype=F32, device="cpu"):
    return torch.rand(*shape, dtype=dtype, device=device)


def _valid(op: str) -> dict:
    """Valid float32 arguments of `op`, by schema name."""
    x, gate, s, d = _t(2, 3, 4, 4), _t(2, 3), _t(2, 1, 4, 4), _t(2, 2, 4, 4)
    return {
        "cbam_spatial_pool": {"x": x, "gate": gate},
        "cbam_spatial_pool_backward": {"grad_d": d, "x": x, "gate": gate, "d": d.clone()},
        "cbam_spatial_apply": {"x": x, "gate": gate, "s": s},
        "cbam_spatial_apply_backward": {"grad_y": _t(2, 3, 4, 4), "x": x, "gate": gate, "s": s},
    }[op]


# (op, the arguments that differ from _valid's, the error, the message's start)
BAD_INPUTS = [
    ("cbam_spatial_pool", {"x": _t(2, 3, 4)}, ValueError, "x must be 4-D (N, C, H, W), got 3-D"),
    ("cbam_spatial_pool", {"x": _t(2, 3, 4, 4).int()}, TypeError, "x must be a floating-point tensor, got Int"),
    ("cbam_spatial_pool", {"gate": _t(2, 4)}, ValueError, "gate must have shape (N, C) = (2, 3), got [2, 4]"),
    ("cbam_spatial_pool", {"gate": _t(2, 3, 1)}, ValueError, "gate must have shape (N, C)"),
    ("cbam_spatial_pool", {"gate": _t(2, 3, dtype=F64)}, TypeError,
     "gate must be Float (the accumulation dtype of x, Float), got Double"),
    ("cbam_spatial_pool", {"x": _t(2, 3, 4, 4, dtype=torch.float16), "gate": _t(2, 3, dtype=torch.float16)},
     TypeError, "gate must be Float (the accumulation dtype of x, Half), got Half"),
    ("cbam_spatial_pool", {"gate": _t(2, 3, device="meta")}, ValueError, "gate must be on cpu, got meta"),
    ("cbam_spatial_pool_backward", {"grad_d": _t(2, 1, 4, 4)}, ValueError,
     "grad_d must have shape (N, 2, H, W) = (2, 2, 4, 4), got [2, 1, 4, 4]"),
    ("cbam_spatial_pool_backward", {"d": _t(2, 2, 4, 3)}, ValueError, "d must have shape (N, 2, H, W)"),
    ("cbam_spatial_pool_backward", {"d": _t(2, 2, 4, 4, dtype=F64)}, TypeError,
     "d must be Float (the accumulation dtype of x, Float), got Double"),
    ("cbam_spatial_pool_backward", {"grad_d": _t(2, 2, 4, 4, device="meta")}, ValueError,
     "grad_d must be on cpu, got meta"),
    ("cbam_spatial_pool_backward", {"gate": _t(3, 3)}, ValueError, "gate must have shape (N, C)"),
    ("cbam_spatial_pool_backward", {"x": _t(2, 3, 4, 4, 1)}, ValueError, "x must be 4-D"),
    ("cbam_spatial_apply", {"s": _t(2, 2, 4, 4)}, ValueError,
     "s must have shape (N, 1, H, W) = (2, 1, 4, 4), got [2, 2, 4, 4]"),
    ("cbam_spatial_apply", {"s": _t(2, 1, 4)}, ValueError, "s must have shape (N, 1, H, W)"),
    ("cbam_spatial_apply", {"s": _t(2, 1, 4, 4, dtype=torch.float16)}, TypeError,
     "s must be Float (the accumulation dtype of x, Float), got Half"),
    ("cbam_spatial_apply", {"s": _t(2, 1, 4, 4, device="meta")}, ValueError, "s must be on cpu, got meta"),
    ("cbam_spatial_apply", {"gate": _t(2)}, ValueError, "gate must have shape (N, C) = (2, 3), got [2]"),
    ("cbam_spatial_apply", {"x": _t(2, 3, 4, 4) > 0.5}, TypeError, "x must be a floating-point tensor, got Bool"),
    ("cbam_spatial_apply_backward", {"grad_y": _t(2, 3, 4, 5)}, ValueError,
     "grad_y must match x's shape [2, 3, 4, 4] and dtype Float, got [2, 3, 4, 5] Float"),
    ("cbam_spatial_apply_backward", {"grad_y": _t(2, 3, 4, 4, dtype=F64)}, ValueError,
     "grad_y must match x's shape [2, 3, 4, 4] and dtype Float, got [2, 3, 4, 4] Double"),
    ("cbam_spatial_apply_backward", {"grad_y": _t(2, 3, 4, 4, device="meta")}, ValueError,
     "grad_y must be on cpu, got meta"),
    ("cbam_spatial_apply_backward", {"s": _t(2, 1, 5, 4)}, ValueError, "s must have shape (N, 1, H, W)"),
]


@pytest.mark.parametrize("op,changed,error,start",
                         [pytest.param(*case, id=f"{case[0]}-{i}") for i, case in enumerate(BAD_INPUTS)])
def test_bad_inputs(compiled_ops, op, changed, error, start) -> None:
    """The C++ CPU kernel (called below the dispatcher's meta routing), and the Python check the
    reference and Triton backends and the fakes run, raise the same error with the same words."""
    assert_cpp_error_like_python(compiled_ops, ops_module, op, _valid(op) | changed, error, start)
