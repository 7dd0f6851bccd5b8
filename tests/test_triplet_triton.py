"""Triton backend of the triplet hot path against its Reference ops.

Each op under `torch.ops.attnkernels_triton` against `attnkernels.ops.triplet.Reference`,
forward and backward ops called directly on the same arguments; autograd and the `triton`
backend through the fused module are tested in tests/test_triplet.py (the interpreter case
there, and on a GPU). The contract is csrc/triplet_ops.cpp: three [max, mean] maps (over C, H
and W), ties share a max's gradient, the tie indicator is a literal product (a NaN max makes
its whole line's gradient NaN), y = (x * s_hw + x * s_cw + x * s_hc) / 3 in that order.
Without CUDA the kernels run on CPU tensors under the Triton interpreter: shapes stay tiny.
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
    INTERPRET,
    acc_of,
    bad_input_params,
    dtype_id,
    expected_format,
    make_t,
    measured_choice,
    measured_launches,
    ops,
    shape_id,
    small_reductions,
    within_half_budget,
)
from triton_cases import close as _close
from triton_cases import randn as _t

from attnkernels.ops._schemas import schemas
from attnkernels.ops.triplet import GATES, in_plane
from attnkernels.ops.triplet import Reference as Ref
from attnkernels.triton import _common
from attnkernels.triton import triplet as T

TOL = {
    F64: dict(rtol=1e-12, atol=1e-12),
    F32: dict(rtol=1e-5, atol=1e-5),
}

# (N, C, H, W): odd C and H != W; wider C; HW = 1; C = 1; N = 1; W = 1 with H > 1.
SHAPES = [(2, 5, 3, 4), (2, 24, 5, 3), (2, 3, 1, 1), (2, 1, 3, 2), (1, 7, 2, 5), (2, 4, 5, 1)]
# NCHW, channels_last, a strided H*W slice, a channel slice (a sample stride that is not
# C*H*W), every dim sliced, a slice of a channels_last tensor: triton_cases.make_t's.
LAYOUTS = ["nchw", "channels_last", "sliced", "channel_slice"]
SLICED = ["sliced_all", "sliced_channels_last"]

OUTPUTS = ("d_hw", "d_cw", "d_hc", "pool_grad_x", "y", "apply_grad_x", "grad_s_hw", "grad_s_cw", "grad_s_hc")
LIKE_X = ("pool_grad_x", "y", "apply_grad_x")

# The tile knobs, small: several channel blocks and column tiles, partial ones included, so
# the hw and hc maps come in partials; the combine kernel and _common's ordered sum (counts,
# grad_s) in several chunks too.
SMALL_TILES = dict(
    _TILE_ELEMENTS={F32: 8, F64: 8},
    _MAX_BLOCK_W=4,
    _MAX_BLOCK_C_CHANNELS_LAST=4,
    _MIN_BLOCK_C=1,
    _COMBINE_BLOCK_P=4,
    _COMBINE_TILE=8,
    _min_programs=lambda device: 1,  # the CPU's program target on every device
)


def small_tiles(monkeypatch):
    for name, value in SMALL_TILES.items():
        monkeypatch.setattr(T, name, value)
    small_reductions(monkeypatch)


@pytest.fixture(params=["default_tiles", "small_tiles"])
def tiles(request, monkeypatch):
    if request.param == "small_tiles":
        small_tiles(monkeypatch)
    return request.param


# ----------------------------------------------------------------------------------------
# Inputs and the comparison
# ----------------------------------------------------------------------------------------
def gates(x):
    """s_hw (N, 1, H, W), s_cw (N, 1, C, W), s_hc (N, 1, H, C) in (0.05, 0.95), in acc(x)."""
    acc = acc_of(x.dtype)
    return [(torch.rand(_plane(x, gate, 1), dtype=F64) * 0.9 + 0.05).to(dtype=acc, device=DEVICE) for gate in GATES]


def _plane(x, gate, k):
    rows, cols = GATES[gate]
    return (x.shape[0], k, x.shape[rows], x.shape[cols])


def upstream(x, layout="nchw"):
    """The gates s, random grad_d (N, 2, ., .) of the three maps in acc, and grad_y in x's
    dtype, shape and `layout`."""
    acc = acc_of(x.dtype)
    gd = [torch.randn(_plane(x, gate, 2), dtype=acc, device=DEVICE) for gate in GATES]
    gy = make_t(tuple(x.shape), x.dtype, layout)
    return gates(x), gd, gy


def run(impl, x, s, gd, gy):
    """{name: tensor} of the four ops of `impl` (the Triton namespace or Reference); the pool
    backward gets impl's own maps."""
    d = impl.triplet_pool(x)
    pgx = impl.triplet_pool_backward(*gd, x, *d)
    y = impl.triplet_apply(x, *s)
    agx, gs_hw, gs_cw, gs_hc = impl.triplet_apply_backward(gy, x, *s)
    return dict(zip(OUTPUTS, (*d, pgx, y, agx, gs_hw, gs_cw, gs_hc)))


