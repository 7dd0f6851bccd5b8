"""Triton backend of the cbam_spatial hot path against its Reference ops.

Each op under `torch.ops.attnkernels_triton` (ham_spatial's pixel kernels with ONE_GROUP=True)
against `attnkernels.ops.cbam_spatial.Reference`, forward and backward ops called directly on the
same arguments; autograd and the `triton` backend through the public functions are tested with
the other backends in tests/test_cbam_spatial.py (on a GPU).
The contract is csrc/cbam_spatial_ops.cpp: ties share the max's gradient, the tie indicator is
a literal product (a NaN max makes the whole pixel's gradient NaN), and y = F * s alone. Without
CUDA the kernels run on CPU tensors under the Triton interpreter: shapes stay tiny.
"""
import pytest
import torch

# triton_cases first: it switches the Triton interpreter on without CUDA.
from triton_cases import (
    DEVICE,
    F16,
    F32,
    F64,
    acc_of,
    bad_input_params,
    dtype_id,
    expected_format,
    make_t,
    measured_launches,
    ops,
    shape_id,
    small_pixel_tiles,
)
from triton_cases import close as _close
from triton_cases import randn as _t

from attnkernels.ops._schemas import schemas
from attnkernels.ops.cbam_spatial import Reference as Ref
from attnkernels.triton import cbam_spatial as T
from attnkernels.triton import ham_spatial as H

TOL = {
    F64: dict(rtol=1e-12, atol=1e-12),
    F32: dict(rtol=1e-5, atol=1e-5),
    F16: dict(rtol=2e-3, atol=2e-3),
}

# (N, C, H, W): odd C and H != W; wider C; HW = 1; C = 1; N = 1.
SHAPES = [(2, 5, 3, 4), (2, 24, 5, 3), (2, 3, 1, 1), (2, 1, 3, 2), (1, 7, 2, 5)]
# NCHW, channels_last, a strided H*W slice (not one pixel stride when H, W > 1), a channel
# slice (a sample stride that is not C*H*W): triton_cases.make_t's.
LAYOUTS = ["nchw", "channels_last", "sliced", "channel_slice"]



@pytest.fixture(params=["default_tiles", "small_tiles"])
def tiles(request, monkeypatch):
    if request.param == "small_tiles":
        small_pixel_tiles(monkeypatch)
    return request.param


# ----------------------------------------------------------------------------------------
# Inputs and the comparison
# ----------------------------------------------------------------------------------------
def make_gate(n, c, dtype):
    """CBAM's channel gate a in (0, 1), in acc(x)."""
    return (torch.rand((n, c), dtype=F64) * 0.9 + 0.05).to(dtype=acc_of(dtype), device=DEVICE)


def upstream(x, layout="nchw"):
    """s in (0, 1) (N, 1, H, W); random grad_d (N, 2, H, W) in acc; grad_y in x's dtype, shape
    and `layout`."""
    n, _, h, w = x.shape
    acc = acc_of(x.dtype)
    s = (torch.rand((n, 1, h, w), dtype=F64) * 0.9 + 0.05).to(dtype=acc, device=DEVICE)
    gd = torch.randn((n, 2, h, w), dtype=acc, device=DEVICE)
    gy = make_t(tuple(x.shape), x.dtype, layout)
    return s, gd, gy


def run(impl, x, gate, s, gd, gy):
    """{name: tensor} of the four ops of `impl` (the Triton namespace or Reference); the pool
    backward gets impl's own d."""
    d = impl.cbam_spatial_pool(x, gate)
    pgx, pgg = impl.cbam_spatial_pool_backward(gd, x, gate, d)
    y = impl.cbam_spatial_apply(x, gate, s)
    agx, agg, ags = impl.cbam_spatial_apply_backward(gy, x, gate, s)
    return dict(d=d, pool_grad_x=pgx, pool_grad_gate=pgg, y=y, apply_grad_x=agx, apply_grad_gate=agg, grad_s=ags)


