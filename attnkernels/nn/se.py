"""Fused SE: channel_pool + the (tiny) MLP in torch + channel_rescale, two passes over x."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import functional as AF
from ..reference import se as reference


class SE(reference.SE):
    """`attnkernels.reference.SE` on the fused channel_gate ops (same arguments and weights).

    The pooling and the final `x * gate` are fused kernels; the (N, C) MLP between them
    stays in torch, where it is a handful of microseconds.
    """

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        avg, _ = AF.channel_pool(x)
        s = avg.to(self.fc1.weight.dtype)[:, :, None, None]
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return AF.channel_rescale(x, gate.flatten(1))
