// The spatial_tail hot path's operators: their schemas, and the math every backend implements.
// Kernels: cpu/spatial_tail.cpp and cuda/spatial_tail.cu, registered with TORCH_LIBRARY_IMPL, and
// the Triton backend's attnkernels/triton/spatial_tail.py. The library itself is
// csrc/attnkernels.cpp. attnkernels/ops/_schemas.py reads the schemas below from this file for
// the Triton backend: each is one m.def of adjacent string literals only.
//
// spatial_tail hot path (docs/contract.md "Spatial tail"): the tail of a residual block whose
// attention gates channels and then pixels (CBAM; HAM with its two channel groups),
//   x1  = a[n,c] * z + b[n,c]            bn(z) times the channel gate: a = gate * scale, b = gate * shift
//   out = relu(s[n, g(n,c), p] * x1 + shortcut)
// where s is the spatial gate of channel group g, computed in torch from per-pixel pooled maps of
// x1. Three passes over z forward (stats, pool, apply) and three backward (reduce, pool_backward,
// backward_apply); attnkernels/ops/spatial_tail.py derives everything (N, C)- or pixel-map-sized
// between them. z, shortcut, grad_out, out, grad_u are (N, C, H, W) with any strides, in one
// feature dtype; (N, C) maps are contiguous in the accumulation dtype acc(z) = float64 for
// float64 z, float32 otherwise; pixel maps (N, k, H, W) are contiguous in acc; p runs over the
// P = H*W pixels. Everything is computed in acc and rounded once.
//
// Channel groups: without `mask` one group (G = 1, g = 0 for every channel: CBAM). With `mask`
// ((N, C) bool, HAM's important channels) two (G = 2): g(n,c) = 0 where mask[n,c], else 1.
// x1 is always computed as one fused multiply-add, x1 = fma(a, z, b) in acc (z converted to acc
// first), in every op and every backend: the backward finds the forward's per-pixel maxima again
// by testing x1 == dmax, so x1 must round identically in both.
//
//   spatial_tail_stats(z) -> (mean, m2, zmax, zmin, nmax, nmin)        all (N, C) in acc
//     mean[n,c] = sum_p z / P;  m2[n,c] = sum_p (z - mean)^2  (from deviations, as block_tail_stats)
//     zmax, zmin = max_p z, min_p z   (NaN if the plane holds a NaN, as torch.amax)
//     nmax, nmin = #{p : z == zmax}, #{p : z == zmin}   (ties of the extrema; counts in acc)
//     P = 0: mean NaN, m2 0, zmax -inf, zmin +inf, counts 0.
//   spatial_tail_pool(z, a, b, mask) -> d                               (N, 3G, H, W) in acc
//     per group g, over the channels c of g:
//     d[n,3g,p] = sum_c x1;  d[n,3g+1,p] = max_c x1 (-inf if g has no channel; NaN propagates);
//     d[n,3g+2,p] = #{c in g : x1 == d[n,3g+1,p]}   (ties of the maximum: its gradient splits
//                                                     among them, as torch.amax's does)
//   spatial_tail_apply(z, shortcut, a, b, s, mask) -> out               z's dtype and layout
//     out = relu(s[n,g(n,c),p] * x1 + shortcut);  s (N, G, H, W) in acc; relu(NaN) = NaN.
//   spatial_tail_backward_reduce(grad_out, out, z, a, b, s, mask) -> (grad_u, grad_s, s1, s2)
//     grad_u = out <= 0 ? 0 : grad_out     (relu's backward on its output, as torch's
//                                           threshold_backward); out's dtype, z's layout; it is
//                                           the shortcut's gradient
//     grad_s[n,g,p] = sum_{c in g} grad_u * x1                            (N, G, H, W) in acc
//     s1[n,c] = sum_p grad_u * s_g;  s2[n,c] = sum_p grad_u * s_g * z      (N, C) in acc
//   spatial_tail_pool_backward(z, a, b, mask, dmax, gsum, gmax) -> (t1, t2)
//     the pooling's gradient w.r.t. x1, r[n,c,p] = gsum[n,g,p] + (x1 == dmax[n,g,p] ? gmax[n,g,p] : 0)
//     (gsum: the gradient of the sums; gmax: of the maxima, already divided among the ties;
//     dmax: the forward's d[:, 3g+1]; all (N, G, H, W) in acc), summed per plane:
//     t1[n,c] = sum_p r;  t2[n,c] = sum_p r * z                            (N, C) in acc
//   spatial_tail_backward_apply(grad_u, z, a, b, mask, s, dmax, gsum, gmax, beta, gamma,
//                               zmax, kmax, zmin, kmin) -> grad_z          z's dtype and layout
//     grad_z = a * (grad_u * s_g + r) + beta * z + gamma
//              + (z == zmax ? kmax : 0) + (z == zmin ? kmin : 0)
//     with r as in pool_backward; beta, gamma, zmax, kmax, zmin, kmin (N, C) in acc: BatchNorm's
//     and the channel pooling's gradients (ops/spatial_tail.py), the extrema's routed to their ties.
//
// Reductions are combined in a fixed order (no atomics): results do not depend on threads.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnkernels, m) {
  m.def(
      "spatial_tail_stats(Tensor z) "
      "-> (Tensor mean, Tensor m2, Tensor zmax, Tensor zmin, Tensor nmax, Tensor nmin)");
  m.def("spatial_tail_pool(Tensor z, Tensor a, Tensor b, Tensor? mask) -> Tensor");
  m.def("spatial_tail_apply(Tensor z, Tensor shortcut, Tensor a, Tensor b, Tensor s, Tensor? mask) -> Tensor");
  m.def(
      "spatial_tail_backward_reduce(Tensor grad_out, Tensor out, Tensor z, Tensor a, Tensor b, Tensor s, "
      "Tensor? mask) -> (Tensor grad_u, Tensor grad_s, Tensor s1, Tensor s2)");
  m.def(
      "spatial_tail_pool_backward(Tensor z, Tensor a, Tensor b, Tensor? mask, Tensor dmax, Tensor gsum, "
      "Tensor gmax) -> (Tensor t1, Tensor t2)");
  m.def(
      "spatial_tail_backward_apply(Tensor grad_u, Tensor z, Tensor a, Tensor b, Tensor? mask, Tensor s, "
      "Tensor dmax, Tensor gsum, Tensor gmax, Tensor beta, Tensor gamma, Tensor zmax, Tensor kmax, "
      "Tensor zmin, Tensor kmin) -> Tensor");
}

// The passes are differentiated as a whole by ops/spatial_tail.py's autograd Functions, not one by
// one: a gradient through an op alone raises "not implemented" instead of silently returning none.
TORCH_LIBRARY_IMPL(attnkernels, Autograd, m) {
  for (const char* op : {"spatial_tail_stats", "spatial_tail_pool", "spatial_tail_apply",
                         "spatial_tail_backward_reduce", "spatial_tail_pool_backward",
                         "spatial_tail_backward_apply"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
