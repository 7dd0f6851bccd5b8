// Argument checks of the shuffle_conv hot path (csrc/shuffle_conv_ops.cpp: schemas and math).
#pragma once

#include "attnkernels/common.h"

namespace attnkernels {

// shuffle_conv's input and conv: s (N, C_in, H, W); weight (C_out, C_in/groups, k, k), k odd; groups divides
// C_in and C_out; shuffle_groups divides C_in; bias C_out values; in_scale/in_shift both or neither, C_in values.
inline void check_shuffle_conv_args(const at::Tensor& s, const at::Tensor& weight, int64_t groups,
                                    int64_t shuffle_groups, const c10::optional<at::Tensor>& in_scale,
                                    const c10::optional<at::Tensor>& in_shift, const char* op) {
  check_feature_map(s, op, "s");
  const int64_t C_in = s.size(1);
  AK_CHECK_VALUE(groups >= 1 && C_in % groups == 0, op, ": groups must be a positive divisor of s's ", C_in,
                    " channels, got ", groups);
  AK_CHECK_VALUE(shuffle_groups >= 1 && C_in % shuffle_groups == 0, op,
                    ": shuffle_groups must be a positive divisor of s's ", C_in, " channels, got ", shuffle_groups);
  AK_CHECK_VALUE(weight.dim() == 4 && weight.size(0) >= 1 && weight.size(0) % groups == 0 &&
                        weight.size(1) == C_in / groups && weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
                    op, ": weight must have shape (C_out, C_in / groups, k, k) = (C_out, ", C_in / groups,
                    ", k, k) with k odd and groups = ", groups, " dividing C_out, got ", weight.sizes());
  check_floating(weight, op, "weight");
  check_device(weight, s.device(), op, "weight");
  AK_CHECK_VALUE(in_scale.has_value() == in_shift.has_value(), op,
                    ": in_scale and in_shift must be given together");
  if (in_scale.has_value()) {
    check_vector(*in_scale, C_in, s.device(), op, "in_scale", "C_in");
    check_vector(*in_shift, C_in, s.device(), op, "in_shift", "C_in");
  }
}

// shuffle_conv's epilogue inputs: gate_x (N, C_out, H, W) a feature map on the device; out_scale, out_shift C_out values.
inline void check_epilogue_args(const at::Tensor& gate_x, const at::Tensor& out_scale, const at::Tensor& out_shift,
                                at::IntArrayRef out_sizes, const at::Device& device, const char* op) {
  AK_CHECK_VALUE(gate_x.sizes() == out_sizes, op, ": gate_x must have the output's shape (N, C_out, H, W) = ",
                    out_sizes, ", got ", gate_x.sizes());
  check_feature_dtype(gate_x, op, "gate_x");
  check_device(gate_x, device, op, "gate_x");
  check_vector(out_scale, out_sizes[1], device, op, "out_scale", "C_out");
  check_vector(out_shift, out_sizes[1], device, op, "out_shift", "C_out");
}

}  // namespace attnkernels
