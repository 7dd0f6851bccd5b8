"""spatial_tail's ops on the C++ CPU backend, and the public function `spatial_tail` on it.

The six ops (`torch.ops.attnkernels.spatial_tail_*`, csrc/cpu/spatial_tail.cpp) against
`attnkernels.ops.spatial_tail.Reference` (csrc/spatial_tail_ops.cpp's formulas): every dtype (fp16
and bf16 judged against fp64 relative to the same-precision Reference's error), every layout,
one channel group and two (masks with an empty group too), odd and empty shapes, ties on purpose,
NaN, opcheck, bad input, thread-count independence. Then `spatial_tail` on the cpu backend against
the reference backend with CBAM- and HAM-like gates (forward and gradients), and gradcheck.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    LAYOUTS,
    assert_all_close,
    assert_cpp_error_like_python,
    assert_error_like_eager,
    assert_layout_of,
    leaf,
    make_input,
    on_backend,
    rounding_floor,
)

from attnkernels import backend
from attnkernels.ops import spatial_tail as ops_module
from attnkernels.ops.spatial_tail import spatial_tail
from attnkernels.reference.cbam import CBAM
from attnkernels.reference.ham import HAM

Ref = ops_module.Reference
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DTYPES = [F64, F32, F16, BF16]
# C = 1, odd C, C past the vector width and not a multiple of it; H = 1, W = 1, H = W = 1; N = 1;
# several pixel blocks (H*W = 1320 > 1024); NCHW statistics over several sub-blocks
# (130 * 131 > 16384 values); channels_last statistics sub-blocks of few rows (C = 300).
SHAPES = [(2, 24, 7, 5), (3, 1, 4, 4), (2, 37, 5, 9), (3, 16, 1, 1), (2, 5, 1, 9), (2, 6, 7, 1), (1, 40, 3, 4),
          (2, 19, 33, 40), (1, 2, 130, 131), (2, 300, 9, 7)]
EMPTY_SHAPES = [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0)]
TOL = {F64: {"rtol": 1e-12, "atol": 1e-12}, F32: {"rtol": 2e-5, "atol": 2e-6}}
NAMES = {"spatial_tail_stats": ["mean", "m2", "zmax", "zmin", "nmax", "nmin"], "spatial_tail_pool": ["d"],
         "spatial_tail_apply": ["out"], "spatial_tail_backward_reduce": ["grad_u", "grad_s", "s1", "s2"],
         "spatial_tail_pool_backward": ["t1", "t2"], "spatial_tail_backward_apply": ["grad_z"]}
OPS = list(NAMES)
# Each op with each channel grouping it takes: one group, or a random mask (two); the
# statistics take no mask.
OP_MASKINGS = [(op, masking) for op in OPS for masking in ("one_group", "random")
               if op != "spatial_tail_stats" or masking == "one_group"]
# Where each op's z is among its arguments.
Z_AT = {"spatial_tail_backward_reduce": 2, "spatial_tail_backward_apply": 1}
# Masks: one group (None), or two: random, all True (group 1 empty), all False (group 0 empty),
# and one sample of each kind.
MASKS = ["one_group", "random", "all_true", "all_false", "mixed"]


def shape_id(s) -> str:
    return "x".join(map(str, s))


def acc_of(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else F32


# ----------------------------------------------------------------------------------------
# Arguments of each op, and the check against the Reference
# ----------------------------------------------------------------------------------------
def make_mask(kind: str, n: int, c: int) -> torch.Tensor | None:
    if kind == "one_group":
        return None
    mask = torch.rand(n, c) < 0.5
    if kind == "all_true":
        mask[:] = True
    elif kind == "all_false":
        mask[:] = False
    elif kind == "mixed":
        mask[0] = True
        if n > 1:
            mask[1] = False
    return mask


def on_grid(t: torch.Tensor) -> torch.Tensor:
    """t rounded in place to multiples of 1/16 (strides kept): x1 = a * z + b of such values is
    exact in every precision, so the Reference's x1 (an fp64 product and sum) equals the kernel's
    fma bit for bit, and both find the same maxima by x1 == dmax; many values tie."""
    return t.mul_(16).round_().div_(16)


def relu_output(z: torch.Tensor) -> torch.Tensor:
    """An `out` for the backward: z's shape, dtype and strides, positive, zero (a fifth of the
    values, as relu leaves them) and negative values."""
    out = torch.randn_like(z)
    return out.masked_fill_(torch.rand(z.shape) < 0.2, 0)


def op_args(op: str, shape: tuple, layout: str, dtype: torch.dtype, masking: str = "random") -> list:
    """Random arguments of `op`: feature maps in `layout` and `dtype`, small maps in acc. The
    pool and its backward get values on a grid (on_grid), the backward's dmax the pool's maxima,
    zmax and zmin the planes' extrema, so that the x1 == dmax and z == zmax tests hit."""
    n, c, h, w = shape
    acc = acc_of(dtype)
    z = make_input(shape, layout, dtype, "cpu")
    if op == "spatial_tail_stats":
        return [z]
    mask = make_mask(masking, n, c)
    groups = 1 if mask is None else 2
    a, b = torch.randn(n, c, dtype=acc), torch.randn(n, c, dtype=acc)
    s = torch.rand(n, groups, h, w, dtype=acc)
    if op == "spatial_tail_apply":
        return [z, make_input(shape, layout, dtype, "cpu"), a, b, s, mask]
    if op == "spatial_tail_backward_reduce":
        return [make_input(shape, layout, dtype, "cpu"), relu_output(make_input(shape, layout, dtype, "cpu")), z, a, b,
                s, mask]
    z, a, b = on_grid(z), on_grid(a), on_grid(b)
    if op == "spatial_tail_pool":
        return [z, a, b, mask]
    dmax = Ref.spatial_tail_pool(z, a, b, mask)[:, 1::3].contiguous()
    gsum, gmax = torch.randn(n, groups, h, w, dtype=acc), torch.randn(n, groups, h, w, dtype=acc)
    if op == "spatial_tail_pool_backward":
        return [z, a, b, mask, dmax, gsum, gmax]
    _, _, zmax, zmin, _, _ = Ref.spatial_tail_stats(z)
    beta, gamma, kmax, kmin = (torch.randn(n, c, dtype=acc) for _ in range(4))
    return [make_input(shape, layout, dtype, "cpu"), z, a, b, mask, s, dmax, gsum, gmax, beta, gamma, zmax, kmax, zmin,
            kmin]


