"""Triton backend of the softmax_spatial hot path against the reference module.

The ops are called directly (`torch.ops.attnkernels_triton.softmax_spatial[_backward]`): the
forward (y and a) against `attnkernels.reference.SoftmaxSpatial` and torch.softmax, the
backward against torch autograd through the reference module. The contract is
csrc/softmax_spatial_ops.cpp ("softmax_spatial hot path"). Without CUDA the kernels run on CPU
tensors under the Triton interpreter: shapes stay tiny.
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

from attnkernels import backend
from attnkernels import nn as fused
from attnkernels import reference as R
from attnkernels.triton import _common
from attnkernels.triton import softmax_spatial as T

TOL = {F64: dict(rtol=1e-10, atol=1e-10), F32: dict(rtol=2e-4, atol=2e-5)}

# (N, C, H, W, g): odd H != W with g = 1; H*W = 1; g = C; g between with C odd; two pixel blocks
# (H*W = 72 > BLOCK_P 64) with C = 20 (two channel chunks).
SHAPES = [(2, 12, 5, 3, 1), (2, 8, 1, 1, 4), (1, 6, 3, 4, 6), (2, 15, 3, 5, 5), (1, 20, 9, 8, 2)]
LAYOUTS = ["nchw", "channels_last", "sliced", "channel_slice"]
NAMES = ("y", "grad_x", "grad_weight", "grad_bias")


def make_inputs(shape, dtype, layout, rescale=True, wdtype=None):
    """(module, x, grad_y): a reference SoftmaxSpatial with random weights in `wdtype` (x's
    dtype by default), x in `layout`, grad_y random."""
    n, c, h, w, g = shape
    module = R.SoftmaxSpatial(c, groups=g, rescale=rescale).to(device=DEVICE, dtype=wdtype or dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.6, 0.6)
    x = make_t((n, c, h, w), dtype, layout)
    gy = make_t((n, c, h, w), dtype, "channels_last" if layout == "channels_last" else "nchw")
    return module, x, gy


def op_weights(module):
    conv = module.conv
    return conv.weight.reshape(conv.out_channels, conv.in_channels), conv.bias


def run_ops(module, x, gy):
    """[y, grad_x, grad_weight (g, C), grad_bias] and a, from the ops."""
    weight, bias = (t.detach() for t in op_weights(module))
    y, a = ops.softmax_spatial(x, weight, bias, module.rescale)
    grads = ops.softmax_spatial_backward(gy, x, weight, a, module.rescale)
    return [y, *grads], a


def reference(module, x, gy):
    """[y, grad_x, grad_weight (g, C), grad_bias] by autograd through the reference module,
    and a by torch.softmax in acc(x)."""
    module.zero_grad(set_to_none=True)
    leaf = x.detach().requires_grad_()
    y = module(leaf)
    y.backward(gy)
    weight, bias = op_weights(module)
    acc = F64 if x.dtype == F64 else F32
    n, c, h, w = x.shape
    logits = torch.einsum("jc,ncp->njp", weight.detach().to(acc), x.to(acc).reshape(n, c, h * w))
    a = torch.softmax(logits + bias.detach().to(acc)[:, None], -1).reshape(n, -1, h, w)
    return [y.detach(), leaf.grad, module.conv.weight.grad.reshape(weight.shape), module.conv.bias.grad], a


def finite_scale(t: torch.Tensor) -> float:
    """The largest finite magnitude of t, at least 1."""
    return max(t[torch.isfinite(t)].abs().max().item() if torch.isfinite(t).any() else 0.0, 1.0)


def compare(inputs, equal_nan=False):
    """The ops against the reference: values, dtypes, shapes and layouts. grad_bias is exactly
    0 (a softmax ignores a shift of its whole row), so it is compared as rounding noise."""
    module, x, gy = inputs
    dtype = x.dtype
    got, a = run_ops(module, x, gy)
    want, want_a = reference(module, x, gy)
    assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=expected_format(x))
    assert got[1].dtype == dtype and got[1].is_contiguous(memory_format=expected_format(x))
    assert a.dtype == want_a.dtype and a.is_contiguous()
    _close(a, want_a, TOL[dtype], equal_nan, "a")
    for name, g, w in zip(NAMES[:3], got[:3], want[:3]):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        tol = dict(TOL[dtype])
        tol["atol"] *= finite_scale(w)  # peaked softmaxes: errors scale with the values
        _close(g, w, tol, equal_nan, name)
    noise = dict(rtol=0.0, atol=(1e-11 if dtype == F64 else 1e-5) * finite_scale(want[2]))
    _close(got[3], want[3], noise, equal_nan, "grad_bias")
    return got


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference_f64(layout, shape):
    compare(make_inputs(shape, F64, layout))


@pytest.mark.parametrize("shape", SHAPES[:4], ids=shape_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "plain"])
def test_matches_reference_f32(layout, shape, rescale):
    compare(make_inputs(shape, F32, layout, rescale))


def small_blocks(monkeypatch):
    """Every loop several times with partial ends: 16-pixel blocks, 4-channel chunks, 16-value
    softmax row blocks, three splits of the weight-gradient reduction, small partial sums."""
    monkeypatch.setattr(T, "_BLOCK_P", 16)
    monkeypatch.setattr(T, "_BLOCK_C", 4)
    monkeypatch.setattr(T, "_BLOCK_ROW", 16)
    small_reductions(monkeypatch)


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
@pytest.mark.parametrize("groups", [1, 2, 10])
def test_small_blocks(dtype, groups, monkeypatch):
    """H*W = 35: 3 pixel blocks per sample and 3 softmax row blocks; C = 10: 3 chunks (a group
    of 5 channels crosses chunk ends); 6 tiles in 3 splits."""
    small_blocks(monkeypatch)
    assert T._tiles(10, 35, T._rule_elements(35)) == (4, 16) and T._row_block(35) == 16
    assert T._splits(6, 3, torch.device(DEVICE)) == 3
    compare(make_inputs((2, 10, 5, 7, groups), dtype, "channels_last"))


MEASURED_SITES = ("softmax_spatial.logits", "softmax_spatial.apply",
                  "softmax_spatial_backward.grad_logits", "softmax_spatial_backward.grad_x",
                  "softmax_spatial_backward.grad_weights")


@pytest.mark.parametrize("fastest", [1, 2], ids=["half_tile", "double_tile"])
def test_measured_tile_configurations_match_the_reference(monkeypatch, fastest):
    """Where launches are measured (GPUs; a fake clock here), each of the five tiled launches
    times every candidate (the rule's 16 channels per tile, 8, 32) once per shape and map
    count and runs the fastest: the outputs and gradients stay the reference's, a known shape
    times nothing, and explain() names each choice with its key."""
    from attnkernels import choose

    configs = list(_common._tile_candidates(lambda e: T._tiles(20, 72, e), T._rule_elements(72), T._tile_warps))
    assert configs == ["16x64/4w", "8x64/4w", "32x64/8w"]
    inputs = make_inputs((2, 20, 9, 8, 2), F32, "nchw")  # two pixel blocks; 2, 3 or 1 channel blocks
    with measured_launches(monkeypatch, {configs[fastest]}) as timed:
        compare(inputs)
        assert set(timed) == set(configs)
        made = choose.explain()
        for site in MEASURED_SITES:
            assert f"triton.{site} [float32 2 20 9 8 nchw 2]: {configs[fastest]} (measured" in made
        timed.clear()
        compare(inputs)
        assert timed == []  # a known key is a lookup


def test_weights_in_another_dtype():
    """fp64 weights on fp32 x (used in fp32): the weight gradients in fp64, the same results as
    fp32 weights of the same values."""
    module, x, gy = make_inputs((2, 12, 3, 5, 3), F32, "nchw", wdtype=F64)
    got, _ = run_ops(module, x, gy)
    assert got[2].dtype == F64 and got[3].dtype == F64
    got32, _ = run_ops(module.float(), x, gy)
    assert torch.equal(got[0], got32[0]) and torch.equal(got[1], got32[1])
    torch.testing.assert_close(got[2].float(), got32[2])


def test_half_storage_dtype():
    """fp16 x: y and grad_x in fp16, computed in fp32 (a smoke test; the GPU test judges accuracy)."""
    module, x, gy = make_inputs((2, 9, 3, 4, 3), F16, "channels_last", wdtype=F32)
    got, a = run_ops(module, x, gy)
    want, _ = reference(module, x.float(), gy.float())
    assert got[0].dtype == F16 and got[1].dtype == F16 and got[2].dtype == F32 and a.dtype == F32
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got[0].float(), want[0], rtol=2e-3, atol=2e-3 * want[0].abs().max().item())
    torch.testing.assert_close(got[1].float(), want[1], rtol=2e-3, atol=2e-3 * want[1].abs().max().item())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: NaN
def test_nan_propagates():
    """A NaN in x[n] makes every logit at its pixel NaN, so every map and y of sample n; the
    other sample stays finite, forward and backward. NaN exactly where torch's are."""
    module, x, gy = make_inputs((2, 8, 3, 5, 2), F64, "nchw")
    x[1, 4, 2, 3] = float("nan")
    got = compare((module, x, gy), equal_nan=True)
    assert torch.isnan(got[0][1]).all() and torch.isfinite(got[0][0]).all()
    assert torch.isnan(got[1][1]).all() and torch.isfinite(got[1][0]).all()


def test_infinite_logits():
    """+inf and -inf biases: those maps' rows are NaN (inf - inf, 0/0) as torch.softmax's."""
    module, x, gy = make_inputs((2, 8, 3, 3, 4), F64, "nchw", rescale=False)
    with torch.no_grad():
        module.conv.bias[1] = float("inf")
        module.conv.bias[2] = -float("inf")
    got, _ = run_ops(module, x, gy)
    assert torch.isnan(got[0][:, 2:6]).all() and torch.isfinite(got[0][:, :2]).all()
    torch.testing.assert_close(got[0], module(x), equal_nan=True, **TOL[F64])


def test_deterministic(monkeypatch):
    """Same inputs, bitwise the same outputs and gradients (split partials summed in order)."""
    small_blocks(monkeypatch)
    module, x, gy = make_inputs((2, 10, 5, 7, 2), F32, "channel_slice")
    first, second = run_ops(module, x, gy)[0], run_ops(module, x, gy)[0]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_module_under_interpreter(layout):
    """The fused module pinned to the Triton backend: the reference module's output and
    gradients (through the registered autograd)."""
    module, x, gy = make_inputs((2, 6, 3, 4, 3), F64, layout)
    f = fused.SoftmaxSpatial(6, groups=3).to(device=DEVICE, dtype=F64)
    f.load_state_dict(module.state_dict())
    leaf = x.detach().requires_grad_()
    with backend.use_backend("triton"):
        y = f(leaf)
    y.backward(gy)
    want, _ = reference(module, x, gy)
    _close(y.detach(), want[0], TOL[F64], name="y")
    _close(leaf.grad, want[1], TOL[F64], name="grad_x")
    _close(f.conv.weight.grad.reshape(3, 6), want[2], TOL[F64], name="grad_weight")


# ----------------------------------------------------------------------------------------
# Registration, input checks
# ----------------------------------------------------------------------------------------
def test_schemas_match_the_cpp_contract():
    check_schemas(T.__all__, 2)


def test_opcheck_schema():
    module, x, gy = make_inputs((2, 6, 2, 3, 2), F64, "channels_last")
    weight, bias = (t.detach() for t in op_weights(module))
    _, a = ops.softmax_spatial(x, weight, bias, True)
    torch.library.opcheck(ops.softmax_spatial.default, (x, weight, bias, True), test_utils=("test_schema",))
    torch.library.opcheck(ops.softmax_spatial_backward.default, (gy, x, weight, a, True), test_utils=("test_schema",))


@pytest.mark.skipif(INTERPRET, reason="fake tensors have no data for the Triton interpreter")
def test_opcheck_fake_gpu():
    module, x, gy = make_inputs((2, 6, 2, 3, 2), F32, "channels_last")
    weight, bias = (t.detach() for t in op_weights(module))
    _, a = ops.softmax_spatial(x, weight, bias, False)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.softmax_spatial.default, (x, weight, bias, False), test_utils=utils)
    torch.library.opcheck(ops.softmax_spatial_backward.default, (gy, x, weight, a, False), test_utils=utils)


