// CPU kernels of the softmax_spatial hot path (SoftmaxSpatial); math in csrc/softmax_spatial_ops.cpp.
//
// One task per sample, so x[n] (C x P; 800 KB for C = 256 at 28 x 28 in fp32) is still in cache
// when it is read the second time. Forward: the logits L = W x[n] are one BLAS product written
// straight into a[n] (g x P, acc), read through x's own strides (NCHW: pixel stride 1,
// channels_last: channel stride 1; half inputs are widened into an acc buffer first); the
// softmax runs in place on a's rows; then one vector pass writes y = (x * a) * s in x's layout.
//
// Backward, per sample: dA (g x P) from grad_y * x summed over each group's channels, dL =
// a * (s dA - sum_p a s dA) in place, grad_x = grad_y * a * s + W^T dL (one BLAS product into an
// acc buffer, then a vector pass). grad_W and grad_b accumulate per slot, a fixed range of
// samples (kSlots of them, whatever the thread count), and the slots are summed in order:
// bitwise the same result on every run and every thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "attnkernels/cpu_vec.h"
#include "attnkernels/softmax_spatial.h"

namespace attnkernels {
namespace {

using at::vec::Vectorized;

// Weight-gradient partial slots: samples are split into at most this many fixed ranges.
constexpr int64_t kSlots = 64;

// Sample n of dense x as a (C, P) matrix: a view through x's strides (pixel stride 1 for NCHW,
// channel stride 1 for channels_last).
at::Tensor sample_matrix(const at::Tensor& x, int64_t n) {
  return x[n].reshape({x.size(1), x.size(2) * x.size(3)});
}

// A (rows x cols) acc buffer laid out like a sample of x: (rows, cols) rows for NCHW, (cols, rows)
// rows for channels_last, so elementwise passes walk it in x's memory order.
at::Tensor walk_buffer(at::Tensor& buf, int64_t rows, int64_t cols, bool channels_last) {
  return channels_last ? buf.narrow(0, 0, rows * cols).view({cols, rows}).t()
                       : buf.narrow(0, 0, rows * cols).view({rows, cols});
}

// The (C, P) matrix in acc: the view itself when x is acc already, else a widened copy into buf.
at::Tensor matrix_in_acc(const at::Tensor& view, at::Tensor& buf, bool channels_last) {
  if (!buf.defined()) return view;
  at::Tensor m = walk_buffer(buf, view.size(0), view.size(1), channels_last);
  m.copy_(view);
  return m;
}

// One softmax row in place: v = softmax(v + b) over its P entries, with torch's NaN rules (a NaN,
// +inf, or an all -inf row makes the whole row NaN). Fixed-order sums.
template <typename acc_t>
void softmax_row(acc_t* v, acc_t b, int64_t P) {
  using V = Vectorized<acc_t>;
  const int64_t vec_end = P - P % V::size();
  V vmax(-std::numeric_limits<acc_t>::infinity());
  for (int64_t i = 0; i < vec_end; i += V::size()) {
    const V t = V::loadu(v + i) + V(b);
    t.store(v + i);
    vmax = at::vec::maximum(vmax, t);  // propagates NaN
  }
  acc_t m = reduce_max(vmax);
  for (int64_t i = vec_end; i < P; ++i) {
    v[i] += b;
    m = nan_max(m, v[i]);
  }
  V vsum(0);
  for (int64_t i = 0; i < vec_end; i += V::size()) {
    const V e = softmax_exp(V::loadu(v + i) - V(m));
    e.store(v + i);
    vsum = vsum + e;
  }
  acc_t sum = reduce_sum(vsum);
  for (int64_t i = vec_end; i < P; ++i) {
    v[i] = std::exp(v[i] - m);
    sum += v[i];
  }
  for (int64_t i = 0; i < vec_end; i += V::size()) (V::loadu(v + i) / V(sum)).store(v + i);
  for (int64_t i = vec_end; i < P; ++i) v[i] /= sum;
}

// y[i] = (x[i] * f) * s, f = f[i] (per_element) or f[0]: one row of the apply; y streamed
// past the caches when `stream` (cpu_vec.h).
template <typename scalar_t, typename acc_t>
void reweight_row(const scalar_t* x, const acc_t* f, bool per_element, acc_t s, scalar_t* y, int64_t len,
                  bool stream) {
  using V = Vectorized<acc_t>;
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; i + V::size() <= len; i += V::size()) {
      const V fv = per_element ? V::loadu(f + i) : V(*f);
      const V out = V::loadu(x + i) * fv * V(s);
      stream ? store_stream(y + i, out) : out.store(y + i);
    }
  }
  for (; i < len; ++i) y[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * f[per_element ? i : 0] * s);
}

