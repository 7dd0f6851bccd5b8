"""Triton backend of the ham_spatial hot path against the reference path of the same functions.

`attnkernels.functional.ham_spatial_pool` / `ham_spatial_apply` run the Triton ops under
`use_backend("triton")` and plain PyTorch under `use_backend("reference")`; forward outputs
and every gradient (autograd through the registered backward ops) must agree. The contract
is csrc/ham_spatial_ops.cpp (docs/contract.md#ham for the tie and NaN rules). Without CUDA the
kernels run on CPU tensors under the Triton interpreter: shapes stay tiny.
"""
import pytest
import torch

# triton_cases first: it switches the Triton interpreter on without CUDA.
from triton_cases import (
    DEVICE,
    F16,
    F32,
    F64,
    INTERPRET,
    acc_of,
    bad_input_params,
    check_schemas,
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

from attnkernels import functional as AF
from attnkernels import nn as fused_nn
from attnkernels import reference as R
from attnkernels.backend import use_backend
from attnkernels.reference.formulas import ham_important_channels
from attnkernels.triton import ham_spatial as T
from helpers import randomize

TOL = {
    F64: dict(rtol=1e-12, atol=1e-12),
    F32: dict(rtol=1e-5, atol=1e-5),
    F16: dict(rtol=2e-3, atol=2e-3),
}

# (N, C, H, W): C = 24, 5, 3, 2, 1; H != W; HW = 1; N = 1.
SHAPES = [(2, 24, 5, 3), (1, 5, 3, 4), (2, 3, 1, 1), (2, 2, 2, 3), (1, 1, 3, 2)]
# NCHW, channels_last, a strided H*W slice (not addressable by one stride when H, W > 1), a
# channel slice (a sample stride that is not C*H*W): triton_cases.make_t's.
LAYOUTS = ["nchw", "channels_last", "sliced", "channel_slice"]


def c_ims(c: int) -> list[int]:
    """HAM's own C_im, and C_im = C (the empty second group)."""
    return sorted({ham_important_channels(c), c})


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------
def make_gate(n, c, dtype, ties=False):
    """Ac in (0, 1); with `ties`, values repeat within a sample (the mask's tie rule decides)."""
    if ties:
        g = torch.randint(1, 4, (n, c), dtype=F64) / 4
    else:
        g = torch.rand((n, c), dtype=F64) * 0.9 + 0.05
    return g.to(dtype=acc_of(dtype), device=DEVICE)


def close(actual, expected, dtype, equal_nan=False, name=""):
    _close(actual, expected, TOL[dtype], equal_nan, name)


# ----------------------------------------------------------------------------------------
# One forward + backward of each op on a backend
# ----------------------------------------------------------------------------------------
def upstream(x):
    """Random upstream gradients for d1, d2 (N, 2, H, W) and y (x's shape), and gates s1, s2."""
    n, _, h, w = x.shape
    acc = acc_of(x.dtype)
    gd1 = torch.randn((n, 2, h, w), dtype=acc, device=DEVICE)
    gd2 = torch.randn((n, 2, h, w), dtype=acc, device=DEVICE)
    gy = torch.randn(x.shape, dtype=x.dtype, device=DEVICE)
    s1 = torch.rand((n, 1, h, w), dtype=acc, device=DEVICE)
    s2 = torch.rand((n, 1, h, w), dtype=acc, device=DEVICE)
    return gd1, gd2, gy, s1, s2


def run(backend, x, gate, c_im, extra):
    """{name: tensor} of the forward outputs of pool and apply and their gradients wrt
    x, gate (both ops), s1 and s2 (apply), with upstream gradients `extra`."""
    gd1, gd2, gy, s1, s2 = extra
    # detach, not clone: clone would make a sliced x dense.
    leaves = [t.detach().requires_grad_() for t in (x, gate, s1, s2)]
    xl, gl, s1l, s2l = leaves
    assert xl.stride() == x.stride()
    with use_backend(backend):
        d1, d2, mask = AF.ham_spatial_pool(xl, gl, c_im)
        y = AF.ham_spatial_apply(xl, gl, mask, s1l, s2l)
    px, pg = torch.autograd.grad((d1, d2), (xl, gl), (gd1, gd2))
    ax, ag, as1, as2 = torch.autograd.grad(y, leaves, gy)
    return dict(
        d1=d1, d2=d2, mask=mask, y=y,
        pool_grad_x=px, pool_grad_gate=pg,
        apply_grad_x=ax, apply_grad_gate=ag, grad_s1=as1, grad_s2=as2,
    )


def compare(x, gate, c_im, dtype=None, equal_nan=False):
    """Triton vs reference on every output and gradient; returns the Triton results."""
    dtype = dtype or x.dtype
    extra = upstream(x)
    got = run("triton", x, gate, c_im, extra)
    want = run("reference", x, gate, c_im, extra)
    assert torch.equal(got["mask"], want["mask"])
    for name in got:
        g, w = got[name], want[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        close(g, w, dtype if g.dtype == x.dtype else acc_of(dtype), equal_nan, name)
    return got


def check_layouts(x, out):
    """Outputs shaped like x follow x's layout; the small maps are NCHW-contiguous in acc."""
    acc = acc_of(x.dtype)
    for name in ("y", "pool_grad_x", "apply_grad_x"):
        assert out[name].dtype == x.dtype
        assert out[name].is_contiguous(memory_format=expected_format(x)), name
    for name in ("d1", "d2", "mask", "pool_grad_gate", "apply_grad_gate", "grad_s1", "grad_s2"):
        assert out[name].dtype == acc and out[name].is_contiguous(), name


def check_mask(mask, c_im):
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.sum(dim=1) == c_im).all()  # exactly c_im per sample


def small_tiles(monkeypatch):
    """The pixel tiles small (triton_cases.small_pixel_tiles), and the rank count's chunks."""
    small_pixel_tiles(monkeypatch, _MASK_BLOCK_C=4, _MASK_TILE_ELEMENTS=8)


@pytest.fixture(params=["default_tiles", "small_tiles"])
def tiles(request, monkeypatch):
    """Small tiles force many pixel blocks (partial grad_gate sums), channel chunks and
    rank-count chunks, partial ones included."""
    if request.param == "small_tiles":
        small_tiles(monkeypatch)
    return request.param


# ----------------------------------------------------------------------------------------
# Forward and gradients vs the reference
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference_f64(layout, shape):
    x = make_t(shape, F64, layout)
    gate = make_gate(*shape[:2], F64)
    for c_im in c_ims(shape[1]):
        out = compare(x, gate, c_im)
        check_layouts(x, out)
        check_mask(out["mask"], c_im)


@pytest.mark.parametrize("shape", [(2, 24, 5, 3), (1, 5, 1, 1), (2, 3, 2, 3)], ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [F32, F16], ids=dtype_id)
def test_matches_reference_low_precision(dtype, layout, shape):
    x = make_t(shape, dtype, layout)
    gate = make_gate(*shape[:2], dtype)
    out = compare(x, gate, ham_important_channels(shape[1]))
    check_layouts(x, out)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_tiles(dtype, layout, tiles):
    """Many blocks of every kind: partial blocks at the channel, pixel and rank-count ends."""
    for shape in [(2, 13, 5, 3), (1, 6, 1, 7)]:
        x = make_t(shape, dtype, layout)
        gate = make_gate(*shape[:2], dtype)
        c_im = ham_important_channels(shape[1])
        check_mask(compare(x, gate, c_im)["mask"], c_im)


def test_small_tiles_really_split(monkeypatch):
    """The small_tiles fixture's values do split the work into several blocks of each kind."""
    small_tiles(monkeypatch)
    x = make_t((2, 13, 5, 3), F64, "nchw")
    assert T._pixel_tiles(x, F64) == (4, 4)  # 4 channel chunks, 4 pixel blocks
    assert T._pixel_tiles(x.to(memory_format=torch.channels_last), F64) == (4, 4)
    assert T._mask_blocks(13) == (4, 2)
    assert T._sum_blocks(4, 13) == (1, 16)


def test_grads_from_expanded_and_sliced_upstream():
    """Autograd may hand the backward ops expanded or strided gradients (sums, slices)."""
    x = make_t((2, 7, 3, 4), F64, "channels_last")
    gate = make_gate(2, 7, F64)
    s = torch.rand((2, 1, 3, 4), dtype=F64, device=DEVICE)
    grads = {}
    for backend in ("triton", "reference"):
        xl, gl, sl = (t.detach().clone().requires_grad_() for t in (x, gate, s))
        with use_backend(backend):
            d1, d2, mask = AF.ham_spatial_pool(xl, gl, 4)
            y = AF.ham_spatial_apply(xl, gl, mask, sl, sl.transpose(2, 3).contiguous().transpose(2, 3))
        loss = d1.sum() + (d2[:, 1] * 2).sum() + y.sum()  # grad_y: stride 0 everywhere
        grads[backend] = torch.autograd.grad(loss, (xl, gl, sl))
    for g, r in zip(grads["triton"], grads["reference"]):
        close(g, r, F64)


# ----------------------------------------------------------------------------------------
# Ties and NaN
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 24, 3, 2), (2, 5, 2, 3), (1, 3, 1, 1)], ids=shape_id)
def test_mask_ties(shape, layout):
    """Equal gate values: the lower channel index ranks first (docs/contract.md#top-k-rank-rule), exactly c_im chosen."""
    x = make_t(shape, F64, layout)
    n, c = shape[:2]
    gate = make_gate(n, c, F64, ties=True) - 0.6  # negative values too: the op takes any gate
    gate[0] = 0.5  # one sample all tied: the first c_im channels are the important ones
    for c_im in range(1, c + 1):
        if c_im not in (1, 2, c // 2, ham_important_channels(c), c - 1, c):
            # Every c_im for the mask; the whole comparison on a spread of them.
            out = {"mask": ops.ham_spatial_pool(x, gate, c_im)[2]}
        else:
            out = compare(x, gate, c_im)
        check_mask(out["mask"], c_im)
        assert out["mask"][0, :c_im].eq(1).all() and out["mask"][0, c_im:].eq(0).all()
        for s in range(n):  # an explicit rank count
            g = gate[s].tolist()
            want = [sum(g[j] > g[k] or (g[j] == g[k] and j < k) for j in range(c)) < c_im for k in range(c)]
            assert out["mask"][s].tolist() == [float(v) for v in want]


def test_many_channels():
    """C = 2048: the rank count loops over many channel chunks (ties included)."""
    c = 2048
    c_im = ham_important_channels(c)
    x = make_t((1, c, 1, 2), F32, "nchw")
    gate = torch.randint(0, 64, (1, c), device=DEVICE).float() / 64  # ~32 channels per value
    d1, d2, mask = ops.ham_spatial_pool(x, gate, c_im)
    with use_backend("reference"):
        r1, r2, rmask = AF.ham_spatial_pool(x, gate, c_im)
    assert torch.equal(mask, rmask)
    check_mask(mask, c_im)
    close(d1, r1, F32)
    close(d2, r2, F32)


@pytest.mark.parametrize("kind", ["relu", "constant"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_channel_max_ties(dtype, layout, kind, tiles):
    """Several channels at a pixel's group max (ReLU zeros, zeroed channels, a constant x):
    the max gradient splits evenly among them, as the reference's torch.amax."""
    shape = (2, 7, 2, 3)
    x = make_t(shape, dtype, layout, kind=kind)
    for ties in (False, True):
        gate = make_gate(2, 7, dtype, ties=ties)
        for c_im in (4, 7):
            out = compare(x, gate, c_im)
            assert max_ties(x, gate, out) > 1  # the data does exercise the split


def max_ties(x, gate, out):
    """The most channels tied at one pixel's group max, over both groups."""
    m = out["mask"][:, :, None, None]
    f1 = x.to(gate.dtype) * gate[:, :, None, None]
    counts = [((g == d[:, 1:]).sum(dim=1)).max() for g, d in ((f1 * m, out["d1"]), (f1 * (1 - m), out["d2"]))]
    return int(max(counts))


def test_max_tie_split_is_even():
    """A hand-checkable case: constant negative x, so G1's max (0) sits on all C_sub zeroed
    channels and the max gradient is shared by them."""
    n, c, h, w = 1, 5, 1, 2
    x = torch.full((n, c, h, w), -1.0, dtype=F64, device=DEVICE)
    gate = torch.tensor([[0.9, 0.8, 0.7, 0.2, 0.1]], dtype=F64, device=DEVICE)
    gd1 = torch.zeros((n, 2, h, w), dtype=F64, device=DEVICE)
    gd1[:, 1] = 3.0  # only d1's max gets gradient
    gd2 = torch.zeros_like(gd1)
    d1, d2, mask = ops.ham_spatial_pool(x, gate, 3)
    assert mask.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]
    assert d1[0, 1].eq(0).all()
    grad_x, grad_gate = ops.ham_spatial_pool_backward(gd1, gd2, x, gate, mask, d1, d2, 3)
    # The two zeroed channels tie at the max, 1.5 each on G1, but no gradient passes mask = 0.
    assert grad_x.eq(0).all() and grad_gate.eq(0).all()
    # Group 2: G2 = -0.2, -0.1 on the unimportant channels, 0 on the important ones: the
    # max 0 is shared by the three important channels, which G2 zeroes: again no gradient.
    grad_x, grad_gate = ops.ham_spatial_pool_backward(gd2, gd1, x, gate, mask, d1, d2, 3)
    assert grad_x.eq(0).all() and grad_gate.eq(0).all()
    # With a positive x the maxima are single channels: channel 0 for group 1, channel 3 for 2.
    x = -x
    d1, d2, mask = ops.ham_spatial_pool(x, gate, 3)
    gd = torch.ones((n, 2, h, w), dtype=F64, device=DEVICE)
    grad_x, _ = ops.ham_spatial_pool_backward(gd, gd, x, gate, mask, d1, d2, 3)
    # mean shares: 1/3 per important channel, 1/2 per unimportant; max: 1 on channels 0 and 3.
    expected = torch.tensor([1 / 3 + 1, 1 / 3, 1 / 3, 1 / 2 + 1, 1 / 2], dtype=F64) * gate[0].cpu()
    close(grad_x[0, :, 0, 0].cpu(), expected, F64)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nan_propagates(layout, tiles):
    """A NaN in x makes its pixel's sums and maxima NaN in both groups (0 * NaN is NaN), and
    the gradients follow torch's (a NaN max: no tie, the whole pixel's gradient NaN)."""
    shape = (2, 6, 3, 4)
    x = make_t(shape, F64, layout)
    gate = make_gate(2, 6, F64)
    x[0, 1, 0, 0] = float("nan")
    x[1, 4, 2, 3] = float("nan")
    out = compare(x, gate, 4, equal_nan=True)
    for name in ("d1", "d2"):
        nan = torch.isnan(out[name])
        assert nan[0, :, 0, 0].all() and nan[1, :, 2, 3].all()
        assert nan.sum() == 4
    assert torch.isnan(out["pool_grad_x"]).sum() == 2 * 6  # each NaN pixel, every channel
    assert torch.isnan(out["pool_grad_gate"]).all()


# ----------------------------------------------------------------------------------------
# The whole fused HAM
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 24, 5, 4), (2, 5, 3, 3)], ids=shape_id)
def test_fused_ham_module(shape, layout):
    """attnkernels.nn.HAM on the Triton backend vs attnkernels.reference.HAM, training mode,
    fp64: output, gradients of x and of every parameter, BN running stats."""
    c = shape[1]
    ref = randomize(R.HAM(c)).to(DEVICE, F64).train()
    fused = fused_nn.HAM(c).to(DEVICE, F64).train()
    fused.load_state_dict(ref.state_dict())
    x = make_t(shape, F64, layout)
    grad_y = torch.randn(shape, dtype=F64, device=DEVICE)
    results = []
    for module, backend in ((fused, "triton"), (ref, "reference")):
        xl = x.detach().clone().requires_grad_()
        with use_backend(backend):
            y = module(xl)
        params = list(module.parameters())
        grads = torch.autograd.grad(y, [xl, *params], grad_y)
        results.append((y, grads, dict(module.named_buffers())))
    (y, grads, bufs), (ry, rgrads, rbufs) = results
    assert y.is_contiguous(memory_format=expected_format(x))
    close(y, ry, F64)
    names = ["x"] + [name for name, _ in ref.named_parameters()]
    assert len(grads) == len(rgrads) == len(names) >= 6
    for name, g, r in zip(names, grads, rgrads):
        try:
            close(g, r, F64)
        except AssertionError as err:
            raise AssertionError(f"grad of {name}: {err}") from None
    for name in rbufs:
        torch.testing.assert_close(bufs[name], rbufs[name], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------
# Determinism, registration, input checks
# ----------------------------------------------------------------------------------------
def test_deterministic(monkeypatch):
    """Same input, same outputs and gradients, bit for bit (partial sums included)."""
    monkeypatch.setattr(T, "_MAX_BLOCK_HW", 4)
    monkeypatch.setattr(T, "_MIN_BLOCK_HW", 1)
    monkeypatch.setattr(T, "_SUM_TILE_ELEMENTS", 8)
    x = make_t((2, 11, 5, 3), F32, "nchw")
    gate = make_gate(2, 11, F32)
    extra = upstream(x)
    first, second = (run("triton", x, gate, 6, extra) for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_schemas_match_the_cpp_contract():
    """Every op is registered under attnkernels_triton with the C++ library's schema."""
    check_schemas(T.__all__, 4)


def test_opcheck_schema():
    x = make_t((2, 6, 3, 4), F64, "channels_last")
    gate = make_gate(2, 6, F64)
    torch.library.opcheck(ops.ham_spatial_pool.default, (x, gate, 4), test_utils=("test_schema",))
    d1, d2, mask = ops.ham_spatial_pool(x, gate, 4)
    s1, s2 = torch.rand_like(d1[:, :1]), torch.rand_like(d1[:, 1:])
    torch.library.opcheck(
        ops.ham_spatial_apply_backward.default,
        (torch.randn_like(x), x, gate, mask, s1, s2),
        test_utils=("test_schema",),
    )


@pytest.mark.skipif(INTERPRET, reason="fake tensors have no data for the Triton interpreter (DESIGN.md)")
def test_opcheck_full_gpu():
    x = make_t((2, 6, 3, 4), F32, "channels_last")
    gate = make_gate(2, 6, F32)
    d1, d2, mask = ops.ham_spatial_pool(x, gate, 4)
    s1, s2 = torch.rand_like(d1[:, :1]), torch.rand_like(d1[:, 1:])
    cases = [
        (ops.ham_spatial_pool, (x, gate, 4)),
        (ops.ham_spatial_pool_backward, (torch.randn_like(d1), torch.randn_like(d2), x, gate, mask, d1, d2, 4)),
        (ops.ham_spatial_apply, (x, gate, mask, s1, s2)),
        (ops.ham_spatial_apply_backward, (torch.randn_like(x), x, gate, mask, s1, s2)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args)


def _pool_bw(**kw):
    args = dict(grad_d1=_t(2, 2, 4, 4), grad_d2=_t(2, 2, 4, 4), x=_t(2, 3, 4, 4), gate=_t(2, 3),
                mask=_t(2, 3), d1=_t(2, 2, 4, 4), d2=_t(2, 2, 4, 4), c_im=2)
    args.update(kw)
    return ops.ham_spatial_pool_backward(*args.values())


def _apply(backward=False, **kw):
    args = dict(x=_t(2, 3, 4, 4), gate=_t(2, 3), mask=_t(2, 3), s1=_t(2, 1, 4, 4), s2=_t(2, 1, 4, 4))
    if backward:
        args = dict(grad_y=_t(2, 3, 4, 4), **args)
    args.update(kw)
    return (ops.ham_spatial_apply_backward if backward else ops.ham_spatial_apply)(*args.values())


BAD_INPUTS = [
    (lambda: ops.ham_spatial_pool(_t(2, 3, 4), _t(2, 3), 2), ValueError,
     r"ham_spatial_pool: x must be 4-D \(N, C, H, W\), got 3-D"),
    (lambda: ops.ham_spatial_pool(torch.ones(2, 3, 4, 4, dtype=torch.int64, device=DEVICE), _t(2, 3), 2),
     TypeError, r"ham_spatial_pool: x must be a floating-point tensor, got Long"),
    (lambda: ops.ham_spatial_pool(_t(2, 3, 0, 4), _t(2, 3), 2), ValueError, r"ham_spatial_pool: x must not be empty"),
    (lambda: ops.ham_spatial_pool(_t(2, 3, 4, 4), _t(2, 4), 2), ValueError,
     r"ham_spatial_pool: gate must have shape \(N, C\) = \(2, 3\), got \[2, 4\]"),
    (lambda: ops.ham_spatial_pool(_t(2, 3, 4, 4), torch.ones(2, 3, dtype=torch.int32, device=DEVICE), 2),
     TypeError, r"ham_spatial_pool: gate must be a floating-point tensor"),
    (lambda: ops.ham_spatial_pool(_t(2, 3, 4, 4), _t(2, 3), 0), ValueError,
     r"ham_spatial_pool: c_im must be in \[1, C\] = \[1, 3\], got 0"),
    (lambda: ops.ham_spatial_pool(_t(2, 3, 4, 4), _t(2, 3), 4), ValueError,
     r"ham_spatial_pool: c_im must be in \[1, C\] = \[1, 3\], got 4"),
    (lambda: ops.ham_spatial_pool(_t(2, 3, 4, 4), torch.ones(2, 3, device="meta"), 2), ValueError,
     r"ham_spatial_pool: gate must be on \w+(:\d+)?, got meta"),
    (lambda: _pool_bw(grad_d1=_t(2, 1, 4, 4)), ValueError,
     r"ham_spatial_pool_backward: grad_d1 must have shape \(N, 2, H, W\) = \(2, 2, 4, 4\), got \[2, 1, 4, 4\]"),
    (lambda: _pool_bw(d2=_t(2, 2, 4, 3)), ValueError,
     r"ham_spatial_pool_backward: d2 must have shape \(N, 2, H, W\)"),
    (lambda: _pool_bw(mask=_t(3, 3)), ValueError,
     r"ham_spatial_pool_backward: mask must have shape \(N, C\) = \(2, 3\), got \[3, 3\]"),
    (lambda: _pool_bw(x=_t(2, 3, 4)), ValueError, r"ham_spatial_pool_backward: x must be 4-D"),
    (lambda: _pool_bw(c_im=5), ValueError, r"ham_spatial_pool_backward: c_im must be in \[1, C\]"),
    (lambda: _apply(mask=_t(2, 3, 1)), ValueError,
     r"ham_spatial_apply: mask must have shape \(N, C\) = \(2, 3\), got \[2, 3, 1\]"),
    (lambda: _apply(s1=_t(2, 2, 4, 4)), ValueError,
     r"ham_spatial_apply: s1 must have shape \(N, 1, H, W\) = \(2, 1, 4, 4\), got \[2, 2, 4, 4\]"),
    (lambda: _apply(s2=torch.ones(2, 1, 4, 4, dtype=torch.int32, device=DEVICE)), TypeError,
     r"ham_spatial_apply: s2 must be a floating-point tensor"),
    (lambda: _apply(s2=torch.ones(2, 1, 4, 4, device="meta")), ValueError,
     r"ham_spatial_apply: s2 must be on \w+(:\d+)?, got meta"),
    (lambda: _apply(backward=True, grad_y=_t(2, 3, 4, 5)), ValueError,
     r"ham_spatial_apply_backward: grad_y must match x's shape \[2, 3, 4, 4\] and dtype Float, "
     r"got \[2, 3, 4, 5\] Float"),
    (lambda: _apply(backward=True, gate=_t(2)), ValueError,
     r"ham_spatial_apply_backward: gate must have shape \(N, C\)"),
]


@pytest.mark.parametrize("call,error,pattern", bad_input_params(BAD_INPUTS))
def test_bad_inputs(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_functional_checks_c_im():
    """The functional entry point names c_im too (before any backend runs)."""
    with use_backend("triton"), pytest.raises(ValueError, match=r"ham_spatial_pool: c_im must be in \[1, C\]"):
        AF.ham_spatial_pool(_t(2, 3, 4, 4), _t(2, 3), 0)


@pytest.mark.parametrize("fastest", [1, 2], ids=["half_tile", "double_tile"])
def test_measured_tile_configurations_match_the_reference(monkeypatch, fastest):
    """Where launches are measured (GPUs; a fake clock here), each op times every candidate
    tile configuration once per shape and runs the fastest, whose pixel-block partials
    (sized by that configuration's blocks) still give every output and gradient."""
    from attnkernels import choose
    from attnkernels.triton import _common

    monkeypatch.setattr(T, "_TILE_ELEMENTS", {F32: 64, F64: 64})  # several pixel blocks at this size
    x = make_t((2, 13, 6, 7), F32, "nchw")
    configs = list(_common._tile_candidates(lambda e: T._pixel_tiles(x, F32, e), 64, T._pixel_warps))
    assert len(configs) == 3
    with measured_launches(monkeypatch, {configs[fastest]}):
        gate = make_gate(2, 13, F32)
        c_im = ham_important_channels(13)
        compare(x, gate, c_im)
        made = choose.explain()
        for op in ("pool", "pool_backward", "apply", "apply_backward"):
            assert f"triton.ham_spatial_{op} [float32 2 13 6 7 nchw]: {configs[fastest]} (measured" in made
