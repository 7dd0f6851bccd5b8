"""The fused GAM (gam_channel + shuffle_conv) against the reference GAM, module level.

Output, the gradient of x and of every parameter (fc1, fc2, conv1, conv2, both BNs), and the
BatchNorm buffers after the step (running stats, batches tracked), in training and in eval,
groups 1 and 4 (the paper's "gc" variant), odd spatial sizes, both conv algorithms; the same
state_dict as the reference; what backward saves; torch.compile; bad configurations.
"""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    LAYOUTS,
    assert_layout_of,
    backend_cases,
    flat,
    full_size_saved,
    fused_pair,
    make_input,
    needs_gpu,
    on_backend,
    training_step,
    without_reference,
)

from attnkernels import backend, fuse
from attnkernels import nn as fused
from attnkernels import reference as R

CASES = backend_cases(cpu=("cpu",), cuda=("cuda", "triton"), algorithms=("direct", "library")) + [
    pytest.param("reference", "cpu", "auto", id="reference-cpu")
]
# (N, C, H, W) with reduction 4: rd = C/4 divisible by 4 for groups=4; odd H != W, HW = 1 (N > 1
# for BatchNorm's batch statistics), N = 1 with H*W > 1.
SHAPES = [(2, 32, 7, 5), (3, 16, 1, 1), (1, 48, 9, 6)]


def pair(channels: int, groups: int, dtype: torch.dtype, device: str, algo: str = "auto", **kwargs):
    """A randomized reference GAM and a fused GAM loaded from its state_dict."""
    f, ref = fused_pair(fused.GAM, R.GAM, channels, dtype=dtype, device=device, reduction=4, groups=groups, **kwargs)
    f.conv_algorithm = algo
    return f, ref


