"""Triton backend of the cam hot path against the torch reference of the same math.

The ops are called directly (`torch.ops.attnkernels_triton.cam[_backward]`) and through their
autograd, against `attnkernels.ops.cam.Reference` (its cam by torch autograd, its cam_backward
the contract's formulas). The contract is csrc/cam_ops.cpp ("cam hot path"). Without CUDA the
kernels run on CPU tensors under the Triton interpreter: shapes stay tiny.
"""
import functools

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
    small_reductions,
    within_half_budget,
)
from triton_cases import close as _close
from triton_cases import randn as _t

from attnkernels.ops.cam import Reference
from attnkernels.triton import cam as T

TOL = {F64: dict(rtol=1e-10, atol=1e-10), F32: dict(rtol=2e-5, atol=2e-5)}

# (N, C, H, W): odd H != W; C = 1; H*W = 1 with N = 1; odd C; C = 70 and H*W = 72 over several
# blocks of every dtype (fp64 32, fp32 64) with partial ends.
SHAPES = [(2, 24, 5, 3), (1, 1, 3, 4), (1, 40, 1, 1), (2, 7, 3, 4), (1, 70, 9, 8)]
LAYOUTS = ["nchw", "channels_last", "sliced", "channel_slice", "sliced_channels_last"]
NAMES = ("y", "attn", "grad_x", "grad_gamma")


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------
def make_inputs(shape, dtype, layout, scale=0.3, gamma=None):
    """x (values scale * normal: energies of a few units), gamma (one value), grad_y."""
    x = make_t(shape, dtype, layout, scale)
    g = torch.tensor([0.7 if gamma is None else gamma], dtype=dtype, device=DEVICE)
    gy = make_t(shape, dtype, "channels_last" if layout == "channels_last" else "nchw")
    return x, g, gy


def close(actual, expected, dtype, equal_nan=False, name="", truth=None):
    _close(actual, expected, TOL[dtype], equal_nan, name, truth=truth)


def reference(inputs):
    """y and attn by the reference, and grad_x, grad_gamma by torch autograd through it."""
    x, g, gy = inputs
    xl, gl = x.detach().requires_grad_(), g.detach().requires_grad_()
    y, attn = Reference.cam(xl, gl)
    return (y.detach(), attn.detach(), *torch.autograd.grad(y, (xl, gl), gy))


def run_ops(inputs):
    """y, attn, grad_x, grad_gamma of the Triton ops, called directly."""
    x, g, gy = inputs
    y, attn = ops.cam(x, g)
    return (y, attn, *ops.cam_backward(gy, x, g, attn))


def run_autograd(inputs):
    """The same through the op's autograd (cam's backward is cam_backward)."""
    x, g, gy = inputs
    xl, gl = x.detach().requires_grad_(), g.detach().requires_grad_()
    y, attn = ops.cam(xl, gl)
    assert not attn.requires_grad
    return (y.detach(), attn, *torch.autograd.grad(y, (xl, gl), gy))


def compare(inputs, equal_nan=False, autograd=True):
    """The ops (and their autograd) against the reference: values, dtypes, shapes, layouts."""
    x, g, gy = inputs
    dtype = x.dtype
    want = reference(inputs)

    @functools.cache
    def truths():  # float64: which of two float32 results is the more accurate
        return reference([t.double() for t in inputs])

    runs = [run_ops(inputs)] + ([run_autograd(inputs)] if autograd else [])
    for got in runs:
        y, attn, grad_x, grad_gamma = got
        assert y.dtype == x.dtype and y.is_contiguous(memory_format=expected_format(x))
        assert grad_x.dtype == x.dtype and grad_x.is_contiguous(memory_format=expected_format(x))
        assert attn.shape == (x.shape[0], x.shape[1], x.shape[1]) and attn.dtype == acc_of(dtype)
        assert attn.is_contiguous()
        assert grad_gamma.shape == g.shape and grad_gamma.dtype == g.dtype
        for i, (name, a, b) in enumerate(zip(NAMES, got, want)):
            close(a, b, dtype, equal_nan, name, truth=(lambda i=i: truths()[i]) if dtype == F32 else None)
    # The backward op on the reference's attn: the contract's formulas, whatever the forward.
    grad_x, grad_gamma = ops.cam_backward(gy, x, g, want[1])
    want_x, want_gamma = Reference.cam_backward(gy, x, g, want[1])
    close(grad_x, want_x, dtype, equal_nan, "grad_x (reference attn)")
    close(grad_gamma, want_gamma, dtype, equal_nan, "grad_gamma (reference attn)")
    return runs[0]


