"""pytest-benchmark of the gam_channel hot path (GAM's per-pixel MLP gate), per backend,
against the reference's permute + two nn.Linear + ReLU + sigmoid + multiply.

Run: `.venv/bin/python -m pytest benchmarks/bench_gam_channel.py --benchmark-only`.
C = 256 and 1024 with reduction 16 (rd = 16, 64); fp32 on CPU, bf16 on CUDA. Timing only.
"""
from __future__ import annotations

import pytest
import torch

from _bench_common import DEVICE, PHASES, SHAPES, _sync, backends
from attnkernels import backend
from attnkernels import functional as AF

BACKENDS = backends("gam_channel")
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["reference", *BACKENDS])
@pytest.mark.parametrize("phase", PHASES)
def test_gam_channel(benchmark, shape: str, variant: str, phase: str) -> None:
    n, c, h, w = (int(v) for v in shape.split("x"))
    train = phase == "forward_backward"
    x = torch.randn(n, c, h, w, device=DEVICE, dtype=DTYPE, requires_grad=train)
    weights = [torch.randn(s, device=DEVICE, dtype=DTYPE, requires_grad=train) * 0.1 for s in ((c // 16, c), (c // 16,), (c, c // 16), (c,))]
    g = torch.randn_like(x)

    def run():
        with backend.use_backend(variant):
            x1 = AF.gam_channel(x, *weights)
        if train:
            torch.autograd.grad(x1, [x, *weights], g)

    benchmark(_sync(run))
