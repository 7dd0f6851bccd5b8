"""triplet's ops on every backend (C++ CPU and reference here; CUDA, Triton and reference on
CUDA tensors on a GPU), against its Reference ops.

Every op through the public functions (`attnkernels.functional.triplet_pool`, `triplet_apply`)
on a backend, forward and autograd's gradients, against `attnkernels.ops.triplet.Reference`'s
forward and explicit backward (csrc/triplet_ops.cpp's formulas). The Reference itself is checked
against Triplet's composition in tests/test_triplet_reference.py, the fused module in
tests/test_triplet.py (compile, saved tensors), the Triton kernels under the interpreter in
tests/test_triplet_triton.py. The CUDA cases need a GPU (scripts/gpu_check.sh runs them).
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
    without_reference,
)

from attnkernels import backend
from attnkernels import functional as AF
from attnkernels.ops import triplet as ops_module

Ref = ops_module.Reference
F64, F32 = torch.float64, torch.float32
CASES = backend_cases(cpu=("cpu", "reference"), cuda=("cuda", "triton", "reference"))
# The CPU kernels' channel blocks (csrc/cpu/triplet.cpp's kChannelBlock, kChannelBlockCL).
BLOCK, BLOCK_CL = 64, 256
# C = 1, odd C, C a multiple of the vector width and not; H != W; HW = 1; N = 1; several
# channel blocks, C a multiple of the block (2 blocks) and not (3 blocks, the last partial),
# in NCHW and in channels_last.
SHAPES = [(2, 24, 7, 5), (3, 1, 4, 4), (2, 3, 6, 6), (2, 37, 5, 9), (3, 16, 1, 1), (1, 40, 3, 4),
          (2, 2 * BLOCK, 3, 5), (2, 2 * BLOCK + 22, 5, 3), (1, BLOCK_CL + 44, 2, 3)]
# CUDA (csrc/cuda/triplet.cu): shapes that cut x[n] into several bricks along every axis, so
# that each map combines partials: channel and column tiles of at most 2048 elements a row (W
# or C over 256 on the contiguous axis), row bands of 16 rows or more where blocks are few.
CUDA_BRICK_SHAPES = [(3, BLOCK_CL + 37, 37, 300), (1, 700, 33, 5), (1, 3, 40, 2100)]
TOL = {F64: {"rtol": 1e-12, "atol": 1e-12}, F32: {"rtol": 2e-5, "atol": 2e-6}}
POOL_NAMES = ["d_hw", "d_cw", "d_hc", "grad_x"]
APPLY_NAMES = ["y", "grad_x", "grad_s_hw", "grad_s_cw", "grad_s_hc"]


def shape_id(s) -> str:
    return "x".join(map(str, s))


def acc_of(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else F32


def make_gates(x: torch.Tensor) -> list[torch.Tensor]:
    """s_hw, s_cw, s_hc in (0, 1), in acc(x), each in its gate's plane."""
    return [torch.rand(ops_module.plane_shape(x, g, 1), dtype=acc_of(x.dtype), device=x.device) * 0.9 + 0.05
            for g in ops_module.GATES]


def make_map_grads(x: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of d_hw, d_cw, d_hc, in acc(x)."""
    return [torch.randn(ops_module.plane_shape(x, g, 2), dtype=acc_of(x.dtype), device=x.device)
            for g in ops_module.GATES]


# ----------------------------------------------------------------------------------------
# Runs: the backend through autograd, and the Reference's forward and explicit backward
# ----------------------------------------------------------------------------------------
def pool_want(x, g_d):
    d = Ref.triplet_pool(x)
    return [*d, Ref.triplet_pool_backward(*g_d, x, *d)]


def apply_want(x, s, g_y):
    return [Ref.triplet_apply(x, *s), *Ref.triplet_apply_backward(g_y, x, *s)]


def in_f64(ts):
    return [t.double() for t in ts]


def check_pool(x, backend_name, g_d=None, **kw) -> list[torch.Tensor]:
    """The pool's maps and grad_x on the backend against the Reference (fp32: or as accurate,
    against fp64); returns the backend's results."""
    g_d = make_map_grads(x) if g_d is None else g_d
    got = grads_of(AF.triplet_pool, [x], g_d, backend_name)
    truths = lambda: pool_want(x.double(), in_f64(g_d))  # noqa: E731
    assert_all_close(got, pool_want(x, g_d), POOL_NAMES, truths, **(kw or TOL[acc_of(x.dtype)]))
    return got