# ----------------------------------------------------------------------------------------
# The ops against the reference and autograd
# ----------------------------------------------------------------------------------------
# A 1 x 1 map is dense in every layout: no channels_last slice of it (triton_cases.make_t).
CASES_F64 = [pytest.param(layout, shape, id=f"{layout}-{shape_id(shape)}") for shape in SHAPES for layout in LAYOUTS
             if not (layout == "sliced_channels_last" and shape[2] * shape[3] == 1)]


@pytest.mark.parametrize("layout,shape", CASES_F64)
def test_matches_reference_f64(layout, shape):
    compare(make_inputs(shape, F64, layout))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_matches_reference_f32(layout, shape):
    compare(make_inputs(shape, F32, layout))


def small_tiles(monkeypatch):
    """Every loop several times with partial ends: 16-wide dot blocks, row tiles of 64 values
    (chunks of 16 columns), grad_gamma's partials summed in small tiles."""
    blocks = {dt: (16, 16, 16) for dt in (F64, F32, F16, BF16)}
    monkeypatch.setattr(T, "_GRAM_BLOCKS", blocks)
    monkeypatch.setattr(T, "_APPLY_BLOCKS", blocks)
    monkeypatch.setattr(T, "_ROW_TILE_ELEMENTS", 64)
    monkeypatch.setattr(T, "_MAX_ROW_BLOCK_J", 16)
    small_reductions(monkeypatch)


