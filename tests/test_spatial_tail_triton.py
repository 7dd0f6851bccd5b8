"""Triton backend of the spatial_tail hot path against its Reference ops, and the public function
on it against the reference backend.

Each op under `torch.ops.attnkernels_triton` (`attnkernels/triton/spatial_tail.py`) against
`attnkernels.ops.spatial_tail.Reference` on the same arguments. The contract is
csrc/spatial_tail_ops.cpp: stats' (mean, m2, zmax, zmin, nmax, nmin) per plane, the pool's per
pixel and channel group sum, maximum and ties of x1 = fma(a, z, b), apply's relu(s_g * x1 +
shortcut), backward_reduce's grad_u, grad_s, s1, s2, pool_backward's t1, t2 and backward_apply's
grad_z, all in acc(z), with one group (no mask) or two (an (N, C) bool mask). The backward ops
take each backend's own pool maxima: x1 == dmax must find them again. Then
`attnkernels.ops.spatial_tail.spatial_tail` with a CBAM-like and a HAM-like gate on the triton
backend against the reference backend: forward, the gradients and BatchNorm's running
statistics. Without CUDA the kernels run on CPU tensors under the Triton interpreter: shapes
stay tiny.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

# triton_cases first: it switches the Triton interpreter on without CUDA.
from triton_cases import (
    BF16,
    INTERPRET,
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
)
from triton_cases import close as _close
from triton_cases import randn as _t

from attnkernels import choose
from attnkernels.backend import use_backend
from attnkernels.ops._schemas import schemas
from attnkernels.ops.spatial_tail import Reference as Ref
from attnkernels.ops.spatial_tail import spatial_tail
from attnkernels.triton import _common
from attnkernels.triton import channel_gate as CG
from attnkernels.triton import ham_spatial as HS
from attnkernels.triton import spatial_tail as T

TOL = {
    F64: dict(rtol=1e-12, atol=1e-12),
    F32: dict(rtol=1e-5, atol=1e-5),
    # Half outputs (out, grad_z): the same fp32 math as the Reference's, then one rounding.
    F16: dict(rtol=2e-3, atol=2e-3),
    BF16: dict(rtol=1.6e-2, atol=1e-2),
}
# Sums of products with z (m2, s2, t2): more terms of larger size.
LOOSE = ("m2", "s2", "t2")

# (N, C, H, W): odd C and H != W; C = 1; HW = 1; H*W = 323 (several pixel blocks and H*W tiles).
SHAPES = [(2, 5, 3, 4), (2, 1, 3, 2), (2, 3, 1, 1), (1, 6, 17, 19)]
STATS = ("mean", "m2", "zmax", "zmin", "nmax", "nmin")
NAMES = (*STATS, "d", "out", "grad_u", "grad_s", "s1", "s2", "t1", "t2", "grad_z")
SITES = ("spatial_tail_stats", "spatial_tail_pool", "spatial_tail_apply", "spatial_tail_backward_reduce",
         "spatial_tail_pool_backward", "spatial_tail_backward_apply")


def small_tiles(monkeypatch):
    """Both tile rules small: channel_gate's (stats, apply, pool_backward, backward_apply) and
    ham_spatial's pixel tiles (pool, backward_reduce): many channel blocks, H*W tiles, channel
    chunks and pixel blocks, partial ones included (s1, s2 from several pixel-block partials)."""
    monkeypatch.setattr(CG, "_TILE_ELEMENTS", {F32: 16, F64: 16})
    monkeypatch.setattr(CG, "_MAX_BLOCK_C_CHANNELS_LAST", 4)
    small_pixel_tiles(monkeypatch)


# ----------------------------------------------------------------------------------------
# Inputs and the comparison
# ----------------------------------------------------------------------------------------
def per_channel(z, scale=1.0):
    """A random (N, C) map of z in acc(z)."""
    return (torch.randn(z.shape[:2], dtype=F64) * scale).to(dtype=acc_of(z.dtype), device=DEVICE)


def pixel_maps(z, k, kind="randn"):
    n, _, h, w = z.shape
    t = torch.rand((n, k, h, w), dtype=F64) if kind == "rand" else torch.randn((n, k, h, w), dtype=F64)
    return t.to(dtype=acc_of(z.dtype), device=DEVICE)


def random_mask(z, groups):
    return None if groups == 1 else torch.rand(z.shape[:2], device=DEVICE) < 0.5


class Case:
    """The arguments of the six ops at z: a, b, mask, shortcut, s, grad_out, the pooling's
    gradients gsum, gmax, and backward_apply's (N, C) maps."""

    def __init__(self, z, groups=1, mask=None, a=None, b=None, layout="nchw"):
        shape = tuple(z.shape)
        self.z = z
        self.mask = random_mask(z, groups) if mask is None else mask
        self.groups = 1 if self.mask is None else 2
        self.a = per_channel(z, 1.5) if a is None else a
        self.b = per_channel(z) if b is None else b
        self.shortcut = make_t(shape, z.dtype, layout)
        self.grad_out = make_t(shape, z.dtype, layout)
        self.s = pixel_maps(z, self.groups, "rand")
        self.gsum, self.gmax = pixel_maps(z, self.groups), pixel_maps(z, self.groups)
        self.beta, self.gamma, self.kmax, self.kmin = (per_channel(z) for _ in range(4))