def check_apply(x, s, backend_name, **kw) -> list[torch.Tensor]:
    g_y = torch.randn_like(x)
    got = grads_of(AF.triplet_apply, [x, *s], g_y, backend_name)
    truths = lambda: apply_want(x.double(), in_f64(s), g_y.double())  # noqa: E731
    assert_all_close(got, apply_want(x, s, g_y), APPLY_NAMES, truths, **(kw or TOL[acc_of(x.dtype)]))
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
    d_hw, d_cw, d_hc, grad_x = check_pool(x, backend_name)
    y, grad_x_apply, *grad_s = check_apply(x, make_gates(x), backend_name)
    for d, gate in zip((d_hw, d_cw, d_hc), ops_module.GATES):
        assert d.shape == ops_module.plane_shape(x, gate, 2) and d.dtype == acc_of(dtype) and d.is_contiguous()
    for g, gate in zip(grad_s, ops_module.GATES):
        assert g.shape == ops_module.plane_shape(x, gate, 1) and g.dtype == acc_of(dtype)
    for t in (grad_x, y, grad_x_apply):
        assert t.dtype == dtype
    # autograd through the Reference's permutes gives grad_x in a layout of its own choosing
    for t in (y, grad_x, grad_x_apply) if backend_name != "reference" else (y,):
        assert_layout_of(t, x)


