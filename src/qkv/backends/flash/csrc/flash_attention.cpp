// Compiled CPU kernels of the "flash" backend: tiled forward with the online softmax,
// FlashAttention-2 backward that recomputes the probabilities from the saved
// log-sum-exp, and exact attention weights.
//
// Shape legend: B batch, H query heads, H_kv key/value heads, g = H / H_kv query heads
// per key/value head, L query length, S key length, d_k query/key width, d_v value
// width, G = g * bq rows of one tile (the g query heads of a key/value head stacked,
// bq query positions each), n keys of one tile.
//
// Band: key j is allowed for query i iff lo <= j - i - (S - L) <= hi (bottom-right
// aligned). |lo|, |hi| >= 2^62 mean "unbounded".
//
// Mask: none, or a bool / floating tensor of shape (B, H, L, S) given as a (possibly
// broadcast, zero-stride) view; it is read row by row through its strides, never
// materialised. bool true = may attend; a float mask is added to the scaled scores in
// the compute type (float32, float64 for float64 inputs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <atomic>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <numeric>
#include <vector>

#include "blas.h"

namespace qkv_flash {

template <typename T>
using Vec = at::vec::Vectorized<T>;

constexpr int64_t kUnbounded = int64_t(1) << 62;

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// ---------------------------------------------------------------------------------
// Band and mask
// ---------------------------------------------------------------------------------

// Allowed keys of query i: [first(i), end(i)) intersected with [0, S).
struct Band {
  int64_t lo, hi, off;  // off = S - L
  bool bounded() const { return lo > -kUnbounded || hi < kUnbounded; }
  int64_t first(int64_t i) const { return lo > -kUnbounded ? i + off + lo : -kUnbounded; }
  int64_t end(int64_t i) const { return hi < kUnbounded ? i + off + hi + 1 : kUnbounded; }
  // Keys [jlo, jhi) that some query in [imin, imax] may see (empty when jlo >= jhi).
  std::pair<int64_t, int64_t> keys(int64_t imin, int64_t imax, int64_t S) const {
    return {std::max<int64_t>(0, first(imin)), std::min<int64_t>(S, end(imax))};
  }
  // True when the key tile [j0, j1) is not entirely inside the band of every query in
  // [imin, imax]: only such tiles get a per-element band test.
  bool cuts(int64_t imin, int64_t imax, int64_t j0, int64_t j1) const {
    return first(imax) > j0 || end(imin) < j1;
  }
};

// Sets the scores of keys outside query i's band to -inf. s: (n,) scores of keys
// [j0, j0 + n).
template <typename T>
inline void band_row(T* s, const Band& band, int64_t i, int64_t j0, int64_t n) {
  const int64_t a = std::clamp<int64_t>(band.first(i) - j0, 0, n);
  const int64_t b = std::clamp<int64_t>(band.end(i) - j0, a, n);
  std::fill(s, s + a, neg_inf<T>());
  std::fill(s + b, s + n, neg_inf<T>());
}

template <typename acc_t, typename mask_t>
inline acc_t mask_value(mask_t m) {
  if constexpr (std::is_same_v<mask_t, at::Half> || std::is_same_v<mask_t, at::BFloat16>) {
    return static_cast<acc_t>(static_cast<float>(m));
  } else {
    return static_cast<acc_t>(m);
  }
}

// Applies one mask row to n scores. s: (n,); m: the mask entry of the first key, ms its
// stride along keys (0 for a mask broadcast over keys).
template <typename acc_t, typename mask_t>
void mask_row(acc_t* s, const void* mp, int64_t ms, int64_t n) {
  const mask_t* m = static_cast<const mask_t*>(mp);
  if constexpr (std::is_same_v<mask_t, bool>) {
    if (ms == 0) {
      if (!m[0]) std::fill(s, s + n, neg_inf<acc_t>());
      return;
    }
    for (int64_t j = 0; j < n; ++j) s[j] = m[j * ms] ? s[j] : neg_inf<acc_t>();
  } else {
    if (ms == 0) {
      const acc_t add = mask_value<acc_t>(m[0]);
      for (int64_t j = 0; j < n; ++j) s[j] += add;
    } else if (ms == 1) {
      for (int64_t j = 0; j < n; ++j) s[j] += mask_value<acc_t>(m[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) s[j] += mask_value<acc_t>(m[j * ms]);
    }
  }
}

// A (B, H, L, S) mask view: data pointer, element strides, and the row function for
// its dtype (chosen once per call, so the tile loops carry no dtype dispatch).
template <typename acc_t>
struct MaskView {
  using RowFn = void (*)(acc_t*, const void*, int64_t, int64_t);
  const char* data = nullptr;
  int64_t sb = 0, sh = 0, sl = 0, ss = 0, elsize = 0;
  RowFn fn = nullptr;

  explicit operator bool() const { return data != nullptr; }

  // Adds / applies mask[b, h, i, j0 : j0 + n] to s (n,).
  void apply(acc_t* s, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n) const {
    fn(s, data + (b * sb + h * sh + i * sl + j0 * ss) * elsize, ss, n);
  }
};

template <typename acc_t>
MaskView<acc_t> make_mask(const std::optional<at::Tensor>& mask) {
  MaskView<acc_t> v;
  if (!mask.has_value() || !mask->defined()) return v;
  const at::Tensor& m = *mask;
  v.data = static_cast<const char*>(m.const_data_ptr());
  v.sb = m.stride(0);
  v.sh = m.stride(1);
  v.sl = m.stride(2);
  v.ss = m.stride(3);
  v.elsize = m.element_size();
  switch (m.scalar_type()) {
    case at::kBool: v.fn = &mask_row<acc_t, bool>; break;
    case at::kFloat: v.fn = &mask_row<acc_t, float>; break;
    case at::kDouble: v.fn = &mask_row<acc_t, double>; break;
    case at::kHalf: v.fn = &mask_row<acc_t, at::Half>; break;
    case at::kBFloat16: v.fn = &mask_row<acc_t, at::BFloat16>; break;
    default: TORCH_CHECK(false, "qkv_flash: mask must be bool or floating, got ", m.scalar_type());
  }
  return v;
}

// ---------------------------------------------------------------------------------
// Row primitives (Vectorized: 16 floats per register with AVX512, 8 with AVX2)
// ---------------------------------------------------------------------------------

template <typename T>
inline T row_max(const T* x, int64_t n) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  T m = neg_inf<T>();
  int64_t j = 0;
  if (n >= W) {
    V vm = V::loadu(x);
    for (j = W; j + W <= n; j += W) vm = at::vec::maximum(vm, V::loadu(x + j));
    m = at::vec::vec_reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

#if defined(CPU_CAPABILITY_AVX512)
// float32 specialisation: four independent max chains (the loop is latency-bound on
// one) and the plain max instruction instead of at::vec::maximum, whose NaN
// propagation costs an extra compare-and-blend per vector. A NaN score still ends up
// NaN in the output through exp(NaN - m).
template <>
inline float row_max<float>(const float* x, int64_t n) {
  __m512 m0 = _mm512_set1_ps(neg_inf<float>()), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + j));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(x + j + 16));
    m2 = _mm512_max_ps(m2, _mm512_loadu_ps(x + j + 32));
    m3 = _mm512_max_ps(m3, _mm512_loadu_ps(x + j + 48));
  }
  for (; j + 16 <= n; j += 16) m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + j));
  float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}
#endif

