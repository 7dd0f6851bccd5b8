"""What one case times: the module, its (rotated) inputs, the variants and their steps.

Variants (each turns the reference module into a callable ``f(x, *bridges)``; compiled and
fused variants wrap the same module object, so they share its weights and mode):

* ``memcpy``  - ``x.clone()``: reads x and writes a same-size y, the floor for a
  memory-bound module; its forward+backward is ``x.clone().backward(g)`` (a copy each way);
* ``eager``   - the reference module, as written;
* ``compile`` - ``torch.compile(reference, dynamic=False)``;
* ``sdpa``    - PAM and CSM only: the attention done by ``F.scaled_dot_product_attention``
  (``benchmarks/attention_baselines.py``);
* ``fused-<backend>`` - the module's fused version (``attnkernels.nn``) on one backend, only
  where that backend runs every hot path of the fused class (``harness/backends.py``).

Steps: forward is ``f(x, *bridges)`` under ``torch.inference_mode()`` (module in eval mode);
fwd+bwd is ``f(x_leaf, ...).backward(g)`` with a fixed random g and every ``.grad`` set to
None after the step (module in train mode). Each call takes the next copy of the inputs
(:class:`Inputs`, ``harness/cache.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from attnkernels import backend
from attnkernels.nn import as_fused
from attnkernels.reference import create, names

import attention_baselines

from .backends import FUSED_BACKENDS, available_anywhere, module_backends
from .cache import rotation_count
from .config import Shape
from .timing import Step

# Constructor arguments a module needs beyond its channel count, by registry name.
MODULE_KWARGS: Dict[str, Callable[[int], Dict[str, Any]]] = {
    # A ResNet bottleneck's bridges: its 1x1 and 3x3 stages, width C/4, at x's size.
    "bridge": lambda channels: {"bridge_channels": [max(channels // 4, 1)] * 2},
}
# Table-only names for a registry module built with other arguments: GAM's "gc" variant
# (group convs + channel shuffle) next to the plain one.
MODULE_ALIASES: Dict[str, Tuple[str, Dict[str, Any]]] = {"gam-gc": ("gam", {"groups": 4})}


def module_names() -> List[str]:
    """Every name the module table takes: the registry's and MODULE_ALIASES."""
    return [*names(), *MODULE_ALIASES]


def registry_name(name: str) -> str:
    """The registry name behind a table name (``"gam-gc"`` -> ``"gam"``)."""
    return MODULE_ALIASES.get(name, (name, {}))[0]


def build_module(name: str, channels: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The registry's reference module for ``name`` (or an alias's), on ``device`` in ``dtype``."""
    name, kwargs = MODULE_ALIASES.get(name, (name, {}))
    kwargs = {**MODULE_KWARGS.get(name, lambda c: {})(channels), **kwargs}
    return create(name, channels, **kwargs).to(device=device, dtype=dtype)


def bridge_channels_of(module: nn.Module) -> List[int]:
    """Channel counts of the bridge maps ``module.forward`` takes after x (none for most)."""
    if not getattr(module, "takes_bridges", False):
        return []
    return list(getattr(module, "bridge_channels", []))


# --------------------------------------------------------------------------- inputs


@dataclass
class InputSet:
    """One copy of a case's tensors: plain ones for forward, leaves for fwd+bwd (each leaf
    shares its plain tensor's storage: nothing writes into either)."""

    x: torch.Tensor
    bridges: Tuple[torch.Tensor, ...]
    grad_out: torch.Tensor
    x_leaf: torch.Tensor
    bridge_leaves: Tuple[torch.Tensor, ...]


class Inputs:
    """The copies of a case's inputs, handed out round-robin by :meth:`next`, one per call
    whichever variant makes it, so consecutive calls never read the same copy."""

    def __init__(self, sets: Sequence[InputSet]) -> None:
        self.sets = list(sets)
        self._next = 0

    @property
    def x(self) -> torch.Tensor:
        """The first copy's x (all copies hold the same values)."""
        return self.sets[0].x

    @property
    def count(self) -> int:
        return len(self.sets)

    @property
    def rotation_bytes(self) -> int:
        """Bytes of x and bridge maps over all copies: what a forward rotation reads."""
        return sum(s.x.nbytes + sum(b.nbytes for b in s.bridges) for s in self.sets)

    def next(self) -> InputSet:
        chosen = self.sets[self._next]
        self._next = (self._next + 1) % len(self.sets)
        return chosen


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def make_inputs(
    shape: Shape,
    bridge_channels: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    cache_bytes: int = 0,
) -> Inputs:
    """Random x (and bridge maps of x's size with the given channels) and a fixed grad_output,
    copied ``rotation_count(x + bridges, cache_bytes)`` times (once for ``cache_bytes`` 0)."""
    n, _, h, w = shape
    x = torch.randn(shape, dtype=dtype, device=device)
    bridges = tuple(torch.randn((n, c, h, w), dtype=dtype, device=device) for c in bridge_channels)
    grad_out = torch.randn(shape, dtype=dtype, device=device)
    count = rotation_count(x.nbytes + sum(b.nbytes for b in bridges), cache_bytes)
    sets = []
    for i in range(count):
        xi, gi = (x, grad_out) if i == 0 else (x.clone(), grad_out.clone())
        bi = bridges if i == 0 else tuple(b.clone() for b in bridges)
        sets.append(InputSet(xi, bi, gi, _leaf(xi), tuple(_leaf(b) for b in bi)))
    return Inputs(sets)