def _fwd(**kw):
    args = dict(x=_t(2, 6, 3, 4), weight=_t(3, 6), bias=_t(3), rescale=True)
    args.update(kw)
    return ops.softmax_spatial(*args.values())


def _bwd(**kw):
    args = dict(grad_y=_t(2, 6, 3, 4), x=_t(2, 6, 3, 4), weight=_t(3, 6), a=_t(2, 3, 3, 4), rescale=True)
    args.update(kw)
    return ops.softmax_spatial_backward(*args.values())


OP, BW = "softmax_spatial", "softmax_spatial_backward"
BAD_INPUTS = [
    (lambda: _fwd(x=_t(2, 6, 3)), ValueError, rf"{OP}: x must be 4-D \(N, C, H, W\), got 3-D"),
    (lambda: _fwd(x=_t(0, 6, 3, 4)), ValueError, rf"{OP}: x must not be empty"),
    (lambda: _fwd(x=torch.ones(2, 6, 3, 4, dtype=torch.int32, device=DEVICE)), TypeError,
     rf"{OP}: x must be a floating-point tensor, got Int"),
    (lambda: _fwd(weight=_t(3, 5)), ValueError,
     rf"{OP}: weight must have shape \(g, C\) = \(g, 6\) with g dividing C, got \[3, 5\]"),
    (lambda: _fwd(weight=_t(4, 6), bias=_t(4)), ValueError, rf"{OP}: weight must have shape \(g, C\)"),
    (lambda: _fwd(weight=_t(18)), ValueError, rf"{OP}: weight must have shape \(g, C\)"),
    (lambda: _fwd(bias=_t(6)), ValueError, rf"{OP}: bias must hold g = 3 values, got shape \[6\]"),
    (lambda: _fwd(bias=torch.ones(3, dtype=torch.int64, device=DEVICE)), TypeError,
     rf"{OP}: bias must be a floating-point tensor"),
    (lambda: _fwd(weight=torch.ones(3, 6, device="meta")), ValueError, rf"{OP}: weight must be on \w+(:\d+)?, got meta"),
    (lambda: _bwd(grad_y=_t(2, 6, 4, 3)), ValueError,
     rf"{BW}: grad_y must match x's shape \[2, 6, 3, 4\] and dtype Float, got \[2, 6, 4, 3\] Float"),
    (lambda: _bwd(a=_t(2, 2, 3, 4)), ValueError, rf"{BW}: a must have shape \(N, 3, H, W\) = \(2, 3, 3, 4\)"),
    (lambda: _bwd(a=_t(2, 3, 3, 4, dtype=F64)), TypeError,
     rf"{BW}: a must be Float \(the accumulation dtype of x, Float\), got Double"),
    (lambda: _bwd(grad_y=torch.ones(2, 6, 3, 4, device="meta")), ValueError,
     rf"{BW}: grad_y must be on \w+(:\d+)?, got meta"),
]


