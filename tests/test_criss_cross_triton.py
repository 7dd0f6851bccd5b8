"""Triton backend of the criss_cross hot path against the torch reference of the same math.

The ops are called directly (`torch.ops.attnkernels_triton.criss_cross[_backward]`) and through
their autograd, against `attnkernels.ops.criss_cross.Reference` (its criss_cross by torch
autograd, its criss_cross_backward the contract's formulas). The contract is
csrc/criss_cross_ops.cpp. Without CUDA the kernels run on CPU tensors under the Triton
interpreter: shapes stay tiny.
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
    check_schemas,
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

from attnkernels.ops.criss_cross import Reference, check_criss_cross, check_criss_cross_backward
from attnkernels.triton import criss_cross as T

TOL = {F64: dict(rtol=1e-10, atol=1e-10), F32: dict(rtol=3e-5, atol=3e-5)}
NAMES = ("y", "out", "lse", "grad_q", "grad_k", "grad_v", "grad_x", "grad_gamma")

# (N, D, C, H, W): odd H != W, D = 2; H = 1 (every column empty but the pixel: the merge of an
# empty column); W = 1 (a row of the pixel alone); lines over 16 (two blocks under small tiles).
SHAPES = [(2, 2, 16, 5, 7), (1, 1, 8, 1, 6), (1, 1, 8, 7, 1), (2, 3, 24, 9, 11)]
LAYOUTS = ["nchw", "channels_last", "sliced", "channel_slice", "mixed"]
# The interpreter's time: every layout on the small shapes, the largest in "mixed" only.
CASES_F64 = [pytest.param(layout, shape, id=f"{layout}-{shape_id(shape)}") for shape in SHAPES for layout in LAYOUTS
             if shape != SHAPES[-1] or layout == "mixed"]


# ----------------------------------------------------------------------------------------
# Inputs and comparisons
# ----------------------------------------------------------------------------------------
def make_inputs(shape, dtype, layout, gamma=None, qk_scale=0.6):
    """q, k, v, x, gamma (random nonzero by default), grad_y; "mixed": a layout per tensor."""
    n, d, c, h, w = shape
    layouts = ["nchw", "channels_last", "sliced", "channel_slice"] if layout == "mixed" else [layout] * 4
    q = make_t((n, d, h, w), dtype, layouts[0], qk_scale)
    k = make_t((n, d, h, w), dtype, layouts[1], qk_scale)
    v = make_t((n, c, h, w), dtype, layouts[2])
    x = make_t((n, c, h, w), dtype, layouts[3])
    value = 0.5 + torch.rand(()).item() if gamma is None else gamma
    g = torch.tensor([value], dtype=dtype, device=DEVICE)
    gy = make_t((n, c, h, w), dtype, "channels_last" if layout == "channels_last" else "nchw")
    return q, k, v, x, g, gy


def reference(inputs):
    """y, out, lse by the reference, the gradients by torch autograd through it."""
    *args, gy = inputs
    leaves = [t.detach().requires_grad_() for t in args]
    y, out, lse = Reference.criss_cross(*leaves)
    gq, gk, gv, gx, gg = torch.autograd.grad(y, leaves, gy)
    return y.detach(), out.detach(), lse.detach(), gq, gk, gv, gx, gg


def run_ops(inputs):
    """The Triton ops called directly (grad_x = grad_y)."""
    q, k, v, x, g, gy = inputs
    y, out, lse = ops.criss_cross(q, k, v, x, g)
    gq, gk, gv, gg = ops.criss_cross_backward(gy, q, k, v, g, out, lse)
    return y, out, lse, gq, gk, gv, gy, gg


def run_autograd(inputs):
    """The same through the op's registered autograd."""
    *args, gy = inputs
    leaves = [t.detach().requires_grad_() for t in args]
    assert all(l.stride() == t.stride() for l, t in zip(leaves, args))
    y, out, lse = ops.criss_cross(*leaves)
    assert not out.requires_grad and not lse.requires_grad
    return (y.detach(), out, lse, *torch.autograd.grad(y, leaves, gy))


def close(actual, expected, dtype, equal_nan=False, name=""):
    _close(actual, expected, TOL[dtype], equal_nan, name)


def check_layouts(inputs, got):
    q, k, v, x, g, _ = inputs
    for name, t in (("y", x), ("out", x), ("grad_q", q), ("grad_k", k), ("grad_v", v)):
        a = got[NAMES.index(name)]
        assert a.dtype == t.dtype and a.is_contiguous(memory_format=expected_format(t)), name
    lse = got[2]
    assert lse.dtype == acc_of(x.dtype) and lse.is_contiguous() and lse.shape == (x.shape[0], x.shape[2] * x.shape[3])
    assert got[-1].shape == g.shape and got[-1].dtype == g.dtype


