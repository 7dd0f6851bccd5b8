// Vector helpers every CPU kernel file shares (at::vec, any floating dtype).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <type_traits>

namespace attnkernels {

// One vector step over scalar_t values, held as accumulation-type vectors: one vector for
// float/double, two float vectors for half/bfloat16 (a Vectorized<Half> holds twice as many).
template <typename scalar_t>
struct Step {
  using acc_t = at::opmath_type<scalar_t>;
  using AccVec = at::vec::Vectorized<acc_t>;
  static constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  static constexpr int kVecs = kSame ? 1 : 2;
  static constexpr int64_t kWidth = at::vec::Vectorized<scalar_t>::size();

  static void load(const scalar_t* p, AccVec (&v)[kVecs]) {
    if constexpr (kSame) {
      v[0] = AccVec::loadu(p);
    } else {
      at::vec::load_to_float<scalar_t>(p, v[0], v[1]);
    }
  }
  static void store(scalar_t* p, const AccVec (&v)[kVecs]) {
    if constexpr (kSame) {
      v[0].store(p);
    } else {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
    }
  }
  // kWidth consecutive accumulation-type values (a gate row, a partial-sum buffer).
  static void load_acc(const acc_t* p, AccVec (&v)[kVecs]) {
    for (int i = 0; i < kVecs; ++i) v[i] = AccVec::loadu(p + i * AccVec::size());
  }
  static void store_acc(acc_t* p, const AccVec (&v)[kVecs]) {
    for (int i = 0; i < kVecs; ++i) v[i].store(p + i * AccVec::size());
  }
};

// sigmoid(v) = 1 / (1 + exp(-v)), as torch.sigmoid computes it: for one value, and for an
// at::vec vector of accumulation-type values.
template <typename acc_t>
inline acc_t sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + std::exp(-v));
}
template <typename V>
inline V vec_sigmoid(const V& v) {
  return V(1) / (V(1) + v.neg().exp());
}

// relu and its gradient by torch's rule (docs/contract.md "NaN propagation"): relu(t) =
// t < 0 ? 0 : t keeps a NaN, and the gradient (t <= 0) ? 0 : grad passes grad on where t is NaN.
template <typename acc_t>
inline acc_t relu(acc_t t) {
  return t < acc_t(0) ? acc_t(0) : t;
}
template <typename acc_t>
inline acc_t relu_grad(acc_t grad, acc_t t) {
  return t <= acc_t(0) ? acc_t(0) : grad;
}
template <typename V>
inline V vec_relu_grad(const V& grad, const V& t) {
  return V::blendv(grad, V(0), t <= V(0));
}

// max that propagates NaN from either side, as torch.amax.
template <typename acc_t>
inline acc_t nan_max(acc_t m, acc_t v) {
  return (std::isnan(v) || v > m) ? v : m;
}

// Horizontal sum and NaN-propagating max of one accumulation-type vector.
template <typename acc_t>
inline acc_t reduce_sum(const at::vec::Vectorized<acc_t>& v) {
  using V = at::vec::Vectorized<acc_t>;
  return at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return a + b; }, v);
}
template <typename acc_t>
inline acc_t reduce_max(const at::vec::Vectorized<acc_t>& v) {
  using V = at::vec::Vectorized<acc_t>;
  return at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return at::vec::maximum(a, b); }, v);
}

}  // namespace attnkernels
