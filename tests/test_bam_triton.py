"""Triton backend of the bam hot path against its Reference ops.

Each op under `torch.ops.attnkernels_triton` (`attnkernels/triton/bam.py`) against
`attnkernels.ops.bam.Reference`, the forward and backward ops called directly on the same
arguments, and bam_apply's autograd (through the registered backward op) against autograd
through the Reference's torch ops. The contract is csrc/bam_ops.cpp: z = mc[n, c] + ms[n, 0, p],
y = x * (1 + sigmoid(z)), dz = (grad_y * x) * (sig * (1 - sig)) summed over the pixels (grad_mc)
and over C (grad_ms), all in acc(x). Without CUDA the kernels run on CPU tensors under the
Triton interpreter: shapes stay tiny.
"""
import pytest
import torch

# triton_cases first: it switches the Triton interpreter on without CUDA.
from triton_cases import (
    BF16,
    DEVICE,
    F16,
    F32,
    F64,
    acc_of,
    bad_input_params,
    dtype_id,
    expected_format,
    make_t,
    measured_choice,
    measured_launches,
    ops,
    shape_id,
    small_pixel_tiles,
    within_half_budget,
)
from triton_cases import close as _close
from triton_cases import randn as _t

from attnkernels.ops._schemas import schemas
from attnkernels.ops.bam import Reference as Ref
from attnkernels.triton import bam as T
from attnkernels.triton import ham_spatial as H

TOL = {
    F64: dict(rtol=1e-12, atol=1e-12),
    F32: dict(rtol=1e-5, atol=1e-5),
    # Half outputs (y, grad_x): the same fp32 math as the Reference's, then one rounding; a
    # last-bit difference in sigmoid may round the other way (one ulp of the output dtype).
    F16: dict(rtol=2e-3, atol=2e-3),
    BF16: dict(rtol=1.6e-2, atol=1e-2),
}

# (N, C, H, W): odd C and H != W; wider C; HW = 1; C = 1; N = 1; two pixel blocks of the
# default tile (H*W = 323 > 256 pixels, the last block partial).
SHAPES = [(2, 5, 3, 4), (2, 24, 5, 3), (2, 3, 1, 1), (2, 1, 3, 2), (1, 7, 2, 5), (1, 3, 17, 19)]
# triton_cases.make_t's layouts: NCHW, channels_last, a strided H*W slice (not one pixel
# stride when H, W > 1), a channel slice, everything sliced, a slice of a channels_last tensor.
LAYOUTS = ["nchw", "channels_last", "sliced", "channel_slice", "sliced_all", "sliced_channels_last"]
NAMES = ("y", "grad_x", "grad_mc", "grad_ms")



@pytest.fixture(params=["default_tiles", "small_tiles"])
def tiles(request, monkeypatch):
    if request.param == "small_tiles":
        small_pixel_tiles(monkeypatch)
    return request.param


# ----------------------------------------------------------------------------------------
# Inputs and the comparison
# ----------------------------------------------------------------------------------------
def branches(x, scale=1.5):
    """mc (N, C) and ms (N, 1, H, W), random normal times `scale`, in acc(x): z spans the
    sigmoid's curve and both of its tails."""
    n, c, h, w = x.shape
    acc = acc_of(x.dtype)
    mc = (torch.randn((n, c), dtype=F64) * scale).to(dtype=acc, device=DEVICE)
    ms = (torch.randn((n, 1, h, w), dtype=F64) * scale).to(dtype=acc, device=DEVICE)
    return mc, ms


def run(impl, x, mc, ms, gy):
    """{name: tensor} of the two ops of `impl` (the Triton namespace or Reference)."""
    y = impl.bam_apply(x, mc, ms)
    gx, gmc, gms = impl.bam_apply_backward(gy, x, mc, ms)
    return dict(y=y, grad_x=gx, grad_mc=gmc, grad_ms=gms)


