"""Baselines for the position-attention modules (PAM, CSM): the same module with its H*W x H*W
attention computed by torch's `F.scaled_dot_product_attention`, and the attention's FLOP count.

The `sdpa` variant of throughput.py: the module's own 1x1 projections (and, for CSM, its SE),
then SDPA with `scale=1.0` (PAM has no 1/sqrt(d) scaling) on (N, 1, H*W, D) views, D_qk != D_v.
On CUDA it is pinned to the memory-efficient kernel (FlashAttention needs equal head dims, and
the math kernel materialises the matrix, which is what the fused kernels avoid); elsewhere
SDPA picks its own kernel.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from attnkernels import reference as R


#: Registry names of the modules the sdpa variant reproduces.
SDPA_MODULES = ("pam", "csm")


def supports(module: nn.Module) -> bool:
    """True for the modules the sdpa variant reproduces (reference PAM and CSM)."""
    return type(module) in (R.PAM, R.CSM)


def _sdpa_pam(pam: R.PAM, x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    q, k, v = (conv(x).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (pam.query, pam.key, pam.value))
    with _backend(x.device):
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (N, 1, HW, C)
    return pam.gamma * out.squeeze(1).transpose(1, 2).reshape(n, c, h, w) + x


def _backend(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)


def sdpa_variant(module: nn.Module) -> Callable[..., torch.Tensor]:
    """`f(x)`: `module` (a reference PAM or CSM) with the attention done by SDPA."""
    if type(module) is R.PAM:
        return lambda x: _sdpa_pam(module, x)
    if type(module) is R.CSM:
        return lambda x: _sdpa_pam(module.spatial, module.channel(x))
    raise TypeError(f"the sdpa variant reproduces PAM and CSM, not {type(module).__name__}")


def attention_flops(module: nn.Module, shape: tuple, backward: bool) -> Optional[int]:
    """Multiply-adds x 2 of the H*W x H*W attention of a PAM/CSM at input `shape` (N, C, H, W),
    forward only or forward + backward, counted without recomputation (the same count for
    every variant): forward q^T k and P v^T, 2*N*HW^2*(D_qk + D_v); backward dV, dP, dQ, dK,
    2*N*HW^2*(2*D_qk + 2*D_v). None for other modules."""
    if not supports(module):
        return None
    n, c, h, w = shape
    hw, d_qk = h * w, c // 8
    forward = 2 * n * hw * hw * (d_qk + c)
    return forward * 3 if backward else forward