def in_f64(args: list) -> list:
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def as_list(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


def check_op(ops, op: str, args: list, **tol) -> list[torch.Tensor]:
    """op on the C++ CPU kernel against Reference's: shapes, dtypes, layouts; grad_u and the tie
    counts bitwise; fp64 to 1e-12, fp32 to 2e-5 or as accurate as the Reference against fp64;
    fp16 and bf16 outputs no worse against fp64 than twice the Reference's error in the same
    precision, plus two roundings. Returns the kernel's results."""
    got, want = as_list(getattr(ops, op)(*args)), as_list(getattr(Ref, op)(*args))
    exact = lambda: as_list(getattr(Ref, op)(*in_f64(args)))  # noqa: E731
    z = args[Z_AT.get(op, 0)]
    equal_nan = tol.pop("equal_nan", False)
    for name, g, w in zip(NAMES[op], got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        if name in ("out", "grad_u", "grad_z"):
            assert_layout_of(g, z)
        else:
            assert g.is_contiguous(), name
    for i, (name, g, w) in enumerate(zip(NAMES[op], got, want)):
        if name in ("grad_u", "nmax", "nmin"):  # a selection, a count: exactly the Reference's
            assert torch.equal(g.nan_to_num(7), w.nan_to_num(7)) if equal_nan else torch.equal(g, w), name
        elif name == "d":  # the tie counts exactly; the sums and maxima as numbers
            assert torch.equal(g[:, 2::3], w[:, 2::3]), "ties"
            assert_all_close([g], [w], [name], lambda: [exact()[0]], equal_nan=equal_nan, **(tol or TOL[g.dtype]))
        elif g.dtype in (F16, BF16):
            assert_error_like_eager([g], [w], [exact()[i]], floor=rounding_floor(g.dtype), names=[name])
        else:
            assert_all_close([g], [w], [name], lambda i=i: [exact()[i]], equal_nan=equal_nan,
                             **(tol or TOL[g.dtype]))
    return got


# ----------------------------------------------------------------------------------------
# Against the Reference: shapes, dtypes, layouts, groups
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,masking", OP_MASKINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_ops_match_reference(compiled_ops, op, dtype, layout, shape, masking) -> None:
    check_op(compiled_ops, op, op_args(op, shape, layout, dtype, masking))


@pytest.mark.parametrize("op", OPS[1:])
@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("masking", MASKS[2:])
def test_masks_with_an_empty_group(compiled_ops, op, dtype, layout, masking) -> None:
    """All True (group 1 empty: its sums 0, its maximum -inf, no ties), all False, one of each."""
    for shape in ((3, 37, 5, 9), (2, 19, 33, 40)):
        got = check_op(compiled_ops, op, op_args(op, shape, layout, dtype, masking))
        if op == "spatial_tail_pool" and masking != "mixed":
            empty = 1 if masking == "all_true" else 0
            d = got[0]
            assert (d[:, 3 * empty] == 0).all() and (d[:, 3 * empty + 1] == float("-inf")).all()
            assert (d[:, 3 * empty + 2] == 0).all()


@pytest.mark.parametrize("op", ["spatial_tail_apply", "spatial_tail_backward_reduce", "spatial_tail_backward_apply"])
def test_feature_maps_in_different_layouts(compiled_ops, op) -> None:
    """The feature-map arguments each in its own layout: read where they are, the result in z's."""
    shape = (2, 11, 6, 7)
    for layouts in (("channels_last", "nchw", "sliced"), ("nchw", "sliced", "channels_last"),
                    ("sliced", "channels_last", "nchw")):
        args = op_args(op, shape, layouts[0], F64)
        t = [make_input(shape, layout, F64, "cpu") for layout in layouts[1:]]
        if op == "spatial_tail_apply":
            args[1] = t[0]
        elif op == "spatial_tail_backward_reduce":
            args[0], args[1] = t[0], relu_output(t[1])
        else:
            args[0] = t[0]
        check_op(compiled_ops, op, args)


# ----------------------------------------------------------------------------------------
# Ties, empty tensors, NaN, statistics of data far from zero
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, F32, F16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_ties(compiled_ops, dtype, layout) -> None:
    """Constant planes: every pixel ties at the maximum and the minimum, m2 is 0. a = 0: x1 = b,
    which ties across all channels of a group where b is constant per (sample, group): the pool
    counts the group's size, and its backward routes gmax to every channel of the group."""
    for shape in ((2, 37, 5, 9), (2, 19, 33, 40)):
        n, c, h, w = shape
        z = make_input(shape, layout, dtype, "cpu")
        z[:, ::3] = torch.randn(n, len(range(0, c, 3)), 1, 1, dtype=dtype)  # constant planes
        stats = check_op(compiled_ops, "spatial_tail_stats", [z])
        assert (stats[4][:, ::3] == h * w).all() and (stats[5][:, ::3] == h * w).all()
        assert (stats[1][:, ::3] == 0).all()
        for masking in ("one_group", "random", "all_true"):
            args = op_args("spatial_tail_backward_apply", shape, layout, dtype, masking)
            mask = args[4]
            groups = 1 if mask is None else 2
            a = torch.zeros_like(args[2])
            b = torch.randn(n, groups, dtype=a.dtype)
            b = b[:, :1].expand(n, c) if mask is None else torch.where(mask, b[:, :1], b[:, 1:])
            b = b.contiguous()
            zz = args[1]
            d = check_op(compiled_ops, "spatial_tail_pool", [zz, a, b, mask])[0]
            sizes = [torch.full((n,), c)] if mask is None else [mask.sum(1), (~mask).sum(1)]
            for g, size in enumerate(sizes):
                assert torch.equal(d[:, 3 * g + 2], size[:, None, None].to(d.dtype).expand(n, h, w))
            dmax = d[:, 1::3].contiguous()
            gsum, gmax = args[7], args[8]
            t1, _ = check_op(compiled_ops, "spatial_tail_pool_backward", [zz, a, b, mask, dmax, gsum, gmax])
            member = torch.ones(n, c, dtype=torch.bool) if mask is None else mask
            routed = torch.where(member, (gsum + gmax)[:, 0].sum((1, 2))[:, None],
                                 (gsum + gmax)[:, -1].sum((1, 2))[:, None])
            torch.testing.assert_close(t1, routed, **TOL[acc_of(dtype)])
            args[2], args[3], args[6] = a, b, dmax
            check_op(compiled_ops, "spatial_tail_backward_apply", args)


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("masking", ["one_group", "random"])
def test_infinite_x1(compiled_ops, dtype, layout, masking) -> None:
    """x1 = -inf on every channel of a group (a = 0, b = -inf): its maximum -inf ties the whole
    group; +inf and -inf in one pixel's group: the sum NaN, the maximum +inf, not NaN."""
    shape = (2, 37, 5, 9)
    args = op_args("spatial_tail_pool", shape, layout, dtype, masking)
    z, a, b, mask = args
    last = torch.ones_like(a, dtype=torch.bool) if mask is None else ~mask  # the last group's channels
    a, b = torch.where(last, 0, a), torch.where(last, float("-inf"), b)
    d = check_op(compiled_ops, "spatial_tail_pool", [z, a, b, mask], **TOL[dtype], equal_nan=True)[0]
    sizes = last.sum(1)[:, None, None].to(d.dtype).expand_as(d[:, -1])
    assert (d[:, -2] == float("-inf")).all() and torch.equal(d[:, -1], sizes)
    a, b = args[1].clone(), args[2].clone()
    first = torch.ones_like(a, dtype=torch.bool) if mask is None else mask
    c0, c1 = first[0].nonzero()[:2, 0].tolist()
    a[0, c0], b[0, c0], a[0, c1], b[0, c1] = 0, float("inf"), 0, float("-inf")
    d = check_op(compiled_ops, "spatial_tail_pool", [z, a, b, mask], **TOL[dtype], equal_nan=True)[0]
    assert torch.isnan(d[0, 0]).all() and (d[0, 1] == float("inf")).all() and (d[0, 2] == 1).all()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=shape_id)
@pytest.mark.parametrize("masking", ["one_group", "random"])
def test_empty_inputs(compiled_ops, op, shape, masking) -> None:
    """No samples, channels or pixels: empty results, and the maps as the Reference's: P = 0
    gives mean NaN, m2 0, zmax -inf, zmin +inf, no ties, and zero sums; C = 0 gives the pool's
    sums 0, maxima -inf, no ties, and grad_s 0."""
    args = op_args(op, shape, "nchw", F32, masking)
    got = check_op(compiled_ops, op, args, **TOL[F32], equal_nan=True)
    n, c, h, w = shape
    if op == "spatial_tail_stats" and n * c > 0:
        mean, m2, zmax, zmin, nmax, nmin = got
        assert torch.isnan(mean).all() and (m2 == 0).all() and (nmax == 0).all() and (nmin == 0).all()
        assert (zmax == float("-inf")).all() and (zmin == float("inf")).all()
    if op == "spatial_tail_pool" and c == 0 and n * h * w > 0:
        d = got[0]
        assert (d[:, 0::3] == 0).all() and (d[:, 1::3] == float("-inf")).all() and (d[:, 2::3] == 0).all()


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("masking", ["one_group", "random"])
def test_nan(compiled_ops, dtype, layout, masking) -> None:
    """A NaN z poisons its plane's statistics (extrema NaN, no ties), its pixel's pool maps of
    its group only (maximum NaN, no ties), its output value through relu (relu(NaN) = NaN); the
    backward passes grad_out where out is NaN and drops a NaN grad_out where out <= 0; a gmax
    where x1 misses the maximum adds nothing, NaN or not."""
    shape, tol = (2, 37, 5, 6), {**TOL[dtype], "equal_nan": True}
    args = op_args("spatial_tail_backward_apply", shape, layout, dtype, masking)
    z, a, b, mask = args[1], args[2], args[3], args[4]
    z[1, 2, 1, 1] = float("nan")
    g = 0 if mask is None or mask[1, 2] else 1
    mean, m2, zmax, zmin, nmax, nmin = check_op(compiled_ops, "spatial_tail_stats", [z], **tol)
    assert torch.isnan(zmax[1, 2]) and torch.isnan(zmin[1, 2]) and nmax[1, 2] == 0 and torch.isnan(m2[1, 2])
    assert torch.isfinite(mean[0]).all() and torch.isfinite(mean[1, 3:]).all()

    d = check_op(compiled_ops, "spatial_tail_pool", [z, a, b, mask], **tol)[0]
    assert torch.isnan(d[1, 3 * g, 1, 1]) and torch.isnan(d[1, 3 * g + 1, 1, 1]) and d[1, 3 * g + 2, 1, 1] == 0
    assert not d[0].isnan().any() and not d[1, :, 0].isnan().any()  # (an empty group's maximum is -inf)
    if mask is not None:
        assert not d[1, 3 * (1 - g) : 3 * (1 - g) + 3].isnan().any()

    s = args[5]
    shortcut = make_input(shape, layout, dtype, "cpu")
    out = check_op(compiled_ops, "spatial_tail_apply", [z, shortcut, a, b, s, mask], **tol)[0]
    assert torch.isnan(out[1, 2, 1, 1]) and torch.isnan(out).sum() == 1

    grad_out, out = make_input(shape, layout, dtype, "cpu"), relu_output(make_input(shape, layout, dtype, "cpu"))
    out[0, 0, 0, 0], out[0, 0, 0, 1], grad_out[0, 0, 0, 1] = float("nan"), -1.0, float("nan")
    out[0, 3, 1, 1], grad_out[0, 3, 1, 1] = 1.0, float("nan")
    grad_u, grad_s, s1, s2 = check_op(compiled_ops, "spatial_tail_backward_reduce",
                                      [grad_out, out, z, a, b, s, mask], **tol)
    assert grad_u[0, 0, 0, 0] == grad_out[0, 0, 0, 0] and grad_u[0, 0, 0, 1] == 0
    assert torch.isnan(grad_u[0, 3, 1, 1]) and torch.isnan(s1[0, 3]) and torch.isfinite(s1[0, :3]).all()

    dmax, gsum, gmax = args[6:9]
    gmax = gmax.clone()
    gmax[0, 0, 2, 2] = float("nan")  # misses everywhere but at the maximum's channels
    t1, t2 = check_op(compiled_ops, "spatial_tail_pool_backward", [z, a, b, mask, dmax, gsum, gmax], **tol)
    assert torch.isnan(t1).sum() >= 1 and torch.isfinite(t1[1]).all()
    args[8] = gmax
    check_op(compiled_ops, "spatial_tail_backward_apply", args, **tol)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 24, 7, 5), (2, 19, 33, 40), (1, 2, 130, 131), (2, 300, 9, 7)], ids=shape_id)
