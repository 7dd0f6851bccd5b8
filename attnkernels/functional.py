"""The fused functional API: every public op of every hot path, on the chosen backend.

Each function lives with its hot path in `attnkernels.ops.<hot_path>` (checks, reference
implementation, fakes, autograd); this module gathers them. Each runs on the backend
`attnkernels.backend.select` picks for the tensor's device (C++, CUDA, Triton, or the
plain-PyTorch reference) and is differentiable.

channel_gate (ECA; SE's and CBAM's pooling; HAM's channel half):
    avg, max = channel_pool(x)                          # one read of x
    gate     = channel_gate(avg, max, weight, mode=...)  # (N, C): mix, 1-D conv over C, sigmoid
    y        = channel_rescale(x, gate)                  # one read of x, one write of y
    y        = channel_attention(x, weight, mode=...)    # the three in one
    y        = channel_mlp_attention(x, w1, b1, w2, b2)  # SE's pool, MLP gate, rescale

ham_spatial (HAM's spatial half, given the channel gate Ac):
    d1, d2, mask = ham_spatial_pool(x, gate, c_im)       # one read of x: top-k mask, dual pooling
    z            = ham_spatial_conv(cat[d1, d2], weight)  # the shared 7x7 conv on the small maps
    y            = ham_spatial_apply(x, gate, mask, s1, s2)  # one read of x, one write of y

nonlocal_attn (PAM's HW x HW attention, flash-style; q, k, v from PAM's 1x1 convs):
    y = nonlocal_attn(q, k, v, x, gamma)   # gamma * (v @ softmax(q^T k)^T) + x, no HW x HW tensor

gam_channel and shuffle_conv (GAM):
    x1 = gam_channel(x, w1, b1, w2, b2)                   # per-pixel MLP gate, one read of x
    z1 = shuffle_conv(x1, conv1.weight, conv1.bias, g)    # raw grouped 7x7 conv (acc dtype)
    y  = shuffle_conv(z1, conv2.weight, conv2.bias, g, g, in_scale, in_shift,
                      gate_x=x1, out_scale=..., out_shift=...)   # BN1+ReLU+shuffle on load,
                                                                 # BN2+sigmoid+multiply epilogue
    y, mean, var = shuffle_conv_bn_gate(...)              # the same with BN2's batch statistics

softmax_spatial (SoftmaxSpatial):
    y = softmax_spatial(x, weight, bias, rescale)   # x * softmax_p(conv1x1(x))[c // (C/g)] * (H*W or 1)

block_tail (a residual block's tail, attnkernels.nn.block_tail):
    out = block_tail(z, shortcut, running_mean, running_var, weight, bias, training, momentum, eps,
                     gate)   # relu(batch_norm(z) * gate(mean of bn(z)) + shortcut), two passes

spatial_tail (a block tail with CBAM's or HAM's attention, attnkernels.nn.block_tail):
    out = spatial_tail(z, shortcut, running_mean, running_var, weight, bias, training, momentum,
                       eps, channel_gate=..., spatial_gate=..., important=None)
          # relu(x1 * spatial_gate(pooled x1) + shortcut), x1 = batch_norm(z) * channel_gate(...)
    mask = top_channels(gate, k)                   # HAM's important channels, the rank rule
"""
from __future__ import annotations

from .ops import HOT_PATHS, hot_path_module

# Every hot path's public functions (its op module's __all__), gathered here once.
__all__: list[str] = []
for _hot_path in HOT_PATHS:
    _module = hot_path_module(_hot_path)
    for _name in _module.__all__:
        globals()[_name] = getattr(_module, _name)
    __all__ += _module.__all__
del _hot_path, _module, _name