def compare(x, s=None, gd=None, gy=None, equal_nan=False):
    """Triton vs Reference on every op's outputs (dtype, shape, values; layouts); returns the
    Triton results. The maxima are exact: every map's max plane matches bit for bit."""
    s0, gd0, gy0 = upstream(x)
    s, gd, gy = (s0 if s is None else s), (gd0 if gd is None else gd), (gy0 if gy is None else gy)
    got = run(ops, x, s, gd, gy)
    want = run(Ref, x, s, gd, gy)
    for name in OUTPUTS:
        g, w = got[name], want[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        _close(g, w, TOL[acc_of(g.dtype)], equal_nan, name)
    for name in ("d_hw", "d_cw", "d_hc"):
        g, w = got[name][:, 0], want[name][:, 0]
        assert torch.equal(g.isnan(), w.isnan()), name
        assert torch.equal(g[~w.isnan()], w[~w.isnan()]), name
    check_layouts(x, got)
    return got


def check_layouts(x, out):
    """Outputs shaped like x follow x's layout in x's dtype; the maps are contiguous in acc."""
    acc = acc_of(x.dtype)
    for name in LIKE_X:
        assert out[name].dtype == x.dtype, name
        assert out[name].is_contiguous(memory_format=expected_format(x)), name
    for name in set(OUTPUTS) - set(LIKE_X):
        assert out[name].dtype == acc and out[name].is_contiguous(), name


def tie_counts(x, d):
    """{gate: #{x == M} per line} of the maps d."""
    return {gate: (in_plane(x.to(m.dtype), gate) == m[:, :1]).sum(1) for gate, m in zip(GATES, d)}


# ----------------------------------------------------------------------------------------
# Every op vs the Reference
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_matches_reference(dtype, layout, shape):
    x = make_t(shape, dtype, layout)
    s, gd, gy = upstream(x, layout)
    compare(x, s, gd, gy)


@pytest.mark.parametrize("layout", SLICED)
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (1, 7, 2, 5)], ids=shape_id)
def test_sliced_in_every_dim(shape, layout):
    """Views dense in neither layout, with (h, w) not flattening to one stride."""
    x = make_t(shape, F64, layout)
    s, gd, gy = upstream(x, layout)
    compare(x, s, gd, gy)


def eager(x, s, gd, gy):
    """The four ops in plain torch in x's own dtype (maps cast to it): the error budget."""
    dt = x.dtype
    d = [torch.cat([t.amax(1, keepdim=True), t.sum(1, keepdim=True) / t.shape[1]], 1).contiguous()
         for t in (in_plane(x, gate) for gate in GATES)]
    s, gd = [t.to(dt) for t in s], [t.to(dt) for t in gd]
    pgx = Ref.triplet_pool_backward(*gd, x, *d)
    y = Ref.triplet_apply(x, *s)
    agx, *gs = Ref.triplet_apply_backward(gy, x, *s)
    return [*d, pgx, y, agx, *gs]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=dtype_id)
def test_half_precision(dtype, layout):
    """fp16/bf16 x (fp32 accumulation; y and grad_x stored in x's dtype): each result's error
    against fp64 at most twice plain torch's in that dtype, plus a rounding of its scale."""
    for shape in [(2, 24, 5, 3), (1, 7, 6, 9)]:
        x = make_t(shape, dtype, layout)
        s, gd, gy = upstream(x, layout)
        got = run(ops, x, s, gd, gy)
        check_layouts(x, got)
        x64, s64, gd64 = x.double(), [t.double() for t in s], [t.double() for t in gd]
        truth = run(Ref, x64, s64, gd64, gy.double())
        within_half_budget(OUTPUTS, [got[k] for k in OUTPUTS], eager(x, s, gd, gy), [truth[k] for k in OUTPUTS],
                           dtype)
        for name in ("d_hw", "d_cw", "d_hc"):  # the max of values exact in acc: exact
            assert torch.equal(got[name][:, 0], truth[name][:, 0].float()), name