# --------------------------------------------------------------------------- variants


def memcpy_fn(x: torch.Tensor, *bridges: torch.Tensor) -> torch.Tensor:
    """The memcpy variant: a same-size copy of x (its backward copies g into x.grad)."""
    return x.clone()


def compile_module(module: nn.Module) -> Callable[..., torch.Tensor]:
    """``torch.compile`` with static shapes: each shape gets kernels specialised to it."""
    return torch.compile(module, dynamic=False)


def fused_variant(module: nn.Module, backend_name: str) -> Callable[..., torch.Tensor]:
    """The module's fused version (``attnkernels.nn``) forced onto one backend."""
    fused = as_fused(module)

    def run(x: torch.Tensor, *bridges: torch.Tensor) -> torch.Tensor:
        with backend.use_backend(backend_name):
            return fused(x, *bridges)

    return run


VARIANT_BUILDERS: Dict[str, Callable[[nn.Module], Callable[..., torch.Tensor]]] = {
    "memcpy": lambda module: memcpy_fn,
    "eager": lambda module: module,
    "compile": compile_module,
    "sdpa": attention_baselines.sdpa_variant,
    **{f"fused-{b}": (lambda module, b=b: fused_variant(module, b)) for b in FUSED_BACKENDS},
}
VARIANT_NAMES: Tuple[str, ...] = tuple(VARIANT_BUILDERS)


def default_variants(device: torch.device) -> List[str]:
    """memcpy, eager, compile, sdpa (PAM and CSM rows only), and every fused backend that
    runs some fused module on ``device`` (Triton on CPU, its interpreter, is left out)."""
    return ["memcpy", "eager", "compile", "sdpa", *(f"fused-{b}" for b in available_anywhere(device))]


def fused_backend_of(variant: str) -> Optional[str]:
    """``"fused-cpu"`` -> ``"cpu"``; None for the other variants."""
    return variant[len("fused-"):] if variant.startswith("fused-") else None


def case_variants(name: str, variants: Sequence[str], device: torch.device) -> Tuple[List[str], Dict[str, str]]:
    """The variants of ``variants`` that run for table name ``name`` on ``device`` (in order),
    and ``{variant: reason}`` for each requested ``fused-<b>`` that b cannot run there.
    ``sdpa``: PAM and CSM only; ``fused-<b>``: only where b runs every hot path of the
    module's fused class (``backends.py``); a module without a fused class gets no fused rows
    (and no reasons)."""
    registry = registry_name(name)
    wanted = [fused_backend_of(v) for v in variants if fused_backend_of(v)]
    problems = module_backends(registry, device, wanted) if wanted else {}
    run, skipped = [], {}
    for v in variants:
        b = fused_backend_of(v)
        if v == "sdpa" and registry not in attention_baselines.SDPA_MODULES:
            continue
        if b is not None and problems.get(b, "no fused version") is not None:
            if b in problems:
                skipped[v] = problems[b]
            continue
        run.append(v)
    return run, skipped


def build_variant(variant: str, module: nn.Module) -> Callable[..., torch.Tensor]:
    """The callable ``f(x, *bridges)`` that ``variant`` times for ``module``."""
    return VARIANT_BUILDERS[variant](module)


# --------------------------------------------------------------------------- steps


def forward_step(f: Callable[..., torch.Tensor], inputs: Inputs) -> Step:
    """One inference forward on the next input copy, under ``torch.inference_mode()``."""

    def step() -> torch.Tensor:
        s = inputs.next()
        with torch.inference_mode():
            return f(s.x, *s.bridges)

    return step


def training_step(f: Callable[..., torch.Tensor], inputs: Inputs, params: Sequence[torch.Tensor]) -> Step:
    """One forward+backward on the next input copy: ``y = f(x, *bridges)``, ``y.backward(g)``,
    grads reset to None.

    The grads are detached at the end of the step rather than the start of the next, so a
    step leaves nothing behind (peak-memory measurement then sees no frees of older
    tensors); x's gradient is returned, like an output, and freed by the caller.
    """

    def step() -> Optional[torch.Tensor]:
        s = inputs.next()
        y = f(s.x_leaf, *s.bridge_leaves)
        y.backward(s.grad_out)
        grad = s.x_leaf.grad
        clear_grads((s.x_leaf, *s.bridge_leaves, *params))
        return grad

    return step


def clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    """Set ``.grad`` of each tensor to None (what ``zero_grad(set_to_none=True)`` does)."""
    for t in tensors:
        t.grad = None
