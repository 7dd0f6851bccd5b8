// Argument checks of the bam hot path (csrc/bam_ops.cpp: schemas and math), shared by the CPU
// and CUDA kernels, in the words of attnkernels/ops/bam.py's checks.
#pragma once

#include "attnkernels/common.h"
#include "attnkernels/ham_spatial.h"

namespace attnkernels {

// x (N, C, H, W) in a feature dtype is checked by the caller (check_feature_map). mc is the
// channel branch, (N, C) in acc(x); ms the spatial branch, (N, 1, H, W) in acc(x); both on x's
// device. grad_y is checked by the caller after these (walked_like_x).
inline void check_bam_apply_args(const at::Tensor& x, const at::Tensor& mc, const at::Tensor& ms, const char* op) {
  check_per_channel(mc, x, op, "mc");
  check_pixel_map(ms, x, 1, op, "ms");
}

}  // namespace attnkernels
