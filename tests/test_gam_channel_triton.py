"""Triton backend of the gam_channel hot path against the torch reference of the same math.

The ops are called directly (`torch.ops.attnkernels_triton.gam_channel[_backward]`): the
forward against the reference backend's `attnkernels.ops.gam_channel.Reference.gam_channel`,
the backward against torch autograd through it. The contract is csrc/gam_channel_ops.cpp
("gam_channel hot path"). Without CUDA the kernels run on CPU tensors under the Triton
interpreter: shapes stay tiny.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

# triton_cases first: it switches the Triton interpreter on without CUDA.
from triton_cases import (
    BF16,
    DEVICE,
    F16,
    F32,
    F64,
    INTERPRET,
    bad_input_params,
    check_schemas,
    dtype_id,
    expected_format,
    make_t,
    measured_launches,
    ops,
    shape_id,
    small_reductions,
    within_half_budget,
)
from triton_cases import close as _close
from triton_cases import randn as _t

from attnkernels.ops.gam_channel import Reference
from attnkernels.triton import gam_channel as T

TOL = {F64: dict(rtol=1e-10, atol=1e-10), F32: dict(rtol=2e-5, atol=2e-5)}

# (N, C, H, W, rd): odd H != W; H*W = 1 with N = 1; C prime with rd = 1; two pixel blocks of
# every dtype's BLOCK_P (H*W = 72) with C = 10 < one chunk; rd = 20 (BLOCK_R 32) and three C chunks.
SHAPES = [(2, 24, 5, 3, 3), (1, 40, 1, 1, 5), (2, 7, 3, 4, 1), (2, 10, 9, 8, 2), (1, 48, 2, 3, 20)]
LAYOUTS = ["nchw", "channels_last", "sliced", "channel_slice"]
NAMES = ("grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2")


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------
def make_inputs(shape, dtype, layout, wdtype=None):
    """x, w1, b1, w2, b2, grad_x1; weights random in (-0.6, 0.6)-ish, so h is partly 0."""
    n, c, h, w, rd = shape
    wdtype = wdtype or dtype

    def param(*size):
        return (torch.randn(size, dtype=F64) * 0.5).to(dtype=wdtype, device=DEVICE)

    x = make_t((n, c, h, w), dtype, layout)
    gy = make_t((n, c, h, w), dtype, "channels_last" if layout == "channels_last" else "nchw")
    return x, param(rd, c), param(rd), param(c, rd), param(c), gy


def close(actual, expected, dtype, equal_nan=False, name="", truth=None):
    _close(actual, expected, TOL[dtype], equal_nan, name, check_dtype=False, truth=truth)


# ----------------------------------------------------------------------------------------
# The ops against the reference and autograd
# ----------------------------------------------------------------------------------------
def reference(inputs):
    """x1 and the gradients of (x, w1, b1, w2, b2) by autograd through the reference."""
    *args, gy = inputs
    leaves = [t.detach().requires_grad_() for t in args]
    x1 = Reference.gam_channel(*leaves)
    return x1.detach(), torch.autograd.grad(x1, leaves, gy)


def run_ops(inputs):
    x, w1, b1, w2, b2, gy = inputs
    return ops.gam_channel(x, w1, b1, w2, b2), ops.gam_channel_backward(gy, x, w1, b1, w2, b2)


def compare(inputs, equal_nan=False):
    """The ops against the reference on x1 and every gradient, dtypes, shapes and layouts too."""
    x, w1, b1, w2, b2, _ = inputs
    dtype = x.dtype
    x1, grads = run_ops(inputs)
    want_x1, want_grads = reference(inputs)

    @functools.cache
    def truths():  # float64: which of two float32 reductions is the more accurate
        return reference([t.double() for t in inputs])

    assert x1.dtype == x.dtype and x1.is_contiguous(memory_format=expected_format(x))
    fp32 = dtype == F32
    close(x1, want_x1, dtype, equal_nan, "x1", truth=(lambda: truths()[0]) if fp32 else None)
    for i, (name, g, want, ref) in enumerate(zip(NAMES, grads, want_grads, (x, w1, b1, w2, b2))):
        assert g.shape == ref.shape and g.dtype == ref.dtype, name
        close(g, want, dtype, equal_nan, name, truth=(lambda i=i: truths()[1][i]) if fp32 else None)
    assert grads[0].is_contiguous(memory_format=expected_format(x))
    return x1, grads


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference_f64(layout, shape):
    compare(make_inputs(shape, F64, layout))


@pytest.mark.parametrize("shape", SHAPES[:4], ids=shape_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_matches_reference_f32(layout, shape):
    compare(make_inputs(shape, F32, layout))


def small_blocks(monkeypatch):
    """Every loop several times with partial ends: 16-pixel blocks, 16-channel chunks, three
    splits of the weight-gradient reduction, 4-column sums of 2 rows."""
    monkeypatch.setattr(T, "_BLOCK_P", {dt: 16 for dt in (F64, F32, F16, BF16)})
    monkeypatch.setattr(T, "_BLOCK_C", {dt: 16 for dt in (F64, F32, F16, BF16)})
    small_reductions(monkeypatch)


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_small_blocks(dtype, monkeypatch):
    """H*W = 35: 3 pixel blocks per sample, 6 tiles in 3 splits; C = 40: 3 chunks."""
    small_blocks(monkeypatch)
    x = torch.empty((2, 40, 5, 7), dtype=dtype, device=DEVICE)
    assert T._blocks(x, 5) == (16, 16, 16) and T._splits(6, 3, x.device) == 3
    compare(make_inputs((2, 40, 5, 7, 5), dtype, "channels_last"))


@pytest.mark.parametrize("fastest", [1, 2], ids=["half_pixels", "half_channels"])
def test_measured_configurations_match_the_reference(monkeypatch, fastest):
    """Where launches are measured (GPUs; a fake clock here), the forward and the backward's
    grad_x and weight-gradient launches each time every candidate (the rule's blocks, half the
    pixel block, half the channel chunk) once per shape and rd and run the fastest: x1 and
    every gradient stay the reference's (h and dh are per pixel, whatever grad_x's tiles; the
    weight gradients' splits follow their own blocks), a known shape times nothing, and
    explain() names the three choices."""
    from attnkernels import choose
    from attnkernels.triton import _common

    inputs = make_inputs((2, 40, 9, 8, 5), F32, "nchw")
    forward = ["p64c32r16/4w", "p32c32r16/4w", "p64c16r16/4w"]
    grad_x = [name.replace("/4w", "/8w") for name in forward]  # the backward kernels run 8 warps
    assert list(T._candidates(inputs[0], 5, lambda block_p, block_r: _common._warps(block_p * block_r))) == forward
    with measured_launches(monkeypatch, {forward[fastest], grad_x[fastest]}) as timed:
        compare(inputs)
        assert set(timed) == set(forward) | set(grad_x)
        made = choose.explain()
        assert f"triton.gam_channel [float32 2 40 9 8 nchw 5]: {forward[fastest]} (measured" in made
        assert f"triton.gam_channel_backward.grad_x [float32 2 40 9 8 nchw 5]: {grad_x[fastest]} (measured" in made
        assert (f"triton.gam_channel_backward.grad_weights [float32 2 40 9 8 nchw 5]: {grad_x[fastest]} (measured"
                in made)  # the same kernel warps as grad_x, so the same names
        timed.clear()
        compare(inputs)
        assert timed == []  # a known key is a lookup


def test_wide_rd():
    """rd = 300 (BLOCK_R 512): the [BLOCK_P, rd] tiles stay within _MAX_HIDDEN_TILE; and
    rd = 40 > C = 20 (BLOCK_R 64 over a single 16-pixel block) computes right."""
    x = torch.empty((1, 300, 8, 8), dtype=F32, device=DEVICE)
    assert T._blocks(x, 300) == (16, 32, 512)
    compare(make_inputs((1, 20, 2, 3, 40), F32, "nchw"))


def test_weights_in_another_dtype():
    """fp64 weights on fp32 x (used in fp32) and weights shaped as nn.Linear's: each weight
    gradient in its weight's dtype; the same result as fp32 weights of the same values."""
    inputs = make_inputs((2, 12, 3, 5, 3), F32, "nchw", wdtype=F64)
    x1, grads = compare(inputs)
    x, w1, b1, w2, b2, gy = inputs
    x1_32, grads_32 = run_ops((x, w1.float(), b1.float(), w2.float(), b2.float(), gy))
    assert torch.equal(x1, x1_32)
    for g, g32 in zip(grads, grads_32):
        assert g.dtype == (F32 if g.shape == x.shape else F64)
        torch.testing.assert_close(g.float(), g32)


