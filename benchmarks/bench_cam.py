"""pytest-benchmark of the cam hot path per backend, against eager.

Run: `.venv/bin/python -m pytest benchmarks/bench_cam.py --benchmark-only`
(add `--benchmark-group-by=param:shape` to compare backends side by side). Each group has a
`memcpy` row (x.clone()), and `eager` rows: reference.CAM's composition in torch ops (two bmm
with fp32 energies, `softmax(rowmax(E) - E)`, `gamma * out + x`), whose second bmm runs on the
subnormal weights that softmax leaves. gamma = 0.5. The `forward_backward` phase adds the
backward op through autograd. Timing only, no assertions on speed: the ratios are read from
the table.
"""
from __future__ import annotations

import torch

from _bench_common import DEVICE, op_table
from attnkernels import functional as AF
from attnkernels.ops.cam import HOT_PATH
from attnkernels.reference.formulas import accumulate_dtype


def eager_cam(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    xf = x.reshape(n, c, h * w).to(accumulate_dtype(x.dtype))
    energy = torch.bmm(xf, xf.transpose(1, 2))
    attention = torch.softmax(energy.amax(dim=-1, keepdim=True) - energy, dim=-1)
    return gamma * torch.bmm(attention, xf).view(n, c, h, w).to(x.dtype) + x


#: op: (its eager composition, its public function, its arguments from x)
OPS = {"cam": (eager_cam, AF.cam, lambda x: [x, torch.tensor([0.5], device=DEVICE)])}


test_memcpy, test_cam = op_table(OPS, HOT_PATH)
