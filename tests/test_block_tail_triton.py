"""Triton backend of the block_tail hot path against its Reference ops, and the public function
on it against eager PyTorch.

Each op under `torch.ops.attnkernels_triton` (`attnkernels/triton/block_tail.py`) against
`attnkernels.ops.block_tail.Reference` on the same arguments. The contract is
csrc/block_tail_ops.cpp: stats' (mean, m2) per plane (m2 from deviations), apply's
act(a * x + b + c * y), backward_reduce's grad_u = out <= 0 ? 0 : grad_out with s1 = sum grad_u,
s2 = sum grad_u * z, all in acc(z). Then `attnkernels.ops.block_tail.block_tail` under
use_backend("triton") against eager relu(bn(z) * gate(mean(bn(z))) + shortcut): forward, the
gradients and BatchNorm's running statistics. Without CUDA the kernels run on CPU tensors under
the Triton interpreter: shapes stay tiny.
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
    within_half_budget,
)
from triton_cases import close as _close
from triton_cases import randn as _t

from attnkernels import choose
from attnkernels.backend import use_backend
from attnkernels.ops._schemas import schemas
from attnkernels.ops.block_tail import Reference as Ref
from attnkernels.ops.block_tail import block_tail
from attnkernels.triton import _common
from attnkernels.triton import block_tail as T
from attnkernels.triton import channel_gate as CG

TOL = {
    F64: dict(rtol=1e-12, atol=1e-12),
    F32: dict(rtol=1e-5, atol=1e-5),
    # Half outputs (out, grad_u): the same fp32 math as the Reference's, then one rounding.
    F16: dict(rtol=2e-3, atol=2e-3),
    BF16: dict(rtol=1.6e-2, atol=1e-2),
}

# (N, C, H, W): odd C and H != W; wider C; HW = 1; C = 1; N = 1; H*W = 323 (two H*W tiles of
# the default NCHW tile, the last partial; lanes past the plane in the stats' combination).
SHAPES = [(2, 5, 3, 4), (2, 24, 5, 3), (2, 3, 1, 1), (2, 1, 3, 2), (1, 7, 2, 5), (1, 3, 17, 19)]
LAYOUTS = ["nchw", "channels_last", "sliced", "channel_slice", "sliced_all", "sliced_channels_last"]
NAMES = ("mean", "m2", "out", "grad_u", "s1", "s2")
SITES = ("block_tail_stats", "block_tail_apply", "block_tail_backward_reduce")


def small_tiles(monkeypatch):
    """channel_gate's tile rule (which these kernels launch with) small: many channel blocks
    and H*W tiles, partial ones included."""
    monkeypatch.setattr(CG, "_TILE_ELEMENTS", {F32: 16, F64: 16})
    monkeypatch.setattr(CG, "_MAX_BLOCK_C_CHANNELS_LAST", 4)


@pytest.fixture(params=["default_tiles", "small_tiles"])
def tiles(request, monkeypatch):
    if request.param == "small_tiles":
        small_tiles(monkeypatch)
    return request.param


# ----------------------------------------------------------------------------------------
# Inputs and the comparison
# ----------------------------------------------------------------------------------------
def coefficients(x, scale=1.5):
    """a, b, c (N, C) random normal times `scale`, in acc(x)."""
    acc = acc_of(x.dtype)
    return [(torch.randn(x.shape[:2], dtype=F64) * scale).to(dtype=acc, device=DEVICE) for _ in range(3)]


def run(impl, z, y, a, b, c, grad_out, relu=True):
    """{name: tensor} of the three ops of `impl` (the Triton namespace or Reference); the
    reduce pass takes the apply's own out (its exact zeros and negatives)."""
    mean, m2 = impl.block_tail_stats(z)
    out = impl.block_tail_apply(z, y, a, b, c, relu)
    grad_u, s1, s2 = impl.block_tail_backward_reduce(grad_out, out, z)
    return dict(mean=mean, m2=m2, out=out, grad_u=grad_u, s1=s1, s2=s2)


