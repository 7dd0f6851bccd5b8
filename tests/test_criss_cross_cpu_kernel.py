"""The C++ CPU kernels of criss_cross (csrc/cpu/criss_cross.cpp) against the Reference ops
(attnkernels.ops.criss_cross.Reference): forward and backward, every dtype and layout, NaN,
empty shapes, gradcheck, and results independent of the thread count. CPU only, small shapes.
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_layout_of, load_compiled_ops, make_input, rounding_floor

from attnkernels import backend
from attnkernels import functional as AF
from attnkernels.ops.criss_cross import Reference

# (N, C, H, W, D): D = 2 as CrissCross(16) would give; H == 1 (no column key); W == 1; odd
# sizes; D == 1; C above one vector.
SHAPES = [(2, 16, 5, 7, 2), (1, 8, 1, 6, 3), (1, 8, 7, 1, 2), (3, 24, 9, 11, 4), (1, 3, 2, 2, 1), (2, 40, 6, 5, 5)]
LAYOUTS = ["contiguous", "channels_last", "sliced"]
# q, k, v, x each in their own layout
MIXED = [("channels_last", "contiguous", "sliced", "channels_last"), ("contiguous", "sliced", "channels_last",
                                                                          "contiguous")]


@pytest.fixture(scope="module")
def ops():
    return load_compiled_ops()


def inputs(shape, layouts, dtype, scale=1.0):
    n, c, h, w, d = shape
    q, k, v, x = (make_input((n, ch, h, w), lay, dtype, "cpu") for ch, lay in zip((d, d, c, c), layouts))
    gamma = torch.randn(1, dtype=dtype)
    return q * scale, k, v, x, gamma


def backward_args(q, k, v, x, gamma, out, lse, layout="contiguous"):
    grad_y = make_input(tuple(x.shape), layout, x.dtype, "cpu")
    return grad_y, q, k, v, gamma, out, lse


def assert_close(got, want, rtol, atol):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"result {i}: {m}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layouts", [(lay,) * 4 for lay in LAYOUTS] + MIXED, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(ops, shape, layouts, dtype):
    q, k, v, x, gamma = inputs(shape, layouts, dtype, scale=2.0)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    got = ops.criss_cross(q, k, v, x, gamma)
    want = Reference.criss_cross(q, k, v, x, gamma)
    assert_close(got, want, **tol)
    assert_layout_of(got[0], x)
    assert_layout_of(got[1], x)
    assert got[2].is_contiguous()
    args = backward_args(q, k, v, x, gamma, want[1], want[2], layouts[3])
    got_b = ops.criss_cross_backward(*args)
    want_b = Reference.criss_cross_backward(*args)
    assert_close(got_b, want_b, **tol)
    for g, t in zip(got_b[:3], (q, k, v)):
        assert_layout_of(g, t)


def max_error(a, truth):
    return (a.double() - truth).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_error_like_reference(ops, dtype, layout):
    """Each result's error against fp64 at most twice the Reference's own in `dtype`, plus two
    roundings at the result's scale (docs/contract.md "Matching")."""
    shape = (2, 24, 6, 7, 3)
    q, k, v, x, gamma = inputs(shape, (layout,) * 4, dtype)
    exact_args = [t.double() for t in (q, k, v, x, gamma)]
    exact = Reference.criss_cross(*exact_args)
    got = ops.criss_cross(q, k, v, x, gamma)
    eager = Reference.criss_cross(q, k, v, x, gamma)
    floor = rounding_floor(dtype)
    for name, g, e, t in zip(("y", "out", "lse"), got, eager, exact):
        assert g.dtype == e.dtype, name
        assert max_error(g, t) <= 2 * max_error(e, t) + floor * t.abs().max().item(), name
    grad_y = make_input(tuple(x.shape), layout, dtype, "cpu")
    got_b = ops.criss_cross_backward(grad_y, q, k, v, gamma, eager[1], eager[2])
    eager_b = Reference.criss_cross_backward(grad_y, q, k, v, gamma, eager[1], eager[2])
    exact_b = Reference.criss_cross_backward(grad_y.double(), *exact_args[:3], exact_args[4], eager[1].double(),
                                             eager[2].double())
    for name, g, e, t in zip(("grad_q", "grad_k", "grad_v", "grad_gamma"), got_b, eager_b, exact_b):
        assert g.dtype == e.dtype, name
        assert max_error(g, t) <= 2 * max_error(e, t) + floor * t.abs().max().item(), name


@pytest.mark.parametrize("which", ["q", "k", "v", "x"])
def test_nan_propagates_as_reference(ops, which):
    shape = (2, 8, 5, 6, 2)
    q, k, v, x, gamma = inputs(shape, ("contiguous",) * 4, torch.float64)
    t = dict(q=q, k=k, v=v, x=x)[which]
    t[1, 0, 2, 3] = float("nan")
    got = ops.criss_cross(q, k, v, x, gamma)
    want = Reference.criss_cross(q, k, v, x, gamma)
    for a, b in zip(got, want):
        assert torch.equal(a.isnan(), b.isnan())
    assert_close(got, want, rtol=1e-12, atol=1e-12)
    args = backward_args(q, k, v, x, gamma, want[1], want[2])
    got_b = ops.criss_cross_backward(*args)
    want_b = Reference.criss_cross_backward(*args)
    for a, b in zip(got_b, want_b):
        assert torch.equal(a.isnan(), b.isnan())
    assert_close(got_b, want_b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nchwd", [(0, 8, 3, 4, 2), (2, 8, 0, 4, 2), (2, 8, 3, 0, 2), (2, 0, 3, 4, 2)])
def test_empty(ops, nchwd):
    q, k, v, x, gamma = inputs(nchwd, ("contiguous",) * 4, torch.float32)
    got = ops.criss_cross(q, k, v, x, gamma)
    want = Reference.criss_cross(q, k, v, x, gamma)
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    args = backward_args(q, k, v, x, gamma, want[1], want[2])
    got_b = ops.criss_cross_backward(*args)
    want_b = Reference.criss_cross_backward(*args)
    assert_close(got_b, want_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 3, 3, 4, 2), (2, 2, 1, 3, 1)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck(ops, shape, layout):
    q, k, v, x, gamma = (t.detach().requires_grad_() for t in inputs(shape, (layout,) * 4, torch.float64))
    with backend.use_backend("cpu"):
        assert torch.autograd.gradcheck(AF.criss_cross, (q, k, v, x, gamma))


def test_independent_of_thread_count(ops):
    shape = (2, 16, 9, 11, 3)
    q, k, v, x, gamma = inputs(shape, ("contiguous",) * 4, torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y, out, lse = ops.criss_cross(q, k, v, x, gamma)
            grads = ops.criss_cross_backward(torch.ones_like(x), q, k, v, gamma, out, lse)
            results.append((y, out, lse, *grads))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