@pytest.mark.parametrize("backend_name,device", [c for c in CASES if c.values[1] == "cuda"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", CUDA_BRICK_SHAPES, ids=shape_id)
def test_large_planes_match_reference(backend_name, device, layout, shape) -> None:
    x = make_input(shape, layout, F64, device)
    check_pool(x, backend_name)
    check_apply(x, make_gates(x), backend_name)


@pytest.mark.parametrize("backend_name,device", CASES)
def test_expanded_and_strided_arguments(backend_name, device) -> None:
    """The gates as strided views, and autograd's expanded gradients (loss = one map's mean
    plane summed: every grad_d arrives as an expanded zero-stride tensor or a zeros fill)."""
    x = make_input((2, 11, 6, 7), "sliced", F64, device)
    s = [torch.rand(2, 1, 7, 6, dtype=F64, device=device).transpose(2, 3),
         torch.rand(2, 1, 7, 11, dtype=F64, device=device).transpose(2, 3),
         torch.rand(2, 1, 11, 6, dtype=F64, device=device).transpose(2, 3)]
    for k in range(3):
        leaves, ref_leaves = [leaf(x, True)], [leaf(x, True)]
        with backend.use_backend(backend_name):
            got = torch.autograd.grad(AF.triplet_pool(*leaves)[k][:, -1].sum(), leaves)
        want = torch.autograd.grad(Ref.triplet_pool(*ref_leaves)[k][:, -1].sum(), ref_leaves)
        torch.testing.assert_close(got, want, **TOL[F64])
    leaves, ref_leaves = [leaf(t, True) for t in (x, *s)], [leaf(t, True) for t in (x, *s)]
    with backend.use_backend(backend_name):
        got = torch.autograd.grad(AF.triplet_apply(*leaves)[:, -1].sum(), leaves)
    want = torch.autograd.grad(Ref.triplet_apply(*ref_leaves)[:, -1].sum(), ref_leaves)
    torch.testing.assert_close(got, want, **TOL[F64])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_half_precision_error_like_eager(device, dtype, layout) -> None:
    """fp16/bf16: the fused results' error against fp64 (on the same rounded inputs) is no
    worse than twice the same-precision eager composition's (each gate's amax/mean cat on the
    permuted x; the three products summed and divided by 3), plus two units of rounding at the
    result's scale. Two channel blocks (C = 96)."""
    x = make_input((4, 96, 14, 10), layout, dtype, device)
    s = make_gates(x)  # fp32, as the public functions take them
    g_d, g_y = make_map_grads(x), torch.randn_like(x)

    def pool_eager(x):
        return tuple(torch.cat([t.amax(1, keepdim=True), t.mean(1, keepdim=True)], dim=1)
                     for t in (ops_module.in_plane(x, gate) for gate in ops_module.GATES))

    def apply_eager(x, s_hw, s_cw, s_hc):
        return (x * s_hw + x * s_cw.permute(0, 2, 1, 3) + x * s_hc.permute(0, 3, 2, 1)) / 3

    for fused, eager, args, g, names in ((AF.triplet_pool, pool_eager, [x], g_d, POOL_NAMES),
                                         (AF.triplet_apply, apply_eager, [x, *s], g_y, APPLY_NAMES)):
        got = grads_of(fused, args, g, device)
        exact = grads_of(eager, in_f64(args), in_f64(g) if isinstance(g, list) else g.double(), "reference")
        low_g = [t.to(dtype) for t in g] if isinstance(g, list) else g
        low = grads_of(eager, [t.to(dtype) for t in args], low_g, "reference")
        assert_error_like_eager(got, low, exact, floor=rounding_floor(dtype), names=names)


# ----------------------------------------------------------------------------------------
# Ties, NaN and inf
# ----------------------------------------------------------------------------------------
def tied_inputs(device: str) -> list[torch.Tensor]:
    """x whose maxima tie: every line along C equal, along H, along W; values on a coarse grid
    (ties in all three maps at once); and a constant x (every element ties everywhere)."""
    n, c, h, w = 2, BLOCK_CL + 5, 5, 6  # several channel blocks: hw's counts from partials
    r = lambda *s: torch.randn(*s, dtype=F64, device=device)  # noqa: E731
    return [r(n, 1, h, w).expand(n, c, h, w).contiguous(), r(n, c, 1, w).expand(n, c, h, w).contiguous(),
            r(n, c, h, 1).expand(n, c, h, w).contiguous(),
            torch.randint(-2, 3, (n, c, h, w), device=device).to(F64) / 2, torch.full((n, c, h, w), 0.5, dtype=F64,
                                                                                      device=device)]


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_ties_share_the_max_gradient(backend_name, device, layout) -> None:
    for x in tied_inputs(device):
        x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        maps = check_pool(x, backend_name)[:3]
        ties = [(ops_module.in_plane(x, gate) == d[:, :1]).sum(1).max() for gate, d in zip(ops_module.GATES, maps)]
        assert max(ties) > 1  # the input really ties


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_and_inf_in_x(backend_name, device, layout) -> None:
    """NaN: the three maxima over it are NaN (torch.amax), and so is grad_x on its three lines;
    the other sample stays finite. inf, -inf pass through the maxima, the means and y."""
    x = make_input((2, BLOCK_CL + 9, 4, 5), layout, F64, device)
    x[1, 2, 1, 3] = float("nan")
    x[0, 4, 2, 3], x[0, 70, 0, 0] = float("inf"), float("-inf")
    tol = {**TOL[F64], "equal_nan": True}
    d_hw, d_cw, d_hc, grad_x = check_pool(x, backend_name, **tol)
    check_apply(x, make_gates(x), backend_name, **tol)
    assert torch.isnan(d_hw[1, 0, 1, 3]) and torch.isnan(d_cw[1, 0, 2, 3]) and torch.isnan(d_hc[1, 0, 1, 2])
    assert torch.isnan(grad_x[1, :, 1, 3]).all() and torch.isnan(grad_x[1, 2, :, 3]).all()
    assert torch.isnan(grad_x[1, 2, 1, :]).all()
    assert torch.isfinite(grad_x[0]).all() and torch.isfinite(grad_x[1, 3:, 0]).all()
    assert d_hw[0, 0, 2, 3] == float("inf") and d_hw[0, 1, 0, 0] == float("-inf")
    assert d_cw[0, 0, 4, 3] == float("inf") and d_hc[0, 1, 0, 70] == float("-inf")


# ----------------------------------------------------------------------------------------
# gradcheck, opcheck, determinism, empty inputs
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (1, BLOCK_CL + 3, 2, 1)], ids=shape_id)
def test_gradcheck(backend_name, device, layout, shape) -> None:
    x = leaf(make_input(shape, layout, F64, device), True)
    s = [leaf(t, True) for t in make_gates(x)]
    assert torch.autograd.gradcheck(on_backend(AF.triplet_pool, backend_name), (x,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(on_backend(AF.triplet_apply, backend_name), (x, *s), eps=1e-6, atol=1e-7)


def _op_samples():
    samples = {name: [] for name in ("triplet_pool", "triplet_pool_backward", "triplet_apply",
                                      "triplet_apply_backward")}
    for layout, dtype in (("nchw", F64), ("channels_last", F64), ("sliced", F64), ("channels_last", torch.float16)):
        x = make_input((2, 6, 5, 3), layout, dtype, "cpu")
        s, d = make_gates(x), Ref.triplet_pool(x)
        grad = dtype == F64  # autograd's check wants fp64
        samples["triplet_pool"].append((leaf(x, grad),))
        samples["triplet_pool_backward"].append((*make_map_grads(x), leaf(x), *(leaf(t) for t in d)))
        samples["triplet_apply"].append((leaf(x, grad), *(leaf(t, grad) for t in s)))
        samples["triplet_apply_backward"].append((torch.randn_like(x), leaf(x), *(leaf(t) for t in s)))
    return samples


@pytest.mark.parametrize("op_name", list(_op_samples()))
def test_opcheck(op_name, compiled_ops) -> None:
    op = getattr(compiled_ops, op_name).default
    for args in _op_samples()[op_name]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend_name,device", without_reference(CASES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_deterministic(backend_name, device, layout) -> None:
    """Bitwise the same results twice, and on the cpu backend with one thread as with several:
    several channel blocks per sample, so d_hw, its tie counts and grad_s_hw combine per-block
    partials (on CUDA several channel and column tiles and row bands, so all three maps do)."""
    x = make_input((3, BLOCK_CL + 37, 13, 17) if device == "cpu" else CUDA_BRICK_SHAPES[0], layout, F32, device)
    s, g_d, g_y = make_gates(x), make_map_grads(x), torch.randn_like(x)

    def run():
        return (grads_of(AF.triplet_pool, [x], g_d, backend_name)
                + grads_of(AF.triplet_apply, [x, *s], g_y, backend_name))

    first, runs = run(), [run()]
    if backend_name == "cpu":  # fixed channel blocks: the thread count changes nothing
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            runs.append(run())
        finally:
            torch.set_num_threads(threads)
    for other in runs:
        assert all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5), (2, 3, 4, 0)], ids=shape_id)