def test_half_storage_dtype():
    """fp16 x: x1 and grad_x in fp16, computed in fp32 (a smoke test; the GPU test judges accuracy)."""
    x, w1, b1, w2, b2, gy = make_inputs((2, 9, 3, 4, 2), F16, "channels_last", wdtype=F32)
    x1, grads = run_ops((x, w1, b1, w2, b2, gy))
    want_x1, want_grads = reference((x.float(), w1, b1, w2, b2, gy.float()))
    assert x1.dtype == F16 and grads[0].dtype == F16 and grads[1].dtype == F32
    assert x1.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x1.float(), want_x1, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(grads[0].float(), want_grads[0], rtol=2e-3, atol=2e-3)
    tol = 1e-4 if INTERPRET else 1e-2  # TF32 products on a GPU
    for g, want in zip(grads[1:], want_grads[1:]):
        torch.testing.assert_close(g, want, rtol=tol, atol=tol)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: NaN
def test_nan_propagates():
    """A NaN in x makes its pixel's h, m and x1 NaN in every channel; grad_x1 = NaN at one
    element spreads through g and dh over that pixel and into every weight gradient. NaN
    exactly where torch's are."""
    shape = (2, 11, 3, 5, 3)
    x, w1, b1, w2, b2, gy = make_inputs(shape, F64, "nchw")
    x[1, 4, 2, 3] = float("nan")
    x1, grads = compare((x, w1, b1, w2, b2, gy), equal_nan=True)
    expected = torch.zeros(x.shape, dtype=torch.bool)
    expected[1, :, 2, 3] = True
    assert torch.equal(torch.isnan(x1).cpu(), expected)
    x, w1, b1, w2, b2, gy = make_inputs(shape, F64, "channels_last")
    gy[0, 2, 1, 1] = float("nan")
    compare((x, w1, b1, w2, b2, gy), equal_nan=True)


