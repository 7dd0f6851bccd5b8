// Argument checks of the criss_cross hot path (csrc/criss_cross_ops.cpp: schemas and math),
// shared by the CPU and CUDA kernels. Its arguments are nonlocal_attn's (q, k, v, x, gamma; an
// (N, H*W) lse), so are its rules and words: attnkernels/ops/criss_cross.py calls the same checks.
#pragma once

#include "attnkernels/nonlocal_attn.h"

namespace attnkernels {

inline void check_criss_cross_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& x, const at::Tensor& gamma, const char* op) {
  check_nonlocal_args(q, k, v, x, gamma, op);
}

// criss_cross_backward: criss_cross's arguments with out in x's place (the messages name it x),
// grad_y shaped like out, lse as criss_cross returns it.
inline void check_criss_cross_backward_args(const at::Tensor& grad_y, const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const at::Tensor& gamma, const at::Tensor& out,
                                            const at::Tensor& lse, const char* op) {
  check_nonlocal_args(q, k, v, out, gamma, op);
  check_like_x(grad_y, out, op, "grad_y");
  check_row_stats(lse, out, op);
}

}  // namespace attnkernels