// sum_i go[i] * x[i], in a fixed order.
template <typename scalar_t, typename acc_t>
acc_t dot_row(const scalar_t* go, const scalar_t* x, int64_t len) {
  using V = Vectorized<acc_t>;
  int64_t i = 0;
  acc_t sum = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    V vs(0);
    for (; i + V::size() <= len; i += V::size()) vs = at::vec::fmadd(V::loadu(go + i), V::loadu(x + i), vs);
    sum = reduce_sum(vs);
  }
  for (; i < len; ++i) sum += static_cast<acc_t>(go[i]) * static_cast<acc_t>(x[i]);
  return sum;
}

// d[i] += go[i] * x[i].
template <typename scalar_t, typename acc_t>
void add_products(const scalar_t* go, const scalar_t* x, acc_t* d, int64_t len) {
  using V = Vectorized<acc_t>;
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; i + V::size() <= len; i += V::size()) {
      at::vec::fmadd(V::loadu(go + i), V::loadu(x + i), V::loadu(d + i)).store(d + i);
    }
  }
  for (; i < len; ++i) d[i] += static_cast<acc_t>(go[i]) * static_cast<acc_t>(x[i]);
}

// gx[i] = go[i] * f * s + r[i], f = f[i] (per_element) or f[0]: one row of grad_x; gx streamed
// when `stream`.
template <typename scalar_t, typename acc_t>
void grad_x_row(const scalar_t* go, const acc_t* f, bool per_element, acc_t s, const acc_t* r, scalar_t* gx,
                int64_t len, bool stream) {
  using V = Vectorized<acc_t>;
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; i + V::size() <= len; i += V::size()) {
      const V fv = per_element ? V::loadu(f + i) : V(*f);
      const V out = V::loadu(go + i) * fv * V(s) + V::loadu(r + i);
      stream ? store_stream(gx + i, out) : out.store(gx + i);
    }
  }
  for (; i < len; ++i) {
    gx[i] = static_cast<scalar_t>(static_cast<acc_t>(go[i]) * f[per_element ? i : 0] * s + r[i]);
  }
}

// Calls row(offset, f, per_element, len) for each memory row of one sample, where f is the
// weight map's value(s) for that row: NCHW rows are channels (f = a's row of the channel's
// group, one value per pixel); channels_last rows are pixels, cut at group boundaries (f = the
// pixel's value of the group, from aT, a's (P, g) transpose), whole rows when G == 1.
template <typename acc_t, typename F>
void for_each_row(int64_t C, int64_t P, int64_t G, bool channels_last, const acc_t* a, const acc_t* aT, F row) {
  const int64_t g = C / G;
  if (!channels_last) {
    for (int64_t c = 0; c < C; ++c) row(c * P, a + (c / G) * P, true, P);
  } else if (G == 1) {
    for (int64_t p = 0; p < P; ++p) row(p * C, aT + p * g, true, C);
  } else {
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t j = 0; j < g; ++j) row(p * C + j * G, aT + p * g + j, false, G);
    }
  }
}

// a[n] (g, P) transposed into buf as (P, g), for the channels_last walk; nullptr for NCHW.
template <typename acc_t>
const acc_t* transposed(const at::Tensor& an, at::Tensor& buf, bool channels_last) {
  if (!channels_last) return nullptr;
  buf.view({an.size(1), an.size(0)}).copy_(an.t());
  return buf.data_ptr<acc_t>();
}