def check_layouts(x, out):
    """y and grad_x follow x's layout in x's dtype; grad_mc (N, C) and grad_ms (N, 1, H, W)
    are contiguous in acc."""
    n, c, h, w = x.shape
    for name in ("y", "grad_x"):
        assert out[name].dtype == x.dtype and out[name].shape == x.shape, name
        assert out[name].is_contiguous(memory_format=expected_format(x)), name
    assert out["grad_mc"].shape == (n, c) and out["grad_ms"].shape == (n, 1, h, w)
    for name in ("grad_mc", "grad_ms"):
        assert out[name].dtype == acc_of(x.dtype) and out[name].is_contiguous(), name


def compare(x, mc=None, ms=None, gy=None, equal_nan=False, gy_layout="nchw"):
    """Triton vs Reference on both ops' outputs (dtype, shape, values, layouts); returns the
    Triton results."""
    mc0, ms0 = branches(x)
    mc, ms = (mc0 if mc is None else mc), (ms0 if ms is None else ms)
    gy = make_t(tuple(x.shape), x.dtype, gy_layout) if gy is None else gy
    got = run(ops, x, mc, ms, gy)
    want = run(Ref, x, mc, ms, gy)
    for name in got:
        g, w = got[name], want[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        _close(g, w, TOL[g.dtype], equal_nan, name)
    check_layouts(x, got)
    return got


# ----------------------------------------------------------------------------------------
# Both ops vs the Reference
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_matches_reference(dtype, layout, shape):
    x = make_t(shape, dtype, layout)
    compare(x, gy_layout=layout)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_tiles(dtype, layout, tiles):
    """Many channel chunks and pixel blocks, partial ones included (small_tiles)."""
    for shape in [(2, 13, 5, 3), (1, 6, 1, 7)]:
        compare(make_t(shape, dtype, layout))


def test_small_tiles_really_split(monkeypatch):
    """The small tiles do split the work: 4 channel chunks and 4 pixel blocks at (2, 13, 5, 3);
    the default tile splits (1, 3, 17, 19)'s 323 pixels into two blocks."""
    x = make_t((1, 3, 17, 19), F32, "nchw")
    assert H._pixel_tiles(x, F32) == (4, 256) and H._pixel_tiles(x, F64) == (4, 256)
    small_pixel_tiles(monkeypatch)
    x = make_t((2, 13, 5, 3), F64, "nchw")
    assert H._pixel_tiles(x, F64) == (4, 4)
    assert H._pixel_tiles(x.to(memory_format=torch.channels_last), F64) == (4, 4)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=dtype_id)
def test_half(dtype, layout):
    """fp16/bf16 x (fp32 accumulation): y and grad_x stored in x's dtype, within a rounding of
    the Reference's (the same fp32 math); every result's error against fp64 at most twice that
    of the plain torch ops in x's dtype (plus a rounding of the tensor's scale)."""
    x = make_t((2, 5, 3, 4), dtype, layout)
    mc, ms = branches(x)
    gy = make_t(tuple(x.shape), dtype, layout)
    got = compare(x, mc, ms, gy)
    truth = run(Ref, x.double(), mc.double(), ms.double(), gy.double())
    # Plain torch in x's dtype: the Reference's formulas with mc and ms in that dtype too.
    eager = run(Ref, x, mc.to(dtype), ms.to(dtype), gy)
    within_half_budget(NAMES, [got[k] for k in NAMES], [eager[k] for k in NAMES], [truth[k] for k in NAMES], dtype)


def test_expanded_and_cast_arguments():
    """Autograd may hand the backward an expanded gradient (stride 0 everywhere); mc and ms may
    come in other strides or float dtypes (the Triton ops cast them to acc(x))."""
    x = make_t((2, 7, 3, 4), F64, "channels_last")
    mc, ms = branches(x)
    ms_t = ms.transpose(2, 3).contiguous().transpose(2, 3)  # (N, 1, H, W) with transposed strides
    mc_t = mc.t().contiguous().t()
    gy = torch.ones((1, 1, 1, 1), dtype=F64, device=DEVICE).expand(2, 7, 3, 4)
    got = run(ops, x, mc_t, ms_t, gy)
    want = run(Ref, x, mc, ms, gy.contiguous())
    for name in got:
        _close(got[name], want[name], TOL[F64], name=name)
    y = ops.bam_apply(x, mc.float(), ms.float())
    _close(y, Ref.bam_apply(x, mc.float().double(), ms.float().double()), TOL[F64], name="y")