def compare(x, gate, s=None, gd=None, gy=None, equal_nan=False):
    """Triton vs Reference on every op's outputs (dtype, shape, values; layouts); returns the
    Triton results. The channel max is exact: d's max row must match bit for bit."""
    s0, gd0, gy0 = upstream(x)
    s, gd, gy = (s0 if s is None else s), (gd0 if gd is None else gd), (gy0 if gy is None else gy)
    got = run(ops, x, gate, s, gd, gy)
    want = run(Ref, x, gate, s, gd, gy)
    for name in got:
        g, w = got[name], want[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        _close(g, w, TOL[g.dtype], equal_nan, name)
    assert torch.equal(got["d"][:, 1].isnan(), want["d"][:, 1].isnan())
    finite = ~want["d"][:, 1].isnan()
    assert torch.equal(got["d"][:, 1][finite], want["d"][:, 1][finite])
    check_layouts(x, got)
    return got


def check_layouts(x, out):
    """Outputs shaped like x follow x's layout in x's dtype; the small maps are contiguous in acc."""
    acc = acc_of(x.dtype)
    for name in ("y", "pool_grad_x", "apply_grad_x"):
        assert out[name].dtype == x.dtype, name
        assert out[name].is_contiguous(memory_format=expected_format(x)), name
    for name in ("d", "pool_grad_gate", "apply_grad_gate", "grad_s"):
        assert out[name].dtype == acc and out[name].is_contiguous(), name


# ----------------------------------------------------------------------------------------
# Every op vs the Reference
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_matches_reference(dtype, layout, shape):
    x = make_t(shape, dtype, layout)
    gate = make_gate(*shape[:2], dtype)
    s, gd, gy = upstream(x, layout)
    compare(x, gate, s, gd, gy)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_matches_reference_half(layout):
    """fp16 x (fp32 accumulation): outputs shaped like x are stored in fp16."""
    x = make_t((2, 5, 3, 4), F16, layout)
    compare(x, make_gate(2, 5, F16))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_tiles(dtype, layout, tiles):
    """Many channel chunks and pixel blocks, partial ones included (small_tiles)."""
    for shape in [(2, 13, 5, 3), (1, 6, 1, 7)]:
        x = make_t(shape, dtype, layout)
        compare(x, make_gate(*shape[:2], dtype))


def test_small_tiles_really_split(monkeypatch):
    """The small tiles do split the work: 4 channel chunks and 4 pixel blocks at (2, 13, 5, 3)."""
    small_pixel_tiles(monkeypatch)
    x = make_t((2, 13, 5, 3), F64, "nchw")
    assert H._pixel_tiles(x, F64) == (4, 4)
    assert H._pixel_tiles(x.to(memory_format=torch.channels_last), F64) == (4, 4)


def test_expanded_and_sliced_arguments():
    """Autograd may hand the backward ops expanded or strided gradients; s and gate may come
    in other strides or dtypes (the Triton ops cast them to acc)."""
    x = make_t((2, 7, 3, 4), F64, "channels_last")
    gate = make_gate(2, 7, F64)
    s = torch.rand((2, 1, 4, 3), dtype=F64, device=DEVICE).transpose(2, 3)
    gd = torch.ones((2, 1, 1, 1), dtype=F64, device=DEVICE).expand(2, 2, 3, 4)
    gy = torch.ones((1, 1, 1, 1), dtype=F64, device=DEVICE).expand(2, 7, 3, 4)  # stride 0 everywhere
    got = run(ops, x, gate, s, gd, gy)
    want = run(Ref, x, gate, s.contiguous(), gd.contiguous(), gy.contiguous())
    for name in got:
        _close(got[name], want[name], TOL[F64], name=name)
    # gate and s of another float dtype: cast to acc(x) first.
    y = ops.cbam_spatial_apply(x, gate.float(), s.float())
    _close(y, Ref.cbam_spatial_apply(x, gate.float().double(), s.float().double()), TOL[F64], name="y")


# ----------------------------------------------------------------------------------------
# Ties, NaN, infinities
# ----------------------------------------------------------------------------------------
def with_ties(x, gate):
    """Channels 0, C-1 (and 1) repeated, above every other channel, with the largest gate: F's
    max ties at every pixel of every sample; sample 1's gate is 0: all C channels tie at 0."""
    c = x.shape[1]
    top = x.abs().amax(1) + 1
    tied = [0, c - 1] + ([1] if c > 3 else [])
    for ch in tied:
        x[:, ch] = top
        gate[:, ch] = gate.amax(1)
    gate[1] = 0
    return tied


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_max_ties_share_the_gradient(dtype, layout, tiles):
    """Repeated channels tie at the max: its gradient splits evenly among them (torch.amax's
    rule), over all C channels (one group, no mask)."""
    shape = (2, 7, 2, 3)
    x = make_t(shape, dtype, layout)
    gate = make_gate(2, 7, dtype)
    tied = with_ties(x, gate)
    s, gd, gy = upstream(x)
    out = compare(x, gate, s, gd, gy)
    f = x.to(gate.dtype) * gate[:, :, None, None]
    assert ((f == out["d"][:, 1:]).sum(1)[0] == len(tied)).all()
    assert ((f == out["d"][:, 1:]).sum(1)[1] == 7).all()
    share0 = (gd[0, 0] / 7 + gd[0, 1] / len(tied)) * gate[0, 0]
    for ch in tied:
        _close(out["pool_grad_x"][0, ch], share0.to(dtype), TOL[dtype], name=f"channel {ch}")
    assert out["pool_grad_x"][1].eq(0).all()  # a zero gate: dF * 0


@pytest.mark.parametrize("kind", ["ties", "relu", "constant"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_ties_in_data(dtype, kind):
    """Repeated small integers, ReLU zeros and a constant map: many channels at one max."""
    x = make_t((2, 6, 3, 2), dtype, "nchw", kind=kind)
    gate = torch.full((2, 6), 0.5, dtype=acc_of(dtype), device=DEVICE)  # equal gates keep the ties
    out = compare(x, gate)
    f = x.to(gate.dtype) * gate[:, :, None, None]
    assert (f == out["d"][:, 1:]).sum(1).max() > 1


def test_max_tie_split_by_hand():
    """x = -1 everywhere with gates 0.9 .. 0.1: F's max is -0.1 on channel 4 alone; with
    equal gates all five channels tie and each gets a fifth of the max's gradient."""
    x = torch.full((1, 5, 1, 2), -1.0, dtype=F64, device=DEVICE)
    gate = torch.tensor([[0.9, 0.8, 0.7, 0.2, 0.1]], dtype=F64, device=DEVICE)
    gd = torch.zeros((1, 2, 1, 2), dtype=F64, device=DEVICE)
    gd[:, 1] = 3.0  # only the max gets gradient
    d = ops.cbam_spatial_pool(x, gate)
    assert d[0, 1].eq(-0.1).all()
    _close(d[0, 0], torch.full((1, 2), -2.7 / 5, dtype=F64, device=DEVICE), TOL[F64])
    grad_x, grad_gate = ops.cbam_spatial_pool_backward(gd, x, gate, d)
    expected = torch.zeros(5, dtype=F64, device=DEVICE)
    expected[4] = 3.0 * 0.1
    _close(grad_x[0, :, 0, 0], expected, TOL[F64])
    gate = torch.full((1, 5), 0.5, dtype=F64, device=DEVICE)
    grad_x, grad_gate = ops.cbam_spatial_pool_backward(gd, x, gate, ops.cbam_spatial_pool(x, gate))
    _close(grad_x, torch.full_like(x, 3.0 / 5 * 0.5), TOL[F64])
    _close(grad_gate, torch.full((1, 5), 2 * 3.0 / 5 * -1.0, dtype=F64, device=DEVICE), TOL[F64])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_nan_propagates(dtype, layout, tiles):
    """A NaN in x: its pixel's mean and max are NaN; the max ties nothing (count 0), so
    [F == max] * (grad / 0) is NaN on every channel of that pixel (the literal product),
    also where the max's upstream gradient is 0; y, grad_x of apply and grad_s only where F is."""
    shape = (2, 6, 3, 4)
    x = make_t(shape, dtype, layout)
    gate = make_gate(2, 6, dtype)
    x[0, 1, 0, 0] = float("nan")
    x[1, 4, 2, 3] = float("nan")
    s, gd, gy = upstream(x)
    gd[1, 1, 2, 3] = 0.0  # 0 / 0: NaN too
    out = compare(x, gate, s, gd, gy, equal_nan=True)
    nan = out["d"].isnan()
    assert nan[0, :, 0, 0].all() and nan[1, :, 2, 3].all() and nan.sum() == 4
    px = out["pool_grad_x"].isnan()
    assert px[0, :, 0, 0].all() and px[1, :, 2, 3].all() and px.sum() == 2 * 6
    assert out["pool_grad_gate"].isnan().all()  # every channel sums a NaN pixel
    assert out["y"].isnan().sum() == 2 and out["y"][0, 1, 0, 0].isnan() and out["y"][1, 4, 2, 3].isnan()
    assert out["grad_s"].isnan().sum() == 2
    assert out["apply_grad_x"].isnan().sum() == 0  # dF * gate: x's NaN does not enter
    gg = out["apply_grad_gate"].isnan()
    assert gg[0, 1] and gg[1, 4] and gg.sum() == 2


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_inf_is_not_nan(dtype):
    """An infinite F: y = F * s is infinite, not NaN (no F * 0 * s term, unlike
    ham_spatial_apply(x, gate, 1, s, s)); it is the max, tied with nothing else."""
    x = make_t((2, 5, 2, 3), dtype, "nchw")
    gate = make_gate(2, 5, dtype)
    x[0, 2, 1, 1] = float("inf")
    x[1, 0, 0, 2] = float("-inf")
    out = compare(x, gate, equal_nan=True)
    assert out["y"][0, 2, 1, 1] == float("inf") and out["y"][1, 0, 0, 2] == float("-inf")
    assert not out["y"].isnan().any()
    assert out["d"][0, 1, 1, 1] == float("inf") and out["d"][0, 0, 1, 1] == float("inf")
    ones = torch.ones_like(gate)
    s = torch.rand((2, 1, 2, 3), dtype=gate.dtype, device=DEVICE)
    assert ops.ham_spatial_apply(x, gate, ones, s, s)[0, 2, 1, 1].isnan()  # HAM's form: NaN here


def test_pool_equals_ham_d1():
    """cbam_spatial_pool(x, gate) is ham_spatial_pool(x, gate, C)'s d1 bit for bit (NaN included)."""
    for layout in ("nchw", "channels_last", "sliced"):
        x = make_t((2, 11, 3, 5), F32, layout)
        x[1, 3, 2, 4] = float("nan")
        gate = make_gate(2, 11, F32)
        d = ops.cbam_spatial_pool(x, gate)
        d1 = ops.ham_spatial_pool(x, gate, 11)[0]
        assert torch.equal(d.isnan(), d1.isnan()) and torch.equal(d.nan_to_num(), d1.nan_to_num())


# ----------------------------------------------------------------------------------------
# Measured launches, determinism, registration, input checks
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fastest", [1, 2], ids=["half_tile", "double_tile"])
def test_measured_tile_configurations_match_the_reference(monkeypatch, fastest):
    """Where launches are measured (GPUs; a fake clock here), each op times every candidate
    tile at its own site (cbam_spatial_*) and runs the fastest, whose pixel-block partials
    still give every output."""
    from attnkernels import choose
    from attnkernels.triton import _common

    monkeypatch.setattr(H, "_TILE_ELEMENTS", {F32: 64, F64: 64})  # several pixel blocks at this size
    x = make_t((2, 13, 6, 7), F32, "nchw")
    configs = list(_common._tile_candidates(lambda e: H._pixel_tiles(x, F32, e), 64, H._pixel_warps))
    assert len(configs) == 3
    with measured_launches(monkeypatch, {configs[fastest]}) as timed:
        compare(x, make_gate(2, 13, F32))
        made = choose.explain()
        for op in ("pool", "pool_backward", "apply", "apply_backward"):
            assert f"triton.cbam_spatial_{op} [float32 2 13 6 7 nchw]: {configs[fastest]} (measured" in made
        assert "triton.ham_spatial_" not in made
        assert set(timed) == set(configs)


def test_deterministic(monkeypatch):
    """Same input, same outputs bit for bit (pixel-block partials included)."""
    small_pixel_tiles(monkeypatch)
    x = make_t((2, 11, 5, 3), F32, "nchw")
    gate = make_gate(2, 11, F32)
    args = upstream(x)
    first, second = (run(ops, x, gate, *args) for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_schemas_match_the_cpp_contract():
    """The four ops are registered under attnkernels_triton with csrc/cbam_spatial_ops.cpp's
    schemas (parsed by torch; the C++ library itself is not built here)."""
    found = schemas("cbam_spatial")
    assert sorted(found) == sorted(T.__all__) and len(found) == 4
    for name, schema in found.items():
        ours = str(getattr(ops, name).default._schema)
        assert ours == str(torch._C.parse_schema("attnkernels_triton::" + schema)), name


def test_opcheck_schema():
    x = make_t((2, 6, 3, 4), F64, "channels_last")
    gate = make_gate(2, 6, F64)
    s, gd, gy = upstream(x)
    d = ops.cbam_spatial_pool(x, gate)
    cases = [
        (ops.cbam_spatial_pool, (x, gate)),
        (ops.cbam_spatial_pool_backward, (gd, x, gate, d)),
        (ops.cbam_spatial_apply, (x, gate, s)),
        (ops.cbam_spatial_apply_backward, (gy, x, gate, s)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args, test_utils=("test_schema",))


def _pool_bw(**kw):
    args = dict(grad_d=_t(2, 2, 4, 4), x=_t(2, 3, 4, 4), gate=_t(2, 3), d=_t(2, 2, 4, 4))
    args.update(kw)
    return ops.cbam_spatial_pool_backward(*args.values())


def _apply(backward=False, **kw):
    args = dict(x=_t(2, 3, 4, 4), gate=_t(2, 3), s=_t(2, 1, 4, 4))
    if backward:
        args = dict(grad_y=_t(2, 3, 4, 4), **args)
    args.update(kw)
    return (ops.cbam_spatial_apply_backward if backward else ops.cbam_spatial_apply)(*args.values())


BAD_INPUTS = [
    (lambda: ops.cbam_spatial_pool(_t(2, 3, 4), _t(2, 3)), ValueError,
     r"cbam_spatial_pool: x must be 4-D \(N, C, H, W\), got 3-D"),
    (lambda: ops.cbam_spatial_pool(torch.ones(2, 3, 4, 4, dtype=torch.int64, device=DEVICE), _t(2, 3)),
     TypeError, r"cbam_spatial_pool: x must be a floating-point tensor, got Long"),
    (lambda: ops.cbam_spatial_pool(_t(2, 3, 0, 4), _t(2, 3)), ValueError, r"cbam_spatial_pool: x must not be empty"),
    (lambda: ops.cbam_spatial_pool(_t(2, 3, 4, 4), _t(2, 4)), ValueError,
     r"cbam_spatial_pool: gate must have shape \(N, C\) = \(2, 3\), got \[2, 4\]"),
    (lambda: ops.cbam_spatial_pool(_t(2, 3, 4, 4), torch.ones(2, 3, dtype=torch.int32, device=DEVICE)),
     TypeError, r"cbam_spatial_pool: gate must be a floating-point tensor"),
    (lambda: ops.cbam_spatial_pool(_t(2, 3, 4, 4), torch.ones(2, 3, device="meta")), ValueError,
     r"cbam_spatial_pool: gate must be on \w+(:\d+)?, got meta"),
    (lambda: _pool_bw(grad_d=_t(2, 1, 4, 4)), ValueError,
     r"cbam_spatial_pool_backward: grad_d must have shape \(N, 2, H, W\) = \(2, 2, 4, 4\), got \[2, 1, 4, 4\]"),
    (lambda: _pool_bw(d=_t(2, 2, 4, 3)), ValueError,
     r"cbam_spatial_pool_backward: d must have shape \(N, 2, H, W\) = \(2, 2, 4, 4\), got \[2, 2, 4, 3\]"),
    (lambda: _pool_bw(gate=_t(3, 3)), ValueError,
     r"cbam_spatial_pool_backward: gate must have shape \(N, C\) = \(2, 3\), got \[3, 3\]"),
    (lambda: _pool_bw(x=_t(2, 3, 0, 4), grad_d=_t(2, 2, 0, 4), d=_t(2, 2, 0, 4)), ValueError,
     r"cbam_spatial_pool_backward: x must not be empty"),
    (lambda: _apply(s=_t(2, 2, 4, 4)), ValueError,
     r"cbam_spatial_apply: s must have shape \(N, 1, H, W\) = \(2, 1, 4, 4\), got \[2, 2, 4, 4\]"),
    (lambda: _apply(s=torch.ones(2, 1, 4, 4, dtype=torch.int32, device=DEVICE)), TypeError,
     r"cbam_spatial_apply: s must be a floating-point tensor"),
    (lambda: _apply(s=torch.ones(2, 1, 4, 4, device="meta")), ValueError,
     r"cbam_spatial_apply: s must be on \w+(:\d+)?, got meta"),
    (lambda: _apply(backward=True, grad_y=_t(2, 3, 4, 5)), ValueError,
     r"cbam_spatial_apply_backward: grad_y must match x's shape \[2, 3, 4, 4\] and dtype Float, "
     r"got \[2, 3, 4, 5\] Float"),
    (lambda: _apply(backward=True, gate=_t(2)), ValueError,
     r"cbam_spatial_apply_backward: gate must have shape \(N, C\)"),
]


@pytest.mark.parametrize("call,error,pattern", bad_input_params(BAD_INPUTS))
def test_bad_inputs(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
