"""channel_gate on every backend: fused modules and ops against the reference modules.

Backends under test: the C++ kernels (`cpu`), Triton under the interpreter (`triton`, tiny
shapes: the interpreter is slow), the plain-PyTorch `reference` path, and on a GPU the CUDA
kernels and Triton. A backend that should be available here and is not fails the test (the
selection raises); only CUDA skips, on machines without a GPU.
"""
from __future__ import annotations

import pytest
import torch
from helpers import (
    LAYOUTS,
    assert_bitwise_equal,
    assert_error_like_eager,
    assert_keeps_reference_interface,
    assert_matches,
    backend_cases,
    compiled_and_eager,
    forward_backward,
    fused_pair,
    leaf,
    load_ops,
    low_precision_runs,
    make_input,
    needs_gpu,
)

from attnkernels import backend
from attnkernels import functional as AF
from attnkernels import nn as fused
from attnkernels import reference as R
from attnkernels.reference.formulas import accumulate_dtype

CASES = backend_cases(cpu=("cpu", "triton", "reference"), cuda=("cuda", "triton", "reference"))

# The interpreter runs Triton one program at a time in Python: small shapes only there.
SHAPES = {
    "small": [(2, 24, 7, 5), (1, 40, 3, 4), (3, 16, 1, 1), (2, 3, 6, 6)],
    "tiny": [(2, 12, 5, 3), (1, 5, 1, 1), (2, 3, 4, 4)],
}
MODULES = {"eca": (fused.ECA, R.ECA), "se": (fused.SE, R.SE)}


def shapes_for(backend_name: str, device: str) -> list[tuple]:
    return SHAPES["tiny" if backend_name == "triton" and device == "cpu" else "small"]


