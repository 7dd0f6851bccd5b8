"""The mixin every fused module shares: an optional pin to one backend; autocast handling."""
from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Hashable, Iterable
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from .. import backend as _backend
from .. import choose
from ..reference._base import memory_format_of


class FusedModule(nn.Module):
    """Mixin of the fused modules: `backend` pins the backend their ops run on.

    List it first among the bases (`class ECA(FusedModule, reference.ECA)`) so that its
    `forward` wraps the reference forward (the fused class overrides `attend` only).

    `backend` is None by default: the ops run where `attnkernels.backend` picks, and the
    forward is the reference forward with nothing around it, so `torch.compile(fullgraph=True)`
    over a default fused module has no graph break. A backend name ("cpu", "cuda", "triton",
    "reference") runs the forward under `attnkernels.backend.use_backend(backend)`; the
    backward follows, since each op's backward is bound to the backend its forward ran on.
    `attnkernels.fuse(model, backend=...)` sets it. It is a plain attribute, not state_dict.
    A pinned module compiles with a graph break: dynamo does not trace `ContextVar.set`.
    """

    #: The pinned backend, or None for automatic. A class default, so modules built by the
    #: constructor or by `as_fused` are automatic without any per-instance state.
    backend: str | None = None

    #: The hot paths whose ops the module runs: `fuse` checks a pinned backend on these.
    #: Every hot path unless a fused class narrows it (e.g. ECA: ("channel_gate",)).
    hot_paths: ClassVar[tuple[str, ...]] = _backend.HOT_PATHS

    #: Children fused together with the module (name -> fused class), for modules built from
    #: other attention modules (CSM: SE and PAM). `fuse`/`unfuse` swap them with the parent.
    fused_children: ClassVar[dict[str, type[nn.Module]]] = {}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # `x` by name, as the reference forward has it: torch.export keys dynamic_shapes by
        # the forward's argument names ({"x": {0: batch}}).
        if self.backend is None:
            return super().forward(x, *args, **kwargs)
        with _backend.use_backend(self.backend):
            return super().forward(x, *args, **kwargs)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        if self.backend is None:
            return base
        return f"{base}, backend={self.backend!r}" if base else f"backend={self.backend!r}"


def pick_inference(site: str, x: torch.Tensor, params: tuple, runs: dict[str, Callable[..., torch.Tensor]],
                   static: str, *extra: torch.Tensor) -> Callable[..., torch.Tensor]:
    """For an inference-only forward (no autograd, no state update): the function among `runs`
    (name -> fn(x, *extra), the reference's eager forward among them) that
    `attnkernels.choose` measures fastest for x's shape (key: the device, x's dtype, shape
    and layout, `params`: what else sets the cost), or `static` when not measuring."""
    shapes = tuple(tuple(t.shape) for t in extra)
    key = (x.device.type, x.dtype, tuple(x.shape), memory_format_of(x), *params, *shapes)
    return choose.pick(site, key, runs, static, (x, *extra))


T = TypeVar("T")


#: The attribute of a fused module's inference caches (name -> entry), in its __dict__ directly
#: (nn.Module's __setattr__ would register their tensors as state); `unfuse` drops it.
CACHE_ATTRIBUTE = "_fused_caches"


