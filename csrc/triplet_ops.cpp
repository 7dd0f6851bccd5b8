// The triplet hot path's operators: their schemas, and the math every backend implements.
// Kernels: cpu/triplet.cpp and cuda/triplet.cu, registered with TORCH_LIBRARY_IMPL, and the
// Triton backend's attnkernels/triton/triplet.py. The library itself is csrc/attnkernels.cpp.
// attnkernels/ops/_schemas.py reads the schemas below from this file for the Triton backend:
// each is one m.def of adjacent string literals only.
//
// triplet hot path (docs/contract.md Triplet): the three gates' poolings and the apply. x is
// (N, C, H, W) with any strides, in acc(x) inside every op. Each gate pools x over one axis
// into a two-plane map, max first, then mean (Triplet's order; CBAM's is the other way):
//   d_hw (N, 2, H, W): over c  d_hw[n,0,h,w] = max_c x,  d_hw[n,1,h,w] = sum_c x / C
//   d_cw (N, 2, C, W): over h  d_cw[n,0,c,w] = max_h x,  d_cw[n,1,c,w] = sum_h x / H
//   d_hc (N, 2, H, C): over w  d_hc[n,0,h,c] = max_w x,  d_hc[n,1,h,c] = sum_w x / W
// (the planes the reference's gates see: hw on x, cw on x.permute(0, 2, 1, 3) whose plane is
// (C, W), hc on x.permute(0, 3, 2, 1) whose plane is (H, C)). The conv, BN and sigmoid of each
// gate run in torch on these small maps and give s_hw (N, 1, H, W), s_cw (N, 1, C, W) and
// s_hc (N, 1, H, C). Every map is NCHW-contiguous in acc(x).
//
//   triplet_pool(x) -> (d_hw, d_cw, d_hc)
//     one read of x. The max propagates NaN as torch.amax (a NaN x makes the three maxima
//     that reduce over it NaN).
//   triplet_pool_backward(grad_d_hw, grad_d_cw, grad_d_hc, x, d_hw, d_cw, d_hc) -> grad_x
//     for each map m with reduced axis length L and the max M = d_m[.., 0, ..] over x's line:
//       cnt = #{x == M along the line}   (ties share the gradient evenly; NaN ties nothing)
//       grad_x += [x == M] * (grad_d_m[.., 0, ..] / cnt) + grad_d_m[.., 1, ..] / L
//     the indicator is a literal product: where M is NaN, cnt is 0 and 0 * (g / 0) is NaN for
//     every element of the line, as torch.amax's backward (docs/contract.md, NaN propagation).
//     Summed in the order hw, cw, hc; grad_x has x's dtype and layout.
//   triplet_apply(x, s_hw, s_cw, s_hc) -> y
//     y = (x * s_hw[n,0,h,w] + x * s_cw[n,0,c,w] + x * s_hc[n,0,h,c]) / 3
//     summed in that order in acc (the contract's (y_hw + y_cw + y_hc) / 3), x's dtype and layout
//   triplet_apply_backward(grad_y, x, s_hw, s_cw, s_hc) -> (grad_x, grad_s_hw, grad_s_cw, grad_s_hc)
//     g = grad_y / 3 (acc);  grad_x = g * s_hw + g * s_cw + g * s_hc   (x's dtype and layout)
//     grad_s_hw[n,0,h,w] = sum_c g * x;  grad_s_cw[n,0,c,w] = sum_h g * x;
//     grad_s_hc[n,0,h,c] = sum_w g * x   (acc, NCHW-contiguous)
//   grad_y is in x's dtype with x's shape (any strides); grad_d_* in acc(x), as d_*.
//
// No full-size tensor but x is saved for backward: the pool saves x and its three maps, the
// apply x and its three gates.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnkernels, m) {
  m.def("triplet_pool(Tensor x) -> (Tensor d_hw, Tensor d_cw, Tensor d_hc)");
  m.def(
      "triplet_pool_backward(Tensor grad_d_hw, Tensor grad_d_cw, Tensor grad_d_hc, Tensor x, "
      "Tensor d_hw, Tensor d_cw, Tensor d_hc) -> Tensor");
  m.def("triplet_apply(Tensor x, Tensor s_hw, Tensor s_cw, Tensor s_hc) -> Tensor");
  m.def(
      "triplet_apply_backward(Tensor grad_y, Tensor x, Tensor s_hw, Tensor s_cw, Tensor s_hc) "
      "-> (Tensor grad_x, Tensor grad_s_hw, Tensor grad_s_cw, Tensor grad_s_hc)");
}

// The backward ops are not differentiable again: a double backward through them raises
// a clear "not implemented" instead of silently returning no gradient.
TORCH_LIBRARY_IMPL(attnkernels, Autograd, m) {
  for (const char* op : {"triplet_pool_backward", "triplet_apply_backward"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