def run(impl, case, out=None):
    """{name: tensor} of the six ops of `impl` (the Triton namespace or Reference) on `case`.
    The backward takes `impl`'s own pool maxima and stats' extrema; the reduce pass takes `out`
    (default: impl's own)."""
    c = case
    got = dict(zip(STATS, impl.spatial_tail_stats(c.z)))
    got["d"] = impl.spatial_tail_pool(c.z, c.a, c.b, c.mask)
    dmax = got["d"][:, 1::3].contiguous()
    got["out"] = impl.spatial_tail_apply(c.z, c.shortcut, c.a, c.b, c.s, c.mask)
    out = got["out"] if out is None else out
    got.update(zip(("grad_u", "grad_s", "s1", "s2"),
                   impl.spatial_tail_backward_reduce(c.grad_out, out, c.z, c.a, c.b, c.s, c.mask)))
    got.update(zip(("t1", "t2"), impl.spatial_tail_pool_backward(c.z, c.a, c.b, c.mask, dmax, c.gsum, c.gmax)))
    got["grad_z"] = impl.spatial_tail_backward_apply(
        got["grad_u"], c.z, c.a, c.b, c.mask, c.s, dmax, c.gsum, c.gmax, c.beta, c.gamma,
        got["zmax"], c.kmax, got["zmin"], c.kmin)
    return got


def check_layouts(z, got, groups):
    """out, grad_u, grad_z follow z's layout in its dtype; the maps are contiguous in acc."""
    n, c, h, w = z.shape
    acc = acc_of(z.dtype)
    for name in ("out", "grad_u", "grad_z"):
        assert got[name].dtype == z.dtype and got[name].shape == z.shape, name
        assert got[name].is_contiguous(memory_format=expected_format(z)), name
    shapes = dict.fromkeys((*STATS, "s1", "s2", "t1", "t2"), (n, c))
    shapes.update(d=(n, 3 * groups, h, w), grad_s=(n, groups, h, w))
    for name, shape in shapes.items():
        assert tuple(got[name].shape) == shape and got[name].dtype == acc, name
        assert got[name].is_contiguous(), name