# ----------------------------------------------------------------------------------------
# Autograd through the Triton namespace
# ----------------------------------------------------------------------------------------
def grads(apply, x, mc, ms, gy):
    """y and the gradients of (x, mc, ms) by autograd through `apply`."""
    leaves = [t.detach().requires_grad_() for t in (x, mc, ms)]  # detach: keeps x's strides
    assert leaves[0].stride() == x.stride()
    y = apply(*leaves)
    return [y.detach(), *torch.autograd.grad(y, leaves, gy)]


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_autograd_matches_reference(dtype, layout):
    """bam_apply's autograd (its registered backward, bam_apply_backward) against autograd
    through the Reference's torch ops."""
    x = make_t((2, 6, 3, 5), dtype, layout)
    mc, ms = branches(x)
    gy = make_t(tuple(x.shape), dtype, layout)
    got = grads(ops.bam_apply, x, mc, ms, gy)
    want = grads(Ref.bam_apply, x, mc, ms, gy)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        _close(g, w, TOL[dtype], name=name)
    assert got[1].is_contiguous(memory_format=expected_format(x))


def test_gradcheck():
    """Finite differences of bam_apply through the Triton ops (fp64)."""
    x = make_t((1, 3, 2, 3), F64, "channels_last")
    mc, ms = branches(x)
    leaves = [t.detach().requires_grad_() for t in (x, mc, ms)]
    assert torch.autograd.gradcheck(ops.bam_apply, leaves)


def test_saves_only_x_sized_input():
    """Backward saves x, mc and ms: no x-sized tensor but x itself."""
    x = make_t((2, 5, 3, 4), F32, "nchw").requires_grad_()
    mc, ms = (t.requires_grad_() for t in branches(x))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.bam_apply(x, mc, ms)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(saved) == 3 and len(big) == 1 and big[0].data_ptr() == x.data_ptr()


def test_double_backward_not_implemented():
    """bam_apply_backward has no autograd of its own: a double backward raises, not a silent 0."""
    x = make_t((1, 3, 2, 2), F64, "nchw").requires_grad_()
    mc, ms = branches(x)
    gy = torch.randn_like(x).requires_grad_()
    gx, _, _ = ops.bam_apply_backward(gy, x, mc, ms)
    with pytest.raises(RuntimeError, match="autograd"):
        gx.sum().backward()


