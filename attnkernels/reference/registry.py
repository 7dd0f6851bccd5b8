"""Name -> class registry of the reference modules, and `create`."""
from __future__ import annotations

from typing import Any

from ._base import AttentionModule
from .bam import BAM
from .bridge import Bridge
from .cam import CAM
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

REGISTRY: dict[str, type[AttentionModule]] = {
    "se": SE,
    "eca": ECA,
    "cbam": CBAM,
    "ham": HAM,
    "gam": GAM,
    "pam": PAM,
    "cam": CAM,
    "csm": CSM,
    "softmax_spatial": SoftmaxSpatial,
    "bridge": Bridge,
    "bam": BAM,
    "triplet": Triplet,
    "criss_cross": CrissCross,
}


def names() -> list[str]:
    """The registry's module names, in docs/contract.md's order."""
    return list(REGISTRY)


def create(name: str, channels: int, **kwargs: Any) -> AttentionModule:
    """Build the reference module registered as `name` for `channels` input channels.

    Extra keyword arguments go to the module's constructor, e.g.
    `create("gam", 256, groups=4)` or `create("bridge", 256, bridge_channels=[64, 64])`.
    """
    if not isinstance(name, str) or name.lower() not in REGISTRY:
        raise ValueError(f"unknown attention name {name!r}; expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name.lower()](channels, **kwargs)