def assert_steps_match(got, want, dtype, names) -> None:
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-5}
    (y, grads, buffers), (y_ref, grads_ref, buffers_ref) = got, want
    torch.testing.assert_close(y, y_ref, **tol)
    for name, a, b in zip(names, grads, grads_ref, strict=True):
        if name in ("conv1.bias", "conv2.bias") and b.abs().max() < 1e-3 * max(g.abs().max() for g in grads_ref[1:]):
            # A conv bias followed by BatchNorm with batch statistics: its exact gradient is 0
            # (the mean absorbs it), so both results are rounding noise of the other sums.
            tol_zero = {"rtol": 0.0, "atol": 1e-9 if dtype == torch.float64 else 2e-4}
            torch.testing.assert_close(a, b, **tol_zero, msg=lambda m, name=name: f"grad of {name}: {m}")
            continue
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")
    for a, b in zip(buffers, buffers_ref, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("backend_name,device,algo", CASES)
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fused_gam_matches_reference(backend_name, device, algo, groups, train, shape, dtype) -> None:
    if train and shape[0] * shape[2] * shape[3] == 1:
        pytest.skip("BatchNorm cannot train on one value per channel")
    f, ref = pair(shape[1], groups, dtype, device, algo)
    f.train(train), ref.train(train)
    x = torch.randn(shape, dtype=dtype, device=device)
    g = torch.randn(shape, dtype=dtype, device=device)
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    assert_steps_match(training_step(f, x, g, backend_name), training_step(ref, x, g), dtype, names)


@pytest.mark.parametrize("backend_name,device,algo", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(backend_name, device, algo, layout) -> None:
    """channels_last in, channels_last out; sliced inputs; same numbers (training, gc)."""
    f, ref = pair(32, 4, torch.float64, device, algo)
    x = make_input((2, 32, 6, 7), layout, torch.float64, device)
    g = torch.randn(2, 32, 6, 7, dtype=torch.float64, device=device)
    got = training_step(f, x, g, backend_name)
    assert_steps_match(got, training_step(ref, x, g), torch.float64, ["x"] + [n for n, _ in ref.named_parameters()])
    assert_layout_of(got[0], x)


@pytest.mark.parametrize("backend_name,device,algo", CASES)
def test_batch_norm_variants(backend_name, device, algo) -> None:
    """BN momentum None (cumulative average), no running stats, eval without running stats,
    several steps in a row: the buffers follow nn.BatchNorm2d exactly."""
    for configure in (
        lambda bn: setattr(bn, "momentum", None),
        lambda bn: (setattr(bn, "track_running_stats", False), setattr(bn, "running_mean", None),
                    setattr(bn, "running_var", None), setattr(bn, "num_batches_tracked", None)),
    ):
        f, ref = pair(16, 1, torch.float64, device, algo)
        for m in (f, ref):
            configure(m.bn1), configure(m.bn2)
        for train in (True, True, False):
            f.train(train), ref.train(train)
            x = torch.randn(2, 16, 5, 4, dtype=torch.float64, device=device)
            g = torch.randn_like(x)
            assert_steps_match(training_step(f, x, g, backend_name), training_step(ref, x, g), torch.float64,
                               ["x"] + [n for n, _ in ref.named_parameters()])


@pytest.mark.parametrize("backend_name,device,algo", without_reference(CASES))
def test_gradcheck(backend_name, device, algo) -> None:
    """fp64 gradcheck of the whole fused GAM in training (BN batch statistics) w.r.t. x."""
    f, _ = pair(16, 4, torch.float64, device, algo)
    x = torch.randn(2, 16, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(on_backend(f, backend_name), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_half_precision_error_like_eager(device, dtype, train) -> None:
    """fp16/bf16 module and input: the fused GAM's error against fp64 is no worse than twice
    the eager same-precision reference's, plus a small floor.

    The truth is computed from the same rounded weights and inputs (as flash-attention's tests
    do), so the errors compared are the computation's. In training BN1's batch statistics
    amplify where ReLU's mask flips under rounding, a chaotic error either path can draw
    large on one input: each error is summed over four random cases before comparing."""
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("the eager reference has no fp16 conv2d on CPU")
    totals = {}
    for seed in range(4):
        torch.manual_seed(seed)
        f, ref = pair(64, 4, torch.float64, device)
        f.train(train), ref.train(train)
        ref.to(dtype).double(), f.load_state_dict(ref.state_dict())
        x = torch.randn(4, 64, 9, 11, dtype=torch.float64, device=device).to(dtype).double()
        g = torch.randn_like(x).to(dtype).double()
        exact = training_step(copy.deepcopy(ref), x, g)
        low = training_step(copy.deepcopy(f).to(dtype), x.to(dtype), g.to(dtype))
        eager = training_step(copy.deepcopy(ref).to(dtype), x.to(dtype), g.to(dtype))
        names = ["y", "x"] + [n for n, _ in ref.named_parameters()]
        for name, a, b, truth in zip(names, flat(low), flat(eager), flat(exact)):
            err = totals.setdefault(name, [0.0, 0.0, 0.0])
            err[0] += (a.double() - truth).abs().max().item()
            err[1] += (b.double() - truth).abs().max().item()
            err[2] += truth.abs().max().item()
    for name, (err_fused, err_eager, scale) in totals.items():
        assert err_fused <= 2 * err_eager + 5e-3 * scale, (name, err_fused, err_eager)


@pytest.mark.parametrize("algo", ["direct", "library"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_backward_saves_only_x_and_x1(algo, train) -> None:
    """The issue's memory contract: no full-size intermediate other than x1 is saved for
    backward (x itself is the input); the reference saves seven."""
    f, ref = pair(32, 4, torch.float32, "cpu", algo)
    f.train(train), ref.train(train)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    assert len(full_size_saved(f, x, "cpu")) == 2
    assert len(full_size_saved(ref, x, "reference")) >= 5


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_on_cpu(groups, train) -> None:
    """torch.compile(fullgraph=True) over the fused GAM: no graph break, same numbers."""
    torch._dynamo.reset()
    f, ref = pair(32, groups, torch.float32, "cpu")
    f.train(train), ref.train(train)
    compiled = torch.compile(copy.deepcopy(f), fullgraph=True)
    x = torch.randn(2, 32, 7, 5)
    g = torch.randn_like(x)
    with backend.use_backend("cpu"):
        got = training_step(compiled, x, g)
        want = training_step(f, x, g)
    tol = {"rtol": 2e-4, "atol": 2e-5}
    for a, b in zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]]):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"channels": 15, "reduction": 16}, r"channels // reduction must be >= 1, got 15 // 16 = 0"),
        ({"channels": 64, "reduction": 16, "groups": 3}, r"groups \(3\) must divide channels \(64\)"),
        ({"channels": 96, "reduction": 16, "groups": 4}, r"groups \(4\) must divide channels // reduction \(6\)"),
        ({"channels": 64, "reduction": 16, "kernel_size": 4}, r"kernel_size"),
    ],
)
def test_bad_configurations_raise(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        fused.GAM(**kwargs)


def test_state_dict_and_fuse() -> None:
    """Same state_dict keys as the reference (strict loads both ways); fuse() swaps a
    reference GAM inside a model for the fused one and unfuse() swaps it back."""
    f, ref = pair(32, 4, torch.float32, "cpu")
    assert f.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(f.state_dict())
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), R.GAM(64, groups=4))
    fused_model = fuse(copy.deepcopy(model))
    assert type(fused_model[1]) is fused.GAM
    x = torch.randn(2, 3, 8, 8)
    model.eval(), fused_model.eval()
    torch.testing.assert_close(fused_model(x), model(x), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("algo", ["direct", "library"])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_triton_module_under_interpreter(algo, groups, train) -> None:
    """The fused GAM on the Triton ops (the interpreter on CPU: a tiny shape), every gradient
    and buffer; on a GPU the CUDA cases of the tests above cover the Triton backend."""
    if torch.cuda.is_available():
        pytest.skip("covered by the triton-cuda cases")
    f, ref = pair(16, groups, torch.float64, "cpu", algo)
    f.train(train), ref.train(train)
    x = torch.randn(2, 16, 3, 4, dtype=torch.float64)
    g = torch.randn_like(x)
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    assert_steps_match(training_step(f, x, g, "triton"), training_step(ref, x, g), torch.float64, names)


# ----------------------------------------------------------------------------------------
# The reduction rule: rd = C // reduction, rounded down
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "channels,reduction,groups,rd",
    [(24, 16, 1, 1), (40, 16, 1, 2), (30, 16, 1, 1), (16, 16, 1, 1), (48, 16, 3, 3), (100, 10, 2, 10)],
)
def test_rd_rounds_down(channels, reduction, groups, rd) -> None:
    """rd = C // reduction (the published code's int(C / rate)); C need not be a multiple."""
    for cls in (R.GAM, fused.GAM):
        m = cls(channels, reduction=reduction, groups=groups)
        assert (m.fc1.out_features, m.conv1.out_channels, m.bn1.num_features, m.conv2.in_channels) == (rd,) * 4