# ----------------------------------------------------------------------------------------
# NaN, infinities, saturated sigmoid
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_nan_propagates(dtype, layout, tiles):
    """A NaN in x: y is NaN there alone, grad_x not at all (grad_y * (1 + sig)); its dz is NaN,
    so grad_mc at its (n, c) and grad_ms at its (n, p). A NaN in ms: that pixel's every channel."""
    x = make_t((2, 6, 3, 4), dtype, layout)
    mc, ms = branches(x)
    x[0, 1, 0, 0] = float("nan")
    ms[1, 0, 2, 3] = float("nan")
    out = compare(x, mc, ms, equal_nan=True)
    y_nan = out["y"].isnan()
    assert y_nan[0, 1, 0, 0] and y_nan[1, :, 2, 3].all() and y_nan.sum() == 1 + 6
    gx_nan = out["grad_x"].isnan()
    assert gx_nan[1, :, 2, 3].all() and gx_nan.sum() == 6
    gmc = out["grad_mc"].isnan()
    assert gmc[0, 1] and gmc[1].all() and gmc.sum() == 1 + 6
    gms = out["grad_ms"].isnan()
    assert gms[0, 0, 0, 0] and gms[1, 0, 2, 3] and gms.sum() == 2


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_saturated_sigmoid(dtype):
    """z = +-inf and |z| far beyond exp's range: sig is exactly 1 or 0, y = 2x or x, dz = 0 (no
    overflow, no NaN); an infinite x gives an infinite y, not NaN."""
    x = make_t((2, 4, 2, 3), dtype, "nchw")
    mc, ms = branches(x)
    mc[0, 0], mc[0, 1] = float("inf"), float("-inf")
    mc[1, 2], mc[1, 3] = 1e4, -1e4
    x[1, 0, 1, 1] = float("inf")
    out = compare(x, mc, ms, equal_nan=True)
    assert torch.equal(out["y"][0, 0], 2 * x[0, 0]) and torch.equal(out["y"][0, 1], x[0, 1])
    assert torch.equal(out["y"][1, 2], 2 * x[1, 2]) and torch.equal(out["y"][1, 3], x[1, 3])
    assert out["grad_mc"][0, :2].eq(0).all() and out["grad_mc"][1, 2:].eq(0).all()
    assert out["y"][1, 0, 1, 1] == float("inf") and not out["y"].isnan().any()


# ----------------------------------------------------------------------------------------
# Measured launches, determinism, registration, input checks
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fastest", [1, 2], ids=["half_tile", "double_tile"])
def test_measured_tile_configurations_match_the_reference(monkeypatch, fastest):
    """Where launches are measured (GPUs; a fake clock here), each op times every candidate
    tile at its own site (bam_apply, bam_apply_backward) and runs the fastest, whose
    pixel-block partials still give every output; a known shape times nothing."""
    from attnkernels import choose
    from attnkernels.triton import _common

    monkeypatch.setattr(H, "_TILE_ELEMENTS", {F32: 64, F64: 64})  # several pixel blocks at this size
    x = make_t((2, 13, 6, 7), F32, "nchw")
    configs = list(_common._tile_candidates(lambda e: H._pixel_tiles(x, F32, e), 64, H._pixel_warps))
    assert len(configs) == 3
    with measured_launches(monkeypatch, {configs[fastest]}) as timed:
        compare(x)
        for site in ("bam_apply", "bam_apply_backward"):
            assert measured_choice(site, "float32 2 13 6 7 nchw") == (configs[fastest], configs), site
        assert "triton.ham_spatial_" not in choose.explain()
        assert set(timed) == set(configs)
        timed.clear()
        compare(x)
        assert timed == []  # a known key is a lookup


