#!/usr/bin/env python
"""GAM: which conv algorithm ships, and how much time is spent outside the two 7x7 convs.

For GAM (groups 1 and the "gc" groups 4) at one shape, this times, interleaved round by round
as throughput.py does (the harness's timers, rotated inputs and `run_phase`):

* ``eager``          - the reference GAM;
* ``compile``        - ``torch.compile`` of the reference;
* ``fused``          - the fused GAM as it ships (``conv_algorithm="auto"``);
* ``fused-direct``   - the fused GAM with the backend's own conv kernels (shuffle_conv ops);
* ``fused-library``  - the fused GAM with torch's conv2d (oneDNN / cuDNN) for the GEMMs and the
  shuffle, BN, ReLU, sigmoid and multiply fused around them;

forward (eval, inference_mode) and forward+backward (train). Then, under torch.profiler, the
share of each variant's forward spent in convolutions: ``aten::convolution`` (and its
backward), or for ``fused-direct`` the ``shuffle_conv`` ops, whose time includes their fused
prologue and epilogue (so its "outside" share is a lower bound). The rest is the share outside
the convs: the MLP gate, BN, shuffle, sigmoid, the multiplies and the memory they move.

    python benchmarks/gam_breakdown.py                     # CPU, 8x256x28x28 fp32 (the issue's)
    python benchmarks/gam_breakdown.py --device cuda --dtype bfloat16 --shape 32x256x56x56

Prints a table and writes ``gam_breakdown.json`` to ``--out`` (if given).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List

_BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(_BENCH_DIR))
sys.path.insert(0, str(_BENCH_DIR.parent))

import torch  # noqa: E402

from attnkernels import nn as fused  # noqa: E402
from attnkernels.nn._fused import rebind  # noqa: E402
from attnkernels import reference as R  # noqa: E402
from attnkernels.profiling import ensure_benchmark_env  # noqa: E402
from harness.cache import last_level_cache  # noqa: E402
from harness.config import DEFAULT_REPEATS, DTYPES, parse_shape  # noqa: E402
from harness.machine import device_description  # noqa: E402
from harness.rows import ratio  # noqa: E402
from harness.timing import make_timer, run_phase, synchronize  # noqa: E402
from harness.variants import forward_step, make_inputs, training_step  # noqa: E402

VARIANTS = ("eager", "compile", "fused", "fused-direct", "fused-library")
# Profiler event names that are convolutions (their children, e.g. mkldnn_convolution, are inside).
CONV_EVENTS = ("aten::convolution", "aten::convolution_backward", "attnkernels::shuffle_conv",
               "attnkernels::shuffle_conv_backward")


def build(groups: int, shape, dtype, device) -> Dict[str, torch.nn.Module]:
    """The reference GAM and its compiled and fused versions. The fused modules are separate
    objects holding the same parameter tensors (not `as_fused` views, which share one
    __dict__ and so one conv_algorithm), so a training step's gradients reach the reference's
    parameters whichever variant runs."""
    torch.manual_seed(0)
    ref = R.GAM(shape[1], groups=groups).to(device, dtype)
    modules: Dict[str, Callable] = {"eager": ref, "compile": torch.compile(ref, dynamic=False)}
    for algo in ("auto", "direct", "library"):
        f = rebind(ref, fused.GAM)
        f.conv_algorithm = algo
        modules["fused" if algo == "auto" else f"fused-{algo}"] = f
    return ref, modules


def conv_share(fn: Callable[[], object], device: torch.device) -> float:
    """The fraction of `fn`'s profiled time spent in convolution ops (device time on CUDA)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    fn()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            fn()
        synchronize(device)
    events = prof.key_averages()
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    conv = sum(getattr(e, attr) for e in events if e.key in CONV_EVENTS)
    if device.type == "cuda":
        total = sum(e.self_device_time_total for e in events)
    else:
        total = sum(e.self_cpu_time_total for e in events)
    return conv / total if total else float("nan")


def measure(groups: int, shape, dtype, device, repeats: int) -> List[dict]:
    ref, modules = build(groups, shape, dtype, device)
    x = torch.randn(shape, dtype=dtype, device=device)
    inputs = make_inputs(shape, [], dtype, device, last_level_cache(device).bytes)
    phase = dict(repeats=repeats, warmup=1, device=device)
    timer = make_timer(device)
    params = [p for p in ref.parameters()]
    ref.eval()
    fwd = run_phase({v: forward_step(m, inputs) for v, m in modules.items()}, timer, **phase)
    shares = {}
    for v, m in modules.items():
        if v == "compile":
            continue  # inductor's generated kernels are not aten::convolution events
        def call(m=m):
            with torch.inference_mode():
                return m(x)
        shares[v] = conv_share(call, device)
    ref.train()
    bwd = run_phase({v: training_step(m, inputs, params) for v, m in modules.items()}, timer, **phase)
    rows = []
    eager_f, eager_b = fwd["eager"].median_ms, bwd["eager"].median_ms
    for v in VARIANTS:
        f_ms, b_ms = fwd[v].median_ms, bwd[v].median_ms
        rows.append({
            "module": "gam-gc" if groups > 1 else "gam", "variant": v,
            "forward_ms": f_ms, "fwd_bwd_ms": b_ms,
            "speedup_fwd": ratio(eager_f, f_ms), "speedup_fwd_bwd": ratio(eager_b, b_ms),
            "conv_share_fwd": shares.get(v), "error": fwd[v].error or bwd[v].error,
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--shape", default="8x256x28x28")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    ensure_benchmark_env()
    device = torch.device(args.device)
    shape = parse_shape(args.shape)
    repeats = args.repeats or DEFAULT_REPEATS[device.type]
    rows = [r for g in (1, 4) for r in measure(g, shape, DTYPES[args.dtype], device, repeats)]
    print(f"GAM breakdown, {args.shape} {args.dtype} on {device_description(device)}; {repeats} rounds, medians")
    print(f"{'module':<7} {'variant':<14} {'fwd ms':>8} {'f+b ms':>8} {'x fwd':>6} {'x f+b':>6} {'conv %':>7} {'outside %':>9}")
    for r in rows:
        share = r["conv_share_fwd"]
        cells = [f"{r['forward_ms']:8.2f}" if r["forward_ms"] else f"{'-':>8}",
                 f"{r['fwd_bwd_ms']:8.2f}" if r["fwd_bwd_ms"] else f"{'-':>8}",
                 f"{r['speedup_fwd']:6.2f}" if r["speedup_fwd"] else f"{'-':>6}",
                 f"{r['speedup_fwd_bwd']:6.2f}" if r["speedup_fwd_bwd"] else f"{'-':>6}",
                 f"{100 * share:7.1f}" if share is not None else f"{'-':>7}",
                 f"{100 * (1 - share):9.1f}" if share is not None else f"{'-':>9}"]
        print(f"{r['module']:<7} {r['variant']:<14} " + " ".join(cells) + (f"  {r['error']}" if r["error"] else ""))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gam_breakdown.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