def check_layouts(z, got):
    """out and grad_u follow z's layout in its dtype; the (N, C) maps are contiguous in acc."""
    for name in ("out", "grad_u"):
        assert got[name].dtype == z.dtype and got[name].shape == z.shape, name
        assert got[name].is_contiguous(memory_format=expected_format(z)), name
    for name in ("mean", "m2", "s1", "s2"):
        assert got[name].shape == z.shape[:2] and got[name].dtype == acc_of(z.dtype), name
        assert got[name].is_contiguous(), name


def compare(z, y=None, abc=None, grad_out=None, equal_nan=False, other_layout="nchw", relu=True):
    """Triton vs Reference on the three ops (dtype, shape, values, layouts); the Triton results.
    The reduce pass takes the Reference's out on both sides, so that a last-bit difference in
    out cannot move a gradient across the ReLU's edge."""
    y = make_t(tuple(z.shape), z.dtype, other_layout) if y is None else y
    a, b, c = coefficients(z) if abc is None else abc
    grad_out = make_t(tuple(z.shape), z.dtype, other_layout) if grad_out is None else grad_out
    want = run(Ref, z, y, a, b, c, grad_out, relu)
    got = dict(zip(("mean", "m2"), ops.block_tail_stats(z)))
    got["out"] = ops.block_tail_apply(z, y, a, b, c, relu)
    got.update(zip(("grad_u", "s1", "s2"), ops.block_tail_backward_reduce(grad_out, want["out"], z)))
    for name in NAMES:
        g, w = got[name], want[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        tol = TOL[g.dtype] if name not in ("m2", "s2") else {k: 10 * v for k, v in TOL[g.dtype].items()}
        _close(g, w, tol, equal_nan, name)
    assert torch.equal(got["grad_u"], want["grad_u"]) or equal_nan  # a selection: exact
    check_layouts(z, got)
    return got


# ----------------------------------------------------------------------------------------
# The ops vs the Reference
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_matches_reference(dtype, layout, shape):
    z = make_t(shape, dtype, layout, scale=2.0)
    compare(z, other_layout=layout)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced_all"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_tiles(dtype, layout, tiles):
    """Many channel blocks and H*W tiles, partial ones included (small_tiles); the other
    operands in other layouts (the kernels' per-tensor strides)."""
    for shape in [(2, 13, 5, 3), (1, 6, 1, 7), (1, 3, 17, 19)]:
        compare(make_t(shape, dtype, layout), other_layout="channels_last" if layout == "nchw" else "nchw")


def test_relu_false_and_coefficients_cast():
    """relu=False is the identity (the backward's grad_z pass: negatives stay); a, b, c of
    another floating dtype or strides are cast to acc(x) first."""
    z = make_t((2, 7, 3, 4), F64, "channels_last")
    a, b, c = coefficients(z)
    y = make_t(tuple(z.shape), F64, "sliced")
    out = ops.block_tail_apply(z, y, a.t().contiguous().t(), b.float(), c.to(F16), False)
    want = Ref.block_tail_apply(z, y, a, b.float().double(), c.to(F16).double(), False)
    _close(out, want, TOL[F64], name="out")
    assert (out < 0).any()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=dtype_id)
def test_half(dtype, layout):
    """fp16/bf16 maps (fp32 accumulation): out and grad_u stored in the map's dtype within a
    rounding of the Reference's (the same fp32 math); out's error against fp64 at most twice
    that of plain torch in the map's dtype."""
    z = make_t((2, 5, 3, 4), dtype, layout, scale=2.0)
    a, b, c = coefficients(z)
    y, grad_out = (make_t(tuple(z.shape), dtype, layout) for _ in range(2))
    got = compare(z, y, (a, b, c), grad_out)
    truth = Ref.block_tail_apply(z.double(), y.double(), a.double(), b.double(), c.double(), True)
    eager = Ref.block_tail_apply(z, y, a.to(dtype), b.to(dtype), c.to(dtype), True)
    within_half_budget(["out"], [got["out"]], [eager], [truth], dtype)
    # The (N, C) maps are fp32 sums of the half values: as the Reference's, to fp32 rounding.
    truth_stats = Ref.block_tail_stats(z.double())
    _close(got["mean"], truth_stats[0].float(), TOL[F32], name="mean")
    _close(got["m2"], truth_stats[1].float(), dict(rtol=1e-4, atol=1e-5), name="m2")