def compare(inputs, equal_nan=False, autograd=True):
    """The ops (and their autograd) against the reference; returns the ops' results."""
    dtype = inputs[0].dtype
    want = reference(inputs)
    runs = [run_ops(inputs)] + ([run_autograd(inputs)] if autograd else [])
    for got in runs:
        check_layouts(inputs, got)
        for name, a, b in zip(NAMES, got, want):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            close(a, b, dtype, equal_nan, name)
    # The backward op on the reference's out and lse: the contract's formulas.
    q, k, v, x, g, gy = inputs
    mine = ops.criss_cross_backward(gy, q, k, v, g, want[1], want[2])
    theirs = Reference.criss_cross_backward(gy, q, k, v, g, want[1], want[2])
    for name, a, b in zip(("grad_q", "grad_k", "grad_v", "grad_gamma"), mine, theirs):
        close(a, b, dtype, equal_nan, name + " (reference out, lse)")
    return runs[0]


SMALL_TILES = dict(
    _FWD_BLOCKS={dt: (16, 16, 16) for dt in (F64, F32, F16, BF16)},
    _BWD_BLOCKS={dt: (16, 16, 16) for dt in (F64, F32, F16, BF16)},
    _MAX_BLOCK_D=16,
)


def small_tiles(monkeypatch):
    for name, value in SMALL_TILES.items():
        monkeypatch.setattr(T, name, value)


# ----------------------------------------------------------------------------------------
# The ops against the reference
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,shape", CASES_F64)
def test_matches_reference_f64(layout, shape):
    compare(make_inputs(shape, F64, layout), autograd=layout == "mixed")


