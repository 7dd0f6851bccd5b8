"""The CPU kernels' streaming stores (cpu_vec.h: store_stream) give the same bits as plain ones.

A kernel streams its output past the caches only when the op touches more bytes than the
last-level cache, which no ordinary test shape does. So each case runs twice in child
processes, once with ATTNKERNELS_STREAM_THRESHOLD=0 (every 16-byte-aligned vector streamed)
and once with a threshold no tensor reaches, and the outputs and gradients must be equal bit
for bit: a streaming store writes the same values, only past the caches. Shapes cover planes
whose start is aligned and not (odd H*W), channels_last rows, half precision, a view at an odd
storage offset, and the per-sample ops (SE's and Bridge's eval path).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from helpers import load_compiled_ops

ROOT = Path(__file__).resolve().parent.parent

# The child: every case's outputs and gradients, saved to argv[1].
CHILD = r"""
import sys, torch
from attnkernels import functional as AF
torch.manual_seed(0)
torch.set_num_threads(2)
results = {}
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for shape in ((3, 16, 7, 7), (4, 24, 8, 12), (2, 32, 5, 3)):
        for layout in ("nchw", "channels_last", "offset"):
            x = torch.randn(shape, dtype=dtype)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            elif layout == "offset":  # storage offset 1: no plane starts 16-byte aligned
                x = torch.randn(x.numel() + 1, dtype=dtype)[1:].view(shape)
            x.requires_grad_(True)
            N, C = shape[:2]
            g = torch.randn(shape, dtype=dtype)
            gate = torch.rand(N, C, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            key = (str(dtype), shape, layout)
            y = AF.channel_rescale(x, gate)
            (gx,) = torch.autograd.grad(y, x, g)
            results[key + ("channel_rescale",)] = [y, gx]
            w1, w2 = torch.randn(4, C, dtype=gate.dtype), torch.randn(C, 4, dtype=gate.dtype)
            b1 = torch.randn(N, 4, dtype=gate.dtype)
            with torch.no_grad():  # the per-sample kernels (N >= threads)
                results[key + ("channel_mlp_attention",)] = [AF.channel_mlp_attention(x, w1, b1, w2, None)]
                results[key + ("channel_attention",)] = [AF.channel_attention(x, torch.randn(3, dtype=gate.dtype))]
            weight, bias = torch.randn(2, C, dtype=dtype), torch.randn(2, dtype=dtype)
            y = AF.softmax_spatial(x, weight, bias, True)
            (gx,) = torch.autograd.grad(y, x, g)
            results[key + ("softmax_spatial",)] = [y, gx]
            s = torch.rand(N, 1, *shape[2:], dtype=gate.dtype)
            y = AF.cbam_spatial_apply(x, gate, s)
            (gx,) = torch.autograd.grad(y, x, g)
            results[key + ("cbam_spatial_apply",)] = [y, gx]
torch.save(results, sys.argv[1])
"""


def _run_child(tmp_path: Path, threshold: int) -> dict:
    out = tmp_path / f"threshold_{threshold}.pt"
    env = dict(os.environ, ATTNKERNELS_STREAM_THRESHOLD=str(threshold), ATTNKERNELS_BACKEND="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"child with ATTNKERNELS_STREAM_THRESHOLD={threshold} failed:\n{proc.stderr[-3000:]}"
    return torch.load(out)


def test_streamed_outputs_equal_plain_ones_bit_for_bit(tmp_path: Path) -> None:
    load_compiled_ops()  # built here once, so the children only load it
    streamed = _run_child(tmp_path, 0)
    plain = _run_child(tmp_path, 1 << 62)
    assert streamed.keys() == plain.keys() and len(streamed) == 3 * 3 * 3 * 5
    for key, tensors in plain.items():
        for i, (want, got) in enumerate(zip(tensors, streamed[key])):
            assert got.dtype == want.dtype and got.shape == want.shape, (key, i)
            assert torch.equal(got, want), f"{key} output {i}: streamed differs from plain stores"
            assert got.isfinite().all(), (key, i)  # random inputs: a NaN would be a wrong write