@pytest.mark.parametrize("layout", ["nchw", "sliced_channels_last"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_small_tiles(dtype, layout, monkeypatch):
    """C = 37: 3 channel blocks and 3 row chunks; H*W = 35: 3 pixel blocks and chunks; N*C = 74
    rows in 19 row blocks of 4 (grad_gamma's partials over several sum tiles)."""
    small_tiles(monkeypatch)
    x = torch.empty((2, 37, 5, 7), dtype=dtype, device=DEVICE)
    assert T._dot_blocks(T._GRAM_BLOCKS, x, 37, 37, 35) == (16, 16, 16)
    assert T._row_tiles(37, 74)(T._ROW_TILE_ELEMENTS) == (4, 16)
    compare(make_inputs((2, 37, 5, 7), dtype, layout))


def test_wide_channels_rule():
    """C = 2048 rows: the row kernels loop over 512-column chunks; the dot blocks stay the tables'."""
    x = torch.empty((1, 2048, 4, 4), dtype=F32, device=DEVICE)
    assert T._row_tiles(2048, 2048)(T._ROW_TILE_ELEMENTS) == (4, 512)
    assert T._dot_blocks(T._GRAM_BLOCKS, x, 2048, 2048, 16) == (64, 64, 16)
    assert T._dot_blocks(T._APPLY_BLOCKS, x, 2048, 16, 2048) == (64, 16, 32)


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_flush_subnormal_weights(dtype):
    """Energies far apart: most weights underflow below the smallest normal number of acc and
    are exactly 0 where the reference's are, the rest match; gradients too."""
    scale = 9.0 if dtype == F64 else 2.0
    inputs = make_inputs((2, 12, 4, 5), dtype, "nchw", scale=scale)
    _, attn, _, _ = compare(inputs, autograd=False)
    want = Reference.cam(inputs[0], inputs[1])[1]
    assert (want == 0).any() and (want > 0).any()
    assert torch.equal(attn == 0, want == 0)
    tiny = torch.finfo(acc_of(dtype)).tiny
    assert not ((attn > 0) & (attn < tiny)).any()


@pytest.mark.parametrize("gamma", [0.0, -1.5])
def test_gamma_values(gamma):
    """gamma = 0 (DANet's initial value: y = x, grad_x = grad_y plus the energies' path 0) and
    a negative gamma."""
    inputs = make_inputs((2, 9, 3, 5), F64, "channels_last", gamma=gamma)
    y, _, grad_x, _ = compare(inputs)
    if gamma == 0.0:
        assert torch.equal(y, inputs[0]) and torch.equal(grad_x, inputs[2])


def test_gamma_shapes_and_dtypes():
    """gamma of any shape holding one value and any floating dtype: used in acc; its gradient
    in its own shape and dtype."""
    x, g, gy = make_inputs((2, 6, 3, 3), F32, "nchw")
    want = run_ops((x, g, gy))
    for gamma in (g.reshape(()), g.reshape(1, 1, 1), g.double()):
        got = run_ops((x, gamma, gy))
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
        assert got[3].shape == gamma.shape and got[3].dtype == gamma.dtype
        torch.testing.assert_close(got[3].float().reshape(1), want[3])


def test_half_storage_dtype():
    """fp16 (and on a GPU bf16) x: y and grad_x in x's dtype, attn in fp32, computed in fp32 (a
    smoke test against the reference on the same values; the GPU test judges accuracy). The
    interpreter has no bf16 dot."""
    for dtype in (F16,) if INTERPRET else (F16, BF16):
        x, g, gy = make_inputs((2, 9, 3, 4), dtype, "channels_last")
        y, attn, grad_x, grad_gamma = run_ops((x, g, gy))
        want = reference((x.float(), g.float(), gy.float()))
        assert y.dtype == dtype and grad_x.dtype == dtype and attn.dtype == F32 and grad_gamma.dtype == g.dtype
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert grad_x.is_contiguous(memory_format=torch.channels_last)
        tol = dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(y.float(), want[0], **tol)
        torch.testing.assert_close(attn, want[1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grad_x.float(), want[2], **tol)
        torch.testing.assert_close(grad_gamma.float(), want[3], rtol=1e-3, atol=1e-3)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: NaN
def test_nan_propagates():
    """A NaN in x makes the energies of its channel's row and column NaN: every attention row
    is NaN, and so y and grad_x everywhere (as the reference's); a NaN in grad_y reaches
    grad_gamma and grad_x."""
    x, g, gy = make_inputs((2, 7, 3, 4), F64, "nchw")
    x[1, 4, 2, 3] = float("nan")
    _, attn, _, _ = compare((x, g, gy), equal_nan=True)
    assert torch.isnan(attn[1]).all() and not torch.isnan(attn[0]).any()
    x, g, gy = make_inputs((2, 7, 3, 4), F64, "channels_last")
    gy[0, 2, 1, 1] = float("nan")
    compare((x, g, gy), equal_nan=True)


def test_deterministic(monkeypatch):
    """Same inputs, bitwise the same outputs and gradients (partials summed in order)."""
    small_tiles(monkeypatch)
    inputs = make_inputs((2, 37, 5, 7), F32, "channel_slice")
    first, second = run_ops(inputs), run_ops(inputs)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------
# Measured launches
# ----------------------------------------------------------------------------------------
DOT_CANDIDATES = ["cam_m32n32k32/8w", "cam_m16n32k32/8w", "cam_m32n16k32/8w"]  # fp64 rule, half M, half N
ROW_CANDIDATES = ["32x64/4w", "16x64/4w", "64x64/8w"]  # C = 40 (64 columns): the rule's, half, twice (fp64: 8 warps)
DOT_SITES = ("cam_energy", "cam_out", "cam_backward_gram", "cam_backward_grad_x")
ROW_SITES = ("cam_softmax", "cam_backward_rows")


@pytest.mark.parametrize("fastest", [1, 2], ids=["half_m_half_tile", "half_n_twice_tile"])
def test_measured_configurations_match_the_reference(monkeypatch, fastest):
    """Where launches are measured (GPUs; a fake clock here), each site times its candidates
    once per shape (tl.dot launches: the rule's blocks, half BLOCK_M, half BLOCK_N; row kernels:
    the rule's tile, half and twice its elements) and runs the fastest: every output stays the
    reference's (the row kernels' partials follow their own tiles), a known shape times nothing,
    and explain() names each site's choice."""
    inputs = make_inputs((2, 40, 5, 7), F64, "nchw")
    x = inputs[0]
    assert T._dot_blocks(T._GRAM_BLOCKS, x, 40, 40, 35) == (32, 32, 32)
    assert T._dot_blocks(T._APPLY_BLOCKS, x, 40, 35, 40) == (32, 32, 32)
    with measured_launches(monkeypatch, {DOT_CANDIDATES[fastest], ROW_CANDIDATES[fastest]}) as timed:
        compare(inputs, autograd=False)
        key = "float64 2 40 5 7 nchw"
        for site in DOT_SITES:
            assert measured_choice(site, key) == (DOT_CANDIDATES[fastest], DOT_CANDIDATES), site
        for site in ROW_SITES:
            assert measured_choice(site, key) == (ROW_CANDIDATES[fastest], ROW_CANDIDATES), site
        assert set(timed) == set(DOT_CANDIDATES) | set(ROW_CANDIDATES)
        timed.clear()
        compare(inputs, autograd=False)
        assert timed == []  # known keys are lookups


# ----------------------------------------------------------------------------------------
# Registration, input checks
# ----------------------------------------------------------------------------------------
def test_schemas_match_the_cpp_contract():
    check_schemas(T.__all__, 2)


def test_opcheck_schema_and_autograd():
    """Under the interpreter only the schema and autograd-registration checks: the fake-tensor
    ones hand the kernels fake tensors, whose data the interpreter cannot read."""
    x, g, gy = make_inputs((2, 5, 2, 3), F64, "channels_last")
    _, attn = ops.cam(x, g)
    utils = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(ops.cam.default, (x, g), test_utils=utils)
    torch.library.opcheck(ops.cam_backward.default, (gy, x, g, attn), test_utils=utils)


@pytest.mark.skipif(INTERPRET, reason="fake tensors have no data for the Triton interpreter")
def test_opcheck_full_gpu():
    x, g, gy = make_inputs((2, 5, 2, 3), F32, "channels_last")
    _, attn = ops.cam(x, g)
    torch.library.opcheck(ops.cam.default, (x, g))
    torch.library.opcheck(ops.cam_backward.default, (gy, x, g, attn))


def _fwd(**kw):
    args = dict(x=_t(2, 6, 3, 4), gamma=_t(1))
    args.update(kw)
    return ops.cam(*args.values())


def _bwd(**kw):
    args = dict(grad_y=_t(2, 6, 3, 4), x=_t(2, 6, 3, 4), gamma=_t(1), attn=_t(2, 6, 6))
    args.update(kw)
    return ops.cam_backward(*args.values())


OP, BW = "cam", "cam_backward"
BAD_INPUTS = [
    (lambda: _fwd(x=_t(2, 6, 3)), ValueError, rf"{OP}: x must be 4-D \(N, C, H, W\), got 3-D"),
    (lambda: _fwd(x=_t(0, 6, 3, 4)), ValueError, rf"{OP}: x must not be empty, got shape \[0, 6, 3, 4\]"),
    (lambda: _fwd(x=_t(2, 6, 0, 4)), ValueError, rf"{OP}: x must not be empty"),
    (lambda: _fwd(x=torch.ones(2, 6, 3, 4, dtype=torch.int32, device=DEVICE)), TypeError,
     rf"{OP}: x must be a floating-point tensor, got Int"),
    (lambda: _fwd(gamma=_t(2)), ValueError, rf"{OP}: gamma must hold one value, got shape \[2\]"),
    (lambda: _fwd(gamma=torch.ones(1, dtype=torch.int32, device=DEVICE)), TypeError,
     rf"{OP}: gamma must be a floating-point tensor"),
    (lambda: _fwd(gamma=torch.ones(1, device="meta")), ValueError, rf"{OP}: gamma must be on \w+(:\d+)?, got meta"),
    (lambda: _bwd(x=_t(0, 6, 3, 4), grad_y=_t(0, 6, 3, 4), attn=_t(0, 6, 6)), ValueError,
     rf"{BW}: x must not be empty"),
    (lambda: _bwd(attn=_t(2, 6, 5)), ValueError, rf"{BW}: attn must have shape \(N, C, C\) = \(2, 6, 6\), got \[2, 6, 5\]"),
    (lambda: _bwd(attn=_t(2, 6, 6, dtype=F64)), TypeError,
     rf"{BW}: attn must be Float \(the accumulation dtype of x, Float\), got Double"),
    (lambda: _bwd(attn=torch.ones(2, 6, 6, device="meta")), ValueError, rf"{BW}: attn must be on \w+(:\d+)?, got meta"),
    (lambda: _bwd(grad_y=_t(2, 6, 4, 3)), ValueError,
     rf"{BW}: grad_y must match x's shape \[2, 6, 3, 4\] and dtype Float, got \[2, 6, 4, 3\] Float"),
    (lambda: _bwd(grad_y=_t(2, 6, 3, 4, dtype=F64)), ValueError,
     rf"{BW}: grad_y must match x's shape \[2, 6, 3, 4\] and dtype Float, got \[2, 6, 3, 4\] Double"),
    (lambda: _bwd(gamma=_t(1, 2)), ValueError, rf"{BW}: gamma must hold one value"),
    (lambda: _bwd(x=_t(2, 6, 3)), ValueError, rf"{BW}: x must be 4-D"),
]


@pytest.mark.parametrize("call,error,pattern", bad_input_params(BAD_INPUTS))
def test_bad_inputs(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_bad_inputs_match_the_python_checks():
    """The Triton ops raise the Python checks' own messages (attnkernels.ops.cam)."""
    from attnkernels.ops.cam import check_cam, check_cam_backward

    x = _t(2, 6, 3, 4)
    for gamma in (_t(3), torch.ones(1, dtype=torch.int64, device=DEVICE)):
        with pytest.raises((TypeError, ValueError)) as ours:
            ops.cam(x, gamma)
        with pytest.raises(type(ours.value)) as theirs:
            check_cam(x, gamma)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError) as ours:
        ops.cam_backward(x, x, _t(1), _t(2, 5, 5))
    with pytest.raises(ValueError) as theirs:
        check_cam_backward(x, x, _t(1), _t(2, 5, 5))
    assert str(ours.value) == str(theirs.value)


# ----------------------------------------------------------------------------------------
# GPU only: half precision, DANet sizes
# ----------------------------------------------------------------------------------------
def torch_path(inputs, dtype):
    """y and the gradients by plain torch ops computing in `dtype` (DANet's CAM_Module in a
    half-precision model), for the error budget of the half-precision kernels."""
    x, g, gy = (t.detach().to(dtype) for t in inputs)
    x.requires_grad_()
    g.requires_grad_()
    n, c = x.shape[:2]
    X = x.reshape(n, c, -1)
    energy = X @ X.transpose(1, 2)
    attn = torch.softmax(energy.amax(-1, keepdim=True).expand_as(energy) - energy, dim=-1)
    y = g.reshape(()) * (attn @ X).view(x.shape) + x
    return [y.detach(), *torch.autograd.grad(y, (x, g), gy)]


@pytest.mark.skipif(INTERPRET, reason="half precision on GPU only")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=dtype_id)
def test_half_gpu(dtype, layout):
    """fp16/bf16 x: y, grad_x and grad_gamma against an fp64 computation at most twice the error
    of plain torch ops in that dtype (plus a rounding's worth)."""
    for shape in [(2, 256, 14, 14), (2, 7, 5, 3), (1, 96, 7, 9)]:
        inputs = make_inputs(shape, dtype, layout, scale=0.05)
        y, _, grad_x, grad_gamma = run_ops(inputs)
        want_y, _, want_x, want_g = reference([t.double() for t in inputs])
        within_half_budget(("y", "grad_x", "grad_gamma"), [y, grad_x, grad_gamma],
                           torch_path(inputs, dtype), [want_y, want_x, want_g], dtype)


@pytest.mark.skipif(INTERPRET, reason="GPU sizes")
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_danet_sizes_gpu(dtype):
    """DANet-like sizes with the default tiles: C = 512 over 28 x 28, and C = 1024 over 14 x 14."""
    for shape in [(2, 512, 28, 28), (1, 1024, 14, 14)]:
        compare(make_inputs(shape, dtype, "channels_last", scale=0.02), autograd=False)
