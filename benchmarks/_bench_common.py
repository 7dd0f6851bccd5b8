"""What the pytest-benchmark files (bench_*.py) share: the device, its shapes and backends,
inputs, and the synchronised, phase-by-phase calls they time.

Not a test file itself (no `bench_` prefix, no tests): pytest puts benchmarks/ on sys.path
when it collects a bench file, so `from _bench_common import ...` (and, here, `harness`) works there.
"""
from __future__ import annotations

from typing import Any, Callable, List

import pytest
import torch
from torch import nn

from attnkernels import backend
from harness.backends import fused_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
#: ResNet stage outputs; on CUDA with inputs larger than L2.
SHAPES = ["32x256x28x28", "8x1024x14x14"] if DEVICE.type == "cpu" else ["128x256x56x56", "128x1024x14x14"]
#: The two phases a module is timed in.
PHASES = ["forward", "forward_backward"]


def backends(hot_path: str) -> List[str]:
    """The compiled backends that run `hot_path` on DEVICE (Triton on CPU is its
    interpreter, a test tool, so it is left out there): `harness.backends` decides."""
    return fused_backends((hot_path,), DEVICE)


def _x(shape: str, requires_grad: bool = False) -> torch.Tensor:
    """Random x of an "NxCxHxW" shape on DEVICE."""
    n, c, h, w = (int(v) for v in shape.split("x"))
    return torch.randn(n, c, h, w, device=DEVICE, requires_grad=requires_grad)


def _channel_gate(x: torch.Tensor) -> torch.Tensor:
    """A channel gate (N, C) of x strictly inside (0, 1), as a sigmoid gives."""
    return torch.rand(x.shape[:2], device=DEVICE) * 0.98 + 0.01


def _spatial_gate(x: torch.Tensor) -> torch.Tensor:
    """A spatial gate (N, 1, H, W) of x in [0, 1)."""
    n, _, h, w = x.shape
    return torch.rand(n, 1, h, w, device=DEVICE)


def _sync(fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` followed by a CUDA synchronize, so the benchmark times the GPU work too."""

    def run():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def _outputs(out: Any) -> tuple:
    """An op's outputs as a tuple (an op may return one tensor or several)."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def op_step(fn: Callable[..., Any], inputs: List[torch.Tensor], phase: str) -> Callable[[], Any]:
    """One call of op `fn(*inputs)` in `phase`: "forward" (under inference_mode) or
    "forward_backward" (the inputs require grad; the backward of fixed random gradients of
    every output)."""
    if phase == "forward":
        def forward():
            with torch.inference_mode():
                return fn(*inputs)

        return _sync(forward)
    inputs = [t.requires_grad_() for t in inputs]
    grads = [torch.randn_like(out) for out in _outputs(fn(*inputs))]

    def forward_backward():
        torch.autograd.backward(_outputs(fn(*inputs)), grads)
        for t in inputs:
            t.grad = None

    return _sync(forward_backward)


def op_table(ops: dict, hot_path: str) -> tuple[Callable[..., None], Callable[..., None]]:
    """The two benchmarks of an op-by-op file, to bind as `test_memcpy, test_<path> = ...`:
    x.clone() per shape (the floor of a memory-bound op), and each op of `ops` (name -> (its
    eager composition, its public function, its arguments from x)) per shape, variant (eager,
    then every backend of `hot_path` here) and phase."""

    @pytest.mark.parametrize("shape", SHAPES)
    def memcpy(benchmark, shape: str) -> None:
        x = _x(shape)
        benchmark(_sync(x.clone))

    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("op", list(ops))
    @pytest.mark.parametrize("variant", ["eager", *backends(hot_path)])
    @pytest.mark.parametrize("phase", PHASES)
    def op_benchmark(benchmark, shape: str, op: str, variant: str, phase: str) -> None:
        eager, fused, arguments = ops[op]
        with backend.use_backend(None if variant == "eager" else variant):
            benchmark(op_step(eager if variant == "eager" else fused, arguments(_x(shape)), phase))

    return memcpy, op_benchmark


def module_step(m: nn.Module, x: torch.Tensor, phase: str, *bridges: torch.Tensor) -> Callable[[], Any]:
    """One call of module `m` in `phase`: "forward" (eval mode, under inference_mode) or
    "forward_backward" (train mode, `m(x, *bridges).backward(g)` with a fixed random g, the
    inputs' grads reset). Sets m's mode; x (and any bridge maps, Bridge's) must require grad
    for "forward_backward"."""
    m.train(phase == "forward_backward")
    g = torch.randn_like(x)

    def forward():
        with torch.inference_mode():
            return m(x, *bridges)

    def forward_backward():
        m(x, *bridges).backward(g)
        for t in (x, *bridges):
            t.grad = None

    return _sync(forward if phase == "forward" else forward_backward)
