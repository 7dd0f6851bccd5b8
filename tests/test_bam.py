"""The fused BAM (channel_pool + the branches in torch + bam_apply; folded BatchNorms in
inference) against the reference BAM, module level.

Output, the gradient of x and of every parameter, and the BatchNorm buffers after the step, in
training and in eval; inference (no autograd: the folded path) and its fold cache; odd C,
H != W, HW = 1, N = 1; layouts; NaN; gradcheck; what backward saves; torch.compile.
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
from attnkernels.nn import bam as fused_bam

CASES = backend_cases(cpu=("cpu", "reference"))
# (N, C, H, W): odd C and H != W (rd = C // 4 with reduction 4); HW = 1; N = 1 (eval only).
SHAPES = [(2, 24, 7, 5), (3, 17, 1, 1), (1, 9, 6, 11)]
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}, torch.float32: {"rtol": 2e-4, "atol": 2e-5}}


def pair(channels: int, dtype: torch.dtype, device: str, **kwargs):
    """A randomized reference BAM (reduction 4, dilation 2 unless given) and a fused BAM loaded
    from its state_dict."""
    kwargs = {"reduction": 4, "dilation": 2} | kwargs
    return fused_pair(fused.BAM, R.BAM, channels, dtype=dtype, device=device, **kwargs)


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fused_bam_matches_reference(backend_name, device, train, shape, dtype) -> None:
    if train and shape[0] == 1:
        pytest.skip("BatchNorm1d cannot train on one sample")
    f, ref = pair(shape[1], dtype, device)
    f.train(train), ref.train(train)
    x = torch.randn(shape, dtype=dtype, device=device)
    g = torch.randn(shape, dtype=dtype, device=device)
    got, want = training_step(f, x, g, backend_name), training_step(ref, x, g)
    assert_steps_match(got, want, dtype, gradient_names(ref))
    # The comparison can fail: these gradients are live. (Not every one: a conv bias before a
    # training BatchNorm has gradient 0, and a ReLU can zero a 2-channel branch.)
    live = {name for name, t in zip(gradient_names(ref), want[1]) if t.abs().max() > 0}
    assert {"x", "channel.fc2.bias", "spatial.final.bias"} <= live, live


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


def inference(module, x: torch.Tensor, backend_name: str = "cpu") -> torch.Tensor:
    with torch.inference_mode(), backend.use_backend(backend_name):
        return module(x)


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_inference_matches_reference(backend_name, device, layout, dtype) -> None:
    """Eval without autograd: the folded Linear and convs, then bam_apply."""
    f, ref = pair(20, dtype, device)
    f.eval(), ref.eval()
    x = make_input((3, 20, 9, 10), layout, dtype, device)
    got = inference(f, x, backend_name)
    torch.testing.assert_close(got, inference(ref, x, "reference"), **TOL[dtype])
    assert_layout_of(got, x)


def test_inference_runs_the_folded_path(monkeypatch) -> None:
    """Inference (static choice) folds once and calls bam_apply on the backend directly;
    training and eval with autograd go through the public function, unfolded."""
    calls = []
    real_fold, real_apply = fused_bam.BAM.folded_weights, fused_bam.AF.bam_apply
    monkeypatch.setattr(fused_bam.BAM, "folded_weights", lambda self, x: calls.append("fold") or real_fold(self, x))
    monkeypatch.setattr(fused_bam.AF, "bam_apply", lambda *a: calls.append("function") or real_apply(*a))
    f, ref = pair(16, torch.float32, "cpu")
    x = torch.randn(2, 16, 5, 6)
    f.eval(), ref.eval()
    for _ in range(2):
        inference(f, x)
    assert calls == ["fold", "fold"]  # each call looks the fold up; the cache holds it (next test)
    calls.clear()
    with backend.use_backend("cpu"):
        f(x)
        f.train()(x)
    assert calls == ["function", "function"]


def change_in_place(m) -> None:
    with torch.no_grad():
        m.spatial.dilated_bn[1].running_var.mul_(1.5)
        m.channel.fc1.weight.add_(0.25)


def optimizer_step(m) -> None:
    for p in m.parameters():
        p.grad = torch.full_like(p, 0.1)
    torch.optim.SGD(m.parameters(), lr=0.5).step()


def change_eps(m) -> None:
    m.spatial.reduce_bn.eps = 0.25  # an attribute, not a tensor


@pytest.mark.parametrize("change", [change_in_place, optimizer_step, change_eps])
def test_fold_is_kept_until_a_weight_or_stat_changes(monkeypatch, change) -> None:
    """The folded weights are computed once and kept; a change to a weight, a running stat or
    eps is seen, and the output stays the reference's."""
    folds = []
    real = fused_bam.folded
    monkeypatch.setattr(fused_bam, "folded", lambda *a: folds.append(1) or real(*a))
    f, ref = pair(16, torch.float64, "cpu")
    f.eval(), ref.eval()
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)

    def folds_over_two_calls() -> int:
        folds.clear()
        for _ in range(2):
            torch.testing.assert_close(inference(f, x), inference(ref, x, "reference"), **TOL[torch.float64])
        return len(folds)

    assert folds_over_two_calls() == 4  # fc1 and the three convs, once
    assert folds_over_two_calls() == 0
    change(f), change(ref)
    assert folds_over_two_calls() == 4


