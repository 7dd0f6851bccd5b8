"""Host time per module call: what a fused module costs the CPU thread that launches it.

On a GPU an attention module at ResNet sizes reads 50 MB in about 15 us, so the Python and
dispatch work around its kernels decides whether it keeps up: the first GPU run
(benchmarks/NOTES.md, "Session 16") measured ECA's fused CUDA op at 0.085 ms but its module
at 0.160 ms, the difference host time. This times calls on a tiny input (2 x C x 2 x 2),
where the kernels take next to nothing, back to back with one synchronize at the end, so the
time per call is the host's: eager reference vs fused module on each backend, forward under
inference_mode and forward+backward.

    python benchmarks/host_overhead.py [--device cpu|cuda] [--modules eca,se,...] [--calls N]

Prints microseconds per call (median of 5 batches of N calls). Algorithm choices are made by
their static rules (no timing runs), so every call runs the same kernels.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("ATTNKERNELS_CHOOSE", "static")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from attnkernels import backend  # noqa: E402
from attnkernels.nn import as_fused  # noqa: E402
from attnkernels.reference import create  # noqa: E402

MODULES = ("eca", "se", "ham", "gam", "softmax_spatial", "pam")
CHANNELS = 32


def per_call_us(step, calls: int, device: torch.device) -> float:
    """Median over 5 batches of the host time per call of `step`, the GPU drained once per batch."""
    for _ in range(20):
        step()
    times = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def steps(module: torch.nn.Module, x: torch.Tensor, backend_name: str | None):
    """(forward, forward+backward) callables on x, on `backend_name` (None: the eager module)."""
    leaf = x.detach().requires_grad_()
    g = torch.randn_like(x)

    def pinned():
        return backend.use_backend(backend_name) if backend_name else contextlib.nullcontext()

    def forward():
        with torch.inference_mode(), pinned():
            module.eval()(x)

    def forward_backward():
        with pinned():
            module.train()(leaf).backward(g)
        leaf.grad = None
        for p in module.parameters():
            p.grad = None

    return forward, forward_backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modules", default=",".join(MODULES))
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    device = torch.device(args.device)
    x = torch.randn(2, CHANNELS, 2, 2, device=device)
    names = [name for name in args.modules.split(",") if name]
    backends = [b for b in ("cpu", "cuda", "triton") if backend.why_unavailable(b, "channel_gate", device) is None]
    print(f"host us per call | {device} | torch {torch.__version__} | x {tuple(x.shape)} | "
          f"{args.calls} calls x 5 batches, median")
    print(f"{'module':16s} {'variant':14s} {'fwd us':>9s} {'f+b us':>9s}")
    for name in names:
        reference = create(name, CHANNELS).to(device)
        fused = as_fused(reference)
        variants = {"eager": (reference, None), **{f"fused-{b}": (fused, b) for b in backends}}
        for variant, (module, backend_name) in variants.items():
            try:
                fwd, fb = steps(module, x, backend_name)
                row = f"{per_call_us(fwd, args.calls, device):9.1f} {per_call_us(fb, args.calls, device):9.1f}"
            except Exception as err:  # a backend that cannot run this module: say why, go on
                row = f"  {type(err).__name__}: {str(err).splitlines()[0][:80]}"
            print(f"{name:16s} {variant:14s} {row}", flush=True)


if __name__ == "__main__":
    main()
