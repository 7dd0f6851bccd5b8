// The softmax_spatial hot path's operators: their schemas, and the math every backend implements.
// Kernels: cpu/softmax_spatial.cpp and cuda/softmax_spatial.cu register with TORCH_LIBRARY_IMPL;
// the library itself is csrc/attnkernels.cpp.
// attnkernels/ops/_schemas.py reads the schemas below from this file for the Triton backend: each
// is one m.def of adjacent string literals only.
//
// softmax_spatial hot path (docs/contract.md SoftmaxSpatial): the 1x1 conv's logits, their softmax
// over the pixels and the reweighting, from two reads of x. x is (N, C, H, W) with any strides; p
// runs over the P = H*W pixels; weight holds the conv's (g, C) values (2-D, g divides C), bias g
// (any floating dtype, used in acc(x)); G = C/g channels share map j = c // G; s = P if rescale else 1.
//
//   softmax_spatial(x, weight, bias, rescale) -> (y, a)
//     L[n,j,p] = sum_c weight[j,c] * x[n,c,p] + bias[j];   a[n,j,:] = softmax over p of L[n,j,:]
//     y[n,c,p] = x[n,c,p] * a[n,c//G,p] * s   (acc(x), rounded once to x's dtype, in x's layout)
//     a: (N, g, H, W) in acc(x), NCHW-contiguous; the one map saved for backward besides x.
//   softmax_spatial_backward(grad_y, x, weight, a, rescale) -> (grad_x, grad_weight, grad_bias)
//     dA[n,j,p] = s * sum_{c in group j} grad_y[n,c,p] * x[n,c,p];   dL = a * (dA - sum_p a * dA)
//     grad_x[n,c,p] = grad_y * a[n,c//G,p] * s + sum_j weight[j,c] * dL[n,j,p]   (x's dtype and layout)
//     grad_weight[j,c] = sum_{n,p} dL * x;  grad_bias[j] = sum_{n,p} dL   (weight's dtype; grad_bias
//     has g values; deterministic sums)
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnkernels, m) {
  m.def("softmax_spatial(Tensor x, Tensor weight, Tensor bias, bool rescale) -> (Tensor y, Tensor a)");
  m.def(
      "softmax_spatial_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor a, bool rescale) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
}

// The backward op is not differentiable again: a double backward through it raises a clear
// "not implemented" instead of silently returning no gradient.
TORCH_LIBRARY_IMPL(attnkernels, Autograd, m) {
  for (const char* op : {"softmax_spatial_backward"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
