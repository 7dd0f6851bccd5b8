"""Shared setup and helpers of the Triton hot-path tests (tests/test_*_triton.py).

Import this module before any `attnkernels.triton` kernel module: without CUDA it switches the
Triton interpreter on, which must happen before triton is first imported, and the kernels then
run on CPU tensors (DEVICE "cpu", shapes kept tiny).
"""
import os
import re

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attnkernels.triton import _common  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
DEVICE = "cpu" if INTERPRET else "cuda"
ops = torch.ops.attnkernels_triton

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16


def shape_id(s) -> str:
    return "x".join(map(str, s))


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def acc_of(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return F64 if dtype == F64 else F32


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------
def make_t(shape, dtype, layout, scale=1.0):
    """A random tensor of `shape` in `layout`: NCHW, channels_last, a strided H*W slice whose
    pixels do not flatten to one stride (when H, W > 1), or a channel slice (sample stride
    != C*H*W)."""
    n, c, h, w = shape

    def randn(*size):  # scaled and cast before slicing: a cast densifies a sliced view
        return (torch.randn(size, dtype=F64) * scale).to(dtype=dtype, device=DEVICE)

    if layout == "nchw":
        t = randn(*shape)
    elif layout == "channels_last":
        t = randn(*shape).to(memory_format=torch.channels_last)
    elif layout == "sliced":
        t = randn(n, c, 2 * h, w + 1)[:, :, ::2, 1:]
        assert (_common._flat_hw_stride(t) is None) == (h > 1 and w > 1)
    elif layout == "channel_slice":
        t = randn(n, c + 3, h, w)[:, 2 : c + 2]
        assert t.stride(0) == (c + 3) * h * w
    else:
        raise AssertionError(layout)
    assert t.shape == shape
    return t


def randn(*shape, dtype=F32):
    """A plain random tensor on DEVICE (the input-check tests' arguments)."""
    return torch.randn(shape, dtype=dtype, device=DEVICE)


def small_reductions(monkeypatch):
    """The split reductions of _common in small pieces: at least three splits, and their
    ordered sum over tiles of 4 columns and 2 rows (partial ends included)."""
    monkeypatch.setattr(_common, "_MIN_SPLITS", 3)
    monkeypatch.setattr(_common, "_SUM_BLOCK_L", 4)
    monkeypatch.setattr(_common, "_SUM_TILE", 8)


# ----------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------
def expected_format(t):
    """The layout of an output that follows t: channels_last when t is channels_last-dense
    and not NCHW-contiguous, NCHW otherwise."""
    cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def close(actual, expected, tol, equal_nan=False, name="", check_dtype=True):
    """torch.testing.assert_close with `tol` (rtol, atol), its message prefixed by `name`."""
    try:
        torch.testing.assert_close(actual, expected, **tol, equal_nan=equal_nan, check_dtype=check_dtype)
    except AssertionError as err:
        raise AssertionError(f"{name}: {err}") from None


def within_half_budget(names, ours, theirs, truth, dtype):
    """Half-precision kernels: each of `ours` off the fp64 `truth` by at most twice the error
    of `theirs` (plain torch ops in `dtype`) plus a rounding of the tensor's scale."""
    eps = torch.finfo(dtype).eps
    for name, a, b, t in zip(names, ours, theirs, truth):
        scale = t.abs().max().item()
        err = (a.double() - t).abs().max().item()
        budget = (b.double() - t).abs().max().item()
        assert err <= 2 * budget + eps * scale, (name, err, budget)


# ----------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------
def check_schemas(names, count):
    """The ops in `names`, `count` of them in csrc/attnkernels.cpp, are registered under
    torch.ops.attnkernels_triton with the schemas it defines, verbatim."""
    expected = _cpp_schemas(names)
    assert len(expected) == count
    assert {str(getattr(ops, name).default._schema) for name in names} == expected


def _cpp_schemas(names):
    """{"attnkernels_triton::<schema>"} of the ops in `names` as csrc/attnkernels.cpp defines them."""
    cpp = os.path.join(os.path.dirname(__file__), "..", "csrc", "attnkernels.cpp")
    with open(cpp) as f:
        text = f.read()
    defs = re.findall(r'm\.def\(\s*((?:"[^"]*"\s*)+)\)', text)
    schemas = ["".join(re.findall(r'"([^"]*)"', d)) for d in defs]
    return {"attnkernels_triton::" + d for d in schemas if d.split("(")[0] in names}