def test_empty_inputs(compiled_ops, device, shape) -> None:
    """Shapes as the Reference's; a map over an empty line has max -inf and mean NaN (0 / 0);
    the gates' gradients over empty lines are 0."""
    x = torch.randn(shape, device=device)
    d = compiled_ops.triplet_pool(x)
    for t, gate in zip(d, ops_module.GATES):
        assert t.shape == ops_module.plane_shape(x, gate, 2)
        assert (t[:, 0] == float("-inf")).all() and t[:, 1].isnan().all()
    s = [torch.rand(ops_module.plane_shape(x, gate, 1), device=device) for gate in ops_module.GATES]
    assert compiled_ops.triplet_pool_backward(*[torch.ones_like(t) for t in d], x, *d).shape == x.shape
    assert compiled_ops.triplet_apply(x, *s).shape == x.shape
    grad_x, *grad_s = compiled_ops.triplet_apply_backward(x, x, *s)
    assert grad_x.shape == x.shape
    for g, t in zip(grad_s, s):
        assert g.shape == t.shape and (g == 0).all()


# ----------------------------------------------------------------------------------------
# Bad input: the C++ kernels raise the Python checks' errors, word for word
# ----------------------------------------------------------------------------------------
def _t(*shape, dtype=F32, device="cpu"):
    return torch.rand(*shape, dtype=dtype, device=device)


def _valid(op: str) -> dict:
    """Valid float32 arguments of `op` for x (2, 3, 4, 5), by schema name."""
    x = _t(2, 3, 4, 5)
    d = {"d_hw": _t(2, 2, 4, 5), "d_cw": _t(2, 2, 3, 5), "d_hc": _t(2, 2, 4, 3)}
    s = {"s_hw": _t(2, 1, 4, 5), "s_cw": _t(2, 1, 3, 5), "s_hc": _t(2, 1, 4, 3)}
    return {
        "triplet_pool": {"x": x},
        "triplet_pool_backward": {**{f"grad_{k}": v.clone() for k, v in d.items()}, "x": x, **d},
        "triplet_apply": {"x": x, **s},
        "triplet_apply_backward": {"grad_y": _t(2, 3, 4, 5), "x": x, **s},
    }[op]


