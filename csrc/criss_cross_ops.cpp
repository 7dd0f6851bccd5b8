// The criss_cross hot path's operators: their schemas, and the math every backend implements.
// Kernels: cpu/criss_cross.cpp and cuda/criss_cross.cu, registered with TORCH_LIBRARY_IMPL, and
// the Triton backend's attnkernels/triton/criss_cross.py. The library itself is csrc/attnkernels.cpp.
// attnkernels/ops/_schemas.py reads the schemas below from this file for the Triton backend:
// each is one m.def of adjacent string literals only.
//
// criss_cross hot path (docs/contract.md CrissCross): CCNet's attention of each pixel over its
// row and its column. q, k are (N, D, H, W) and v, x (N, C, H, W), one floating dtype, any
// strides; gamma holds one value. The arguments are nonlocal_attn's and are checked by its rules
// (include/attnkernels/criss_cross.h). Everything in acc(x). For pixel (h, w) the keys are the
// column (h', w), h' != h, and the row (h, w'), every w' (the pixel itself once):
//
//   criss_cross(q, k, v, x, gamma) -> (y, out, lse)
//     e_col[n,h,w,h'] = sum_d q[n,d,h,w] k[n,d,h',w]   (h' != h)
//     e_row[n,h,w,w'] = sum_d q[n,d,h,w] k[n,d,h,w']
//     lse[n,h*W+w] = log(sum_h' exp(e_col) + sum_w' exp(e_row))        (N, H*W) contiguous, acc
//     out[n,c,h,w] = sum_h' exp(e_col - lse) v[n,c,h',w] + sum_w' exp(e_row - lse) v[n,c,h,w']
//     y = gamma * out + x                          (out and y in x's dtype and layout)
//   criss_cross_backward(grad_y, q, k, v, gamma, out, lse) -> (grad_q, grad_k, grad_v, grad_gamma)
//     P = exp(e - lse) recomputed;  dO = gamma * grad_y;  R[n,h,w] = sum_c grad_y * out (in acc)
//     grad_gamma = sum R                           (gamma's shape and dtype)
//     dP_col[n,h,w,h'] = sum_c dO[n,c,h,w] v[n,c,h',w];  dP_row likewise over the row
//     dS = P * (dP - gamma * R)
//     grad_q[d,h,w]  = sum_h' dS_col k[d,h',w] + sum_w' dS_row k[d,h,w']
//     grad_k[d,h',w] = sum_h dS_col[h,w,h'] q[d,h,w]  +  grad_k[d,h,w'] = sum_w dS_row[h,w,w'] q[d,h,w]
//     grad_v[c,h',w] = sum_h P_col[h,w,h'] dO[c,h,w]  +  grad_v[c,h,w'] = sum_w P_row[h,w,w'] dO[c,h,w]
//     each gradient in its input's dtype and layout; grad_x = grad_y needs no op.
//
// No tensor of (N, H + W - 1, H, W) energies is written, forward or backward: kernels hold one
// row's or one column's block at a time. Saved for backward: q, k, v, out and lse (O(N C H W)).
// Suggested split (benchmarks/NOTES.md, session 24): row tasks (n, h) then column tasks (n, w),
// so every gradient write is task-local and sums run in a fixed order.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnkernels, m) {
  m.def("criss_cross(Tensor q, Tensor k, Tensor v, Tensor x, Tensor gamma) -> (Tensor y, Tensor out, Tensor lse)");
  m.def(
      "criss_cross_backward(Tensor grad_y, Tensor q, Tensor k, Tensor v, Tensor gamma, Tensor out, Tensor lse) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_gamma)");
}

TORCH_LIBRARY_IMPL(attnkernels, Autograd, m) {
  m.impl("criss_cross_backward", torch::autograd::autogradNotImplementedFallback());
}