// exp(a * x + b) for a float vector, the exp of the non-accurate softmax paths.
// With AVX512: t = (a * x + b) * log2(e) in one fma (a and b come pre-multiplied by
// log2(e)), n = round(t), 2^(t - n) by its degree-6 Taylor polynomial on [-1/2, 1/2]
// (truncation error 1.2e-7 relative, a few float32 ulp in all: the accuracy class of
// exp_u20) and 2^n applied with
// vscalefps: 11 instructions against exp_u20's ~20. t is clamped below at -150 (the
// result underflows to 0, -inf included); the clamp keeps a NaN t as NaN.
// Elsewhere: exp_u20.
// Folding log2(e) into a and b overflows float32 when |b| is near float32's limit (a
// row max of -3.4e38 from a float mask holding finfo(float32).min): `fast` is then
// false and exp(a * x + b) is evaluated as one fma, exact before its single rounding
// (x and -b cancel), followed by exp_u20 — the float32 result the reference gets.
struct ExpAffine {
  float a2, b2;  // a * log2(e), b * log2(e)
  float a, b;
  bool fast;
  ExpAffine(float a_, float b_)
      : a2(a_ * 1.4426950408889634f), b2(b_ * 1.4426950408889634f), a(a_), b(b_),
        fast(std::isfinite(a2) && std::isfinite(b2) && std::fabs(b2) < 1e37f) {}
};

inline Vec<float> exp_affine(const Vec<float>& x, const ExpAffine& e) {
#if defined(CPU_CAPABILITY_AVX512)
  if (!e.fast) return at::vec::fmadd(x, Vec<float>(e.a), Vec<float>(e.b)).exp_u20();
  const __m512 t = _mm512_max_ps(_mm512_set1_ps(-150.0f),
                                 _mm512_fmadd_ps(__m512(x), _mm512_set1_ps(e.a2),
                                                 _mm512_set1_ps(e.b2)));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  // 2^f = sum_k (f ln2)^k / k!, k = 0..6
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return Vec<float>(_mm512_scalef_ps(p, n));
#else
  return at::vec::fmadd(x, Vec<float>(e.a), Vec<float>(e.b)).exp_u20();
#endif
}

// x = exp(x - m) in place; returns sum(x). Accurate = Sleef exp (about 1 ulp); otherwise
// a polynomial exp (exp_affine for float, exp_u20 for double; a few ulp in float32),
// plenty for the forward softmax whose result is rounded to the input dtype anyway and
// for the backward's recomputed probabilities.
template <bool kAccurate, typename T>
inline T exp_sub_sum(T* x, int64_t n, T m) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const V vm(m);
  V vs(T(0));
  int64_t j = 0;
  if constexpr (!kAccurate && std::is_same_v<T, float>) {
    const ExpAffine ea(1.0f, -m);
    for (; j + W <= n; j += W) {
      const V e = exp_affine(V::loadu(x + j), ea);
      e.store(x + j);
      vs = vs + e;
    }
  }
  for (; j + W <= n; j += W) {
    V d = V::loadu(x + j) - vm;
    V e = kAccurate ? d.exp() : d.exp_u20();
    e.store(x + j);
    vs = vs + e;
  }
  T s = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, vs);
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - m);
    s += x[j];
  }
  return s;
}

// y = exp(a * x - m) written as out_t (float, or 16-bit for the P @ V GEMM); returns
// the float sum of the unrounded values. One pass: the score row is read once and the
// probabilities are written once, already in the GEMM's input type.
template <typename out_t>
inline float exp_scale_sum_to(const float* x, out_t* y, int64_t n, float a, float m) {
  using V = Vec<float>;
  constexpr int64_t W = V::size();
  const ExpAffine ea(a, -m);
  V s0(0.0f), s1(0.0f);

  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    const V e0 = exp_affine(V::loadu(x + j), ea);
    const V e1 = exp_affine(V::loadu(x + j + W), ea);
    s0 = s0 + e0;
    s1 = s1 + e1;
    if constexpr (std::is_same_v<out_t, float>) {
      e0.store(y + j);
      e1.store(y + j + W);
    } else {
      at::vec::convert_from_float<out_t>(e0, e1).store(y + j);
    }
  }
  s0 = s0 + s1;
  float s = at::vec::vec_reduce_all<float>([](V& u, V& w) { return u + w; }, s0);
  for (; j < n; ++j) {
    const float e = std::exp(std::fma(a, x[j], -m));
    y[j] = static_cast<out_t>(e);
    s += e;
  }
  return s;
}

template <typename T>
inline void scale_row(T* x, int64_t n, T a) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const V va(a);
  int64_t j = 0;
  for (; j + W <= n; j += W) (V::loadu(x + j) * va).store(x + j);
  for (; j < n; ++j) x[j] *= a;
}

template <typename T>
inline T dot_row(const T* a, const T* b, int64_t n) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  V acc(T(0));
  int64_t j = 0;
  for (; j + W <= n; j += W) acc = at::vec::fmadd(V::loadu(a + j), V::loadu(b + j), acc);
  T s = at::vec::vec_reduce_all<T>([](V& x, V& y) { return x + y; }, acc);
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// ds = p * (dp - D), in place in dp. p, dp: (n,).
template <typename T>
inline void softmax_grad_row(const T* p, T* dp, int64_t n, T D) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const V vD(D);
  int64_t j = 0;
  for (; j + W <= n; j += W) (V::loadu(p + j) * (V::loadu(dp + j) - vD)).store(dp + j);
  for (; j < n; ++j) dp[j] = p[j] * (dp[j] - D);
}

template <typename src_t, typename dst_t>
inline void convert_row(const src_t* src, dst_t* dst, int64_t n) {
  if constexpr (std::is_same_v<src_t, dst_t>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
// exp_scale_sum_to<BFloat16> for CPUs with avx512_bf16 (every CPU the brgemm path runs
// on: AMX-BF16 implies it): one vcvtne2ps2bf16 per 32 values replaces the emulated
// round-to-nearest-even sequence. The whole loop carries the target attribute so the
// intrinsic is inlined.
__attribute__((target("avx512bf16"))) inline float exp_scale_sum_bf16_native(
    const float* x, at::BFloat16* y, int64_t n, float a, float m) {
  using V = Vec<float>;
  const ExpAffine ea(a, -m);
  V s0(0.0f), s1(0.0f);
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const V e0 = exp_affine(V::loadu(x + j), ea);
    const V e1 = exp_affine(V::loadu(x + j + 16), ea);
    s0 = s0 + e0;
    s1 = s1 + e1;
    _mm512_storeu_si512(reinterpret_cast<void*>(y + j),
                        (__m512i)_mm512_cvtne2ps_pbh(__m512(e1), __m512(e0)));
  }
  s0 = s0 + s1;
  float s = at::vec::vec_reduce_all<float>([](V& u, V& w) { return u + w; }, s0);
  for (; j < n; ++j) {
    const float e = std::exp(std::fma(a, x[j], -m));
    y[j] = static_cast<at::BFloat16>(e);
    s += e;
  }
  return s;
}
inline bool cpu_has_avx512bf16() {
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
}
#endif

template <typename out_t>
inline float exp_scale_sum_fast(const float* x, out_t* y, int64_t n, float a, float m) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
  if constexpr (std::is_same_v<out_t, at::BFloat16>) {
    if (cpu_has_avx512bf16()) return exp_scale_sum_bf16_native(x, y, n, a, m);
  }
#endif
  return exp_scale_sum_to(x, y, n, a, m);
}

// ---------------------------------------------------------------------------------
// Tiling
// ---------------------------------------------------------------------------------

// Per-core L2 size (the level whose capacity decides the tile size; L1 is too small to
// hold a useful tile and L3 is shared). Clamped so an odd sysconf answer cannot
// produce degenerate tiles.
inline int64_t l2_bytes() {
  long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (v <= 0) v = 1 << 20;
  return std::clamp<int64_t>(v, 256 << 10, 4 << 20);
}

