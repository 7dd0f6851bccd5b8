// The block_tail hot path's operators: their schemas, and the math every backend implements.
// Kernels: cpu/block_tail.cpp and cuda/block_tail.cu, registered with TORCH_LIBRARY_IMPL, and the
// Triton backend's attnkernels/triton/block_tail.py. The library itself is csrc/attnkernels.cpp.
// attnkernels/ops/_schemas.py reads the schemas below from this file for the Triton backend:
// each is one m.def of adjacent string literals only.
//
// block_tail hot path (docs/contract.md "Block tail"): a residual block's tail
//   out = relu(bn(z) * gate + shortcut),   bn(z) = scale[c] * z + shift[c],   gate (N, C) or 1
// in two passes over z forward (statistics, apply) and two backward (reduce, apply), where eager
// takes six or more. The three ops below are its passes; attnkernels/ops/block_tail.py derives
// the (N, C) coefficients between them from BatchNorm's parameters, the gate module's output and
// its gradient. z, x, y are (N, C, H, W) with any strides; (N, C) maps are contiguous in the
// accumulation dtype acc(z) = float64 for float64 z, float32 otherwise; p runs over the P = H*W
// pixels. Everything is computed in acc and rounded once.
//
//   block_tail_stats(z) -> (mean, m2)
//     mean[n,c] = sum_p z[n,c,p] / P;   m2[n,c] = sum_p (z[n,c,p] - mean[n,c])^2
//     m2 is summed from deviations (two passes over a plane in cache, or Chan's combination of
//     block partials), never as sum z^2 - P * mean^2, which cancels when |mean| >> std.
//     P = 0 gives mean NaN (0 / 0, as torch.mean) and m2 0.
//   block_tail_apply(x, y, a, b, c, relu) -> out
//     out[n,c,p] = act(a[n,c] * x[n,c,p] + b[n,c] + c[n,c] * y[n,c,p]);  act = relu if relu
//     (relu(NaN) = NaN, as torch.relu) else identity. y has x's shape and dtype; out has x's dtype
//     and layout. The forward is apply(z, shortcut, scale*gate, shift*gate, 1, relu=true); the
//     backward's grad_z is apply(grad_u, z, a', b', c', relu=false) (ops/block_tail.py).
//   block_tail_backward_reduce(grad_out, out, z) -> (grad_u, s1, s2)
//     grad_u = out <= 0 ? 0 : grad_out    (relu's backward on its output, as torch's
//                                          threshold_backward: a NaN out passes the gradient)
//     s1[n,c] = sum_p grad_u;   s2[n,c] = sum_p grad_u * z        (acc)
//     grad_u has out's dtype and z's layout; it is the shortcut's gradient. grad_out and out have
//     z's shape and dtype (any strides).
//
// Reductions are combined in a fixed order (no atomics): results do not depend on threads.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnkernels, m) {
  m.def("block_tail_stats(Tensor z) -> (Tensor mean, Tensor m2)");
  m.def("block_tail_apply(Tensor x, Tensor y, Tensor a, Tensor b, Tensor c, bool relu) -> Tensor");
  m.def(
      "block_tail_backward_reduce(Tensor grad_out, Tensor out, Tensor z) "
      "-> (Tensor grad_u, Tensor s1, Tensor s2)");
}

// The passes are differentiated as a whole by ops/block_tail.py's autograd Functions, not one by
// one: a gradient through an op alone raises "not implemented" instead of silently returning none.
TORCH_LIBRARY_IMPL(attnkernels, Autograd, m) {
  m.impl("block_tail_stats", torch::autograd::autogradNotImplementedFallback());
  m.impl("block_tail_apply", torch::autograd::autogradNotImplementedFallback());
  m.impl("block_tail_backward_reduce", torch::autograd::autogradNotImplementedFallback());
}
