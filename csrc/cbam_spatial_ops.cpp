// The cbam_spatial hot path's operators: their schemas, and the math every backend implements.
// Kernels: CPU: cpu/cbam_spatial.cpp; CUDA: cuda/cbam_spatial.cu; each registers with
// TORCH_LIBRARY_IMPL; the library itself is csrc/attnkernels.cpp. attnkernels/ops/_schemas.py reads the schemas below
// from this file for the Triton backend: each is one m.def of adjacent string literals only.
//
// cbam_spatial hot path (docs/contract.md CBAM, its spatial half): HAM's dual spatial pooling
// with a single group and no mask. x is (N, C, H, W) with any strides; gate = a, CBAM's channel
// gate, is (N, C) in acc(x); d is (N, 2, H, W) and s (N, 1, H, W), NCHW-contiguous in acc(x);
// p runs over the H*W pixels. F = x * gate, in acc(x) (the forward's product, recomputed bit for
// bit by every backward).
//
//   cbam_spatial_pool(x, gate) -> d
//     d[n,0,p] = sum_c F / C;  d[n,1,p] = max_c F        (mean first, then max: cat[mean_c, max_c])
//     the max propagates NaN as torch.amax: a NaN F at pixel p makes d[n,1,p] NaN
//   cbam_spatial_pool_backward(grad_d, x, gate, d) -> (grad_x, grad_gate)
//     cnt[n,p] = #{c : F[n,c,p] == d[n,1,p]}   (ties over all C share the gradient evenly)
//     dF = grad_d[n,0,p] / C + [F == d[n,1,p]] * (grad_d[n,1,p] / cnt)
//       the indicator is a literal product, not a select: where d[n,1,p] is NaN, cnt is 0 (NaN
//       ties nothing), grad_d[n,1,p] / 0 is inf or NaN, and 0 * that is NaN, so dF is NaN for
//       every channel of that pixel, as torch.amax's backward (docs/contract.md, NaN propagation)
//     grad_x = dF * gate (x's dtype and layout);  grad_gate[n,c] = sum_p dF * x (acc)
//   cbam_spatial_apply(x, gate, s) -> y
//     y = F * s, in acc, in x's dtype and layout
//   cbam_spatial_apply_backward(grad_y, x, gate, s) -> (grad_x, grad_gate, grad_s)
//     dF = grad_y * s;  grad_x = dF * gate (x's dtype and layout);  grad_gate[n,c] = sum_p dF * x
//     grad_s[n,0,p] = sum_c grad_y * F   (acc, NCHW-contiguous)
//   grad_y is in x's dtype with x's shape (any strides); grad_d in acc(x), as d.
//
// Kernels: the one-group case of ham_spatial's (csrc/ham_spatial_ops.cpp): G1 = F1 with
// mask = 1 and c_im = C, no second group. They share ham_spatial's templates with a
// compile-time one-group flag that drops the mask and G2 instead of multiplying by 1 and 0:
// on the CPU, include/attnkernels/cpu_spatial_pool.h's Views, for_pixel_blocks, pool_block,
// pool_backward_block (pool_dF, pool_dF1's one-group case) and apply_block with
// kOneGroup = true; on CUDA, include/attnkernels/cuda_spatial_pool.cuh's HamPool, HamPoolTies, HamPoolBackward,
// HamApply and HamApplyBackward (cuda::OpBase, kOneGroup = true); in Triton, triton/ham_spatial.py's
// _pool_kernel, _pool_backward_kernel, _apply_kernel and _apply_backward_kernel (a
// tl.constexpr flag) with their measured pixel tiles.
// cbam_spatial_pool(x, gate) equals ham_spatial_pool(x, gate, C)'s d1 bit for bit. The apply
// ops do not equal ham_spatial_apply(x, gate, 1, s, s): that adds G2 * s2 = F * 0 * s, which
// is NaN where F is not finite; here y = F * s alone.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnkernels, m) {
  m.def("cbam_spatial_pool(Tensor x, Tensor gate) -> Tensor");
  m.def(
      "cbam_spatial_pool_backward(Tensor grad_d, Tensor x, Tensor gate, Tensor d) "
      "-> (Tensor grad_x, Tensor grad_gate)");
  m.def("cbam_spatial_apply(Tensor x, Tensor gate, Tensor s) -> Tensor");
  m.def(
      "cbam_spatial_apply_backward(Tensor grad_y, Tensor x, Tensor gate, Tensor s) "
      "-> (Tensor grad_x, Tensor grad_gate, Tensor grad_s)");
}

// The backward ops are not differentiable again: a double backward through them raises
// a clear "not implemented" instead of silently returning no gradient.
TORCH_LIBRARY_IMPL(attnkernels, Autograd, m) {
  for (const char* op : {"cbam_spatial_pool_backward", "cbam_spatial_apply_backward"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
