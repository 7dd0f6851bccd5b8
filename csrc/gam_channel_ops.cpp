// The gam_channel hot path's operators: their schemas, and the math every backend implements.
// Kernels: cpu/gam_channel.cpp and cuda/gam_channel.cu register with TORCH_LIBRARY_IMPL;
// the library itself is csrc/attnkernels.cpp.
// attnkernels/ops/_schemas.py reads the schemas below from this file for the Triton backend: each
// is one m.def of adjacent string literals only.
//
// gam_channel hot path (docs/contract.md GAM, its channel gate): GAM's per-pixel MLP gate from one read of x.
// x is (N, C, H, W) with any strides; p runs over the H*W pixels; w1 holds (rd, C) values, b1 rd,
// w2 (C, rd), b2 C (nn.Linear weights; any floating dtype, used in acc(x)).
//
//   gam_channel(x, w1, b1, w2, b2) -> x1
//     h[n,r,p] = relu(sum_c w1[r,c] * x[n,c,p] + b1[r]);  m[n,c,p] = sigmoid(sum_r w2[c,r] * h[n,r,p] + b2[c])
//     x1 = x * m   (acc(x), rounded to x's dtype, in x's layout). Nothing else is written.
//   gam_channel_backward(grad_x1, x, w1, b1, w2, b2) -> (grad_x, grad_w1, grad_b1, grad_w2, grad_b2)
//     recomputes h and m from x;  g = grad_x1 * x * m * (1 - m)          (the gradient of fc2's output)
//     dh[n,r,p] = relu_grad(sum_c w2[c,r] * g[n,c,p], h)                 (the gradient of fc1's output)
//     grad_x = grad_x1 * m + sum_r w1[r,c] * dh[n,r,p]   (x's dtype and layout)
//     grad_w2[c,r] = sum_{n,p} g * h;  grad_b2[c] = sum_{n,p} g;  grad_w1[r,c] = sum_{n,p} dh * x;
//     grad_b1[r] = sum_{n,p} dh   (each weight's shape and dtype; deterministic sums)
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnkernels, m) {
  m.def("gam_channel(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor");
  m.def(
      "gam_channel_backward(Tensor grad_x1, Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) "
      "-> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2)");
}

// The backward ops are not differentiable again: a double backward through them raises
// a clear "not implemented" instead of silently returning no gradient.
TORCH_LIBRARY_IMPL(attnkernels, Autograd, m) {
  for (const char* op : {"gam_channel_backward"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