def compare(case, equal_nan=False, exact=()):
    """Triton vs Reference on the six ops (dtype, shape, values, layouts); the Triton results.
    The reduce pass takes the Reference's out on both sides, so that a last-bit difference in
    out cannot move a gradient across the ReLU's edge. `exact`: names compared bit for bit."""
    want = run(Ref, case)
    got = run(ops, case, out=want["out"])
    for name in NAMES:
        g, w = got[name], want[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        tol = TOL[g.dtype] if name not in LOOSE else {k: 10 * v for k, v in TOL[g.dtype].items()}
        _close(g, w, tol, equal_nan, name)
    # Selections and counts: exact.
    for name in ("zmax", "zmin", "nmax", "nmin", "grad_u", *exact):
        assert torch.equal(got[name], want[name]) or (equal_nan and got[name].isnan().any()), name
    assert torch.equal(got["d"][:, 2::3], want["d"][:, 2::3]) or equal_nan, "ties"
    check_layouts(case.z, got, case.groups)
    return got


# ----------------------------------------------------------------------------------------
# The ops vs the Reference
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_matches_reference(dtype, layout, shape, groups):
    z = make_t(shape, dtype, layout, scale=2.0)
    compare(Case(z, groups, layout=layout))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("layout", ["sliced", "sliced_all", "sliced_channels_last"])
def test_strided_layouts(layout, groups):
    """Views that are neither NCHW nor channels_last (pixels not on one stride) run without a
    copy; the other feature maps in NCHW; outputs NCHW."""
    z = make_t((2, 5, 3, 4), F32, layout)
    compare(Case(z, groups))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_small_tiles(monkeypatch, dtype, layout, groups):
    """Many channel blocks, H*W tiles, channel chunks and pixel blocks, partial ones included;
    the shortcut and gradients in the other layout (the kernels' per-tensor strides)."""
    small_tiles(monkeypatch)
    for shape in [(2, 13, 5, 3), (1, 6, 1, 7)]:
        compare(Case(make_t(shape, dtype, layout), groups, layout="channels_last" if layout == "nchw" else "nchw"))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=dtype_id)
def test_half(dtype, layout, groups):
    """fp16/bf16 maps (fp32 accumulation): every map as the Reference's fp32 math, out, grad_u
    and grad_z within a rounding of the map's dtype."""
    compare(Case(make_t((2, 5, 3, 4), dtype, layout, scale=2.0), groups, layout=layout))


def test_small_maps_any_strides():
    """(N, C) and pixel maps with other strides (transposed, sliced) read as their values."""
    z = make_t((2, 5, 3, 4), F64, "channels_last")
    case = Case(z, 2)
    want = run(Ref, case)
    case.a = case.a.t().contiguous().t()
    case.s = case.s.transpose(2, 3).contiguous().transpose(2, 3)
    case.gsum = torch.stack([case.gsum, case.gsum], -1)[..., 0]
    got = run(ops, case, out=want["out"])
    for name in NAMES:
        tol = TOL[F64] if name not in LOOSE else {k: 10 * v for k, v in TOL[F64].items()}
        _close(got[name], want[name], tol, name=name)


# ----------------------------------------------------------------------------------------
# Ties, empty groups, special values
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_ties(monkeypatch, layout, groups):
    """Deliberate ties, counted exactly as the Reference counts them: z of small integers with
    constant channels (the stats' counts of a plane's extrema), and a = 0 on some channels so
    that x1 = b ties across channels (the pool's maximum ties; the backward's x1 == dmax routes
    gmax to each of them, in one tile and in many)."""
    z = make_t((2, 7, 4, 5), F32, layout, kind="ties")
    a = torch.randint(-1, 2, (2, 7)).to(dtype=F32, device=DEVICE)
    b = torch.randint(-1, 2, (2, 7)).to(dtype=F32, device=DEVICE)
    a[:, ::2] = 0.0  # x1 = b: ties with the equal b's, and with a * z + b where z is 0
    for small in (False, True):
        if small:
            small_tiles(monkeypatch)
        got = compare(Case(z, groups, a=a, b=b), exact=("d",))
        assert (got["d"][:, 2::3] > 1).any() and (got["nmax"] > 1).any()
        assert torch.equal(got["nmax"][:, 1::3], torch.full_like(got["nmax"][:, 1::3], 20.0))  # constant planes


@pytest.mark.parametrize("groups", [1, 2])
def test_constant_planes(groups):
    """A constant map: every pixel ties at both extrema (nmax = nmin = P), m2 = 0 exactly; with
    a = 0 and one b per sample every channel of a group ties at every pixel."""
    z = make_t((2, 6, 3, 5), F64, "channels_last", kind="constant")
    a = torch.zeros((2, 6), dtype=F64, device=DEVICE)
    b = torch.tensor([[0.5], [-2.0]], dtype=F64, device=DEVICE).expand(2, 6).contiguous()
    mask = None if groups == 1 else torch.tensor([[True, False] * 3, [True] * 2 + [False] * 4], device=DEVICE)
    got = compare(Case(z, mask=mask, a=a, b=b), exact=("d", "m2"))
    assert got["nmax"].eq(15).all() and got["nmin"].eq(15).all() and got["m2"].eq(0).all()
    members = torch.ones((2, 1), device=DEVICE) * 6 if mask is None else torch.stack([mask.sum(1), (~mask).sum(1)], 1)
    assert torch.equal(got["d"][:, 2::3], members.to(F64)[:, :, None, None].expand(2, groups, 3, 5))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("everything", [True, False], ids=["all_group0", "all_group1"])
