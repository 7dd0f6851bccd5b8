"""Reference attention modules: the executable form of docs/contract.md, and the library's ground truth.

Every module takes `channels` first, checks its input (4-D floating, the right channel
count) and returns the input's memory format. `create(name, channels, **kwargs)` builds
one by its lower-case registry name.
"""
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
from .registry import REGISTRY, create, names
from .se import SE
from .softmax_spatial import SoftmaxSpatial
from .triplet import Triplet

__all__ = [
    "AttentionModule",
    "SE",
    "ECA",
    "CBAM",
    "HAM",
    "GAM",
    "PAM",
    "CAM",
    "CSM",
    "SoftmaxSpatial",
    "Bridge",
    "BAM",
    "Triplet",
    "CrissCross",
    "REGISTRY",
    "create",
    "names",
]
