// The cam hot path's operators: their schemas, and the math every backend implements.
// Kernels: cpu/cam.cpp and cuda/cam.cu, registered with TORCH_LIBRARY_IMPL, and the Triton
// backend's attnkernels/triton/cam.py. The library itself is csrc/attnkernels.cpp.
// attnkernels/ops/_schemas.py reads the schemas below from this file for the Triton backend:
// each is one m.def of adjacent string literals only.
//
// cam hot path (docs/contract.md CAM): DANet's channel attention over the C x C Gram matrix of
// each sample. x is (N, C, H, W) with any strides, X[n] = x[n] viewed (C, P), P = H*W, read in
// acc(x) (float32 for half inputs: the energies are never rounded to x's dtype). gamma holds one
// value (any floating dtype, used in acc(x)). attn is (N, C, C) contiguous in acc(x); i and j
// index channels.
//
//   cam(x, gamma) -> (y, attn)
//     E[n,i,j] = sum_p X[n,i,p] * X[n,j,p]                       (acc)
//     attn[n,i,j] = exp(min_j' E[n,i,j'] - E[n,i,j]) / Z[n,i]   softmax(rowmax(E) - E) = softmax(-E)
//       Z[n,i] = sum_j exp(min_j' E[n,i,j'] - E[n,i,j]);  a weight below the smallest normal
//       number of acc (FLT_MIN 1.2e-38, DBL_MIN 2.2e-308) is written as 0. Far from the
//       row's minimum energy most weights underflow, and subnormal operands slow a CPU's
//       matmul tenfold; each flushed weight changes out by at most that bound times |X|.
//     out[n,i,p] = sum_j attn[n,i,j] * X[n,j,p]                  (acc)
//     y = gamma * out + x                                         (acc, rounded once to x's dtype and layout)
//   cam_backward(grad_y, x, gamma, attn) -> (grad_x, grad_gamma)
//     g = grad_y in acc;  G[n,i,j] = sum_p g[n,i,p] * X[n,j,p]
//     grad_gamma = sum_{n,i,j} attn * G                           (= sum(grad_y * out); gamma's shape and dtype)
//     dA = gamma * G;  dS = attn * (dA - rowsum(dA * attn));  dE = -dS
//     grad_x = g + gamma * attn^T g + (dE + dE^T) X               (x's dtype and layout)
//   grad_y is in x's dtype with x's shape (any strides).
//
// rowmax(E) is a shift of each softmax row: its gradient cancels in exact arithmetic and no
// kernel forms it. Saved for backward: x and attn (N*C*C values; eager CAM saves
// E, the shifted E and attn besides); out is not saved: grad_gamma is sum(attn * G).
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnkernels, m) {
  m.def("cam(Tensor x, Tensor gamma) -> (Tensor y, Tensor attn)");
  m.def("cam_backward(Tensor grad_y, Tensor x, Tensor gamma, Tensor attn) -> (Tensor grad_x, Tensor grad_gamma)");
}

// The backward op is not differentiable again: a double backward through it raises a clear
// "not implemented" instead of silently returning no gradient.
TORCH_LIBRARY_IMPL(attnkernels, Autograd, m) {
  m.impl("cam_backward", torch::autograd::autogradNotImplementedFallback());
}