struct Tiles {
  int64_t bq;  // query positions per tile and head (G = g * bq rows)
  int64_t bk;  // keys per tile
};

// Rows: ~128 per tile, so that every K/V element a GEMM streams in is reused by 128
// rows (BLAS kernels reach most of their peak from about this size on) while the
// per-row softmax state stays small. Fewer rows when that leaves too few work items for
// the threads to share (4 per thread lets dynamic scheduling even out ragged causal
// costs). Keys: the largest power of two up to 512 whose working set (score tile(s),
// K/V block, packed Q and accumulators) fits in half of L2, leaving the other half for
// the BLAS kernel's own packed panels.
inline Tiles pick_tiles(int64_t g, int64_t L, int64_t S, int64_t dk, int64_t dv,
                        int64_t in_bytes, int64_t acc_bytes, int64_t outer_items,
                        bool backward) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t bq = std::max<int64_t>(1, 128 / g);
  bq = std::max<int64_t>(1, std::min(bq, L));
  if (!backward) {
    while (bq > 16 && outer_items * ((L + bq - 1) / bq) < 4 * threads) bq /= 2;
  }
  const int64_t G = g * bq;
  const int64_t score_tiles = backward ? 2 : 1;  // backward keeps P and dP/dS
  const int64_t budget = l2_bytes() / 2;
  int64_t bk = 512;
  auto bytes = [&](int64_t k) {
    int64_t b = score_tiles * G * k * acc_bytes + k * (dk + dv) * in_bytes +
                G * (dk + dv) * acc_bytes * (backward ? 2 : 1);
    if (backward) b += k * (dk + dv) * acc_bytes;  // dK, dV accumulator blocks
    return b;
  };
  while (bk > 64 && bytes(bk) > budget) bk /= 2;
  bk = std::max<int64_t>(1, std::min(bk, S));
  return {bq, bk};
}

// Runs body(item) for items [0, n) on at::get_num_threads() threads. Each thread
// takes the next item from a shared counter (dynamic scheduling: causal items differ
// in cost). Results never depend on which thread ran an item, because items write
// disjoint outputs. make_scratch() builds one thread's buffers, once per call.
template <typename Scratch, typename MakeScratch, typename Body>
void run_items(int64_t n, MakeScratch make_scratch, Body body) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(std::max(1, at::get_num_threads()), n);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      Scratch scratch = make_scratch();
      for (;;) {
        const int64_t item = next.fetch_add(1, std::memory_order_relaxed);
        if (item >= n) break;
        body(item, scratch);
      }
    }
  });
}

// Pointer helpers for a (B, heads, len, d) tensor with a contiguous last dim.
template <typename T>
struct Rows {
  const T* data;
  int64_t sb, sh, sl;
  explicit Rows(const at::Tensor& t)
      : data(t.const_data_ptr<T>()), sb(t.stride(0)), sh(t.stride(1)), sl(t.stride(2)) {}
  const T* at(int64_t b, int64_t h, int64_t i) const { return data + b * sb + h * sh + i * sl; }
};

struct Problem {
  int64_t B, H, Hkv, g, L, S, dk, dv;
  Band band;
};

// ---------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------

// q (B, H, L, d_k), k (B, H_kv, S, d_k), v (B, H_kv, S, d_v) of in_t; out (B, H, L, d_v)
// contiguous in_t; lse (B, H, L) contiguous acc_t or undefined. in_t == acc_t, or a
// 16-bit in_t multiplied by the BLAS in 16 bits with float accumulation (half_dot).
template <typename in_t, typename acc_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const MaskView<acc_t>& mask, const Problem& p, acc_t scale,
                    at::Tensor& out, at::Tensor& lse) {
  const Rows<in_t> Q(q), K(k), V(v);
  in_t* out_data = out.data_ptr<in_t>();
  acc_t* lse_data = lse.defined() ? lse.data_ptr<acc_t>() : nullptr;
  const int64_t g = p.g, L = p.L, S = p.S, dk = p.dk, dv = p.dv;
  const Tiles tiles = pick_tiles(g, L, S, dk, dv, sizeof(in_t), sizeof(acc_t), p.B * p.Hkv,
                                 /*backward=*/false);
  const int64_t bq = tiles.bq, bk = tiles.bk, Gmax = g * bq;
  const int64_t nqb = (L + bq - 1) / bq;
  const int64_t n_items = p.B * p.Hkv * nqb;

  // Costly items first (with a band their key ranges differ), so the last items that
  // the dynamic schedule hands out are the cheap ones.
  std::vector<int64_t> order(n_items);
  std::iota(order.begin(), order.end(), 0);
  if (p.band.bounded()) {
    auto cost = [&](int64_t item) {
      const int64_t qb = item % nqb;
      const auto [jlo, jhi] = p.band.keys(qb * bq, std::min(L, qb * bq + bq) - 1, S);
      return std::max<int64_t>(0, jhi - jlo);
    };
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return cost(a) > cost(b); });
  }

  struct Scratch {
    std::vector<in_t> q_rows;    // (G, d_k): packed query rows
    std::vector<acc_t> scores;   // (G, n): scores, then probabilities
    std::vector<in_t> p_half;    // (G, n): probabilities in 16 bits (half_dot only)
    std::vector<acc_t> acc;      // (G, d_v): unnormalised output
    std::vector<acc_t> m, l;     // (G,): running max and sum
  };
  auto make_scratch = [&] {
    Scratch s;
    s.q_rows.resize(Gmax * dk);
    s.scores.resize(Gmax * bk);
    if constexpr (!std::is_same_v<in_t, acc_t>) s.p_half.resize(Gmax * bk);
    s.acc.resize(Gmax * dv);
    s.m.resize(Gmax);
    s.l.resize(Gmax);
    return s;
  };

  run_items<Scratch>(n_items, make_scratch, [&](int64_t idx, Scratch& sc) {
    const int64_t item = order[idx];
    const int64_t qb = item % nqb, bh = item / nqb;
    const int64_t b = bh / p.Hkv, kvh = bh % p.Hkv;
    const int64_t i0 = qb * bq, i1 = std::min(L, i0 + bq), nb = i1 - i0, G = g * nb;

    // Row r = hh * nb + (i - i0): query head kvh * g + hh at position i.
    for (int64_t hh = 0; hh < g; ++hh)
      for (int64_t i = i0; i < i1; ++i)
        std::copy_n(Q.at(b, kvh * g + hh, i), dk, sc.q_rows.data() + (hh * nb + i - i0) * dk);
    std::fill_n(sc.m.data(), G, neg_inf<acc_t>());
    std::fill_n(sc.l.data(), G, acc_t(0));
    std::fill_n(sc.acc.data(), G * dv, acc_t(0));

    const auto [jlo, jhi] = p.band.keys(i0, i1 - 1, S);
    const in_t* k_head = K.at(b, kvh, 0);
    const in_t* v_head = V.at(b, kvh, 0);
    for (int64_t j0 = jlo; j0 < jhi; j0 += bk) {
      const int64_t j1 = std::min(j0 + bk, jhi), n = j1 - j0;
      acc_t* s_tile = sc.scores.data();
      // scores (G, n) = scale * q_rows (G, d_k) @ k[j0:j1] (n, d_k)^T
      gemm(false, true, G, n, dk, scale, sc.q_rows.data(), dk, k_head + j0 * K.sl, K.sl,
           acc_t(0), s_tile, n);
      const bool cut = p.band.cuts(i0, i1 - 1, j0, j1);
      for (int64_t r = 0; r < G; ++r) {
        acc_t* s = s_tile + r * n;
        const int64_t i = i0 + r % nb;
        if (cut) band_row(s, p.band, i, j0, n);
        if (mask) mask.apply(s, b, kvh * g + r / nb, i, j0, n);
        const acc_t m_old = sc.m[r];
        const acc_t m_new = std::max(m_old, row_max(s, n));
        if (m_new == neg_inf<acc_t>()) {  // nothing allowed so far: contributes zeros
          std::fill_n(s, n, acc_t(0));
          continue;
        }
        const acc_t sum = exp_sub_sum</*kAccurate=*/false>(s, n, m_new);
        const acc_t alpha = m_old == neg_inf<acc_t>() ? acc_t(0) : std::exp(m_old - m_new);
        if (alpha != acc_t(1)) scale_row(sc.acc.data() + r * dv, dv, alpha);
        sc.l[r] = sc.l[r] * alpha + sum;
        sc.m[r] = m_new;
      }
      // acc (G, d_v) += probabilities (G, n) @ v[j0:j1] (n, d_v)
      if constexpr (std::is_same_v<in_t, acc_t>) {
        gemm(false, false, G, dv, n, acc_t(1), s_tile, n, v_head + j0 * V.sl, V.sl, acc_t(1),
             sc.acc.data(), dv);
      } else {
        convert_row(s_tile, sc.p_half.data(), G * n);
        gemm(false, false, G, dv, n, 1.0f, sc.p_half.data(), n, v_head + j0 * V.sl, V.sl, 1.0f,
             sc.acc.data(), dv);
      }
    }

    for (int64_t r = 0; r < G; ++r) {
      const int64_t h = kvh * g + r / nb, i = i0 + r % nb;
      acc_t* a = sc.acc.data() + r * dv;
      const acc_t l = sc.l[r];
      // A row with no allowed key has l = 0: output 0 and lse = -inf, never NaN.
      scale_row(a, dv, l > acc_t(0) ? acc_t(1) / l : acc_t(0));
      convert_row(a, out_data + ((b * p.H + h) * L + i) * dv, dv);
      if (lse_data)
        lse_data[(b * p.H + h) * L + i] = l > acc_t(0) ? sc.m[r] + std::log(l) : neg_inf<acc_t>();
    }
  });
}

