"""pytest-benchmark of the channel_gate hot path, op by op and as ECA/SE, per backend.

Run: `.venv/bin/python -m pytest benchmarks/bench_channel_gate.py --benchmark-only`
(add `--benchmark-group-by=param:shape` to compare backends side by side). Each group has a
`memcpy` row (x.clone(): read x, write y), the floor of a memory-bound op, and the eager
reference. Timing only, no assertions on speed: the ratios are read from the table.
"""
from __future__ import annotations

import pytest
import torch

from attnkernels import backend
from attnkernels import functional as AF
from attnkernels import nn as fused
from attnkernels import reference as R

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = ["32x256x28x28", "8x1024x14x14"] if DEVICE.type == "cpu" else ["128x256x56x56", "128x1024x14x14"]
BACKENDS = [
    b
    for b in ("cpu", "cuda", "triton")
    if not (b == "triton" and DEVICE.type == "cpu") and backend.why_unavailable(b, "channel_gate", DEVICE) is None
]


def _x(shape: str, requires_grad: bool = False) -> torch.Tensor:
    n, c, h, w = (int(v) for v in shape.split("x"))
    return torch.randn(n, c, h, w, device=DEVICE, requires_grad=requires_grad)


def _sync(fn):
    def run():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("shape", SHAPES)
def test_memcpy(benchmark, shape: str) -> None:
    x = _x(shape)
    benchmark(_sync(x.clone))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_channel_pool(benchmark, shape: str, backend_name: str) -> None:
    x = _x(shape)
    with backend.use_backend(backend_name):
        benchmark(_sync(lambda: AF.channel_pool(x)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_channel_rescale(benchmark, shape: str, backend_name: str) -> None:
    x = _x(shape)
    gate = torch.rand(x.shape[:2], device=DEVICE)
    with backend.use_backend(backend_name):
        benchmark(_sync(lambda: AF.channel_rescale(x, gate)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("module", ["eca", "se"])
@pytest.mark.parametrize("variant", ["eager", *BACKENDS])
@pytest.mark.parametrize("phase", ["forward", "forward_backward"])
def test_module(benchmark, shape: str, module: str, variant: str, phase: str) -> None:
    x = _x(shape, requires_grad=phase == "forward_backward")
    ref = R.create(module, x.shape[1]).to(DEVICE)
    m = ref if variant == "eager" else fused.as_fused(ref)
    g = torch.randn_like(x)

    def forward():
        with torch.inference_mode():
            return m(x)

    def forward_backward():
        m(x).backward(g)
        x.grad = None

    with backend.use_backend(None if variant == "eager" else variant):
        benchmark(_sync(forward if phase == "forward" else forward_backward))
