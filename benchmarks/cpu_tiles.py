"""What PAM's CPU thread split is on this machine: the tile `attnkernels.choose` measures fastest
for nonlocal_attn's forward and backward, against the static rule's, per shape.

    python benchmarks/cpu_tiles.py [--shapes 4x512x28x28,1x256x28x28]

Each shape (N x C x H x W, D_qk = C/8 as in PAM) runs one forward+backward of the op on the C++
CPU backend in measure mode; the chooser's own timings (interleaved rounds from cold caches,
medians) are printed for every candidate tile, the rule's value first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from attnkernels import backend, choose  # noqa: E402
from attnkernels import functional as AF  # noqa: E402
from attnkernels.ops import nonlocal_attn as nonlocal_attn_ops  # noqa: E402

SHAPES = "4x512x28x28,1x512x14x14,1x256x28x28,8x64x14x14,2x256x56x56"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=SHAPES, help=f"comma-separated NxCxHxW (default {SHAPES})")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    print(f"{choose.machine()}\n{'shape':14s} {'direction':9s} {'rule':>5s} {'winner':>6s}  ms per candidate")
    for text in args.shapes.split(","):
        n, c, h, w = (int(v) for v in text.split("x"))
        q, k = (torch.randn(n, max(1, c // 8), h, w, requires_grad=True) for _ in range(2))
        v, x = (torch.randn(n, c, h, w, requires_grad=True) for _ in range(2))
        gamma = torch.tensor([0.5], requires_grad=True)
        choose.clear()
        with choose.mode("measure"), backend.use_backend("cpu"):
            AF.nonlocal_attn(q, k, v, x, gamma).sum().backward()
        for made in choose.made():
            direction = made.site.split(".")[1]
            rule = nonlocal_attn_ops.cpu_tile_rule(direction, n, h * w, threads)
            times = ", ".join(f"{tile} {ms:.3g}" for tile, ms in made.times_ms.items())
            print(f"{text:14s} {direction:9s} {rule:5d} {made.winner:>6s}  {times}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
