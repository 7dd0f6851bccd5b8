// CPU kernels of the gam_channel hot path (GAM's per-pixel MLP gate); math in csrc/gam_channel_ops.cpp.
//
// One task per tile of up to kTile pixels of one sample. The tile of x is a (C x P) matrix read
// through its own strides (NCHW: pixel stride 1; channels_last: channel stride 1), so neither
// layout is copied (half inputs are widened into an acc buffer first); the MLP is two BLAS
// products on it, h = relu(w1 x + b1) (rd x P) and m = w2 h (C x P), and one vector loop then
// writes x1 = x * sigmoid(m + b2) while the tile is in cache. x is read once, x1 written once;
// h and m live in per-thread buffers of at most C x kTile values.
//
// Backward: the same tiles recompute h and m, then g = grad_x1 * x * m (1 - m), dh = relu_grad(w2^T g, h)
// and grad_x = grad_x1 * m + w1^T dh. The weight gradients accumulate per slot, a fixed
// range of tiles (kSlots of them, whatever the thread count), and the slots are summed in
// order: bitwise the same result on every run and every thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "attnkernels/gam_channel.h"
#include "attnkernels/cpu_vec.h"

namespace attnkernels {
namespace {

using at::vec::Vectorized;

// Pixels per tile: enough columns that the BLAS calls (a few us of overhead each) do real
// work, few enough that the (C x P) buffers stay in L2 (C = 256: 256 KB per buffer).
constexpr int64_t kTile = 256;
// Weight-gradient partial slots: tiles are split into at most this many fixed ranges.
constexpr int64_t kSlots = 64;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The pixel tiles of the whole batch: tile t is pixels [p0, p0 + P) of sample n.
struct Tiling {
  int64_t HW, per_sample, count;
  Tiling(int64_t N, int64_t HW_) : HW(HW_), per_sample(ceil_div(HW_, kTile)), count(N * ceil_div(HW_, kTile)) {}
  int64_t n(int64_t t) const { return t / per_sample; }
  int64_t p0(int64_t t) const { return (t % per_sample) * kTile; }
  int64_t P(int64_t t) const { return std::min(kTile, HW - p0(t)); }
};

// A (C x P) tile of a (C, HW) matrix in acc: the view itself when it is already acc, else a
// widened copy into buf (kept in the view's layout so the copy streams).
at::Tensor tile_in_acc(const at::Tensor& view, at::Tensor& buf, bool channels_last) {
  if (view.scalar_type() == buf.scalar_type()) return view;
  const int64_t C = view.size(0), P = view.size(1);
  at::Tensor tile = channels_last ? buf.narrow(0, 0, P * C).view({P, C}).t() : buf.narrow(0, 0, C * P).view({C, P});
  tile.copy_(view);
  return tile;
}

// A (C x P) acc buffer laid out like the tile of x: (C, P) rows for NCHW, (P, C) rows for
// channels_last, so the elementwise pass walks x, m and x1 in the same order.
at::Tensor tile_buffer(at::Tensor& buf, int64_t C, int64_t P, bool channels_last) {
  return channels_last ? buf.narrow(0, 0, P * C).view({P, C}).t() : buf.narrow(0, 0, C * P).view({C, P});
}

// h = relu(h + b1) on the (rd x P) contiguous hidden tile.
template <typename acc_t>
void bias_relu(acc_t* h, const acc_t* b1, int64_t rd, int64_t P) {
  for (int64_t r = 0; r < rd; ++r) {
    for (int64_t p = 0; p < P; ++p) h[r * P + p] = relu(h[r * P + p] + b1[r]);
  }
}

// Walk a tile of `rows` x `cols` in memory order: NCHW rows are channels (bias per row),
// channels_last rows are pixels (bias per column). f(offset in the acc tiles, offset in x's
// storage, count, bias pointer, bias per row?) handles one row.
template <typename F>
void for_tile_rows(int64_t C, int64_t P, int64_t x_row_stride, bool channels_last, F f) {
  const int64_t rows = channels_last ? P : C, cols = channels_last ? C : P;
  for (int64_t r = 0; r < rows; ++r) f(r, r * cols, r * x_row_stride, cols);
}

// x1 = x * sigmoid(m + b2) for one row of a tile: b2 is one value (NCHW row) or one per
// element (channels_last row).
template <typename scalar_t, typename acc_t>
void gate_row(const acc_t* x, const acc_t* m, const acc_t* b2, bool b2_per_element, scalar_t* x1, int64_t cols) {
  using V = Vectorized<acc_t>;
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; j + V::size() <= cols; j += V::size()) {
      const V b = b2_per_element ? V::loadu(b2 + j) : V(*b2);
      (V::loadu(x + j) * vec_sigmoid(V::loadu(m + j) + b)).store(x1 + j);
    }
  }
  for (; j < cols; ++j) x1[j] = static_cast<scalar_t>(x[j] * sigmoid(m[j] + b2[b2_per_element ? j : 0]));
}

