"""pytest-benchmark of the triplet hot path, op by op, per backend, against eager.

Run: `.venv/bin/python -m pytest benchmarks/bench_triplet.py --benchmark-only`
(add `--benchmark-group-by=param:shape` to compare backends side by side). Each group has a
`memcpy` row (x.clone(): read x, write y), the floor of a memory-bound op, and `eager` rows,
Triplet's hot path in torch ops as its reference gates run it: the three [max, mean] poolings
of x seen through each gate's permute (pool), and `(x*s_hw + x*s_cw + x*s_hc) / 3` with the
gates broadcast (apply). The gates s_* are random one-plane maps in (0, 1), float32. The
`forward_backward` phase adds the backward op through autograd. Timing only, no assertions on
speed: the ratios are read from the table.
"""
from __future__ import annotations

import torch

from _bench_common import DEVICE, op_table
from attnkernels import functional as AF
from attnkernels.ops.triplet import GATES, HOT_PATH, in_plane, plane_shape


def eager_pool(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[max, mean] over C, H and W, each through its gate's view of x."""
    return tuple(torch.cat([v.amax(1, keepdim=True), v.mean(1, keepdim=True)], dim=1)
                 for v in (in_plane(x, g) for g in GATES))


def eager_apply(x: torch.Tensor, s_hw: torch.Tensor, s_cw: torch.Tensor, s_hc: torch.Tensor) -> torch.Tensor:
    return (x * s_hw + x * s_cw.permute(0, 2, 1, 3) + x * s_hc.permute(0, 3, 2, 1)) / 3


def _gates(x: torch.Tensor) -> list[torch.Tensor]:
    """s_hw (N, 1, H, W), s_cw (N, 1, C, W), s_hc (N, 1, H, C) of x, in (0, 1)."""
    return [torch.rand(plane_shape(x, g, 1), device=DEVICE) * 0.98 + 0.01 for g in GATES]


#: op: (its eager composition, its public function, its arguments from x)
OPS = {
    "pool": (eager_pool, AF.triplet_pool, lambda x: [x]),
    "apply": (eager_apply, AF.triplet_apply, lambda x: [x, *_gates(x)]),
}


test_memcpy, test_triplet = op_table(OPS, HOT_PATH)