# ----------------------------------------------------------------------------------------
# Tiles: several channel blocks and column tiles, partial ones included
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_tiles(dtype, layout, tiles):
    for shape in [(2, 13, 5, 7), (1, 6, 1, 7)]:
        compare(make_t(shape, dtype, layout))


def test_small_tiles_really_split(monkeypatch):
    """The small tiles split both reductions across programs: 7 channel blocks and 2 column
    tiles (NCHW), 4 and 4 (channels_last), each with a partial last one."""
    small_tiles(monkeypatch)
    x = make_t((2, 13, 5, 7), F64, "nchw")
    assert T._tiles(x, F64) == (2, 4)
    assert T._tiles(x.to(memory_format=torch.channels_last), F64) == (4, 2)


@pytest.mark.parametrize("layout,shape", [("nchw", (1, 20, 2, 130)), ("channels_last", (1, 70, 2, 20))])
def test_default_tiles_split(monkeypatch, layout, shape):
    """Shapes over one default tile in every tiled dim (channels and columns), partial ends."""
    monkeypatch.setattr(T, "_min_programs", lambda device: 1)
    x = make_t(shape, F64, layout)
    block_c, block_w = T._tiles(x, F64)
    grid = T._Grid(x, block_c, block_w)
    assert grid.split_hw() and grid.split_hc(), (block_c, block_w)
    assert shape[1] % block_c and shape[3] % block_w
    compare(x)


def test_expanded_and_sliced_arguments():
    """Autograd may hand the backward ops expanded or strided gradients; the gates and maps may
    come in other strides or float dtypes (the Triton ops cast them to acc)."""
    x = make_t((2, 7, 3, 4), F64, "channels_last")
    s = [torch.rand((2, 1, 4, 3), dtype=F64, device=DEVICE).transpose(2, 3),
         torch.rand((2, 1, 4, 7), dtype=F64, device=DEVICE).transpose(2, 3),
         torch.rand((2, 1, 3, 7), dtype=F64, device=DEVICE)]
    gd = [torch.ones((2, 1, 1, 1), dtype=F64, device=DEVICE).expand(_plane(x, gate, 2)) for gate in GATES]
    gy = torch.ones((1, 1, 1, 1), dtype=F64, device=DEVICE).expand(2, 7, 3, 4)  # stride 0 everywhere
    got = run(ops, x, s, gd, gy)
    want = run(Ref, x, [t.contiguous() for t in s], [t.contiguous() for t in gd], gy.contiguous())
    for name in OUTPUTS:
        _close(got[name], want[name], TOL[F64], name=name)
    # Gates and maps of another float dtype: cast to acc(x) first.
    y = ops.triplet_apply(x, *(t.float() for t in s))
    _close(y, Ref.triplet_apply(x, *(t.float().double() for t in s)), TOL[F64], name="y")
    d = Ref.triplet_pool(x)
    gx = ops.triplet_pool_backward(*(t.float() for t in gd), x, *d)
    _close(gx, Ref.triplet_pool_backward(*(t.contiguous() for t in gd), x, *d), TOL[F64], name="pool_grad_x")


