"""cbam_spatial's Reference ops and argument checks (the kernels: tests/test_cbam_spatial.py).

The Reference ops (attnkernels/ops/cbam_spatial.py; math in csrc/cbam_spatial_ops.cpp) against a
plain autograd composition of the CBAM reference module's spatial math, `cat[mean_c(x*a),
max_c(x*a)]` and `x*a*s`: forward, and every gradient both through the Reference's forward
(autograd, what the `reference` backend runs) and from its explicit backward ops (the oracle
of the kernels' backward). float64, odd C, H != W, HW = 1, N = 1, C = 1, every layout, ties in
the max and NaN. Nothing here builds or loads the C++ library.
"""
from __future__ import annotations

import pytest
import torch
from helpers import LAYOUTS, leaf, make_input

from attnkernels import backend
from attnkernels import reference as R
from attnkernels.ops import cbam_spatial as ops_module
from attnkernels.ops import ham_spatial
from attnkernels.ops._schemas import schemas
from attnkernels.reference._base import memory_format_of
from attnkernels.reference.formulas import max_c, mean_c

Ref = ops_module.Reference
F64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}
# odd C, H != W; HW = 1; N = 1; C = 1; a wider odd C.
SHAPES = [(2, 5, 3, 4), (3, 7, 1, 1), (1, 3, 4, 6), (2, 1, 3, 5), (2, 37, 5, 9)]


def shape_id(s) -> str:
    return "x".join(map(str, s))


# ----------------------------------------------------------------------------------------
# The composition: CBAM's spatial math written with the reference module's formulas
# ----------------------------------------------------------------------------------------
def pool_composition(x, a):
    x1 = x * a[:, :, None, None]
    return torch.cat([mean_c(x1), max_c(x1)], dim=1)


def apply_composition(x, a, s):
    return x * a[:, :, None, None] * s


def make_gate(n: int, c: int, dtype=F64) -> torch.Tensor:
    """A channel gate in (0, 1), as CBAM's sigmoid gives."""
    return torch.rand(n, c, dtype=dtype) * 0.9 + 0.05


def make_s(x: torch.Tensor, dtype=F64) -> torch.Tensor:
    n, _, h, w = x.shape
    return torch.rand(n, 1, h, w, dtype=dtype) * 0.9 + 0.05


