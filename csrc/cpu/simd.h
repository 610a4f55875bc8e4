// Portable SIMD vectors (GCC/Clang vector extensions) and the elementwise math the CPU
// kernels need: exp, log, log1p, expm1.
//
// Compiled once per instruction set (loss_kernels_*.cpp): the including file defines FI_ISA,
// the namespace that keeps each copy's inline functions apart (the linker must never
// substitute an AVX2 copy for code that runs on any x86-64), and FI_VECTOR_BYTES. No torch
// header may be included here for the same reason.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#define FI_INLINE inline __attribute__((always_inline))

namespace fused_imbalance {
namespace cpu {
namespace FI_ISA {
namespace simd {

// Every lane does the same operations in the same order whatever the width. The copies with
// fused multiply-adds (FI_FMA: AVX2 and AVX-512) therefore give bit-identical results to each
// other; the portable copy rounds each fmadd twice and agrees with them to within an ulp or two
// per operation.
constexpr int kVectorBytes = FI_VECTOR_BYTES;
#ifndef FI_FMA
#define FI_FMA 0
#endif

template <typename T>
struct Vec;

template <>
struct Vec<float> {
  typedef float V __attribute__((vector_size(kVectorBytes)));
  typedef int32_t I __attribute__((vector_size(kVectorBytes)));  // comparison masks
  typedef int32_t L __attribute__((vector_size(kVectorBytes)));  // labels, one per lane
  static constexpr int W = kVectorBytes / 4;
};

template <>
struct Vec<double> {
  typedef double V __attribute__((vector_size(kVectorBytes)));
  typedef int64_t I __attribute__((vector_size(kVectorBytes)));
  typedef int32_t L __attribute__((vector_size(kVectorBytes / 2)));
  static constexpr int W = kVectorBytes / 8;
};

template <typename V>
FI_INLINE V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // unaligned load
  return v;
}

template <typename V>
FI_INLINE void store(void* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// Every lane = s. A scalar operand of a vector operation is broadcast (one instruction); a
// loop that fills the lanes would be compiled lane by lane. s − 0 = s exactly, −0 included.
template <typename V, typename S>
FI_INLINE V splat(S s) {
  typedef typename std::remove_reference<decltype(V{}[0])>::type E;
  return static_cast<E>(s) - V{};
}

// mask ? a : b, lane by lane (mask lanes are 0 or -1).
template <typename M, typename V>
FI_INLINE V select(M mask, V a, V b) {
#if defined(__clang__)
  typedef decltype(mask) IM;
  return (V)(((IM)a & mask) | ((IM)b & ~mask));
#else
  return mask ? a : b;
#endif
}

// a·b + c: one fused multiply-add (rounded once) in the FI_FMA copies, else a product and a sum
// (the build has -ffp-contract=off, so the compiler never fuses them on its own).
template <typename V>
FI_INLINE V fmadd(V a, V b, V c) {
#if FI_FMA
  typedef typename std::remove_reference<decltype(a[0])>::type E;
  if constexpr (sizeof(V) == 32 && std::is_same<E, float>::value)
    return (V)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
  if constexpr (sizeof(V) == 32 && std::is_same<E, double>::value)
    return (V)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
  if constexpr (sizeof(V) == 64 && std::is_same<E, float>::value)
    return (V)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
  if constexpr (sizeof(V) == 64 && std::is_same<E, double>::value)
    return (V)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#endif
  return a * b + c;
}

#if defined(__GNUC__) && !defined(__clang__)
#define FI_HAVE_TRANSPOSE 1
// In-register transpose of W vectors of W lanes (a W × W tile): log2(W) butterfly stages;
// stage H swaps the off-diagonal H × H blocks of rows i and i + H.
template <typename I, int W, int H, int... L>
constexpr I butterfly_mask(bool high, std::integer_sequence<int, L...>) {
  return I{(high ? ((L & H) == 0 ? L + H : W + L) : ((L & H) == 0 ? L : W + L - H))...};
}

template <typename T, int H>
FI_INLINE void transpose_stage(typename Vec<T>::V* r) {
  using I = typename Vec<T>::I;
  constexpr int W = Vec<T>::W;
  constexpr I lo = butterfly_mask<I, W, H>(false, std::make_integer_sequence<int, W>{});
  constexpr I hi = butterfly_mask<I, W, H>(true, std::make_integer_sequence<int, W>{});
  for (int i = 0; i < W; ++i) {
    if ((i & H) != 0) continue;
    typename Vec<T>::V a = r[i], b = r[i + H];
    r[i] = __builtin_shuffle(a, b, lo);
    r[i + H] = __builtin_shuffle(a, b, hi);
  }
  if constexpr (H > 1) transpose_stage<T, H / 2>(r);
}

template <typename T>
FI_INLINE void transpose(typename Vec<T>::V* r) {
  transpose_stage<T, Vec<T>::W / 2>(r);
}
#else
#define FI_HAVE_TRANSPOSE 0
#endif

// ---------------------------------------------------------------------------------------
// float32: Cephes-style polynomials, max error about 1 ulp on the ranges used here.
// ---------------------------------------------------------------------------------------
typedef Vec<float>::V vf;
typedef Vec<float>::I vi;

// exp(x) for x <= 88 (every caller passes x <= 0: exp(x − max), exp(−|u|), exp(γ log b));
// 0 below −87.3 (where the result would be subnormal), NaN stays NaN.
// t = x·log2 e + (1.5·2^23 + 127) holds n + 127, n = round(x·log2 e), in its low mantissa bits
// (floats near 1.5·2^23 are integers), so its bits less those of 1.5·2^23, shifted into the
// exponent field, are 2^n (1 <= n + 127 <= 254 here).
FI_INLINE vf vexp(vf x) {
  const vf lo = splat<vf>(-87.33654f);
  const vi under = x < lo;
  vf xc = select(under, lo, x);
  const vf magic = splat<vf>(12583039.0f);  // 1.5·2^23 + 127
  vf t = fmadd(xc, splat<vf>(1.44269504088896341f), magic);
  vf n = t - magic;
  vf r = fmadd(n, splat<vf>(-0.693359375f), xc);  // ln 2 in two parts: n · the high part is exact
  r = fmadd(n, splat<vf>(2.12194440e-4f), r);
  // exp(r) = 1 + r + r²·q(r) on |r| <= ln2 / 2, q of degree 4 fitted for relative error
  // (4e-9 in exact arithmetic; the result is within 1.01 ulp of exp over [−87, 0])
  vf p = splat<vf>(1.381461275741458e-3f);
  p = fmadd(p, r, splat<vf>(8.368710055947304e-3f));
  p = fmadd(p, r, splat<vf>(4.166838899254799e-2f));
  p = fmadd(p, r, splat<vf>(1.666652113199234e-1f));
  p = fmadd(p, r, splat<vf>(4.999999403953552e-1f));
  p = fmadd(p, r * r, r) + 1.0f;
  const vi scale = ((vi)t - 0x4B400000) << 23;  // 0x4B400000: the bits of 1.5·2^23
  return select(under, splat<vf>(0.0f), p * (vf)scale);
}

// log(x) for x positive, normal and finite, or NaN (which stays NaN).
FI_INLINE vf vlog_normal(vf x) {
  vi bits = (vi)x;
  vi e = ((bits >> 23) & 0xff) - 126;
  vf m = (vf)((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const vi small = m < 0.707106781186547524f;
  e = e + small;  // small lanes are -1
  vf t = select(small, m + m, m) - 1.0f;
  vf z = t * t;
  vf p = splat<vf>(7.0376836292e-2f);
  p = fmadd(p, t, splat<vf>(-1.1514610310e-1f));
  p = fmadd(p, t, splat<vf>(1.1676998740e-1f));
  p = fmadd(p, t, splat<vf>(-1.2420140846e-1f));
  p = fmadd(p, t, splat<vf>(1.4249322787e-1f));
  p = fmadd(p, t, splat<vf>(-1.6668057665e-1f));
  p = fmadd(p, t, splat<vf>(2.0000714765e-1f));
  p = fmadd(p, t, splat<vf>(-2.4999993993e-1f));
  p = fmadd(p, t, splat<vf>(3.3333331174e-1f));
  vf ef = __builtin_convertvector(e, vf);
  vf y = p * t * z;
  y = fmadd(ef, splat<vf>(-2.12194440e-4f), y);
  y = fmadd(splat<vf>(-0.5f), z, y);
  return fmadd(ef, splat<vf>(0.693359375f), t + y) + (x - x);  // x − x: NaN for NaN, else 0
}

// log(x) for any x: log 0 = −inf, subnormals exact, log of a negative = NaN, log inf = inf.
FI_INLINE vf vlog(vf x) {
  const vi sub = x < 1.17549435e-38f;
  vf res = vlog_normal(select(sub, x * 33554432.0f, x));  // 2^25: subnormals become normal
  res = select(sub, res - 17.328679514f, res);           // 25 ln 2
  const float inf = std::numeric_limits<float>::infinity();
  res = select(x == 0.0f, splat<vf>(-inf), res);
  res = select(x < 0.0f, splat<vf>(std::numeric_limits<float>::quiet_NaN()), res);
  return select(x == inf, x, res);
}

// log(1 + x) for 0 <= x <= 1 given u = 1 + x (rounded) and inv = 1 / u: the rounding error
// δ = (u − 1) − x of u is exact (Sterbenz) and log(1 + x) = log(u) − δ / u to first order.
FI_INLINE vf vlog1p(vf x, vf u, vf inv) {
  return vlog_normal(u) + (x - (u - 1.0f)) * inv;
}

FI_INLINE vf vlog1p(vf x) {
  vf u = x + 1.0f;
  return vlog1p(x, u, 1.0f / u);
}

// exp(x) − 1 for x <= 0 given u = vexp(x), accurate near 0 (Kahan: (u − 1) · x / log u). u is
// 0 or normal (vexp flushes below the normal range); u = 0 gives −1 whatever log u returns.
FI_INLINE vf vexpm1(vf x, vf u) {
  vf um1 = u - 1.0f;
  vf lu = vlog_normal(u);
  const vi one = u == 1.0f;
  vf res = um1 * (x / select(one, splat<vf>(1.0f), lu));
  res = select(one, x, res);
  return select(um1 == -1.0f, um1, res);
}

FI_INLINE vf vexpm1(vf x) { return vexpm1(x, vexp(x)); }

// ---------------------------------------------------------------------------------------
// float64: the arithmetic must be exact enough for gradcheck, so the lanes call libm.
// ---------------------------------------------------------------------------------------
typedef Vec<double>::V vd;

#define FI_LANEWISE(name, fn)                                         \
  FI_INLINE vd name(vd x) {                                           \
    vd r;                                                             \
    for (int i = 0; i < Vec<double>::W; ++i) r[i] = std::fn(x[i]);    \
    return r;                                                         \
  }
FI_LANEWISE(vexp, exp)
FI_LANEWISE(vlog, log)
FI_LANEWISE(vlog_normal, log)
FI_LANEWISE(vlog1p, log1p)
FI_LANEWISE(vexpm1, expm1)
#undef FI_LANEWISE

FI_INLINE vd vlog1p(vd x, vd /*u*/, vd /*inv*/) { return vlog1p(x); }
FI_INLINE vd vexpm1(vd x, vd /*u = exp(x)*/) { return vexpm1(x); }

}  // namespace simd
}  // namespace FI_ISA
}  // namespace cpu
}  // namespace fused_imbalance