@pytest.mark.parametrize("offset", [1e3, 1e5, 1e6])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_m2_from_deviations(monkeypatch, layout, offset):
    """|mean| >> std: m2 within a few fp32 roundings of the exact m2 of the fp32 values, in one
    tile and in many (the lanes' shifted Welford and their combination). sum z^2 - P mean^2
    would lose every digit from 1e4 up in fp32; the Reference's two passes are off by 1e-2 at
    1e6 (its mean's rounding, squared, times P)."""
    z = (torch.randn((2, 6, 9, 11), dtype=F64) + offset).float().to(DEVICE)
    if layout == "channels_last":
        z = z.to(memory_format=torch.channels_last)
    truth_mean, truth_m2 = Ref.block_tail_stats(z.double())
    for small in (False, True):
        if small:
            small_tiles(monkeypatch)
        mean, m2 = ops.block_tail_stats(z)
        _close(mean, truth_mean.float(), dict(rtol=1e-6, atol=0), name="mean")
        _close(m2, truth_m2.float(), dict(rtol=1e-6, atol=0), name="m2")


@pytest.mark.parametrize("shape", [(0, 3, 2, 2), (2, 0, 2, 2), (2, 3, 0, 2), (2, 3, 2, 0), (0, 0, 0, 0)],
                         ids=shape_id)
@pytest.mark.parametrize("dtype", [F64, F32, F16], ids=dtype_id)
def test_empty(monkeypatch, dtype, shape):
    """Empty maps launch nothing: stats' mean is NaN (0 / 0) and m2 0 where P = 0, the reduce
    pass's sums 0, out and grad_u empty in the map's layout."""

    def no_launch(*args, **kwargs):
        raise AssertionError("an empty map launched a kernel")

    monkeypatch.setattr(T, "_launch_tiled", no_launch)
    z = torch.empty(shape, dtype=dtype, device=DEVICE).to(memory_format=torch.channels_last)
    y, grad_out = torch.empty_like(z), torch.empty_like(z)
    compare(z, y, grad_out=grad_out, equal_nan=True)
    mean, m2 = ops.block_tail_stats(z)
    assert mean.isnan().all() and m2.eq(0).all()


# ----------------------------------------------------------------------------------------
# NaN and infinities
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_nan_and_inf(dtype, layout, tiles):
    """A NaN in z: mean and m2 NaN at its (n, c) alone, out NaN there (relu(NaN) = NaN) and
    so grad_u passes grad_out there (NaN <= 0 is false); s2 NaN at that (n, c). An inf in z:
    mean inf, m2 NaN (inf - inf), as the Reference. A NaN coefficient: its whole plane."""
    z = make_t((2, 6, 3, 5), dtype, layout)
    a, b, c = coefficients(z)
    z[0, 1, 2, 3] = float("nan")
    z[1, 4, 0, 0] = float("inf")
    b[1, 2] = float("nan")
    got = compare(z, abc=(a, b, c), equal_nan=True)
    assert got["mean"].isnan().sum() == 1 and got["mean"][0, 1].isnan()
    assert got["mean"][1, 4] == float("inf")
    assert got["m2"].isnan().sum() == 2 and got["m2"][0, 1].isnan() and got["m2"][1, 4].isnan()
    out_nan = got["out"].isnan()
    assert out_nan[0, 1, 2, 3] and out_nan[1, 2].all() and out_nan.sum() == 1 + 15
    assert not got["grad_u"].isnan().any()
    out = Ref.block_tail_apply(z, make_t(tuple(z.shape), dtype, "nchw"), a, b, c, True)
    grad_out = torch.ones_like(z)
    grad_u = ops.block_tail_backward_reduce(grad_out, out, z)[0]
    assert torch.equal(grad_u, torch.where(out <= 0, 0.0, grad_out))  # NaN out: grad_out passes
    assert grad_u[0, 1, 2, 3] == 1 and grad_u[1, 2].eq(1).all()