def test_empty_group(monkeypatch, layout, everything):
    """A mask all True (or all False) leaves a group with no channel: its sum 0, its maximum
    -inf and its ties 0 at every pixel, and its maps read by no channel."""
    z = make_t((2, 5, 3, 4), F64, layout)
    mask = torch.full((2, 5), everything, device=DEVICE)
    for small in (False, True):
        if small:
            small_tiles(monkeypatch)
        got = compare(Case(z, mask=mask))
        empty = 1 if everything else 0
        assert got["d"][:, 3 * empty].eq(0).all() and got["d"][:, 3 * empty + 2].eq(0).all()
        assert got["d"][:, 3 * empty + 1].eq(float("-inf")).all()
        assert got["grad_s"][:, empty].eq(0).all()


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_maxima_found_again(monkeypatch, layout, groups):
    """The backward's x1 == dmax finds exactly the pool's maxima (x1 = fma(a, z, b) rounds the
    same in every kernel): with gsum = 0 and gmax = 1, t1 counts each channel's pixels at its
    group's maximum, whose sum over a group's channels is the sum over pixels of the pool's ties."""
    for small in (False, True):
        if small:
            small_tiles(monkeypatch)
        z = make_t((2, 9, 5, 6), F32, layout, scale=3.0)
        mask = random_mask(z, groups)
        a, b = per_channel(z, 1.5), per_channel(z)
        d = ops.spatial_tail_pool(z, a, b, mask)
        dmax = d[:, 1::3].contiguous()
        ones = torch.ones_like(dmax)
        t1, _ = ops.spatial_tail_pool_backward(z, a, b, mask, dmax, torch.zeros_like(dmax), ones)
        members = [torch.ones_like(a, dtype=torch.bool)] if mask is None else [mask, ~mask]
        for g, member in enumerate(members):
            assert torch.equal(torch.where(member, t1, 0).sum(1), d[:, 3 * g + 2].sum((1, 2))), g


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_nan_and_inf(dtype, layout):
    """A NaN in z: stats' mean, m2, zmax, zmin NaN at its plane with counts 0; the pool's sum and
    maximum NaN at its pixel in its group, ties 0; out NaN there. An inf: its plane's maximum,
    counted; a NaN coefficient b: its whole plane's x1."""
    z = make_t((2, 6, 3, 5), dtype, layout)
    z[0, 1, 2, 3] = float("nan")
    z[1, 4, 0, 0] = float("inf")
    mask = torch.tensor([[True, True, False, True, False, False], [False, True, True, True, False, True]],
                        device=DEVICE)
    case = Case(z, mask=mask)
    case.b[1, 2] = float("nan")
    got = compare(case, equal_nan=True)
    assert got["zmax"][0, 1].isnan() and got["zmin"][0, 1].isnan() and got["nmax"][0, 1] == 0
    assert got["nmin"][0, 1] == 0 and got["zmax"][1, 4] == float("inf") and got["nmax"][1, 4] == 1
    assert got["d"][0, 0:2, 2, 3].isnan().all() and got["d"][0, 2, 2, 3] == 0  # group 0 at the NaN pixel
    assert got["d"][1, 0:2].isnan().all() and got["d"][1, 2].eq(0).all()  # NaN b (group 0): every pixel
    assert got["out"][0, 1, 2, 3].isnan() and got["out"][1, 2].isnan().all()


@pytest.mark.parametrize("shape", [(0, 3, 2, 2), (2, 0, 2, 2), (2, 3, 0, 2), (2, 3, 2, 0), (0, 0, 0, 0)],
                         ids=shape_id)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dtype", [F64, F32, F16], ids=dtype_id)
