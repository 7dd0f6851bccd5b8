"""Fused modules: the reference modules' constructors and state_dict keys, forward through
the fused ops of `attnkernels.functional` (on the backend `attnkernels.backend` picks).

Each fused class subclasses `FusedModule` (the optional backend pin) and its reference
class, and replaces only `attend`, so a fused module holds exactly the reference module's
parameters and buffers.
"""
from __future__ import annotations

from torch import nn

from ._fused import FusedModule, reference_class
from .eca import ECA
from .ham import HAM
from .se import SE

#: Registry name -> fused class, for the modules with fused kernels so far.
FUSED = {"eca": ECA, "se": SE, "ham": HAM}

__all__ = ["ECA", "SE", "HAM", "FUSED", "FusedModule", "reference_class", "fused_class", "as_fused"]


def fused_class(module: nn.Module) -> type[nn.Module] | None:
    """The fused class for a reference module (exactly its class, not a subclass), or None."""
    for cls in FUSED.values():
        if type(module) is reference_class(cls):
            return cls
    return None


def as_fused(module: nn.Module) -> nn.Module:
    """`module` seen through its fused class: one object state (parameters, buffers,
    submodules, train/eval mode) behind the fused forward. Raises ValueError if there is
    no fused version of `module` yet."""
    cls = fused_class(module)
    if cls is None:
        raise ValueError(f"no fused version of {type(module).__name__} yet; fused: {', '.join(FUSED)}")
    view = cls.__new__(cls)
    view.__dict__ = module.__dict__  # shared, not copied: mode and weights stay in step
    return view