def with_ties(x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeated channels: channels 0 and C-1 (and 1, if C > 3) hold the same values, above every
    other channel, with the largest gate, so F's maximum ties at every pixel of sample 0; sample 1
    (if any) has a zero gate, so all C channels of it tie at F = 0 everywhere."""
    x, a = x.detach().clone(), a.detach().clone()
    c = x.shape[1]
    top = x.abs().amax(1) + 1
    tied = [0, c - 1] + ([1] if c > 3 else [])
    a_top = a.amax(1)
    for ch in tied:
        x[:, ch] = top
        a[:, ch] = a_top
    if x.shape[0] > 1:
        a[1] = 0
    return x, a


def pool_grads(fn, x, a, g):
    x, a = leaf(x, True), leaf(a, True)
    d = fn(x, a)
    return (d, *torch.autograd.grad(d, (x, a), g))


def apply_grads(fn, x, a, s, g):
    x, a, s = leaf(x, True), leaf(a, True), leaf(s, True)
    y = fn(x, a, s)
    return (y, *torch.autograd.grad(y, (x, a, s), g))


def assert_all_close(got, want, names, **kw) -> None:
    for name, u, v in zip(names, got, want, strict=True):
        torch.testing.assert_close(u, v, **TOL, **kw, msg=lambda m, name=name: f"{name}: {m}")


def check_pool(x, a, g_d, equal_nan=False) -> None:
    want = pool_grads(pool_composition, x, a, g_d)
    got = pool_grads(Ref.cbam_spatial_pool, x, a, g_d)
    assert_all_close(got, want, ["d", "grad_x", "grad_gate"], equal_nan=equal_nan)
    d = Ref.cbam_spatial_pool(x, a)
    explicit = Ref.cbam_spatial_pool_backward(g_d, x, a, d)
    assert_all_close(explicit, want[1:], ["grad_x (backward op)", "grad_gate (backward op)"], equal_nan=equal_nan)
    assert explicit[0].is_contiguous(memory_format=memory_format_of(x)) and explicit[1].is_contiguous()


def check_apply(x, a, s, g_y, equal_nan=False) -> None:
    want = apply_grads(apply_composition, x, a, s, g_y)
    got = apply_grads(Ref.cbam_spatial_apply, x, a, s, g_y)
    assert_all_close(got, want, ["y", "grad_x", "grad_gate", "grad_s"], equal_nan=equal_nan)
    explicit = Ref.cbam_spatial_apply_backward(g_y, x, a, s)
    assert_all_close(explicit, want[1:], ["grad_x (backward op)", "grad_gate (backward op)", "grad_s (backward op)"],
                     equal_nan=equal_nan)
    fmt = memory_format_of(x)
    assert got[0].is_contiguous(memory_format=fmt) and explicit[0].is_contiguous(memory_format=fmt)
    assert explicit[1].is_contiguous() and explicit[2].is_contiguous()


# ----------------------------------------------------------------------------------------
# Forward and every gradient against the composition
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_pool_matches_composition(shape, layout) -> None:
    x = make_input(shape, layout, F64, "cpu")
    a = make_gate(shape[0], shape[1])
    g_d = torch.randn(shape[0], 2, *shape[2:], dtype=F64)
    check_pool(x, a, g_d)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_apply_matches_composition(shape, layout) -> None:
    x = make_input(shape, layout, F64, "cpu")
    a = make_gate(shape[0], shape[1])
    check_apply(x, a, make_s(x), make_input(shape, layout, F64, "cpu"))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[1] > 1], ids=shape_id)
def test_pool_ties_share_the_gradient(shape, layout) -> None:
    """Repeated channels tie in the max at every pixel: the max's gradient is split evenly
    among them (torch.amax's rule), and the zero-gate sample ties all C channels at 0."""
    x, a = with_ties(make_input(shape, layout, F64, "cpu"), make_gate(shape[0], shape[1]))
    x = make_input(shape, layout, F64, "cpu").copy_(x)  # back into the layout under test
    f = x * a[:, :, None, None]
    assert (f == f.amax(1, keepdim=True)).sum(1).min() >= 2  # ties at every pixel
    g_d = torch.randn(shape[0], 2, *shape[2:], dtype=F64)
    check_pool(x, a, g_d)
    # The split itself: the tied channels of sample 0 share grad_d's max row in equal parts.
    grad_x = Ref.cbam_spatial_pool_backward(g_d, x, a, Ref.cbam_spatial_pool(x, a))[0]
    tied = [0, shape[1] - 1] + ([1] if shape[1] > 3 else [])
    share = (g_d[0, 0] / shape[1] + g_d[0, 1] / len(tied)) * a[0, 0]
    for ch in tied:
        torch.testing.assert_close(grad_x[0, ch], share, **TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_in_x(layout) -> None:
    """A NaN makes its pixel's mean and max NaN, and (a NaN max ties nothing: count 0) the
    gradient of every channel at that pixel NaN, as torch.amax's backward; grad_gate of that
    sample is NaN, the other sample's gradients are finite. Holds for a zero grad of the max too."""
    shape = (2, 5, 3, 4)
    x = make_input(shape, layout, F64, "cpu")
    x[0, 2, 1, 1] = float("nan")
    a = make_gate(2, 5)
    for g_max_zero in (False, True):
        g_d = torch.randn(2, 2, 3, 4, dtype=F64)
        if g_max_zero:
            g_d[:, 1] = 0
        check_pool(x, a, g_d, equal_nan=True)
        d = Ref.cbam_spatial_pool(x, a)
        assert d[0, :, 1, 1].isnan().all() and not d[0, :, 0, 0].isnan().any() and not d[1].isnan().any()
        grad_x, grad_gate = Ref.cbam_spatial_pool_backward(g_d, x, a, d)
        assert grad_x[0, :, 1, 1].isnan().all()
        assert grad_x[0].isnan().sum() == 5 and not grad_x[1].isnan().any()
        assert grad_gate[0].isnan().all() and not grad_gate[1].isnan().any()
    check_apply(x, a, make_s(x), make_input(shape, layout, F64, "cpu"), equal_nan=True)


def test_inf_in_x() -> None:
    """An infinite F is the max (and ties only with another equal infinity)."""
    x = torch.randn(2, 5, 3, 4, dtype=F64)
    x[0, 1, 0, 0] = float("inf")
    x[0, 3, 0, 0] = float("inf")
    x[1, 2, 2, 3] = -float("inf")
    a = make_gate(2, 5)
    check_pool(x, a, torch.randn(2, 2, 3, 4, dtype=F64), equal_nan=True)
    check_apply(x, a, make_s(x), torch.randn_like(x), equal_nan=True)


def test_ops_compose_to_cbams_spatial_half() -> None:
    """pool -> the module's conv, bn, sigmoid -> apply is the reference CBAM's attend, forward
    and the gradients of x and of every parameter (training-mode BatchNorm)."""
    torch.manual_seed(1)
    m = R.CBAM(12, reduction=4).double().train()
    x = torch.randn(3, 12, 5, 7, dtype=F64)
    g = torch.randn_like(x)

    def fused_like(xx):
        a = m.channel(xx).flatten(1)
        d = Ref.cbam_spatial_pool(xx, a)
        s = torch.sigmoid(m.spatial.bn(m.spatial.conv(d)))
        return Ref.cbam_spatial_apply(xx, a, s)

    params = list(m.parameters())
    results = []
    for fn in (m.attend, fused_like):
        xx = leaf(x, True)
        y = fn(xx)
        results.append((y, *torch.autograd.grad(y, (xx, *params), g)))
    assert_all_close(results[1], results[0], ["y", "grad_x"] + [n for n, _ in m.named_parameters()])


def test_pool_is_hams_one_group_case() -> None:
    """cbam_spatial_pool(x, gate) is ham_spatial_pool(x, gate, C)'s d1 (mask all ones, c_im = C)
    bit for bit, NaN included: the kernels' shared templates rest on it."""
    x = torch.randn(2, 9, 4, 5, dtype=F64)
    x[1, 4, 2, 2] = float("nan")
    a = make_gate(2, 9)
    d1, _, mask = ham_spatial.Reference.ham_spatial_pool(x, a, 9)
    assert torch.equal(mask, torch.ones_like(mask))
    torch.testing.assert_close(Ref.cbam_spatial_pool(x, a), d1, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_low_precision_dtypes_and_layouts(dtype, layout) -> None:
    """Small maps and gates in float32 (acc), full-size outputs in x's dtype and layout; the
    values are the float64 composition's on the same (rounded) inputs, to x's rounding."""
    shape = (2, 7, 3, 5)
    x = make_input(shape, layout, dtype, "cpu")
    a = make_gate(2, 7, torch.float32)
    s = make_s(x, torch.float32)
    g_d = torch.randn(2, 2, 3, 5)
    g_y = make_input(shape, layout, dtype, "cpu")
    d = Ref.cbam_spatial_pool(x, a)
    y = Ref.cbam_spatial_apply(x, a, s)
    assert d.dtype == torch.float32 and y.dtype == dtype
    assert y.is_contiguous(memory_format=memory_format_of(x))
    gx_p, gg_p = Ref.cbam_spatial_pool_backward(g_d, x, a, d)
    gx_a, gg_a, gs_a = Ref.cbam_spatial_apply_backward(g_y, x, a, s)
    assert (gx_p.dtype, gg_p.dtype, gx_a.dtype, gg_a.dtype, gs_a.dtype) == (dtype, torch.float32, dtype,
                                                                           torch.float32, torch.float32)
    x64, a64, s64 = x.double(), a.double(), s.double()
    _, wx_p, wg_p = pool_grads(pool_composition, x64, a64, g_d.double())
    _, wx_a, wg_a, ws_a = apply_grads(apply_composition, x64, a64, s64, g_y.double())
    eps = torch.finfo(dtype).eps
    close = {"rtol": 4 * eps, "atol": 4 * eps}
    close32 = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(d.double(), pool_composition(x64, a64), **close32)
    torch.testing.assert_close(y.double(), apply_composition(x64, a64, s64), **close)
    for got, want, tol in ((gx_p, wx_p, close), (gg_p, wg_p, close32), (gx_a, wx_a, close), (gg_a, wg_a, close32),
                           (gs_a, ws_a, close32)):
        torch.testing.assert_close(got.double(), want, **tol)


# ----------------------------------------------------------------------------------------
# gradcheck: the explicit backward ops against finite differences, and the composition
# ----------------------------------------------------------------------------------------
class _Pool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a):
        d = Ref.cbam_spatial_pool(x, a)
        ctx.save_for_backward(x, a, d)
        return d

    @staticmethod
    def backward(ctx, grad_d):
        x, a, d = ctx.saved_tensors
        return Ref.cbam_spatial_pool_backward(grad_d, x, a, d)


class _Apply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, s):
        ctx.save_for_backward(x, a, s)
        return Ref.cbam_spatial_apply(x, a, s)

    @staticmethod
    def backward(ctx, grad_y):
        return Ref.cbam_spatial_apply_backward(grad_y, *ctx.saved_tensors)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (1, 3, 1, 1), (2, 1, 2, 3)], ids=shape_id)
