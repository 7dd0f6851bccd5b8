"""Shared test fixtures: seeded randomness and module builders for every registry name."""
from __future__ import annotations

import os

# Triton kernels run on CPU tensors under the interpreter, which must be switched on before
# triton is first imported. A GPU run (scripts/gpu_check.sh) sets TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from attnkernels import reference as R  # noqa: E402

# (N, C, H, W): C not a power of two, H != W, HW = 1, N = 1.
SHAPES = [(2, 24, 7, 5), (1, 40, 3, 4), (3, 16, 1, 1), (2, 8, 6, 6)]

# Modules holding BatchNorm1d cannot train on one sample (torch refuses).
BATCHNORM1D_MODULES = {"bridge", "bam"}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def module_kwargs(name: str, channels: int) -> dict:
    """Constructor arguments that make every module valid at every test channel count."""
    if name in ("gam", "bam"):
        return {"reduction": 8}
    if name == "bridge":
        return {"bridge_channels": [max(channels // 2, 1), 3]}
    return {}


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Random parameters and running stats, so no term of a formula hides behind 0 or 1."""
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.6, 0.6)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.uniform_(-0.3, 0.3)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return module


def build(name: str, channels: int, dtype: torch.dtype = torch.float64, train: bool = True):
    """A randomized module of registry `name`, in `dtype` and train/eval mode."""
    m = R.create(name, channels, **module_kwargs(name, channels))
    randomize(m).to(dtype)
    return m.train(train)


def bridge_inputs(module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Random bridge maps for a Bridge module (each its own spatial size); [] otherwise."""
    if not getattr(module, "takes_bridges", False):
        return []
    n, _, h, w = x.shape
    return [
        torch.randn(n, c, h + i + 1, w + 2 * i, dtype=x.dtype) for i, c in enumerate(module.bridge_channels)
    ]


def train_modes(name: str, n: int) -> list[bool]:
    """Training and eval, except training where torch's BatchNorm1d needs more than one sample."""
    return [False] if n == 1 and name in BATCHNORM1D_MODULES else [True, False]
