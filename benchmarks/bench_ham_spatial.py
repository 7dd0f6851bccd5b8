"""pytest-benchmark of the ham_spatial hot path, op by op and as the whole HAM module, per backend.

Run: `.venv/bin/python -m pytest benchmarks/bench_ham_spatial.py --benchmark-only`
(add `--benchmark-group-by=param:shape` to compare backends side by side). As in
bench_channel_gate.py, each group has a `memcpy` row (x.clone(): read x, write y), the floor
of a memory-bound op, and the module rows the eager reference. The ops get HAM's real
arguments: gate Ac (N, C) in (0, 1), c_im from `ham_important_channels(C)`, the mask of the
c_im top channels of gate, and spatial gates s1, s2 (N, 1, H, W), all float32. Timing only,
no assertions on speed: the ratios are read from the table.
"""
from __future__ import annotations

import pytest
import torch

from _bench_common import DEVICE, PHASES, SHAPES, _channel_gate, _spatial_gate, _sync, _x, backends, module_step
from attnkernels import backend
from attnkernels import functional as AF
from attnkernels import nn as fused
from attnkernels import reference as R
from attnkernels.reference.formulas import ham_important_channels, important_channel_mask

BACKENDS = backends("ham_spatial")


@pytest.mark.parametrize("shape", SHAPES)
def test_memcpy(benchmark, shape: str) -> None:
    x = _x(shape)
    benchmark(_sync(x.clone))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_ham_spatial_pool(benchmark, shape: str, backend_name: str) -> None:
    x = _x(shape)
    gate, c_im = _channel_gate(x), ham_important_channels(x.shape[1])
    with backend.use_backend(backend_name):
        benchmark(_sync(lambda: AF.ham_spatial_pool(x, gate, c_im)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_ham_spatial_apply(benchmark, shape: str, backend_name: str) -> None:
    x = _x(shape)
    gate = _channel_gate(x)
    mask = important_channel_mask(gate, ham_important_channels(x.shape[1])).to(torch.float32)
    s1, s2 = _spatial_gate(x), _spatial_gate(x)
    with backend.use_backend(backend_name):
        benchmark(_sync(lambda: AF.ham_spatial_apply(x, gate, mask, s1, s2)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["eager", *BACKENDS])
@pytest.mark.parametrize("phase", PHASES)
def test_module(benchmark, shape: str, variant: str, phase: str) -> None:
    x = _x(shape, requires_grad=phase == "forward_backward")
    ref = R.HAM(x.shape[1]).to(DEVICE)
    m = ref if variant == "eager" else fused.as_fused(ref)
    with backend.use_backend(None if variant == "eager" else variant):
        benchmark(module_step(m, x, phase))