def cached_while_unchanged(module: nn.Module, name: str, key: Hashable,
                           sources: list[torch.Tensor], compute: Callable[[], T]) -> T:
    """`compute()` for an inference forward, computed once per state of `sources` (the module's
    parameters and buffers it reads) and `key`, and kept on `module` under `name` (in its
    CACHE_ATTRIBUTE dict).

    For small tensors derived from weights (folded BatchNorms): rebuilding them each call
    costs a dozen tiny ops of host time, more than the op they feed saves on a small map.
    A source is unchanged while it is the same tensor, on the same storage at the same
    address, with the same version counter. Every in-place write bumps the counter
    (optimizer steps, `load_state_dict`, `copy_`). `.data =` (as `module.double()` does)
    keeps the counter but swaps the storage, and the cache holds the old storage, so its
    address cannot come back as the new one's.

    Not cached (computed on every call): while autograd records (the result must carry the
    graph), under torch.compile tracing, and for inference-mode tensors (no version counter).
    """
    if autograd_may_record() or torch.compiler.is_compiling():
        return compute()
    try:
        stamp = [(t.data_ptr(), t._version) for t in sources]
    except RuntimeError:  # an inference tensor: "Inference tensors do not track version counter"
        return compute()
    caches = module.__dict__.setdefault(CACHE_ATTRIBUTE, {})
    cached = caches.get(name)
    if (cached is not None and cached[0] == key and cached[2] == stamp and len(cached[1]) == len(sources)
            and all(map(operator.is_, cached[1], sources))):
        return cached[4]
    value = compute()
    storages = [t.untyped_storage() for t in sources]
    caches[name] = (key, sources, stamp, storages, value)
    return value


def module_tensors(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    """The parameters and buffers of `modules` (their own, not their children's), for
    `cached_while_unchanged`: read from the modules' dicts (nn.Module's __getattr__ per name
    would cost more than the cache saves)."""
    return [t for m in modules for d in (m._parameters, m._buffers) for t in d.values() if t is not None]


def autograd_may_record() -> bool:
    """Whether this forward must stay differentiable: autograd is on, or `torch.jit.trace` is
    recording it. A trace is replayed with autograd on and off (its own check re-runs it under
    no_grad), so it must not hold an inference-only branch chosen by the grad mode: the
    fused modules' inference-only paths (HAM's per-sample op, GAM's folded epilogue) run
    only outside traces, with autograd off."""
    return torch.is_grad_enabled() or torch.jit.is_tracing()


def reference_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The reference class a fused class stands in for: the first class in its MRO that
    is not a FusedModule (so `class ECA(FusedModule, reference.ECA)` gives reference.ECA)."""
    if not (isinstance(cls, type) and issubclass(cls, FusedModule)):
        raise TypeError(f"reference_class: {cls!r} is not a FusedModule subclass")
    return next(base for base in cls.__mro__[1:] if not issubclass(base, FusedModule))


def rebind(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """`module`'s whole state behind class `cls`: a new object whose __dict__ is a shallow copy
    of `module`'s, so the same parameter, buffer and submodule objects, hook dicts and mode."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


#: A fused module's attend(self, x, *extra) (extra: Bridge's bridge maps).
Attend = Callable[..., torch.Tensor]


def without_autocast(attend: Attend) -> Attend:
    """Decorates a fused module's `attend`: under torch.autocast it runs with autocast off for
    x's device type, so its ops and the torch layers around them run in x's dtype.

    Autocast does not know the fused ops: they compute in the dtypes they are given (x's,
    accumulating in acc(x)) on every backend. The torch layers around and inside them would
    not: PAM's projection conv, GAM's library convs, the composites' MLP and the reference
    backend's ops would return the autocast dtype, so a fused op would get q, k, v in bf16
    beside an fp32 x (a TypeError), or a gate in fp16 where acc(x) is due, and a backward that
    recomputes a conv outside autocast would differentiate another forward than the one run.
    With autocast off they run in x's dtype too. x keeps its dtype (the full-size tensor,
    whose dtype the output has; PAM alone converts it, where the reference's output is wider);
    where a torch layer needs matching dtypes the module casts its small parameters to x's
    dtype instead (an fp32 module given the bf16 output of an autocast layer). The reference
    module under the same autocast is the precision baseline: the fused path rounds no more
    (tests/test_autocast.py).
    """

    @functools.wraps(attend)
    def attend_without_autocast(self: nn.Module, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if not torch.is_autocast_enabled(device_type):
            return attend(self, x, *extra)
        with torch.autocast(device_type, enabled=False):
            return attend(self, x, *extra)

    return attend_without_autocast