# ----------------------------------------------------------------------------------------
# Ties, NaN, infinities
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ties", "relu", "sparse", "constant"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_ties_in_data(dtype, kind, tiles):
    """Repeated small integers, ReLU zeros, zero channels and a constant map: each of the three
    maxima tied along many lines (ReLU's over C = 9 rarely: all nine at 0), the gradient shared
    among them."""
    x = make_t((2, 9, 5, 6), dtype, "nchw", kind=kind)
    out = compare(x)
    for gate, cnt in tie_counts(x, [out[k] for k in ("d_hw", "d_cw", "d_hc")]).items():
        assert cnt.max() > 1 or (kind, gate) == ("relu", "hw"), gate


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_max_tie_split_by_hand(layout):
    """A constant x ties every line: each element gets 1/C, 1/H and 1/W of the three maxima's
    gradients; the means' gradients are shared over L as ever."""
    x = make_t((1, 3, 2, 4), F64, layout, kind="constant")
    gd = [torch.zeros(_plane(x, gate, 2), dtype=F64, device=DEVICE) for gate in GATES]
    for g in gd:
        g[:, 0] = 12.0
    d = ops.triplet_pool(x)
    assert all(m[:, 0].eq(-0.75).all() and m[:, 1].eq(-0.75).all() for m in d)
    grad_x = ops.triplet_pool_backward(*gd, x, *d)
    assert grad_x.eq(12.0 / 3 + 12.0 / 2 + 12.0 / 4).all()
    for g in gd:
        g[:, 0], g[:, 1] = 0.0, 24.0
    grad_x = ops.triplet_pool_backward(*gd, x, *d)
    assert grad_x.eq(24.0 / 3 + 24.0 / 2 + 24.0 / 4).all()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_nan_propagates(dtype, layout, tiles):
    """A NaN in x: both planes of the three maps at the lines through it are NaN; each such
    max ties nothing (count 0), so [x == M] * (grad / 0) is NaN along its whole line (the
    literal product), also where the max's upstream gradient is 0; y only at the NaN, grad_x
    of apply nowhere, and each grad_s at the one line through it."""
    n, c, h, w = shape = (2, 7, 5, 6)
    x = make_t(shape, dtype, layout)
    nans = [(0, 1, 0, 2), (1, 5, 4, 3)]
    for at in nans:
        x[at] = float("nan")
    s, gd, gy = upstream(x)
    gd[1][1, 0, 5, 3] = 0.0  # the NaN max of d_cw's line (c=5, w=3) in sample 1: 0 / 0, NaN too
    out = compare(x, s, gd, gy, equal_nan=True)
    for name, lines in (("d_hw", [(0, 0, 2), (1, 4, 3)]), ("d_cw", [(0, 1, 2), (1, 5, 3)]),
                        ("d_hc", [(0, 0, 1), (1, 4, 5)])):
        nan = out[name].isnan()
        assert nan.sum() == 2 * len(lines), name
        assert all(nan[i, :, r, q].all() for i, r, q in lines), name
    px = out["pool_grad_x"].isnan()
    assert px.sum() == len(nans) * (c + h + w - 2)
    for i, ch, r, q in nans:
        assert px[i, :, r, q].all() and px[i, ch, :, q].all() and px[i, ch, r, :].all()
    assert out["y"].isnan().sum() == len(nans) and all(out["y"][at].isnan() for at in nans)
    assert out["apply_grad_x"].isnan().sum() == 0  # g * s: x's NaN does not enter
    for name in ("grad_s_hw", "grad_s_cw", "grad_s_hc"):
        assert out[name].isnan().sum() == len(nans), name


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_infinities(dtype, tiles):
    """+inf is its lines' max and ties with nothing else; with -inf on one line the mean is NaN
    (inf - inf) but the max inf; -inf alone is a max only where the whole line is -inf."""
    x = make_t((2, 5, 4, 6), dtype, "nchw")
    x[0, 2, 1, 1] = float("inf")
    x[0, 3, 1, 1] = float("-inf")  # the same hw line as the +inf
    x[1, :, 2, 4] = float("-inf")  # a whole hw line of -inf: every channel ties
    out = compare(x, equal_nan=True)
    assert out["d_hw"][0, 0, 1, 1] == float("inf") and out["d_hw"][0, 1, 1, 1].isnan()
    assert out["d_cw"][0, 0, 2, 1] == float("inf") and out["d_cw"][0, 1, 2, 1] == float("inf")
    assert out["d_hw"][1, 0, 2, 4] == float("-inf")
    assert tie_counts(x, [out[k] for k in ("d_hw", "d_cw", "d_hc")])["hw"][1, 2, 4] == 5
    assert out["y"][0, 2, 1, 1] == float("inf") and not out["y"][0, 3].isnan().any()


# ----------------------------------------------------------------------------------------
# Measured launches, determinism, registration, input checks
# ----------------------------------------------------------------------------------------
SITES = ("triplet_pool", "triplet_pool_backward", "triplet_apply", "triplet_apply_backward")