@pytest.mark.parametrize("shape", SHAPES[:3], ids=shape_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_matches_reference_f32(layout, shape):
    compare(make_inputs(shape, F32, layout, gamma=-1.3), autograd=layout == "nchw")


def test_small_tiles(monkeypatch):
    """Every loop several times with partial ends: columns of 17 (2 query and 2 key blocks of
    16; rows of 3, one partial block), D = 18 (2 chunks: contraction and gradient tiles),
    C = 20 (2 chunks)."""
    small_tiles(monkeypatch)
    x = torch.empty((1, 20, 17, 3), dtype=F64)
    assert T._blocks(T._FWD_BLOCKS, x, 17, 20) == (16, 16, 16)
    compare(make_inputs((1, 18, 20, 17, 3), F64, "mixed", qk_scale=0.3), autograd=False)


@pytest.mark.parametrize("dtype", [F16, pytest.param(BF16, marks=pytest.mark.skipif(
    INTERPRET, reason="the interpreter has no bf16 tl.dot"))], ids=dtype_id)
def test_half_within_the_reference_error(dtype):
    """fp16/bf16: P and dS' are rounded to the input dtype for their matmuls (flash-style), the
    rest in fp32. Each result's error against the fp64 truth is at most twice the reference's
    math run in the half dtype (torch ops in fp16/bf16, backward with a half lse), plus a
    rounding of the result's scale."""
    q, k, v, x, g, gy = make_inputs((2, 4, 16, 6, 9), dtype, "channels_last", qk_scale=0.5)
    ours = run_ops((q, k, v, x, g, gy))
    truth = run_ops_reference([t.double() for t in (q, k, v, x, g, gy)])
    # The reference's ops in the half dtype: energies, softmax, out, all gradients.
    from attnkernels.ops.criss_cross import _energies, _weighted, _weights

    n, _, h, w = x.shape
    lse = torch.logsumexp(torch.cat(_energies(q, k), dim=-1), dim=-1)
    out = _weighted(*_weights(q, k, lse), v)
    y = g * out + x
    eager_grads = Reference.criss_cross_backward(gy, q, k, v, g, out, lse.reshape(n, h * w))
    eager = (y, out, *eager_grads[:3], eager_grads[3])
    pick = (0, 1, 3, 4, 5, 7)
    within_half_budget([NAMES[i] for i in pick], [ours[i] for i in pick], eager, [truth[i] for i in pick], dtype)


def run_ops_reference(inputs):
    """Reference forward and the contract's backward on its own out and lse (fp64 truth)."""
    q, k, v, x, g, gy = inputs
    y, out, lse = Reference.criss_cross(q, k, v, x, g)
    gq, gk, gv, gg = Reference.criss_cross_backward(gy, q, k, v, g, out, lse)
    return y, out, lse, gq, gk, gv, gy, gg


@pytest.mark.parametrize("gamma", [0.0, -2.5])
def test_gamma_values(gamma):
    """gamma = 0 (CCNet's initial value): y == x bit for bit, grad_gamma still flows."""
    inputs = make_inputs((2, 2, 8, 4, 5), F32, "nchw", gamma=gamma)
    got = compare(inputs, autograd=False)
    if gamma == 0.0:
        assert torch.equal(got[0], inputs[3])
        assert got[-1].abs().item() > 0 and got[5].eq(0).all()


def test_large_energies():
    """Energies of hundreds: the online softmax and the row/column merge rescale without
    overflow (exp of raw energies would be inf). fp64: in fp32 the gradients through such
    energies are ill-conditioned (rounding of S times |k|) for the reference as much."""
    inputs = make_inputs((1, 6, 8, 5, 7), F64, "nchw", qk_scale=8.0)
    s = torch.einsum("ndhw,ndhv->nhwv", inputs[0].double(), inputs[1].double())
    assert s.abs().max() > 200
    compare(inputs, autograd=False)


# ----------------------------------------------------------------------------------------
# NaN
# ----------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: NaN, inf - inf
@pytest.mark.parametrize("where", ["q", "k", "v", "x"])
def test_nan_propagates(where):
    """A NaN in q poisons its pixel; in k every pixel whose row or column holds that key (not
    the key's own column entry twice: the pixel's own energy comes from its row); in v the
    channel over the pixel's row and column; in x its place. Gradients NaN where torch's are."""
    shape = (2, 2, 4, 5, 7)
    q, k, v, x, g, gy = make_inputs(shape, F64, "nchw")
    target = {"q": q, "k": k, "v": v, "x": x}[where]
    target[0, 1, 2, 3] = float("nan")
    got = compare((q, k, v, x, g, gy), equal_nan=True, autograd=False)
    nan = torch.isnan(got[0])
    expected = torch.zeros(2, 4, 5, 7, dtype=torch.bool)
    cross = torch.zeros(5, 7, dtype=torch.bool)
    cross[2, :] = True
    cross[:, 3] = True
    if where == "q":
        expected[0, :, 2, 3] = True
    elif where in ("k", "v"):
        if where == "k":
            expected[0, :] = cross
        else:
            expected[0, 1] = cross
    else:
        expected[0, 1, 2, 3] = True
    assert torch.equal(nan.cpu(), expected)


# ----------------------------------------------------------------------------------------
# Determinism, measured launches, registration
# ----------------------------------------------------------------------------------------
def test_deterministic(monkeypatch):
    """Same input, same outputs and gradients, bit for bit."""
    small_tiles(monkeypatch)
    inputs = make_inputs((1, 18, 20, 17, 3), F32, "mixed")
    first, second = run_ops(inputs), run_ops(inputs)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


# fp64 lines of 17 (32-wide blocks, halved to 16), C = 33 (chunk 32): the rule's, half BLOCK_M,
# half BLOCK_N; FMA dots: 8 warps. A line of 2 has the rule's 16-wide blocks only, so a 17 x 2
# map measures the column sites and a 2 x 17 map the row sites (small maps: interpreter time).
DOT_CANDIDATES = ["cc_m32n32c32/8w", "cc_m16n32c32/8w", "cc_m32n16c32/8w"]
# R's tiles at H*W = 34, C = 33: the rule's 2048 values (64 pixels), half, twice.
ROW_CANDIDATES = ["32x64/4w", "16x64/4w", "64x64/4w"]
LINE_SITES = ["criss_cross.{}"] + [f"criss_cross_backward.grad_{g}_{{}}" for g in "qkv"]


def test_measured_configurations_match_the_reference(monkeypatch):
    """Where launches are measured (GPUs; a fake clock here), each site times its candidates
    once per shape and D (line kernels: the rule's blocks, half BLOCK_M, half BLOCK_N; R: the
    rule's tile, half and twice its values) and runs the fastest: results stay the reference's,
    a known shape times nothing, explain() names each site's choice. The column sites win with
    half BLOCK_M (R: half its tile), the row sites with half BLOCK_N (R: twice its tile)."""
    for (h, w), line, fastest in (((17, 2), "col", 1), ((2, 17), "row", 2)):
        inputs = make_inputs((1, 2, 33, h, w), F64, "nchw")
        assert T._blocks(T._FWD_BLOCKS, inputs[3], 17, 33) == T._blocks(T._BWD_BLOCKS, inputs[3], 17, 33) == (32, 32, 32)
        with measured_launches(monkeypatch, {DOT_CANDIDATES[fastest], ROW_CANDIDATES[fastest]}) as timed:
            compare(inputs, autograd=False)
            key = f"float64 1 33 {h} {w} nchw"
            for site in LINE_SITES:
                site = site.format(line)
                assert measured_choice(site, key + " 2") == (DOT_CANDIDATES[fastest], DOT_CANDIDATES), site
            assert measured_choice("criss_cross_backward.rows", key) == (ROW_CANDIDATES[fastest], ROW_CANDIDATES)
            assert set(DOT_CANDIDATES) | set(ROW_CANDIDATES) <= set(timed)
            timed.clear()
            compare(inputs, autograd=False)
            assert timed == []  # known keys are lookups


def test_schemas_match_the_cpp_contract():
    check_schemas(T.__all__, 2)


def _opcheck_cases(dtype):
    q, k, v, x, g, gy = make_inputs((2, 2, 5, 3, 4), dtype, "mixed")
    y, out, lse = ops.criss_cross(q, k, v, x, g)
    return [(ops.criss_cross, (q, k, v, x, g)), (ops.criss_cross_backward, (gy, q, k, v, g, out, lse))]


def test_opcheck_schema_and_autograd():
    """Under the interpreter only the schema and autograd-registration checks: the fake-tensor
    ones hand the kernels fake tensors, whose data the interpreter cannot read."""
    for op, args in _opcheck_cases(F64):
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.skipif(INTERPRET, reason="fake tensors have no data for the Triton interpreter")
def test_opcheck_full_gpu():
    for op, args in _opcheck_cases(F32):
        torch.library.opcheck(op.default, args)


@pytest.mark.skipif(INTERPRET, reason="GPU sizes")
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=dtype_id)
def test_ccnet_sizes_gpu(dtype):
    """CCNet-like sizes: C = 512 (D = 64), 65 x 65 maps, channels_last."""
    inputs = make_inputs((2, 64, 512, 65, 65), dtype, "channels_last", qk_scale=0.2)
    if dtype == F32:
        compare(inputs, autograd=False)
    else:
        got = run_ops(inputs)
        truth = run_ops_reference([t.double() for t in inputs])
        for name, a, b in zip(NAMES, got, truth):
            assert ((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0)).item() < 5e-2, name


