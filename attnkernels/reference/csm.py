"""CSM: the seed's channel-then-spatial module, SE followed by position attention."""
from __future__ import annotations

import torch

from ._base import AttentionModule
from .pam import PAM
from .se import SE


class CSM(AttentionModule):
    """Channel and spatial attention: `y = PAM(SE(x))` (channel first, as the seed's ablation prefers).

    Keys `channel.*` (SE) and `spatial.*` (PAM).

    Args:
        channels: C, the input's channel count (>= 8, for PAM).
        reduction: SE's squeeze ratio (16).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__(channels)
        self.channel = SE(channels, reduction)
        self.spatial = PAM(channels)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))
