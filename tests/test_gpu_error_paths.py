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
    assert "every error reached Python" in done.stdout
