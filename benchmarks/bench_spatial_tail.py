"""pytest-benchmark of the spatial_tail hot path, per backend, against eager.

Run: `.venv/bin/python -m pytest benchmarks/bench_spatial_tail.py --benchmark-only`
(add `--benchmark-group-by=param:shape` to compare backends side by side). Each group has a
`memcpy` row (x.clone(): read x, write y), the floor of a memory-bound op, and `eager` rows,
the tail as a ResNet block with CBAM or HAM runs it: training BatchNorm, the attention module
(reference, eager), the residual add and the ReLU. The fused rows are
`attnkernels.functional.spatial_tail` with the module's gates: three passes over the
activations forward, three backward. Timing only, no assertions on speed: the ratios are read
from the table.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from _bench_common import DEVICE, op_table
from attnkernels import functional as AF
from attnkernels import reference
from attnkernels.nn.block_tail import spatial_tail_gates
from attnkernels.ops.spatial_tail import HOT_PATH


@functools.lru_cache(maxsize=None)
def _attention(kind: str, channels: int) -> torch.nn.Module:
    """The attention module of a block with `channels` output channels (training mode)."""
    return reference.create(kind, channels).to(DEVICE).train()


def _running(c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)


def _eager(kind: str):
    def eager(z, shortcut, weight, bias):
        y = F.batch_norm(z, *_running(z.shape[1]), weight, bias, training=True)
        return torch.relu(_attention(kind, z.shape[1])(y) + shortcut)

    return eager


def _fused(kind: str):
    def fused(z, shortcut, weight, bias):
        channel_gate, spatial_gate, important = spatial_tail_gates(_attention(kind, z.shape[1]))
        return AF.spatial_tail(z, shortcut, *_running(z.shape[1]), weight, bias, training=True,
                               channel_gate=channel_gate, spatial_gate=spatial_gate, important=important)

    return fused


def _arguments(x: torch.Tensor) -> list[torch.Tensor]:
    """z = x, a shortcut like it, and BatchNorm's weight and bias (C,)."""
    c = x.shape[1]
    return [x, torch.randn_like(x), torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)]


#: op: (its eager composition, its public function, its arguments from x)
OPS = {kind: (_eager(kind), _fused(kind), _arguments) for kind in ("cbam", "ham")}


test_memcpy, test_spatial_tail = op_table(OPS, HOT_PATH)
