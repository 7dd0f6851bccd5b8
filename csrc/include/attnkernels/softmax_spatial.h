// Argument checks of the softmax_spatial hot path (csrc/softmax_spatial_ops.cpp: schemas and math).
#pragma once

#include "attnkernels/common.h"

namespace attnkernels {

// softmax_spatial's x (N, C, H, W) and weight (g, C), g dividing C; returns g.
inline int64_t check_softmax_spatial_weight(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check_feature_map(x, op, "x");
  const int64_t C = x.size(1);
  AK_CHECK_VALUE(weight.dim() == 2 && weight.size(0) >= 1 && weight.size(1) == C && C % weight.size(0) == 0, op,
                    ": weight must have shape (g, C) = (g, ", C, ") with g dividing C, got ", weight.sizes());
  check_floating(weight, op, "weight");
  check_device(weight, x.device(), op, "weight");
  return weight.size(0);
}

// softmax_spatial's inputs: x, weight (g, C), bias g values.
inline void check_softmax_spatial_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                       const char* op) {
  const int64_t g = check_softmax_spatial_weight(x, weight, op);
  check_vector(bias, g, x.device(), op, "bias", "g");
}

// softmax_spatial_backward's inputs: grad_y like x, x, weight (g, C), a (N, g, H, W) in acc(x).
inline void check_softmax_spatial_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& a, const char* op) {
  const int64_t g = check_softmax_spatial_weight(x, weight, op);
  check_like_x(grad_y, x, op, "grad_y");
  AK_CHECK_VALUE(a.dim() == 4 && a.size(0) == x.size(0) && a.size(1) == g && a.size(2) == x.size(2) &&
                        a.size(3) == x.size(3),
                    op, ": a must have shape (N, ", g, ", H, W) = (", x.size(0), ", ", g, ", ", x.size(2), ", ", x.size(3),
                    "), got ", a.sizes());
  AK_CHECK_TYPE(a.scalar_type() == acc_type(x.scalar_type()), op, ": a must be ", acc_type(x.scalar_type()),
                   " (the accumulation dtype of x, ", x.scalar_type(), "), got ", a.scalar_type());
  check_device(a, x.device(), op, "a");
}

}  // namespace attnkernels
