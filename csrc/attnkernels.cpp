// attnkernels: the operator library itself (extension-cpp pattern). The ops are defined per hot
// path, each with its math, in csrc/<hot_path>_ops.cpp (TORCH_LIBRARY_FRAGMENT):
//   channel_gate_ops.cpp   channel_pool, channel_gate, channel_rescale (+ backwards),
//                          channel_attention, channel_mlp_attention
//   ham_spatial_ops.cpp    ham_spatial_pool, ham_spatial_apply, ham_spatial_conv (+ backwards), ham_attention
//   nonlocal_attn_ops.cpp  nonlocal_attn (+ backward)
//   gam_channel_ops.cpp    gam_channel (+ backward)
//   shuffle_conv_ops.cpp   shuffle_conv, shuffle_conv_epilogue (+ backwards)
// Kernels live in cpu/<hot_path>.cpp and cuda/<hot_path>.cu and register with TORCH_LIBRARY_IMPL;
// a hot path's argument checks are in include/attnkernels/<hot_path>.h.
#include <torch/library.h>

TORCH_LIBRARY(attnkernels, m) {}
