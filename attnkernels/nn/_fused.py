"""The mixin every fused module shares: an optional pin to one backend; autocast handling."""
from __future__ import annotations

import copy
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


#: A fused module's attend(self, x, *extra) (extra: Bridge's bridge maps).
Attend = Callable[..., torch.Tensor]


def pick_inference(site: str, x: torch.Tensor, params: tuple, runs: dict[str, Callable[..., torch.Tensor]],
                   static: str, *extra: torch.Tensor) -> Callable[..., torch.Tensor]:
    """For an inference-only forward (no autograd, no state update): the function among `runs`
    (name -> fn(x, *extra), the reference's eager forward among them) that
    `attnkernels.choose` measures fastest for x's shape (key: the device, x's dtype, shape
    and layout, `params`: what else sets the cost), or `static` when not measuring."""
    shapes = tuple(tuple(t.shape) for t in extra)
    key = (x.device.type, x.dtype, tuple(x.shape), memory_format_of(x), *params, *shapes)
    return choose.pick(site, key, runs, static, (x, *extra))


def chosen_in_training(attend: Attend) -> Attend:
    """Decorates a fused module's `attend` (under `without_autocast`, so that both candidates
    run with autocast off): in a training step (autograd recording), the fused attend or the
    eager one (`eager_attend`: the reference class's, or timm's), whichever `attnkernels.choose`
    measures faster, forward plus backward, for x's shape and the module's parameters
    (`pick_training`). Without autograd the fused attend runs (its own inference choices apply).

    A training step pays each fused op's autograd wrapper (Python) twice; on small maps those
    can cost more than the kernels save, so there the reference composition is the faster
    one. Either candidate computes the contract, so the choice moves only rounding."""

    @functools.wraps(attend)
    def attend_chosen_in_training(self: nn.Module, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        if not autograd_may_record():
            return attend(self, x, *extra)
        eager = eager_attend(self)
        if pick_training(self, x, extra, {"fused": attend, "eager": eager}) == "eager":
            return eager(self, x, *extra)
        return attend(self, x, *extra)

    return attend_chosen_in_training


#: Where a fused module that `attnkernels.fuse` made from a timm module keeps that module, in its
#: __dict__ directly (as a registered submodule it would add state_dict keys).
TIMM_ORIGIN = "_attnkernels_timm_origin"


def eager_attend(module: nn.Module) -> Attend:
    """The eager forward a fused module is measured against, as attend(module, x, *extra):
    the reference class's attend, or for a module made from a timm module that module's own
    forward (timm's submodules, which the fused module holds, compute their part of the
    gate differently from the reference's: timm's CBAM channel gate returns x times it)."""
    if TIMM_ORIGIN in module.__dict__:
        return _timm_forward
    return reference_class(type(module)).attend


def _timm_forward(module: nn.Module, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
    # forward, not __call__: the timm module shares the fused module's hook dicts.
    return module.__dict__[TIMM_ORIGIN].forward(x, *extra)


#: The cache entry of `parameter_shapes`: (the module they are for, or None for the holder's
#: own; the shapes).
_PARAMETER_SHAPES = "parameter_shapes"


def pick_training(module: nn.Module, x: torch.Tensor, extra: tuple[torch.Tensor, ...],
                  attends: dict[str, Attend]) -> str:
    """The name among `attends` (name -> attend(module, x, *extra); "fused" the static rule)
    whose forward plus backward `pick_on_copy` measures fastest at site "<Class> training" for
    the key: x's device, dtype, shape and layout, the extra maps' shapes, the module's mode,
    pinned backend and parameter shapes. x is timed requiring grad, as in a network. A
    torch.jit.trace records the fused attend."""
    if torch.jit.is_tracing():
        # A trace records the static rule, as it did before this choice existed: the check
        # run of torch.jit.trace must record the same graph, and reading the parameters'
        # shapes in one run but not the other would reorder its attribute reads.
        return "fused"
    key = (x.device.type, x.dtype, tuple(x.shape), memory_format_of(x), *(tuple(t.shape) for t in extra),
           module.training, module.backend, parameter_shapes(module))
    return pick_on_copy(f"{type(module).__name__} training", key, attends, "fused", module,
                        lambda: (x if x.requires_grad else x.detach().requires_grad_(), *extra))


def pick_on_copy(site: str, key: tuple, runs: dict[str, Callable[..., Any]], static: str, state: Any,
                 args: Callable[[], tuple]) -> str:
    """The name among `runs` (name -> fn(state, *args())) that `attnkernels.choose` picks at
    `site` for `key`, each candidate timed (forward, and backward when autograd records) on a
    deep copy of `state` (a module, or a tuple of modules and None) and on copies of args():
    the state's own BatchNorm running statistics, gradients and gradient hooks (DDP's) never
    see the measurement, and the copy's gradients are dropped after each run. Not measured
    (the static rule, nothing remembered) where the state holds a SyncBatchNorm (its
    collectives would run a time-dependent number of times per process), nor where `choose`
    does not measure (tracing, fake tensors)."""
    known = choose.known_winner(site, key, runs, static)
    if known is not None:
        return known
    copies: list[Any] = []
    prepared: dict[str, Callable[[], Any]] = {}

    def measure(name: str) -> float:
        if not copies:
            copies.append(copy.deepcopy(state))
        twin = copies[0]
        seconds = choose.measure_candidate(name, functools.partial(runs[name], twin), args(), prepared)
        for m in _modules_of(twin):
            for p in m.parameters():
                p.grad = None
        return seconds

    def can_measure() -> bool:
        syncs = any(isinstance(m, nn.SyncBatchNorm) for top in _modules_of(state) for m in top.modules())
        return not syncs and choose.measurable(*(a for a in args() if isinstance(a, torch.Tensor)))

    return choose.pick_name(site, key, tuple(runs), static, measure, can_measure)


def _modules_of(state: Any) -> list[nn.Module]:
    return [m for m in (state if isinstance(state, tuple) else (state,)) if isinstance(m, nn.Module)]


def parameter_shapes(module: nn.Module | None, holder: nn.Module | None = None) -> tuple[tuple[int, ...], ...]:
    """The shapes of `module`'s parameters, in order (() for None): a key part of the choices
    made on copies. Kept in the caches of `holder` (default: `module`) while it holds the same
    module, since the walk over the parameters costs 5-20 us a call, several percent of a
    training step on a 7x7 map; computed afresh under torch.compile."""
    if module is None:
        return ()
    if torch.compiler.is_compiling():
        return tuple(tuple(p.shape) for p in module.parameters())
    # Another holder's entry names the module it is for (the holder's attention may be swapped);
    # a module's own names None, not itself: no reference cycle keeps it alive.
    owner = None if holder is None else module
    caches = (module if holder is None else holder).__dict__.setdefault(CACHE_ATTRIBUTE, {})
    entry = caches.get(_PARAMETER_SHAPES)
    if entry is None or entry[0] is not owner:
        entry = caches[_PARAMETER_SHAPES] = (owner, tuple(tuple(p.shape) for p in module.parameters()))
    return entry[1]


T = TypeVar("T")


#: The attribute of a fused module's caches (name -> entry: folded weights for inference, the
#: parameter shapes of `pick_training`'s key), in its __dict__ directly (nn.Module's
#: __setattr__ would register their tensors as state); `unfuse` drops it.
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


def children(module: nn.Module, container: str) -> Iterable[nn.Module]:
    """The submodules of `module.<container>` (a ModuleList), read from the modules' dicts as
    `module_tensors` reads tensors: an inference forward's host path runs cold in a network,
    where nn.Module's __getattr__ per name cost Bridge 5-7 % of its forward."""
    return module._modules[container]._modules.values()


def child_parameter(module: nn.Module, child: str, name: str) -> torch.Tensor:
    """`module.<child>.<name>`, a parameter, read from the modules' dicts (see `children`)."""
    return module._modules[child]._parameters[name]


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
