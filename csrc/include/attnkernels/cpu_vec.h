// Vector helpers every CPU kernel file shares (at::vec, any floating dtype).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <unistd.h>
#endif

namespace attnkernels {

// f(std::true_type{}) or f(std::false_type{}): a runtime flag made a compile-time one, so the
// kernel f instantiates (`decltype(flag)::value`) has no branch on it in its inner loop.
template <typename F>
decltype(auto) with_flag(bool flag, const F& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

// ---- Streaming (non-temporal) stores, for outputs too big to stay in the caches.
// A plain store first reads the line it writes (read-for-ownership), so writing y costs
// two crossings of memory per byte; a streaming store writes the line whole, past the
// caches, as memcpy does for large copies. Measured on the 2-vCPU EPYC: x * s over 25.7 MB,
// one thread, 2.9-3.2 ms with plain stores and 1.8 ms streamed (benchmarks/NOTES.md,
// session 14). Streaming is wrong for an output that the next op would find in cache, so a
// kernel streams only when should_stream says its traffic exceeds the last-level cache.

// Bytes of the last-level cache (sysconf on Linux; 32 MiB where it cannot tell).
inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t b = -1;
#if defined(__linux__) && defined(_SC_LEVEL3_CACHE_SIZE)
    b = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (b <= 0) b = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return b > 0 ? b : int64_t(32) << 20;
  }();
  return bytes;
}

// Bytes an op must touch before it streams: ATTNKERNELS_STREAM_THRESHOLD (bytes; 0 streams
// every aligned vector: the tests use it) where set, else the last-level cache's size.
inline int64_t stream_threshold_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("ATTNKERNELS_STREAM_THRESHOLD");
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      if (end != nullptr && *end == '\0' && v >= 0) return static_cast<int64_t>(v);
    }
    return last_level_cache_bytes();
  }();
  return bytes;
}

// Whether an op that reads and writes `bytes_touched` bytes should stream its output:
// when the data cannot all stay in the last-level cache, the output would be evicted
// before anyone reads it, so reading it in for ownership is wasted.
inline bool should_stream(int64_t bytes_touched) { return bytes_touched > stream_threshold_bytes(); }

// v stored at p with streaming stores, 16 bytes at a time, where p is 16-byte aligned (every
// vector of a plane or row whose start is: fp32 maps with H*W or C a multiple of 4); a
// plain store elsewhere and off x86. Call stream_fence() before the written data is handed
// to another thread (at the end of each parallel task).
template <typename T>
inline void store_stream(T* p, const at::vec::Vectorized<T>& v) {
#if defined(__SSE2__)
  constexpr int kBytes = static_cast<int>(sizeof(T) * at::vec::Vectorized<T>::size());
  if constexpr (kBytes % 16 == 0) {
    if (reinterpret_cast<std::uintptr_t>(p) % 16 == 0) {
      alignas(64) T staged[at::vec::Vectorized<T>::size()];
      v.store(staged);
      for (int b = 0; b < kBytes; b += 16) {
        const __m128i part = _mm_load_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const char*>(staged) + b));
        _mm_stream_si128(reinterpret_cast<__m128i*>(reinterpret_cast<char*>(p) + b), part);
      }
      return;
    }
  }
#endif
  v.store(p);
}

// Orders this thread's streaming stores before whatever it does next (they are weakly
// ordered); a no-op where store_stream never streams.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

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
  static void store(scalar_t* p, const AccVec (&v)[kVecs]) { store(p, v, false); }
  // store, or a streaming store past the caches when `stream` (see store_stream).
  static void store(scalar_t* p, const AccVec (&v)[kVecs], bool stream) {
    if constexpr (kSame) {
      stream ? store_stream(p, v[0]) : v[0].store(p);
    } else {
      const at::vec::Vectorized<scalar_t> out = at::vec::convert_from_float<scalar_t>(v[0], v[1]);
      stream ? store_stream(p, out) : out.store(p);
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

// exp(v) of a softmax's shifted energies (v <= 0, -inf, or NaN), as torch's own CPU softmax
// computes it: at::vec's exp_u20 (for float a degree-5 polynomial, within about 20 ulp, which
// torch.softmax's float results show too; exact exp for double): 0.44-0.50 ns a float on one
// Zen 4 core against the Sleef exp's 0.84 (AVX2 build). exp_u20 clamps its input, so a NaN
// comes out +inf (a row's sum then makes it NaN again, but only as inf / inf): NaN lanes are
// kept instead, as exp keeps them.
template <typename V>
inline V softmax_exp(const V& v) {
  return V::blendv(v.exp_u20(), v, v.isnan());
}

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
// v[i] = sigmoid(v[i]) for n values in place: whole vectors by vec_sigmoid (a scalar exp per
// channel was most of SE's per-sample gate), the tail by the scalar formula.
template <typename acc_t>
inline void sigmoid_in_place(acc_t* v, int64_t n) {
  using V = at::vec::Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) vec_sigmoid(V::loadu(v + i)).store(v + i);
  for (; i < n; ++i) v[i] = sigmoid(v[i]);
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

// max of two vectors that need not propagate NaN (where either lane is NaN, either value may
// result): one instruction on x86 (maxps gives its second operand then), against three for
// at::vec::maximum (max, unordered compare, or), which in a pooling loop is the difference
// between keeping up with memory and not. A kernel that uses it finds NaN another way: a sum
// over the same values is NaN whenever one of them is (then has_nan decides).
template <typename V>
inline V max_ignoring_nan(const V& a, const V& b) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<V, at::vec::Vectorized<float>>) {
    return _mm256_max_ps(a, b);
  } else if constexpr (std::is_same_v<V, at::vec::Vectorized<double>>) {
    return _mm256_max_pd(a, b);
  } else {
    return at::vec::maximum(a, b);
  }
#else
  return at::vec::maximum(a, b);
#endif
}

// Whether any of the count values p[0], p[stride], ... is NaN: the rare path of a pooling
// whose sum came out NaN (a NaN value, or +inf and -inf both, which max_ignoring_nan handles).
template <typename scalar_t>
inline bool has_nan(const scalar_t* p, int64_t count, int64_t stride = 1) {
  for (int64_t i = 0; i < count; ++i) {
    if (std::isnan(static_cast<at::opmath_type<scalar_t>>(p[i * stride]))) return true;
  }
  return false;
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
