// Argument checks of the ham_spatial hot path (csrc/ham_spatial_ops.cpp: schemas and math).
#pragma once

#include "attnkernels/common.h"

namespace attnkernels {

// An (N, k, H, W) per-pixel map in acc(x) on x's device: d1, d2 (k = 2) or s1, s2 (k = 1).
inline void check_pixel_map(const at::Tensor& t, const at::Tensor& x, int64_t k, const char* op,
                            const char* name) {
  AK_CHECK_VALUE(t.dim() == 4 && t.size(0) == x.size(0) && t.size(1) == k && t.size(2) == x.size(2) &&
                        t.size(3) == x.size(3),
                    op, ": ", name, " must have shape (N, ", k, ", H, W) = (", x.size(0), ", ", k, ", ",
                    x.size(2), ", ", x.size(3), "), got ", t.sizes());
  AK_CHECK_TYPE(t.scalar_type() == acc_type(x.scalar_type()), op, ": ", name, " must be ",
                   acc_type(x.scalar_type()), " (the accumulation dtype of x, ", x.scalar_type(), "), got ",
                   t.scalar_type());
  check_device(t, x.device(), op, name);
}

// HAM's important-channel count C_im, 1 <= c_im <= C.
inline void check_c_im(int64_t c_im, int64_t C, const char* op) {
  AK_CHECK_VALUE(c_im >= 1 && c_im <= C, op, ": c_im must be in [1, C] = [1, ", C, "], got ", c_im);
}

}  // namespace attnkernels
