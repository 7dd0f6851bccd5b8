"""The fused CBAM (channel_gate's pooling + cbam_spatial) against the reference CBAM, module level.

Output, the gradient of x and of every parameter (fc1, fc2, the spatial conv, BN), and BN's
buffers after the step, in training and in eval; odd C, H != W, HW = 1, N = 1; layouts; ties
in both max poolings; NaN; gradcheck; what backward saves; torch.compile; timm's CbamModule.
"""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    LAYOUTS,
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

from attnkernels import backend, fuse, unfuse
from attnkernels import nn as fused
from attnkernels import reference as R

CASES = backend_cases(cpu=("cpu", "reference"))
# (N, C, H, W): odd C and H != W; HW = 1 (N > 1 for BN's batch statistics); N = 1.
SHAPES = [(2, 24, 7, 5), (3, 17, 1, 1), (1, 33, 6, 9)]


def pair(channels: int, dtype: torch.dtype, device: str, **kwargs):
    """A randomized reference CBAM and a fused CBAM loaded from its state_dict."""
    return fused_pair(fused.CBAM, R.CBAM, channels, dtype=dtype, device=device, reduction=4, **kwargs)


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fused_cbam_matches_reference(backend_name, device, train, shape, dtype) -> None:
    if train and shape[0] * shape[2] * shape[3] == 1:
        pytest.skip("BatchNorm cannot train on one value per channel")
    f, ref = pair(shape[1], dtype, device)
    f.train(train), ref.train(train)
    x = torch.randn(shape, dtype=dtype, device=device)
    g = torch.randn(shape, dtype=dtype, device=device)
    got, want = training_step(f, x, g, backend_name), training_step(ref, x, g)
    assert_steps_match(got, want, dtype, gradient_names(ref))
    assert all(t.abs().max() > 0 for t in want[1])  # every gradient is live: the comparison can fail


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(backend_name, device, layout) -> None:
    """channels_last in, channels_last out; sliced inputs; same numbers (training)."""
    f, ref = pair(24, torch.float64, device)
    x = make_input((2, 24, 6, 7), layout, torch.float64, device)
    g = torch.randn(2, 24, 6, 7, dtype=torch.float64, device=device)
    got = training_step(f, x, g, backend_name)
    assert_steps_match(got, training_step(ref, x, g), torch.float64, gradient_names(ref))
    assert_layout_of(got[0], x)


@pytest.mark.parametrize("backend_name,device", without_reference(CASES))
def test_ties_in_both_max_poolings(backend_name, device) -> None:
    """Values on a coarse grid: the max over H*W (channel half) and the max over C of x * a
    (spatial half) are tied at many positions; the gradient is shared as the reference shares it."""
    f, ref = pair(16, torch.float64, device)
    x = torch.randint(-2, 3, (2, 16, 5, 4), device=device).double()
    g = torch.randn_like(x)
    assert_steps_match(training_step(f, x, g, backend_name), training_step(ref, x, g), torch.float64,
                       gradient_names(ref))


@pytest.mark.parametrize("backend_name,device", without_reference(CASES))
def test_nan_propagates_like_the_reference(backend_name, device) -> None:
    """A NaN in x: the same NaN pattern in y and in every gradient as the reference's (eval,
    so BN's running statistics stay finite)."""
    f, ref = pair(16, torch.float64, device)
    f.eval(), ref.eval()
    x = torch.randn(2, 16, 5, 4, dtype=torch.float64, device=device)
    x[1, 3, 2, 1] = float("nan")
    g = torch.randn_like(x)
    got, want = training_step(f, x, g, backend_name), training_step(ref, x, g)
    assert torch.isnan(want[0]).any()
    assert_steps_match(got, want, torch.float64, gradient_names(ref))


@pytest.mark.parametrize("backend_name,device", without_reference(CASES))
def test_gradcheck(backend_name, device) -> None:
    """fp64 gradcheck of the whole fused CBAM in training (BN batch statistics) w.r.t. x."""
    f, _ = pair(16, torch.float64, device)
    x = torch.randn(2, 16, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(on_backend(f, backend_name), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_backward_saves_only_x(train) -> None:
    """No full-size intermediate is saved for backward (x itself is the input); the reference
    saves x1 = x * a too."""
    f, ref = pair(32, torch.float32, "cpu")
    f.train(train), ref.train(train)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    assert full_size_saved(f, x, "cpu") == {x.untyped_storage().data_ptr()}
    assert len(full_size_saved(ref, x, "reference")) == 2


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_on_cpu(train) -> None:
    """torch.compile(fullgraph=True) over the fused CBAM: no graph break, same numbers."""
    torch._dynamo.reset()
    f, _ = pair(32, torch.float32, "cpu")
    f.train(train)
    compiled = torch.compile(copy.deepcopy(f), fullgraph=True)
    x = torch.randn(2, 32, 7, 5)
    g = torch.randn_like(x)
    with backend.use_backend("cpu"):
        got = training_step(compiled, x, g)
        want = training_step(f, x, g)
    for a, b in zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]]):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


def test_state_dict_and_fuse() -> None:
    """Same state_dict keys as the reference (strict loads both ways); fuse() swaps a reference
    CBAM inside a model for the fused one, unfuse() swaps it back."""
    f, ref = pair(32, torch.float32, "cpu")
    assert f.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(f.state_dict())
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), R.CBAM(32))
    fused_model = fuse(copy.deepcopy(model))
    assert type(fused_model[1]) is fused.CBAM
    assert type(unfuse(copy.deepcopy(fused_model))[1]) is R.CBAM
    x = torch.randn(2, 3, 8, 8)
    model.eval(), fused_model.eval()
    torch.testing.assert_close(fused_model(x), model(x), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_triton_module_under_interpreter(train) -> None:
    """The fused CBAM on the Triton ops (the interpreter on CPU: a tiny shape), every gradient
    and buffer; on a GPU the CUDA cases of the tests above cover the Triton backend."""
    if torch.cuda.is_available():
        pytest.skip("covered by the triton-cuda cases")
    f, ref = pair(16, torch.float64, "cpu")
    f.train(train), ref.train(train)
    x = torch.randn(2, 16, 3, 4, dtype=torch.float64)
    g = torch.randn_like(x)
    assert_steps_match(training_step(f, x, g, "triton"), training_step(ref, x, g), torch.float64,
                       gradient_names(ref))
