// attnkernels: every operator schema, in one place (extension-cpp pattern).
// Kernels live in cpu/<path>.cpp and cuda/<path>.cu and register with TORCH_LIBRARY_IMPL.
//
// channel_gate hot path (SPEC.md: ECA, SE's pooling, HAM's channel half). Shapes: x is
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
//     read of x[n] hits the cache; elsewhere the composite below calls the three ops.
//   channel_mlp_attention(x, w1, b1?, w2, b2?) -> (y, avg, gate)
//     SE's gate in place of the 1-D conv: avg = mean_hw x; h = relu(w1 @ avg + b1) (rd values);
//     gate = sigmoid(w2 @ h + b2); y = channel_rescale(x, gate). w1 holds rd*C values
//     (rd = w1.size(0), e.g. a Conv2d(C, rd, 1) weight), w2 C*rd; the MLP runs in acc(x).
//     Same per-sample CPU kernel as channel_attention; elsewhere a composite.
//
// ham_spatial hot path (SPEC.md HAM, its spatial half). x is (N, C, H, W) with any strides;
// gate = Ac and mask are (N, C) in acc(x); d1, d2 are (N, 2, H, W) and s1, s2 (N, 1, H, W),
// NCHW-contiguous in acc(x). c_im is C_im; C_sub = C - C_im; p runs over the H*W pixels.
//
//   ham_spatial_pool(x, gate, c_im) -> (d1, d2, mask)
//     mask[n,c] = 1 iff #{j : gate[n,j] > gate[n,c] or (gate[n,j] == gate[n,c] and j < c)} < c_im,
//                 else 0 (SPEC's rank count; no sort)
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
//
// nonlocal_attn hot path (SPEC.md PAM; CSM's spatial half): the HW x HW softmax matmul of
// position attention, flash-style. q, k are (N, D_qk, H, W); v and x are (N, D_v, H, W); all one
// floating dtype on one device, any strides: a kernel reads each tensor through its (n, d, p)
// strides, p = h*W + w, so NCHW (N, D, HW) and channels_last (N, HW, D) both need no copy (a
// tensor whose pixels do not flatten to one stride is made dense first). D_qk and D_v are
// independent (D_v up to 2048 and beyond: kernels tile it). gamma holds one value (any floating
// dtype, used in acc(x)). lse is (N, H*W) contiguous in acc(x); out and y have x's dtype and layout.
// i indexes queries and j keys, both over the H*W pixels.
//
//   nonlocal_attn(q, k, v, x, gamma) -> (y, out, lse)
//     S[n,i,j] = sum_d q[n,d,i] * k[n,d,j]        (acc(x); no 1/sqrt(D) scaling; never stored whole)
//     lse[n,i] = log sum_j exp(S[n,i,j])          (online: a running max and sum per row i)
//     out[n,c,i] = sum_j exp(S[n,i,j] - lse[n,i]) * v[n,c,j]
//     y = gamma * out + x                         (out is also returned: backward needs it)
//   nonlocal_attn_backward(grad_y, q, k, v, gamma, out, lse) -> (grad_q, grad_k, grad_v, grad_gamma)
//     P = exp(S - lse), recomputed block by block;  dO = gamma * grad_y
//     R[n,i] = sum_c grad_y[n,c,i] * out[n,c,i];   grad_gamma = sum_{n,i} R[n,i]  (gamma's shape, dtype)
//     dP[n,i,j] = sum_c dO[n,c,i] * v[n,c,j];      dS = P * (dP - gamma * R[n,i])
//     grad_v[n,c,j] = sum_i P[n,i,j] * dO[n,c,i]
//     grad_q[n,d,i] = sum_j dS[n,i,j] * k[n,d,j];  grad_k[n,d,j] = sum_i dS[n,i,j] * q[n,d,i]
//     each grad in its input's dtype and layout; grad_x = grad_y needs no op (autograd passes it).
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "attnkernels/common.h"


TORCH_LIBRARY(attnkernels, m) {
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

  m.def("nonlocal_attn(Tensor q, Tensor k, Tensor v, Tensor x, Tensor gamma) -> (Tensor y, Tensor out, Tensor lse)");
  m.def(
      "nonlocal_attn_backward(Tensor grad_y, Tensor q, Tensor k, Tensor v, Tensor gamma, Tensor out, Tensor lse) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_gamma)");
}

namespace {

// channel_attention on any device: the three ops through the dispatcher, one after another.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_attention_composite(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& alpha,
    const c10::optional<at::Tensor>& beta, int64_t mode) {
  static auto pool = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("attnkernels::channel_pool", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  static auto gate_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("attnkernels::channel_gate", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, int64_t)>();
  static auto rescale = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("attnkernels::channel_rescale", "")
                            .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  auto [avg, max] = pool.call(x);
  at::Tensor gate = gate_op.call(avg, max, weight, alpha, beta, mode);
  return {rescale.call(x, gate), avg, max, gate};
}

// channel_mlp_attention on any device: channel_pool, the MLP in ATen ops, channel_rescale.
std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_mlp_attention_composite(
    const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
    const c10::optional<at::Tensor>& b2) {
  static auto pool = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("attnkernels::channel_pool", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  static auto rescale = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("attnkernels::channel_rescale", "")
                            .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  attnkernels::check_mlp_args(x, w1, b1, w2, b2, "channel_mlp_attention");
  auto avg = std::get<0>(pool.call(x));
  const int64_t C = x.size(1), rd = w1.size(0);
  auto acc = [&](const c10::optional<at::Tensor>& t) {
    return t.has_value() ? c10::optional<at::Tensor>(t->reshape(-1).to(avg.scalar_type())) : c10::nullopt;
  };
  at::Tensor h = at::relu(at::linear(avg, w1.reshape({rd, C}).to(avg.scalar_type()), acc(b1)));
  at::Tensor gate = at::sigmoid(at::linear(h, w2.reshape({C, rd}).to(avg.scalar_type()), acc(b2)));
  return {rescale.call(x, gate), avg, gate};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkernels, CompositeExplicitAutograd, m) {
  m.impl("channel_attention", &channel_attention_composite);
  m.impl("channel_mlp_attention", &channel_mlp_attention_composite);
}

// The backward ops are not differentiable again: a double backward through them raises
// a clear "not implemented" instead of silently returning no gradient.
TORCH_LIBRARY_IMPL(attnkernels, Autograd, m) {
  for (const char* op : {"channel_pool_backward", "channel_gate_backward", "channel_rescale_backward",
                         "ham_spatial_pool_backward", "ham_spatial_apply_backward", "ham_spatial_conv_backward", "ham_attention",
                         "nonlocal_attn_backward"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
