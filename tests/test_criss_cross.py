"""The fused CrissCross (one criss_cross op per pass) against the reference CrissCross, module level.

Output and the gradients of x and every weight in training and eval, recurrence 1 and 2 (RCCA),
inference with the measured choice, layouts, H = 1 and W = 1, NaN, gradcheck, what backward
saves, torch.compile, state_dict, Triton.
"""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    LAYOUTS,
    assert_all_close,
    assert_layout_of,
    assert_steps_match,
    backend_cases,
    full_size_saved,
    fused_pair,
    gradient_names,
    make_input,
    on_backend,
    training_step,
    without_reference,
)

from attnkernels import backend
from attnkernels import nn as fused
from attnkernels import reference as R

CASES = backend_cases(cpu=("cpu", "reference"))
# (N, C, H, W): H != W; H = 1 and W = 1; C not a multiple of 8 (D = C // 8).
SHAPES = [(2, 24, 7, 5), (3, 17, 1, 6), (1, 9, 6, 1), (2, 16, 9, 9)]


def pair(channels: int, dtype: torch.dtype, device: str, recurrence: int = 1):
    """A randomized reference CrissCross (gamma != 0) and a fused one loaded from its state_dict."""
    return fused_pair(fused.CrissCross, R.CrissCross, channels, recurrence, dtype=dtype, device=device)


def assert_like_reference(f, ref, x, g, backend_name) -> None:
    """The fused module's output and gradients against the reference's; fp32: or as accurate,
    against an fp64 copy of the reference. key.bias's gradient is rounding noise on both (its
    term q . key.bias is the same for every key of a pixel: the softmax cancels it), so it is
    bounded, then left out."""
    names = gradient_names(ref)
    (y, grads, _), (y_ref, grads_ref, _) = training_step(f, x, g, backend_name), training_step(ref, x, g)
    got, want = [y, *grads], [y_ref, *grads_ref]
    noise = names.index("key.bias") + 1
    scale = want[names.index("key.weight") + 1].abs().max().item()
    bound = 1e-9 if x.dtype == torch.float64 else 1e-4
    assert got[noise].abs().max().item() <= bound * scale and want[noise].abs().max().item() <= bound * scale
    keep = [i for i in range(len(got)) if i != noise]
    truth_ref = copy.deepcopy(ref).double()

    def truths():
        y, grads, _ = training_step(truth_ref, x.double(), g.double())
        return [[y, *grads][i] for i in keep]

    # fp32: the weights' gradients sum over every pixel of every pass (RCCA chains two), in
    # different orders on the two sides: 3e-4 apart at (2, 24, 7, 5), each as near the truth.
    tol = {"rtol": 1e-10, "atol": 1e-10} if x.dtype == torch.float64 else {"rtol": 1e-3, "atol": 2e-5}
    labels = ["y", *names]
    assert_all_close([got[i] for i in keep], [want[i] for i in keep], [labels[i] for i in keep], truths, **tol)
    assert all(want[i].abs().max() > 0 for i in keep)  # every gradient is live: the comparison can fail


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("recurrence", [1, 2])
def test_fused_criss_cross_matches_reference(backend_name, device, shape, dtype, recurrence) -> None:
    f, ref = pair(shape[1], dtype, device, recurrence)
    x = torch.randn(shape, dtype=dtype, device=device)
    assert_like_reference(f, ref, x, torch.randn_like(x), backend_name)


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(backend_name, device, layout) -> None:
    """channels_last in, channels_last out; sliced inputs; same numbers."""
    f, ref = pair(16, torch.float64, device, 2)
    x = make_input((2, 16, 6, 7), layout, torch.float64, device)
    g = torch.randn(2, 16, 6, 7, dtype=torch.float64, device=device)
    assert_like_reference(f, ref, x, g, backend_name)
    assert_layout_of(training_step(f, x, g, backend_name)[0], x)


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_inference_matches_reference(backend_name, device, layout) -> None:
    f, ref = pair(16, torch.float64, device, 2)
    f.eval(), ref.eval()
    x = make_input((3, 16, 9, 10), layout, torch.float64, device)
    with torch.inference_mode():
        with backend.use_backend(backend_name):
            got = f(x)
        want = ref(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert_layout_of(got, x)


@pytest.mark.parametrize("backend_name,device", without_reference(CASES))
def test_nan_propagates_like_the_reference(backend_name, device) -> None:
    f, ref = pair(8, torch.float64, device)
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64, device=device)
    x[1, 3, 2, 1] = float("nan")
    g = torch.randn_like(x)
    got, want = training_step(f, x, g, backend_name), training_step(ref, x, g)
    assert torch.isnan(want[0]).any() and torch.isfinite(want[0][0]).all()
    assert_steps_match(got, want, torch.float64, gradient_names(ref))  # key.bias: NaN on both


@pytest.mark.parametrize("backend_name,device", without_reference(CASES))
def test_gradcheck(backend_name, device) -> None:
    f, _ = pair(8, torch.float64, device, 2)
    x = torch.randn(2, 8, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(on_backend(f, backend_name), (x,), eps=1e-6, atol=1e-6)


def test_backward_saves_no_energies() -> None:
    """Per pass backward keeps the projections' output (q, k, v in one tensor, which the conv's
    backward needs anyway), out and the pass's input: no (N, H+W-1, H, W) energies, which the
    reference keeps several of."""
    f, _ = pair(16, torch.float32, "cpu")
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    saved = full_size_saved(f, x, "cpu")
    assert len(saved) <= 3, saved


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_on_cpu(train) -> None:
    torch._dynamo.reset()
    f, _ = pair(16, torch.float32, "cpu", 2)
    f.train(train)
    compiled = torch.compile(copy.deepcopy(f), fullgraph=True)
    x = torch.randn(2, 16, 7, 5)
    g = torch.randn_like(x)
    with backend.use_backend("cpu"):
        got = training_step(compiled, x, g)
        want = training_step(f, x, g)
    for a, b in zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]]):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


def test_state_dict() -> None:
    f, ref = fused.CrissCross(64, recurrence=2), R.CrissCross(64, recurrence=2)
    assert f.state_dict().keys() == ref.state_dict().keys()
    assert {k.split(".")[0] for k in f.state_dict()} == {"gamma", "query", "key", "value"}
    ref.load_state_dict(f.state_dict())
    f.load_state_dict(ref.state_dict())
    assert "recurrence=2" in repr(f)


def test_triton_module_under_interpreter() -> None:
    if torch.cuda.is_available():
        pytest.skip("covered by the triton-cuda cases")
    f, ref = pair(8, torch.float64, "cpu", 2)
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    assert_like_reference(f, ref, x, torch.randn_like(x), "triton")
