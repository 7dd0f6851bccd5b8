"""The contract's shared formulas and reductions (docs/contract.md#shared-formulas), written once for every module.

Reductions accumulate in fp32 for fp16/bf16/fp32 inputs and in fp64 for fp64 inputs
(docs/contract.md#accumulation-dtype), then return the input's dtype so the module's parameters,
which share that dtype, can consume them.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "accumulate_dtype",
    "eca_kernel_size",
    "make_divisible",
    "ham_important_channels",
    "important_channel_mask",
    "channel_shuffle",
    "mean_hw",
    "max_hw",
    "mean_c",
    "max_c",
    "sum_c",
]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs, fp32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """ECA's adaptive 1-D kernel size: `t = int(|(log2 C + beta) / gamma|)`, then odd and >= 3.

    gamma=2, beta=1 gives C=64: 3, 128..1024: 5, 2048: 7 (timm-compatible).
    """
    t = int(abs((math.log2(channels) + beta) / gamma))
    return max(t if t % 2 else t + 1, 3)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round `v` to the nearest multiple of `divisor`, at least `divisor` (timm, round_limit=0)."""
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


def ham_important_channels(channels: int, separation_rate: float = 0.6) -> int:
    """HAM's important-channel count `C_im = clamp(2*floor(lam*C/2 + 1/2), 1, max(C-1, 1))`.

    lam=0.6 gives C=64: 38, 128: 76, 256: 154, 512: 308, 2048: 1228.
    """
    c_im = 2 * math.floor(separation_rate * channels / 2 + 0.5)
    return min(max(c_im, 1), max(channels - 1, 1))


# Pairwise rank comparisons use (chunk, C, C) booleans; keep a chunk under ~16M of them.
_RANK_CHUNK_ELEMENTS = 1 << 24


def important_channel_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean (N, C) mask of the `k` top channels of `a` (N, C), per sample, by the contract's rank rule (docs/contract.md#top-k-rank-rule).

    Channel c is important iff fewer than k channels rank before it, where j ranks
    before c iff a[j] > a[c], or a[j] == a[c] and j < c. Computed literally as a rank
    count (no sort, whose tie order torch does not promise); exactly k are marked
    for NaN-free inputs.
    """
    n, c = a.shape
    index = torch.arange(c, device=a.device)
    lower_index = index[None, :] < index[:, None]  # [c, j]: j < c
    chunk = max(1, _RANK_CHUNK_ELEMENTS // (c * c))
    masks = []
    for a_chunk in a.split(chunk):
        a_c, a_j = a_chunk[:, :, None], a_chunk[:, None, :]  # [n, c, j]
        ranks_before = (a_j > a_c) | ((a_j == a_c) & lower_index)
        masks.append(ranks_before.sum(dim=-1) < k)
    return torch.cat(masks)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: view (N, g, C/g, H, W), swap the group axes, flatten."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def mean_hw(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Mean over H and W, accumulated in the contract's accumulation dtype."""
    return x.mean(dim=(2, 3), keepdim=keepdim, dtype=accumulate_dtype(x.dtype)).to(x.dtype)


def max_hw(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Max over H and W (NaN propagates; backward splits among ties, as torch.amax)."""
    return x.amax(dim=(2, 3), keepdim=keepdim)


def sum_c(x: torch.Tensor) -> torch.Tensor:
    """Sum over channels, keeping the channel dim, accumulated in the accumulation dtype."""
    return x.sum(dim=1, keepdim=True, dtype=accumulate_dtype(x.dtype)).to(x.dtype)


def mean_c(x: torch.Tensor) -> torch.Tensor:
    """Mean over channels, keeping the channel dim, accumulated in the accumulation dtype."""
    return x.mean(dim=1, keepdim=True, dtype=accumulate_dtype(x.dtype)).to(x.dtype)


def max_c(x: torch.Tensor) -> torch.Tensor:
    """Max over channels, keeping the channel dim."""
    return x.amax(dim=1, keepdim=True)
