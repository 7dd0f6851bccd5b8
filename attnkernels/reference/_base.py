"""The base class every reference module shares: input checks and output memory format.

The contract's shared rules (docs/contract.md#shared-rules) apply to every module, so they live here once:
`x` is a 4-D floating tensor with the module's channel count, and the output keeps
the input's memory format (channels_last in, channels_last out).
"""
from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import nn

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_positive_int(value: object, name: str, owner: str) -> int:
    """Return `value` if it is a positive int (bools excluded), else raise naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be >= 1, got {value}")
    return value


def check_odd_kernel(value: object, name: str, owner: str) -> int:
    """Return `value` if it is a positive odd int (a 'same'-padded kernel size)."""
    check_positive_int(value, name, owner)
    if value % 2 == 0:
        raise ValueError(f"{owner}: {name} must be odd (same padding), got {value}")
    return value


def check_divides(divisor: int, divisor_name: str, total: int, total_name: str, owner: str) -> None:
    """Raise ValueError unless `divisor` divides `total`."""
    if total % divisor != 0:
        raise ValueError(
            f"{owner}: {divisor_name} ({divisor}) must divide {total_name} ({total})"
        )


def check_feature_map(t: object, name: str, owner: str, channels: int | None = None) -> torch.Tensor:
    """Check that `t` is a 4-D floating (N, C, H, W) tensor, with `channels` channels if given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{owner}: {name} must be a floating-point tensor "
            f"(float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if t.dim() != 4:
        raise ValueError(
            f"{owner}: {name} must be 4-D (N, C, H, W), got {t.dim()}-D with shape {tuple(t.shape)}"
        )
    if channels is not None and t.shape[1] != channels:
        raise ValueError(
            f"{owner}: {name} must have {channels} channels (dim 1), got shape {tuple(t.shape)}"
        )
    if t.numel() == 0:
        raise ValueError(f"{owner}: {name} must not be empty, got shape {tuple(t.shape)}")
    return t


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format an output should have to match `x`.

    channels_last when `x` is channels_last and not also NCHW-contiguous (C == 1 or
    H*W == 1 make both true; NCHW is the natural answer then); NCHW otherwise, which
    includes sliced inputs that are dense in neither format.
    """
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class AttentionModule(nn.Module, abc.ABC):
    """Base of every reference attention module.

    Subclasses implement `attend(x)`; `forward` checks `x`, calls it and gives the
    result `x`'s memory format. `takes_bridges` is True for modules whose forward
    takes extra feature maps (Bridge), so backbones know what to pass.
    """

    takes_bridges: ClassVar[bool] = False

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = check_positive_int(channels, "channels", type(self).__name__)

    @abc.abstractmethod
    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The module's formula (its section of docs/contract.md) on a checked input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.attend(x).contiguous(memory_format=memory_format_of(x))

    def check_input(self, x: torch.Tensor, name: str = "x") -> None:
        """Check rank, dtype, channel count, and agreement with the parameters' dtype/device."""
        owner = type(self).__name__
        check_feature_map(x, name, owner, self.channels)
        param = first_parameter(self)
        if param is None:
            return
        if x.device != param.device:
            raise ValueError(
                f"{owner}: {name} is on {x.device} but the module's parameters are on "
                f"{param.device}; move one of them (module.to(device))"
            )
        if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{owner}: {name} has dtype {x.dtype} but the module's parameters are "
                f"{param.dtype}; convert one of them (module.to({x.dtype}))"
            )

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def first_parameter(module: nn.Module) -> nn.Parameter | None:
    """`next(module.parameters(), None)` (the same pre-order walk) without the generator
    machinery of `named_modules`, which costs more than a small fused module's kernels."""
    for param in module._parameters.values():
        if param is not None:
            return param
    for child in module._modules.values():
        if child is not None:
            param = first_parameter(child)
            if param is not None:
                return param
    return None