// Forward for 16-bit inputs on CPUs with AMX / avx512 16-bit dot products, through
// oneDNN's batch-reduce GEMM micro-kernel (at::native::cpublas::brgemm, the kernel
// PyTorch's own flash attention uses). Its B operand must be in the VNNI layout, so K
// and V are packed once per call (cost linear in S, shared by every query tile):
//   k_pack (B*H_kv, S_pad / C, d_k x C): chunk c holds keys [c*C, c*C + C) transposed
//     to (d_k, C), VNNI-packed, zero past S;
//   v_pack (B*H_kv, d_v / Wv, S_pad x Wv): columns in blocks of Wv = 64 (the widest B
//     operand oneDNN packs), each VNNI-packed over rows [0, S_pad), zero past S, packed
//     in C-row chunks, so the rows of any C-aligned key range are one contiguous slice.
// Key tiles start at multiples of C (keys outside the band are masked as usual).
// Shapes oneDNN cannot pack (see brgemm_shapes_ok) take the CBLAS path instead.
template <typename in_t>
void forward_brgemm(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const MaskView<float>& mask, const Problem& p, float scale, at::Tensor& out,
                    at::Tensor& lse) {
  using at::native::cpublas::brgemm;
  using at::native::cpublas::pack;
  constexpr int64_t C = 64;  // keys per packed chunk: the N width PyTorch's kernel uses
  constexpr int64_t Wv = 64;  // value columns per packed block
  const auto dt = c10::CppTypeToScalarType<in_t>::value;
  const Rows<in_t> Q(q), K(k), V(v);
  in_t* out_data = out.data_ptr<in_t>();
  float* lse_data = lse.defined() ? lse.data_ptr<float>() : nullptr;
  const int64_t g = p.g, L = p.L, S = p.S, dk = p.dk, dv = p.dv, BH = p.B * p.Hkv;
  const int64_t nch = (S + C - 1) / C, S_pad = nch * C;
  Tiles tiles = pick_tiles(g, L, S, dk, dv, sizeof(in_t), sizeof(float), BH, false);
  const int64_t bq = tiles.bq, Gmax = g * bq;
  const int64_t bk = std::max<int64_t>(C, tiles.bk / C * C);  // whole chunks per tile
  const int64_t nqb = (L + bq - 1) / bq;

  std::vector<in_t> k_pack(BH * nch * dk * C), v_pack(BH * S_pad * dv);
  at::parallel_for(0, BH * nch, 1, [&](int64_t t0, int64_t t1) {
    std::vector<in_t> tmp(std::max(dk, C) * std::max(dv, C));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nch, c = t % nch, b = bh / p.Hkv, kvh = bh % p.Hkv;
      const int64_t j0 = c * C, n = std::min(C, S - j0);
      // K chunk (n, d_k) -> (d_k, C), zero columns past n.
      std::fill(tmp.begin(), tmp.end(), in_t(0));
      for (int64_t j = 0; j < n; ++j) {
        const in_t* kr = K.at(b, kvh, j0 + j);
        for (int64_t x = 0; x < dk; ++x) tmp[x * C + j] = kr[x];
      }
      pack(dk, C, C, C, dt, dt, tmp.data(), k_pack.data() + (bh * nch + c) * dk * C);
      // V chunk (n, w) per column block, zero rows past n.
      for (int64_t c0 = 0; c0 < dv; c0 += Wv) {
        const int64_t w = std::min(Wv, dv - c0);
        std::fill(tmp.begin(), tmp.end(), in_t(0));
        for (int64_t j = 0; j < n; ++j) std::copy_n(V.at(b, kvh, j0 + j) + c0, w, tmp.data() + j * w);
        pack(C, w, w, w, dt, dt, tmp.data(), v_pack.data() + bh * S_pad * dv + c0 * S_pad + j0 * w);
      }
    }
  });

  const int64_t n_items = BH * nqb;
  std::vector<int64_t> order(n_items);
  std::iota(order.begin(), order.end(), 0);
  if (p.band.bounded()) {
    auto cost = [&](int64_t item) {
      const int64_t qb = item % nqb;
      const auto [jlo, jhi] = p.band.keys(qb * bq, std::min(L, qb * bq + bq) - 1, S);
      return std::max<int64_t>(0, jhi - jlo);
    };
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return cost(a) > cost(b); });
  }
  struct Scratch {
    std::vector<in_t> q_rows;   // (G, d_k)
    std::vector<float> scores;  // (G, bk)
    std::vector<in_t> p_half;   // (G, bk)
    std::vector<float> acc;     // (G, d_v)
    std::vector<float> m, l;    // (G,)
  };
  auto make_scratch = [&] {
    Scratch s;
    s.q_rows.resize(Gmax * dk);
    s.scores.resize(Gmax * bk);
    s.p_half.resize(Gmax * bk);
    s.acc.resize(Gmax * dv);
    s.m.resize(Gmax);
    s.l.resize(Gmax);
    return s;
  };

  run_items<Scratch>(n_items, make_scratch, [&](int64_t idx, Scratch& sc) {
    const int64_t item = order[idx];
    const int64_t qb = item % nqb, bh = item / nqb;
    const int64_t b = bh / p.Hkv, kvh = bh % p.Hkv;
    const int64_t i0 = qb * bq, i1 = std::min(L, i0 + bq), nb = i1 - i0, G = g * nb;
    for (int64_t hh = 0; hh < g; ++hh)
      for (int64_t i = i0; i < i1; ++i)
        std::copy_n(Q.at(b, kvh * g + hh, i), dk, sc.q_rows.data() + (hh * nb + i - i0) * dk);
    std::fill_n(sc.m.data(), G, neg_inf<float>());
    std::fill_n(sc.l.data(), G, 0.0f);
    std::fill_n(sc.acc.data(), G * dv, 0.0f);

    const auto [jlo, jhi] = p.band.keys(i0, i1 - 1, S);
    const in_t* kp = k_pack.data() + bh * nch * dk * C;
    const in_t* vp = v_pack.data() + bh * S_pad * dv;
    for (int64_t j0 = jlo / C * C; j0 < jhi; j0 += bk) {
      const int64_t j1 = std::min(j0 + bk, jhi), n = j1 - j0;
      const int64_t nc = (n + C - 1) / C, ld = nc * C;  // whole chunks; columns past n unused
      float* s_tile = sc.scores.data();
      for (int64_t c = 0; c < nc; ++c)
        brgemm(G, C, dk, dk, C, ld, false, sc.q_rows.data(), kp + (j0 / C + c) * dk * C,
               s_tile + c * C, true);
      const bool cut = p.band.cuts(i0, i1 - 1, j0, j1);
      for (int64_t r = 0; r < G; ++r) {
        float* s = s_tile + r * ld;
        in_t* ph = sc.p_half.data() + r * ld;
        const int64_t i = i0 + r % nb;
        // The scale is folded into the exp (a positive scale commutes with the max and
        // keeps -inf at -inf); a float mask is added to scaled scores, so then (or for a
        // non-positive scale) the row is scaled first.
        float a = scale;
        if (mask || !(scale > 0.0f)) {
          scale_row(s, n, scale);
          a = 1.0f;
        }
        if (cut) band_row(s, p.band, i, j0, n);
        if (mask) mask.apply(s, b, kvh * g + r / nb, i, j0, n);
        const float m_old = sc.m[r];
        const float m_new = std::max(m_old, a * row_max(s, n));
        std::fill(ph + n, ph + ld, in_t(0));  // padded keys: weight 0 (V rows there are 0 or real)
        if (m_new == neg_inf<float>()) {
          std::fill_n(ph, n, in_t(0));
          continue;
        }
        const float sum = exp_scale_sum_fast(s, ph, n, a, m_new);
        const float alpha = m_old == neg_inf<float>() ? 0.0f : std::exp(m_old - m_new);
        if (alpha != 1.0f) scale_row(sc.acc.data() + r * dv, dv, alpha);
        sc.l[r] = sc.l[r] * alpha + sum;
        sc.m[r] = m_new;
      }
      // acc (G, d_v) += P (G, ld) @ V rows [j0, j0 + ld), one column block at a time
      for (int64_t c0 = 0; c0 < dv; c0 += Wv) {
        const int64_t w = std::min(Wv, dv - c0);
        brgemm(G, w, ld, ld, w, dv, true, sc.p_half.data(), vp + c0 * S_pad + j0 * w,
               sc.acc.data() + c0, true);
      }
    }
    at::native::cpublas::brgemm_release(true);

    for (int64_t r = 0; r < G; ++r) {
      const int64_t h = kvh * g + r / nb, i = i0 + r % nb;
      float* a = sc.acc.data() + r * dv;
      const float l = sc.l[r];
      scale_row(a, dv, l > 0.0f ? 1.0f / l : 0.0f);
      convert_row(a, out_data + ((b * p.H + h) * L + i) * dv, dv);
      if (lse_data)
        lse_data[(b * p.H + h) * L + i] = l > 0.0f ? sc.m[r] + std::log(l) : neg_inf<float>();
    }
  });
}