@pytest.mark.parametrize("call,error,pattern", bad_input_params(BAD_INPUTS))
def test_bad_inputs(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


# ----------------------------------------------------------------------------------------
# GPU only: half precision, benchmark sizes
# ----------------------------------------------------------------------------------------
@pytest.mark.skipif(INTERPRET, reason="half precision on GPU only")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=dtype_id)
def test_half_gpu(dtype, layout):
    """fp16/bf16 x and module: the error against fp64 at most twice the error of the reference
    module in that dtype (plus a rounding's worth)."""
    for shape in [(2, 256, 14, 14, 1), (2, 24, 5, 3, 3), (1, 96, 7, 9, 96)]:
        module, x, gy = make_inputs(shape, F64, layout)
        truth, _ = reference(module, x, gy)
        low = module.to(dtype)
        ours, _ = run_ops(low, x.to(dtype), gy.to(dtype))
        theirs, _ = reference(low, x.to(dtype), gy.to(dtype))
        within_half_budget(NAMES[:3], ours[:3], theirs[:3], truth[:3], dtype)


@pytest.mark.skipif(INTERPRET, reason="GPU sizes")
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_benchmark_sizes_gpu(dtype):
    """The benchmark's C = 256 at 28 x 28, g = 1 and g = 8."""
    for shape in [(4, 256, 28, 28, 1), (2, 256, 28, 28, 8)]:
        compare(make_inputs(shape, dtype, "channels_last"))
