// The nonlocal_attn hot path's operators: their schemas, and the math every backend implements.
// Kernels: cpu/nonlocal_attn.cpp and cuda/nonlocal_attn.cu register with TORCH_LIBRARY_IMPL;
// the library itself is csrc/attnkernels.cpp.
// attnkernels/ops/_schemas.py reads the schemas below from this file for the Triton backend: each
// is one m.def of adjacent string literals only.
//
// nonlocal_attn hot path (docs/contract.md PAM; CSM's spatial half): the HW x HW softmax matmul of
// position attention, flash-style. q, k are (N, D_qk, H, W); v and x are (N, D_v, H, W); all one
// floating dtype on one device, any strides: a kernel reads each tensor through its (n, d, p)
// strides, p = h*W + w, so NCHW (N, D, HW) and channels_last (N, HW, D) both need no copy (a
// tensor whose pixels do not flatten to one stride is made dense first). D_qk and D_v are
// independent (D_v up to 2048 and beyond: kernels tile it). gamma holds one value (any floating
// dtype, used in acc(x)). lse is (N, H*W) contiguous in acc(x); out and y have x's dtype and layout.
// i indexes queries and j keys, both over the H*W pixels.
//
//   nonlocal_attn(q, k, v, x, gamma, cpu_tile=0) -> (y, out, lse)
//     S[n,i,j] = sum_d q[n,d,i] * k[n,d,j]        (acc(x); no 1/sqrt(D) scaling; never stored whole)
//     lse[n,i] = log sum_j exp(S[n,i,j])          (online: a running max and sum per row i)
//     out[n,c,i] = sum_j exp(S[n,i,j] - lse[n,i]) * v[n,c,j]
//     y = gamma * out + x                         (out is also returned: backward needs it)
//   nonlocal_attn_backward(grad_y, q, k, v, gamma, out, lse, cpu_tile=0) -> (grad_q, grad_k, grad_v, grad_gamma)
//     P = exp(S - lse), recomputed block by block;  dO = gamma * grad_y
//     R[n,i] = sum_c grad_y[n,c,i] * out[n,c,i];   grad_gamma = sum_{n,i} R[n,i]  (gamma's shape, dtype)
//     dP[n,i,j] = sum_c dO[n,c,i] * v[n,c,j];      dS = P * (dP - gamma * R[n,i])
//     grad_v[n,c,j] = sum_i P[n,i,j] * dO[n,c,i]
//     grad_q[n,d,i] = sum_j dS[n,i,j] * k[n,d,j];  grad_k[n,d,j] = sum_i dS[n,i,j] * q[n,d,i]
//     each grad in its input's dtype and layout; grad_x = grad_y needs no op (autograd passes it).
//
// cpu_tile (0 to 1024) sizes the CPU kernels' unit of work along the pixels their threads split:
// query rows per forward task, keys per backward block; 0 takes the default tile (256), and a
// tile above H*W is H*W. It changes how the work is cut, not the math (the backward's dQ sums
// its key ranges in a tile-dependent order). attnkernels/ops/nonlocal_attn.py picks it per
// shape and thread count, by measurement (attnkernels.choose); the CUDA and Triton kernels
// size their own tiles and only check it.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnkernels, m) {
  m.def("nonlocal_attn(Tensor q, Tensor k, Tensor v, Tensor x, Tensor gamma, int cpu_tile=0) -> (Tensor y, Tensor out, Tensor lse)");
  m.def(
      "nonlocal_attn_backward(Tensor grad_y, Tensor q, Tensor k, Tensor v, Tensor gamma, Tensor out, Tensor lse, "
      "int cpu_tile=0) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_gamma)");
}

// The backward ops are not differentiable again: a double backward through them raises
// a clear "not implemented" instead of silently returning no gradient.
TORCH_LIBRARY_IMPL(attnkernels, Autograd, m) {
  for (const char* op : {"nonlocal_attn_backward"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
