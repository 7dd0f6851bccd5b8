"""Fused modules: the reference modules' constructors and state_dict keys, forward through
the fused ops of `attnkernels.functional` (on the backend `attnkernels.backend` picks).

Each fused class subclasses `FusedModule` (the optional backend pin) and its reference
class, and replaces only `attend`, so a fused module holds exactly the reference module's
parameters and buffers.
"""
from __future__ import annotations

from torch import nn

from ._fused import FusedModule, reference_class
from .bam import BAM
from .cam import CAM
from .bridge import Bridge
from .cbam import CBAM
from .criss_cross import CrissCross
from .csm import CSM
from .eca import ECA
from .gam import GAM
from .ham import HAM
from .pam import PAM
from .se import SE
from .softmax_spatial import SoftmaxSpatial
from .triplet import Triplet

#: Registry name -> fused class, for the modules with fused kernels so far.
FUSED = {"eca": ECA, "se": SE, "ham": HAM, "pam": PAM, "csm": CSM, "gam": GAM, "softmax_spatial": SoftmaxSpatial,
         "bridge": Bridge, "cbam": CBAM, "triplet": Triplet, "bam": BAM, "cam": CAM,
         "criss_cross": CrissCross}

__all__ = ["ECA", "SE", "HAM", "PAM", "CSM", "GAM", "SoftmaxSpatial", "Bridge", "CBAM", "Triplet", "BAM", "CAM",
           "CrissCross", "FUSED",
           "FusedModule", "reference_class", "fused_class", "as_fused"]


def fused_class(module: nn.Module) -> type[nn.Module] | None:
    """The fused class for a reference module (exactly its class, not a subclass), or None."""
    for cls in FUSED.values():
        if type(module) is reference_class(cls):
            return cls
    return None


def as_fused(module: nn.Module) -> nn.Module:
    """`module` seen through its fused class: one object state (parameters, buffers,
    submodules, train/eval mode) behind the fused forward; a composite's children (CSM's SE
    and PAM) are seen through theirs. Raises ValueError if there is no fused version of
    `module` yet."""
    cls = fused_class(module)
    if cls is None:
        raise ValueError(f"no fused version of {type(module).__name__} yet; fused: {', '.join(FUSED)}")
    view = cls.__new__(cls)
    if not cls.fused_children:
        view.__dict__ = module.__dict__  # shared, not copied: mode and weights stay in step
        return view
    # A composite (CSM) sees its children through their fused classes: its own __dict__ is a
    # copy with its own child table; the children's views share the children's state (their
    # weights and modes, which are all the composite's forward reads).
    view.__dict__.update(module.__dict__)
    view.__dict__["_modules"] = dict(module._modules)
    for name in cls.fused_children:
        child = module._modules[name]
        view._modules[name] = child if fused_class(child) is None else as_fused(child)
    return view