// The small parameters in acc, contiguous: (rd, C), rd, (C, rd), C.
struct Mlp {
  at::Tensor w1, b1, w2, b2;
  Mlp(const at::Tensor& w1_, const at::Tensor& b1_, const at::Tensor& w2_, const at::Tensor& b2_, at::ScalarType acc)
      : w1(w1_.to(acc).contiguous()),
        b1(b1_.to(acc).contiguous()),
        w2(w2_.to(acc).contiguous()),
        b2(b2_.to(acc).contiguous()) {}
};

at::Tensor gam_channel_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                           const at::Tensor& b2) {
  check_gam_channel_args(x, w1, b1, w2, b2, "gam_channel");
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::Tensor x_dense = dense(x);
  const bool channels_last = layout_of(x_dense) == Layout::ChannelsLast;
  const int64_t N = x.size(0), C = x.size(1), rd = w1.size(0);
  const Tiling tiles(N, x.size(2) * x.size(3));
  const Mlp mlp(w1, b1, w2, b2, acc);
  at::Tensor x1 = empty_like_layout(x_dense);
  const at::Tensor X = pixel_matrix(x_dense);
  // Storage stride between rows of a tile: channels in NCHW, pixels in channels_last.
  const int64_t x_row_stride = channels_last ? C : tiles.HW;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gam_channel_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, tiles.count, 1, [&](int64_t begin, int64_t end) {
      BelowAutograd below;
      at::Tensor h_buf = at::empty({rd * kTile}, X.options().dtype(acc));
      at::Tensor m_buf = at::empty({C * kTile}, h_buf.options()), x_buf = at::empty_like(m_buf);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = tiles.n(t), p0 = tiles.p0(t), P = tiles.P(t);
        const at::Tensor x_tile = tile_in_acc(X[n].narrow(1, p0, P), x_buf, channels_last);
        at::Tensor h = h_buf.narrow(0, 0, rd * P).view({rd, P});
        at::mm_out(h, mlp.w1, x_tile);
        bias_relu(h.data_ptr<acc_t>(), mlp.b1.data_ptr<acc_t>(), rd, P);
        at::Tensor m = tile_buffer(m_buf, C, P, channels_last);
        at::mm_out(m, mlp.w2, h);
        // The acc tiles are dense in the walk order; x_tile too unless it is x itself.
        const bool x_is_view = x_tile.data_ptr() != x_buf.data_ptr();
        const acc_t* xs = x_tile.data_ptr<acc_t>();
        const acc_t* ms = m_buf.data_ptr<acc_t>();
        const acc_t* b2 = mlp.b2.data_ptr<acc_t>();
        scalar_t* out = x1.data_ptr<scalar_t>() + n * C * tiles.HW + (channels_last ? p0 * C : p0);
        for_tile_rows(C, P, x_row_stride, channels_last, [&](int64_t r, int64_t acc_off, int64_t x_off, int64_t cols) {
          const acc_t* x_row = xs + (x_is_view ? x_off : acc_off);
          gate_row<scalar_t, acc_t>(x_row, ms + acc_off, channels_last ? b2 : b2 + r, channels_last, out + x_off, cols);
        });
      }
    });
  });
  return x1;
}

// dh = relu_grad(dh, h) on the (rd x P) hidden tile (h = relu(t) is <= 0 exactly where t is).
template <typename acc_t>
void relu_mask(acc_t* dh, const acc_t* h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dh[i] = relu_grad(dh[i], h[i]);
}

