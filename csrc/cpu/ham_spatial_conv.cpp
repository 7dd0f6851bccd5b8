// CPU kernels of HAM's shared spatial conv (ham_spatial hot path); math in csrc/ham_spatial_ops.cpp.
//
// A k x k conv from Cd = 2 small maps to one: about 100 multiply-adds per output pixel, far too
// little work for oneDNN's setup (its forward + backward took ~4 ms at N=32, 28x28, against
// far less here). Each sample's maps are copied once into a zero-padded buffer, so every tap is
// a plain vector load; one task per sample; grad_weight is summed from per-sample partials in
// order, so results are deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "attnkernels/ham_spatial.h"
#include "attnkernels/cpu_sample.h"
#include "attnkernels/cpu_vec.h"

namespace attnkernels {
namespace {

using at::vec::Vectorized;

// The maps of one sample, zero-padded by P on every side, each row Wp = round_up(W, kBlocks*V)
// + 2P wide so that a full vector load at any tap of any column block stays inside the buffer.
// sum_c a[c] * b[c] over W columns.
template <typename T>
T dot(const T* a, const T* b, int64_t W) {
  using V = Vectorized<T>;
  V acc(0);
  int64_t c = 0;
  for (; c + V::size() <= W; c += V::size()) acc = at::vec::fmadd(V::loadu(a + c), V::loadu(b + c), acc);
  T sum = reduce_sum(acc);
  for (; c < W; ++c) sum += a[c] * b[c];
  return sum;
}

constexpr int64_t kBlocks = 4;  // output vectors per correlation step (see correlate)

template <typename T>
struct Padded {
  static constexpr int64_t kStep = kBlocks * Vectorized<T>::size();
  int64_t channels, H, W, P, Hp, Wp;
  std::vector<T> data;
  Padded(const T* src, int64_t channels, int64_t H, int64_t W, int64_t P)
      : channels(channels), H(H), W(W), P(P), Hp(H + 2 * P),
        Wp((W + kStep - 1) / kStep * kStep + 2 * P),
        data(channels * Hp * Wp, T(0)) {
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t r = 0; r < H; ++r) std::copy_n(src + (c * H + r) * W, W, row(c, r + P) + P);
    }
  }
  const T* row(int64_t c, int64_t r) const { return data.data() + (c * Hp + r) * Wp; }
  T* row(int64_t c, int64_t r) { return data.data() + (c * Hp + r) * Wp; }
};

// out[co, h, c] = sum_{ci, i, j} taps[co, ci, i, j] * in.row(ci, h + i)[c + j]: a "same" k x k
// correlation. Each output vector sums all its taps in a register, kBlocks vectors of a row at
// a time (independent FMA chains: one chain would wait on the FMA latency at every tap). A
// row's last, partial vector is computed whole and stored in part (its extra lanes read
// padding and are dropped).

template <typename T>
void correlate(const Padded<T>& in, const T* taps, int64_t cout, int64_t k, T* out) {
  using V = Vectorized<T>;
  const int64_t H = in.H, W = in.W, step = kBlocks * V::size();
  for (int64_t co = 0; co < cout; ++co) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t c0 = 0; c0 < W; c0 += step) {
        V acc[kBlocks] = {V(0), V(0), V(0), V(0)};
        for (int64_t ci = 0; ci < in.channels; ++ci) {
          for (int64_t i = 0; i < k; ++i) {
            const T* src = in.row(ci, h + i) + c0;
            const T* t = taps + ((co * in.channels + ci) * k + i) * k;
            for (int64_t j = 0; j < k; ++j) {
              const V w(t[j]);
              for (int64_t b = 0; b < kBlocks; ++b) acc[b] = at::vec::fmadd(w, V::loadu(src + j + b * V::size()), acc[b]);
            }
          }
        }
        for (int64_t b = 0; b < kBlocks && c0 + b * V::size() < W; ++b) {
          const int64_t c = c0 + b * V::size();
          acc[b].store(out + (co * H + h) * W + c, static_cast<int>(std::min<int64_t>(V::size(), W - c)));
        }
      }
    }
  }
}

void check_conv_args(const at::Tensor& d, const at::Tensor& weight, const char* op) {
  AK_CHECK_VALUE(d.dim() == 4, op, ": d must be 4-D (N, Cd, H, W), got ", d.dim(), "-D");
  AK_CHECK_TYPE(d.scalar_type() == at::kFloat || d.scalar_type() == at::kDouble, op,
                   ": d must be float32 or float64 (an accumulation dtype), got ", d.scalar_type());
  AK_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == 1 && weight.size(1) == d.size(1) &&
                        weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
                    op, ": weight must have shape (1, Cd, k, k) with Cd = ", d.size(1), " and k odd, got ",
                    weight.sizes());
  check_floating(weight, op, "weight");
  check_device(weight, d.device(), op, "weight");
}