// ---------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------

// q, k, v, dout in_t, o and lse acc_t (in_t == acc_t, or 16-bit inputs whose GEMMs run
// in 16 bits with float accumulation: P and dS are rounded to in_t before their GEMMs,
// as PyTorch's own 16-bit kernels do). q (B, H, L, d_k), k (B, H_kv, S, d_k), v (B, H_kv, S, d_v),
// o, dout (B, H, L, d_v), lse (B, H, L) contiguous. Outputs, contiguous: dq_parts
// (splits, B, H, L, d_k) (each split of the keys writes its own dq so nothing is
// accumulated across threads; the caller sums the parts in index order), dk
// (B, H_kv, S, d_k), dv (B, H_kv, S, d_v).
template <typename in_t, typename acc_t>
void backward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& o, const at::Tensor& dout, const at::Tensor& lse,
                     const MaskView<acc_t>& mask, const Problem& p, acc_t scale,
                     const Tiles& tiles, int64_t splits, at::Tensor& dq_parts, at::Tensor& dk_out,
                     at::Tensor& dv_out) {
  constexpr bool kHalf = !std::is_same_v<in_t, acc_t>;
  const Rows<in_t> Q(q), K(k), V(v), dO(dout);
  const Rows<acc_t> O(o);
  const acc_t* lse_data = lse.const_data_ptr<acc_t>();
  acc_t* dq_data = dq_parts.data_ptr<acc_t>();
  acc_t* dk_data = dk_out.data_ptr<acc_t>();
  acc_t* dv_data = dv_out.data_ptr<acc_t>();
  const int64_t g = p.g, L = p.L, S = p.S, dk = p.dk, dv = p.dv, H = p.H;
  const int64_t bq = tiles.bq, bk = tiles.bk, Gmax = g * bq;
  const int64_t nqb = (L + bq - 1) / bq, nkb = (S + bk - 1) / bk;
  // Split s owns key blocks [s * nkb / splits, (s + 1) * nkb / splits).
  auto split_keys = [&](int64_t s) {
    return std::pair<int64_t, int64_t>{std::min(S, (s * nkb / splits) * bk),
                                       std::min(S, ((s + 1) * nkb / splits) * bk)};
  };
  int64_t max_keys = 0;
  for (int64_t s = 0; s < splits; ++s) {
    const auto [ks, ke] = split_keys(s);
    max_keys = std::max(max_keys, ke - ks);
  }

  struct Scratch {
    std::vector<in_t> q_rows, do_rows;             // (G, d_k), (G, d_v)
    std::vector<acc_t> dq_rows, do_acc;            // (G, d_k), (d_v,)
    std::vector<in_t> P_half, dS_half;             // (G, n): 16-bit copies (kHalf only)
    std::vector<acc_t> lse_rows, D;                // (G,)
    std::vector<acc_t> P, dP;                      // (G, n)
    std::vector<acc_t> dK, dV;                     // (keys of the split, d_k / d_v)
  };
  auto make_scratch = [&] {
    Scratch s;
    s.q_rows.resize(Gmax * dk);
    s.do_rows.resize(Gmax * dv);
    s.dq_rows.resize(Gmax * dk);
    s.do_acc.resize(dv);
    if constexpr (kHalf) {
      s.P_half.resize(Gmax * bk);
      s.dS_half.resize(Gmax * bk);
    }
    s.lse_rows.resize(Gmax);
    s.D.resize(Gmax);
    s.P.resize(Gmax * bk);
    s.dP.resize(Gmax * bk);
    s.dK.resize(max_keys * dk);
    s.dV.resize(max_keys * dv);
    return s;
  };

  const int64_t n_items = p.B * p.Hkv * splits;
  run_items<Scratch>(n_items, make_scratch, [&](int64_t item, Scratch& sc) {
    const int64_t split = item % splits, bh = item / splits;
    const int64_t b = bh / p.Hkv, kvh = bh % p.Hkv;
    const auto [ks, ke] = split_keys(split);
    std::fill_n(sc.dK.data(), (ke - ks) * dk, acc_t(0));
    std::fill_n(sc.dV.data(), (ke - ks) * dv, acc_t(0));
    const in_t* k_head = K.at(b, kvh, 0);
    const in_t* v_head = V.at(b, kvh, 0);
    acc_t* dq_split = dq_data + split * p.B * H * L * dk;

    for (int64_t qb = 0; qb < nqb; ++qb) {
      const int64_t i0 = qb * bq, i1 = std::min(L, i0 + bq), nb = i1 - i0, G = g * nb;
      auto [jlo, jhi] = p.band.keys(i0, i1 - 1, S);
      jlo = std::max(jlo, ks);
      jhi = std::min(jhi, ke);
      std::fill_n(sc.dq_rows.data(), G * dk, acc_t(0));
      if (jlo < jhi) {
        for (int64_t r = 0; r < G; ++r) {
          const int64_t h = kvh * g + r / nb, i = i0 + r % nb;
          std::copy_n(Q.at(b, h, i), dk, sc.q_rows.data() + r * dk);
          std::copy_n(dO.at(b, h, i), dv, sc.do_rows.data() + r * dv);
          sc.lse_rows[r] = lse_data[(b * H + h) * L + i];
          // D = rowsum(dO * O): the softmax-gradient correction of this row.
          convert_row(dO.at(b, h, i), sc.do_acc.data(), dv);
          sc.D[r] = dot_row(sc.do_acc.data(), O.at(b, h, i), dv);
        }
      }
      for (int64_t j0 = jlo; j0 < jhi; j0 += bk) {
        const int64_t j1 = std::min(j0 + bk, jhi), n = j1 - j0;
        const in_t* kj = k_head + j0 * K.sl;
        const in_t* vj = v_head + j0 * V.sl;
        acc_t* P = sc.P.data();
        acc_t* dP = sc.dP.data();
        // P (G, n) = exp(scale * q_rows @ kj^T + mask - lse)
        gemm(false, true, G, n, dk, scale, sc.q_rows.data(), dk, kj, K.sl, acc_t(0), P, n);
        const bool cut = p.band.cuts(i0, i1 - 1, j0, j1);
        for (int64_t r = 0; r < G; ++r) {
          acc_t* s = P + r * n;
          const acc_t row_lse = sc.lse_rows[r];
          if (row_lse == neg_inf<acc_t>()) {  // no allowed key: no gradient at all
            std::fill_n(s, n, acc_t(0));
            continue;
          }
          const int64_t i = i0 + r % nb;
          if (cut) band_row(s, p.band, i, j0, n);
          if (mask) mask.apply(s, b, kvh * g + r / nb, i, j0, n);
          exp_sub_sum</*kAccurate=*/false>(s, n, row_lse);
        }
        // The GEMM operands P and dS: the float tiles, or their 16-bit copies.
        const in_t* Pg;
        const in_t* dSg;
        if constexpr (kHalf) {
          convert_row(P, sc.P_half.data(), G * n);
          Pg = sc.P_half.data();
        } else {
          Pg = P;
        }
        // dV[j0:j1] (n, d_v) += P^T (n, G) @ dO_rows (G, d_v)
        gemm(true, false, n, dv, G, acc_t(1), Pg, n, sc.do_rows.data(), dv, acc_t(1),
             sc.dV.data() + (j0 - ks) * dv, dv);
        // dP (G, n) = dO_rows (G, d_v) @ vj (n, d_v)^T, then dS = P * (dP - D)
        gemm(false, true, G, n, dv, acc_t(1), sc.do_rows.data(), dv, vj, V.sl, acc_t(0), dP, n);
        for (int64_t r = 0; r < G; ++r) softmax_grad_row(P + r * n, dP + r * n, n, sc.D[r]);
        if constexpr (kHalf) {
          convert_row(dP, sc.dS_half.data(), G * n);
          dSg = sc.dS_half.data();
        } else {
          dSg = dP;
        }
        // dK[j0:j1] (n, d_k) += scale * dS^T (n, G) @ q_rows (G, d_k)
        gemm(true, false, n, dk, G, scale, dSg, n, sc.q_rows.data(), dk, acc_t(1),
             sc.dK.data() + (j0 - ks) * dk, dk);
        // dq_rows (G, d_k) += scale * dS (G, n) @ kj (n, d_k)
        gemm(false, false, G, dk, n, scale, dSg, n, kj, K.sl, acc_t(1), sc.dq_rows.data(), dk);
      }
      for (int64_t r = 0; r < G; ++r) {
        const int64_t h = kvh * g + r / nb, i = i0 + r % nb;
        std::copy_n(sc.dq_rows.data() + r * dk, dk, dq_split + ((b * H + h) * L + i) * dk);
      }
    }
    std::copy_n(sc.dK.data(), (ke - ks) * dk, dk_data + ((b * p.Hkv + kvh) * S + ks) * dk);
    std::copy_n(sc.dV.data(), (ke - ks) * dv, dv_data + ((b * p.Hkv + kvh) * S + ks) * dv);
  });
}

