// The ham_spatial hot path's operators: their schemas, and the math every backend implements.
// Kernels: cpu/ham_spatial.cpp, cpu/ham_spatial_conv.cpp and
// cuda/ham_spatial.cu register with TORCH_LIBRARY_IMPL; the library itself is csrc/attnkernels.cpp.
// attnkernels/ops/_schemas.py reads the schemas below from this file for the Triton backend: each
// is one m.def of adjacent string literals only.
//
// ham_spatial hot path (docs/contract.md HAM, its spatial half). x is (N, C, H, W) with any strides;
// gate = Ac and mask are (N, C) in acc(x); d1, d2 are (N, 2, H, W) and s1, s2 (N, 1, H, W),
// NCHW-contiguous in acc(x). c_im is C_im; C_sub = C - C_im; p runs over the H*W pixels.
//
//   ham_spatial_pool(x, gate, c_im) -> (d1, d2, mask)
//     mask[n,c] = 1 iff #{j : gate[n,j] > gate[n,c] or (gate[n,j] == gate[n,c] and j < c)} < c_im,
//                 else 0 (docs/contract.md's rank count; no sort)
//     F1 = x * gate;  G1 = F1 * mask;  G2 = F1 * (1 - mask)   (literal products: 0 * NaN is NaN)
//     d1[n,0,p] = sum_c G1 / c_im;          d1[n,1,p] = max_c G1   (over all C: zeroed channels count)
//     d2[n,0,p] = sum_c G2 / max(C_sub, 1); d2[n,1,p] = max_c G2
//   ham_spatial_pool_backward(grad_d1, grad_d2, x, gate, mask, d1, d2, c_im) -> (grad_x, grad_gate)
//     cnt_g[n,p] = #{c : G_g[n,c,p] == d_g[n,1,p]}  (ties over all C share the gradient evenly)
//     dG_g = grad_d_g[n,0,p] / divisor_g + [G_g == d_g[n,1,p]] * grad_d_g[n,1,p] / cnt_g
//     dF1 = dG1 * mask + dG2 * (1 - mask)   (no gradient through mask)
//     grad_x = dF1 * gate (x's dtype and layout);  grad_gate[n,c] = sum_p dF1 * x (acc)
//   ham_spatial_apply(x, gate, mask, s1, s2) -> y
//     y = G1 * s1 + G2 * s2 = F1 * mask * s1 + F1 * (1 - mask) * s2, in acc, in x's dtype and layout
//   ham_spatial_apply_backward(grad_y, x, gate, mask, s1, s2) -> (grad_x, grad_gate, grad_s1, grad_s2)
//     dF1 = grad_y * (mask * s1 + (1 - mask) * s2);  grad_x = dF1 * gate;  grad_gate[n,c] = sum_p dF1 * x
//     grad_s1[n,0,p] = sum_c grad_y * F1 * mask;  grad_s2[n,0,p] = sum_c grad_y * F1 * (1 - mask)
//   ham_attention(x, weight, alpha, beta, c_im, spatial_weight, bn_scale, bn_shift) -> y   (CPU only)
//     the whole HAM forward in inference (BN in eval mode folded to bn_scale * z + bn_shift),
//     one sample at a time while x[n] stays in cache: channel_pool, channel_gate (mode 2),
//     ham_spatial_pool, S_g = sigmoid(relu(bn_scale * ham_spatial_conv(d_g, spatial_weight)
//     + bn_shift)), ham_spatial_apply. Not differentiable (training runs the ops above).
//   ham_spatial_conv(d, weight) -> z            (CPU only; cuDNN serves GPUs)
//     HAM's shared spatial conv on the small maps: z[n,0,h,w] = sum_{ci,i,j} weight[0,ci,i,j] *
//     d[n, ci, h + i - P, w + j - P], P = (k-1)/2, zero padding; d (N, Cd, H, W) float32/64
//     NCHW-contiguous, weight (1, Cd, k, k) with k odd, used in d's dtype; z (N, 1, H, W) in d's dtype.
//   ham_spatial_conv_backward(grad_z, d, weight) -> (grad_d, grad_weight)
//     grad_d[n,ci,r,c] = sum_{i,j} weight[0,ci,i,j] * grad_z[n,0,r-i+P,c-j+P];
//     grad_weight[0,ci,i,j] = sum_{n,h,w} grad_z[n,0,h,w] * d[n,ci,h+i-P,w+j-P] (weight's dtype)
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnkernels, m) {
  m.def("ham_spatial_pool(Tensor x, Tensor gate, int c_im) -> (Tensor d1, Tensor d2, Tensor mask)");
  m.def(
      "ham_spatial_pool_backward(Tensor grad_d1, Tensor grad_d2, Tensor x, Tensor gate, Tensor mask, "
      "Tensor d1, Tensor d2, int c_im) -> (Tensor grad_x, Tensor grad_gate)");
  m.def("ham_spatial_apply(Tensor x, Tensor gate, Tensor mask, Tensor s1, Tensor s2) -> Tensor");
  m.def(
      "ham_spatial_apply_backward(Tensor grad_y, Tensor x, Tensor gate, Tensor mask, Tensor s1, Tensor s2) "
      "-> (Tensor grad_x, Tensor grad_gate, Tensor grad_s1, Tensor grad_s2)");
  m.def("ham_spatial_conv(Tensor d, Tensor weight) -> Tensor");
  m.def(
      "ham_attention(Tensor x, Tensor weight, Tensor alpha, Tensor beta, int c_im, Tensor spatial_weight, "
      "Tensor bn_scale, Tensor bn_shift) -> Tensor");
  m.def("ham_spatial_conv_backward(Tensor grad_z, Tensor d, Tensor weight) -> (Tensor grad_d, Tensor grad_weight)");
}

// The backward ops are not differentiable again: a double backward through them raises
// a clear "not implemented" instead of silently returning no gradient.
// ham_attention is inference only (not differentiable either).
TORCH_LIBRARY_IMPL(attnkernels, Autograd, m) {
  for (const char* op : {"ham_spatial_pool_backward", "ham_spatial_apply_backward", "ham_spatial_conv_backward",
                         "ham_attention"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
