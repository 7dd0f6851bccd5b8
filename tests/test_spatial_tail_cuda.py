"""spatial_tail's CUDA ops (csrc/cuda/spatial_tail.cu) against `attnkernels.ops.spatial_tail.Reference`,
and the public function `spatial_tail` on the cuda backend against the reference backend.

Every case needs a GPU (skipped without one). Each op: every dtype (fp16 and bf16 judged against
fp64 relative to the same-precision Reference's error), NCHW, channels_last and sliced z, one
and two channel groups (mask None / an (N, C) bool mask, one group empty at C = 1), odd shapes,
several tiles and chunks; exact selections (grad_u, the extrema, tie counts) bitwise. The
backward ops get dmax from the same backend's pool: x1 = fma(a, z, b) rounds per backend, and
x1 == dmax must find each backend's own maxima. Then ties, NaN and inf, empty shapes, run-to-run
determinism, and `spatial_tail` with a CBAM-like and a HAM-like gate, forward, every gradient and
the running statistics.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    LAYOUTS,
    assert_all_close,
    assert_error_like_eager,
    assert_layout_of,
    load_compiled_ops,
    make_input,
    needs_gpu,
    rounding_floor,
)

from attnkernels import backend
from attnkernels.ops import spatial_tail as ops_module
from attnkernels.ops.spatial_tail import spatial_tail, top_channels

pytestmark = needs_gpu

Ref = ops_module.Reference
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DTYPES = [F64, F32, F16, BF16]
DEV = "cuda"
# C = 1 (two groups: group 1 empty), odd C, C past the vector width and not a multiple of it;
# H = 1, W = 1, H = W = 1; N = 1; channels_last: several channel tiles (C = 300) and pixel chunks
# (H*W = 1320); NCHW: several pixel tiles per plane (130 * 131) and channel chunks (C = 300).
SHAPES = [(2, 24, 7, 5), (3, 1, 4, 4), (2, 37, 5, 9), (3, 16, 1, 1), (2, 5, 1, 9), (2, 6, 7, 1), (1, 40, 3, 4),
          (2, 19, 33, 40), (1, 2, 130, 131), (2, 300, 9, 7)]
EMPTY_SHAPES = [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0)]
TOL = {F64: {"rtol": 1e-12, "atol": 1e-12}, F32: {"rtol": 2e-5, "atol": 2e-6}}
NAMES = {
    "spatial_tail_stats": ["mean", "m2", "zmax", "zmin", "nmax", "nmin"],
    "spatial_tail_pool": ["d"],
    "spatial_tail_apply": ["out"],
    "spatial_tail_backward_reduce": ["grad_u", "grad_s", "s1", "s2"],
    "spatial_tail_pool_backward": ["t1", "t2"],
    "spatial_tail_backward_apply": ["grad_z"],
}
OPS = list(NAMES)
#: Results that are selections or counts: bitwise the Reference's (same precision).
EXACT = {"zmax", "zmin", "nmax", "nmin", "grad_u"}
#: Results shaped like z: in z's layout (NCHW for a sliced z), z's dtype.
FEATURE_MAPS = {"out", "grad_u", "grad_z"}


def shape_id(s) -> str:
    return "x".join(map(str, s))


def acc_of(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else F32


@pytest.fixture(scope="module")
def cuda_ops():
    return load_compiled_ops()


# ----------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------
class Case:
    """Random inputs of every op for one z: the feature maps in z's layout and dtype, the small
    maps in acc(z), the mask (G = 2) or None (G = 1). `args(op, ops)` lists op's arguments, dmax
    taken from `ops`'s own pool (the backend under test, or the Reference)."""

    def __init__(self, z: torch.Tensor, groups: int):
        n, c, h, w = z.shape
        acc = acc_of(z.dtype)
        layout = "channels_last" if (z.is_contiguous(memory_format=torch.channels_last)
                                     and not z.is_contiguous()) else "nchw"
        like_z = lambda: make_input(tuple(z.shape), layout, z.dtype, DEV)  # noqa: E731
        pixel = lambda: torch.randn(n, groups, h, w, dtype=acc, device=DEV)  # noqa: E731
        chan = lambda: torch.randn(n, c, dtype=acc, device=DEV)  # noqa: E731
        self.z, self.groups = z, groups
        self.a, self.b = chan(), chan()
        self.mask = None if groups == 1 else top_channels(torch.rand(n, c, device=DEV), max(1, c // 3))
        self.shortcut = like_z()
        self.grad_out = like_z()
        self.out = torch.randn_like(z).masked_fill_(torch.rand(z.shape, device=DEV) < 0.2, 0)  # relu's zeros
        self.grad_u = like_z()
        self.s = torch.rand(n, groups, h, w, dtype=acc, device=DEV) * 0.9 + 0.05
        self.gsum, self.gmax = pixel(), pixel()
        self.beta, self.gamma, self.kmax, self.kmin = chan(), chan(), chan(), chan()

    def to(self, dtype: torch.dtype) -> "Case":
        """The same values with z's maps in `dtype` and the small maps in acc(dtype)."""
        other = object.__new__(Case)
        acc = acc_of(dtype)
        for key, value in vars(self).items():
            if isinstance(value, torch.Tensor) and value.dtype != torch.bool:
                value = value.to(dtype if value.dim() == 4 and value.shape[1] == self.z.shape[1] else acc)
            setattr(other, key, value)
        # The per-pixel maps have G channels: when G == C they took z's dtype above; fix them.
        for key in ("s", "gsum", "gmax"):
            setattr(other, key, getattr(self, key).to(acc))
        return other

    def args(self, op: str, ops) -> list:
        z, a, b, mask, s = self.z, self.a, self.b, self.mask, self.s
        if op == "spatial_tail_stats":
            return [z]
        if op == "spatial_tail_pool":
            return [z, a, b, mask]
        if op == "spatial_tail_apply":
            return [z, self.shortcut, a, b, s, mask]
        if op == "spatial_tail_backward_reduce":
            return [self.grad_out, self.out, z, a, b, s, mask]
        dmax = ops.spatial_tail_pool(z, a, b, mask)[:, 1::3].contiguous()
        if op == "spatial_tail_pool_backward":
            return [z, a, b, mask, dmax, self.gsum, self.gmax]
        zmax, zmin = ops.spatial_tail_stats(z)[2:4]
        return [self.grad_u, z, a, b, mask, s, dmax, self.gsum, self.gmax, self.beta, self.gamma,
                zmax, self.kmax, zmin, self.kmin]


def as_list(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def split_pool(op: str, results: list[torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
    """The pool's d as its sums and maxima (compared with tolerance) and its tie counts (exact)."""
    if op != "spatial_tail_pool":
        return NAMES[op], results
    d = results[0]
    keep = [i for i in range(d.shape[1]) if i % 3 != 2]
    return ["d_sum_max", "ties"], [d[:, keep], d[:, 2::3]]


def check_op(cuda_ops, op: str, case: Case, equal_nan: bool = False) -> list[torch.Tensor]:
    """op on the CUDA kernel against the Reference: shapes, dtypes, layouts; selections and counts
    bitwise; fp64 to 1e-12, fp32 to 2e-5 or as accurate as the Reference against fp64; fp16 and
    bf16 no worse against fp64 than twice the Reference's error in the same precision, plus two
    roundings. Returns the kernel's results."""
    got = as_list(getattr(cuda_ops, op)(*case.args(op, cuda_ops)))
    want = as_list(getattr(Ref, op)(*case.args(op, Ref)))
    dense_z = case.z if case.z.is_contiguous() or case.z.is_contiguous(memory_format=torch.channels_last) \
        else case.z.contiguous()
    for name, g, w in zip(NAMES[op], got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype and g.device == w.device, (name, g.shape, w.shape, g.dtype)
        if name in FEATURE_MAPS:
            assert_layout_of(g, dense_z)
    exact64 = case.to(F64)
    truth = lambda: split_pool(op, as_list(getattr(Ref, op)(*exact64.args(op, Ref))))[1]  # noqa: E731
    names, got_parts = split_pool(op, got)
    _, want_parts = split_pool(op, want)
    for i, (name, g, w) in enumerate(zip(names, got_parts, want_parts, strict=True)):
        if name in EXACT or name == "ties":
            same = torch.equal(g, w) or (equal_nan and torch.equal(g.nan_to_num(7), w.nan_to_num(7)))
            assert same, (op, name, (g - w).abs().nan_to_num(0).max())
        elif g.dtype in (F16, BF16):
            assert_error_like_eager([g], [w], [truth()[i]], floor=rounding_floor(g.dtype), names=[name])
        else:
            assert_all_close([g], [w], [name], lambda i=i: [truth()[i]], **TOL[g.dtype], equal_nan=equal_nan)
    return got


# ----------------------------------------------------------------------------------------
# Against the Reference
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_cuda_op_matches_reference(cuda_ops, op, dtype, layout, groups, shape) -> None:
    z = make_input(shape, layout, dtype, DEV)
    check_op(cuda_ops, op, Case(z, groups))


def tied_case(dtype: torch.dtype, layout: str, groups: int) -> Case:
    """Every channel of a pixel equal, a and b equal across channels: x1 ties over each whole
    group (the pool's counts are the group sizes; the backward's r routes gmax to every channel),
    and z ties over planes (the extrema's counts) where a row repeats."""
    n, c, h, w = 2, 13, 5, 6
    z = torch.randn(n, 1, h, w, device=DEV).round().expand(n, c, h, w).to(dtype)
    z = z.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else z.contiguous()
    case = Case(z, groups)
    case.a = case.a[:, :1].expand(n, c).contiguous()
    case.b = case.b[:, :1].expand(n, c).contiguous()
    return case


@pytest.mark.parametrize("op", ["spatial_tail_stats", "spatial_tail_pool", "spatial_tail_pool_backward",
                                "spatial_tail_backward_apply"])
@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("groups", [1, 2])
def test_cuda_ties_matches_reference(cuda_ops, op, dtype, layout, groups) -> None:
    case = tied_case(dtype, layout, groups)
    got = check_op(cuda_ops, op, case)
    if op == "spatial_tail_pool":
        ties = got[0][:, 2::3]
        assert ties.max() > 1  # the input really ties
    if op == "spatial_tail_stats":
        assert got[4].max() > 1 and got[5].max() > 1


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("groups", [1, 2])
def test_cuda_nan_and_inf_matches_reference(cuda_ops, op, layout, groups) -> None:
    """NaN: the extrema and the pool's maximum are NaN and count no ties (torch.amax); inf and
    -inf pass through the sums and the extrema."""
    z = make_input((2, 9, 4, 5), layout, F64, DEV)
    z[1, 2, 1, 1] = float("nan")
    z[0, 4, 2, 3], z[0, 5, 0, 0], z[1, 0, 3, 4] = float("inf"), float("-inf"), float("inf")
    case = Case(z, groups)
    got = check_op(cuda_ops, op, case, equal_nan=True)
    if op == "spatial_tail_stats":
        assert torch.isnan(got[2][1, 2]) and got[4][1, 2] == 0 and got[2][0, 4] == float("inf")
        assert got[3][0, 5] == float("-inf")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=shape_id)
def test_cuda_empty_matches_reference(cuda_ops, op, groups, shape) -> None:
    z = make_input(shape, "nchw", F32, DEV)
    case = Case(z, groups)
    got = as_list(getattr(cuda_ops, op)(*case.args(op, cuda_ops)))
    want = as_list(getattr(Ref, op)(*case.args(op, Ref)))
    for name, g, w in zip(NAMES[op], got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape)
        torch.testing.assert_close(g, w, equal_nan=True, msg=lambda m, name=name: f"{op} {name}: {m}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_run_to_run_bitwise(cuda_ops, op, dtype, layout) -> None:
    """Fixed reduction trees, no atomics: two runs give the same bits (split planes and chunks)."""
    case = Case(make_input((2, 300, 37, 41), layout, dtype, DEV), 2)
    first = as_list(getattr(cuda_ops, op)(*case.args(op, cuda_ops)))
    again = as_list(getattr(cuda_ops, op)(*case.args(op, cuda_ops)))
    for a, b in zip(first, again):
        assert torch.equal(a.nan_to_num(7), b.nan_to_num(7))


def test_cuda_x1_rounds_once(cuda_ops) -> None:
    """x1 = fma(a, z, b) in float32 acc: the pool's maxima are the correctly rounded a*z + b
    (computed exactly in float64, rounded once to float32; a double rounding there is ~2^-29
    per value), where a separate product and sum would round twice."""
    z = make_input((2, 3, 64, 64), "nchw", F32, DEV)
    case = Case(z, 1)
    d = cuda_ops.spatial_tail_pool(z, case.a, case.b, None)
    x1 = (case.a.double()[:, :, None, None] * z.double() + case.b.double()[:, :, None, None]).float()
    assert torch.equal(d[:, 1], x1.amax(1))


# ----------------------------------------------------------------------------------------
# The public function on the cuda backend against the reference backend
# ----------------------------------------------------------------------------------------
def gates(c: int, groups: int, dtype: torch.dtype):
    """(channel_gate, spatial_gate, params): CBAM-like (an MLP on avg and max; a 7x7 conv of
    each group's [mean, max]) for one group, HAM-like (a per-channel mix of avg and max) for two."""
    acc = acc_of(dtype)
    w1 = (torch.randn(max(c // 4, 1), c, dtype=acc, device=DEV) * 0.3).requires_grad_()
    w2 = (torch.randn(c, max(c // 4, 1), dtype=acc, device=DEV) * 0.3).requires_grad_()
    mix = torch.randn(c, dtype=acc, device=DEV).requires_grad_()
    conv = (torch.randn(1, 2, 7, 7, dtype=acc, device=DEV) * 0.2).requires_grad_()

    if groups == 1:
        def channel_gate(avg, mx):
            f = lambda v: F.relu(v @ w1.t()) @ w2.t()  # noqa: E731
            return torch.sigmoid(f(avg) + f(mx))
        params = [w1, w2, conv]
    else:
        def channel_gate(avg, mx):
            return torch.sigmoid(0.5 * (avg + mx) * mix)
        params = [mix, conv]

    def spatial_gate(d):
        return torch.cat([torch.sigmoid(F.conv2d(d[:, 2 * g: 2 * g + 2], conv, padding=3)) for g in range(groups)], 1)

    return channel_gate, spatial_gate, params


def public_run(backend_name, z, shortcut, weight, bias, params, gate_fns, training, groups, important):
    channel_gate, spatial_gate = gate_fns
    running_mean = torch.zeros(z.shape[1], device=DEV, dtype=weight.dtype)
    running_var = torch.ones(z.shape[1], device=DEV, dtype=weight.dtype)
    leaves = [t.detach().requires_grad_() for t in (z, shortcut)]
    for p in [weight, bias, *params]:
        p.grad = None
    with backend.use_backend(backend_name):
        out = spatial_tail(leaves[0], leaves[1], running_mean, running_var, weight, bias, training,
                           channel_gate=channel_gate, spatial_gate=spatial_gate,
                           important=important if groups == 2 else None)
    g = torch.randn(out.shape, dtype=out.dtype, device=DEV, generator=torch.Generator(DEV).manual_seed(1))
    out.backward(g)
    grads = [leaves[0].grad, leaves[1].grad] + [p.grad.clone() for p in [weight, bias, *params]]
    return out.detach(), grads, [running_mean, running_var]


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("groups", [1, 2], ids=["cbam", "ham"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_spatial_tail_matches_reference_backend(dtype, layout, groups, training) -> None:
    n, c, h, w = 3, 24, 7, 6
    z = make_input((n, c, h, w), layout, dtype, DEV)
    shortcut = make_input((n, c, h, w), layout, dtype, DEV)
    weight = torch.empty(c, device=DEV, dtype=dtype).uniform_(-1, 1).requires_grad_()
    bias = torch.empty(c, device=DEV, dtype=dtype).uniform_(-0.5, 0.5).requires_grad_()
    channel_gate, spatial_gate, params = gates(c, groups, dtype)
    runs = [public_run(name, z, shortcut, weight, bias, params, (channel_gate, spatial_gate), training, groups, 9)
            for name in ("cuda", "reference")]
    (out, grads, stats), (out_ref, grads_ref, stats_ref) = runs
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == F64 else {"rtol": 2e-4, "atol": 2e-5}
    assert out.dtype == dtype
    torch.testing.assert_close(out, out_ref, **tol)
    names = ["z", "shortcut", "weight", "bias"] + [f"param{i}" for i in range(len(params))]
    for name, a, b in zip(names, grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")
    for a, b in zip(stats, stats_ref, strict=True):
        torch.testing.assert_close(a, b, **tol)