// ---------------------------------------------------------------------------------
// Weights
// ---------------------------------------------------------------------------------

// Exact softmax weights of the requested query rows. q (B, H, L, d_k), k (B, H_kv, S,
// d_k) acc_t; lse (B, H, L) contiguous acc_t; rows (R,) query indices. out: (B, H, R, S)
// or, when average, (B, R, S), contiguous acc_t. Each row is written as exp(s - lse)
// with the accurate exp and then divided by its own sum, so it sums to 1 to rounding
// even if lse came from the forward's faster exp.
template <typename acc_t>
void weights_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                    const MaskView<acc_t>& mask, const Problem& p, acc_t scale,
                    const std::vector<int64_t>& rows, bool average, at::Tensor& out) {
  const Rows<acc_t> Q(q), K(k);
  const acc_t* lse_data = lse.const_data_ptr<acc_t>();
  acc_t* out_data = out.data_ptr<acc_t>();
  const int64_t R = static_cast<int64_t>(rows.size()), S = p.S, L = p.L, dk = p.dk, H = p.H;
  const int64_t br = 32;  // rows per item: one head's rows, each an S-wide output row
  const int64_t bk = std::max<int64_t>(1, std::min<int64_t>(512, S));
  const int64_t nrb = (R + br - 1) / br;
  const int64_t n_items = average ? p.B * nrb : p.B * H * nrb;

  struct Scratch {
    std::vector<acc_t> q_rows;  // (br, d_k)
    std::vector<acc_t> heads;   // (br, S): one head's weights before averaging
  };
  auto make_scratch = [&] {
    Scratch s;
    s.q_rows.resize(br * dk);
    if (average) s.heads.resize(br * S);
    return s;
  };

  // Writes the weights of head h for rows [r0, r1) into dst (r1 - r0, S), row stride S.
  auto one_head = [&](Scratch& sc, int64_t b, int64_t h, int64_t r0, int64_t r1, acc_t* dst) {
    const int64_t nr = r1 - r0, kvh = h / p.g;
    int64_t imin = L, imax = -1;
    for (int64_t r = r0; r < r1; ++r) {
      std::copy_n(Q.at(b, h, rows[r]), dk, sc.q_rows.data() + (r - r0) * dk);
      imin = std::min(imin, rows[r]);
      imax = std::max(imax, rows[r]);
    }
    const auto [jlo, jhi] = p.band.keys(imin, imax, S);
    const acc_t* k_head = K.at(b, kvh, 0);
    for (int64_t j0 = jlo; j0 < jhi; j0 += bk) {
      const int64_t j1 = std::min(j0 + bk, jhi), n = j1 - j0;
      gemm(false, true, nr, n, dk, scale, sc.q_rows.data(), dk, k_head + j0 * K.sl, K.sl,
           acc_t(0), dst + j0, S);
      const bool cut = p.band.cuts(imin, imax, j0, j1);
      for (int64_t r = 0; r < nr; ++r) {
        acc_t* s = dst + r * S + j0;
        if (cut) band_row(s, p.band, rows[r0 + r], j0, n);
        if (mask) mask.apply(s, b, h, rows[r0 + r], j0, n);
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      acc_t* row = dst + r * S;
      const acc_t row_lse = lse_data[(b * H + h) * L + rows[r0 + r]];
      const int64_t a = std::clamp<int64_t>(jlo, 0, S), e = std::clamp<int64_t>(jhi, a, S);
      std::fill(row, row + a, acc_t(0));
      std::fill(row + e, row + S, acc_t(0));
      if (row_lse == neg_inf<acc_t>() || a >= e) {
        std::fill(row, row + S, acc_t(0));
        continue;
      }
      const acc_t sum = exp_sub_sum</*kAccurate=*/true>(row + a, e - a, row_lse);
      scale_row(row + a, e - a, sum > acc_t(0) ? acc_t(1) / sum : acc_t(0));
    }
  };

  run_items<Scratch>(n_items, make_scratch, [&](int64_t item, Scratch& sc) {
    const int64_t rb = item % nrb;
    const int64_t r0 = rb * br, r1 = std::min(R, r0 + br);
    if (!average) {
      const int64_t bh = item / nrb, b = bh / H, h = bh % H;
      one_head(sc, b, h, r0, r1, out_data + ((b * H + h) * R + r0) * S);
      return;
    }
    const int64_t b = item / nrb;
    acc_t* dst = out_data + (b * R + r0) * S;
    std::fill_n(dst, (r1 - r0) * S, acc_t(0));
    // Heads are added in index order: the average is deterministic.
    for (int64_t h = 0; h < H; ++h) {
      one_head(sc, b, h, r0, r1, sc.heads.data());
      for (int64_t x = 0; x < (r1 - r0) * S; ++x) dst[x] += sc.heads[x];
    }
    scale_row(dst, (r1 - r0) * S, acc_t(1) / acc_t(H));
  });
}

// ---------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------

// A view whose last dim is not contiguous is copied (the GEMMs need unit stride there).
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.size(-1) > 1 && t.stride(-1) != 1) ? t.contiguous() : t;
}

