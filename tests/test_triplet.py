"""The fused Triplet (triplet_pool + the gates in torch + triplet_apply) against the reference
Triplet, module level.

Output, the gradient of x and of every parameter (each gate's conv and BN), and the BN buffers
after the step (momentum 0.01), in training and in eval; odd C, H != W, HW = 1, N = 1;
layouts; ties in the three maxima; NaN; gradcheck; what backward saves; torch.compile.
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

from attnkernels import backend
from attnkernels import nn as fused
from attnkernels import reference as R

CASES = backend_cases(cpu=("cpu", "reference"))
# (N, C, H, W): odd C and H != W; HW = 1 (N > 1 for BN's batch statistics); N = 1.
SHAPES = [(2, 24, 7, 5), (3, 17, 1, 1), (1, 9, 6, 11)]


def pair(channels: int, dtype: torch.dtype, device: str, **kwargs):
    """A randomized reference Triplet and a fused Triplet loaded from its state_dict."""
    return fused_pair(fused.Triplet, R.Triplet, channels, dtype=dtype, device=device, **kwargs)


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fused_triplet_matches_reference(backend_name, device, train, shape, dtype) -> None:
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
    f, ref = pair(12, torch.float64, device)
    x = make_input((2, 12, 6, 7), layout, torch.float64, device)
    g = torch.randn(2, 12, 6, 7, dtype=torch.float64, device=device)
    got = training_step(f, x, g, backend_name)
    assert_steps_match(got, training_step(ref, x, g), torch.float64, gradient_names(ref))
    assert_layout_of(got[0], x)


@pytest.mark.parametrize("backend_name,device", without_reference(CASES))
def test_ties_in_the_three_maxima(backend_name, device) -> None:
    """Values on a coarse grid: the maxima over C, H and W are tied along many lines."""
    f, ref = pair(6, torch.float64, device)
    x = torch.randint(-2, 3, (2, 6, 5, 4), device=device).double()
    g = torch.randn_like(x)
    assert_steps_match(training_step(f, x, g, backend_name), training_step(ref, x, g), torch.float64,
                       gradient_names(ref))


@pytest.mark.parametrize("backend_name,device", without_reference(CASES))
def test_nan_propagates_like_the_reference(backend_name, device) -> None:
    """A NaN in x: the same NaN pattern in y and in every gradient as the reference's (eval,
    so BN's running statistics stay finite)."""
    f, ref = pair(6, torch.float64, device)
    f.eval(), ref.eval()
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64, device=device)
    x[1, 3, 2, 1] = float("nan")
    g = torch.randn_like(x)
    got, want = training_step(f, x, g, backend_name), training_step(ref, x, g)
    assert torch.isnan(want[0]).any()
    assert_steps_match(got, want, torch.float64, gradient_names(ref))


@pytest.mark.parametrize("backend_name,device", without_reference(CASES))
def test_gradcheck(backend_name, device) -> None:
    """fp64 gradcheck of the whole fused Triplet in training (BN batch statistics) w.r.t. x."""
    f, _ = pair(5, torch.float64, device)
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(on_backend(f, backend_name), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_backward_saves_only_x(train) -> None:
    """No full-size intermediate is saved for backward (x itself is the input), as the reference:
    its gates save views of x and their small maps."""
    f, ref = pair(16, torch.float32, "cpu")
    f.train(train), ref.train(train)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    assert full_size_saved(f, x, "cpu") == {x.untyped_storage().data_ptr()}
    assert full_size_saved(ref, x, "reference") == {x.untyped_storage().data_ptr()}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_on_cpu(train) -> None:
    """torch.compile(fullgraph=True) over the fused Triplet: no graph break, same numbers."""
    torch._dynamo.reset()
    f, _ = pair(16, torch.float32, "cpu")
    f.train(train)
    compiled = torch.compile(copy.deepcopy(f), fullgraph=True)
    x = torch.randn(2, 16, 7, 5)
    g = torch.randn_like(x)
    with backend.use_backend("cpu"):
        got = training_step(compiled, x, g)
        want = training_step(f, x, g)
    for a, b in zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]]):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


def test_state_dict_and_fuse() -> None:
    """Same state_dict keys as the reference (strict loads both ways)."""
    f, ref = pair(16, torch.float32, "cpu")
    assert f.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(f.state_dict())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_triton_module_under_interpreter(train) -> None:
    """The fused Triplet on the Triton ops (the interpreter on CPU: a tiny shape)."""
    if torch.cuda.is_available():
        pytest.skip("covered by the triton-cuda cases")
    f, ref = pair(6, torch.float64, "cpu")
    f.train(train), ref.train(train)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    g = torch.randn_like(x)
    assert_steps_match(training_step(f, x, g, "triton"), training_step(ref, x, g), torch.float64,
                       gradient_names(ref))
