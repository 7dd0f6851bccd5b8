// Argument checks of the gam_channel hot path (csrc/gam_channel_ops.cpp: schemas and math).
#pragma once

#include "attnkernels/common.h"

namespace attnkernels {

// gam_channel's inputs: x (N, C, H, W); w1 (rd, C), b1 rd, w2 (C, rd), b2 C values (nn.Linear weights).
inline void check_gam_channel_args(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                   const at::Tensor& w2, const at::Tensor& b2, const char* op) {
  check_feature_map(x, op, "x");
  const int64_t C = x.size(1);
  AK_CHECK_VALUE(w1.dim() == 2 && w1.size(0) >= 1 && w1.size(1) == C, op, ": w1 must have shape (rd, C) = (rd, ",
                    C, "), got ", w1.sizes());
  const int64_t rd = w1.size(0);
  AK_CHECK_VALUE(w2.dim() == 2 && w2.size(0) == C && w2.size(1) == rd, op, ": w2 must have shape (C, rd) = (", C,
                    ", ", rd, "), got ", w2.sizes());
  check_vector(w1, rd * C, x.device(), op, "w1", "rd * C");
  check_vector(w2, C * rd, x.device(), op, "w2", "C * rd");
  check_vector(b1, rd, x.device(), op, "b1", "rd");
  check_vector(b2, C, x.device(), op, "b2", "C");
}

}  // namespace attnkernels
