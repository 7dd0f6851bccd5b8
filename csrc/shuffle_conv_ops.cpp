// The shuffle_conv hot path's operators: their schemas, and the math every backend implements.
// Kernels: cpu/shuffle_conv.cpp and cuda/shuffle_conv.cu register with TORCH_LIBRARY_IMPL;
// the library itself is csrc/attnkernels.cpp.
// attnkernels/ops/_schemas.py reads the schemas below from this file for the Triton backend: each
// is one m.def of adjacent string literals only.
//
// shuffle_conv hot path (docs/contract.md GAM, its spatial gate): a grouped k x k conv (k odd, stride 1,
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
//     pi(c) = (c % shuffle_groups) * (C_in / shuffle_groups) + c / shuffle_groups
//             (docs/contract.md's channel_shuffle: shuffled channel c is s's channel pi(c))
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
//     t = in_scale[pi(c)] * s[n,pi(c)] + in_shift[pi(c)];  du = relu_grad(grad_u, t)   (du = grad_u without the affine)
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
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnkernels, m) {
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

// The backward ops are not differentiable again: a double backward through them raises
// a clear "not implemented" instead of silently returning no gradient.
TORCH_LIBRARY_IMPL(attnkernels, Autograd, m) {
  for (const char* op : {"shuffle_conv_backward", "shuffle_conv_epilogue_backward"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