@pytest.mark.parametrize("backend_name,device", without_reference(CASES))
def test_nan_propagates_like_the_reference(backend_name, device) -> None:
    """A NaN in x: the same NaN pattern in y and in every gradient as the reference's (eval,
    so the BatchNorms' running statistics stay finite), and in inference."""
    f, ref = pair(8, torch.float64, device)
    f.eval(), ref.eval()
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64, device=device)
    x[1, 3, 2, 1] = float("nan")
    g = torch.randn_like(x)
    got, want = training_step(f, x, g, backend_name), training_step(ref, x, g)
    assert torch.isnan(want[0]).any()
    assert_steps_match(got, want, torch.float64, gradient_names(ref))
    torch.testing.assert_close(inference(f, x, backend_name), inference(ref, x, "reference"), equal_nan=True)


@pytest.mark.parametrize("backend_name,device", without_reference(CASES))
def test_gradcheck(backend_name, device) -> None:
    """fp64 gradcheck of the whole fused BAM in training (batch statistics) w.r.t. x."""
    f, _ = pair(8, torch.float64, device)
    x = torch.randn(2, 8, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(on_backend(f, backend_name), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_backward_saves_only_x(train) -> None:
    """No x-sized intermediate is saved for backward (x itself is the input); the reference
    saves its broadcast sum, sigmoid and product."""
    f, ref = pair(16, torch.float32, "cpu")
    f.train(train), ref.train(train)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    assert full_size_saved(f, x, "cpu") == {x.untyped_storage().data_ptr()}
    assert len(full_size_saved(ref, x, "reference")) > 1


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_on_cpu(train) -> None:
    """torch.compile(fullgraph=True) over the fused BAM: no graph break, same numbers."""
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


def test_state_dict_and_defaults() -> None:
    """Same state_dict keys as the reference (strict loads both ways), with the defaults
    (reduction 16, dilation 4)."""
    f, ref = fused.BAM(64), R.BAM(64)
    assert f.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(f.state_dict())
    f.load_state_dict(ref.state_dict())
    assert f.dilation == 4


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_triton_module_under_interpreter(train) -> None:
    """The fused BAM on the Triton ops (the interpreter on CPU: a tiny shape)."""
    if torch.cuda.is_available():
        pytest.skip("covered by the triton-cuda cases")
    f, ref = pair(8, torch.float64, "cpu")
    f.train(train), ref.train(train)
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    g = torch.randn_like(x)
    assert_steps_match(training_step(f, x, g, "triton"), training_step(ref, x, g), torch.float64,
                       gradient_names(ref))
