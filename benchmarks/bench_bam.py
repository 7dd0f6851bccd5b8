"""pytest-benchmark of the bam hot path, op by op, per backend, against eager.

Run: `.venv/bin/python -m pytest benchmarks/bench_bam.py --benchmark-only`
(add `--benchmark-group-by=param:shape` to compare backends side by side). Each group has a
`memcpy` row (x.clone(): read x, write y), the floor of a memory-bound op, and `eager` rows,
BAM's combination in torch ops as reference.BAM runs it: `x * (1 + sigmoid(mc + ms))` with mc
(N, C, 1, 1) and ms (N, 1, H, W) broadcast, four x-sized passes. The branch outputs are random
logits, float32. The `forward_backward` phase adds the backward op through autograd. Timing
only, no assertions on speed: the ratios are read from the table.
"""
from __future__ import annotations

import torch

from _bench_common import DEVICE, op_table
from attnkernels import functional as AF
from attnkernels.ops.bam import HOT_PATH


def eager_apply(x: torch.Tensor, mc: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
    return x * (1 + torch.sigmoid(mc + ms))


def _branches(x: torch.Tensor) -> list[torch.Tensor]:
    """mc (N, C, 1, 1) and ms (N, 1, H, W) of x: logits of either sign."""
    n, c, h, w = x.shape
    return [torch.randn(n, c, 1, 1, device=DEVICE), torch.randn(n, 1, h, w, device=DEVICE)]


#: op: (its eager composition, its public function, its arguments from x)
OPS = {"apply": (eager_apply, AF.bam_apply, lambda x: [x, *_branches(x)])}


test_memcpy, test_bam = op_table(OPS, HOT_PATH)
