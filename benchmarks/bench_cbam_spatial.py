"""pytest-benchmark of the cbam_spatial hot path, op by op, per backend, against eager.

Run: `.venv/bin/python -m pytest benchmarks/bench_cbam_spatial.py --benchmark-only`
(add `--benchmark-group-by=param:shape` to compare backends side by side). As in
bench_ham_spatial.py, each group has a `memcpy` row (x.clone(): read x, write y), the floor of a
memory-bound op, and `eager` rows, CBAM's spatial half in torch ops: `x*a` then the mean/amax
cat (pool), `x*a*s` (apply). The ops get CBAM's real arguments: the channel gate a (N, C) in
(0, 1) and a spatial gate s (N, 1, H, W), float32. The `forward_backward` phase adds the
backward op through autograd. Timing only, no assertions on speed: the ratios are read from
the table.
"""
from __future__ import annotations

import torch

from _bench_common import _channel_gate, _spatial_gate, op_table
from attnkernels import functional as AF
from attnkernels.ops.cbam_spatial import HOT_PATH


def eager_pool(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    f = x * a[:, :, None, None]
    return torch.cat([f.mean(1, keepdim=True), f.amax(1, keepdim=True)], dim=1)


def eager_apply(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x * a[:, :, None, None] * s


#: op: (its eager composition, its public function, its arguments (x, a[, s]) from x)
OPS = {
    "pool": (eager_pool, AF.cbam_spatial_pool, lambda x: [x, _channel_gate(x)]),
    "apply": (eager_apply, AF.cbam_spatial_apply, lambda x: [x, _channel_gate(x), _spatial_gate(x)]),
}


test_memcpy, test_cbam_spatial = op_table(OPS, HOT_PATH)
