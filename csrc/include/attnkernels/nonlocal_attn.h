// Argument checks of the nonlocal_attn hot path (csrc/nonlocal_attn_ops.cpp: schemas and math).
#pragma once

#include <utility>

#include "attnkernels/common.h"

namespace attnkernels {

// nonlocal_attn's inputs: q, k (N, D_qk, H, W) and v, x (N, D_v, H, W), one floating dtype on
// one device, gamma one floating value on that device.
inline void check_nonlocal_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& x, const at::Tensor& gamma, const char* op) {
  check_feature_map(x, op, "x");
  const int64_t N = x.size(0), D_v = x.size(1), H = x.size(2), W = x.size(3);
  AK_CHECK_VALUE(q.dim() == 4 && q.size(0) == N && q.size(1) >= 1 && q.size(2) == H && q.size(3) == W, op,
                    ": q must have shape (N, D_qk, H, W) = (", N, ", D_qk, ", H, ", ", W, "), got ", q.sizes());
  AK_CHECK_VALUE(k.sizes() == q.sizes(), op, ": k must have q's shape (N, D_qk, H, W) = ", q.sizes(), ", got ",
                    k.sizes());
  AK_CHECK_VALUE(v.sizes() == x.sizes(), op, ": v must have x's shape (N, D_v, H, W) = ", x.sizes(), ", got ",
                    v.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    AK_CHECK_TYPE(t->scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ",
                     x.scalar_type(), ", got ", t->scalar_type());
    check_device(*t, x.device(), op, name);
  }
  check_one_value(gamma, x.device(), op, "gamma");
}

// nonlocal_attn's lse: (N, H*W) in acc(x), on x's device.
inline void check_row_stats(const at::Tensor& lse, const at::Tensor& x, const char* op) {
  const int64_t HW = x.size(2) * x.size(3);
  AK_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == x.size(0) && lse.size(1) == HW, op,
                    ": lse must have shape (N, H*W) = (", x.size(0), ", ", HW, "), got ", lse.sizes());
  AK_CHECK_TYPE(lse.scalar_type() == acc_type(x.scalar_type()), op, ": lse must be ", acc_type(x.scalar_type()),
                   " (the accumulation dtype of x, ", x.scalar_type(), "), got ", lse.scalar_type());
  check_device(lse, x.device(), op, "lse");
}

// cpu_tile: 0 (the CPU kernels' default tile) or 1 to kMaxCpuTile pixels, which bounds the
// tiles to 4 MB per thread; every backend checks it.
constexpr int64_t kMaxCpuTile = 1024;
inline void check_cpu_tile(int64_t cpu_tile, const char* op) {
  AK_CHECK_VALUE(cpu_tile >= 0 && cpu_tile <= kMaxCpuTile, op,
                 ": cpu_tile must be 0 (the default tile) or 1 to ", kMaxCpuTile, " pixels, got ", cpu_tile);
}

}  // namespace attnkernels
