"""pytest-benchmark of the criss_cross hot path per backend, against eager.

Run: `.venv/bin/python -m pytest benchmarks/bench_criss_cross.py --benchmark-only`
(add `--benchmark-group-by=param:shape` to compare backends side by side). Each group has a
`memcpy` row (x.clone()), and `eager` rows: reference.CrissCross's pass in torch ops (two
einsums for the energies, the masked column, one softmax over the concatenated H + W entries,
two einsums for out), on q, k, v given (D = C / 8, as CCNet's projections make them). gamma =
0.5. The `forward_backward` phase adds the backward op through autograd. Timing only, no
assertions on speed: the ratios are read from the table.
"""
from __future__ import annotations

import torch

from _bench_common import DEVICE, op_table
from attnkernels import functional as AF
from attnkernels.ops.criss_cross import HOT_PATH, Reference


def eager_criss_cross(q, k, v, x, gamma) -> torch.Tensor:
    return Reference.criss_cross(q, k, v, x, gamma)[0]


def arguments(x: torch.Tensor) -> list[torch.Tensor]:
    """q, k (N, C/8, H, W) and v (N, C, H, W) drawn like x, x, gamma."""
    n, c, h, w = x.shape
    q, k = (torch.randn(n, max(c // 8, 1), h, w, dtype=x.dtype, device=x.device) for _ in range(2))
    return [q, k, torch.randn_like(x), x, torch.tensor([0.5], device=DEVICE)]


#: op: (its eager composition, its public function, its arguments from x)
OPS = {"criss_cross": (eager_criss_cross, AF.criss_cross, arguments)}


test_memcpy, test_criss_cross = op_table(OPS, HOT_PATH)
