// Argument checks of the triplet hot path (csrc/triplet_ops.cpp: schemas and math), shared by
// the CPU and CUDA kernels, in the words of attnkernels/ops/triplet.py's checks (_plane_map).
#pragma once

#include "attnkernels/common.h"

namespace attnkernels {

// The three gates, in the order every op sums them. Each gate's map lies in a plane of two of
// x's dims: hw (H, W) pooled over C, cw (C, W) pooled over H, hc (H, C) pooled over W.
enum class Gate { HW, CW, HC };

struct PlaneDims {
  int64_t rows, cols;  // dims of x
  const char* names;   // as the messages write the plane
};

inline PlaneDims plane_dims(Gate gate) {
  switch (gate) {
    case Gate::HW:
      return {2, 3, "H, W"};
    case Gate::CW:
      return {1, 3, "C, W"};
    default:
      return {2, 1, "H, C"};
  }
}

// t is gate `gate`'s (N, k, rows, cols) map of x (k = 2: a pooled map d_* or its gradient;
// k = 1: a gate s_*), floating, in acc(x), on x's device: the Python check's order and words.
inline void check_plane_map(const at::Tensor& t, const at::Tensor& x, Gate gate, int64_t k, const char* op,
                            const char* name) {
  check_floating(t, op, name);
  const PlaneDims p = plane_dims(gate);
  const int64_t N = x.size(0), rows = x.size(p.rows), cols = x.size(p.cols);
  AK_CHECK_VALUE(t.dim() == 4 && t.size(0) == N && t.size(1) == k && t.size(2) == rows && t.size(3) == cols, op,
                 ": ", name, " must have shape (N, ", k, ", ", p.names, ") = (", N, ", ", k, ", ", rows, ", ", cols,
                 "), got ", t.sizes());
  AK_CHECK_TYPE(t.scalar_type() == acc_type(x.scalar_type()), op, ": ", name, " must be ",
                acc_type(x.scalar_type()), " (the accumulation dtype of x, ", x.scalar_type(), "), got ",
                t.scalar_type());
  check_device(t, x.device(), op, name);
}

// x (N, C, H, W) is checked by the caller (check_feature_map). apply and apply_backward: the
// gates s_hw (N, 1, H, W), s_cw (N, 1, C, W), s_hc (N, 1, H, C); grad_y is checked after these
// (walked_like_x).
inline void check_triplet_apply_args(const at::Tensor& x, const at::Tensor& s_hw, const at::Tensor& s_cw,
                                     const at::Tensor& s_hc, const char* op) {
  check_plane_map(s_hw, x, Gate::HW, 1, op, "s_hw");
  check_plane_map(s_cw, x, Gate::CW, 1, op, "s_cw");
  check_plane_map(s_hc, x, Gate::HC, 1, op, "s_hc");
}

// pool_backward: for each gate in order, grad_d_* then d_*, (N, 2, plane) maps as triplet_pool
// returns them.
inline void check_triplet_pool_backward_args(const at::Tensor& grad_d_hw, const at::Tensor& grad_d_cw,
                                             const at::Tensor& grad_d_hc, const at::Tensor& x,
                                             const at::Tensor& d_hw, const at::Tensor& d_cw,
                                             const at::Tensor& d_hc, const char* op) {
  check_plane_map(grad_d_hw, x, Gate::HW, 2, op, "grad_d_hw");
  check_plane_map(d_hw, x, Gate::HW, 2, op, "d_hw");
  check_plane_map(grad_d_cw, x, Gate::CW, 2, op, "grad_d_cw");
  check_plane_map(d_cw, x, Gate::CW, 2, op, "d_cw");
  check_plane_map(grad_d_hc, x, Gate::HC, 2, op, "grad_d_hc");
  check_plane_map(d_hc, x, Gate::HC, 2, op, "d_hc");
}

}  // namespace attnkernels