# (op, the arguments that differ from _valid's, the error, the message's start)
BAD_INPUTS = [
    ("triplet_pool", {"x": _t(2, 3, 4)}, ValueError, "x must be 4-D (N, C, H, W), got 3-D"),
    ("triplet_pool", {"x": _t(2, 3, 4, 5).int()}, TypeError, "x must be a floating-point tensor, got Int"),
    ("triplet_pool", {"x": _t(2, 3, 4, 5).to(torch.float8_e4m3fn)}, TypeError,
     "x must be float64, float32, float16 or bfloat16, got Float8_e4m3fn"),
    ("triplet_pool_backward", {"grad_d_hw": _t(2, 1, 4, 5)}, ValueError,
     "grad_d_hw must have shape (N, 2, H, W) = (2, 2, 4, 5), got [2, 1, 4, 5]"),
    ("triplet_pool_backward", {"d_cw": _t(2, 2, 4, 5)}, ValueError,
     "d_cw must have shape (N, 2, C, W) = (2, 2, 3, 5), got [2, 2, 4, 5]"),
    ("triplet_pool_backward", {"grad_d_hc": _t(2, 2, 3, 4)}, ValueError,
     "grad_d_hc must have shape (N, 2, H, C) = (2, 2, 4, 3), got [2, 2, 3, 4]"),
    ("triplet_pool_backward", {"d_hc": _t(2, 2, 4)}, ValueError, "d_hc must have shape (N, 2, H, C)"),
    ("triplet_pool_backward", {"d_hw": _t(2, 2, 4, 5, dtype=F64)}, TypeError,
     "d_hw must be Float (the accumulation dtype of x, Float), got Double"),
    ("triplet_pool_backward", {"grad_d_cw": _t(2, 2, 3, 5).int()}, TypeError,
     "grad_d_cw must be a floating-point tensor, got Int"),
    ("triplet_pool_backward", {"grad_d_cw": _t(2, 2, 3, 5, device="meta")}, ValueError,
     "grad_d_cw must be on cpu, got meta"),
    ("triplet_pool_backward", {"x": _t(2, 3, 4, 5, 1)}, ValueError, "x must be 4-D"),
    ("triplet_apply", {"s_cw": _t(2, 1, 4, 5)}, ValueError,
     "s_cw must have shape (N, 1, C, W) = (2, 1, 3, 5), got [2, 1, 4, 5]"),
    ("triplet_apply", {"s_hw": _t(2, 2, 4, 5)}, ValueError,
     "s_hw must have shape (N, 1, H, W) = (2, 1, 4, 5), got [2, 2, 4, 5]"),
    ("triplet_apply", {"s_hc": _t(2, 1, 5, 3)}, ValueError,
     "s_hc must have shape (N, 1, H, C) = (2, 1, 4, 3), got [2, 1, 5, 3]"),
    ("triplet_apply", {"s_hc": _t(2, 1, 4, 3, dtype=torch.float16)}, TypeError,
     "s_hc must be Float (the accumulation dtype of x, Float), got Half"),
    ("triplet_apply", {"x": _t(2, 3, 4, 5, dtype=torch.bfloat16), "s_hw": _t(2, 1, 4, 5, dtype=torch.bfloat16)},
     TypeError, "s_hw must be Float (the accumulation dtype of x, BFloat16), got BFloat16"),
    ("triplet_apply", {"s_cw": _t(2, 1, 3, 5, device="meta")}, ValueError, "s_cw must be on cpu, got meta"),
    ("triplet_apply", {"x": _t(2, 3, 4, 5) > 0.5}, TypeError, "x must be a floating-point tensor, got Bool"),
    ("triplet_apply_backward", {"grad_y": _t(2, 3, 4, 4)}, ValueError,
     "grad_y must match x's shape [2, 3, 4, 5] and dtype Float, got [2, 3, 4, 4] Float"),
    ("triplet_apply_backward", {"grad_y": _t(2, 3, 4, 5, dtype=F64)}, ValueError,
     "grad_y must match x's shape [2, 3, 4, 5] and dtype Float, got [2, 3, 4, 5] Double"),
    ("triplet_apply_backward", {"grad_y": _t(2, 3, 4, 5, device="meta")}, ValueError,
     "grad_y must be on cpu, got meta"),
    ("triplet_apply_backward", {"s_cw": _t(2, 1, 3, 4)}, ValueError, "s_cw must have shape (N, 1, C, W)"),
]


@pytest.mark.parametrize("op,changed,error,start",
                         [pytest.param(*case, id=f"{case[0]}-{i}") for i, case in enumerate(BAD_INPUTS)])
def test_bad_inputs(compiled_ops, op, changed, error, start) -> None:
    """The C++ CPU kernel (called below the dispatcher's meta routing), and the Python check the
    reference backend and the fakes run, raise the same error with the same words."""
    assert_cpp_error_like_python(compiled_ops, ops_module, op, _valid(op) | changed, error, start)


def test_backend_report() -> None:
    """triplet has kernels on every backend: the chooser picks the C++ kernels on CPU, and
    reports CUDA (where the CUDA sources are compiled) and Triton (with its own reasons only:
    the interpreter on CPU) available for it."""
    from attnkernels import _ext

    assert backend.why_unavailable("cpu", "triplet", "cpu") is None
    assert backend.select("triplet", "cpu") == "cpu"
    if _ext.cuda_compiled():
        assert backend.why_unavailable("cuda", "triplet", "cuda") is None
    assert "no kernels" not in (backend.why_unavailable("triton", "triplet", "cpu") or "")
