// Argument checks of the spatial_tail hot path (csrc/spatial_tail_ops.cpp: schemas and math),
// shared by the CPU and CUDA kernels, in the words of attnkernels/ops/spatial_tail.py's checks.
// Small maps may come with any strides: the kernels read them through .contiguous().
#pragma once

#include <c10/util/Optional.h>

#include "attnkernels/common.h"
#include "attnkernels/ham_spatial.h"  // check_pixel_map

namespace attnkernels {

// The channel groups: no mask (one group), or an (N, C) bool mask on z's device (two groups).
inline int64_t check_spatial_tail_mask(const std::optional<at::Tensor>& mask, const at::Tensor& z, const char* op) {
  if (!mask.has_value()) return 1;
  const at::Tensor& m = *mask;
  AK_CHECK_VALUE(m.dim() == 2 && m.size(0) == z.size(0) && m.size(1) == z.size(1), op,
                 ": mask must have shape (N, C) = (", z.size(0), ", ", z.size(1), "), got ", m.sizes());
  AK_CHECK_TYPE(m.scalar_type() == at::kBool, op, ": mask must be bool, got ", m.scalar_type());
  check_device(m, z.device(), op, "mask");
  return 2;
}

// z a feature map; a, b (N, C) in acc(z); mask as above. Returns G, the number of groups.
inline int64_t check_spatial_tail_x1_args(const at::Tensor& z, const at::Tensor& a, const at::Tensor& b,
                                          const std::optional<at::Tensor>& mask, const char* op) {
  check_feature_map(z, op, "z");
  check_per_channel(a, z, op, "a");
  check_per_channel(b, z, op, "b");
  return check_spatial_tail_mask(mask, z, op);
}

// spatial_tail_apply: the x1 arguments; shortcut like z; s (N, G, H, W) in acc(z).
inline int64_t check_spatial_tail_apply_args(const at::Tensor& z, const at::Tensor& shortcut, const at::Tensor& a,
                                             const at::Tensor& b, const at::Tensor& s,
                                             const std::optional<at::Tensor>& mask, const char* op) {
  const int64_t G = check_spatial_tail_x1_args(z, a, b, mask, op);
  check_like_x(shortcut, z, op, "shortcut");
  check_pixel_map(s, z, G, op, "s");
  return G;
}

// spatial_tail_backward_reduce: the x1 arguments; grad_out and out like z; s (N, G, H, W).
inline int64_t check_spatial_tail_backward_reduce_args(const at::Tensor& grad_out, const at::Tensor& out,
                                                       const at::Tensor& z, const at::Tensor& a, const at::Tensor& b,
                                                       const at::Tensor& s, const std::optional<at::Tensor>& mask,
                                                       const char* op) {
  const int64_t G = check_spatial_tail_x1_args(z, a, b, mask, op);
  check_like_x(grad_out, z, op, "grad_out");
  check_like_x(out, z, op, "out");
  check_pixel_map(s, z, G, op, "s");
  return G;
}

// spatial_tail_pool_backward: the x1 arguments; dmax, gsum, gmax (N, G, H, W) in acc(z).
inline int64_t check_spatial_tail_pool_backward_args(const at::Tensor& z, const at::Tensor& a, const at::Tensor& b,
                                                     const std::optional<at::Tensor>& mask, const at::Tensor& dmax,
                                                     const at::Tensor& gsum, const at::Tensor& gmax, const char* op) {
  const int64_t G = check_spatial_tail_x1_args(z, a, b, mask, op);
  check_pixel_map(dmax, z, G, op, "dmax");
  check_pixel_map(gsum, z, G, op, "gsum");
  check_pixel_map(gmax, z, G, op, "gmax");
  return G;
}

// spatial_tail_backward_apply: pool_backward's arguments; grad_u like z; s (N, G, H, W);
// beta, gamma, zmax, kmax, zmin, kmin (N, C) in acc(z).
inline int64_t check_spatial_tail_backward_apply_args(
    const at::Tensor& grad_u, const at::Tensor& z, const at::Tensor& a, const at::Tensor& b,
    const std::optional<at::Tensor>& mask, const at::Tensor& s, const at::Tensor& dmax, const at::Tensor& gsum,
    const at::Tensor& gmax, const at::Tensor& beta, const at::Tensor& gamma, const at::Tensor& zmax,
    const at::Tensor& kmax, const at::Tensor& zmin, const at::Tensor& kmin, const char* op) {
  const int64_t G = check_spatial_tail_pool_backward_args(z, a, b, mask, dmax, gsum, gmax, op);
  check_like_x(grad_u, z, op, "grad_u");
  check_pixel_map(s, z, G, op, "s");
  check_per_channel(beta, z, op, "beta");
  check_per_channel(gamma, z, op, "gamma");
  check_per_channel(zmax, z, op, "zmax");
  check_per_channel(kmax, z, op, "kmax");
  check_per_channel(zmin, z, op, "zmin");
  check_per_channel(kmin, z, op, "kmin");
  return G;
}

}  // namespace attnkernels
