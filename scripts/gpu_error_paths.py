"""Do C++ errors reach Python on this machine, or do they crash the process?

The first GPU run (benchmarks/NOTES.md, "Session 16: the first GPU run") lost four pytest
workers to SIGSEGV in `test_op_input_errors[cuda]`: an op's argument check threw a c10 error
from a CUDA kernel's host code, and the process died instead of raising ValueError. The CPU
ops' identical checks had never thrown on that machine, and Triton had run in the same
processes, so the cause could be our build, the toolchain, or the unwinder meeting an object
loaded by Triton. Each case below throws once, in a fresh process, and the run prints one line
per case: "raised <Error>" or "CRASHED (signal N)". Comparing the lines separates the causes:

    torch-*           torch's own error (a broadcast mismatch): the environment;
    ours-cpu          an attnkernels CPU op (g++-compiled) with a 3-D x;
    ours-cuda-kernel  the CUDA kernel's host code (nvcc-compiled) on CPU tensors, reached by
                      redispatching to the CUDA key: our CUDA objects, without a GPU;
    ours-cuda         the CUDA op on CUDA tensors, as the test does;
    ours-cpu-words    the CPU op with int32 x: a TypeError whose message holds no number;
and each again after one Triton launch ("+triton").

The second lease (H200, torch 2.11, CUDA 13.0) answered: torch's errors raise; every case of
ours crashes, CPU ones too, and the backtrace ends in std::ostream::_M_insert<long> (the error
message's integer) under check_gam_channel_args, with cuda-gdb naming libstdc++ internals
(std::codecvt<char16_t>::do_unshift) inside our .so. So the suspects are the formatting of a
number into a stream in code compiled into our library, and the way that library is linked.
After the cases the script prints what tells these apart: "ours-cpu-words" (no number in the
message), a tiny extension built here with torch's default flags that throws the same way
("inline-probe", only when ours crashed: a crash there too means any extension built on this
machine, not our flags), and the toolchain: compilers, our library's NEEDED entries and
whether it defines libstdc++'s own symbols, and the libstdc++ the process maps. Since then our
checks build their messages without a stream (attnkernels::text, csrc/include/attnkernels/common.h),
so ours should raise there too; "inline-probe" still runs if one crashes.

    python scripts/gpu_error_paths.py [--gdb]

--gdb runs the first crashing case again under cuda-gdb (or gdb) and prints the native
backtrace. Exit code 1 if a case crashed. Without a GPU the CUDA cases are skipped.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ("torch-cpu", "torch-cuda", "ours-cpu", "ours-cuda-kernel", "ours-cuda", "ours-cpu-words")
# A one-function extension that throws like our checks do (c10::ValueError, an int64 in the text).
PROBE_SOURCE = """
#include <torch/extension.h>
int64_t throw_value_error(int64_t n) {
  TORCH_CHECK_VALUE(n < 0, "inline-probe: n must be negative, got ", n);
  return n;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("throw_value_error", &throw_value_error); }
