"""Triton backend of the channel_gate hot path against plain PyTorch formulas of the same math.

The ops are called directly (`torch.ops.attnkernels_triton.channel_*`). The contract is
csrc/channel_gate_ops.cpp (and docs/contract.md#shared-rules). Without CUDA the
kernels run on CPU tensors under the Triton interpreter: shapes stay tiny.
"""
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
    acc_of,
    bad_input_params,
    check_schemas,
    data,
    dtype_id,
    expected_format,
    make_t,
    ops,
    shape_id,
)
from triton_cases import close as _close
from triton_cases import randn as _t

from attnkernels.ops.channel_gate import GateMode
from attnkernels.triton import channel_gate as T

# The interpreter has no bf16.
X_DTYPES = [F64, F32, F16] + ([] if INTERPRET else [BF16])
TOL = {
    F64: dict(rtol=1e-12, atol=1e-12),
    F32: dict(rtol=1e-5, atol=1e-6),
    F16: dict(rtol=2e-3, atol=1e-3),
    BF16: dict(rtol=1.6e-2, atol=1e-2),
}

# (N, C, H, W): C not a power of two, H != W, HW = 1, N = 1, H = 1, W = 1.
SHAPES = [(2, 24, 7, 5), (1, 13, 3, 4), (2, 5, 1, 1), (2, 7, 1, 6), (1, 3, 5, 1)]
# triton_cases.make_t's: "sliced_all" slices N, C, H and W (the kernels' non-flat (h, w)
# addressing when H, W > 1); "sliced_channels_last" slices a channels_last tensor.
LAYOUTS = ["nchw", "channels_last", "sliced_all", "sliced_channels_last"]
# triton_cases.data's kinds: random; small integers (repeated maxima everywhere, constant
# channels); ReLU'd data (channels whose maximum is a run of zeros, all-zero channels).
KINDS = ["randn", "ties", "sparse"]
AVG, MAX, MIX = (int(m) for m in GateMode)  # the ops' int mode
MODES = [AVG, MAX, MIX]


# ----------------------------------------------------------------------------------------
# Plain PyTorch formulas of the contract
# ----------------------------------------------------------------------------------------
def ref_pool(x):
    xa = x.to(acc_of(x.dtype))
    return xa.mean(dim=(2, 3)), xa.amax(dim=(2, 3))


def ref_pool_backward(grad_avg, grad_max, x, mx):
    """grad_avg/(H*W) + [x == max] * grad_max/count, written out with an explicit tie count.
    A max that equals no element (count 0, e.g. NaN) gives NaN, as torch.amax's backward."""
    xa = x.to(acc_of(x.dtype))
    g = grad_avg[:, :, None, None].expand_as(xa) / (x.shape[2] * x.shape[3])
    if grad_max is not None:
        tie = xa == mx[:, :, None, None]
        count = tie.sum(dim=(2, 3), keepdim=True)
        g = g + tie.to(xa.dtype) * (grad_max[:, :, None, None] / count)
    return g.to(x.dtype)


def autograd_pool_backward(grad_avg, grad_max, x):
    """torch's own gradient of mean and amax (amax splits ties evenly)."""
    xa = x.to(acc_of(x.dtype)).detach().requires_grad_()
    loss = (xa.mean(dim=(2, 3)) * grad_avg).sum()
    if grad_max is not None:
        loss = loss + (xa.amax(dim=(2, 3)) * grad_max).sum()
    (grad,) = torch.autograd.grad(loss, xa)
    return grad


def ref_features(avg, mx, alpha, beta, mode):
    if mode == AVG:
        return avg
    if mode == MAX:
        return mx
    return 0.5 * (avg + mx) + alpha * avg + beta * mx


