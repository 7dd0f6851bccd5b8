"""Timing of the criss_cross C++ CPU kernels against the Reference ops, eager and torch.compile.

    PYTHONPATH=. ATTNKERNELS_WITH_CUDA=0 python benchmarks/criss_cross_cpu_kernel.py [--threads 2] [--rounds 10]

Shape (N, C, H, W) = (2, 512, 64, 64), D = 64, fp32, NCHW, projections excluded on both sides:
the op (forward, and forward + criss_cross_backward) against Reference.criss_cross (forward,
and forward + autograd backward), eager and compiled. The rounds interleave the candidates and
each reports its best round (the machine may be shared).
"""
from __future__ import annotations

import argparse
import collections
import time

import torch

from attnkernels import _ext
from attnkernels.ops.criss_cross import Reference


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    _ext.load()
    torch.set_num_threads(args.threads)
    ops = torch.ops.attnkernels
    n, c, h, w, d = 2, 512, 64, 64, 64
    torch.manual_seed(0)
    q, k = (torch.randn(n, d, h, w) * 0.3 for _ in range(2))
    v, x, grad_y = (torch.randn(n, c, h, w) for _ in range(3))
    gamma = torch.tensor([0.5])

    def ref(*t):
        return Reference.criss_cross(*t)[0]

    compiled = torch.compile(ref)

    def op_forward():
        ops.criss_cross(q, k, v, x, gamma)

    def op_forward_backward():
        _, out, lse = ops.criss_cross(q, k, v, x, gamma)
        ops.criss_cross_backward(grad_y, q, k, v, gamma, out, lse)

    def forward(f):
        def run():
            with torch.no_grad():
                f(q, k, v, x, gamma)
        return run

    def forward_backward(f):
        def run():
            leaves = [t.detach().requires_grad_() for t in (q, k, v, x, gamma)]
            f(*leaves).backward(grad_y)
        return run

    cases = {
        "op forward": op_forward, "op forward+backward": op_forward_backward,
        "eager forward": forward(ref), "eager forward+backward": forward_backward(ref),
        "compiled forward": forward(compiled), "compiled forward+backward": forward_backward(compiled),
    }
    for f in cases.values():  # warm-up and compile
        f()
        f()
    best = collections.defaultdict(lambda: float("inf"))
    for _ in range(args.rounds):
        for name, f in cases.items():
            start = time.perf_counter()
            f()
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    print(f"threads={args.threads} (N, C, H, W, D) = {(n, c, h, w, d)} fp32 NCHW, best of {args.rounds} rounds")
    for name in cases:
        print(f"  {name:28s} {best[name]:8.1f} ms")


if __name__ == "__main__":
    main()
