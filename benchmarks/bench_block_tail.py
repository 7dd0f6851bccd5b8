"""pytest-benchmark of the block_tail hot path, per backend, against eager.

Run: `.venv/bin/python -m pytest benchmarks/bench_block_tail.py --benchmark-only`
(add `--benchmark-group-by=param:shape` to compare backends side by side). Each group has a
`memcpy` row (x.clone(): read x, write y), the floor of a memory-bound op, and `eager` rows,
the tail as a ResNet block runs it: training BatchNorm, the gate's pooling and product, the
residual add and the ReLU, each a pass over the activations. `gated` has a gate
(sigmoid of the pooled mean, standing in for SE's or ECA's), `bare` none (the plain
ResNet's tail). The fused rows are `attnkernels.functional.block_tail`: two passes forward,
two backward. Timing only, no assertions on speed: the ratios are read from the table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from _bench_common import DEVICE, op_table
from attnkernels import functional as AF
from attnkernels.ops.block_tail import HOT_PATH


def _gate(avg: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(avg)


def _running(c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)


def eager_gated(z, shortcut, weight, bias):
    y = F.batch_norm(z, *_running(z.shape[1]), weight, bias, training=True)
    return torch.relu(y * _gate(y.mean((2, 3)))[:, :, None, None] + shortcut)


def eager_bare(z, shortcut, weight, bias):
    return torch.relu(F.batch_norm(z, *_running(z.shape[1]), weight, bias, training=True) + shortcut)


def fused_gated(z, shortcut, weight, bias):
    return AF.block_tail(z, shortcut, *_running(z.shape[1]), weight, bias, training=True, gate=_gate)


def fused_bare(z, shortcut, weight, bias):
    return AF.block_tail(z, shortcut, *_running(z.shape[1]), weight, bias, training=True)


def _arguments(x: torch.Tensor) -> list[torch.Tensor]:
    """z = x, a shortcut like it, and BatchNorm's weight and bias (C,)."""
    c = x.shape[1]
    return [x, torch.randn_like(x), torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)]


#: op: (its eager composition, its public function, its arguments from x)
OPS = {"gated": (eager_gated, fused_gated, _arguments), "bare": (eager_bare, fused_bare, _arguments)}


test_memcpy, test_block_tail = op_table(OPS, HOT_PATH)