std::tuple<at::Tensor, at::Tensor> softmax_spatial_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                       const at::Tensor& bias, bool rescale) {
  check_softmax_spatial_args(x, weight, bias, "softmax_spatial");
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::Tensor x_dense = dense(x);
  const bool channels_last = layout_of(x_dense) == Layout::ChannelsLast;
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3), g = weight.size(0), G = C / g;
  at::Tensor y = empty_like_layout(x_dense);
  at::Tensor a = at::empty({N, g, x.size(2), x.size(3)}, x.options().dtype(acc));
  if (N * P == 0) return {y, a};
  const at::Tensor W = weight.to(acc).contiguous(), b = bias.reshape({-1}).to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_spatial_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = rescale ? static_cast<acc_t>(P) : acc_t(1);
    const bool stream = should_stream(2 * x_dense.nbytes());
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      BelowAutograd below;
      const auto opts = x.options().dtype(acc);
      at::Tensor x_buf = std::is_same_v<scalar_t, acc_t> ? at::Tensor() : at::empty({C * P}, opts);
      at::Tensor t_buf = at::empty({channels_last ? P * g : 0}, opts);
      for (int64_t n = begin; n < end; ++n) {
        at::Tensor an = a[n].view({g, P});
        at::mm_out(an, W, matrix_in_acc(sample_matrix(x_dense, n), x_buf, channels_last));
        acc_t* ap = an.data_ptr<acc_t>();
        for (int64_t j = 0; j < g; ++j) softmax_row(ap + j * P, b.data_ptr<acc_t>()[j], P);
        const acc_t* aT = transposed<acc_t>(an, t_buf, channels_last);
        const scalar_t* xs = x_dense.data_ptr<scalar_t>() + n * C * P;
        scalar_t* ys = y.data_ptr<scalar_t>() + n * C * P;
        for_each_row(C, P, G, channels_last, ap, aT, [&](int64_t off, const acc_t* f, bool per_element, int64_t len) {
          reweight_row(xs + off, f, per_element, s, ys + off, len, stream);
        });
      }
      if (stream) stream_fence();
    });
  });
  return {y, a};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_spatial_backward_cpu(const at::Tensor& grad_y,
                                                                             const at::Tensor& x,
                                                                             const at::Tensor& weight,
                                                                             const at::Tensor& a_in, bool rescale) {
  const char* op = "softmax_spatial_backward";
  check_softmax_spatial_backward_args(grad_y, x, weight, a_in, op);
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::Tensor x_dense = dense(x);
  const bool channels_last = layout_of(x_dense) == Layout::ChannelsLast;
  // grad_y in x's layout, so one offset walks x, grad_y and grad_x alike.
  const at::Tensor GO = grad_y.contiguous(memory_format_of(layout_of(x_dense)));
  const at::Tensor A = a_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3), g = weight.size(0), G = C / g;
  at::Tensor grad_x = empty_like_layout(x_dense);
  const int64_t slots = std::max<int64_t>(1, std::min(kSlots, N));
  at::Tensor gw = at::zeros({slots, g, C}, x.options().dtype(acc)), gb = at::zeros({slots, g}, gw.options());
  const at::Tensor W = weight.to(acc).contiguous();
  if (N * P > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_spatial_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t s = rescale ? static_cast<acc_t>(P) : acc_t(1);
      const bool stream = should_stream(3 * x_dense.nbytes());  // reads x and grad_y, writes grad_x
      at::parallel_for(0, slots, 1, [&](int64_t begin, int64_t end) {
        BelowAutograd below;
        const auto opts = gw.options();
        at::Tensor x_buf = std::is_same_v<scalar_t, acc_t> ? at::Tensor() : at::empty({C * P}, opts);
        at::Tensor t_buf = at::empty({channels_last ? P * g : 0}, opts);
        at::Tensor d_buf = at::empty({g * P}, opts), dT_buf = at::empty({channels_last ? P * g : 0}, opts);
        at::Tensor r_buf = at::empty({C * P}, opts);
        for (int64_t slot = begin; slot < end; ++slot) {
          for (int64_t n = slot * N / slots; n < (slot + 1) * N / slots; ++n) {
            const scalar_t* xs = x_dense.data_ptr<scalar_t>() + n * C * P;
            const scalar_t* gos = GO.data_ptr<scalar_t>() + n * C * P;
            const at::Tensor an = A[n].view({g, P});
            const acc_t* ap = an.data_ptr<acc_t>();
            // dA (g, P): grad_y * x summed over each group's channels.
            at::Tensor dL = d_buf.view({g, P});
            acc_t* d = dL.data_ptr<acc_t>();
            if (!channels_last) {
              dL.zero_();
              for (int64_t c = 0; c < C; ++c) add_products(gos + c * P, xs + c * P, d + (c / G) * P, P);
            } else {
              acc_t* dT = dT_buf.data_ptr<acc_t>();
              for (int64_t p = 0; p < P; ++p) {
                for (int64_t j = 0; j < g; ++j) dT[p * g + j] = dot_row<scalar_t, acc_t>(gos + p * C + j * G, xs + p * C + j * G, G);
              }
              dL.copy_(dT_buf.view({P, g}).t());
            }
            // dL = a * (s dA - sum_p a s dA), row by row.
            for (int64_t j = 0; j < g; ++j) {
              acc_t* dj = d + j * P;
              const acc_t* aj = ap + j * P;
              acc_t sum = 0;
              for (int64_t p = 0; p < P; ++p) {
                dj[p] *= s;
                sum += aj[p] * dj[p];
              }
              for (int64_t p = 0; p < P; ++p) dj[p] = aj[p] * (dj[p] - sum);
            }
            // grad_x = grad_y * a * s + W^T dL.
            at::Tensor R = walk_buffer(r_buf, C, P, channels_last);
            at::mm_out(R, W.t(), dL);
            const acc_t* rs = r_buf.data_ptr<acc_t>();
            scalar_t* gxs = grad_x.data_ptr<scalar_t>() + n * C * P;
            const acc_t* aT = transposed<acc_t>(an, t_buf, channels_last);
            for_each_row(C, P, G, channels_last, ap, aT, [&](int64_t off, const acc_t* f, bool per_element, int64_t len) {
              grad_x_row(gos + off, f, per_element, s, rs + off, gxs + off, len, stream);
            });
            gw[slot].addmm_(dL, matrix_in_acc(sample_matrix(x_dense, n), x_buf, channels_last).t());
            gb[slot] += dL.sum(1);
          }
        }
        if (stream) stream_fence();
      });
    });
  }
  return {grad_x, gw.sum(0).to(weight.scalar_type()), gb.sum(0).to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkernels, CPU, m) {
  m.impl("softmax_spatial", &softmax_spatial_cpu);
  m.impl("softmax_spatial_backward", &softmax_spatial_backward_cpu);
}

}  // namespace attnkernels
