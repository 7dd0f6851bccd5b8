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
//
// gam_channel hot path (SPEC.md GAM, its channel gate): GAM's per-pixel MLP gate from one read of x.
// x is (N, C, H, W) with any strides; p runs over the H*W pixels; w1 holds (rd, C) values, b1 rd,
// w2 (C, rd), b2 C (nn.Linear weights; any floating dtype, used in acc(x)).
//
//   gam_channel(x, w1, b1, w2, b2) -> x1
//     h[n,r,p] = relu(sum_c w1[r,c] * x[n,c,p] + b1[r]);  m[n,c,p] = sigmoid(sum_r w2[c,r] * h[n,r,p] + b2[c])
//     x1 = x * m   (acc(x), rounded to x's dtype, in x's layout). Nothing else is written.
//   gam_channel_backward(grad_x1, x, w1, b1, w2, b2) -> (grad_x, grad_w1, grad_b1, grad_w2, grad_b2)
//     recomputes h and m from x;  g = grad_x1 * x * m * (1 - m)          (the gradient of fc2's output)
//     dh[n,r,p] = [h > 0] * sum_c w2[c,r] * g[n,c,p]                      (the gradient of fc1's output)
//     grad_x = grad_x1 * m + sum_r w1[r,c] * dh[n,r,p]   (x's dtype and layout)
//     grad_w2[c,r] = sum_{n,p} g * h;  grad_b2[c] = sum_{n,p} g;  grad_w1[r,c] = sum_{n,p} dh * x;
//     grad_b1[r] = sum_{n,p} dh   (each weight's shape and dtype; deterministic sums)
//
// shuffle_conv hot path (SPEC.md GAM, its spatial gate): a grouped k x k conv (k odd, stride 1,
// padding (k-1)/2, zeros) that reads its input through the channel shuffle and an optional
// per-channel affine + ReLU (a folded BatchNorm) on load, with a bias and an optional GAM epilogue.
// s is (N, C_in, H, W) with any strides; weight (C_out, C_in/groups, k, k); bias C_out values;
// groups divides C_in and C_out; shuffle_groups (1: no shuffle) divides C_in; in_scale, in_shift
// C_in values each (both or neither), indexed by s's own channel; gate_x (N, C_out, H, W) any
// floating dtype and strides; out_scale, out_shift C_out values (gate_x, out_scale, out_shift all
// or none). Small parameters of any floating dtype are used in acc(s). o is an output channel,
// c an input channel of the conv, G = groups, Cg = C_in / G, Og = C_out / G, P = (k-1)/2.
//
//   shuffle_conv(s, weight, bias?, groups, shuffle_groups, in_scale?, in_shift?, gate_x?, out_scale?, out_shift?) -> out
//     pi(c) = (c % shuffle_groups) * (C_in / shuffle_groups) + c / shuffle_groups     (SPEC's channel_shuffle:
//             shuffled channel c is s's channel pi(c))
//     u[n,c,h,w] = relu(in_scale[pi(c)] * s[n,pi(c),h,w] + in_shift[pi(c)])   (s[n,pi(c),h,w] without the affine)
//                  inside the image; 0 outside it (the conv pads the prologue's output with zeros)
//     z[n,o,h,w] = bias[o] + sum_{c<Cg, i<k, j<k} weight[o,c,i,j] * u[n, (o/Og)*Cg + c, h+i-P, w+j-P]
//     no gate_x: out = z, (N, C_out, H, W) in acc(s) and s's layout (the raw output, e.g. for BN statistics)
//     gate_x:    out = gate_x * sigmoid(out_scale[o] * z + out_shift[o])   (GAM's y = x1 * sigmoid(bn2(conv2)),
//                in gate_x's dtype and layout; z is never written)
//   shuffle_conv_backward(grad_z, s, weight, groups, shuffle_groups, in_scale?, in_shift?)
//       -> (grad_s, grad_weight, grad_bias, grad_in_scale, grad_in_shift)
//     grad_z is the gradient of the raw output z (any floating dtype and strides);
//     grad_u[n,c,h,w] = sum_{o in c's group, i, j} weight[o,c-gCg,i,j] * grad_z[n,o,h-i+P,w-j+P]
//     t = in_scale[pi(c)] * s[n,pi(c)] + in_shift[pi(c)];  du = grad_u * [t > 0]   (du = grad_u without the affine)
//     grad_s[n,pi(c)] = du * in_scale[pi(c)]  (s's dtype and layout);  grad_in_scale[pi(c)] = sum_{n,h,w} du * s[n,pi(c)];
//     grad_in_shift[pi(c)] = sum_{n,h,w} du  (each in its parameter's dtype; shape (0,) in acc(s) without the affine)
//     grad_weight[o,c,i,j] = sum_{n,h,w} grad_z[n,o,h,w] * u[n,(o/Og)*Cg+c,h+i-P,w+j-P]  (weight's shape, dtype)
//     grad_bias[o] = sum_{n,h,w} grad_z[n,o,h,w]  (C_out values in weight's dtype); deterministic sums
//   shuffle_conv_epilogue(z, gate_x, out_scale, out_shift) -> y
//     y = gate_x * sigmoid(out_scale[c] * z + out_shift[c]): the epilogue alone, for a z already written
//     (training, after z's batch statistics); acc(z); y in gate_x's dtype and layout
//   shuffle_conv_epilogue_backward(grad_y, z, gate_x, out_scale, out_shift, mean?, rstd?)
//       -> (grad_z, grad_gate_x, grad_out_scale, grad_out_shift)
//     sg = sigmoid(out_scale * z + out_shift);  grad_gate_x = grad_y * sg  (gate_x's dtype and layout)
//     dpre = grad_y * gate_x * sg * (1 - sg);  grad_out_scale[c] = sum_{n,h,w} dpre * z;  grad_out_shift[c] = sum dpre
//     (each in its parameter's dtype). Without mean: grad_z = dpre * out_scale. With mean and rstd (C values, acc(z)), the
//     affine was folded from z's own batch statistics (out_scale = w * rstd, out_shift = b - mean * out_scale,
//     rstd = 1/sqrt(var + eps), M = N*H*W), and grad_z also carries their gradient (BatchNorm's training backward):
//     grad_z = out_scale * (dpre - sum dpre / M - (z - mean) * rstd^2 * sum(dpre * (z - mean)) / M)
//     grad_z in z's dtype and layout.
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

  m.def("gam_channel(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor");
  m.def(
      "gam_channel_backward(Tensor grad_x1, Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) "
      "-> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2)");

  m.def(
      "shuffle_conv(Tensor s, Tensor weight, Tensor? bias, int groups, int shuffle_groups, Tensor? in_scale, "
      "Tensor? in_shift, Tensor? gate_x, Tensor? out_scale, Tensor? out_shift) -> Tensor");
  m.def(
      "shuffle_conv_backward(Tensor grad_z, Tensor s, Tensor weight, int groups, int shuffle_groups, "
      "Tensor? in_scale, Tensor? in_shift) "
      "-> (Tensor grad_s, Tensor grad_weight, Tensor grad_bias, Tensor grad_in_scale, Tensor grad_in_shift)");
  m.def("shuffle_conv_epilogue(Tensor z, Tensor gate_x, Tensor out_scale, Tensor out_shift) -> Tensor");
  m.def(
      "shuffle_conv_epilogue_backward(Tensor grad_y, Tensor z, Tensor gate_x, Tensor out_scale, Tensor out_shift, "
      "Tensor? mean, Tensor? rstd) -> (Tensor grad_z, Tensor grad_gate_x, Tensor grad_out_scale, Tensor grad_out_shift)");
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
                         "nonlocal_attn_backward", "gam_channel_backward", "shuffle_conv_backward",
                         "shuffle_conv_epilogue_backward"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