def test_relu_edge():
    """grad_u is 0 where out <= 0, -0.0 included, and grad_out elsewhere; a NaN grad_out where
    out <= 0 is dropped."""
    z = make_t((1, 2, 2, 3), F32, "nchw")
    out = torch.tensor([0.0, -0.0, -1.0, 1e-30, 2.0, float("nan")] * 2, device=DEVICE).reshape(z.shape)
    grad_out = torch.full_like(z, 3.0)
    grad_out[:, :, 0] = float("nan")  # where out <= 0
    grad_u, s1, _ = ops.block_tail_backward_reduce(grad_out, out, z)
    want = torch.tensor([0.0, 0.0, 0.0, 3.0, 3.0, 3.0] * 2, device=DEVICE).reshape(z.shape)
    assert torch.equal(grad_u, want) and torch.equal(s1, torch.full((1, 2), 9.0, device=DEVICE))


# ----------------------------------------------------------------------------------------
# Measured launches, determinism, registration, input checks
# ----------------------------------------------------------------------------------------
def tile_configs(x, tile=None):
    """The candidate tile configurations (names) of the three ops at x."""
    acc = acc_of(x.dtype)
    tile = CG._TILE_ELEMENTS[acc] if tile is None else tile
    return list(_common._tile_candidates(lambda e: CG._tiles(x, acc, e), tile, CG._tile_warps))


@pytest.mark.parametrize("fastest", [1, 2], ids=["half_tile", "double_tile"])
def test_measured_tile_configurations_match_the_reference(monkeypatch, fastest):
    """Where launches are measured (GPUs; a fake clock here), each op times every candidate
    tile at its own site and runs the fastest, whose results still match the Reference; a
    known shape times nothing."""
    monkeypatch.setattr(CG, "_TILE_ELEMENTS", {F32: 64, F64: 64})  # several H*W tiles at this size
    monkeypatch.setattr(CG, "_min_programs", lambda device: 1)  # the CPU's program target on a GPU too
    z = make_t((2, 13, 6, 7), F32, "nchw")
    configs = tile_configs(z)
    assert configs == ["1x64/4w", "1x32/4w", "2x64/4w"]
    with measured_launches(monkeypatch, {configs[fastest]}) as timed:
        compare(z)
        for site in SITES:
            assert measured_choice(site, "float32 2 13 6 7 nchw") == (configs[fastest], configs), site
        assert "triton.channel_" not in choose.explain()  # the sites are block_tail's own
        assert set(timed) == set(configs)
        timed.clear()
        compare(z)
        assert timed == []  # a known key is a lookup


# (shape, programs a launch should fill): GPU-sized tiles at the CPU's target, and at a 132-SM
# GPU's (2 per SM: channel blocks shrink, to 1 channel of 4096 pixels in NCHW, to 16 channels of
# longer H*W tiles in channels_last).
AOT_CASES = [((2, 64, 8, 16), 1), ((1, 32, 32, 32), 264), ((1, 4, 64, 64), 264)]