def test_gradcheck(shape, layout) -> None:
    """Random data (the max's channel is unique almost surely, away from a switch)."""
    x = leaf(make_input(shape, layout, F64, "cpu"), True)
    a = leaf(make_gate(shape[0], shape[1]), True)
    s = leaf(make_s(x), True)
    assert torch.autograd.gradcheck(_Pool.apply, (x, a))
    assert torch.autograd.gradcheck(_Apply.apply, (x, a, s))
    assert torch.autograd.gradcheck(pool_composition, (x, a))
    assert torch.autograd.gradcheck(apply_composition, (x, a, s))
    assert torch.autograd.gradcheck(Ref.cbam_spatial_pool, (x, a))
    assert torch.autograd.gradcheck(Ref.cbam_spatial_apply, (x, a, s))


# ----------------------------------------------------------------------------------------
# Schemas, fakes, autograd registration (in a scratch namespace, the Reference as its kernels)
# ----------------------------------------------------------------------------------------
def test_schemas_parse() -> None:
    found = schemas("cbam_spatial")
    assert list(found) == ["cbam_spatial_pool", "cbam_spatial_pool_backward", "cbam_spatial_apply",
                           "cbam_spatial_apply_backward"]
    for name, schema in found.items():
        parsed = torch._C.parse_schema(schema)
        assert parsed.name == name
        args = [arg.name for arg in parsed.arguments]
        assert args == list(getattr(Ref, name).__code__.co_varnames[: len(args)]), name


