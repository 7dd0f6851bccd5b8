"""Record the Triton launches of the benchmark's modules at its default shapes, as on a GPU.

    python scripts/triton_aot/bench_launches.py build/triton_aot/bench_launches.json

For every module of `benchmarks/throughput.py` whose fused class runs on Triton, at the
benchmark's default CPU and CUDA shapes, in float32, bfloat16 and float16: a forward in eval
mode and a forward+backward in train mode, on the Triton backend, under the interpreter with
the launches recorded and not executed (`Recorder.dry`: the numbers are not read, and a launch
at 128x1024x14x14 would take the interpreter minutes). The host code picks block sizes as on an
H100/H200: `_min_programs` (2 programs per SM) answers for 132 SMs; a launch whose configuration
a GPU measures records every candidate (`LAUNCH_EVERY_CANDIDATE`). Torch's own half-precision
convs between the launches run in float32 (`half_convs_in_float32`).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

os.environ["TRITON_INTERPRET"] = "1"
# The fused kernels' launches, not a measured pick among candidates (which could be eager, and
# would time dry launches).
os.environ["ATTNKERNELS_CHOOSE"] = "static"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(HERE), str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

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


HALF = (torch.float16, torch.bfloat16)


def widened(t: Any) -> Any:
    """A half-precision tensor in float32 (its layout kept); anything else as it is."""
    return t.float() if isinstance(t, torch.Tensor) and t.dtype in HALF else t


@contextlib.contextmanager
def half_convs_in_float32() -> Iterator[None]:
    """Inside: torch's half-precision convolutions (F.conv2d, which nn.Conv2d calls, and the
    `aten.convolution_backward` that the library conv calls) run in float32 and round their
    results to the half dtype. Torch has no fast float16 conv on many CPUs (GAM at 32x256x56x56
    took two of this script's twelve minutes on an AMD EPYC), and a dry recording reads no
    values: every launch sees the dtypes, shapes and strides it would see without this.
    Patched at the Python level, not by a dispatch mode, because a custom op's implementation
    runs with the dispatch modes popped."""
    conv2d, conv_backward = F.conv2d, torch.ops.aten.convolution_backward

    def conv2d_wide(input: torch.Tensor, weight: torch.Tensor, bias: Any = None, *args: Any, **kwargs: Any) -> Any:
        if input.dtype not in HALF:
            return conv2d(input, weight, bias, *args, **kwargs)
        return conv2d(widened(input), widened(weight), widened(bias), *args, **kwargs).to(input.dtype)

    def conv_backward_wide(grad: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if grad.dtype not in HALF:
            return conv_backward(grad, *args, **kwargs)
        results = conv_backward(widened(grad), *map(widened, args), **kwargs)
        return tuple(t if t is None else t.to(grad.dtype) for t in results)

    F.conv2d, torch.ops.aten.convolution_backward = conv2d_wide, conv_backward_wide
    try:
        yield
    finally:
        F.conv2d, torch.ops.aten.convolution_backward = conv2d, conv_backward


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
                with half_convs_in_float32():
                    record_case(name, shape, dtype)
                print(f"{name} {'x'.join(map(str, shape))} {str(dtype)[6:]}: "
                      f"{len(recorder.specs)} specs so far ({time.perf_counter() - start:.1f} s)", flush=True)
    recorder.write()
    print(f"{len(recorder.specs)} launch specs -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
