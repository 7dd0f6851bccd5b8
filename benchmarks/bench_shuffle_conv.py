"""pytest-benchmark of the shuffle_conv hot path: GAM's two grouped 7x7 convs with their fused
prologue (BN1 + ReLU + channel shuffle on load) and epilogue (BN2 + sigmoid + multiply), per
backend and conv algorithm ("direct": the backend's own conv; "library": torch's conv2d with
the rest fused around it), against the reference's separate ops.

Run: `.venv/bin/python -m pytest benchmarks/bench_shuffle_conv.py --benchmark-only
--benchmark-group-by=param:shape,param:groups`. GAM's shapes: C = 256 -> rd = 16 -> C, groups 1
and 4; fp32 on CPU, bf16 on CUDA. Timing only; benchmarks/gam_breakdown.py times the whole GAM.
"""
from __future__ import annotations

import pytest
import torch

from _bench_common import DEVICE, PHASES, _sync, backends
from attnkernels import backend
from attnkernels import functional as AF

BACKENDS = backends("shuffle_conv")
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
SHAPES = ["8x256x28x28"] if DEVICE.type == "cpu" else ["32x256x56x56"]
VARIANTS = ["reference"] + [f"{b}-{algo}" for b in BACKENDS for algo in ("direct", "library")]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("phase", PHASES)
def test_shuffle_conv(benchmark, shape: str, groups: int, variant: str, phase: str) -> None:
    """conv1 (raw, C -> rd) then conv2 (BN1/ReLU/shuffle on load, C <- rd, gated epilogue)."""
    n, c, h, w = (int(v) for v in shape.split("x"))
    rd, train = c // 16, phase == "forward_backward"
    make = lambda *s: (torch.randn(*s, device=DEVICE, dtype=DTYPE) * 0.1).requires_grad_(train)  # noqa: E731
    x1 = make(n, c, h, w)
    w1, b1, w2, b2 = make(rd, c // groups, 7, 7), make(rd), make(c, rd // groups, 7, 7), make(c)
    in_scale, in_shift, out_scale, out_shift = make(rd), make(rd), make(c), make(c)
    backend_name, _, algo = variant.partition("-")
    g = torch.randn_like(x1)

    def run():
        with backend.use_backend(backend_name):
            z1 = AF.shuffle_conv(x1, w1, b1, groups, conv=algo or "auto")
            y = AF.shuffle_conv(z1, w2, b2, groups, groups, in_scale, in_shift, x1, out_scale, out_shift, conv=algo or "auto")
        if train:
            y.backward(g)

    benchmark(_sync(run))
