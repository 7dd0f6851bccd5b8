// The bam hot path's operators: their schemas, and the math every backend implements.
// Kernels: cpu/bam.cpp and cuda/bam.cu, registered with TORCH_LIBRARY_IMPL, and the Triton
// backend's attnkernels/triton/bam.py. The library itself is csrc/attnkernels.cpp.
// attnkernels/ops/_schemas.py reads the schemas below from this file for the Triton backend:
// each is one m.def of adjacent string literals only.
//
// bam hot path (docs/contract.md BAM): the one pass over x that combines BAM's two branches.
// x is (N, C, H, W) with any strides; mc is the channel branch's output, (N, C) in acc(x); ms
// is the spatial branch's, (N, 1, H, W) NCHW-contiguous in acc(x); p runs over the H*W pixels.
// Everything below is in acc(x):
//   z[n,c,p] = mc[n,c] + ms[n,0,p];   sig = sigmoid(z) = 1 / (1 + exp(-z))
//
//   bam_apply(x, mc, ms) -> y
//     y = x * (1 + sig)                    x's dtype and layout
//   bam_apply_backward(grad_y, x, mc, ms) -> (grad_x, grad_mc, grad_ms)
//     grad_x = grad_y * (1 + sig)          x's dtype and layout
//     dz = (grad_y * x) * (sig * (1 - sig))
//     grad_mc[n,c] = sum_p dz;   grad_ms[n,0,p] = sum_c dz      (acc, contiguous)
//   grad_y is in x's dtype with x's shape (any strides).
//
// The branches themselves (the channel MLP on channel_pool's mean, the spatial convs with their
// BatchNorms) run in torch on small maps. Backward saves x, mc and ms: no x-sized tensor but x.
// Reductions are combined in a fixed order (no atomics): results do not depend on threads.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnkernels, m) {
  m.def("bam_apply(Tensor x, Tensor mc, Tensor ms) -> Tensor");
  m.def(
      "bam_apply_backward(Tensor grad_y, Tensor x, Tensor mc, Tensor ms) "
      "-> (Tensor grad_x, Tensor grad_mc, Tensor grad_ms)");
}

// The backward op is not differentiable again: a double backward through it raises a clear
// "not implemented" instead of silently returning no gradient.
TORCH_LIBRARY_IMPL(attnkernels, Autograd, m) {
  m.impl("bam_apply_backward", torch::autograd::autogradNotImplementedFallback());
}