Problem check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, int64_t lo, int64_t hi) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "qkv_flash: q, k, v must be 4-d (B, H, L, d)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "qkv_flash: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "qkv_flash: q, k, v must share a dtype");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "qkv_flash: dtype must be float64/float32/bfloat16/float16, got ", dt);
  Problem p;
  p.B = q.size(0);
  p.H = q.size(1);
  p.L = q.size(2);
  p.dk = q.size(3);
  p.Hkv = k.size(1);
  p.S = k.size(2);
  p.dv = v.size(3);
  TORCH_CHECK(k.size(0) == p.B && v.size(0) == p.B, "qkv_flash: batch sizes differ");
  TORCH_CHECK(k.size(3) == p.dk, "qkv_flash: q and k widths differ");
  TORCH_CHECK(v.size(1) == p.Hkv && v.size(2) == p.S, "qkv_flash: k and v shapes differ");
  TORCH_CHECK(p.Hkv > 0 && p.H % p.Hkv == 0, "qkv_flash: H must be a multiple of H_kv");
  p.g = p.H / p.Hkv;
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.dim() == 4 && m.size(0) == p.B && m.size(1) == p.H && m.size(2) == p.L &&
                    m.size(3) == p.S,
                "qkv_flash: mask must be expanded to (B, H, L, S) = (", p.B, ", ", p.H, ", ",
                p.L, ", ", p.S, "), got ", m.sizes());
    TORCH_CHECK(m.device().is_cpu(), "qkv_flash: mask must be on the CPU");
  }
  p.band.lo = std::max(lo, -kUnbounded);
  p.band.hi = std::min(hi, kUnbounded);
  p.band.off = p.S - p.L;
  return p;
}

