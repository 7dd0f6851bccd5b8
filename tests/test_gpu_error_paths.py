"""scripts/gpu_error_paths.py on this machine: every C++ error it provokes reaches Python (the
cases that need a GPU say they were skipped). The CUDA kernels' argument checks run here too,
on CPU tensors, where the extension was built with nvcc."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import helpers

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_error_paths.py"


def test_every_error_reaches_python() -> None:
    helpers.load_compiled_ops()  # built once here, not in each child process
    from attnkernels import _ext

    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    lines = dict(line.split(None, 1) for line in done.stdout.splitlines() if line.strip() and " " in line)
    assert done.returncode == 0, done.stdout + done.stderr
    assert lines["torch-cpu"].startswith("raised RuntimeError: The size of tensor a (2)")
    assert lines["ours-cpu"].startswith("raised ValueError: gam_channel: x must be 4-D")
    if _ext.cuda_compiled():
        assert lines["ours-cuda-kernel"].startswith("raised ValueError: gam_channel: x must be 4-D")
    assert lines["ours-cpu-words"].startswith("raised TypeError: gam_channel: x must be a floating-point tensor")
    assert "every error reached Python" in done.stdout
    assert lines["our"].startswith("library: ")  # the toolchain facts follow the cases
    assert "libstdc++ symbols it defines itself: 0" in done.stdout  # linked to the shared libstdc++


def test_checks_format_without_streams() -> None:
    """Every argument check builds its message with attnkernels::text (AK_CHECK_VALUE /
    AK_CHECK_TYPE): a TORCH_CHECK with several message arguments streams them through
    std::ostream, which crashed inside this library on the GPU machine (benchmarks/NOTES.md,
    session 17)."""
    csrc = SCRIPT.parent.parent / "csrc"
    streaming = [
        f"{path.relative_to(csrc)}:{number}"
        for path in sorted(csrc.rglob("*"))
        if path.suffix in {".h", ".cuh", ".cpp", ".cu"}
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if any(macro in line for macro in ("TORCH_CHECK(", "TORCH_CHECK_VALUE(", "TORCH_CHECK_TYPE("))
        and not line.startswith("#define AK_CHECK_")
    ]
    assert not streaming, f"use AK_CHECK_VALUE / AK_CHECK_TYPE (attnkernels/common.h) at {streaming}"
