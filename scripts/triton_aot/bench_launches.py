"""Record the Triton launches of the benchmark's modules at its default shapes, as on a GPU.

    python scripts/triton_aot/bench_launches.py build/triton_aot/bench_launches.json

For every module of `benchmarks/throughput.py` whose fused class runs on Triton, at the
benchmark's default CPU and CUDA shapes, in float32, bfloat16 and float16: a forward in eval
mode and a forward+backward in train mode, on the Triton backend, under the interpreter with
the launches recorded and not executed (`Recorder.dry`: the numbers are not read, and a launch
at 128x1024x14x14 would take the interpreter minutes). The host code picks block sizes as on an
H100/H200: `_min_programs` (2 programs per SM) answers for 132 SMs; a launch whose configuration
a GPU measures records every candidate (`LAUNCH_EVERY_CANDIDATE`).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
# The fused kernels' launches, not a measured pick among candidates (which could be eager, and
# would time dry launches).
os.environ["ATTNKERNELS_CHOOSE"] = "static"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(HERE), str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402

import launches  # noqa: E402
from attnkernels import backend  # noqa: E402
from attnkernels.nn import as_fused  # noqa: E402
from attnkernels.triton import _common  # noqa: E402
from harness.config import DEFAULT_SHAPES, parse_shape, split_list  # noqa: E402
from harness.backends import module_backends  # noqa: E402
from harness.variants import bridge_channels_of, build_module, module_names, registry_name  # noqa: E402

H100_SMS = 132
# Every candidate configuration of a launch that a GPU measures (attnkernels.choose), not only
# the static rule's: each one must compile.
_common.LAUNCH_EVERY_CANDIDATE = True
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_modules() -> list[str]:
    """The benchmark's module names whose fused class runs every hot path on Triton."""
    cpu = torch.device("cpu")
    return [name for name in module_names() if not module_backends(registry_name(name), cpu, ["triton"]).get("triton", "x")]


def record_case(name: str, shape: tuple, dtype: torch.dtype) -> None:
    n, c, h, w = shape
    module = build_module(name, c, dtype, torch.device("cpu"))
    fused = as_fused(module)
    bridges = [torch.randn(n, k, h, w, dtype=dtype) for k in bridge_channels_of(module)]
    x = torch.randn(shape, dtype=dtype)
    with backend.use_backend("triton"):
        module.eval()
        with torch.inference_mode():
            fused(x, *bridges)
        module.train()
        leaves = [t.detach().requires_grad_(True) for t in (x, *bridges)]
        fused(*leaves).backward(torch.randn(shape, dtype=dtype))


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    out = Path(sys.argv[1]).resolve()
    recorder = launches.record(out)
    recorder.dry = True
    _common._min_programs = lambda device: 2 * H100_SMS
    shapes = [parse_shape(s) for key in ("cpu", "cuda") for s in split_list(DEFAULT_SHAPES[key])]
    torch.set_num_threads(os.cpu_count() or 1)
    for name in triton_modules():
        for shape in shapes:
            for dtype in DTYPES:
                start = time.perf_counter()
                record_case(name, shape, dtype)
                print(f"{name} {'x'.join(map(str, shape))} {str(dtype)[6:]}: "
                      f"{len(recorder.specs)} specs so far ({time.perf_counter() - start:.1f} s)", flush=True)
    recorder.write()
    print(f"{len(recorder.specs)} launch specs -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
