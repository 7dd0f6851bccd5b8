// Argument checks of the block_tail hot path (csrc/block_tail_ops.cpp: schemas and math), shared
// by the CPU and CUDA kernels, in the words of attnkernels/ops/block_tail.py's checks.
#pragma once

#include "attnkernels/common.h"

namespace attnkernels {

// block_tail_apply: x (N, C, H, W) in a feature dtype; y shaped like x in its dtype; a, b, c
// (N, C) in acc(x); all on x's device.
inline void check_block_tail_apply_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a,
                                        const at::Tensor& b, const at::Tensor& c, const char* op) {
  check_feature_map(x, op, "x");
  check_like_x(y, x, op, "y");
  check_per_channel(a, x, op, "a");
  check_per_channel(b, x, op, "b");
  check_per_channel(c, x, op, "c");
}

// block_tail_backward_reduce: z (N, C, H, W) in a feature dtype; grad_out and out shaped like z
// in its dtype, on z's device.
inline void check_block_tail_backward_reduce_args(const at::Tensor& grad_out, const at::Tensor& out,
                                                  const at::Tensor& z, const char* op) {
  check_feature_map(z, op, "z");
  check_like_x(grad_out, z, op, "grad_out");
  check_like_x(out, z, op, "out");
}

}  // namespace attnkernels
