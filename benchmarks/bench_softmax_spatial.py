"""pytest-benchmark of the softmax_spatial hot path (SoftmaxSpatial's conv, spatial softmax and
reweighting), per backend, against the reference's 1x1 conv + softmax + multiply.

Run: `.venv/bin/python -m pytest benchmarks/bench_softmax_spatial.py --benchmark-only`.
g = 1 (the paper's single map) and g = 16; rescale on; fp32 on CPU, bf16 on CUDA. Timing only.
"""
from __future__ import annotations

import pytest
import torch

from _bench_common import DEVICE, PHASES, SHAPES, _sync, backends
from attnkernels import backend
from attnkernels import functional as AF

BACKENDS = backends("softmax_spatial")
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("groups", [1, 16])
@pytest.mark.parametrize("variant", ["reference", *BACKENDS])
@pytest.mark.parametrize("phase", PHASES)
def test_softmax_spatial(benchmark, shape: str, groups: int, variant: str, phase: str) -> None:
    n, c, h, w = (int(v) for v in shape.split("x"))
    train = phase == "forward_backward"
    x = torch.randn(n, c, h, w, device=DEVICE, dtype=DTYPE, requires_grad=train)
    weight = (torch.randn(groups, c, device=DEVICE, dtype=DTYPE) * 0.05).requires_grad_(train)
    bias = (torch.randn(groups, device=DEVICE, dtype=DTYPE) * 0.05).requires_grad_(train)
    g = torch.randn_like(x)

    def run():
        with backend.use_backend(variant):
            y = AF.softmax_spatial(x, weight, bias, True)
        if train:
            torch.autograd.grad(y, [x, weight, bias], g)

    benchmark(_sync(run))
