"""Argument checks shared by every hot path, worded as the C++ checks word them
(csrc/include/attnkernels/common.h): one wording per rule, whichever backend runs.

Each raises TypeError for a wrong type or dtype and ValueError for a wrong shape, value or
device (as TORCH_CHECK_TYPE / TORCH_CHECK_VALUE do), naming the op and the argument.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ..reference.formulas import accumulate_dtype

# c10's names for the dtypes, so a message reads the same from Python and from C++.
_C10_NAMES = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16",
              torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int", torch.int64: "Long",
              torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
              torch.float8_e4m3fn: "Float8_e4m3fn", torch.float8_e5m2: "Float8_e5m2",
              torch.float8_e4m3fnuz: "Float8_e4m3fnuz", torch.float8_e5m2fnuz: "Float8_e5m2fnuz"}

#: The dtypes the kernels compute feature maps in (float8 is floating but storage only: none of
#: the kernels, nor the reference modules, run it).
FEATURE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as c10 prints it ("Float", "Double", ...)."""
    return _C10_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def tensor(op: str, name: str, t) -> None:
    """t is a floating-point torch.Tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {dtype_name(t.dtype)}")


def feature_dtype(op: str, name: str, t) -> None:
    """t is a tensor in one of FEATURE_DTYPES (a feature map, or a map shaped like one)."""
    tensor(op, name, t)
    if t.dtype not in FEATURE_DTYPES:
        raise TypeError(f"{op}: {name} must be float64, float32, float16 or bfloat16, got {dtype_name(t.dtype)}")


def feature_map(op: str, name: str, x) -> None:
    """x is an (N, C, H, W) tensor in one of FEATURE_DTYPES."""
    if isinstance(x, torch.Tensor) and x.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D (N, C, H, W), got {x.dim()}-D")
    feature_dtype(op, name, x)


def device(op: str, name: str, t: torch.Tensor, where: torch.device) -> None:
    """t is on device `where` (the op's feature map's device). Every tensor argument of every
    op is checked: a kernel handed another device's tensor would read memory that is not there."""
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


def one_value(op: str, name: str, t, where: torch.device) -> None:
    """t is a one-value floating parameter (PAM's and CAM's gamma), any shape, on `where`."""
    tensor(op, name, t)
    if t.numel() != 1:
        raise ValueError(f"{op}: {name} must hold one value, got shape {list(t.shape)}")
    device(op, name, t, where)


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


def fakes_that_check(fakes: dict[str, Callable], checks: dict[str, Callable]) -> dict[str, Callable]:
    """Each op's fake (meta) implementation, running the op's argument check first.

    The dispatcher sends a call with any argument on the meta device to the op's fake, so a CPU
    input with one meta argument never reaches the kernel's own checks: an unchecked fake would
    return an uninitialised tensor where the kernel raises. `checks` holds each op's
    `check_<op>`, taking the op's arguments in schema order; every fake must have one."""
    missing = sorted(fakes.keys() - checks.keys())
    if missing:
        raise KeyError(f"no argument check for the fakes of {', '.join(missing)}")
    return {name: _checking(checks[name], fake) for name, fake in fakes.items()}


def _checking(check_args: Callable, fake: Callable) -> Callable:
    @functools.wraps(fake)
    def checked_fake(*args):
        check_args(*args)
        return fake(*args)

    return checked_fake
