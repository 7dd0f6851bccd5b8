"""Argument checks shared by every hot path, worded as the C++ checks word them
(csrc/include/attnkernels/common.h): one wording per rule, whichever backend runs.

Each raises TypeError for a wrong type or dtype and ValueError for a wrong shape, value or
device (as TORCH_CHECK_TYPE / TORCH_CHECK_VALUE do), naming the op and the argument.
"""
from __future__ import annotations

import torch

from ..reference.formulas import accumulate_dtype

# c10's names for the dtypes, so a message reads the same from Python and from C++.
_C10_NAMES = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16",
              torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int", torch.int64: "Long",
              torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as c10 prints it ("Float", "Double", ...)."""
    return _C10_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def tensor(op: str, name: str, t) -> None:
    """t is a floating-point torch.Tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {dtype_name(t.dtype)}")


def feature_map(op: str, name: str, x) -> None:
    """x is a floating (N, C, H, W) tensor."""
    if isinstance(x, torch.Tensor) and x.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D (N, C, H, W), got {x.dim()}-D")
    tensor(op, name, x)


def device(op: str, name: str, t: torch.Tensor, where: torch.device) -> None:
    """t is on device `where` (the op's feature map's device)."""
    if t.device != where:
        raise ValueError(f"{op}: {name} must be on {where}, got {t.device}")


def per_channel(op: str, name: str, t, x: torch.Tensor) -> None:
    """t is an (N, C) map of x (avg, max, gate, ...) in acc(x), on x's device."""
    tensor(op, name, t)
    if tuple(t.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{op}: {name} must have shape (N, C) = ({x.shape[0]}, {x.shape[1]}), got {list(t.shape)}")
    in_accumulation_dtype(op, name, t, x)


def pixel_map(op: str, name: str, t, x: torch.Tensor, k: int) -> None:
    """t is an (N, k, H, W) per-pixel map of x in acc(x), on x's device."""
    tensor(op, name, t)
    n, _, h, w = x.shape
    if tuple(t.shape) != (n, k, h, w):
        raise ValueError(f"{op}: {name} must have shape (N, {k}, H, W) = ({n}, {k}, {h}, {w}), got {list(t.shape)}")
    in_accumulation_dtype(op, name, t, x)


def in_accumulation_dtype(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """t (a small map derived from x) is in acc(x), on x's device."""
    acc = accumulate_dtype(x.dtype)
    if t.dtype != acc:
        raise TypeError(f"{op}: {name} must be {dtype_name(acc)} (the accumulation dtype of x, "
                        f"{dtype_name(x.dtype)}), got {dtype_name(t.dtype)}")
    device(op, name, t, x.device)


def like_x(op: str, name: str, t, x: torch.Tensor) -> None:
    """t (a gradient of an output shaped like x) has x's shape and dtype, on x's device."""
    tensor(op, name, t)
    if t.shape != x.shape or t.dtype != x.dtype:
        raise ValueError(f"{op}: {name} must match x's shape {list(x.shape)} and dtype {dtype_name(x.dtype)}, "
                         f"got {list(t.shape)} {dtype_name(t.dtype)}")
    device(op, name, t, x.device)


def vector(op: str, name: str, t, count: int, where: torch.device, what: str) -> None:
    """t is a small parameter of `count` floating values (`what` names the count) on `where`."""
    tensor(op, name, t)
    if t.numel() != count:
        raise ValueError(f"{op}: {name} must hold {what} = {count} values, got shape {list(t.shape)}")
    device(op, name, t, where)


def together(op: str, **tensors) -> bool:
    """Optional arguments that come all or none; True if given."""
    given = [t is not None for t in tensors.values()]
    if any(given) and not all(given):
        names = list(tensors)
        listed = " and ".join(names) if len(names) == 2 else ", ".join(names[:-1]) + " and " + names[-1]
        raise ValueError(f"{op}: {listed} must be given together")
    return all(given)
