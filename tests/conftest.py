"""Fixtures shared by every test file: seeded randomness and the explicitly loaded C++ ops.
Shared builders and assertions live in tests/helpers.py."""
from __future__ import annotations

import os

# Triton kernels run on CPU tensors under the interpreter, which must be switched on before
# triton is first imported. A GPU run (scripts/gpu_check.sh) sets TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Algorithm choices by their static rules (attnkernels.choose): the same kernels every run, and
# no timing runs inside the tests. tests/test_choose.py measures, on a fake clock and for real.
os.environ.setdefault("ATTNKERNELS_CHOOSE", "static")

import pytest  # noqa: E402
import torch  # noqa: E402

import helpers  # noqa: E402

# fp32 on a GPU means fp32: cuDNN's convs (and, if a user switched it on, cuBLAS) default to
# TF32, whose 10-bit mantissa puts the references ~1e-4 away from the kernels, which multiply
# fp32 exactly. Low-precision tests compare against fp64 and eager same-precision runs.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

# ATTNKERNELS_TRITON_LAUNCHES=<file>: record every Triton launch of the run there, for the
# ahead-of-time compile check (scripts/triton_aot/, `make triton-aot`).
if os.environ.get("ATTNKERNELS_TRITON_LAUNCHES"):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "triton_aot"))
    import launches  # noqa: E402

    _recorder = launches.record(Path(os.environ["ATTNKERNELS_TRITON_LAUNCHES"]).resolve())

    def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
        # At the session's end too, not only at exit: a pytest-xdist worker may end without
        # running its exit handlers. Merging into the file twice adds nothing.
        _recorder.write()


# On pytest-xdist workers (`make test` runs one per core): each worker gets its share of the
# cores, so that workers do not oversubscribe them. The tests of thread-count invariance set
# their own counts.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def compiled_ops():
    """`torch.ops.attnkernels`, the C++ library loaded (built on first use), which registers
    every hot path's ops with their fakes, autograd and composites."""
    return helpers.load_compiled_ops()