def test_empty(monkeypatch, dtype, groups, shape):
    """Empty maps launch nothing: stats' P = 0 values (mean NaN, m2 0, zmax -inf, zmin +inf,
    counts 0); the pool's sum 0, maximum -inf and ties 0 where C = 0; sums over nothing 0;
    out, grad_u, grad_z empty in the map's layout."""

    def no_launch(*args, **kwargs):
        raise AssertionError("an empty map launched a kernel")

    monkeypatch.setattr(T, "_launch_tiled", no_launch)
    monkeypatch.setattr(T, "_launch_pixel_tiled", no_launch)
    z = torch.empty(shape, dtype=dtype, device=DEVICE).to(memory_format=torch.channels_last)
    got = compare(Case(z, groups), equal_nan=True)
    if shape[2] * shape[3] == 0:
        assert got["mean"].isnan().all() and got["zmax"].eq(float("-inf")).all() and got["zmin"].eq(float("inf")).all()
    if shape[1] == 0:
        assert got["d"][:, 1::3].eq(float("-inf")).all() and got["d"][:, 0::3].eq(0).all()


@pytest.mark.parametrize("offset", [1e3, 1e6])
def test_m2_from_deviations(monkeypatch, offset):
    """|mean| >> std: m2 within a few fp32 roundings of the exact m2 of the fp32 values, in one
    tile and in many (block_tail's shifted per-lane Welford and its combination)."""
    z = (torch.randn((2, 6, 9, 11), dtype=F64) + offset).float().to(DEVICE)
    truth = Ref.spatial_tail_stats(z.double())
    for small in (False, True):
        if small:
            small_tiles(monkeypatch)
        mean, m2 = ops.spatial_tail_stats(z)[:2]
        _close(mean, truth[0].float(), dict(rtol=1e-6, atol=0), name="mean")
        _close(m2, truth[1].float(), dict(rtol=1e-6, atol=0), name="m2")


# ----------------------------------------------------------------------------------------
# Measured launches, determinism, registration, input checks
# ----------------------------------------------------------------------------------------
def test_measured_tile_configurations_match_the_reference(monkeypatch):
    """Where launches are measured (GPUs; a fake clock here), each op times its candidate tiles
    at its own site and runs the fastest, whose results still match the Reference."""
    monkeypatch.setattr(CG, "_TILE_ELEMENTS", {F32: 16, F64: 16})
    monkeypatch.setattr(CG, "_min_programs", lambda device: 1)
    monkeypatch.setattr(HS, "_TILE_ELEMENTS", {F32: 16, F64: 16})
    monkeypatch.setattr(HS, "_min_programs", lambda device: 1)
    z = make_t((1, 5, 3, 4), F32, "nchw")
    with measured_launches(monkeypatch, set()) as timed:
        compare(Case(z, 2))
        for site in SITES:
            winner, configs = measured_choice(site, "float32 1 5 3 4 nchw")
            assert winner == configs[0] and len(configs) > 1, site
        assert "triton.channel_" not in choose.explain() and "triton.ham_" not in choose.explain()
        timed.clear()
        compare(Case(z, 2))
        assert timed == []  # a known key is a lookup


