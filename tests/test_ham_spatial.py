"""ham_spatial and the fused HAM on the C++ / CUDA / reference backends, against the reference HAM.

Triton under the interpreter has its own file (tests/test_ham_spatial_triton.py, tiny shapes);
on a GPU the CUDA and Triton backends run here. Only CUDA cases skip, on machines without a GPU.
"""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    LAYOUTS,
    assert_bitwise_equal,
    assert_error_like_eager,
    rounding_floor,
    assert_keeps_reference_interface,
    assert_matches,
    backend_cases,
    compiled_and_eager,
    forward_backward,
    fused_pair,
    leaf,
    low_precision_runs,
    make_input,
    needs_gpu,
)

from attnkernels import backend
from attnkernels import functional as AF
from attnkernels import nn as fused
from attnkernels import reference as R
from attnkernels.models import cifar_resnet
from attnkernels.nn._fused import CACHE_ATTRIBUTE
from attnkernels.reference.formulas import ham_important_channels

CASES = backend_cases(cpu=("cpu", "reference"), cuda=("cuda", "triton", "reference"))
# C = 1, 2, 3 and odd C; H != W; HW = 1; N = 1 (eval only: BatchNorm needs two values).
SHAPES = [(2, 24, 7, 5), (3, 1, 4, 4), (2, 2, 3, 5), (2, 3, 6, 6), (2, 37, 5, 9), (3, 16, 1, 1), (1, 40, 3, 4)]


def fused_and_reference(channels: int, dtype: torch.dtype, device: str, train: bool = True):
    """A randomized reference HAM and a fused HAM with the same state, each its own copy."""
    f, ref = fused_pair(fused.HAM, R.HAM, channels, dtype=dtype, device=device)
    return f.train(train), ref.train(train)


def run_both(shape, dtype, device, backend_name, train, layout="nchw", x=None):
    f, ref = fused_and_reference(shape[1], dtype, device, train)
    x = make_input(shape, layout, dtype, device) if x is None else x
    g = torch.randn(shape, dtype=dtype, device=device)
    got = forward_backward(f, x, g, backend_name)
    want = forward_backward(ref, x, g)
    return f, ref, got, want


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_ham_matches_reference(backend_name, device, dtype, layout, train) -> None:
    for shape in SHAPES:
        if train and shape[0] * shape[2] * shape[3] == 1:
            continue  # BatchNorm cannot train on a single value
        f, ref, got, want = run_both(shape, dtype, device, backend_name, train, layout)
        assert_matches(got, want, dtype)
        # Training: BN ran twice on each side, so the running stats moved the same way.
        for (name, a), b in zip(f.named_buffers(), ref.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_inference_runs_per_sample_and_matches_reference(dtype, layout) -> None:
    """Eval mode without autograd on the CPU backend: the whole forward in one per-sample op
    (BN folded), against the reference module and against the three-pass path."""
    for shape in SHAPES:
        f, ref = fused_and_reference(shape[1], dtype, "cpu", train=False)
        x = make_input(shape, layout, dtype, "cpu")
        with torch.no_grad(), backend.use_backend("cpu"):
            assert f.runs_per_sample(x)
            got = f(x)
        with backend.use_backend("cpu"):
            three_pass = f(x).detach()
        tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}
        torch.testing.assert_close(got, ref(x).detach(), **tol)
        torch.testing.assert_close(got, three_pass, **tol)
        if layout == "channels_last":
            assert got.is_contiguous(memory_format=torch.channels_last)


def test_inference_fold_follows_batch_norm_changes() -> None:
    """The per-sample op's folded BN is kept between calls, and a change to BN's stats, weight
    or eps (in place, or a new tensor) is seen at the next call."""
    f, ref = fused_and_reference(24, torch.float64, "cpu", train=False)
    x = torch.randn(2, 24, 5, 6, dtype=torch.float64)
    changes = [
        lambda m: m.bn.running_var.mul_(1.5),
        lambda m: m.bn.weight.add_(0.25),
        lambda m: setattr(m.bn, "eps", 0.1),
        lambda m: setattr(m.bn, "running_mean", m.bn.running_mean + 0.5),
    ]
    with torch.no_grad(), backend.use_backend("cpu"):
        for change in [None, *changes]:
            if change is not None:
                change(f), change(ref)
            torch.testing.assert_close(f(x), ref(x), rtol=1e-12, atol=1e-12)
            assert "_folded_bn" in f.__dict__[CACHE_ATTRIBUTE]