@pytest.mark.parametrize("case", AOT_CASES, ids=["cpu_programs", "gpu_programs", "gpu_long_planes"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=dtype_id)
def test_every_candidate_launches_for_the_ahead_of_time_check(monkeypatch, dtype, layout, case):
    """With LAUNCH_EVERY_CANDIDATE (scripts/triton_aot) each op launches every candidate tile
    of a GPU-sized tile rule (the rule's, half, twice: 8 warps), so the ahead-of-time check
    compiles them all from this file's launches (bench_launches.py records modules only, and
    block_tail has none yet); the result is the rule's and matches."""
    shape, programs = case
    monkeypatch.setattr(_common, "LAUNCH_EVERY_CANDIDATE", True)
    monkeypatch.setattr(CG, "_min_programs", lambda device: programs)
    compare(make_t(shape, dtype, layout))


def test_deterministic(monkeypatch):
    """Same input, same outputs bit for bit."""
    small_tiles(monkeypatch)
    z = make_t((2, 11, 5, 3), F32, "channels_last")
    a, b, c = coefficients(z)
    y, grad_out = torch.randn_like(z), torch.randn_like(z)
    first, second = (run(ops, z, y, a, b, c, grad_out) for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_schemas_match_the_cpp_contract():
    """The three ops are registered under attnkernels_triton with csrc/block_tail_ops.cpp's
    schemas (parsed by torch; the C++ library itself is not built here)."""
    found = schemas("block_tail")
    assert sorted(found) == sorted(T.__all__) and len(found) == 3
    for name, schema in found.items():
        ours = str(getattr(ops, name).default._schema)
        assert ours == str(torch._C.parse_schema("attnkernels_triton::" + schema)), name


def test_opcheck_schema():
    z = make_t((2, 6, 3, 4), F64, "channels_last")
    a, b, c = coefficients(z)
    out = Ref.block_tail_apply(z, torch.randn_like(z), a, b, c, True)
    cases = [
        (ops.block_tail_stats, (z,)),
        (ops.block_tail_apply, (z, torch.randn_like(z), a, b, c, True)),
        (ops.block_tail_backward_reduce, (torch.randn_like(z), out, z)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args, test_utils=("test_schema",))


BAD_INPUTS = [
    (lambda: ops.block_tail_stats(_t(2, 3, 4)), ValueError, r"block_tail_stats: z must be 4-D \(N, C, H, W\), got 3-D"),
    (lambda: ops.block_tail_stats(torch.ones(2, 3, 4, 4, dtype=torch.int64, device=DEVICE)), TypeError,
     r"block_tail_stats: z must be a floating-point tensor, got Long"),
    (lambda: ops.block_tail_apply(_t(2, 3, 4, 4), _t(2, 3, 4, 5), _t(2, 3), _t(2, 3), _t(2, 3), True), ValueError,
     r"block_tail_apply: y must match x's shape \[2, 3, 4, 4\] and dtype Float, got \[2, 3, 4, 5\] Float"),
    (lambda: ops.block_tail_apply(_t(2, 3, 4, 4), _t(2, 3, 4, 4, dtype=F64), _t(2, 3), _t(2, 3), _t(2, 3), True),
     ValueError, r"block_tail_apply: y must match x's shape \[2, 3, 4, 4\] and dtype Float"),
    (lambda: ops.block_tail_apply(_t(2, 3, 4, 4), _t(2, 3, 4, 4), _t(2, 4), _t(2, 3), _t(2, 3), True), ValueError,
     r"block_tail_apply: a must have shape \(N, C\) = \(2, 3\), got \[2, 4\]"),
    (lambda: ops.block_tail_apply(_t(2, 3, 4, 4), _t(2, 3, 4, 4), _t(2, 3), _t(2, 3, 1, 1), _t(2, 3), True),
     ValueError, r"block_tail_apply: b must have shape \(N, C\) = \(2, 3\), got \[2, 3, 1, 1\]"),
    (lambda: ops.block_tail_apply(_t(2, 3, 4, 4), _t(2, 3, 4, 4), _t(2, 3), _t(2, 3),
                                  torch.ones(2, 3, dtype=torch.int32, device=DEVICE), True),
     TypeError, r"block_tail_apply: c must be a floating-point tensor"),
    (lambda: ops.block_tail_apply(_t(2, 3, 4, 4), _t(2, 3, 4, 4), _t(2, 3), _t(2, 3),
                                  torch.ones(2, 3, device="meta"), True),
     ValueError, r"block_tail_apply: c must be on \w+(:\d+)?, got meta"),
    (lambda: ops.block_tail_backward_reduce(_t(2, 3, 4, 4), _t(2, 3, 4, 4), _t(2, 3, 4)), ValueError,
     r"block_tail_backward_reduce: z must be 4-D \(N, C, H, W\), got 3-D"),
    (lambda: ops.block_tail_backward_reduce(_t(2, 3, 4, 5), _t(2, 3, 4, 4), _t(2, 3, 4, 4)), ValueError,
     r"block_tail_backward_reduce: grad_out must match x's shape \[2, 3, 4, 4\] and dtype Float, got \[2, 3, 4, 5\]"),
    (lambda: ops.block_tail_backward_reduce(_t(2, 3, 4, 4), _t(2, 3, 4, 4, dtype=F16), _t(2, 3, 4, 4)), ValueError,
     r"block_tail_backward_reduce: out must match x's shape \[2, 3, 4, 4\] and dtype Float, got \[2, 3, 4, 4\] Half"),
]


@pytest.mark.parametrize("call,error,pattern", bad_input_params(BAD_INPUTS))
def test_bad_inputs(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


# ----------------------------------------------------------------------------------------
# The public function on the Triton backend vs eager relu(bn(z) * gate(mean(bn(z))) + shortcut)
# ----------------------------------------------------------------------------------------
def eager_tail(z, shortcut, bn, lin):
    u = bn(z)
    if lin is not None:
        u = u * torch.sigmoid(lin(u.mean((2, 3))))[:, :, None, None]
    return torch.relu(u + shortcut)


def fused_tail(z, shortcut, bn, lin):
    gate = None if lin is None else (lambda avg: torch.sigmoid(lin(avg)))
    with use_backend("triton"):
        return block_tail(z, shortcut, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                          bn.training, bn.momentum, bn.eps, gate)


def tail_modules(c, dtype, training, gated, affine, seed=1):
    """A BatchNorm2d (random affine and running statistics) and, if gated, a Linear(C, C)."""
    gen = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(c, affine=affine).to(dtype)
    with torch.no_grad():
        if affine:
            bn.weight.copy_(torch.randn(c, generator=gen, dtype=F64) * 0.5 + 1)
            bn.bias.copy_(torch.randn(c, generator=gen, dtype=F64) * 0.5)
        bn.running_mean.copy_(torch.randn(c, generator=gen, dtype=F64))
        bn.running_var.copy_(torch.rand(c, generator=gen, dtype=F64) + 0.5)
    bn.train(training)
    lin = None
    if gated:
        lin = torch.nn.Linear(c, c).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(c, c, generator=gen, dtype=F64))
    return bn.to(DEVICE), None if lin is None else lin.to(DEVICE)


def clone_modules(bn, lin):
    import copy

    return copy.deepcopy(bn), copy.deepcopy(lin)


def tail_run(tail, z, shortcut, grad, bn, lin):
    """out, then the gradients of z, shortcut and every parameter, then the running stats."""
    leaves = [z.detach().requires_grad_(), shortcut.detach().requires_grad_()]
    params = [p for m in (bn, lin) if m is not None for p in m.parameters()]
    out = tail(leaves[0], leaves[1], bn, lin)
    grads = torch.autograd.grad(out, leaves + params, grad)
    return [out.detach(), *grads, bn.running_mean.clone(), bn.running_var.clone()]


TAIL_TOL = {F64: dict(rtol=1e-10, atol=1e-10), F32: dict(rtol=1e-4, atol=2e-5)}


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("gated", [True, False], ids=["gate", "no_gate"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_block_tail_matches_eager(dtype, layout, training, gated, affine):
    n, c, h, w = shape = (3, 6, 5, 4)
    z = make_t(shape, dtype, layout, scale=2.0)
    z += torch.linspace(-1, 2, c, dtype=dtype, device=DEVICE)[:, None, None]  # per-channel means
    shortcut = make_t(shape, dtype, "sliced" if layout == "nchw" else layout)
    grad = make_t(shape, dtype, layout)
    bn, lin = tail_modules(c, dtype, training, gated, affine)
    bn2, lin2 = clone_modules(bn, lin)
    got = tail_run(fused_tail, z, shortcut, grad, bn, lin)
    want = tail_run(eager_tail, z, shortcut, grad, bn2, lin2)
    names = ["out", "grad_z", "grad_shortcut"] + [f"grad_{k}" for m in (bn2, lin2) if m is not None
                                                   for k, _ in m.named_parameters()] + ["running_mean", "running_var"]
    assert len(names) == len(got) == len(want)
    for name, g, e in zip(names, got, want):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        _close(g, e, TAIL_TOL[dtype], name=name)
    assert got[0].is_contiguous(memory_format=expected_format(z))
    assert (got[0] == 0).any() and (got[0] > 0).any()  # both sides of the ReLU


def test_block_tail_gradcheck():
    """Finite differences of the public function on the Triton ops (fp64, train, gated)."""
    shape = (2, 3, 3, 2)
    bn, lin = tail_modules(3, F64, True, True, True)
    z = make_t(shape, F64, "channels_last").requires_grad_()
    shortcut = make_t(shape, F64, "nchw").requires_grad_()

    def f(z, shortcut, weight, bias):
        gate = lambda avg: torch.sigmoid(lin(avg))  # noqa: E731
        with use_backend("triton"):
            return block_tail(z, shortcut, None, None, weight, bias, True, 0.1, 1e-5, gate)

    params = [bn.weight.detach().requires_grad_(), bn.bias.detach().requires_grad_()]
    assert torch.autograd.gradcheck(f, (z, shortcut, *params))