def ref_gate(avg, mx, weight, alpha, beta, mode):
    f = ref_features(avg, mx, alpha, beta, mode)
    k = weight.numel()
    z = F.conv1d(f[:, None, :], weight.reshape(1, 1, k).to(f.dtype), padding=(k - 1) // 2)[:, 0]
    return torch.sigmoid(z)


def ref_gate_backward(grad_gate, avg, mx, weight, alpha, beta, mode):
    """Autograd of ref_gate: (grad_avg, grad_max, grad_weight, grad_alpha, grad_beta)."""
    acc = avg.dtype
    leaves = [avg, mx, weight] + ([alpha, beta] if mode == MIX else [])
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    a, m, w = leaves[:3]
    al, be = (leaves[3], leaves[4]) if mode == MIX else (None, None)
    gate = ref_gate(a, m, w.to(acc), al.to(acc) if al is not None else None,
                    be.to(acc) if be is not None else None, mode)
    grads = torch.autograd.grad(gate, leaves, grad_gate, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    if mode != MIX:
        zero = torch.zeros((), dtype=acc, device=avg.device)
        grads += [zero, zero]
    return grads


def ref_rescale(x, gate):
    acc = acc_of(x.dtype)
    return (x.to(acc) * gate.to(acc)[:, :, None, None]).to(x.dtype)


def ref_rescale_backward(grad_y, x, gate):
    acc = acc_of(x.dtype)
    grad_x = (grad_y.to(acc) * gate.to(acc)[:, :, None, None]).to(x.dtype)
    return grad_x, (grad_y.to(acc) * x.to(acc)).sum(dim=(2, 3))


# ----------------------------------------------------------------------------------------
# Inputs and checks
# ----------------------------------------------------------------------------------------
def assert_like_x(out, x):
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.is_contiguous(memory_format=expected_format(x))


def assert_nc(out, x_dtype, n, c):
    assert out.shape == (n, c) and out.dtype == acc_of(x_dtype) and out.is_contiguous()


def close(actual, expected, dtype, equal_nan=False):
    _close(actual, expected, TOL[dtype], equal_nan)


@pytest.fixture(params=["default_tiles", "small_tiles"])
def tiles(request, monkeypatch):
    """Small tiles force many channel blocks and H*W tiles, partial ones included."""
    if request.param == "small_tiles":
        monkeypatch.setattr(T, "_TILE_ELEMENTS", {F32: 16, F64: 16})
        monkeypatch.setattr(T, "_MAX_BLOCK_C_CHANNELS_LAST", 4)
    return request.param


# ----------------------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", X_DTYPES, ids=dtype_id)
def test_channel_pool(dtype, layout, shape):
    x = make_t(shape, dtype, layout)
    avg, mx = ops.channel_pool(x)
    ref_avg, ref_max = ref_pool(x)
    assert_nc(avg, dtype, *shape[:2])
    assert_nc(mx, dtype, *shape[:2])
    close(avg, ref_avg, acc_of(dtype))
    assert torch.equal(mx, ref_max)  # a max is exact


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_channel_pool_tiles(dtype, layout, tiles):
    for shape in [(2, 13, 5, 7), (1, 3, 5, 1)]:
        x = make_t(shape, dtype, layout)
        avg, mx = ops.channel_pool(x)
        ref_avg, ref_max = ref_pool(x)
        close(avg, ref_avg, dtype)
        assert torch.equal(mx, ref_max)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the interpreter's tl.max
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_channel_pool_nan_and_inf(layout, tiles):
    x = make_t((2, 6, 5, 7), F64, layout)
    x[0, 1, 4, 6] = float("nan")  # last element: NaN in the final tile
    x[1, 2, 0, 0] = float("nan")  # first element: NaN must survive later tiles
    x[1, 3] = float("nan")  # a whole channel
    x[0, 4] = float("-inf")
    x[1, 5, 2, 3] = float("inf")
    avg, mx = ops.channel_pool(x)
    ref_avg, ref_max = ref_pool(x)
    for n, c in [(0, 1), (1, 2), (1, 3)]:
        assert torch.isnan(mx[n, c]) and torch.isnan(avg[n, c])
    assert mx[0, 4] == float("-inf") and mx[1, 5] == float("inf")
    assert torch.isnan(mx).sum() == 3
    close(avg, ref_avg, F64, equal_nan=True)
    torch.testing.assert_close(mx, ref_max, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_channel_pool_backward(dtype, layout, shape, kind):
    n, c = shape[:2]
    x = make_t(shape, dtype, layout, kind=kind)
    grad_avg = data((n, c), dtype)
    grad_max = data((n, c), dtype)
    _, mx = ref_pool(x)
    grad_x = ops.channel_pool_backward(grad_avg, grad_max, x, mx)
    assert_like_x(grad_x, x)
    close(grad_x, ref_pool_backward(grad_avg, grad_max, x, mx), dtype)
    close(grad_x, autograd_pool_backward(grad_avg, grad_max, x).to(dtype), dtype)
    if kind != "randn" and shape[2] * shape[3] > 1:  # the data really has ties
        tie = x == mx[:, :, None, None]
        assert (tie.sum(dim=(2, 3)) > 1).any()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_channel_pool_backward_tiles(dtype, layout, tiles):
    for shape in [(2, 13, 5, 7), (1, 3, 5, 1)]:
        x = make_t(shape, dtype, layout, kind="ties")
        grad_avg, grad_max = data(shape[:2], dtype), data(shape[:2], dtype)
        _, mx = ref_pool(x)
        grad_x = ops.channel_pool_backward(grad_avg, grad_max, x, mx)
        assert_like_x(grad_x, x)
        close(grad_x, ref_pool_backward(grad_avg, grad_max, x, mx), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", X_DTYPES, ids=dtype_id)
def test_channel_pool_backward_without_grad_max(dtype, layout):
    shape = (2, 13, 3, 5)
    x = make_t(shape, dtype, layout)
    acc = acc_of(dtype)
    grad_avg = data(shape[:2], acc)
    _, mx = ref_pool(x)
    grad_x = ops.channel_pool_backward(grad_avg, None, x, mx)
    assert_like_x(grad_x, x)
    close(grad_x, ref_pool_backward(grad_avg, None, x, mx), dtype)


@pytest.mark.parametrize("dtype", X_DTYPES, ids=dtype_id)
def test_channel_pool_backward_low_precision_x(dtype):
    """x of any dtype: ties are found in acc(x), grad_x rounds to x's dtype."""
    shape = (2, 6, 4, 3)
    x = make_t(shape, dtype, "channels_last", kind="ties")
    acc = acc_of(dtype)
    grad_avg, grad_max = data(shape[:2], acc), data(shape[:2], acc)
    _, mx = ref_pool(x)
    grad_x = ops.channel_pool_backward(grad_avg, grad_max, x, mx)
    assert_like_x(grad_x, x)
    close(grad_x, ref_pool_backward(grad_avg, grad_max, x, mx), dtype)


def test_channel_pool_backward_max_is_any_value():
    """The max share goes to x == max for the max given, maximal or not (none: NaN, as 0/0)."""
    shape = (2, 6, 4, 5)
    x = make_t(shape, F64, "channels_last", kind="ties")
    _, true_max = ref_pool(x)
    mx = torch.randint(-2, 3, shape[:2]).to(dtype=F64, device=DEVICE)
    mx[0, 0] = 7.0  # equals no element
    assert (mx < true_max).any()
    grad_avg, grad_max = data(shape[:2], F64), data(shape[:2], F64)
    grad_x = ops.channel_pool_backward(grad_avg, grad_max, x, mx)
    close(grad_x, ref_pool_backward(grad_avg, grad_max, x, mx), F64, equal_nan=True)
    assert torch.isnan(grad_x[0, 0]).all()  # 7 equals no element of that plane


def test_channel_pool_backward_nan_max():
    """A NaN max ties with nothing: that plane's gradient is NaN, as torch.amax's backward;
    every other plane stays finite and matches torch's autograd."""
    shape = (2, 4, 3, 5)
    x = make_t(shape, F64, "nchw")
    x[1, 2, 1, 1] = float("nan")
    grad_avg, grad_max = data(shape[:2], F64), data(shape[:2], F64)
    _, mx = ref_pool(x)
    assert torch.isnan(mx[1, 2])
    grad_x = ops.channel_pool_backward(grad_avg, grad_max, x, mx)
    assert torch.isnan(grad_x[1, 2]).all() and torch.isnan(grad_x).sum() == 15
    close(grad_x, autograd_pool_backward(grad_avg, grad_max, x), F64, equal_nan=True)


def test_channel_pool_backward_strided_small_inputs():
    """(N, C) inputs need not be contiguous nor in the accumulation dtype."""
    shape = (2, 7, 3, 4)
    x = make_t(shape, F32, "nchw", kind="ties")
    grad_avg = data((2, 14), F64)[:, ::2]
    grad_max = data((7, 2), F32).t()
    _, mx = ref_pool(x)
    grad_x = ops.channel_pool_backward(grad_avg, grad_max, x, mx.t().contiguous().t())
    close(grad_x, ref_pool_backward(grad_avg.float(), grad_max, x, mx), F32)


# ----------------------------------------------------------------------------------------
# Gate
# ----------------------------------------------------------------------------------------
def gate_inputs(n, c, k, dtype, mode, weight_dtype=None, scalar_dtype=None):
    avg = data((n, c), dtype)
    mx = avg + data((n, c), dtype).abs()
    weight = data((1, 1, k), weight_dtype or dtype)
    alpha = beta = None
    if mode == MIX:
        alpha = torch.tensor(0.37, dtype=scalar_dtype or dtype, device=DEVICE)
        beta = torch.tensor(-0.21, dtype=scalar_dtype or dtype, device=DEVICE)
    return avg, mx, weight, alpha, beta


@pytest.mark.parametrize("c", [24, 13, 5])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_channel_gate(dtype, k, mode, c):
    avg, mx, weight, alpha, beta = gate_inputs(2, c, k, dtype, mode)
    gate = ops.channel_gate(avg, mx, weight, alpha, beta, mode)
    assert_nc(gate, dtype, 2, c)
    close(gate, ref_gate(avg, mx, weight, alpha, beta, mode), dtype)


@pytest.mark.parametrize("c", [24, 13, 5])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_channel_gate_backward(dtype, k, mode, c):
    avg, mx, weight, alpha, beta = gate_inputs(2, c, k, dtype, mode)
    gate = ref_gate(avg, mx, weight, alpha, beta, mode)
    grad_gate = data((2, c), dtype)
    out = ops.channel_gate_backward(grad_gate, gate, avg, mx, weight, alpha, beta, mode)
    ref = ref_gate_backward(grad_gate, avg, mx, weight, alpha, beta, mode)
    names = ["grad_avg", "grad_max", "grad_weight", "grad_alpha", "grad_beta"]
    for name, o, r in zip(names, out, ref):
        assert o.shape == r.shape and o.dtype == r.dtype, name
        close(o, r, dtype)
    assert_nc(out[0], dtype, 2, c)
    assert_nc(out[1], dtype, 2, c)
    assert out[3].dim() == 0 and out[4].dim() == 0
    # The gradient reaches exactly the inputs the mode uses.
    assert (out[0] != 0).any() == (mode != MAX)
    assert (out[1] != 0).any() == (mode != AVG)
    assert (out[3] != 0) == (mode == MIX)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n,c,k", [(1, 1, 3), (2, 1, 9), (2, 2, 9), (1, 4, 7), (3, 3, 5)])
def test_channel_gate_kernel_wider_than_channels(n, c, k, mode):
    """Zero padding when the conv kernel reaches past both channel ends."""
    avg, mx, weight, alpha, beta = gate_inputs(n, c, k, F64, mode)
    gate = ops.channel_gate(avg, mx, weight, alpha, beta, mode)
    close(gate, ref_gate(avg, mx, weight, alpha, beta, mode), F64)
    grad_gate = data((n, c), F64)
    out = ops.channel_gate_backward(grad_gate, gate, avg, mx, weight, alpha, beta, mode)
    for o, r in zip(out, ref_gate_backward(grad_gate, avg, mx, weight, alpha, beta, mode)):
        close(o, r, F64)


def test_channel_gate_many_samples(monkeypatch):
    """grad_weight's per-sample partials summed over more samples than one reduction block."""
    monkeypatch.setattr(T, "_SUM_ROWS_ELEMENTS", 32)  # blocks of 4 samples
    assert T._sum_rows_blocks(7) == (4, 8)
    n, c, k, mode = 11, 6, 5, 2
    avg, mx, weight, alpha, beta = gate_inputs(n, c, k, F64, mode)
    gate = ops.channel_gate(avg, mx, weight, alpha, beta, mode)
    close(gate, ref_gate(avg, mx, weight, alpha, beta, mode), F64)
    grad_gate = data((n, c), F64)
    out = ops.channel_gate_backward(grad_gate, gate, avg, mx, weight, alpha, beta, mode)
    for o, r in zip(out, ref_gate_backward(grad_gate, avg, mx, weight, alpha, beta, mode)):
        close(o, r, F64)


def test_channel_gate_parameter_dtypes():
    """grad_weight in weight's dtype, grad_alpha/grad_beta 0-dim in alpha's/beta's dtype."""
    avg, mx, weight, alpha, beta = gate_inputs(2, 9, 3, F32, MIX, weight_dtype=F16, scalar_dtype=F64)
    beta = beta.to(F16)
    gate = ops.channel_gate(avg, mx, weight, alpha, beta, MIX)
    ref = ref_gate(avg, mx, weight.float(), alpha.float(), beta.float(), MIX)
    assert gate.dtype == F32
    close(gate, ref, F32)
    grad_gate = data((2, 9), F32)
    g_avg, g_max, g_w, g_a, g_b = ops.channel_gate_backward(grad_gate, gate, avg, mx, weight, alpha, beta, MIX)
    assert g_avg.dtype == F32 and g_max.dtype == F32
    assert g_w.dtype == F16 and g_w.shape == weight.shape
    assert g_a.dtype == F64 and g_a.dim() == 0
    assert g_b.dtype == F16 and g_b.dim() == 0
    r = ref_gate_backward(grad_gate, avg, mx, weight.float(), alpha.float(), beta.float(), MIX)
    close(g_avg, r[0], F32)
    close(g_max, r[1], F32)
    close(g_w, r[2].to(F16), F16)
    close(g_a, r[3].double(), F32)
    close(g_b, r[4].to(F16), F16)


def test_channel_gate_weight_shapes_and_strided_inputs():
    """weight of any shape holding k elements; (N, C) inputs of any strides."""
    n, c, k = 2, 11, 5
    avg = data((n, 2 * c), F64)[:, ::2]
    mx = data((c, n), F64).t()
    weight = data((k,), F64)
    for mode in MODES:
        alpha = beta = None
        if mode == MIX:
            alpha = torch.tensor(0.2, dtype=F64, device=DEVICE)
            beta = torch.tensor(0.6, dtype=F64, device=DEVICE)
        gate = ops.channel_gate(avg, mx, weight, alpha, beta, mode)
        close(gate, ref_gate(avg, mx, weight, alpha, beta, mode), F64)
        grad_gate = data((n, 2 * c), F64)[:, 1::2]
        gate_t = gate.t().contiguous().t()  # column-major
        out = ops.channel_gate_backward(grad_gate, gate_t, avg, mx, weight, alpha, beta, mode)
        assert out[2].shape == (k,)
        for o, r in zip(out, ref_gate_backward(grad_gate, avg, mx, weight, alpha, beta, mode)):
            close(o, r, F64)


@pytest.mark.parametrize("mode", MODES)
def test_channel_gate_nan_propagates(mode):
    """A NaN feature poisons exactly the gates whose conv window covers it, as conv1d does."""
    avg, mx, weight, alpha, beta = gate_inputs(2, 12, 5, F64, mode)
    avg[0, 6] = float("nan")
    mx[1, 0] = float("nan")
    gate = ops.channel_gate(avg, mx, weight, alpha, beta, mode)
    ref = ref_gate(avg, mx, weight, alpha, beta, mode)
    torch.testing.assert_close(gate, ref, rtol=1e-12, atol=1e-12, equal_nan=True)
    expected = {0: 5, 1: 3, 2: 8}[mode]
    assert torch.isnan(gate).sum() == expected


# ----------------------------------------------------------------------------------------
# Rescale
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", X_DTYPES, ids=dtype_id)
def test_channel_rescale(dtype, layout, shape):
    x = make_t(shape, dtype, layout)
    gate = torch.rand(shape[:2], dtype=acc_of(dtype), device=DEVICE)
    y = ops.channel_rescale(x, gate)
    assert_like_x(y, x)
    close(y, ref_rescale(x, gate), dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", X_DTYPES, ids=dtype_id)
def test_channel_rescale_backward(dtype, layout, shape):
    x = make_t(shape, dtype, layout)
    # grad_y in its own layout: NCHW when x is channels_last and vice versa.
    grad_y = data(shape, dtype)
    if layout in ("nchw", "sliced"):
        grad_y = grad_y.to(memory_format=torch.channels_last)
    gate = torch.rand(shape[:2], dtype=acc_of(dtype), device=DEVICE)
    grad_x, grad_gate = ops.channel_rescale_backward(grad_y, x, gate)
    ref_gx, ref_gg = ref_rescale_backward(grad_y, x, gate)
    assert_like_x(grad_x, x)
    assert_nc(grad_gate, dtype, *shape[:2])
    close(grad_x, ref_gx, dtype)
    close(grad_gate, ref_gg, acc_of(dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_channel_rescale_tiles(dtype, layout, tiles):
    for shape in [(2, 13, 5, 7), (1, 3, 5, 1)]:
        x = make_t(shape, dtype, layout)
        grad_y = make_t(shape, dtype, layout)
        gate = torch.rand(shape[:2], dtype=dtype, device=DEVICE)
        close(ops.channel_rescale(x, gate), ref_rescale(x, gate), dtype)
        grad_x, grad_gate = ops.channel_rescale_backward(grad_y, x, gate)
        ref_gx, ref_gg = ref_rescale_backward(grad_y, x, gate)
        close(grad_x, ref_gx, dtype)
        close(grad_gate, ref_gg, dtype)


def test_channel_rescale_gate_dtype():
    """The product is taken in acc(x) whatever the gate's dtype."""
    x = make_t((2, 5, 3, 3), F32, "nchw")
    gate = torch.rand((2, 5), dtype=F64, device=DEVICE)
    y = ops.channel_rescale(x, gate)
    assert y.dtype == F32
    close(y, ref_rescale(x, gate.float()), F32)


# ----------------------------------------------------------------------------------------
# End to end, determinism, registration, input checks
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_chain_matches_autograd(layout, mode):
    """pool -> gate -> rescale and the chain of backward ops equal autograd of the formulas."""
    shape, k = (2, 10, 4, 3), 3
    x = make_t(shape, F64, layout, kind="ties")
    _, _, weight, alpha, beta = gate_inputs(2, 10, k, F64, mode)
    grad_y = data(shape, F64)

    avg, mx = ops.channel_pool(x)
    gate = ops.channel_gate(avg, mx, weight, alpha, beta, mode)
    y = ops.channel_rescale(x, gate)
    grad_x1, grad_gate = ops.channel_rescale_backward(grad_y, x, gate)
    g_avg, g_max, g_w, g_a, g_b = ops.channel_gate_backward(
        grad_gate, gate, avg, mx, weight, alpha, beta, mode
    )
    grad_x = grad_x1 + ops.channel_pool_backward(g_avg, g_max if mode != AVG else None, x, mx)

    leaves = [x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
    if mode == MIX:
        leaves += [alpha.detach().clone().requires_grad_(), beta.detach().clone().requires_grad_()]
    xr, wr = leaves[:2]
    ar, br = (leaves[2], leaves[3]) if mode == MIX else (None, None)
    ref_y = xr * ref_gate(xr.mean(dim=(2, 3)), xr.amax(dim=(2, 3)), wr, ar, br, mode)[:, :, None, None]
    ref_grads = torch.autograd.grad(ref_y, leaves, grad_y)
    close(y, ref_y, F64)
    close(grad_x, ref_grads[0], F64)
    close(g_w, ref_grads[1], F64)
    if mode == MIX:
        close(g_a, ref_grads[2], F64)
        close(g_b, ref_grads[3], F64)


def test_deterministic():
    """Same input, same output, bit for bit."""
    x = make_t((2, 13, 5, 7), F32, "channels_last")
    avg, mx, weight, alpha, beta = gate_inputs(5, 13, 5, F32, MIX)
    grad_gate = data((5, 13), F32)
    gate = ref_gate(avg, mx, weight, alpha, beta, MIX)
    runs = []
    for _ in range(2):
        p = ops.channel_pool(x)
        pb = ops.channel_pool_backward(p[0], p[1], x, p[1])
        g = ops.channel_gate(avg, mx, weight, alpha, beta, MIX)
        gb = ops.channel_gate_backward(grad_gate, gate, avg, mx, weight, alpha, beta, MIX)
        rb = ops.channel_rescale_backward(x, x, p[0])
        runs.append([*p, pb, g, *gb, *rb])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_schemas_match_the_cpp_contract():
    """Every op is registered under attnkernels_triton with the C++ library's schema: the six
    kernels', and channel_attention's and channel_mlp_attention's, which the C++ library runs
    per sample on CPU and the Triton namespace composes from the three ops (registered on
    import, from attnkernels.ops.channel_gate)."""
    check_schemas(T.__all__ + ["channel_attention", "channel_mlp_attention"], 8)


def test_opcheck_schema():
    x = make_t((2, 6, 3, 4), F64, "channels_last")
    torch.library.opcheck(ops.channel_pool.default, (x,), test_utils=("test_schema",))
    avg, mx = ops.channel_pool(x)
    weight = data((3,), F64)
    alpha = torch.tensor(0.3, dtype=F64, device=DEVICE)
    beta = torch.tensor(0.1, dtype=F64, device=DEVICE)
    gate = ops.channel_gate(avg, mx, weight, alpha, beta, MIX)
    torch.library.opcheck(
        ops.channel_gate_backward.default,
        (torch.rand_like(gate), gate, avg, mx, weight, alpha, beta, MIX),
        test_utils=("test_schema",),
    )


@pytest.mark.skipif(INTERPRET, reason="fake tensors have no data for the Triton interpreter (DESIGN.md)")
def test_opcheck_full_gpu():
    x = make_t((2, 6, 3, 4), F32, "channels_last")
    avg, mx = ops.channel_pool(x)
    weight = data((3,), F32)
    alpha, beta = torch.tensor(0.3, device=DEVICE), torch.tensor(0.1, device=DEVICE)
    gate = ops.channel_gate(avg, mx, weight, alpha, beta, MIX)
    cases = [
        (ops.channel_pool, (x,)),
        (ops.channel_pool_backward, (avg, mx, x, mx)),
        (ops.channel_pool_backward, (avg, None, x, mx)),
        (ops.channel_gate, (avg, mx, weight, alpha, beta, MIX)),
        (ops.channel_gate, (avg, mx, weight, None, None, AVG)),
        (ops.channel_gate_backward, (torch.rand_like(gate), gate, avg, mx, weight, alpha, beta, MIX)),
        (ops.channel_gate_backward, (torch.rand_like(gate), gate, avg, mx, weight, None, None, MAX)),
        (ops.channel_rescale, (x, gate)),
        (ops.channel_rescale_backward, (torch.randn_like(x), x, gate)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args)


BAD_INPUTS = [
    (lambda: ops.channel_pool(_t(2, 3, 4)), ValueError,
     r"channel_pool: x must be 4-D \(N, C, H, W\), got 3-D"),
    (lambda: ops.channel_pool(torch.ones(2, 3, 4, 4, dtype=torch.int64, device=DEVICE)), TypeError,
     r"channel_pool: x must be a floating-point tensor, got Long"),
    (lambda: ops.channel_pool(_t(2, 3, 0, 4)), ValueError, r"channel_pool: x must not be empty"),
    (lambda: ops.channel_pool_backward(_t(2, 4), _t(2, 3), _t(2, 3, 4, 4), _t(2, 3)), ValueError,
     r"channel_pool_backward: grad_avg must have shape \(N, C\) = \(2, 3\), got \[2, 4\]"),
    (lambda: ops.channel_pool_backward(_t(2, 3), None, _t(2, 3, 4, 4), _t(3, 3)), ValueError,
     r"channel_pool_backward: max must have shape \(N, C\)"),
    (lambda: ops.channel_pool_backward(_t(2, 3), _t(2, 3), _t(2, 3, 4), _t(2, 3)), ValueError,
     r"channel_pool_backward: x must be 4-D"),
    (lambda: ops.channel_gate(_t(2, 3, 1), _t(2, 3), _t(3), None, None, AVG), ValueError,
     r"channel_gate: avg must be \(N, C\), got \[2, 3, 1\]"),
    (lambda: ops.channel_gate(_t(2, 3), _t(2, 4), _t(3), None, None, AVG), ValueError,
     r"channel_gate: max must match avg's shape \[2, 3\] and dtype Float, got \[2, 4\] Float"),
    (lambda: ops.channel_gate(_t(2, 3), _t(2, 3), _t(1, 1, 4), None, None, AVG), ValueError,
     r"channel_gate: weight must hold an odd number of taps, got 4"),
    (lambda: ops.channel_gate(_t(2, 3), _t(2, 3), _t(3), None, None, 3), ValueError,
     r"channel_gate: mode must be 0 \(avg\), 1 \(max\) or 2 \(mix\), got 3"),
    (lambda: ops.channel_gate(_t(2, 3), _t(2, 3), _t(3), None, _t(), MIX), ValueError,
     r"channel_gate: mode 2 \(mix\) needs alpha and beta"),
    (lambda: ops.channel_gate(_t(2, 3), _t(2, 3), _t(3), _t(), _t(2), MIX), ValueError,
     r"channel_gate: alpha and beta must hold one value each"),
    (lambda: ops.channel_gate_backward(_t(2, 3), _t(3, 3), _t(2, 3), _t(2, 3), _t(3), None, None, AVG),
     ValueError, r"channel_gate_backward: grad_gate and gate must match avg's shape \[2, 3\] and dtype Float"),
    (lambda: ops.channel_gate_backward(_t(2, 3), _t(2, 3), _t(2, 3), _t(2, 3), _t(2), None, None, AVG),
     ValueError, r"channel_gate_backward: weight must hold an odd number"),
    (lambda: ops.channel_rescale(_t(2, 3, 4, 4), _t(2, 3, 1, 1)), ValueError,
     r"channel_rescale: gate must have shape \(N, C\) = \(2, 3\), got \[2, 3, 1, 1\]"),
    (lambda: ops.channel_rescale(_t(2, 3, 4, 4), torch.ones(2, 3, dtype=torch.int32, device=DEVICE)),
     TypeError, r"channel_rescale: gate must be a floating-point tensor"),
    (lambda: ops.channel_rescale(_t(2, 3, 4, 4), torch.ones(2, 3, device="meta")), ValueError,
     r"channel_rescale: gate must be on \w+(:\d+)?, got meta"),
    (lambda: ops.channel_rescale_backward(_t(2, 3, 4, 5), _t(2, 3, 4, 4), _t(2, 3)), ValueError,
     r"channel_rescale_backward: grad_y must match x's shape \[2, 3, 4, 4\] and dtype Float, "
     r"got \[2, 3, 4, 5\] Float"),
]


@pytest.mark.parametrize("call,error,pattern", bad_input_params(BAD_INPUTS))
def test_bad_inputs(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


# ----------------------------------------------------------------------------------------
# Tile configurations measured on a GPU (attnkernels.choose; the clock is fake here)
# ----------------------------------------------------------------------------------------
def tile_configs(x):
    """The candidate tile configurations of the per-(n, channel block) kernels for x."""
    from attnkernels.triton import _common

    acc = acc_of(x.dtype)
    return _common._tile_candidates(lambda e: T._tiles(x, acc, e), T._TILE_ELEMENTS[acc], T._tile_warps)


def test_tile_configurations_are_measured(monkeypatch):
    """Where launches are measured (GPUs), each op's first call at a new shape times every
    candidate tile configuration and keeps the fastest: later calls launch it alone, its
    results match the reference, explain() lists it, and static mode keeps the rule's."""
    from attnkernels import choose
    from attnkernels.triton import _common

    monkeypatch.setenv(choose.ENV_MODE, "measure")
    monkeypatch.delenv(choose.ENV_FILE, raising=False)
    monkeypatch.setattr(_common, "_measures_launches", lambda device: True)
    timed: list[str] = []

    def fake_time(name, run, device):  # the last candidate is the fastest
        run()
        timed.append(name)
        return 1e-3 / (1 + list(tile_configs(x)).index(name))

    monkeypatch.setattr(_common, "_time_launch", fake_time)
    # The CPU's program target on a GPU too: a GPU's (2 per SM) shrinks every candidate's
    # channel block to 1, and the three collapse into one.
    monkeypatch.setattr(T, "_min_programs", lambda device: 1)
    choose.clear()
    try:
        x = make_t((2, 24, 9, 9), F32, "nchw")
        names = list(tile_configs(x))
        assert names == ["16x128/4w", "8x128/4w", "32x128/8w"]  # the rule's first
        gate = torch.rand(2, 24, dtype=F32, device=x.device)
        for _ in range(2):
            avg, mx = ops.channel_pool(x)
            y = ops.channel_rescale(x, gate)
        assert set(timed) == set(names)  # measured once per op: the second call timed nothing
        assert len(timed) == 2 * len(names) * (1 + choose.MAX_ROUNDS)
        ref_avg, ref_max = ref_pool(x)
        close(avg, ref_avg, F32)
        assert torch.equal(mx, ref_max)
        close(y, ref_rescale(x, gate), F32)

        def unlisted(*args):
            raise AssertionError("a known shape's launch listed the candidates again")

        monkeypatch.setattr(_common, "_tile_candidates", unlisted)  # a known key is a lookup
        assert torch.equal(ops.channel_pool(x)[0], avg) and torch.equal(ops.channel_rescale(x, gate), y)
        assert f"triton.channel_pool [float32 2 24 9 9 nchw]: {names[-1]} (measured" in choose.explain()
        with choose.mode("static"):
            assert choose.pick_name("triton.channel_pool", ("float32", 2, 24, 9, 9, "nchw"), tuple(names),
                                    names[0], fake_time, lambda: True) == names[0]
    finally:
        choose.clear()


def test_every_candidate_launches_for_the_ahead_of_time_check(monkeypatch):
    """scripts/triton_aot/bench_launches.py sets LAUNCH_EVERY_CANDIDATE so that each
    configuration a GPU may measure is recorded and compiled; the result is the rule's."""
    from attnkernels.triton import _common

    launched = []
    real = _common._launch_measured

    def spy(site, x, tiles, tile, warps, launch):
        def counted(**config):
            launched.append(config["block_hw"])
            launch(**config)
        real(site, x, tiles, tile, warps, counted)

    monkeypatch.setattr(T, "_launch_measured", spy)
    monkeypatch.setattr(_common, "LAUNCH_EVERY_CANDIDATE", True)
    x = make_t((2, 24, 7, 5), F32, "nchw")
    avg, _ = ops.channel_pool(x)
    configs = list(tile_configs(x).values())
    assert launched == [c["block_hw"] for c in configs[1:]] + [configs[0]["block_hw"]]
    close(avg, ref_pool(x)[0], F32)