at::Tensor ham_spatial_conv_cpu(const at::Tensor& d_in, const at::Tensor& weight) {
  const char* op = "ham_spatial_conv";
  check_conv_args(d_in, weight, op);
  const at::Tensor d = d_in.contiguous(), w = weight.to(d.scalar_type()).contiguous();
  const int64_t N = d.size(0), Cd = d.size(1), H = d.size(2), W = d.size(3), k = w.size(2), P = (k - 1) / 2;
  at::Tensor z = at::zeros({N, 1, H, W}, d.options());
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "ham_spatial_conv_cpu", [&] {
    const scalar_t *dp = d.const_data_ptr<scalar_t>(), *wp = w.const_data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const Padded<scalar_t> pad(dp + n * Cd * H * W, Cd, H, W, P);
        correlate(pad, wp, 1, k, zp + n * H * W);
      }
    });
  });
  return z;
}

std::tuple<at::Tensor, at::Tensor> ham_spatial_conv_backward_cpu(const at::Tensor& grad_z_in, const at::Tensor& d_in,
                                                                 const at::Tensor& weight) {
  const char* op = "ham_spatial_conv_backward";
  check_conv_args(d_in, weight, op);
  const at::Tensor d = d_in.contiguous(), w = weight.to(d.scalar_type()).contiguous();
  const int64_t N = d.size(0), Cd = d.size(1), H = d.size(2), W = d.size(3), k = w.size(2), P = (k - 1) / 2;
  check_floating(grad_z_in, op, "grad_z");
  AK_CHECK_VALUE(grad_z_in.sizes() == at::IntArrayRef({N, 1, H, W}) && grad_z_in.scalar_type() == d.scalar_type(),
                    op, ": grad_z must have shape (N, 1, H, W) = (", N, ", 1, ", H, ", ", W, ") and dtype ",
                    d.scalar_type(), ", got ", grad_z_in.sizes(), " ", grad_z_in.scalar_type());
  check_device(grad_z_in, d.device(), op, "grad_z");
  const at::Tensor gz = grad_z_in.contiguous();
  at::Tensor grad_d = at::zeros_like(d);
  at::Tensor partial = at::zeros({N, Cd * k * k}, d.options());
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "ham_spatial_conv_backward_cpu", [&] {
    const scalar_t *dp = d.const_data_ptr<scalar_t>(), *wp = w.const_data_ptr<scalar_t>();
    const scalar_t* gzp = gz.const_data_ptr<scalar_t>();
    scalar_t *gdp = grad_d.data_ptr<scalar_t>(), *pp = partial.data_ptr<scalar_t>();
    // grad_d is the correlation of grad_z with the flipped taps, one output map per input map.
    std::vector<scalar_t> flipped(Cd * k * k);
    for (int64_t ci = 0; ci < Cd; ++ci) {
      for (int64_t t = 0; t < k * k; ++t) flipped[ci * k * k + t] = wp[ci * k * k + (k * k - 1 - t)];
    }
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* gzn = gzp + n * H * W;
        correlate(Padded<scalar_t>(gzn, 1, H, W, P), flipped.data(), Cd, k, gdp + n * Cd * H * W);
        // grad_weight[ci, i, j] = sum_{h, c} grad_z[h, c] * d_padded[ci, h + i, c + j].
        const Padded<scalar_t> pad(dp + n * Cd * H * W, Cd, H, W, P);
        for (int64_t ci = 0; ci < Cd; ++ci) {
          for (int64_t i = 0; i < k; ++i) {
            for (int64_t j = 0; j < k; ++j) {
              scalar_t gw = 0;
              for (int64_t h = 0; h < H; ++h) gw += dot(gzn + h * W, pad.row(ci, h + i) + j, W);
              pp[n * Cd * k * k + (ci * k + i) * k + j] = gw;
            }
          }
        }
      }
    });
  });
  at::Tensor grad_w = partial.sum(0).to(weight.scalar_type()).view(weight.sizes());
  return {grad_d, grad_w};
}

}  // namespace

namespace cpu_sample {

template <typename T>
void spatial_conv(const T* d, int64_t Cd, int64_t H, int64_t W, const T* w, int64_t k, T* z) {
  correlate(Padded<T>(d, Cd, H, W, (k - 1) / 2), w, 1, k, z);
}

template void spatial_conv<double>(const double*, int64_t, int64_t, int64_t, const double*, int64_t, double*);
template void spatial_conv<float>(const float*, int64_t, int64_t, int64_t, const float*, int64_t, float*);

}  // namespace cpu_sample

TORCH_LIBRARY_IMPL(attnkernels, CPU, m) {
  m.impl("ham_spatial_conv", &ham_spatial_conv_cpu);
  m.impl("ham_spatial_conv_backward", &ham_spatial_conv_backward_cpu);
}

}  // namespace attnkernels