def test_deterministic(monkeypatch):
    """Same inputs, bitwise the same outputs and gradients (split partials summed in order)."""
    small_blocks(monkeypatch)
    inputs = make_inputs((2, 40, 5, 7, 5), F32, "channel_slice")
    first, second = run_ops(inputs), run_ops(inputs)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------
# Registration, input checks
# ----------------------------------------------------------------------------------------
def test_schemas_match_the_cpp_contract():
    check_schemas(T.__all__, 2)


def test_opcheck_schema():
    x, w1, b1, w2, b2, gy = make_inputs((2, 6, 2, 3, 2), F64, "channels_last")
    torch.library.opcheck(ops.gam_channel.default, (x, w1, b1, w2, b2), test_utils=("test_schema",))
    torch.library.opcheck(ops.gam_channel_backward.default, (gy, x, w1, b1, w2, b2), test_utils=("test_schema",))


@pytest.mark.skipif(INTERPRET, reason="fake tensors have no data for the Triton interpreter")
def test_opcheck_fake_gpu():
    x, w1, b1, w2, b2, gy = make_inputs((2, 6, 2, 3, 2), F32, "channels_last")
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.gam_channel.default, (x, w1, b1, w2, b2), test_utils=utils)
    torch.library.opcheck(ops.gam_channel_backward.default, (gy, x, w1, b1, w2, b2), test_utils=utils)


def _fwd(**kw):
    args = dict(x=_t(2, 6, 3, 4), w1=_t(3, 6), b1=_t(3), w2=_t(6, 3), b2=_t(6))
    args.update(kw)
    return ops.gam_channel(*args.values())


def _bwd(**kw):
    args = dict(grad_x1=_t(2, 6, 3, 4), x=_t(2, 6, 3, 4), w1=_t(3, 6), b1=_t(3), w2=_t(6, 3), b2=_t(6))
    args.update(kw)
    return ops.gam_channel_backward(*args.values())