SCRATCH = "attnkernels_cbam_scratch"
_libraries = []


@pytest.fixture(scope="module")
def scratch_ops():
    """The four ops with their csrc/ schemas in a scratch namespace, the Reference as the CPU
    kernels, the module's fakes and autograd registered as the C++ library's would be."""
    lib = torch.library.Library(SCRATCH, "DEF")
    _libraries.append(lib)
    for name, schema in schemas("cbam_spatial").items():
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
    a = leaf(make_gate(2, 5), True)
    s = leaf(make_s(x), True)
    assert torch.autograd.gradcheck(scratch_ops.cbam_spatial_pool, (x, a))
    assert torch.autograd.gradcheck(scratch_ops.cbam_spatial_apply, (x, a, s))
    d = Ref.cbam_spatial_pool(x.detach(), a.detach())
    g_d, g_y = torch.randn_like(d), torch.randn_like(x)
    for op, args in ((scratch_ops.cbam_spatial_pool, (x, a)), (scratch_ops.cbam_spatial_apply, (x, a, s)),
                     (scratch_ops.cbam_spatial_pool_backward, (g_d, x.detach(), a.detach(), d)),
                     (scratch_ops.cbam_spatial_apply_backward, (g_y, x.detach(), a.detach(), s.detach()))):
        torch.library.opcheck(op, args)


def test_fake_checks_its_arguments(scratch_ops) -> None:
    x = torch.randn(2, 3, 4, 4, device="meta")
    with pytest.raises(ValueError, match=r"cbam_spatial_pool: gate must have shape \(N, C\) = \(2, 3\)"):
        scratch_ops.cbam_spatial_pool(x, torch.randn(2, 4, device="meta"))
    d = scratch_ops.cbam_spatial_pool(x, torch.randn(2, 3, device="meta"))
    assert d.shape == (2, 2, 4, 4) and d.dtype == torch.float32


# ----------------------------------------------------------------------------------------
# The public functions, on the reference backend
# ----------------------------------------------------------------------------------------
@pytest.fixture
def on_reference():
    with backend.use_backend("reference"):
        yield