// One row of the backward's elementwise pass: from grad_x1, x and m = sigmoid(m_pre + b2),
// g = grad_x1 * x * m * (1 - m) into g_out and grad_x1 * m in place of m_pre.
template <typename acc_t>
void gate_backward_row(const acc_t* go, const acc_t* x, acc_t* m, const acc_t* b2, bool b2_per_element, acc_t* g,
                       int64_t cols) {
  using V = Vectorized<acc_t>;
  int64_t j = 0;
  for (; j + V::size() <= cols; j += V::size()) {
    const V b = b2_per_element ? V::loadu(b2 + j) : V(*b2);
    const V s = vec_sigmoid(V::loadu(m + j) + b), gy = V::loadu(go + j);
    (gy * V::loadu(x + j) * s * (V(1) - s)).store(g + j);
    (gy * s).store(m + j);
  }
  for (; j < cols; ++j) {
    const acc_t s = sigmoid(m[j] + b2[b2_per_element ? j : 0]);
    g[j] = go[j] * x[j] * s * (acc_t(1) - s);
    m[j] = go[j] * s;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gam_channel_backward_cpu(
    const at::Tensor& grad_x1, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2) {
  const char* op = "gam_channel_backward";
  check_gam_channel_args(x, w1, b1, w2, b2, op);
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::Tensor x_dense = dense(x);
  const bool channels_last = layout_of(x_dense) == Layout::ChannelsLast;
  // grad_x1 in acc and x's layout, so one offset walks x, grad_x1 and the tiles alike.
  const at::Tensor GO = pixel_matrix(walked_like_x(grad_x1, x_dense, op, "grad_x1").to(acc));
  const int64_t N = x.size(0), C = x.size(1), rd = w1.size(0);
  const Tiling tiles(N, x.size(2) * x.size(3));
  const Mlp mlp(w1, b1, w2, b2, acc);
  const at::Tensor X = pixel_matrix(x_dense);
  at::Tensor grad_x = empty_like_layout(x_dense);
  const at::Tensor GX = pixel_matrix(grad_x);
  const int64_t slots = std::min(kSlots, tiles.count);
  // Per slot: grad_w1 (rd x C), grad_b1 (rd), grad_w2 (C x rd), grad_b2 (C).
  at::Tensor gw1 = at::zeros({slots, rd, C}, X.options().dtype(acc)), gb1 = at::zeros({slots, rd}, gw1.options());
  at::Tensor gw2 = at::zeros({slots, C, rd}, gw1.options()), gb2 = at::zeros({slots, C}, gw1.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gam_channel_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, slots, 1, [&](int64_t begin, int64_t end) {
      BelowAutograd below;
      at::Tensor h_buf = at::empty({rd * kTile}, gw1.options()), dh_buf = at::empty_like(h_buf);
      at::Tensor m_buf = at::empty({C * kTile}, gw1.options()), g_buf = at::empty_like(m_buf);
      at::Tensor x_buf = at::empty_like(m_buf);
      for (int64_t slot = begin; slot < end; ++slot) {
        for (int64_t t = slot * tiles.count / slots; t < (slot + 1) * tiles.count / slots; ++t) {
          const int64_t n = tiles.n(t), p0 = tiles.p0(t), P = tiles.P(t);
          const at::Tensor x_tile = tile_in_acc(X[n].narrow(1, p0, P), x_buf, channels_last);
          at::Tensor h = h_buf.narrow(0, 0, rd * P).view({rd, P});
          at::mm_out(h, mlp.w1, x_tile);
          bias_relu(h.data_ptr<acc_t>(), mlp.b1.data_ptr<acc_t>(), rd, P);
          at::Tensor m = tile_buffer(m_buf, C, P, channels_last), g = tile_buffer(g_buf, C, P, channels_last);
          at::mm_out(m, mlp.w2, h);
          const at::Tensor go_tile = GO[n].narrow(1, p0, P);  // already acc
          const acc_t* gos = go_tile.data_ptr<acc_t>();
          const acc_t* xs = x_tile.data_ptr<acc_t>();
          const bool x_is_view = x_tile.data_ptr() != x_buf.data_ptr();
          acc_t* ms = m_buf.data_ptr<acc_t>();
          const acc_t* b2 = mlp.b2.data_ptr<acc_t>();
          for_tile_rows(C, P, channels_last ? C : tiles.HW, channels_last,
                        [&](int64_t r, int64_t acc_off, int64_t x_off, int64_t cols) {
                          // go_tile is GO's own storage (GO is acc): x's offsets walk it.
                          gate_backward_row(gos + x_off, xs + (x_is_view ? x_off : acc_off), ms + acc_off,
                                            channels_last ? b2 : b2 + r, channels_last, g_buf.data_ptr<acc_t>() + acc_off,
                                            cols);
                        });
          at::Tensor dh = dh_buf.narrow(0, 0, rd * P).view({rd, P});
          at::mm_out(dh, mlp.w2.t(), g);
          relu_mask(dh.data_ptr<acc_t>(), h.data_ptr<acc_t>(), rd * P);
          m.addmm_(mlp.w1.t(), dh);  // grad_x = grad_x1 * m + w1^T dh, in acc
          GX[n].narrow(1, p0, P).copy_(m);
          gw2[slot].addmm_(g, h.t());
          gb2[slot] += g.sum(1);
          gw1[slot].addmm_(dh, x_tile.t());
          gb1[slot] += dh.sum(1);
        }
      }
    });
  });
  auto total = [](const at::Tensor& parts, const at::Tensor& like) {
    return parts.sum(0).reshape(like.sizes()).to(like.scalar_type());
  };
  return {grad_x, total(gw1, w1), total(gb1, b1), total(gw2, w2), total(gb2, b2)};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkernels, CPU, m) {
  m.impl("gam_channel", &gam_channel_cpu);
  m.impl("gam_channel_backward", &gam_channel_backward_cpu);
}

}  // namespace attnkernels