def test_stats_of_data_far_from_zero(compiled_ops, layout, shape) -> None:
    """z = 1000 + noise of std 0.01 in fp32: m2 summed from deviations keeps 4 digits."""
    z = 1000 + 0.01 * make_input(shape, layout, F32, "cpu")
    mean, m2 = compiled_ops.spatial_tail_stats(z)[:2]
    zd = z.double()
    m2_exact = (zd - zd.mean((2, 3), keepdim=True)).square().sum((2, 3))
    torch.testing.assert_close(mean, zd.mean((2, 3)).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(m2.double(), m2_exact, rtol=1e-4, atol=0)


# ----------------------------------------------------------------------------------------
# opcheck, determinism
# ----------------------------------------------------------------------------------------
def _op_samples(op: str) -> list:
    samples = []
    for layout, dtype, masking in (("nchw", F64, "one_group"), ("channels_last", F64, "random"),
                                   ("sliced", F64, "random"), ("channels_last", F16, "one_group"),
                                   ("nchw", BF16, "random")):
        samples.append(op_args(op, (2, 6, 5, 3), layout, dtype, masking))
    samples.append(op_args(op, (0, 6, 5, 3), "nchw", F32))  # not P = 0: opcheck compares NaN means unequal
    return samples


@pytest.mark.parametrize("op", OPS)
def test_opcheck(compiled_ops, op) -> None:
    for args in _op_samples(op):
        torch.library.opcheck(getattr(compiled_ops, op).default, args)


@pytest.mark.parametrize("op,masking", OP_MASKINGS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_thread_count_changes_nothing(compiled_ops, op, layout, masking) -> None:
    """Bitwise the same results with one thread as with two: several blocks and sub-blocks."""
    args = op_args(op, (3, 37, 33, 40), layout, F32, masking)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(as_list(getattr(compiled_ops, op)(*args)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


# ----------------------------------------------------------------------------------------
# Bad input: the C++ kernels raise the Python checks' errors, word for word
# ----------------------------------------------------------------------------------------
def _t(*shape, dtype=F32, device="cpu"):
    return torch.rand(*shape, dtype=dtype, device=device)


def _valid(op: str) -> dict:
    """Valid float32 arguments of `op` (two groups), by schema name."""
    z, mask = _t(2, 3, 4, 4), torch.tensor([[True, False, True], [False, False, True]])
    x1 = {"z": z, "a": _t(2, 3), "b": _t(2, 3), "mask": mask}
    maps = {"dmax": _t(2, 2, 4, 4), "gsum": _t(2, 2, 4, 4), "gmax": _t(2, 2, 4, 4)}
    return {
        "spatial_tail_stats": {"z": z},
        "spatial_tail_pool": x1,
        "spatial_tail_apply": {"z": z, "shortcut": _t(2, 3, 4, 4), "a": x1["a"], "b": x1["b"], "s": _t(2, 2, 4, 4),
                               "mask": mask},
        "spatial_tail_backward_reduce": {"grad_out": _t(2, 3, 4, 4), "out": _t(2, 3, 4, 4), "z": z, "a": x1["a"],
                                         "b": x1["b"], "s": _t(2, 2, 4, 4), "mask": mask},
        "spatial_tail_pool_backward": {**x1, **maps},
        "spatial_tail_backward_apply": {"grad_u": _t(2, 3, 4, 4), **x1, "s": _t(2, 2, 4, 4), **maps,
                                        **{k: _t(2, 3) for k in ("beta", "gamma", "zmax", "kmax", "zmin", "kmin")}},
    }[op]


# (op, the arguments that differ from _valid's, the error, the message's start)
BAD_INPUTS = [
    ("spatial_tail_stats", {"z": _t(2, 3, 4)}, ValueError, "z must be 4-D (N, C, H, W), got 3-D"),
    ("spatial_tail_stats", {"z": _t(2, 3, 4, 4).int()}, TypeError, "z must be a floating-point tensor, got Int"),
    ("spatial_tail_stats", {"z": _t(2, 3, 4, 4).to(torch.float8_e4m3fn)}, TypeError,
     "z must be float64, float32, float16 or bfloat16, got Float8_e4m3fn"),
    ("spatial_tail_pool", {"z": _t(2, 3, 4, 4, 1)}, ValueError, "z must be 4-D (N, C, H, W), got 5-D"),
    ("spatial_tail_pool", {"a": _t(2, 4)}, ValueError, "a must have shape (N, C) = (2, 3), got [2, 4]"),
    ("spatial_tail_pool", {"b": _t(2, 3, dtype=F64)}, TypeError,
     "b must be Float (the accumulation dtype of x, Float), got Double"),
    ("spatial_tail_pool", {"mask": _t(2, 3) > 0.5, "a": _t(2, 3, device="meta")}, ValueError,
     "a must be on cpu, got meta"),
    ("spatial_tail_pool", {"mask": _t(2, 3)}, TypeError, "mask must be bool, got Float"),
    ("spatial_tail_pool", {"mask": torch.ones(2, 3, dtype=torch.uint8)}, TypeError, "mask must be bool, got Byte"),
    ("spatial_tail_pool", {"mask": torch.ones(3, 2, dtype=torch.bool)}, ValueError,
     "mask must have shape (N, C) = (2, 3), got [3, 2]"),
    ("spatial_tail_pool", {"mask": torch.ones(2, 3, dtype=torch.bool, device="meta")}, ValueError,
     "mask must be on cpu, got meta"),
    ("spatial_tail_apply", {"shortcut": _t(2, 3, 4, 4, dtype=F64)}, ValueError,
     "shortcut must match x's shape [2, 3, 4, 4] and dtype Float, got [2, 3, 4, 4] Double"),
    ("spatial_tail_apply", {"s": _t(2, 1, 4, 4)}, ValueError,
     "s must have shape (N, 2, H, W) = (2, 2, 4, 4), got [2, 1, 4, 4]"),
    ("spatial_tail_apply", {"mask": None}, ValueError,
     "s must have shape (N, 1, H, W) = (2, 1, 4, 4), got [2, 2, 4, 4]"),
    ("spatial_tail_apply", {"s": _t(2, 2, 4, 4, dtype=F16)}, TypeError,
     "s must be Float (the accumulation dtype of x, Float), got Half"),
    ("spatial_tail_apply", {"z": _t(2, 3, 4, 4, dtype=F16), "shortcut": _t(2, 3, 4, 4, dtype=F16),
                            "a": _t(2, 3, dtype=F16)}, TypeError,
     "a must be Float (the accumulation dtype of x, Half), got Half"),
    ("spatial_tail_backward_reduce", {"z": _t(2, 3, 4, 4).long()}, TypeError,
     "z must be a floating-point tensor, got Long"),
    ("spatial_tail_backward_reduce", {"grad_out": _t(2, 3, 4, 4, dtype=BF16)}, ValueError,
     "grad_out must match x's shape [2, 3, 4, 4] and dtype Float, got [2, 3, 4, 4] BFloat16"),
    ("spatial_tail_backward_reduce", {"out": _t(2, 3, 5, 4)}, ValueError,
     "out must match x's shape [2, 3, 4, 4] and dtype Float, got [2, 3, 5, 4] Float"),
    ("spatial_tail_backward_reduce", {"s": _t(2, 2, 4, 4, device="meta")}, ValueError, "s must be on cpu, got meta"),
    ("spatial_tail_pool_backward", {"dmax": _t(2, 2, 4, 5)}, ValueError,
     "dmax must have shape (N, 2, H, W) = (2, 2, 4, 4), got [2, 2, 4, 5]"),
    ("spatial_tail_pool_backward", {"gsum": _t(2, 2, 4, 4, dtype=F64)}, TypeError,
     "gsum must be Float (the accumulation dtype of x, Float), got Double"),
    ("spatial_tail_pool_backward", {"gmax": _t(2, 2, 4, 4, device="meta")}, ValueError,
     "gmax must be on cpu, got meta"),
    ("spatial_tail_pool_backward", {"mask": torch.zeros(2, 3, dtype=torch.int64)}, TypeError,
     "mask must be bool, got Long"),
    ("spatial_tail_backward_apply", {"grad_u": _t(2, 3, 4, 4, dtype=F16)}, ValueError,
     "grad_u must match x's shape [2, 3, 4, 4] and dtype Float, got [2, 3, 4, 4] Half"),
    ("spatial_tail_backward_apply", {"s": _t(2, 2, 4)}, ValueError, "s must have shape (N, 2, H, W)"),
    ("spatial_tail_backward_apply", {"beta": _t(2, 3, 1)}, ValueError, "beta must have shape (N, C) = (2, 3)"),
    ("spatial_tail_backward_apply", {"gamma": _t(2, 3, dtype=BF16)}, TypeError,
     "gamma must be Float (the accumulation dtype of x, Float), got BFloat16"),
    ("spatial_tail_backward_apply", {"zmax": _t(3, 3)}, ValueError, "zmax must have shape (N, C) = (2, 3), got [3, 3]"),
    ("spatial_tail_backward_apply", {"kmax": _t(2, 3, device="meta")}, ValueError, "kmax must be on cpu, got meta"),
    ("spatial_tail_backward_apply", {"zmin": _t(2, 3, dtype=F64)}, TypeError,
     "zmin must be Float (the accumulation dtype of x, Float), got Double"),
    ("spatial_tail_backward_apply", {"kmin": _t(2)}, ValueError, "kmin must have shape (N, C) = (2, 3), got [2]"),
]


@pytest.mark.parametrize("op,changed,error,start",
                         [pytest.param(*case, id=f"{case[0]}-{i}") for i, case in enumerate(BAD_INPUTS)])
def test_bad_inputs(compiled_ops, op, changed, error, start) -> None:
    """The C++ CPU kernel (called below the dispatcher's meta routing), and the Python check the
    reference and Triton backends and the fakes run, raise the same error with the same words."""
    assert_cpp_error_like_python(compiled_ops, ops_module, op, _valid(op) | changed, error, start)


# ----------------------------------------------------------------------------------------
# The public function: cpu backend against the reference backend
# ----------------------------------------------------------------------------------------
class Tail(torch.nn.Module):
    """A residual block's tail: BatchNorm2d, then CBAM's or HAM's gates (the reference modules'
    parameters, as spatial_tail's channel_gate and spatial_gate), fused by spatial_tail."""

    def __init__(self, kind: str, channels: int) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(channels)
        self.attn = CBAM(channels, reduction=4) if kind == "cbam" else HAM(channels)
        with torch.no_grad():
            self.bn.weight.uniform_(-1, 1)
            self.bn.bias.uniform_(-0.5, 0.5)
            self.bn.running_mean.uniform_(-0.3, 0.3)
            self.bn.running_var.uniform_(0.5, 1.5)
            for p in self.attn.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        self.attn.eval()  # the spatial gate's BatchNorm on running statistics

    def channel_gate(self, avg: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        if isinstance(attn, CBAM):
            ch = attn.channel
            f = lambda v: F.conv2d(F.relu(F.conv2d(v[:, :, None, None], ch.fc1.weight)), ch.fc2.weight)  # noqa: E731
            return torch.sigmoid(f(avg) + f(mx))
        mix = 0.5 * (avg + mx) + attn.alpha * avg + attn.beta * mx
        return torch.sigmoid(attn.conv(mix[:, None])).squeeze(1)

    def spatial_gate(self, d: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        if isinstance(attn, CBAM):
            return torch.sigmoid(attn.spatial.bn(attn.spatial.conv(d)))
        n = d.shape[0]
        y = attn.bn(attn.spatial_conv(torch.cat([d[:, :2], d[:, 2:]])))
        return torch.cat([torch.sigmoid(F.relu(y[:n])), torch.sigmoid(F.relu(y[n:]))], 1)

    def forward(self, z: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        important = self.attn.c_im if isinstance(self.attn, HAM) else None
        return spatial_tail(z, shortcut, bn.running_mean, bn.running_var, bn.weight, bn.bias, self.training,
                            bn.momentum, bn.eps, channel_gate=self.channel_gate, spatial_gate=self.spatial_gate,
                            important=important)


def tail_step(module: Tail, z, shortcut, g, backend_name: str) -> list[torch.Tensor]:
    """[out, grad_z, grad_shortcut, *grads of the parameters] of one step on `backend_name`."""
    z, shortcut = leaf(z, True), leaf(shortcut, True)
    params = list(module.parameters())
    with backend.use_backend(backend_name):
        out = module(z, shortcut)
    return [out.detach(), *torch.autograd.grad(out, [z, shortcut, *params], g, allow_unused=True)]


@pytest.mark.parametrize("kind", ["cbam", "ham"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_spatial_tail_matches_reference_backend(compiled_ops, kind, layout, train) -> None:
    """fp64: the output and the gradients of z, the shortcut, BatchNorm's weight and bias and the
    gates' parameters, on the cpu backend as on the reference backend."""
    for shape in ((3, 24, 7, 6), (2, 40, 33, 35)):
        module = Tail(kind, shape[1]).double().train(train)
        module.attn.eval()
        z, shortcut = make_input(shape, layout, F64, "cpu"), make_input(shape, layout, F64, "cpu")
        g = torch.randn_like(z)
        got, want = tail_step(module, z, shortcut, g, "cpu"), tail_step(module, z, shortcut, g, "reference")
        names = ["out", "grad_z", "grad_shortcut", *(n for n, _ in module.named_parameters())]
        for name, a, b in zip(names, got, want, strict=True):
            if a is None or b is None:
                assert a is None and b is None, name
                continue
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
        assert_layout_of(got[0], z)
        assert_layout_of(got[1], z)


@pytest.mark.parametrize("kind", ["cbam", "ham"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_spatial_tail_gradcheck(compiled_ops, kind, layout) -> None:
    """fp64 gradcheck on the cpu backend in z, the shortcut, BatchNorm's weight and bias."""
    module = Tail(kind, 8).double().train(True)
    module.attn.eval()
    z, shortcut = make_input((2, 8, 4, 3), layout, F64, "cpu"), make_input((2, 8, 4, 3), layout, F64, "cpu")
    bn = module.bn

    def tail(z, shortcut, weight, bias):
        return torch.func.functional_call(module, {"bn.weight": weight, "bn.bias": bias}, (z, shortcut))

    inputs = [leaf(z, True), leaf(shortcut, True), leaf(bn.weight, True), leaf(bn.bias, True)]
    assert torch.autograd.gradcheck(on_backend(tail, "cpu"), inputs, eps=1e-6, atol=1e-7)