"""


def throw(case: str, after_triton: bool) -> None:
    """The child: make `case` throw once and print what reached Python."""
    import torch

    import attnkernels._ext as ext

    ext.load()
    if after_triton:
        from attnkernels.triton import channel_gate  # noqa: F401  (registers its ops)

        avg, _ = torch.ops.attnkernels_triton.channel_pool(torch.randn(2, 8, 4, 4, device="cuda"))
        torch.cuda.synchronize()
        print(f"a Triton kernel ran ({tuple(avg.shape)})", flush=True)
    device = "cuda" if case.endswith("cuda") else "cpu"
    try:
        if case.startswith("torch"):
            torch.ones(2, device=device) + torch.ones(3, device=device)
        elif case == "inline-probe":
            inline_probe().throw_value_error(3)
        elif case == "ours-cpu-words":
            x = torch.ones(2, 12, 3, 4, dtype=torch.int32)
            w1, b1, w2, b2 = (torch.randn(*s) for s in [(3, 12), (3,), (12, 3), (12,)])
            torch.ops.attnkernels.gam_channel.default(x, w1, b1, w2, b2)
        else:
            x = torch.randn(2, 12, 3, 4, device=device)
            w1, b1, w2, b2 = (torch.randn(*s, device=device) for s in [(3, 12), (3,), (12, 3), (12,)])
            op = torch.ops.attnkernels.gam_channel.default
            if case == "ours-cuda-kernel":
                keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
                op.redispatch(keys, x[0], w1, b1, w2, b2)
            else:
                op(x[0], w1, b1, w2, b2)
        print("raised nothing", flush=True)
    except Exception as err:  # what we want to see: the error, in Python
        print(f"raised {type(err).__name__}: {str(err).splitlines()[0][:100]}", flush=True)


def inline_probe():
    """PROBE_SOURCE built with torch's default flags (cached in torch's extension folder)."""
    from torch.utils.cpp_extension import load_inline

    return load_inline("attnkernels_error_probe", cpp_sources=[PROBE_SOURCE], verbose=False)


def toolchain() -> list[str]:
    """Facts that tell a toolchain or link fault from ours: compilers, our library's NEEDED
    entries and any libstdc++ symbols it defines itself, the libstdc++ the process maps."""
    import torch

    import attnkernels._ext as ext

    def sh(*command: str) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"({err})"
        return (done.stdout or done.stderr).strip()

    library = ext.load()
    own_std = [line for line in sh("nm", "-C", "--defined-only", library).splitlines()
               if "std::locale::" in line or "codecvt" in line or "std::ostream::_M_insert" in line]
    with open("/proc/self/maps") as maps:
        mapped = sorted({line.split()[-1] for line in maps if "libstdc++" in line or "libgcc_s" in line})
    return [
        f"c++: {sh('c++', '--version').splitlines()[:1]}",
        f"nvcc: {sh('nvcc', '--version').splitlines()[-1:]}",
        f"torch {torch.__version__}, built with the C++11 ABI: {torch._C._GLIBCXX_USE_CXX11_ABI}",
        f"our library: {library}",
        "  NEEDED: " + ", ".join(line.split()[-1].strip("[]") for line in sh("readelf", "-d", library).splitlines()
                                 if "NEEDED" in line),
        f"  libstdc++ symbols it defines itself: {len(own_std)} {[line[19:80] for line in own_std[:3]]}",
        "  compiled by: " + "; ".join(sorted({line.split("]", 1)[1].strip() for line in
                                              sh("readelf", "-p", ".comment", library).splitlines() if "]" in line})),
        f"the process maps: {mapped}",
    ]


def child_command(case: str, after_triton: bool) -> list[str]:
    return [sys.executable, "-X", "faulthandler", __file__, "--child", case] + (["--after-triton"] if after_triton else [])


def run_case(case: str, after_triton: bool) -> tuple[str, bool]:
    """(one line of outcome, whether the process crashed)."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    try:
        done = subprocess.run(child_command(case, after_triton), capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired:
        return "HUNG (no answer in 300 s)", True
    lines = [line for line in done.stdout.splitlines() if line.startswith("raised")]
    if done.returncode < 0:
        return f"CRASHED (signal {-done.returncode})", True
    if done.returncode != 0 or not lines:
        return f"FAILED (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}", True
    return lines[-1], False


def backtrace(case: str, after_triton: bool) -> str:
    """The native backtrace of `case` under cuda-gdb or gdb, or why there is none."""
    debugger = shutil.which("cuda-gdb") or shutil.which("gdb")
    if debugger is None:
        return "no cuda-gdb or gdb here: no native backtrace"
    command = [debugger, "-q", "-batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt",
               "--args", *child_command(case, after_triton)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return f"{debugger} gave no answer in 300 s"
    frames = [line for line in done.stdout.splitlines() if line.startswith("#")]
    return "\n".join(frames[:40]) or done.stdout[-4000:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gdb", action="store_true", help="backtrace the first crash under cuda-gdb/gdb")
    parser.add_argument("--child", choices=CASES + ("inline-probe",), help=argparse.SUPPRESS)
    parser.add_argument("--after-triton", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        throw(args.child, args.after_triton)
        return 0

    import torch

    gpu = torch.cuda.is_available()
    crashes = []
    for after_triton in (False, True):
        for case in CASES:
            name = case + ("+triton" if after_triton else "")
            if (case.endswith("cuda") or after_triton) and not gpu:
                print(f"{name:24s} skipped: no GPU", flush=True)
                continue
            outcome, crashed = run_case(case, after_triton)
            print(f"{name:24s} {outcome}", flush=True)
            if crashed:
                crashes.append((case, after_triton))
    if any(case.startswith("ours") for case, _ in crashes):
        outcome, crashed = run_case("inline-probe", False)  # builds once: tens of seconds
        print(f"{'inline-probe':24s} {outcome}", flush=True)
        if crashed:
            crashes.append(("inline-probe", False))
    print("\ntoolchain:\n" + "\n".join(toolchain()), flush=True)
    if crashes and args.gdb:
        case, after_triton = crashes[0]
        print(f"\nnative backtrace of {case}{'+triton' if after_triton else ''}:\n{backtrace(case, after_triton)}")
    print(f"{len(crashes)} case(s) crashed" if crashes else "every error reached Python")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
