// The channel_gate hot path's operators: their schemas, and the math every backend implements.
// Kernels: cpu/channel_gate.cpp and cuda/channel_gate.cu register with TORCH_LIBRARY_IMPL;
// the library itself is csrc/attnkernels.cpp.
// attnkernels/ops/_schemas.py reads the schemas below from this file for the Triton backend: each
// is one m.def of adjacent string literals only.
//
// channel_gate hot path (docs/contract.md: ECA, SE's pooling, HAM's channel half). Shapes: x is
// (N, C, H, W) with any strides; pooled maps and gates are (N, C) contiguous in the
// accumulation dtype acc(x) = float64 for float64 x, float32 otherwise.
//
//   channel_pool(x) -> (avg, max)
//     avg[n,c] = sum_hw x / (H*W);  max[n,c] = amax_hw x (NaN propagates).
//   channel_pool_backward(grad_avg, grad_max?, x, max) -> grad_x
//     grad_x = grad_avg / (H*W) + [x == max] * grad_max / count,  count = #{hw : x == max}
//     (ties share the gradient evenly, and a NaN max, count 0, gives NaN, as torch.amax);
//     grad_x has x's dtype and layout.
//   channel_gate(avg, max, weight, alpha?, beta?, mode) -> gate
//     mode 0: f = avg;  1: f = max;  2: f = 0.5*(avg + max) + alpha*avg + beta*max
//     z[n,c] = sum_j weight[j] * f[n, c + j - (k-1)/2]   (zero padding; k = weight.numel(), odd)
//     gate = sigmoid(z)
//   channel_gate_backward(grad_gate, gate, avg, max, weight, alpha?, beta?, mode)
//       -> (grad_avg, grad_max, grad_weight, grad_alpha, grad_beta)
//     dz = grad_gate * gate * (1 - gate);  df[n,c] = sum_j weight[j] * dz[n, c - j + (k-1)/2]
//     grad_weight[j] = sum_{n,c} dz[n,c] * f[n, c + j - (k-1)/2]   (weight's shape and dtype)
//     mode 0: grad_avg = df, grad_max = 0;  1: grad_avg = 0, grad_max = df
//     mode 2: grad_avg = df*(0.5+alpha), grad_max = df*(0.5+beta),
//             grad_alpha = sum df*avg, grad_beta = sum df*max (0-dim, alpha's dtype); else 0-dim zeros.
//   channel_rescale(x, gate) -> y
//     y = x * gate[:, :, None, None], multiplied in acc(x), rounded to x's dtype, in x's layout.
//   channel_rescale_backward(grad_y, x, gate) -> (grad_x, grad_gate)
//     grad_x = grad_y * gate (x's dtype and layout);  grad_gate[n,c] = sum_hw grad_y * x (acc).
//   channel_attention(x, weight, alpha?, beta?, mode) -> (y, avg, max, gate)
//     the three forward ops in one: avg, max = channel_pool(x); gate = channel_gate(...);
//     y = channel_rescale(x, gate). The CPU kernel runs them sample by sample, so the second
//     read of x[n] hits the cache; elsewhere attnkernels' Python composite calls the three ops.
//   channel_mlp_attention(x, w1, b1?, w2, b2?) -> (y, avg, gate)
//     SE's gate in place of the 1-D conv: avg = mean_hw x; h = relu(w1 @ avg + b1) (rd values);
//     gate = sigmoid(w2 @ h + b2); y = channel_rescale(x, gate). w1 holds rd*C values
//     (rd = w1.size(0), e.g. a Conv2d(C, rd, 1) weight), w2 C*rd; the MLP runs in acc(x).
//     b1 holds rd values shared by every sample, or is (N, rd), one row per sample: Bridge's
//     folded x term plus its bridges' pooled terms (docs/contract.md "Bridge").
//     Same per-sample CPU kernel as channel_attention; elsewhere the Python composite.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnkernels, m) {
  m.def("channel_pool(Tensor x) -> (Tensor avg, Tensor max)");
  m.def("channel_pool_backward(Tensor grad_avg, Tensor? grad_max, Tensor x, Tensor max) -> Tensor");
  m.def("channel_gate(Tensor avg, Tensor max, Tensor weight, Tensor? alpha, Tensor? beta, int mode) -> Tensor");
  m.def(
      "channel_gate_backward(Tensor grad_gate, Tensor gate, Tensor avg, Tensor max, Tensor weight, "
      "Tensor? alpha, Tensor? beta, int mode) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("channel_rescale(Tensor x, Tensor gate) -> Tensor");
  m.def("channel_rescale_backward(Tensor grad_y, Tensor x, Tensor gate) -> (Tensor, Tensor)");
  m.def(
      "channel_attention(Tensor x, Tensor weight, Tensor? alpha, Tensor? beta, int mode) "
      "-> (Tensor y, Tensor avg, Tensor max, Tensor gate)");
  m.def(
      "channel_mlp_attention(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2) "
      "-> (Tensor y, Tensor avg, Tensor gate)");
}

// The backward ops are not differentiable again: a double backward through them raises
// a clear "not implemented" instead of silently returning no gradient.
TORCH_LIBRARY_IMPL(attnkernels, Autograd, m) {
  for (const char* op : {"channel_pool_backward", "channel_gate_backward", "channel_rescale_backward"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
