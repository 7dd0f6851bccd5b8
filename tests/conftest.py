"""Fixtures shared by every test file: seeded randomness and the explicitly loaded C++ ops.
Shared builders and assertions live in tests/helpers.py."""
from __future__ import annotations

import os

# Triton kernels run on CPU tensors under the interpreter, which must be switched on before
# triton is first imported. A GPU run (scripts/gpu_check.sh) sets TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import helpers  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def compiled_ops():
    """`torch.ops.attnkernels`, the C++ library loaded (built on first use), which registers
    every hot path's ops with their fakes, autograd and composites."""
    return helpers.load_compiled_ops()
