"""What every hot path's op module shares: backend lookup, registration, output layouts, and
BatchNorm folding."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..backend import select
from ..reference._base import memory_format_of

#: The op namespace of each compiled backend: C++ CPU and CUDA kernels share one library.
NAMESPACES = {"cpu": "attnkernels", "cuda": "attnkernels", "triton": "attnkernels_triton"}


def namespace(backend: str):
    """`torch.ops.<namespace>` of a compiled backend ("cpu", "cuda" or "triton")."""
    return getattr(torch.ops, NAMESPACES[backend])


def backend_ops(hot_path: str, device: torch.device, reference: type):
    """The ops that run `hot_path` on `device` now: the chosen backend's op namespace, or the
    hot path's `reference` class (the same op names and signatures in plain PyTorch).

    The one place a hot path's public functions choose their backend (`attnkernels.backend`
    decides; under torch.compile the choice is made while tracing).
    """
    backend = select(hot_path, device)
    return reference if backend == "reference" else namespace(backend)


def empty_like_layout(t: torch.Tensor) -> torch.Tensor:
    """What a kernel returns for an output or gradient shaped like feature map `t`: t's
    layout (channels_last in, channels_last out; NCHW for sliced t), as
    csrc/include/attnkernels/common.h's empty_like_layout."""
    return torch.empty_like(t, memory_format=memory_format_of(t))


def as_layout(
    t: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """t in `memory_format` (and `dtype`, if given): t itself where it is already, else a copy.
    Not `t.contiguous()` or `t.to(dtype)`, whose result where they have nothing to do is t
    itself under another name, which an autograd Function's forward must not return:
    torch.compile before torch 2.14 makes every intermediate of the forward an output of the
    traced Function too, and autograd gives a tensor returned twice its gradient at the later
    place, so the real output's is lost."""
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous(memory_format=memory_format) else t.contiguous(memory_format=memory_format)


def fold_batch_norm(
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm with statistics (mean, var) as a per-channel affine: `bn(z) = scale * z + shift`.

    Returns (scale, shift, rstd) in mean's dtype, rstd = 1 / sqrt(var + eps); weight and bias
    (either may be None: affine=False) are cast to it. Differentiable in every input.
    """
    rstd = torch.rsqrt(var + eps)
    scale = rstd if weight is None else rstd * weight.reshape(-1).to(rstd.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.reshape(-1).to(rstd.dtype)
    return scale, shift, rstd


@dataclass
class Composite:
    """An op written once in Python over a namespace's own ops (e.g. channel_attention as
    pool, gate, rescale), registered into each namespace that has no kernel for it.

    `impl(ops, *args)` runs it on the ops of namespace `ops`; `schema` is used where the
    namespace does not define the op already (the C++ library defines some of its composites'
    schemas itself, with a CPU kernel; the composite then serves every other device).
    """

    schema: str
    impl: Callable


@dataclass
class Registration:
    """How one hot path's ops are registered into a namespace: fakes (for torch.compile and
    opcheck), composites, and autograd (`autograd(namespace)` registers it). Idempotent."""

    fakes: dict[str, Callable]
    autograd: Callable[[str], None]
    composites: dict[str, Composite] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)

    def register(self, namespace: str) -> None:
        if namespace in self.done:
            return
        ops = getattr(torch.ops, namespace)
        for name, composite in self.composites.items():
            qualname = f"{namespace}::{name}"
            if not _defined(qualname):
                torch.library.define(qualname, composite.schema[composite.schema.index("("):])
            impl = composite.impl
            torch.library.impl(qualname, "CompositeExplicitAutograd")(
                lambda *args, _impl=impl: _impl(ops, *args))
        for name, fake in self.fakes.items():
            # torch.library.triton_op traces its own fake implementation from the kernel's
            # host code; everything else (C++ ops, composites) needs one.
            if namespace == "attnkernels" or name in self.composites:
                torch.library.register_fake(f"{namespace}::{name}")(fake)
        self.autograd(namespace)
        self.done.add(namespace)


def _defined(qualname: str) -> bool:
    """Whether the op `namespace::name` has a schema already (e.g. from the C++ library)."""
    try:
        torch._C._get_schema(qualname, "")
    except RuntimeError:
        return False
    return True