SMALL_RD_CASES = backend_cases(cpu=("cpu",), cuda=("cuda", "triton"), algorithms=("direct", "library")) + [
    pytest.param("reference", "cpu", "auto", id="reference-cpu")
]


@pytest.mark.parametrize("backend_name,device,algo", SMALL_RD_CASES)
@pytest.mark.parametrize("channels,groups", [(24, 1), (40, 1), (40, 2), (48, 3)], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_small_rd_matches_reference(backend_name, device, algo, channels, groups, train) -> None:
    """The fused kernels at the rounded-down rd of reduction 16: rd = 1 (C = 24), rd = 2
    (C = 40, also in two groups of one), rd = 3 in three groups: forward, every gradient and the
    BN buffers against the reference GAM."""
    f, ref = fused_pair(fused.GAM, R.GAM, channels, dtype=torch.float64, device=device, reduction=16, groups=groups)
    f.conv_algorithm = algo
    f.train(train), ref.train(train)
    x = torch.randn(2, channels, 7, 5, dtype=torch.float64, device=device)
    g = torch.randn_like(x)
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    assert_steps_match(training_step(f, x, g, backend_name), training_step(ref, x, g), torch.float64, names)


@pytest.mark.parametrize("algo", ["direct", "library"])
@pytest.mark.parametrize("channels,groups", [(24, 1), (40, 2)], ids=str)
def test_small_rd_triton_under_interpreter(algo, channels, groups) -> None:
    """rd = 1 and rd = 2 (groups of one) on the Triton ops (the interpreter: a tiny shape)."""
    if torch.cuda.is_available():
        pytest.skip("covered by the triton-cuda cases")
    f, ref = fused_pair(fused.GAM, R.GAM, channels, dtype=torch.float64, device="cpu", reduction=16, groups=groups)
    f.conv_algorithm = algo
    x = torch.randn(2, channels, 3, 4, dtype=torch.float64)
    g = torch.randn_like(x)
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    assert_steps_match(training_step(f, x, g, "triton"), training_step(ref, x, g), torch.float64, names)
