// Argument checks of the cam hot path (csrc/cam_ops.cpp: schemas and math), shared by the CPU
// and CUDA kernels, in the words of attnkernels/ops/cam.py's checks.
#pragma once

#include "attnkernels/common.h"

namespace attnkernels {

// x (N, C, H, W) in a feature dtype is checked by the caller (check_feature_map); gamma holds
// one floating value on x's device. grad_y is checked by the caller after these.
inline void check_cam_args(const at::Tensor& x, const at::Tensor& gamma, const char* op) {
  check_one_value(gamma, x.device(), op, "gamma");
}

// cam_backward: attn as cam returns it, (N, C, C) in acc(x) on x's device.
inline void check_cam_backward_args(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& attn,
                                    const char* op) {
  check_cam_args(x, gamma, op);
  const int64_t N = x.size(0), C = x.size(1);
  check_floating(attn, op, "attn");
  AK_CHECK_VALUE(attn.dim() == 3 && attn.size(0) == N && attn.size(1) == C && attn.size(2) == C, op,
                 ": attn must have shape (N, C, C) = (", N, ", ", C, ", ", C, "), got ", attn.sizes());
  AK_CHECK_TYPE(attn.scalar_type() == acc_type(x.scalar_type()), op, ": attn must be ", acc_type(x.scalar_type()),
                " (the accumulation dtype of x, ", x.scalar_type(), "), got ", attn.scalar_type());
  check_device(attn, x.device(), op, "attn");
}

}  // namespace attnkernels
