"""How a fused module's fp16/bf16 error compares with eager's, over many seeds.

The tests judge a low-precision result by one seed (flash-attention's criterion: fused error
against the fp64 truth at most twice eager's, plus a rounding floor). When one case fails on a
GPU, this says whether the failure is a bias of the kernel (the ratio stays high seed after seed)
or one unlucky draw (a ReLU unit or top-k pick that flips between paths, an eager rounding that
happened to cancel). For each module, backend and result it prints the median and largest ratio
err_fused / err_eager over the seeds, the ratio of their sums over the seeds (what
tests/test_nonlocal_attn.py's half-precision test bounds by 2), and how many seeds alone fail.

    python scripts/low_precision_report.py --device cuda --dtype float16 --modules csm,pam --seeds 16
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]
import attnkernels  # noqa: E402,F401  (registers the ops)
from attnkernels import nn as fused  # noqa: E402
from attnkernels import reference as R  # noqa: E402
from helpers import max_error, rounding_floor, seeded_low_precision_runs  # noqa: E402

MODULES = {"pam": (fused.PAM, R.PAM), "csm": (fused.CSM, R.CSM), "se": (fused.SE, R.SE),
           "eca": (fused.ECA, R.ECA), "ham": (fused.HAM, R.HAM), "gam": (fused.GAM, R.GAM)}


def errors(name: str, backend_name: str, dtype: torch.dtype, device: str, shape: tuple, seed: int):
    """[(result name, err_fused, err_eager, truth max)] of one seed."""
    names, exact, low, eager = seeded_low_precision_runs(*MODULES[name], shape, dtype, device, seed, backend_name)
    return [(n, max_error(a, t), max_error(b, t), t.abs().max().item()) for n, a, b, t in zip(names, low, eager, exact)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default=None, help="comma list (default: the device's name)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--modules", default="csm,pam")
    parser.add_argument("--shape", default="2x64x12x12")
    parser.add_argument("--seeds", type=int, default=16)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    shape = tuple(int(s) for s in args.shape.split("x"))
    floor = max(1e-3, rounding_floor(dtype))
    print(f"{args.dtype} {args.shape}, seeds 0..{args.seeds - 1}; criterion: err <= 2 err_eager + {floor:.2e} max|truth|")
    print(f"{'module':7} {'backend':8} {'result':26} {'median':>7} {'max':>7} {'pooled':>7} {'fails':>6}  worst seed: err / eager / max|truth|")
    for name in args.modules.split(","):
        for backend_name in (args.backends or args.device).split(","):
            rows: dict[str, list[tuple[int, float, float, float]]] = {}
            for seed in range(args.seeds):
                for result, e, b, t in errors(name, backend_name, dtype, args.device, shape, seed):
                    rows.setdefault(result, []).append((seed, e, b, t))
            for result, runs in rows.items():
                if max(t for *_, t in runs) < 1e-9:
                    continue  # exact gradient 0 (PAM's key.bias: softmax ignores it): noise only
                ratios = [e / max(b, 1e-30) for _, e, b, _ in runs]
                fails = sum(e > 2 * b + floor * t for _, e, b, t in runs)
                seed, e, b, t = runs[max(range(len(runs)), key=ratios.__getitem__)]
                pooled = sum(e for _, e, _, _ in runs) / max(sum(b for _, _, b, _ in runs), 1e-30)
                print(f"{name:7} {backend_name:8} {result:26} {statistics.median(ratios):7.2f} {max(ratios):7.2f} "
                      f"{pooled:7.2f} "
                      f"{fails:3}/{len(runs):<2}  {seed}: {e:.3g} / {b:.3g} / {t:.3g}")


if __name__ == "__main__":
    main()