@pytest.mark.parametrize("fastest", [1, 2], ids=["half_tile", "double_tile"])
def test_measured_tile_configurations_match_the_reference(monkeypatch, fastest):
    """Where launches are measured (GPUs; a fake clock here), each op times every candidate tile
    at its own site and runs the fastest, whose partials (sized by its blocks) still give every
    output."""
    monkeypatch.setattr(T, "_TILE_ELEMENTS", {F32: 32, F64: 32})  # several blocks at this size
    monkeypatch.setattr(T, "_MAX_BLOCK_W", 4)
    monkeypatch.setattr(T, "_min_programs", lambda device: 1)
    x = make_t((1, 13, 3, 7), F32, "nchw")
    configs = list(_common._tile_candidates(lambda e: T._tiles(x, F32, e), 32, T._tile_warps))
    assert len(configs) == 3
    with measured_launches(monkeypatch, {configs[fastest]}) as timed:
        compare(x)
        for site in SITES:
            winner, tried = measured_choice(site, "float32 1 13 3 7 nchw")
            assert winner == configs[fastest] and set(tried) == set(configs), site
        assert set(timed) == set(configs)


def test_deterministic(monkeypatch):
    """Same input, same outputs bit for bit (partials included)."""
    small_tiles(monkeypatch)
    x = make_t((2, 11, 5, 3), F32, "nchw")
    args = upstream(x)
    first, second = (run(ops, x, *args) for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_schemas_match_the_cpp_contract():
    """The four ops are registered under attnkernels_triton with csrc/triplet_ops.cpp's schemas
    (parsed by torch; the C++ library itself is not built here)."""
    found = schemas("triplet")
    assert sorted(found) == sorted(T.__all__) and len(found) == 4
    for name, schema in found.items():
        ours = str(getattr(ops, name).default._schema)
        assert ours == str(torch._C.parse_schema("attnkernels_triton::" + schema)), name


def _opcheck_cases(x):
    s, gd, gy = upstream(x)
    d = ops.triplet_pool(x)
    return [
        (ops.triplet_pool, (x,)),
        (ops.triplet_pool_backward, (*gd, x, *d)),
        (ops.triplet_apply, (x, *s)),
        (ops.triplet_apply_backward, (gy, x, *s)),
    ]


def test_opcheck_schema():
    for op, args in _opcheck_cases(make_t((2, 6, 3, 4), F64, "channels_last")):
        torch.library.opcheck(op.default, args, test_utils=("test_schema",))


@pytest.mark.skipif(INTERPRET, reason="fake tensors have no data for the Triton interpreter")
def test_opcheck_full_gpu():
    for op, args in _opcheck_cases(make_t((2, 6, 3, 4), F32, "channels_last")):
        torch.library.opcheck(op.default, args)


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


def _call(op: str, **changed):
    args = {**_valid(op), **changed}
    return getattr(ops, op)(*args.values())


def _int(*shape):
    return torch.ones(shape, dtype=torch.int32, device=DEVICE)


def _meta(*shape):
    return torch.ones(shape, device="meta")


# The Python checks' words (attnkernels.ops.triplet, attnkernels.ops._checks), as the C++ ops'.
# Maps of another float dtype are cast to acc by the Triton ops (not an error here); empty x is
# the Triton ops' launch guard (_common._nonempty).
BAD_INPUTS = [
    (lambda: _call("triplet_pool", x=_t(2, 3, 4)), ValueError, r"triplet_pool: x must be 4-D \(N, C, H, W\), got 3-D"),
    (lambda: _call("triplet_pool", x=_int(2, 3, 4, 5)), TypeError,
     r"triplet_pool: x must be a floating-point tensor, got Int"),
    (lambda: _call("triplet_pool", x=_t(2, 3, 0, 5)), ValueError, r"triplet_pool: x must not be empty"),
    (lambda: _call("triplet_pool_backward", grad_d_hw=_t(2, 1, 4, 5)), ValueError,
     r"triplet_pool_backward: grad_d_hw must have shape \(N, 2, H, W\) = \(2, 2, 4, 5\), got \[2, 1, 4, 5\]"),
    (lambda: _call("triplet_pool_backward", d_cw=_t(2, 2, 4, 5)), ValueError,
     r"triplet_pool_backward: d_cw must have shape \(N, 2, C, W\) = \(2, 2, 3, 5\), got \[2, 2, 4, 5\]"),
    (lambda: _call("triplet_pool_backward", grad_d_hc=_t(2, 2, 3, 4)), ValueError,
     r"triplet_pool_backward: grad_d_hc must have shape \(N, 2, H, C\) = \(2, 2, 4, 3\), got \[2, 2, 3, 4\]"),
    (lambda: _call("triplet_pool_backward", grad_d_cw=_int(2, 2, 3, 5)), TypeError,
     r"triplet_pool_backward: grad_d_cw must be a floating-point tensor, got Int"),
    (lambda: _call("triplet_pool_backward", grad_d_cw=_meta(2, 2, 3, 5)), ValueError,
     r"triplet_pool_backward: grad_d_cw must be on \w+(:\d+)?, got meta"),
    (lambda: _call("triplet_pool_backward", x=_t(2, 3, 4, 5, 1)), ValueError,
     r"triplet_pool_backward: x must be 4-D"),
    (lambda: _call("triplet_pool_backward", x=_t(2, 3, 0, 5), grad_d_hw=_t(2, 2, 0, 5), d_hw=_t(2, 2, 0, 5),
                   grad_d_hc=_t(2, 2, 0, 3), d_hc=_t(2, 2, 0, 3)), ValueError,
     r"triplet_pool_backward: x must not be empty"),
    (lambda: _call("triplet_apply", s_cw=_t(2, 1, 4, 5)), ValueError,
     r"triplet_apply: s_cw must have shape \(N, 1, C, W\) = \(2, 1, 3, 5\), got \[2, 1, 4, 5\]"),
    (lambda: _call("triplet_apply", s_hw=_t(2, 2, 4, 5)), ValueError,
     r"triplet_apply: s_hw must have shape \(N, 1, H, W\) = \(2, 1, 4, 5\), got \[2, 2, 4, 5\]"),
    (lambda: _call("triplet_apply", s_hc=_t(2, 1, 5, 3)), ValueError,
     r"triplet_apply: s_hc must have shape \(N, 1, H, C\) = \(2, 1, 4, 3\), got \[2, 1, 5, 3\]"),
    (lambda: _call("triplet_apply", s_hc=_int(2, 1, 4, 3)), TypeError,
     r"triplet_apply: s_hc must be a floating-point tensor, got Int"),
    (lambda: _call("triplet_apply", s_cw=_meta(2, 1, 3, 5)), ValueError,
     r"triplet_apply: s_cw must be on \w+(:\d+)?, got meta"),
    (lambda: _call("triplet_apply", x=_t(2, 3, 4, 5) > 0.5), TypeError,
     r"triplet_apply: x must be a floating-point tensor, got Bool"),
    (lambda: _call("triplet_apply", x=_t(0, 3, 4, 5), s_hw=_t(0, 1, 4, 5), s_cw=_t(0, 1, 3, 5),
                   s_hc=_t(0, 1, 4, 3)), ValueError, r"triplet_apply: x must not be empty"),
    (lambda: _call("triplet_apply_backward", grad_y=_t(2, 3, 4, 4)), ValueError,
     r"triplet_apply_backward: grad_y must match x's shape \[2, 3, 4, 5\] and dtype Float, got \[2, 3, 4, 4\] Float"),
    (lambda: _call("triplet_apply_backward", grad_y=_t(2, 3, 4, 5, dtype=F64)), ValueError,
     r"triplet_apply_backward: grad_y must match x's shape \[2, 3, 4, 5\] and dtype Float, got \[2, 3, 4, 5\] Double"),
    (lambda: _call("triplet_apply_backward", grad_y=_meta(2, 3, 4, 5)), ValueError,
     r"triplet_apply_backward: grad_y must be on \w+(:\d+)?, got meta"),
    (lambda: _call("triplet_apply_backward", s_cw=_t(2, 1, 3, 4)), ValueError,
     r"triplet_apply_backward: s_cw must have shape \(N, 1, C, W\)"),
    (lambda: _call("triplet_apply_backward", x=_t(2, 3, 0, 5), grad_y=_t(2, 3, 0, 5), s_hw=_t(2, 1, 0, 5),
                   s_hc=_t(2, 1, 0, 3)), ValueError, r"triplet_apply_backward: x must not be empty"),
]


@pytest.mark.parametrize("call,error,pattern", bad_input_params(BAD_INPUTS))
def test_bad_inputs(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
