"""torch.library registration, one module per hot path (fake impls and autograd)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..reference._base import memory_format_of


def ops_for(backend: str):
    """The op namespace a compiled backend's kernels live in: `torch.ops.attnkernels_triton`
    for "triton", `torch.ops.attnkernels` for the C++/CUDA ops."""
    return torch.ops.attnkernels_triton if backend == "triton" else torch.ops.attnkernels


def empty_like_layout(t: torch.Tensor) -> torch.Tensor:
    """What a kernel returns for an output or gradient shaped like feature map `t`: t's
    layout (channels_last in, channels_last out; NCHW for sliced t), as
    csrc/include/attnkernels/common.h's empty_like_layout."""
    return torch.empty_like(t, memory_format=memory_format_of(t))


def register_once(
    namespace: str,
    with_fakes: bool,
    fakes: dict[str, Callable],
    register_autograd: Callable[[str], None],
    registered: set[str],
) -> None:
    """Give `namespace`'s ops of one hot path their autograd and, `with_fakes`, their fake
    impls, once per namespace (`registered` remembers which). Triton ops
    (torch.library.triton_op) trace their own fake implementation: `with_fakes=False`."""
    if namespace in registered:
        return
    if with_fakes:
        for name, fake in fakes.items():
            torch.library.register_fake(f"{namespace}::{name}")(fake)
    register_autograd(namespace)
    registered.add(namespace)
