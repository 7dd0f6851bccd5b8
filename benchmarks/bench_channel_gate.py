"""pytest-benchmark of the channel_gate hot path, op by op and as ECA/SE, per backend.

Run: `.venv/bin/python -m pytest benchmarks/bench_channel_gate.py --benchmark-only`
(add `--benchmark-group-by=param:shape` to compare backends side by side). Each group has a
`memcpy` row (x.clone(): read x, write y), the floor of a memory-bound op, and the eager
reference. Timing only, no assertions on speed: the ratios are read from the table.
"""
from __future__ import annotations

import pytest
import torch

from _bench_common import DEVICE, PHASES, SHAPES, _sync, _x, backends, module_step
from attnkernels import backend
from attnkernels import functional as AF
from attnkernels import nn as fused
from attnkernels import reference as R

BACKENDS = backends("channel_gate")


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
@pytest.mark.parametrize("phase", PHASES)
def test_module(benchmark, shape: str, module: str, variant: str, phase: str) -> None:
    x = _x(shape, requires_grad=phase == "forward_backward")
    ref = R.create(module, x.shape[1]).to(DEVICE)
    m = ref if variant == "eager" else fused.as_fused(ref)
    with backend.use_backend(None if variant == "eager" else variant):
        benchmark(module_step(m, x, phase))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["eager", *BACKENDS])
@pytest.mark.parametrize("phase", PHASES)
def test_bridge(benchmark, shape: str, variant: str, phase: str) -> None:
    """Bridge as a ResNet bottleneck feeds it: two maps of width C/4 at x's size."""
    x = _x(shape, requires_grad=phase == "forward_backward")
    n, c, h, w = x.shape
    bridges = [_x(f"{n}x{c // 4}x{h}x{w}", requires_grad=phase == "forward_backward") for _ in range(2)]
    ref = R.create("bridge", c, bridge_channels=[c // 4] * 2).to(DEVICE)
    m = ref if variant == "eager" else fused.as_fused(ref)
    with backend.use_backend(None if variant == "eager" else variant):
        benchmark(module_step(m, x, phase, *bridges))
