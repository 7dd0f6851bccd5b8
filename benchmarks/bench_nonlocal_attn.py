"""pytest-benchmark of the nonlocal_attn hot path: the op alone and the whole PAM module, per
backend, against the reference and projections + SDPA.

Run: `.venv/bin/python -m pytest benchmarks/bench_nonlocal_attn.py --benchmark-only`
(add `--benchmark-group-by=param:shape` to compare backends side by side). The shapes are
the issue's: 32x32 and 64x64 maps (HW = 1024 and 4096) at C = 256 (q, k of width C/8); on
CUDA in bf16 at C = 256 and 1024. The op rows get the q, k, v a PAM's projections would make;
`sdpa` is `F.scaled_dot_product_attention(scale=1.0)` on the same (N, 1, HW, D) views
(benchmarks/attention_baselines.py). Timing only, no assertions on speed.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _bench_common import DEVICE, PHASES, _sync, backends, module_step
from attention_baselines import sdpa_variant
from attnkernels import backend
from attnkernels import functional as AF
from attnkernels import nn as fused
from attnkernels import reference as R

BACKENDS = backends("nonlocal_attn")
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
SHAPES = ["2x256x32x32", "1x256x64x64"] if DEVICE.type == "cpu" else ["8x256x64x64", "8x1024x32x32"]


def _qkvx(shape: str):
    n, c, h, w = (int(v) for v in shape.split("x"))
    make = lambda ch: torch.randn(n, ch, h, w, device=DEVICE, dtype=DTYPE)  # noqa: E731
    return make(c // 8), make(c // 8), make(c), make(c), torch.tensor([0.5], device=DEVICE, dtype=DTYPE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["reference", "sdpa", *BACKENDS])
def test_nonlocal_attn(benchmark, shape: str, variant: str) -> None:
    q, k, v, x, gamma = _qkvx(shape)
    if variant == "sdpa":
        views = [t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (q, k, v)]
        benchmark(_sync(lambda: F.scaled_dot_product_attention(*views, scale=1.0)))
        return
    with backend.use_backend(variant):
        benchmark(_sync(lambda: AF.nonlocal_attn(q, k, v, x, gamma)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["eager", "sdpa", *BACKENDS])
@pytest.mark.parametrize("phase", PHASES)
def test_module(benchmark, shape: str, variant: str, phase: str) -> None:
    n, c, h, w = (int(v) for v in shape.split("x"))
    x = torch.randn(n, c, h, w, device=DEVICE, dtype=DTYPE, requires_grad=phase == "forward_backward")
    ref = R.PAM(c).to(DEVICE, DTYPE)
    with torch.no_grad():
        ref.gamma.fill_(0.5)
    if variant == "sdpa":
        m = _Wrapped(ref)
    else:
        m = ref if variant == "eager" else fused.as_fused(ref)
    with backend.use_backend(None if variant in ("eager", "sdpa") else variant):
        benchmark(module_step(m, x, phase))


class _Wrapped(torch.nn.Module):
    """The sdpa variant as a module, so module_step can set its mode."""

    def __init__(self, pam: R.PAM) -> None:
        super().__init__()
        self.pam = pam
        self.run = sdpa_variant(pam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)