def test_deterministic(monkeypatch):
    """Same input, same outputs bit for bit (pixel-block partials included)."""
    small_pixel_tiles(monkeypatch)
    x = make_t((2, 11, 5, 3), F32, "nchw")
    mc, ms = branches(x)
    gy = torch.randn_like(x)
    first, second = (run(ops, x, mc, ms, gy) for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_schemas_match_the_cpp_contract():
    """The two ops are registered under attnkernels_triton with csrc/bam_ops.cpp's schemas
    (parsed by torch; the C++ library itself is not built here)."""
    found = schemas("bam")
    assert sorted(found) == sorted(T.__all__) and len(found) == 2
    for name, schema in found.items():
        ours = str(getattr(ops, name).default._schema)
        assert ours == str(torch._C.parse_schema("attnkernels_triton::" + schema)), name


def test_opcheck_schema_and_autograd():
    x = make_t((2, 6, 3, 4), F64, "channels_last")
    mc, ms = branches(x)
    cases = [
        (ops.bam_apply, (x, mc, ms)),
        (ops.bam_apply_backward, (torch.randn_like(x), x, mc, ms)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_autograd_registration"))


def _apply(backward=False, **kw):
    args = dict(x=_t(2, 3, 4, 4), mc=_t(2, 3), ms=_t(2, 1, 4, 4))
    if backward:
        args = dict(grad_y=_t(2, 3, 4, 4), **args)
    args.update(kw)
    return (ops.bam_apply_backward if backward else ops.bam_apply)(*args.values())


BAD_INPUTS = [
    (lambda: _apply(x=_t(2, 3, 4)), ValueError, r"bam_apply: x must be 4-D \(N, C, H, W\), got 3-D"),
    (lambda: _apply(x=torch.ones(2, 3, 4, 4, dtype=torch.int64, device=DEVICE)), TypeError,
     r"bam_apply: x must be a floating-point tensor, got Long"),
    (lambda: _apply(x=_t(2, 3, 0, 4), ms=_t(2, 1, 0, 4)), ValueError,
     r"bam_apply: x must not be empty, got shape \[2, 3, 0, 4\]"),
    (lambda: _apply(x=_t(0, 3, 4, 4), mc=_t(0, 3), ms=_t(0, 1, 4, 4)), ValueError,
     r"bam_apply: x must not be empty"),
    (lambda: _apply(mc=_t(2, 4)), ValueError, r"bam_apply: mc must have shape \(N, C\) = \(2, 3\), got \[2, 4\]"),
    (lambda: _apply(mc=_t(2, 3, 1, 1)), ValueError,
     r"bam_apply: mc must have shape \(N, C\) = \(2, 3\), got \[2, 3, 1, 1\]"),
    (lambda: _apply(mc=torch.ones(2, 3, dtype=torch.int32, device=DEVICE)), TypeError,
     r"bam_apply: mc must be a floating-point tensor"),
    (lambda: _apply(mc=torch.ones(2, 3, device="meta")), ValueError, r"bam_apply: mc must be on \w+(:\d+)?, got meta"),
    (lambda: _apply(ms=_t(2, 2, 4, 4)), ValueError,
     r"bam_apply: ms must have shape \(N, 1, H, W\) = \(2, 1, 4, 4\), got \[2, 2, 4, 4\]"),
    (lambda: _apply(ms=_t(2, 1, 4, 3)), ValueError,
     r"bam_apply: ms must have shape \(N, 1, H, W\) = \(2, 1, 4, 4\), got \[2, 1, 4, 3\]"),
    (lambda: _apply(ms=torch.ones(2, 1, 4, 4, dtype=torch.int32, device=DEVICE)), TypeError,
     r"bam_apply: ms must be a floating-point tensor"),
    (lambda: _apply(ms=torch.ones(2, 1, 4, 4, device="meta")), ValueError,
     r"bam_apply: ms must be on \w+(:\d+)?, got meta"),
    (lambda: _apply(backward=True, grad_y=_t(2, 3, 4, 5)), ValueError,
     r"bam_apply_backward: grad_y must match x's shape \[2, 3, 4, 4\] and dtype Float, got \[2, 3, 4, 5\] Float"),
    (lambda: _apply(backward=True, grad_y=_t(2, 3, 4, 4, dtype=F64)), ValueError,
     r"bam_apply_backward: grad_y must match x's shape \[2, 3, 4, 4\] and dtype Float, got \[2, 3, 4, 4\] Double"),
    (lambda: _apply(backward=True, x=_t(2, 3)), ValueError,
     r"bam_apply_backward: x must be 4-D \(N, C, H, W\), got 2-D"),
    (lambda: _apply(backward=True, mc=_t(2)), ValueError, r"bam_apply_backward: mc must have shape \(N, C\)"),
    (lambda: _apply(backward=True, ms=_t(3, 1, 4, 4)), ValueError,
     r"bam_apply_backward: ms must have shape \(N, 1, H, W\) = \(2, 1, 4, 4\), got \[3, 1, 4, 4\]"),
    (lambda: _apply(backward=True, grad_y=_t(2, 3, 0, 4), x=_t(2, 3, 0, 4), ms=_t(2, 1, 0, 4)), ValueError,
     r"bam_apply_backward: x must not be empty"),
]


@pytest.mark.parametrize("call,error,pattern", bad_input_params(BAD_INPUTS))
def test_bad_inputs(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