def test_inference_path_only_without_autograd() -> None:
    f, _ = fused_and_reference(8, torch.float32, "cpu", train=False)
    x = torch.randn(2, 8, 4, 4)
    assert not f.runs_per_sample(x)  # autograd is on: the differentiable passes
    with torch.no_grad():
        assert f.runs_per_sample(x)
        with backend.use_backend("reference"):
            assert not f.runs_per_sample(x)
        assert not f.train().runs_per_sample(x)


def test_compile_fullgraph_inference_on_cpu() -> None:
    torch._dynamo.reset()
    f, _ = fused_and_reference(24, torch.float32, "cpu", train=False)
    x = torch.randn(4, 24, 7, 5)
    with torch.no_grad(), backend.use_backend("cpu"):
        want = f(x)
        got = torch.compile(f, fullgraph=True)(x)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend_name,device", CASES)
def test_output_memory_format(backend_name, device) -> None:
    f, _ = fused_and_reference(24, torch.float32, device)
    for layout, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
        x = make_input((2, 24, 5, 7), layout, torch.float32, device)
        with backend.use_backend(backend_name):
            assert f(x).is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_ties_from_relu_zeros_and_equal_channels(backend_name, device, train) -> None:
    """ReLU zeros tie the channel maxima (the zeroed channels count among them); identical
    channels give equal attention values, which the top-k rule breaks by channel index."""
    n, c, h, w = 2, 21, 5, 6
    relu_x = torch.relu(torch.randn(n, c, h, w, dtype=torch.float64, device=device))
    same = torch.randn(n, 1, h, w, dtype=torch.float64, device=device).expand(n, c, h, w).contiguous()
    for x in (relu_x, same, torch.relu(same)):
        f, ref, got, want = run_both((n, c, h, w), torch.float64, device, backend_name, train, x=x)
        assert_matches(got, want, torch.float64)
    # The equal-channel input really does tie the gate: interior channels share one value.
    ac = ref.channel_attention(same)
    assert (ac[:, 3:-3] == ac[:, 3:4]).all()