# (shape, programs a launch should fill): GPU-sized tiles at the CPU's target, and at a 132-SM
# GPU's (the channel kernels' blocks shrink to one channel in NCHW, the pixel kernels' pixel
# blocks to a few pixels; kept small: the interpreter runs every program).
AOT_CASES = [((2, 64, 8, 16), 1), ((1, 32, 8, 16), 264)]


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("case", AOT_CASES, ids=["cpu_programs", "gpu_programs"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=dtype_id)
def test_every_candidate_launches_for_the_ahead_of_time_check(monkeypatch, dtype, layout, case, groups):
    """With LAUNCH_EVERY_CANDIDATE (scripts/triton_aot) each op launches every candidate tile
    of a GPU-sized tile rule (the rule's, half, twice: 8 warps), so the ahead-of-time check
    compiles them all from this file's launches (bench_launches.py records the benchmark's
    modules only, and no module runs spatial_tail); the result is the rule's and matches."""
    shape, programs = case
    monkeypatch.setattr(_common, "LAUNCH_EVERY_CANDIDATE", True)
    monkeypatch.setattr(CG, "_min_programs", lambda device: programs)
    monkeypatch.setattr(HS, "_min_programs", lambda device: programs)
    z = make_t(shape, dtype, layout)
    compare(Case(z, groups, layout=layout))


def test_deterministic(monkeypatch):
    """Same input, same outputs bit for bit."""
    small_tiles(monkeypatch)
    case = Case(make_t((2, 11, 5, 3), F32, "channels_last"), 2)
    first, second = (run(ops, case) for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_schemas_match_the_cpp_contract():
    """The six ops are registered under attnkernels_triton with csrc/spatial_tail_ops.cpp's
    schemas (parsed by torch; the C++ library itself is not built here)."""
    found = schemas("spatial_tail")
    assert sorted(found) == sorted(T.__all__) and len(found) == 6
    for name, schema in found.items():
        ours = str(getattr(ops, name).default._schema)
        assert ours == str(torch._C.parse_schema("attnkernels_triton::" + schema)), name


@pytest.mark.parametrize("groups", [1, 2])
def test_opcheck(groups):
    """The schemas (and, on a GPU, the fakes triton_op traces from the host code) agree with
    the kernels."""
    c = Case(make_t((2, 6, 3, 4), F64, "channels_last"), groups)
    d = Ref.spatial_tail_pool(c.z, c.a, c.b, c.mask)
    dmax = d[:, 1::3].contiguous()
    out = Ref.spatial_tail_apply(c.z, c.shortcut, c.a, c.b, c.s, c.mask)
    zmax, zmin = Ref.spatial_tail_stats(c.z)[2:4]
    cases = [
        (ops.spatial_tail_stats, (c.z,)),
        (ops.spatial_tail_pool, (c.z, c.a, c.b, c.mask)),
        (ops.spatial_tail_apply, (c.z, c.shortcut, c.a, c.b, c.s, c.mask)),
        (ops.spatial_tail_backward_reduce, (c.grad_out, out, c.z, c.a, c.b, c.s, c.mask)),
        (ops.spatial_tail_pool_backward, (c.z, c.a, c.b, c.mask, dmax, c.gsum, c.gmax)),
        (ops.spatial_tail_backward_apply, (c.grad_out, c.z, c.a, c.b, c.mask, c.s, dmax, c.gsum, c.gmax, c.beta,
                                           c.gamma, zmax, c.kmax, zmin, c.kmin)),
    ]
    # Fake tensors have no data for the Triton interpreter: their test runs on a GPU.
    utils = ("test_schema",) if INTERPRET else ("test_schema", "test_faketensor")
    for op, args in cases:
        torch.library.opcheck(op.default, args, test_utils=utils)


def _maps(n=2, c=3, h=4, w=4, k=1, dtype=F32):
    return _t(n, k, h, w, dtype=dtype)


_M = lambda *s: torch.ones(s, dtype=torch.bool, device=DEVICE)  # noqa: E731
BAD_INPUTS = [
    (lambda: ops.spatial_tail_stats(_t(2, 3, 4)), ValueError,
     r"spatial_tail_stats: z must be 4-D \(N, C, H, W\), got 3-D"),
    (lambda: ops.spatial_tail_stats(torch.ones(2, 3, 4, 4, dtype=torch.int64, device=DEVICE)), TypeError,
     r"spatial_tail_stats: z must be a floating-point tensor, got Long"),
    (lambda: ops.spatial_tail_pool(_t(2, 3, 4, 4), _t(2, 4), _t(2, 3), None), ValueError,
     r"spatial_tail_pool: a must have shape \(N, C\) = \(2, 3\), got \[2, 4\]"),
    (lambda: ops.spatial_tail_pool(_t(2, 3, 4, 4), _t(2, 3), _t(2, 3, dtype=F64), None), TypeError,
     r"spatial_tail_pool: b must be Float \(the accumulation dtype of x, Float\), got Double"),
    (lambda: ops.spatial_tail_pool(_t(2, 3, 4, 4), _t(2, 3), _t(2, 3), _M(3, 2)), ValueError,
     r"spatial_tail_pool: mask must have shape \(N, C\) = \(2, 3\), got \[3, 2\]"),
    (lambda: ops.spatial_tail_pool(_t(2, 3, 4, 4), _t(2, 3), _t(2, 3), _t(2, 3)), TypeError,
     r"spatial_tail_pool: mask must be bool, got Float"),
    (lambda: ops.spatial_tail_pool(_t(2, 3, 4, 4), _t(2, 3), _t(2, 3), torch.ones(2, 3, dtype=torch.bool,
                                                                                  device="meta")),
     ValueError, r"spatial_tail_pool: mask must be on \w+(:\d+)?, got meta"),
    (lambda: ops.spatial_tail_apply(_t(2, 3, 4, 4), _t(2, 3, 4, 5), _t(2, 3), _t(2, 3), _maps(), None), ValueError,
     r"spatial_tail_apply: shortcut must match x's shape \[2, 3, 4, 4\] and dtype Float, got \[2, 3, 4, 5\] Float"),
    (lambda: ops.spatial_tail_apply(_t(2, 3, 4, 4), _t(2, 3, 4, 4), _t(2, 3), _t(2, 3), _maps(), _M(2, 3)), ValueError,
     r"spatial_tail_apply: s must have shape \(N, 2, H, W\) = \(2, 2, 4, 4\), got \[2, 1, 4, 4\]"),
    (lambda: ops.spatial_tail_apply(_t(2, 3, 4, 4), _t(2, 3, 4, 4), _t(2, 3), _t(2, 3), _maps(dtype=F64), None),
     TypeError, r"spatial_tail_apply: s must be Float \(the accumulation dtype of x, Float\), got Double"),
    (lambda: ops.spatial_tail_backward_reduce(_t(2, 3, 4, 4), _t(2, 3, 4, 4, dtype=F16), _t(2, 3, 4, 4), _t(2, 3),
                                              _t(2, 3), _maps(), None), ValueError,
     r"spatial_tail_backward_reduce: out must match x's shape \[2, 3, 4, 4\] and dtype Float, got \[2, 3, 4, 4\] Half"),
    (lambda: ops.spatial_tail_pool_backward(_t(2, 3, 4, 4), _t(2, 3), _t(2, 3), None, _maps(), _maps(k=2), _maps()),
     ValueError,
     r"spatial_tail_pool_backward: gsum must have shape \(N, 1, H, W\) = \(2, 1, 4, 4\), got \[2, 2, 4, 4\]"),
    (lambda: ops.spatial_tail_backward_apply(_t(2, 3, 4, 4), _t(2, 3, 4, 4), _t(2, 3), _t(2, 3), None, _maps(),
                                             _maps(), _maps(), _maps(), _t(2, 3), _t(2, 3), _t(2, 3), _t(2, 3),
                                             _t(2, 3), _t(3, 2)), ValueError,
     r"spatial_tail_backward_apply: kmin must have shape \(N, C\) = \(2, 3\), got \[3, 2\]"),
    (lambda: ops.spatial_tail_backward_apply(_t(2, 3, 4, 5), _t(2, 3, 4, 4), _t(2, 3), _t(2, 3), None, _maps(),
                                             _maps(), _maps(), _maps(), _t(2, 3), _t(2, 3), _t(2, 3), _t(2, 3),
                                             _t(2, 3), _t(2, 3)), ValueError,
     r"spatial_tail_backward_apply: grad_u must match x's shape \[2, 3, 4, 4\]"),
]


@pytest.mark.parametrize("call,error,pattern", bad_input_params(BAD_INPUTS))
def test_bad_inputs(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


# ----------------------------------------------------------------------------------------
# The public function on the Triton backend vs the reference backend
# ----------------------------------------------------------------------------------------
class CBAMGates(torch.nn.Module):
    """CBAM's gates in spatial_tail's terms: the channel MLP on the pooled bn(z) (avg, max),
    the spatial 7x7 conv + BatchNorm on d = (mean, max) over channels of x1."""

    def __init__(self, c):
        super().__init__()
        self.fc1 = torch.nn.Linear(c, max(c // 4, 1), bias=False)
        self.fc2 = torch.nn.Linear(max(c // 4, 1), c, bias=False)
        self.conv = torch.nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.bn = torch.nn.BatchNorm2d(1)
        self.important = None

    def channel_gate(self, avg, mx):
        mlp = lambda v: self.fc2(F.relu(self.fc1(v)))  # noqa: E731
        return torch.sigmoid(mlp(avg) + mlp(mx))

    def spatial_gate(self, d):
        return torch.sigmoid(self.bn(self.conv(d)))


class HAMGates(torch.nn.Module):
    """HAM's gates: the 1-D conv over the adaptive mix of avg and max, and one shared spatial
    conv + BatchNorm per group (two groups: the `important` top channels of the gate, the rest)."""

    def __init__(self, c):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.tensor(0.3))
        self.beta = torch.nn.Parameter(torch.tensor(0.6))
        self.conv1d = torch.nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.conv = torch.nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.bn = torch.nn.BatchNorm2d(1)
        self.important = (c * 3) // 5

    def channel_gate(self, avg, mx):
        f = 0.5 * (avg + mx) + self.alpha * avg + self.beta * mx
        return torch.sigmoid(self.conv1d(f[:, None])).squeeze(1)

    def spatial_gate(self, d):
        n = d.shape[0]
        u = self.bn(self.conv(torch.cat([d[:, :2], d[:, 2:]])))
        return torch.cat([torch.sigmoid(F.relu(u[:n])), torch.sigmoid(F.relu(u[n:]))], 1)


def tail_modules(kind, c, dtype, training, flat=False, seed=1):
    """A BatchNorm2d (random affine and running statistics; with `flat`, weight 0 on some
    channels: bn(z) constant there, every pixel tied at its maximum) and the gates."""
    gen = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(c).to(dtype)
    gates = (CBAMGates if kind == "cbam" else HAMGates)(c).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c, generator=gen, dtype=F64) * 0.5 + 0.5)  # some negative
        bn.bias.copy_(torch.randn(c, generator=gen, dtype=F64) * 0.5)
        if flat:
            bn.weight[::3] = 0.0
        bn.running_mean.copy_(torch.randn(c, generator=gen, dtype=F64))
        bn.running_var.copy_(torch.rand(c, generator=gen, dtype=F64) + 0.5)
        for p in gates.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=F64).to(dtype) * 0.3)
    bn.train(training)
    gates.train(training)
    return bn.to(DEVICE), gates.to(DEVICE)


def tail_run(backend, z, shortcut, grad, bn, gates):
    """out, then the gradients of z, shortcut and every parameter, then the running stats."""
    leaves = [z.detach().requires_grad_(), shortcut.detach().requires_grad_()]
    params = list(bn.parameters()) + list(gates.parameters())
    with use_backend(backend):
        out = spatial_tail(leaves[0], leaves[1], bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training,
                           bn.momentum, bn.eps, channel_gate=gates.channel_gate, spatial_gate=gates.spatial_gate,
                           important=gates.important)
    grads = torch.autograd.grad(out, leaves + params, grad)
    return [out.detach(), *grads, bn.running_mean.clone(), bn.running_var.clone(), gates.bn.running_mean.clone()]


TAIL_TOL = {F64: dict(rtol=1e-10, atol=1e-10), F32: dict(rtol=1e-4, atol=2e-5)}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
@pytest.mark.parametrize("kind", ["cbam", "ham"])
def test_spatial_tail_matches_reference_backend(kind, dtype, layout, training):
    n, c, h, w = shape = (3, 10, 5, 6)
    z = make_t(shape, dtype, layout, scale=2.0)
    z += torch.linspace(-1, 2, c, dtype=dtype, device=DEVICE)[:, None, None]  # per-channel means
    shortcut = make_t(shape, dtype, "sliced" if layout == "nchw" else layout)
    grad = make_t(shape, dtype, layout)
    bn, gates = tail_modules(kind, c, dtype, training, flat=kind == "ham")
    bn2, gates2 = copy.deepcopy(bn), copy.deepcopy(gates)
    got = tail_run("triton", z, shortcut, grad, bn, gates)
    want = tail_run("reference", z, shortcut, grad, bn2, gates2)
    names = (["out", "grad_z", "grad_shortcut"] + [f"grad_bn.{k}" for k, _ in bn.named_parameters()]
             + [f"grad_{k}" for k, _ in gates.named_parameters()] + ["running_mean", "running_var", "gate_bn_mean"])
    assert len(names) == len(got) == len(want)
    for name, g, e in zip(names, got, want):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        _close(g, e, TAIL_TOL[dtype], name=name)
    assert got[0].is_contiguous(memory_format=expected_format(z))
    assert (got[0] == 0).any() and (got[0] > 0).any()  # both sides of the ReLU