def test_public_functions_cast_and_match(on_reference) -> None:
    x = make_input((2, 5, 3, 4), "channels_last", torch.float16, "cpu")
    a = make_gate(2, 5)  # float64: cast to acc(x) = float32
    s = make_s(x)
    d = ops_module.cbam_spatial_pool(x, a)
    y = ops_module.cbam_spatial_apply(x, a, s)
    torch.testing.assert_close(d, Ref.cbam_spatial_pool(x, a.float()), rtol=0, atol=0)
    torch.testing.assert_close(y, Ref.cbam_spatial_apply(x, a.float(), s.float()), rtol=0, atol=0)
    assert y.dtype == torch.float16 and y.is_contiguous(memory_format=torch.channels_last)


def test_public_functions_check(on_reference) -> None:
    with pytest.raises(ValueError, match=r"cbam_spatial_apply: s must have shape \(N, 1, H, W\)"):
        ops_module.cbam_spatial_apply(torch.randn(2, 3, 4, 4), torch.rand(2, 3), torch.rand(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"cbam_spatial_pool: x must be 4-D"):
        ops_module.cbam_spatial_pool(torch.randn(2, 3, 4), torch.rand(2, 3))


def test_a_hot_path() -> None:
    """Registered with the library, its kernels written (CONTRIBUTING: HOT_PATHS)."""
    from attnkernels.ops import HOT_PATHS

    assert "cbam_spatial" in HOT_PATHS


# ----------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------
def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.ones(*shape, dtype=dtype, device=device)


def _pool_bw(**kw):
    args = {"grad_d": _t(2, 2, 4, 4), "x": _t(2, 3, 4, 4), "gate": _t(2, 3), "d": _t(2, 2, 4, 4)} | kw
    ops_module.check_cbam_spatial_pool_backward(**args)


def _apply(backward=False, **kw):
    args = {"x": _t(2, 3, 4, 4), "gate": _t(2, 3), "s": _t(2, 1, 4, 4)} | kw
    if backward:
        ops_module.check_cbam_spatial_apply_backward(**({"grad_y": _t(2, 3, 4, 4)} | args))
    else:
        ops_module.check_cbam_spatial_apply(**args)


_pool = ops_module.check_cbam_spatial_pool

BAD_INPUTS = [
    (lambda: _pool(_t(2, 3, 4), _t(2, 3)), ValueError, r"cbam_spatial_pool: x must be 4-D \(N, C, H, W\), got 3-D"),
    (lambda: _pool([[1.0]], _t(2, 3)), TypeError, r"cbam_spatial_pool: x must be a torch.Tensor, got list"),
    (lambda: _pool(_t(2, 3, 4, 4, dtype=torch.int64), _t(2, 3)), TypeError,
     r"cbam_spatial_pool: x must be a floating-point tensor, got Long"),
    (lambda: _pool(_t(2, 3, 4, 4), _t(2, 4)), ValueError,
     r"cbam_spatial_pool: gate must have shape \(N, C\) = \(2, 3\), got \[2, 4\]"),
    (lambda: _pool(_t(2, 3, 4, 4), _t(3, 3, 1)), ValueError,
     r"cbam_spatial_pool: gate must have shape \(N, C\) = \(2, 3\), got \[3, 3, 1\]"),
    (lambda: _pool(_t(2, 3, 4, 4), _t(2, 3, dtype=torch.int32)), TypeError,
     r"cbam_spatial_pool: gate must be a floating-point tensor, got Int"),
    (lambda: _pool(_t(2, 3, 4, 4), _t(2, 3, dtype=F64)), TypeError,
     r"cbam_spatial_pool: gate must be Float \(the accumulation dtype of x, Float\), got Double"),
    (lambda: _pool(_t(2, 3, 4, 4, dtype=torch.float16), _t(2, 3, dtype=torch.float16)), TypeError,
     r"cbam_spatial_pool: gate must be Float \(the accumulation dtype of x, Half\), got Half"),
    (lambda: _pool(_t(2, 3, 4, 4, dtype=F64), _t(2, 3)), TypeError,
     r"cbam_spatial_pool: gate must be Double \(the accumulation dtype of x, Double\), got Float"),
    (lambda: _pool(_t(2, 3, 4, 4), _t(2, 3, device="meta")), ValueError,
     r"cbam_spatial_pool: gate must be on cpu, got meta"),
    (lambda: _pool_bw(grad_d=_t(2, 1, 4, 4)), ValueError,
     r"cbam_spatial_pool_backward: grad_d must have shape \(N, 2, H, W\) = \(2, 2, 4, 4\), got \[2, 1, 4, 4\]"),
    (lambda: _pool_bw(d=_t(2, 2, 4, 3)), ValueError,
     r"cbam_spatial_pool_backward: d must have shape \(N, 2, H, W\) = \(2, 2, 4, 4\), got \[2, 2, 4, 3\]"),
    (lambda: _pool_bw(d=_t(2, 2, 4, 4, dtype=F64)), TypeError,
     r"cbam_spatial_pool_backward: d must be Float \(the accumulation dtype of x, Float\), got Double"),
    (lambda: _pool_bw(grad_d=_t(2, 2, 4, 4, device="meta")), ValueError,
     r"cbam_spatial_pool_backward: grad_d must be on cpu, got meta"),
    (lambda: _pool_bw(gate=_t(3, 3)), ValueError,
     r"cbam_spatial_pool_backward: gate must have shape \(N, C\) = \(2, 3\), got \[3, 3\]"),
    (lambda: _pool_bw(x=_t(2, 3, 4)), ValueError, r"cbam_spatial_pool_backward: x must be 4-D"),
    (lambda: _apply(s=_t(2, 2, 4, 4)), ValueError,
     r"cbam_spatial_apply: s must have shape \(N, 1, H, W\) = \(2, 1, 4, 4\), got \[2, 2, 4, 4\]"),
    (lambda: _apply(s=_t(2, 1, 4)), ValueError,
     r"cbam_spatial_apply: s must have shape \(N, 1, H, W\) = \(2, 1, 4, 4\), got \[2, 1, 4\]"),
    (lambda: _apply(s=_t(2, 1, 4, 4, dtype=torch.int32)), TypeError,
     r"cbam_spatial_apply: s must be a floating-point tensor, got Int"),
    (lambda: _apply(s=_t(2, 1, 4, 4, dtype=torch.float16)), TypeError,
     r"cbam_spatial_apply: s must be Float \(the accumulation dtype of x, Float\), got Half"),
    (lambda: _apply(s=_t(2, 1, 4, 4, device="meta")), ValueError, r"cbam_spatial_apply: s must be on cpu, got meta"),
    (lambda: _apply(gate=_t(2)), ValueError,
     r"cbam_spatial_apply: gate must have shape \(N, C\) = \(2, 3\), got \[2\]"),
    (lambda: _apply(x=_t(2, 3, 4, 4, dtype=torch.bool)), TypeError,
     r"cbam_spatial_apply: x must be a floating-point tensor, got Bool"),
    (lambda: _apply(backward=True, grad_y=_t(2, 3, 4, 5)), ValueError,
     r"cbam_spatial_apply_backward: grad_y must match x's shape \[2, 3, 4, 4\] and dtype Float, "
     r"got \[2, 3, 4, 5\] Float"),
    (lambda: _apply(backward=True, grad_y=_t(2, 3, 4, 4, dtype=F64)), ValueError,
     r"cbam_spatial_apply_backward: grad_y must match x's shape \[2, 3, 4, 4\] and dtype Float, "
     r"got \[2, 3, 4, 4\] Double"),
    (lambda: _apply(backward=True, grad_y=_t(2, 3, 4, 4, device="meta")), ValueError,
     r"cbam_spatial_apply_backward: grad_y must be on cpu, got meta"),
    (lambda: _apply(backward=True, gate=_t(2)), ValueError,
     r"cbam_spatial_apply_backward: gate must have shape \(N, C\)"),
    (lambda: _apply(backward=True, s=_t(2, 1, 5, 4)), ValueError,
     r"cbam_spatial_apply_backward: s must have shape \(N, 1, H, W\) = \(2, 1, 4, 4\), got \[2, 1, 5, 4\]"),
]


def bad_input_params(cases):
    """As tests/triton_cases.py's (which would import triton): ids "<op>-<row>"."""
    return [pytest.param(call, error, pattern, id=f"{pattern.split(':')[0]}-{i}")
            for i, (call, error, pattern) in enumerate(cases)]


@pytest.mark.parametrize("call,error,pattern", bad_input_params(BAD_INPUTS))
def test_bad_inputs(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
