"""triplet's Reference ops and argument checks (the CPU kernels: tests/test_triplet_ops.py).

The Reference ops (attnkernels/ops/triplet.py; math in csrc/triplet_ops.cpp) against a plain
autograd composition of the Triplet reference module's math: each gate's `cat[max_c(t),
mean_c(t)]` on the permuted x, and `(x * s_hw + x * s_cw + x * s_hc) / 3`: forward, and every
gradient both through the Reference's forward (autograd, what the `reference` backend runs) and
from its explicit backward ops (the oracle of the kernels' backward). float64, odd C, H != W,
HW = 1, N = 1, C = 1, every layout, ties in the maxima and NaN; that the ops compose to the
reference Triplet module; schemas, fakes, autograd registration and opcheck in a scratch
namespace; the argument checks. Nothing here builds or loads the C++ library.
"""
from __future__ import annotations

import pytest
import torch
from helpers import LAYOUTS, leaf, make_input

from attnkernels import backend
from attnkernels import reference as R
from attnkernels.ops import triplet as ops_module
from attnkernels.ops._schemas import schemas
from attnkernels.reference._base import memory_format_of
from attnkernels.reference.formulas import max_c, mean_c

Ref = ops_module.Reference
F64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}
# odd C, H != W; HW = 1; N = 1; C = 1; a wider odd C.
SHAPES = [(2, 5, 3, 4), (3, 7, 1, 1), (1, 3, 4, 6), (2, 1, 3, 5), (2, 37, 5, 9)]
MAP_NAMES = ["d_hw", "d_cw", "d_hc"]
GATE_NAMES = ["s_hw", "s_cw", "s_hc"]


def shape_id(s) -> str:
    return "x".join(map(str, s))


# ----------------------------------------------------------------------------------------
# The composition: Triplet's math written with the reference module's formulas and permutes
# ----------------------------------------------------------------------------------------
def zpool(t):
    return torch.cat([max_c(t), mean_c(t)], dim=1)


def pool_composition(x):
    return zpool(x), zpool(x.permute(0, 2, 1, 3)), zpool(x.permute(0, 3, 2, 1))


def apply_composition(x, s_hw, s_cw, s_hc):
    y_cw = (x.permute(0, 2, 1, 3) * s_cw).permute(0, 2, 1, 3)
    y_hc = (x.permute(0, 3, 2, 1) * s_hc).permute(0, 3, 2, 1)
    return (x * s_hw + y_cw + y_hc) / 3


def make_gates(x: torch.Tensor, dtype=F64) -> list[torch.Tensor]:
    """The three gates in (0, 1), as the sigmoids give, in their planes."""
    return [torch.rand(ops_module.plane_shape(x, g, 1), dtype=dtype) * 0.9 + 0.05 for g in ops_module.GATES]


def make_map_grads(x: torch.Tensor, dtype=F64) -> list[torch.Tensor]:
    return [torch.randn(ops_module.plane_shape(x, g, 2), dtype=dtype) for g in ops_module.GATES]


def pool_grads(fn, x, g_d):
    x = leaf(x, True)
    d = fn(x)
    return (*d, *torch.autograd.grad(d, (x,), g_d))


def apply_grads(fn, x, s, g):
    x, s = leaf(x, True), [leaf(t, True) for t in s]
    y = fn(x, *s)
    return (y, *torch.autograd.grad(y, (x, *s), g))


def assert_all_close(got, want, names, **kw) -> None:
    for name, u, v in zip(names, got, want, strict=True):
        torch.testing.assert_close(u, v, **TOL, **kw, msg=lambda m, name=name: f"{name}: {m}")


def check_pool(x, g_d, equal_nan=False) -> None:
    want = pool_grads(pool_composition, x, g_d)
    got = pool_grads(Ref.triplet_pool, x, g_d)
    assert_all_close(got, want, [*MAP_NAMES, "grad_x"], equal_nan=equal_nan)
    d = Ref.triplet_pool(x)
    assert all(m.is_contiguous() and m.dtype == F64 for m in d)
    explicit = Ref.triplet_pool_backward(*g_d, x, *d)
    assert_all_close([explicit], want[3:], ["grad_x (backward op)"], equal_nan=equal_nan)
    assert explicit.is_contiguous(memory_format=memory_format_of(x))