at::ScalarType acc_type(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

// Whether oneDNN's brgemm can take these widths for dt: asked once per (dt, d_k, d_v)
// by packing a dummy tile (oneDNN refuses some, e.g. bfloat16 blocks narrower than 16
// columns), so an unsupported shape falls back to CBLAS instead of failing.
bool brgemm_shapes_ok(at::ScalarType dt, int64_t dk, int64_t dv) {
  if (dk % 2 != 0 || dv % 2 != 0 || !at::native::cpublas::could_pack(dt)) return false;
  static std::mutex mu;
  static std::map<std::tuple<int, int64_t, int64_t>, bool> known;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(static_cast<int>(dt), dk, dv);
  auto it = known.find(key);
  if (it != known.end()) return it->second;
  bool ok = true;
  try {
    constexpr int64_t C = 64, Wv = 64;
    std::vector<uint16_t> in(std::max(dk, C) * std::max(dv, C), 0), out(in.size() + 64, 0);
    at::native::cpublas::pack(dk, C, C, C, dt, dt, in.data(), out.data());
    for (int64_t c0 = 0; c0 < dv; c0 += Wv) {
      const int64_t w = std::min(Wv, dv - c0);
      at::native::cpublas::pack(C, w, w, w, dt, dt, in.data(), out.data());
    }
  } catch (const std::exception&) {
    ok = false;
  }
  known.emplace(key, ok);
  return ok;
}

std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& q_in, const at::Tensor& k_in,
                                              const at::Tensor& v_in,
                                              const std::optional<at::Tensor>& mask, int64_t lo,
                                              int64_t hi, double scale, bool need_lse,
                                              bool half_dot) {
  at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
             v = last_dim_contiguous(v_in);
  const Problem p = check_inputs(q, k, v, mask, lo, hi);
  const auto dt = q.scalar_type();
  const auto acc = acc_type(dt);
  at::Tensor lse = need_lse ? at::empty({p.B, p.H, p.L}, q.options().dtype(acc))
                            : at::empty({0}, q.options().dtype(acc));
  at::Tensor lse_arg = need_lse ? lse : at::Tensor();
  at::Tensor out = at::empty({p.B, p.H, p.L, p.dv}, q.options());
  if (dt == at::kDouble) {
    forward_kernel<double, double>(q, k, v, make_mask<double>(mask), p, scale, out, lse_arg);
    return {out, lse};
  }
  const bool half = dt == at::kBFloat16 || dt == at::kHalf;
  const bool blas16 = dt == at::kBFloat16 ? blas().gemm_bf16 != nullptr : blas().gemm_f16 != nullptr;
  if (half && half_dot && std::getenv("QKV_FLASH_NO_BRGEMM") == nullptr &&
      brgemm_shapes_ok(dt, p.dk, p.dv)) {
    // oneDNN's brgemm micro-kernel (AMX where present). could_pack says whether this
    // CPU/build supports it for dt; QKV_FLASH_NO_BRGEMM=1 forces the MKL CBLAS path
    // below (tests use it to cover both).
    if (dt == at::kBFloat16)
      forward_brgemm<at::BFloat16>(q, k, v, make_mask<float>(mask), p, float(scale), out, lse_arg);
    else
      forward_brgemm<at::Half>(q, k, v, make_mask<float>(mask), p, float(scale), out, lse_arg);
    return {out, lse};
  }
  if (half && half_dot && blas16) {
    if (dt == at::kBFloat16)
      forward_kernel<at::BFloat16, float>(q, k, v, make_mask<float>(mask), p, float(scale), out,
                                          lse_arg);
    else
      forward_kernel<at::Half, float>(q, k, v, make_mask<float>(mask), p, float(scale), out,
                                      lse_arg);
    return {out, lse};
  }
  if (half) {
    // Without 16-bit dot-product instructions a 16-bit GEMM is emulated and far slower
    // than converting once to float32 and multiplying there.
    at::Tensor out_f = at::empty({p.B, p.H, p.L, p.dv}, q.options().dtype(at::kFloat));
    forward_kernel<float, float>(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat),
                                 make_mask<float>(mask), p, float(scale), out_f, lse_arg);
    return {out_f.to(dt), lse};
  }
  forward_kernel<float, float>(q, k, v, make_mask<float>(mask), p, float(scale), out, lse_arg);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& dout_in, const at::Tensor& lse_in,
    const std::optional<at::Tensor>& mask, int64_t lo, int64_t hi, double scale, bool half_dot) {
  const Problem p = check_inputs(q_in, k_in, v_in, mask, lo, hi);
  const auto dt = q_in.scalar_type();
  const auto acc = acc_type(dt);
  // 16-bit inputs multiply in 16 bits (float accumulation, every sum kept in float)
  // when half_dot (the caller's test that the CPU has the dot-product instructions) and
  // the BLAS has the entry point; elsewhere a 16-bit GEMM is emulated and converting
  // once to float32 is far faster.
  const bool half16 = half_dot && ((dt == at::kBFloat16 && blas().gemm_bf16 != nullptr) ||
                                   (dt == at::kHalf && blas().gemm_f16 != nullptr));
  auto prep = [&](const at::Tensor& t) { return last_dim_contiguous(t.to(acc)); };
  auto prep_in = [&](const at::Tensor& t) {
    return half16 ? last_dim_contiguous(t) : last_dim_contiguous(t.to(acc));
  };
  at::Tensor q = prep_in(q_in), k = prep_in(k_in), v = prep_in(v_in), o = prep(out_in),
             dout = prep_in(dout_in);
  at::Tensor lse = lse_in.to(acc).contiguous();
  TORCH_CHECK(o.sizes() == at::IntArrayRef({p.B, p.H, p.L, p.dv}) && dout.sizes() == o.sizes(),
              "qkv_flash: out and dout must be (B, H, L, d_v)");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({p.B, p.H, p.L}), "qkv_flash: lse must be (B, H, L)");

  const Tiles tiles = pick_tiles(p.g, p.L, p.S, p.dk, p.dv, at::elementSize(acc),
                                 at::elementSize(acc), p.B * p.Hkv, /*backward=*/true);
  // Enough (b, kv head, key split) items for every thread; each split writes its own
  // dq, summed below in split order, so the result is the same whichever thread ran
  // what (it does depend on the thread count through the number of splits).
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t nkb = std::max<int64_t>(1, (p.S + tiles.bk - 1) / tiles.bk);
  const int64_t bh = std::max<int64_t>(1, p.B * p.Hkv);
  const int64_t splits = bh >= threads ? 1 : std::min(nkb, (2 * threads + bh - 1) / bh);

  const auto acc_opt = q.options().dtype(acc);
  at::Tensor dq_parts = at::empty({splits, p.B, p.H, p.L, p.dk}, acc_opt);
  at::Tensor dk = at::empty({p.B, p.Hkv, p.S, p.dk}, acc_opt);
  at::Tensor dv = at::empty({p.B, p.Hkv, p.S, p.dv}, acc_opt);
  if (acc == at::kDouble)
    backward_kernel<double, double>(q, k, v, o, dout, lse, make_mask<double>(mask), p, scale,
                                    tiles, splits, dq_parts, dk, dv);
  else if (half16 && dt == at::kBFloat16)
    backward_kernel<at::BFloat16, float>(q, k, v, o, dout, lse, make_mask<float>(mask), p,
                                         float(scale), tiles, splits, dq_parts, dk, dv);
  else if (half16)
    backward_kernel<at::Half, float>(q, k, v, o, dout, lse, make_mask<float>(mask), p,
                                     float(scale), tiles, splits, dq_parts, dk, dv);
  else
    backward_kernel<float, float>(q, k, v, o, dout, lse, make_mask<float>(mask), p,
                                  float(scale), tiles, splits, dq_parts, dk, dv);
  at::Tensor dq = dq_parts[0];
  if (splits > 1) {
    dq = dq.clone();
    for (int64_t s = 1; s < splits; ++s) dq.add_(dq_parts[s]);
  }
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

at::Tensor weights_op(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& lse_in,
                      const std::optional<at::Tensor>& mask, int64_t lo, int64_t hi,
                      double scale, const std::optional<at::Tensor>& rows_in,
                      bool average_heads) {
  // v is not needed; k stands in for it in the shape checks (d_v := d_k).
  const Problem p = check_inputs(q_in, k_in, k_in, mask, lo, hi);
  const auto acc = acc_type(q_in.scalar_type());
  at::Tensor q = last_dim_contiguous(q_in.to(acc)), k = last_dim_contiguous(k_in.to(acc));
  at::Tensor lse = lse_in.to(acc).contiguous();
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({p.B, p.H, p.L}), "qkv_flash: lse must be (B, H, L)");
  std::vector<int64_t> rows;
  if (rows_in.has_value() && rows_in->defined()) {
    at::Tensor r = rows_in->to(at::kLong).contiguous().view(-1);
    const int64_t* rp = r.const_data_ptr<int64_t>();
    rows.assign(rp, rp + r.numel());
    for (int64_t& x : rows) {
      if (x < 0) x += p.L;
      TORCH_CHECK(x >= 0 && x < p.L, "qkv_flash: row index out of range");
    }
  } else {
    rows.resize(p.L);
    std::iota(rows.begin(), rows.end(), 0);
  }
  const int64_t R = static_cast<int64_t>(rows.size());
  at::Tensor out = average_heads ? at::empty({p.B, R, p.S}, q.options())
                                 : at::empty({p.B, p.H, R, p.S}, q.options());
  if (acc == at::kDouble)
    weights_kernel<double>(q, k, lse, make_mask<double>(mask), p, scale, rows, average_heads,
                           out);
  else
    weights_kernel<float>(q, k, lse, make_mask<float>(mask), p, float(scale), rows,
                          average_heads, out);
  return out;
}

// Floats per SIMD register in this build (16 with AVX512, 8 with AVX2, 8 DEFAULT):
// tells a test that the ISA flags reached the Vectorized headers.
int64_t vec_width() { return Vec<float>::size(); }

std::string blas_info() { return blas_description(); }

}  // namespace qkv_flash

TORCH_LIBRARY(qkv_flash, m) {
  m.def(
      "forward(Tensor q, Tensor k, Tensor v, Tensor? mask, int lo, int hi, float scale, "
      "bool need_lse=True, bool half_dot=False) -> (Tensor, Tensor)");
  m.def(
      "backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor dout, Tensor lse, "
      "Tensor? mask, int lo, int hi, float scale, bool half_dot=False) -> (Tensor, Tensor, "
      "Tensor)");
  m.def(
      "weights(Tensor q, Tensor k, Tensor lse, Tensor? mask, int lo, int hi, float scale, "
      "Tensor? rows=None, bool average_heads=False) -> Tensor");
  m.def("vec_width", &qkv_flash::vec_width);
  m.def("blas_info", &qkv_flash::blas_info);
}

TORCH_LIBRARY_IMPL(qkv_flash, CPU, m) {
  m.impl("forward", &qkv_flash::forward_op);
  m.impl("backward", &qkv_flash::backward_op);
  m.impl("weights", &qkv_flash::weights_op);
}
