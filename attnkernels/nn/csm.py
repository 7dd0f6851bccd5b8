"""Fused CSM: fused SE (channel_gate) then fused PAM (nonlocal_attn)."""
from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..reference import csm as reference
from ._fused import FusedModule, rebind
from .pam import PAM
from .se import SE


class CSM(FusedModule, reference.CSM):
    """`attnkernels.reference.CSM` with fused children: `spatial(channel(x))` where `channel`
    is the fused SE and `spatial` the fused PAM (same arguments, weights and state_dict keys).
    """

    hot_paths = ("channel_gate", "nonlocal_attn")
    fused_children: ClassVar[dict[str, type[nn.Module]]] = {"channel": SE, "spatial": PAM}

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__(channels, reduction)
        # The reference children's parameters (same initialisation), behind the fused classes.
        for name, cls in self.fused_children.items():
            setattr(self, name, rebind(getattr(self, name), cls))