def check_apply(x, s, g_y, equal_nan=False) -> None:
    want = apply_grads(apply_composition, x, s, g_y)
    got = apply_grads(Ref.triplet_apply, x, s, g_y)
    assert_all_close(got, want, ["y", "grad_x", *(f"grad_{n}" for n in GATE_NAMES)], equal_nan=equal_nan)
    explicit = Ref.triplet_apply_backward(g_y, x, *s)
    assert_all_close(explicit, want[1:], [f"grad_{n} (backward op)" for n in ["x", *GATE_NAMES]],
                     equal_nan=equal_nan)
    fmt = memory_format_of(x)
    assert got[0].is_contiguous(memory_format=fmt) and explicit[0].is_contiguous(memory_format=fmt)
    assert all(t.is_contiguous() for t in explicit[1:])


# ----------------------------------------------------------------------------------------
# Forward and every gradient against the composition
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_pool_matches_composition(shape, layout) -> None:
    x = make_input(shape, layout, F64, "cpu")
    check_pool(x, make_map_grads(x))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_apply_matches_composition(shape, layout) -> None:
    x = make_input(shape, layout, F64, "cpu")
    check_apply(x, make_gates(x), make_input(shape, layout, F64, "cpu"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ties_share_the_gradient(layout) -> None:
    """Values on a coarse grid: every one of the three maxima is tied along many lines; each
    tied element gets an equal share, as torch.amax's backward."""
    x = make_input((2, 6, 5, 4), layout, F64, "cpu")
    with torch.no_grad():
        x.copy_(torch.randint(-1, 2, x.shape).double())
    check_pool(x, make_map_grads(x))
    d = Ref.triplet_pool(x)
    # An all-equal line: every element of it shares the max's gradient.
    x2 = torch.ones(1, 3, 2, 2, dtype=F64)
    g = [torch.zeros(ops_module.plane_shape(x2, n, 2), dtype=F64) for n in ops_module.GATES]
    g[0][:, 0] = 1.0
    grad_x = Ref.triplet_pool_backward(*g, x2, *Ref.triplet_pool(x2))
    torch.testing.assert_close(grad_x, torch.full_like(x2, 1 / 3))
    assert d[0].shape == (2, 2, 5, 4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_in_x(layout) -> None:
    """A NaN makes the three maxima and means over its lines NaN and (a NaN max ties nothing:
    count 0) the gradient of every element of those lines NaN; elsewhere finite."""
    shape = (2, 5, 3, 4)
    x = make_input(shape, layout, F64, "cpu")
    x[0, 2, 1, 3] = float("nan")
    check_pool(x, make_map_grads(x), equal_nan=True)
    d_hw, d_cw, d_hc = Ref.triplet_pool(x)
    assert d_hw[0, :, 1, 3].isnan().all() and d_cw[0, :, 2, 3].isnan().all() and d_hc[0, :, 1, 2].isnan().all()
    assert d_hw[0].isnan().sum() == 2 and not d_hw[1].isnan().any()
    grad_x = Ref.triplet_pool_backward(*make_map_grads(x), x, d_hw, d_cw, d_hc)
    want = torch.zeros(shape, dtype=torch.bool)
    want[0, :, 1, 3] = want[0, 2, :, 3] = want[0, 2, 1, :] = True
    assert torch.equal(grad_x.isnan(), want)
    check_apply(x, make_gates(x), make_input(shape, layout, F64, "cpu"), equal_nan=True)


def test_inf_in_x() -> None:
    """An infinity is the max of its lines (and ties only with an equal infinity)."""
    x = torch.randn(2, 5, 3, 4, dtype=F64)
    x[0, 1, 0, 0] = x[0, 3, 0, 0] = float("inf")
    x[1, 2, 2, 3] = -float("inf")
    check_pool(x, make_map_grads(x), equal_nan=True)
    check_apply(x, make_gates(x), torch.randn_like(x), equal_nan=True)


def test_ops_compose_to_the_triplet_module() -> None:
    """pool -> each gate's conv, bn, sigmoid -> apply is the reference Triplet's attend,
    forward and the gradients of x and of every parameter (training-mode BatchNorm)."""
    torch.manual_seed(1)
    m = R.Triplet(6).double().train()
    x = torch.randn(3, 6, 5, 7, dtype=F64)
    g = torch.randn_like(x)

    def fused_like(xx):
        d = Ref.triplet_pool(xx)
        s = [torch.sigmoid(gate.bn(gate.conv(di))) for gate, di in zip((m.hw, m.cw, m.hc), d)]
        return Ref.triplet_apply(xx, *s)

    params = list(m.parameters())
    results = []
    for fn in (m.attend, fused_like):
        xx = leaf(x, True)
        y = fn(xx)
        results.append((y, *torch.autograd.grad(y, (xx, *params), g)))
    assert_all_close(results[1], results[0], ["y", "grad_x"] + [n for n, _ in m.named_parameters()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_low_precision_dtypes_and_layouts(dtype, layout) -> None:
    """Maps and gates in float32 (acc), full-size outputs in x's dtype and layout; the values are
    the float64 composition's on the same (rounded) inputs, to x's rounding."""
    shape = (2, 7, 3, 5)
    x = make_input(shape, layout, dtype, "cpu")
    s = make_gates(x, torch.float32)
    g_d = make_map_grads(x, torch.float32)
    g_y = make_input(shape, layout, dtype, "cpu")
    d = Ref.triplet_pool(x)
    y = Ref.triplet_apply(x, *s)
    assert all(m.dtype == torch.float32 for m in d) and y.dtype == dtype
    assert y.is_contiguous(memory_format=memory_format_of(x))
    gx_p = Ref.triplet_pool_backward(*g_d, x, *d)
    gx_a, *gs_a = Ref.triplet_apply_backward(g_y, x, *s)
    assert gx_p.dtype == dtype and gx_a.dtype == dtype and all(t.dtype == torch.float32 for t in gs_a)
    x64, s64 = x.double(), [t.double() for t in s]
    want_p = pool_grads(pool_composition, x64, [t.double() for t in g_d])
    want_a = apply_grads(apply_composition, x64, s64, g_y.double())
    eps = torch.finfo(dtype).eps
    close, close32 = {"rtol": 4 * eps, "atol": 4 * eps}, {"rtol": 1e-5, "atol": 1e-5}
    for got, want in zip(d, want_p[:3]):
        torch.testing.assert_close(got.double(), want, **close32)
    torch.testing.assert_close(gx_p.double(), want_p[3], **close)
    torch.testing.assert_close(y.double(), want_a[0], **close)
    torch.testing.assert_close(gx_a.double(), want_a[1], **close)
    for got, want in zip(gs_a, want_a[2:]):
        torch.testing.assert_close(got.double(), want, **close32)


# ----------------------------------------------------------------------------------------
# gradcheck: the explicit backward ops against finite differences
# ----------------------------------------------------------------------------------------
class _Pool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        d = Ref.triplet_pool(x)
        ctx.save_for_backward(x, *d)
        return d

    @staticmethod
    def backward(ctx, *grad_d):
        x, *d = ctx.saved_tensors
        return Ref.triplet_pool_backward(*grad_d, x, *d)


class _Apply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s_hw, s_cw, s_hc):
        ctx.save_for_backward(x, s_hw, s_cw, s_hc)
        return Ref.triplet_apply(x, s_hw, s_cw, s_hc)

    @staticmethod
    def backward(ctx, grad_y):
        return Ref.triplet_apply_backward(grad_y, *ctx.saved_tensors)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (1, 3, 1, 1), (2, 1, 2, 3)], ids=shape_id)
def test_gradcheck(shape, layout) -> None:
    """Random data (each maximum is unique almost surely, away from a switch)."""
    x = leaf(make_input(shape, layout, F64, "cpu"), True)
    s = [leaf(t, True) for t in make_gates(x)]
    assert torch.autograd.gradcheck(_Pool.apply, (x,))
    assert torch.autograd.gradcheck(_Apply.apply, (x, *s))
    assert torch.autograd.gradcheck(Ref.triplet_pool, (x,))
    assert torch.autograd.gradcheck(Ref.triplet_apply, (x, *s))


# ----------------------------------------------------------------------------------------
# Schemas, fakes, autograd registration (in a scratch namespace, the Reference as its kernels)
# ----------------------------------------------------------------------------------------
def test_schemas_parse() -> None:
    found = schemas("triplet")
    assert list(found) == ["triplet_pool", "triplet_pool_backward", "triplet_apply", "triplet_apply_backward"]
    for name, schema in found.items():
        parsed = torch._C.parse_schema(schema)
        assert parsed.name == name
        args = [arg.name for arg in parsed.arguments]
        assert args == list(getattr(Ref, name).__code__.co_varnames[: len(args)]), name


SCRATCH = "attnkernels_triplet_scratch"
_libraries = []


@pytest.fixture(scope="module")
def scratch_ops():
    """The four ops with their csrc/ schemas in a scratch namespace, the Reference as the CPU
    kernels, the module's fakes and autograd registered as the C++ library's would be."""
    lib = torch.library.Library(SCRATCH, "DEF")
    _libraries.append(lib)
    for name, schema in schemas("triplet").items():
        lib.define(schema)
        lib.impl(name, getattr(Ref, name), "CPU")
    for name, fake in ops_module._FAKES.items():
        torch.library.register_fake(f"{SCRATCH}::{name}", lib=lib)(fake)
    ops_module._register_autograd(SCRATCH)
    return getattr(torch.ops, SCRATCH)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_registered_autograd_and_opcheck(scratch_ops, layout) -> None:
    shape = (2, 5, 3, 4)
    x = leaf(make_input(shape, layout, F64, "cpu"), True)
    s = [leaf(t, True) for t in make_gates(x)]
    assert torch.autograd.gradcheck(scratch_ops.triplet_pool, (x,))
    assert torch.autograd.gradcheck(scratch_ops.triplet_apply, (x, *s))
    xd = x.detach()
    d = Ref.triplet_pool(xd)
    g_d, g_y = make_map_grads(xd), torch.randn_like(xd)
    for op, args in ((scratch_ops.triplet_pool, (x,)), (scratch_ops.triplet_apply, (x, *s)),
                     (scratch_ops.triplet_pool_backward, (*g_d, xd, *d)),
                     (scratch_ops.triplet_apply_backward, (g_y, xd, *(t.detach() for t in s)))):
        torch.library.opcheck(op, args)


def test_one_map_used_alone(scratch_ops) -> None:
    """A loss on one map only: the unused maps' gradients arrive as None or zeros and add nothing."""
    x = leaf(torch.randn(2, 3, 4, 5, dtype=F64), True)
    for i in range(3):
        (grad,) = torch.autograd.grad(scratch_ops.triplet_pool(x)[i].sum(), (x,))
        (want,) = torch.autograd.grad(pool_composition(x)[i].sum(), (x,))
        torch.testing.assert_close(grad, want, **TOL)


def test_fake_checks_its_arguments(scratch_ops) -> None:
    x = torch.randn(2, 3, 4, 5, device="meta")
    d = scratch_ops.triplet_pool(x)
    assert [tuple(m.shape) for m in d] == [(2, 2, 4, 5), (2, 2, 3, 5), (2, 2, 4, 3)]
    s = [torch.randn(2, 1, 4, 5, device="meta"), torch.randn(2, 1, 3, 5, device="meta"),
         torch.randn(2, 1, 4, 4, device="meta")]
    with pytest.raises(ValueError, match=r"triplet_apply: s_hc must have shape \(N, 1, H, C\) = \(2, 1, 4, 3\)"):
        scratch_ops.triplet_apply(x, *s)


# ----------------------------------------------------------------------------------------
# The public functions, on the reference backend
# ----------------------------------------------------------------------------------------
@pytest.fixture
def on_reference():
    with backend.use_backend("reference"):
        yield


def test_public_functions_cast_and_match(on_reference) -> None:
    x = make_input((2, 5, 3, 4), "channels_last", torch.float16, "cpu")
    s = make_gates(x)  # float64: cast to acc(x) = float32
    d = ops_module.triplet_pool(x)
    y = ops_module.triplet_apply(x, *s)
    for got, want in zip(d, Ref.triplet_pool(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(y, Ref.triplet_apply(x, *(t.float() for t in s)), rtol=0, atol=0)
    assert y.dtype == torch.float16 and y.is_contiguous(memory_format=torch.channels_last)


def test_a_hot_path() -> None:
    """Registered with the library, its CPU kernels written (CONTRIBUTING: HOT_PATHS)."""
    from attnkernels.ops import HOT_PATHS

    assert "triplet" in HOT_PATHS


# ----------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------
def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.ones(*shape, dtype=dtype, device=device)


X = (2, 3, 4, 5)  # N, C, H, W: every plane has its own shape
MAPS2 = {"d_hw": (2, 2, 4, 5), "d_cw": (2, 2, 3, 5), "d_hc": (2, 2, 4, 3)}
GATES1 = {"s_hw": (2, 1, 4, 5), "s_cw": (2, 1, 3, 5), "s_hc": (2, 1, 4, 3)}


def _pool_bw(**kw):
    args = {f"grad_{k}": _t(*v) for k, v in MAPS2.items()} | {"x": _t(*X)} | {k: _t(*v) for k, v in MAPS2.items()}
    ops_module.check_triplet_pool_backward(**(args | kw))


def _apply(backward=False, **kw):
    args = {"x": _t(*X)} | {k: _t(*v) for k, v in GATES1.items()} | kw
    if backward:
        ops_module.check_triplet_apply_backward(**({"grad_y": _t(*X)} | args))
    else:
        ops_module.check_triplet_apply(**args)


BAD_INPUTS = [
    (lambda: ops_module.check_triplet_pool(_t(2, 3, 4)), ValueError, r"triplet_pool: x must be 4-D"),
    (lambda: ops_module.check_triplet_pool(_t(*X, dtype=torch.int64)), TypeError,
     r"triplet_pool: x must be a floating-point tensor, got Long"),
    (lambda: _pool_bw(grad_d_cw=_t(2, 2, 5, 3)), ValueError,
     r"triplet_pool_backward: grad_d_cw must have shape \(N, 2, C, W\) = \(2, 2, 3, 5\), got \[2, 2, 5, 3\]"),
    (lambda: _pool_bw(d_hc=_t(2, 2, 3, 4)), ValueError,
     r"triplet_pool_backward: d_hc must have shape \(N, 2, H, C\) = \(2, 2, 4, 3\), got \[2, 2, 3, 4\]"),
    (lambda: _pool_bw(d_hw=_t(2, 2, 4, 5, dtype=F64)), TypeError,
     r"triplet_pool_backward: d_hw must be Float \(the accumulation dtype of x, Float\), got Double"),
    (lambda: _pool_bw(grad_d_hw=_t(2, 2, 4, 5, device="meta")), ValueError,
     r"triplet_pool_backward: grad_d_hw must be on cpu, got meta"),
    (lambda: _pool_bw(x=_t(2, 3, 4)), ValueError, r"triplet_pool_backward: x must be 4-D"),
    (lambda: _apply(s_hw=_t(2, 2, 4, 5)), ValueError,
     r"triplet_apply: s_hw must have shape \(N, 1, H, W\) = \(2, 1, 4, 5\), got \[2, 2, 4, 5\]"),
    (lambda: _apply(s_cw=_t(2, 1, 4, 5)), ValueError,
     r"triplet_apply: s_cw must have shape \(N, 1, C, W\) = \(2, 1, 3, 5\), got \[2, 1, 4, 5\]"),
    (lambda: _apply(s_hc=_t(2, 1, 4, 3, dtype=torch.float16)), TypeError,
     r"triplet_apply: s_hc must be Float \(the accumulation dtype of x, Float\), got Half"),
    (lambda: _apply(s_hc=[1.0]), TypeError, r"triplet_apply: s_hc must be a torch.Tensor, got list"),
    (lambda: _apply(backward=True, grad_y=_t(2, 3, 4, 4)), ValueError,
     r"triplet_apply_backward: grad_y must match x's shape \[2, 3, 4, 5\] and dtype Float, got \[2, 3, 4, 4\] Float"),
    (lambda: _apply(backward=True, s_cw=_t(2, 1, 3, 4)), ValueError,
     r"triplet_apply_backward: s_cw must have shape \(N, 1, C, W\)"),
]


@pytest.mark.parametrize("call,error,pattern", [
    pytest.param(call, error, pattern, id=f"{pattern.split(':')[0]}-{i}") for i, (call, error, pattern) in
    enumerate(BAD_INPUTS)])
def test_bad_inputs(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