@pytest.mark.parametrize("backend_name,device", CASES)
def test_mask_follows_the_spec_tie_rule(backend_name, device) -> None:
    """Equal gate values: the lower channel index ranks first, exactly c_im channels marked."""
    gate = torch.tensor([[0.5, 0.7, 0.5, 0.5, 0.2, 0.7], [0.3, 0.3, 0.3, 0.3, 0.3, 0.3]], dtype=torch.float64)
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    with backend.use_backend(backend_name):
        _, _, mask = AF.ham_spatial_pool(x.to(device), gate.to(device), 3)
    want = torch.tensor([[1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.float64)
    assert torch.equal(mask.cpu(), want)


@pytest.mark.parametrize("backend_name,device", CASES)
def test_nan_propagates(backend_name, device) -> None:
    """A NaN pixel turns its pixel's d1/d2 NaN in the group it sits in, as torch.amax does."""
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, device=device)
    gate = torch.rand(2, 6, dtype=torch.float64, device=device)
    x[1, 2, 1, 1] = float("nan")
    with backend.use_backend("reference"):
        want = AF.ham_spatial_pool(x, gate, 4)
    with backend.use_backend(backend_name):
        got = AF.ham_spatial_pool(x, gate, 4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert torch.isnan(got[0][1, :, 1, 1]).any() and torch.isfinite(got[0][0]).all()


def separated_gate(n: int, c: int, device: str) -> torch.Tensor:
    """Distinct gate values at least 1e-2 apart, so a finite-difference step never moves the mask."""
    return torch.stack([torch.randperm(c) for _ in range(n)]).to(device, torch.float64) * 1e-2 + 0.2


@pytest.mark.parametrize("backend_name,device", CASES)
def test_gradcheck_ops(backend_name, device) -> None:
    n, c, h, w = 2, 7, 3, 4
    c_im = ham_important_channels(c)
    x = torch.randn(n, c, h, w, dtype=torch.float64, device=device, requires_grad=True)
    gate = separated_gate(n, c, device).requires_grad_()
    s1 = torch.rand(n, 1, h, w, dtype=torch.float64, device=device, requires_grad=True)
    s2 = torch.rand(n, 1, h, w, dtype=torch.float64, device=device, requires_grad=True)
    with backend.use_backend(backend_name):
        assert torch.autograd.gradcheck(lambda x, g: AF.ham_spatial_pool(x, g, c_im)[:2], (x, gate), eps=1e-6, atol=1e-7)
        mask = AF.ham_spatial_pool(x, gate, c_im)[2]
        assert torch.autograd.gradcheck(
            lambda x, g, a, b: AF.ham_spatial_apply(x, g, mask, a, b), (x, gate, s1, s2), eps=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("backend_name,device", CASES)
def test_deterministic(backend_name, device, monkeypatch) -> None:
    """Bitwise the same results twice. On a GPU the 7x7 conv is torch's (cuDNN), whose weight
    gradient is deterministic only when asked for (on the reference backend too)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    f, _ = fused_and_reference(64, torch.float32, device)
    x = torch.randn(4, 64, 33, 40, device=device)  # two pixel blocks per sample
    g = torch.randn_like(x)
    for layout_x in (x, x.contiguous(memory_format=torch.channels_last)):
        assert_bitwise_equal(forward_backward(f, layout_x, g, backend_name), forward_backward(f, layout_x, g, backend_name))


def input_with_gate_margin(module, shape, margin: float, device: str) -> torch.Tensor:
    """Random fp64 x whose gate Ac has a gap of at least `margin` at the top-k boundary in
    every sample, so no rounding of x, of the weights or of the gate moves a channel across
    it. Per-channel offsets spread the gate values so such draws are common."""
    n, c, h, w = shape
    for _ in range(500):
        offsets = torch.stack([torch.linspace(-2, 2, c)[torch.randperm(c)] for _ in range(n)])
        x = (torch.randn(shape, dtype=torch.float64) + offsets[:, :, None, None]).to(device)
        ac = module.channel_attention(x).sort(dim=1, descending=True).values
        if (ac[:, module.c_im - 1] - ac[:, module.c_im]).min() > margin:
            return x
    raise AssertionError(f"no input with a top-k margin of {margin} in 500 draws")


@pytest.mark.parametrize("backend_name,device", CASES)
def test_gradcheck_fused_ham(backend_name, device) -> None:
    """The whole module in fp64, training BN included; the gate's margin at the top-k boundary
    keeps the finite-difference steps from flipping the mask."""
    f, _ = fused_and_reference(9, torch.float64, device)
    x = input_with_gate_margin(f, (2, 9, 3, 4), 1e-3, device).requires_grad_()
    with backend.use_backend(backend_name):
        assert torch.autograd.gradcheck(lambda x, *ps: f(x), (x, *f.parameters()), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_error_like_eager(device, dtype) -> None:
    """fp16/bf16: the fused error against fp64 is no worse than twice eager's, plus two units
    of rounding at the result's scale (a scalar gradient is one rounding, lucky or not).
    Eval mode, and a gate margin at the top-k boundary: a channel that crosses it changes
    the output by a finite step, which would measure luck, not precision."""
    shape = (4, 96, 14, 14)
    f, ref = fused_and_reference(shape[1], torch.float64, device, train=False)
    x = input_with_gate_margin(ref, shape, 4e-3, device)
    g = torch.randn_like(x)
    exact, low, eager = low_precision_runs(f, ref, x, g, dtype, device)
    with torch.no_grad():  # inference: the per-sample op on the CPU backend
        per_sample = copy.deepcopy(f).to(dtype)(x.to(dtype))
    assert_error_like_eager(
        [low[0], per_sample, *low[1:]], [eager[0], *eager], [exact[0], *exact], floor=rounding_floor(dtype)
    )


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_compile_fullgraph_on_cpu(layout) -> None:
    f, _ = fused_and_reference(24, torch.float32, "cpu")
    got, eager = compiled_and_eager(f, layout)
    assert_matches(got, eager, torch.float32)


def _op_samples():
    x = torch.randn(2, 6, 5, 3, dtype=torch.float64)
    gate = separated_gate(2, 6, "cpu")
    c_im = 4
    with backend.use_backend("reference"):
        d1, d2, mask = AF.ham_spatial_pool(x, gate, c_im)
    s1, s2 = torch.rand(2, 1, 5, 3, dtype=torch.float64), torch.rand(2, 1, 5, 3, dtype=torch.float64)
    conv_w, conv_w3 = torch.randn(1, 2, 7, 7, dtype=torch.float64), torch.randn(1, 2, 3, 3, dtype=torch.float64)

    x_cl = x.contiguous(memory_format=torch.channels_last)
    return {
        "ham_spatial_pool": [(leaf(x, True), leaf(gate, True), c_im), (leaf(x_cl), leaf(gate), c_im)],
        "ham_spatial_pool_backward": [
            (torch.randn_like(d1), torch.randn_like(d2), leaf(x), leaf(gate), leaf(mask), leaf(d1), leaf(d2), c_im)
        ],
        "ham_spatial_apply": [
            (leaf(x, True), leaf(gate, True), leaf(mask), leaf(s1, True), leaf(s2, True)),
            (leaf(x_cl), leaf(gate), leaf(mask), leaf(s1), leaf(s2)),
        ],
        "ham_spatial_apply_backward": [(torch.randn_like(x), leaf(x), leaf(gate), leaf(mask), leaf(s1), leaf(s2))],
        "ham_spatial_conv": [(leaf(d1, True), leaf(conv_w, True)), (leaf(d2[:1]), leaf(conv_w3.float(), True))],
        "ham_spatial_conv_backward": [(torch.randn(2, 1, 5, 3, dtype=torch.float64), leaf(d1), leaf(conv_w))],
        "ham_attention": [
            (x, torch.randn(5, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64),
             torch.tensor(0.6, dtype=torch.float64), c_im, conv_w, torch.tensor([1.2], dtype=torch.float64),
             torch.tensor([-0.1], dtype=torch.float64)),
            (x_cl.float(), torch.randn(3), torch.tensor(0.3), torch.tensor(0.6), 1, conv_w3.float(),
             torch.tensor([0.8]), torch.tensor([0.2])),
        ],
    }


@pytest.mark.parametrize("op_name", list(_op_samples()))
def test_opcheck(op_name, compiled_ops) -> None:
    op = getattr(compiled_ops, op_name).default
    for args in _op_samples()[op_name]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_spatial_conv_matches_conv2d(k, compiled_ops) -> None:
    """The small-map conv against torch's conv2d, forward and both gradients (odd sizes, W
    wider and narrower than a vector, fp64 gradcheck)."""
    for shape in [(3, 2, 5, 9), (2, 2, 17, 3), (1, 2, 1, 1), (2, 3, 4, 21)]:
        d = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        w = torch.randn(1, shape[1], k, k, dtype=torch.float64, requires_grad=True)
        g = torch.randn(shape[0], 1, *shape[2:], dtype=torch.float64)
        got = compiled_ops.ham_spatial_conv(d, w)
        want = torch.nn.functional.conv2d(d, w, padding=(k - 1) // 2)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for a, b in zip(torch.autograd.grad(got, (d, w), g), torch.autograd.grad(want, (d, w), g)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    d = torch.randn(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 2, k, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(compiled_ops.ham_spatial_conv, (d, w), eps=1e-6, atol=1e-7)


def test_op_input_errors(compiled_ops) -> None:
    ops = compiled_ops
    x, gate = torch.randn(2, 6, 4, 4), torch.rand(2, 6)
    s = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"ham_spatial_pool: c_im must be in \[1, C\]"):
        ops.ham_spatial_pool(x, gate, 7)
    with pytest.raises(ValueError, match=r"ham_spatial_pool: gate must have shape \(N, C\)"):
        ops.ham_spatial_pool(x, torch.rand(2, 5), 3)
    with pytest.raises(TypeError, match=r"ham_spatial_pool: gate must be Float"):
        ops.ham_spatial_pool(x, gate.double(), 3)
    with pytest.raises(ValueError, match=r"ham_spatial_apply: s1 must have shape \(N, 1, H, W\)"):
        ops.ham_spatial_apply(x, gate, gate, torch.rand(2, 1, 4, 3), s)
    with pytest.raises(ValueError, match=r"ham_spatial_apply_backward: grad_y must match x's shape"):
        ops.ham_spatial_apply_backward(torch.randn(2, 6, 4, 3), x, gate, gate, s, s)
    with pytest.raises(ValueError, match=r"ham_spatial_pool: c_im must be in \[1, C\]"):
        AF.ham_spatial_pool(x, gate, 0)
    with pytest.raises(ValueError, match=r"ham_spatial_conv: weight must have shape \(1, Cd, k, k\)"):
        ops.ham_spatial_conv(torch.randn(2, 2, 4, 4), torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"ham_attention: spatial_weight must have shape \(1, 2, k, k\)"):
        ops.ham_attention(x, torch.randn(3), *torch.rand(2), 3, torch.randn(1, 3, 7, 7), *torch.rand(2, 1))
    with pytest.raises(ValueError, match=r"ham_attention: c_im must be in \[1, C\]"):
        ops.ham_attention(x, torch.randn(3), *torch.rand(2), 0, torch.randn(1, 2, 7, 7), *torch.rand(2, 1))
    with pytest.raises(TypeError, match=r"ham_spatial_conv: d must be float32 or float64"):
        ops.ham_spatial_conv(torch.randn(2, 2, 4, 4, dtype=torch.bfloat16), torch.randn(1, 2, 3, 3))


def test_fused_ham_keeps_reference_interface() -> None:
    f, r = fused.HAM(64, kernel_size=3, separation_rate=0.5), R.HAM(64, kernel_size=3, separation_rate=0.5)
    assert f.c_im == r.c_im == 32
    assert_keeps_reference_interface(f, r)


def test_saves_no_full_size_tensor_but_x() -> None:
    """Training: the autograd graph of a fused HAM holds x and small maps only."""
    f, _ = fused_and_reference(32, torch.float32, "cpu")
    x = torch.randn(4, 32, 16, 16, requires_grad=True)
    saved = []
    with backend.use_backend("cpu"), torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t) or t, lambda t: t
    ):
        f(x)
    full = [t for t in saved if t.numel() >= x.numel()]
    assert full and all(t.data_ptr() == x.data_ptr() for t in full), [tuple(t.shape) for t in full]


@pytest.mark.slow
def test_cifar_resnet20_training_matches_reference() -> None:
    """Five SGD steps of CIFAR resnet20 + HAM, fused vs reference, same data: same losses."""
    torch.manual_seed(0)
    ref = cifar_resnet.resnet20(attention="ham")
    fused_model = copy.deepcopy(ref)
    for name, module in list(fused_model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is R.HAM:
                setattr(module, child_name, fused.as_fused(child))
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(5)]
    losses = {}
    for label, model in (("reference", ref), ("fused", fused_model)):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        losses[label] = []
        for images, targets in data:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(images), targets)
            loss.backward()
            opt.step()
            losses[label].append(loss.item())
    assert any(type(m) is fused.HAM for m in fused_model.modules())
    torch.testing.assert_close(losses["fused"], losses["reference"], rtol=1e-4, atol=1e-5)
