// Argument checks of the cbam_spatial hot path (csrc/cbam_spatial_ops.cpp: schemas and math),
// shared by the CPU and CUDA kernels, in the words of attnkernels/ops/cbam_spatial.py's checks.
// The (N, k, H, W) pixel-map rule is ham_spatial's (the same maps, one group).
#pragma once

#include "attnkernels/common.h"
#include "attnkernels/ham_spatial.h"

namespace attnkernels {

// x (N, C, H, W) in a feature dtype is checked by the caller (check_feature_map); gate is
// CBAM's channel gate a, (N, C) in acc(x) on x's device.
inline void check_cbam_spatial_pool_args(const at::Tensor& x, const at::Tensor& gate, const char* op) {
  check_per_channel(gate, x, op, "gate");
}

// pool_backward: grad_d and d are (N, 2, H, W) maps of x in acc(x).
inline void check_cbam_spatial_pool_backward_args(const at::Tensor& grad_d, const at::Tensor& x,
                                                  const at::Tensor& gate, const at::Tensor& d, const char* op) {
  check_per_channel(gate, x, op, "gate");
  check_pixel_map(grad_d, x, 2, op, "grad_d");
  check_pixel_map(d, x, 2, op, "d");
}

// apply and apply_backward: s is the spatial gate, (N, 1, H, W) in acc(x). grad_y is checked
// by the caller (walked_like_x / check_like_x), after these.
inline void check_cbam_spatial_apply_args(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& s,
                                          const char* op) {
  check_per_channel(gate, x, op, "gate");
  check_pixel_map(s, x, 1, op, "s");
}

}  // namespace attnkernels