def _fwd(**kw):
    args = dict(q=_t(2, 3, 4, 4), k=_t(2, 3, 4, 4), v=_t(2, 5, 4, 4), x=_t(2, 5, 4, 4), gamma=_t(1))
    args.update(kw)
    return ops.criss_cross(*args.values())


def _bwd(**kw):
    args = dict(grad_y=_t(2, 5, 4, 4), q=_t(2, 3, 4, 4), k=_t(2, 3, 4, 4), v=_t(2, 5, 4, 4), gamma=_t(1),
                out=_t(2, 5, 4, 4), lse=_t(2, 16))
    args.update(kw)
    return ops.criss_cross_backward(*args.values())


# The checks are nonlocal_attn's rules under criss_cross's op names.
OP, BW = "criss_cross", "criss_cross_backward"
BAD_INPUTS = [
    (lambda: _fwd(x=_t(2, 5, 4)), ValueError, rf"{OP}: x must be 4-D \(N, C, H, W\), got 3-D"),
    (lambda: _fwd(q=_t(2, 3, 0, 4), k=_t(2, 3, 0, 4), v=_t(2, 5, 0, 4), x=_t(2, 5, 0, 4)), ValueError,
     rf"{OP}: x must not be empty"),
    (lambda: _fwd(v=_t(2, 6, 4, 4)), ValueError, rf"{OP}: v must have x's shape"),
    (lambda: _fwd(k=_t(2, 3, 4, 4, dtype=F64)), TypeError, rf"{OP}: k must have x's dtype Float, got Double"),
    (lambda: _fwd(gamma=_t(2)), ValueError, rf"{OP}: gamma must hold one value, got shape \[2\]"),
    (lambda: _bwd(lse=_t(2, 15)), ValueError, rf"{BW}: lse must have shape \(N, H\*W\) = \(2, 16\), got \[2, 15\]"),
    (lambda: _bwd(grad_y=_t(2, 5, 4, 3)), ValueError, rf"{BW}: grad_y must match x's shape"),
    (lambda: _bwd(v=_t(2, 5, 0, 4), grad_y=_t(2, 5, 0, 4), out=_t(2, 5, 0, 4), q=_t(2, 3, 0, 4),
                  k=_t(2, 3, 0, 4), lse=_t(2, 0)), ValueError, rf"{BW}: v must not be empty"),
]


@pytest.mark.parametrize("call,error,pattern", bad_input_params(BAD_INPUTS))
def test_bad_inputs(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_bad_inputs_match_the_python_checks():
    """The Triton ops raise the Python checks' own messages (attnkernels.ops.criss_cross)."""
    q, v = _t(2, 3, 4, 4), _t(2, 5, 4, 4)
    with pytest.raises(ValueError) as ours:
        ops.criss_cross(q, q, v, v, _t(3))
    with pytest.raises(ValueError) as theirs:
        check_criss_cross(q, q, v, v, _t(3))
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError) as ours:
        ops.criss_cross_backward(v, q, q, v, _t(1), v, _t(2, 15))
    with pytest.raises(ValueError) as theirs:
        check_criss_cross_backward(v, q, q, v, _t(1), v, _t(2, 15))
    assert str(ours.value) == str(theirs.value)