def fused_and_reference(name: str, channels: int, dtype: torch.dtype, device: str, **kwargs):
    return fused_pair(*MODULES[name], channels, dtype=dtype, device=device, **kwargs)


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_module_matches_reference(backend_name, device, name, dtype, layout) -> None:
    for shape in shapes_for(backend_name, device):
        f, ref = fused_and_reference(name, shape[1], dtype, device)
        x = make_input(shape, layout, dtype, device)
        g = torch.randn(shape, dtype=dtype, device=device)
        out_f = forward_backward(f, x, g, backend_name)
        assert_matches(out_f, forward_backward(ref, x, g), dtype)
        if layout == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1:
            assert out_f[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("k", [1, 3, 5, 7, 9])
def test_eca_kernel_sizes(backend_name, device, k) -> None:
    shape = (2, 6, 4, 3) if backend_name == "triton" else (2, 19, 5, 6)
    f, ref = fused_and_reference("eca", shape[1], torch.float64, device, kernel_size=k)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    g = torch.randn_like(x)
    assert_matches(forward_backward(f, x, g, backend_name), forward_backward(ref, x, g), torch.float64)


def gate_reference(x, weight, alpha, beta, mode: str) -> torch.Tensor:
    """The gate of docs/contract.md (#eca, #ham) in plain torch: ECA's pooling (avg), max pooling, or HAM's mix."""
    a, m = x.mean((2, 3)), x.amax((2, 3))
    pooled = {"avg": a, "max": m, "mix": 0.5 * (a + m) + alpha * a + beta * m}[mode]
    k = weight.numel()
    z = torch.nn.functional.conv1d(pooled[:, None], weight.view(1, 1, k), padding=(k - 1) // 2)
    return torch.sigmoid(z[:, 0])


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("mode", ["avg", "max", "mix"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gate_modes_and_all_gradients(backend_name, device, mode, layout) -> None:
    """channel_pool + channel_gate + channel_rescale vs the reference, with gradients to
    x, the conv weight, and (mix) alpha and beta."""
    shape = (2, 7, 3, 5) if backend_name == "triton" else (3, 33, 6, 5)
    x = make_input(shape, layout, torch.float64, device)
    params = [torch.randn(5, dtype=torch.float64, device=device), torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)]
    params = [p.to(device).requires_grad_() for p in params]
    g = torch.randn(shape, dtype=torch.float64, device=device)

    def run(fn):
        xx = x.detach().clone().requires_grad_()
        for p in params:
            p.grad = None
        y = fn(xx)
        y.backward(g)
        used = params if mode == "mix" else params[:1]
        return y.detach(), [xx.grad] + [p.grad for p in used]

    w, alpha, beta = params
    with backend.use_backend(backend_name):
        out_fused = run(lambda xx: AF.channel_attention(xx, w, alpha, beta, mode))
    out_ref = run(lambda xx: xx * gate_reference(xx, w, alpha, beta, mode)[:, :, None, None])
    assert_matches(out_fused, out_ref, torch.float64)


@pytest.mark.parametrize("backend_name,device", CASES)
def test_max_pool_ties_share_the_gradient(backend_name, device) -> None:
    """Repeated maxima (integers, ReLU zeros) split grad_max evenly, as torch.amax."""
    shape = (2, 5, 4, 3)
    x = torch.randint(-2, 3, shape, device=device).double().relu()
    x[0, 1] = 1.0  # a whole plane tied
    grad_avg = torch.randn(shape[:2], dtype=torch.float64, device=device)
    grad_max = torch.randn(shape[:2], dtype=torch.float64, device=device)

    def grads(pool):
        xx = x.clone().requires_grad_()
        avg, mx = pool(xx)
        (avg * grad_avg + mx * grad_max).sum().backward()
        return avg.detach(), mx.detach(), xx.grad

    with backend.use_backend(backend_name):
        got = grads(AF.channel_pool)
    expected = grads(lambda t: (t.mean((2, 3)), t.amax((2, 3))))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend_name,device", CASES)
def test_se_propagates_nan_like_the_reference(backend_name, device) -> None:
    """A NaN in x[n] makes SE's pooled row, MLP, gate and so all of y[n] NaN, as the reference
    does (the CPU per-sample kernel's ReLU once mapped the NaN to 0: one NaN element only)."""
    f, r = fused_pair(fused.SE, R.SE, 16, dtype=torch.float64, device=device)
    x = torch.randn(4, 16, 5, 5, dtype=torch.float64, device=device)
    x[1, 3, 2, 2] = float("nan")
    with torch.no_grad(), backend.use_backend(backend_name):
        y = f(x)
    with torch.no_grad():
        want = r(x)
    assert torch.isnan(want[1]).all() and torch.isfinite(want[[0, 2, 3]]).all()
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("backend_name,device", CASES)
def test_max_pool_propagates_nan(backend_name, device) -> None:
    """A NaN makes its plane's avg and max NaN, and (as torch.amax) its max gradient NaN."""
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, device=device)
    x[1, 2, 3, 1] = float("nan")
    g_avg, g_max = torch.randn(2, 3, dtype=torch.float64, device=device), torch.randn(2, 3, dtype=torch.float64, device=device)

    def run(pool):
        xx = x.clone().requires_grad_()
        avg, mx = pool(xx)
        (avg * g_avg + mx * g_max).sum().backward()
        return avg.detach(), mx.detach(), xx.grad

    with backend.use_backend(backend_name):
        avg, mx, grad = run(AF.channel_pool)
    assert torch.isnan(mx[1, 2]) and torch.isnan(avg[1, 2])
    assert torch.isfinite(mx[0]).all() and torch.isfinite(mx[1, :2]).all()
    expected = run(lambda t: (t.mean((2, 3)), t.amax((2, 3))))
    for got, want in zip((avg, mx, grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert torch.isnan(grad[1, 2]).all() and torch.isfinite(grad[0]).all()


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_max_pool_special_values_in_every_lane(backend_name, device, dtype, layout) -> None:
    """The CPU pool's vector max ignores NaN and finds it through a NaN sum instead: a NaN at
    any position of a plane (vector body, unrolled steps, tail) gives a NaN max; +inf and -inf
    together (a NaN sum without a NaN) and sums that overflow to +inf and -inf keep the true
    max; everything as torch.amax and mean give it. H*W = 71 and C = 37 leave tails in both
    layouts."""
    positions = [0, 7, 8, 31, 32, 63, 64, 70]
    x = torch.randn(len(positions) + 3, 37, 1, 71, dtype=torch.float64)
    for n, p in enumerate(positions):  # sample n: a NaN at pixel p of channel n (and channel 36)
        x[n, n, 0, p] = x[n, 36, 0, 70 - p] = float("nan")
    k = len(positions)
    x[k, :, 0, 5], x[k, :, 0, 40] = float("inf"), float("-inf")  # NaN sums, no NaN
    big = torch.finfo(dtype).max / 2
    x[k + 1, :, 0, ::2], x[k + 1, :, 0, 1::2] = big, -big  # partial sums overflow both ways
    x[k + 1, :, 0, 69] = -0.5 * big
    x[k + 2, :, 0, 3] = float("-inf")  # -inf alone: a -inf mean, the max of the rest
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = x.to(dtype=dtype, device=device).contiguous(memory_format=fmt)
    with backend.use_backend(backend_name):
        avg, mx = AF.channel_pool(x)
    wide = x.to(accumulate_dtype(dtype))
    torch.testing.assert_close(mx, wide.amax((2, 3)), rtol=0, atol=0, equal_nan=True)
    for n in range(k):
        assert torch.isnan(mx[n, n]) and torch.isnan(mx[n, 36])
    assert torch.isinf(mx[k]).all() and (mx[k] > 0).all() and torch.isnan(avg[k]).all()
    assert not torch.isnan(mx[k + 1]).any()
    rows = [n for n in range(x.shape[0]) if n != k + 1]  # where sums overflow, the order decides
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(avg[rows], wide.mean((2, 3))[rows], rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("mode", ["avg", "max", "mix"])
def test_gradcheck(backend_name, device, mode) -> None:
    x = torch.randn(2, 5, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    alpha = torch.tensor(0.4, dtype=torch.float64, device=device, requires_grad=True)
    beta = torch.tensor(0.7, dtype=torch.float64, device=device, requires_grad=True)
    with backend.use_backend(backend_name):
        assert torch.autograd.gradcheck(
            lambda x, w, a, b: AF.channel_attention(x, w, a, b, mode), (x, w, alpha, beta), eps=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("name", list(MODULES))
def test_deterministic(backend_name, device, name) -> None:
    shape = (2, 12, 5, 3) if backend_name == "triton" else (4, 64, 9, 11)
    f, _ = fused_and_reference(name, shape[1], torch.float32, device)
    x = torch.randn(shape, device=device)
    g = torch.randn_like(x)
    assert_bitwise_equal(forward_backward(f, x, g, backend_name), forward_backward(f, x, g, backend_name))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(MODULES))
def test_half_precision_error_like_eager(device, dtype, name) -> None:
    """In fp16/bf16 the fused module's error against an fp64 reference is no worse than
    twice the eager same-precision module's error (flash-attention's criterion)."""
    shape = (4, 96, 14, 14)
    f, ref = fused_and_reference(name, shape[1], torch.float64, device)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    g = torch.randn_like(x)
    exact, low, eager = low_precision_runs(f, ref, x, g, dtype, device)
    assert_error_like_eager(low, eager, exact, floor=1e-6)


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_compile_fullgraph_on_cpu(name, layout) -> None:
    """torch.compile(fullgraph=True) over the fused module: no graph break, same numbers."""
    f, _ = fused_and_reference(name, 24, torch.float32, "cpu")
    got, eager = compiled_and_eager(f, layout)
    assert_matches(got, eager, torch.float32)


def _op_samples():
    """Inputs per op; each a fresh tensor, so requires_grad on one sample leaks into no other.
    Backward ops get inputs that do not require grad: they are not differentiable again."""
    x = torch.randn(2, 6, 5, 3, dtype=torch.float64)
    avg, mx = x.mean((2, 3)), x.amax((2, 3))
    gate = torch.rand(2, 6, dtype=torch.float64)
    w = torch.randn(1, 1, 3, dtype=torch.float64)
    alpha, beta = torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64)
    w1, b1 = torch.randn(3, 6, 1, 1, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    w2, b2 = torch.randn(6, 3, 1, 1, dtype=torch.float64), torch.randn(6, dtype=torch.float64)

    return {
        "channel_pool": [(leaf(x, True),), (leaf(x).contiguous(memory_format=torch.channels_last),)],
        "channel_pool_backward": [(leaf(avg), leaf(mx), leaf(x), leaf(mx)), (leaf(avg), None, leaf(x), leaf(mx))],
        "channel_gate": [
            (leaf(avg, True), leaf(mx), leaf(w, True), None, None, 0),
            (leaf(avg), leaf(mx, True), leaf(w), leaf(alpha, True), leaf(beta, True), 2),
        ],
        "channel_gate_backward": [(leaf(gate), leaf(gate), leaf(avg), leaf(mx), leaf(w), leaf(alpha), leaf(beta), 2)],
        "channel_rescale": [(leaf(x, True), leaf(gate, True))],
        "channel_rescale_backward": [(torch.randn_like(x), leaf(x), leaf(gate))],
        "channel_attention": [
            (leaf(x, True), leaf(w, True), None, None, 0),  # N = 2: the per-sample CPU kernel
            (leaf(x[:1], True), leaf(w), leaf(alpha, True), leaf(beta, True), 2),  # N = 1: composed
        ],
        "channel_mlp_attention": [
            (leaf(x, True), leaf(w1, True), leaf(b1, True), leaf(w2, True), leaf(b2, True)),  # per sample
            (leaf(x[:1], True), leaf(w1, True), None, leaf(w2), None),  # N = 1: composed
        ],
    }


@pytest.mark.parametrize("op_name", list(_op_samples()))
def test_opcheck(op_name, compiled_ops) -> None:
    """Schema, fake implementation, autograd registration and AOT dispatch of each C++ op."""
    op = getattr(compiled_ops, op_name).default
    for args in _op_samples()[op_name]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_op_input_errors(backend_name) -> None:
    """Every backend's ops name the argument and raise ValueError/TypeError as Python does."""
    ns = load_ops(backend_name, "channel_gate")
    with pytest.raises(ValueError, match=r"channel_pool: x must be 4-D"):
        ns.channel_pool(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match=r"channel_pool: x must be a floating-point tensor"):
        ns.channel_pool(torch.ones(2, 3, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"gate must have shape \(N, C\)"):
        ns.channel_rescale(torch.randn(2, 3, 4, 4), torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"mode must be 0 \(avg\), 1 \(max\) or 2"):
        ns.channel_gate(torch.rand(2, 3), torch.rand(2, 3), torch.randn(3), None, None, 5)
    if backend_name == "cpu":
        x, w = torch.randn(2, 6, 4, 4), torch.randn(3, 6)
        with pytest.raises(ValueError, match=r"channel_mlp_attention: w1 must hold \(rd, C\)"):
            ns.channel_mlp_attention(x, torch.randn(3, 5), None, w.T, None)
        with pytest.raises(ValueError, match=r"channel_mlp_attention: w2 must hold \(C, rd\)"):
            ns.channel_mlp_attention(x, w, None, w, None)
        with pytest.raises(ValueError, match=r"channel_mlp_attention: b2 must hold C = 6"):
            ns.channel_mlp_attention(x, w, None, w.T.contiguous(), torch.randn(3))


def test_functional_argument_errors() -> None:
    avg = torch.rand(2, 3)
    with pytest.raises(ValueError, match=r"mode must be one of avg, max, mix"):
        AF.channel_gate(avg, avg, torch.randn(3), mode="sum")
    with pytest.raises(ValueError, match=r"mode 'mix' needs alpha and beta"):
        AF.channel_gate(avg, avg, torch.randn(3), mode="mix")
    with pytest.raises(ValueError, match=r"odd number of taps"):
        AF.channel_gate(avg, avg, torch.randn(4))


def test_fused_modules_keep_reference_interface() -> None:
    for fused_cls, ref_cls in MODULES.values():
        assert_keeps_reference_interface(fused_cls(64), ref_cls(64))