OP, BW = "gam_channel", "gam_channel_backward"
BAD_INPUTS = [
    (lambda: _fwd(x=_t(2, 6, 3)), ValueError, rf"{OP}: x must be 4-D \(N, C, H, W\), got 3-D"),
    (lambda: _fwd(x=_t(0, 6, 3, 4)), ValueError, rf"{OP}: x must not be empty"),
    (lambda: _fwd(x=torch.ones(2, 6, 3, 4, dtype=torch.int32, device=DEVICE)), TypeError,
     rf"{OP}: x must be a floating-point tensor, got Int"),
    (lambda: _fwd(w1=_t(3, 5)), ValueError, rf"{OP}: w1 must have shape \(rd, C\) = \(rd, 6\), got \[3, 5\]"),
    (lambda: _fwd(w1=_t(18)), ValueError, rf"{OP}: w1 must have shape \(rd, C\)"),
    (lambda: _fwd(w2=_t(6, 2)), ValueError, rf"{OP}: w2 must have shape \(C, rd\) = \(6, 3\), got \[6, 2\]"),
    (lambda: _fwd(w2=_t(3, 6)), ValueError, rf"{OP}: w2 must have shape \(C, rd\)"),
    (lambda: _fwd(b1=_t(6)), ValueError, rf"{OP}: b1 must hold rd = 3 values, got shape \[6\]"),
    (lambda: _fwd(b2=_t(1, 5)), ValueError, rf"{OP}: b2 must hold C = 6 values, got shape \[1, 5\]"),
    (lambda: _fwd(b2=torch.ones(6, dtype=torch.int64, device=DEVICE)), TypeError,
     rf"{OP}: b2 must be a floating-point tensor"),
    (lambda: _fwd(w1=torch.ones(3, 6, device="meta")), ValueError, rf"{OP}: w1 must be on \w+(:\d+)?, got meta"),
    (lambda: _bwd(grad_x1=_t(2, 6, 4, 3)), ValueError,
     rf"{BW}: grad_x1 must match x's shape \[2, 6, 3, 4\] and dtype Float, got \[2, 6, 4, 3\] Float"),
    (lambda: _bwd(w2=_t(6, 4)), ValueError, rf"{BW}: w2 must have shape \(C, rd\) = \(6, 3\)"),
    (lambda: _bwd(grad_x1=torch.ones(2, 6, 3, 4, device="meta")), ValueError,
     rf"{BW}: grad_x1 must be on \w+(:\d+)?, got meta"),
]


@pytest.mark.parametrize("call,error,pattern", bad_input_params(BAD_INPUTS))
def test_bad_inputs(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


# ----------------------------------------------------------------------------------------
# GPU only: half precision, GAM sizes
# ----------------------------------------------------------------------------------------
def torch_path(inputs, dtype):
    """x1 and the gradients by plain torch ops computing in `dtype` (what a half-precision
    nn.Module would do), for the error budget of the half-precision kernels."""
    *args, gy = inputs
    leaves = [t.detach().to(dtype).requires_grad_() for t in args]
    x, w1, b1, w2, b2 = leaves
    xf = x.permute(0, 2, 3, 1)
    m = torch.sigmoid(F.linear(F.relu(F.linear(xf, w1, b1)), w2, b2)).permute(0, 3, 1, 2)
    x1 = x * m
    return [x1.detach(), *torch.autograd.grad(x1, leaves, gy.to(dtype))]


def with_relu_margin(inputs, margin=0.05):
    """The same inputs with x redrawn at every pixel where an fc1 pre-activation lies within
    `margin` of ReLU's kink: a unit that a rounding moves across it changes grad_x there by a
    finite step (its w1 row times dh), which measures luck, not precision."""
    x, w1, b1, *_ = inputs
    xp = x.permute(0, 2, 3, 1)  # a view: writes land in x, whatever its layout
    for _ in range(100):
        pre = F.linear(xp.double(), w1.double(), b1.double())
        near = (pre.abs() < margin).any(-1)
        if not near.any():
            return inputs
        xp[near] = torch.randn(int(near.sum()), x.shape[1], dtype=F64, device=x.device).to(x.dtype)
    raise AssertionError("could not draw x away from ReLU's kink")


@pytest.mark.skipif(INTERPRET, reason="half precision on GPU only")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=dtype_id)
def test_half_gpu(dtype, layout):
    """fp16/bf16 x (fp32 weights): the error against an fp64 computation at most twice the
    error of plain torch ops in that dtype (plus a rounding's worth)."""
    for shape in [(2, 256, 14, 14, 16), (2, 24, 5, 3, 3), (1, 96, 7, 9, 6)]:
        inputs = with_relu_margin(make_inputs(shape, dtype, layout, wdtype=F32))
        x1, grads = run_ops(inputs)
        want_x1, want_grads = reference([t.double() for t in inputs])
        truth = [want_x1, *want_grads]
        ours = [x1, *grads]
        within_half_budget(("x1",) + NAMES, ours, torch_path(inputs, dtype), truth, dtype)


@pytest.mark.skipif(INTERPRET, reason="GPU sizes")
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_gam_sizes_gpu(dtype):
    """GAM's conv-free half at ResNet sizes: C = 256, rd = 16, 28 x 28, and C = 512, rd = 32."""
    for shape in [(4, 256, 28, 28, 16), (2, 512, 14, 14, 32)]:
        compare(make_inputs(shape, dtype, "channels_last"))
