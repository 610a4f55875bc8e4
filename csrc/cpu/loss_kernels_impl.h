// Per-block math of the CPU loss kernels (see loss_kernels.h for the data layout) and the row
// loops of the upsampled loss (resize_rows, blend_block, tap_sums), compiled
// once per instruction set: the including file defines FI_ISA (the namespace of this copy)
// and FI_VECTOR_BYTES (see simd.h), and loss_kernels.cpp picks a copy at run time.
//
// For every W pixels (one SIMD vector) the class loop runs over the C rows of the block
// while the per-pixel state (max, argmax, sum of exponentials) stays in registers; the
// block was just read from memory, so the second and third class loops hit the L1/L2 cache.
// Memory is read once per pass over the logits and the gradient is written once.
#pragma once

#include "loss_kernels.h"

#include "simd.h"

namespace fused_imbalance {
namespace cpu {
namespace FI_ISA {
namespace {

using namespace simd;

template <typename T>
FI_INLINE typename Vec<T>::I load_labels(const int32_t* y) {
  return __builtin_convertvector(load<typename Vec<T>::L>(y), typename Vec<T>::I);
}

// x[y_i * stride + i] for each lane i; lanes without a label read class 0, so that every
// lane computes with a logit of its own pixel (log p <= 0) and nothing else.
template <typename T>
FI_INLINE typename Vec<T>::V gather_label(const T* x, int64_t stride, const int32_t* y) {
  typename Vec<T>::V r;
  for (int i = 0; i < Vec<T>::W; ++i) r[i] = x[int64_t(y[i] >= 0 ? y[i] : 0) * stride + i];
  return r;
}

// Lanes without a label get an exact 0 gradient, even where their logits are inf or NaN.
template <typename T>
FI_INLINE typename Vec<T>::V zero_unlabelled(typename Vec<T>::I yv, typename Vec<T>::V g) {
  return select(yv >= splat<typename Vec<T>::I>(0), g, splat<typename Vec<T>::V>(0));
}

// The gradient of class k, pixels j .. j + W: stored into g, or (ACC: BwdBlock::acc0 set) added
// into the accumulators, o = fmadd(w, g, o).
template <typename T, bool ACC>
FI_INLINE void put_grad(const BwdBlock<T>& b, int64_t k, int64_t j, typename Vec<T>::V g) {
  using V = typename Vec<T>::V;
  if constexpr (!ACC) {
    store(b.g + j + k * b.g_stride, g);
  } else {
    T* a0 = b.acc0 + k * b.acc_stride + j;
    store(a0, fmadd(splat<V>(b.acc_w0), g, load<V>(a0)));
    if (b.acc1 != nullptr) {  // may be acc0 itself: then a second add
      T* a1 = b.acc1 + k * b.acc_stride + j;
      store(a1, fmadd(splat<V>(b.acc_w1), g, load<V>(a1)));
    }
  }
}

// b^γ for γ = 0, 1, 2 or general (GK = 3); b >= 0, and 0^γ = 0 for γ > 0.
template <int GK, typename V>
FI_INLINE V pow_gamma(V b, double gamma) {
  if constexpr (GK == 0) return splat<V>(1.0);
  if constexpr (GK == 1) return b;
  if constexpr (GK == 2) return b * b;
  return vexp(vlog(b) * splat<V>(gamma));  // log 0 = -inf, exp(-inf) = 0
}

// σ(u)^γ from log σ(u).
template <int GK, typename V>
FI_INLINE V pow_gamma_log(V sig, V log_sig, double gamma) {
  if constexpr (GK == 0) return splat<V>(1.0);
  if constexpr (GK == 1) return sig;
  if constexpr (GK == 2) return sig * sig;
  return vexp(log_sig * splat<V>(gamma));
}

// Σ_k of a per-class term over the class loop, accurate for any C: plain sums of kBlock terms
// are added into a compensated (Kahan) total, so the rounding error is about (kBlock + 2) ulps
// instead of C ulps (C = 40000 classes lose 4 digits of float32 in a plain running sum). The
// order is fixed by k alone, so results stay bit-identical run to run, across thread counts
// and across vector widths. Where the total is inf the compensation is dropped: (inf − inf)
// would otherwise turn an infinite sum into NaN.
template <typename V>
struct ClassSum {
  static constexpr int kBlock = 16;
  V part, total, comp;
  int n;

  FI_INLINE ClassSum() : part(splat<V>(0)), total(splat<V>(0)), comp(splat<V>(0)), n(0) {}

  FI_INLINE void add(V v) {
    part += v;
    if (++n == kBlock) flush();
  }

  FI_INLINE void flush() {
    V zero = splat<V>(0);
    V y = part - comp;
    V t = total + y;
    comp = select((t - t) == zero, (t - total) - y, zero);
    total = t;
    part = zero;
    n = 0;
  }

  FI_INLINE V result() {
    flush();
    return total;
  }
};

// Running max and argmax of the class loop, as torch.argmax: the first index of the largest
// logit (strict >), and the first NaN if a pixel has one. NaN is rare, so the loop only
// records that a lane saw one and finish() searches that lane again.
template <typename T>
struct ArgMax {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  V m;
  I am, nan;

  FI_INLINE explicit ArgMax(V v0) : m(v0), am(splat<I>(0)), nan(v0 != v0) {}

  FI_INLINE void update(V v, int64_t k) {
    I gt = v > m;
    m = select(gt, v, m);
    am = select(gt, splat<I>(k), am);
    nan |= v != v;
  }

  FI_INLINE I finish(const T* x, int64_t xs) {
    for (int i = 0; i < Vec<T>::W; ++i) {
      if (nan[i] == 0) continue;
      int64_t k = 0;
      while (x[k * xs + i] == x[k * xs + i]) ++k;
      am[i] = k;
    }
    return am;
  }
};

// Pass 1 of the softmax forwards: max and argmax.
template <typename T>
FI_INLINE void max_argmax(const T* x, int64_t xs, int64_t C, typename Vec<T>::V& m,
                          typename Vec<T>::I& am) {
  using V = typename Vec<T>::V;
  ArgMax<T> a(load<V>(x));
  for (int64_t k = 1; k < C; ++k) a.update(load<V>(x + k * xs), k);
  m = a.m;
  am = a.finish(x, xs);
}

template <typename T>
FI_INLINE typename Vec<T>::V row_max(const T* x, int64_t xs, int64_t C) {
  using V = typename Vec<T>::V;
  V m = load<V>(x);
  for (int64_t k = 1; k < C; ++k) {
    V v = load<V>(x + k * xs);
    m = select(v > m, v, m);
  }
  return m;
}

// AM: the block wants the argmax (FwdBlock::argmax set); without it the forwards skip its
// bookkeeping (the max alone where the loss needs one).
template <typename T, bool AM>
FI_INLINE void store_argmax(const FwdBlock<T>& b, int64_t j, typename Vec<T>::I am) {
  if constexpr (AM) store(b.argmax + j, __builtin_convertvector(am, typename Vec<T>::L));
}

template <typename T, bool AM>
FI_INLINE void finish_fwd(const FwdBlock<T>& b, int64_t j, typename Vec<T>::I yv,
                          typename Vec<T>::V loss, typename Vec<T>::I am) {
  using V = typename Vec<T>::V;
  store(b.loss + j, select(yv >= splat<typename Vec<T>::I>(0), loss, splat<V>(0)));
  store_argmax<T, AM>(b, j, am);
}

// The max (and, with AM, the argmax) of the class loop.
template <typename T, bool AM>
FI_INLINE void max_maybe_argmax(const T* x, int64_t xs, int64_t C, typename Vec<T>::V& m,
                                typename Vec<T>::I& am) {
  if constexpr (AM) {
    max_argmax<T>(x, xs, C, m, am);
  } else {
    m = row_max<T>(x, xs, C);
    am = splat<typename Vec<T>::I>(0);
  }
}

// ℓ = −(1 − p_y)^γ log p_y; 1 − p_y = −expm1(log p_y) keeps precision when p_y → 1.
// The focal transform of log p_y is a long chain of dependent operations per pixel; inside the
// class loop's iterations it would stall them, so it runs as a second pass over the block's
// pixels (independent lanes that pipeline), with log p_y kept in the loss buffer meanwhile.
template <typename T, int GK, bool AM>
void fwd_softmax_focal(const FwdBlock<T>& b) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  for (int64_t j = 0; j < b.P; j += Vec<T>::W) {
    const T* x = b.x + j;
    I yv = load_labels<T>(b.y + j);
    V m;
    I am;
    max_maybe_argmax<T, AM>(x, b.x_stride, b.C, m, am);
    ClassSum<V> sum;
    for (int64_t k = 0; k < b.C; ++k) sum.add(vexp(load<V>(x + k * b.x_stride) - m));
    V lse = m + vlog_normal(sum.result());
    if (b.lse != nullptr) store(b.lse + j, lse);
    V l = gather_label<T>(x, b.x_stride, b.y + j) - lse;  // log p_y <= 0
    if constexpr (GK == 0) {
      finish_fwd<T, AM>(b, j, yv, -l, am);
    } else {
      store(b.loss + j, l);
      store_argmax<T, AM>(b, j, am);
    }
  }
  if constexpr (GK != 0) {
    for (int64_t j = 0; j < b.P; j += Vec<T>::W) {
      V l = load<V>(b.loss + j);
      V loss = -(pow_gamma<GK>(-vexpm1(l), b.gamma) * l);
      store(b.loss + j, select(load_labels<T>(b.y + j) >= splat<I>(0), loss, splat<V>(0)));
    }
  }
}

// Per class, with u = x_k for t_k = 0 and u = −x_k for t_k = 1, the sigmoid focal term is
// h(u) = σ(u)^γ · softplus(u), and dℓ/dx_k = ±h'(u) with
// h'(u) = σ(u)^γ (γ (1 − σ(u)) softplus(u) + σ(u)). Both from e = exp(−|u|) without overflow.
template <typename T, int GK>
FI_INLINE typename Vec<T>::V sigmoid_focal_term(typename Vec<T>::V u, double gamma) {
  using V = typename Vec<T>::V;
  V zero = splat<V>(0);
  typename Vec<T>::I pos = u >= zero;
  V e = vexp(select(pos, -u, u));
  V e1 = e + 1;
  V inv = splat<V>(1) / e1;
  V lp = vlog1p(e, e1, inv);
  V sp = select(pos, u, zero) + lp;  // softplus(u)
  if constexpr (GK == 0) {
    return sp;
  } else {
    V sig = select(pos, splat<V>(1), e) * inv;
    V log_sig = select(pos, zero, u) - lp;  // −softplus(−u)
    return pow_gamma_log<GK>(sig, log_sig, gamma) * sp;
  }
}

template <typename T, int GK>
FI_INLINE typename Vec<T>::V sigmoid_focal_grad(typename Vec<T>::V u, double gamma) {
  using V = typename Vec<T>::V;
  V zero = splat<V>(0);
  typename Vec<T>::I pos = u >= zero;
  V e = vexp(select(pos, -u, u));
  V e1 = e + 1;
  V inv = splat<V>(1) / e1;
  V sig = select(pos, splat<V>(1), e) * inv;
  if constexpr (GK == 0) {
    return sig;
  } else {
    V sig_bar = select(pos, e, splat<V>(1)) * inv;  // 1 − σ(u)
    V lp = vlog1p(e, e1, inv);
    V sp = select(pos, u, zero) + lp;
    V log_sig = select(pos, zero, u) - lp;
    V g = splat<V>(gamma);
    return pow_gamma_log<GK>(sig, log_sig, gamma) * (g * sig_bar * sp + sig);
  }
}

template <typename T, int GK, bool AM>
void fwd_sigmoid_focal(const FwdBlock<T>& b) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  for (int64_t j = 0; j < b.P; j += Vec<T>::W) {
    const T* x = b.x + j;
    I yv = load_labels<T>(b.y + j);
    V v0 = load<V>(x);
    ArgMax<T> a(v0);
    ClassSum<V> hs;
    hs.add(sigmoid_focal_term<T, GK>(select(yv == splat<I>(0), -v0, v0), b.gamma));
    for (int64_t k = 1; k < b.C; ++k) {
      V v = load<V>(x + k * b.x_stride);
      if constexpr (AM) a.update(v, k);
      hs.add(sigmoid_focal_term<T, GK>(select(yv == splat<I>(k), -v, v), b.gamma));
    }
    finish_fwd<T, AM>(b, j, yv, hs.result(), AM ? a.finish(x, b.x_stride) : a.am);
  }
}

// ℓ = ½ Σ_k (x_k − t_k)², t_k = tvals[y]·[k = y].
template <typename T, bool AM>
void fwd_mse_logits(const FwdBlock<T>& b) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  for (int64_t j = 0; j < b.P; j += Vec<T>::W) {
    const T* x = b.x + j;
    I yv = load_labels<T>(b.y + j);
    V tv = load<V>(b.tvy + j);
    V zero = splat<V>(0);
    V v0 = load<V>(x);
    ArgMax<T> a(v0);
    V d = v0 - select(yv == splat<I>(0), tv, zero);
    ClassSum<V> ss;
    ss.add(d * d);
    for (int64_t k = 1; k < b.C; ++k) {
      V v = load<V>(x + k * b.x_stride);
      if constexpr (AM) a.update(v, k);
      d = v - select(yv == splat<I>(k), tv, zero);
      ss.add(d * d);
    }
    finish_fwd<T, AM>(b, j, yv, splat<V>(0.5) * ss.result(), AM ? a.finish(x, b.x_stride) : a.am);
  }
}

// ℓ = ½ Σ_k (p_k − t_k)² = ½ (Σ_{k≠y} e_k² / s² + (p_y − t_y)²), e = exp(x − max), s = Σ e.
template <typename T, bool AM>
void fwd_mse_softmax(const FwdBlock<T>& b) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  for (int64_t j = 0; j < b.P; j += Vec<T>::W) {
    const T* x = b.x + j;
    I yv = load_labels<T>(b.y + j);
    V m;
    I am;
    max_maybe_argmax<T, AM>(x, b.x_stride, b.C, m, am);
    V zero = splat<V>(0);
    ClassSum<V> se, se2;
    for (int64_t k = 0; k < b.C; ++k) {
      V e = vexp(load<V>(x + k * b.x_stride) - m);
      se.add(e);
      se2.add(select(yv == splat<I>(k), zero, e * e));
    }
    V inv = splat<V>(1) / se.result();
    V dy = vexp(gather_label<T>(x, b.x_stride, b.y + j) - m) * inv - load<V>(b.tvy + j);
    finish_fwd<T, AM>(b, j, yv, splat<V>(0.5) * (se2.result() * inv * inv + dy * dy), am);
  }
}

template <typename T, bool AM>
void fwd_stats(const FwdBlock<T>& b) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  for (int64_t j = 0; j < b.P; j += Vec<T>::W) {
    V m;
    I am = splat<I>(0);
    if constexpr (AM) max_argmax<T>(b.x + j, b.x_stride, b.C, m, am);
    finish_fwd<T, AM>(b, j, load_labels<T>(b.y + j), splat<V>(0), am);
  }
}

// a = coef · dℓ/d(−log p_y) = coef · (1−p)^γ (1 − γ p log p / (1−p)), from l = log p_y.
template <typename T, int GK>
FI_INLINE typename Vec<T>::V focal_factor(typename Vec<T>::V a, typename Vec<T>::V l, double gamma) {
  using V = typename Vec<T>::V;
  if constexpr (GK == 0) {
    return a;
  } else {
    V p = vexp(l);
    V omp = -vexpm1(l, p);
    // log p / (1 − p) → −1 as p → 1, so the (1 − p)^(γ−1) factor never divides by 0
    V r = select(omp > splat<V>(0), l / select(omp > splat<V>(0), omp, splat<V>(1)), splat<V>(-1));
    return a * pow_gamma<GK>(omp, gamma) * (splat<V>(1) - splat<V>(gamma) * p * r);
  }
}

// With the forward's log-sum-exp: p_k = exp(x_k − lse) and the gradient in one pass. The focal
// factors of the block's pixels come first, in a pass of their own (see fwd_softmax_focal).
template <typename T, int GK, bool ACC>
void bwd_softmax_focal_lse(const BwdBlock<T>& b) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  if constexpr (GK != 0) {
    for (int64_t j = 0; j < b.P; j += Vec<T>::W) {
      V l = gather_label<T>(b.x + j, b.x_stride, b.y + j) - load<V>(b.lse + j);
      store(b.pix + j, focal_factor<T, GK>(load<V>(b.coef + j), l, b.gamma));
    }
  }
  const T* factor = GK != 0 ? b.pix : b.coef;
  for (int64_t j = 0; j < b.P; j += Vec<T>::W) {
    const T* x = b.x + j;
    I yv = load_labels<T>(b.y + j);
    V lse = load<V>(b.lse + j);
    V a = load<V>(factor + j);
    for (int64_t k = 0; k < b.C; ++k) {
      V gk = zero_unlabelled<T>(yv, a * vexp(load<V>(x + k * b.x_stride) - lse));
      put_grad<T, ACC>(b, k, j, select(yv == splat<I>(k), gk - a, gk));
    }
  }
}

// Where the softmax backwards keep e_k = exp(x_k − m) between passes: (pointer, class stride).
template <typename T>
FI_INLINE std::pair<T*, int64_t> exp_buffer(const BwdBlock<T>& b) {
  if (b.ebuf != nullptr) return {b.ebuf, b.P};
  return {b.g, b.g_stride};
}

// grad_k = a (p_k − [k = y]) = ai e_k − a [k = y] with e_k (exp_buffer) = exp(x_k − m), ai = a / Σ e.
template <typename T, bool ACC>
FI_INLINE void softmax_grad_pass(const BwdBlock<T>& b, int64_t j, typename Vec<T>::V a, typename Vec<T>::V ai) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  T* g = b.g + j;
  const auto [eb, es] = exp_buffer(b);
  const T* e = eb + j;
  I yv = load_labels<T>(b.y + j);
  if constexpr (ACC) {
    // the label's −a before the gradient is weighted: (a_i e_y − a) as below, then w·g
    for (int64_t k = 0; k < b.C; ++k) {
      V gk = zero_unlabelled<T>(yv, ai * load<V>(e + k * es));
      put_grad<T, true>(b, k, j, select(yv == splat<I>(k), gk - a, gk));
    }
  } else {
    for (int64_t k = 0; k < b.C; ++k) store(g + k * b.g_stride, zero_unlabelled<T>(yv, ai * load<V>(e + k * es)));
    for (int i = 0; i < Vec<T>::W; ++i) {
      int32_t y = b.y[j + i];
      if (y >= 0) g[int64_t(y) * b.g_stride + i] -= a[i];
    }
  }
}

// grad_k = a (p_k − [k = y]), a as in focal_factor. For γ != 0 three passes over the block's
// pixels: the exponentials (into g) with log p_y and Σ e (into pix), the focal factors, then the
// gradient (see fwd_softmax_focal).
template <typename T, int GK, bool ACC>
void bwd_softmax_focal(const BwdBlock<T>& b) {
  using V = typename Vec<T>::V;
  if (b.lse != nullptr) return bwd_softmax_focal_lse<T, GK, ACC>(b);
  const auto [eb, es] = exp_buffer(b);
  for (int64_t j = 0; j < b.P; j += Vec<T>::W) {
    const T* x = b.x + j;
    V m = row_max<T>(x, b.x_stride, b.C);
    ClassSum<V> sum;
    for (int64_t k = 0; k < b.C; ++k) {
      V e = vexp(load<V>(x + k * b.x_stride) - m);
      store(eb + j + k * es, e);
      sum.add(e);
    }
    V se = sum.result();
    if constexpr (GK == 0) {
      V a = load<V>(b.coef + j);
      softmax_grad_pass<T, ACC>(b, j, a, a / se);
    } else {
      store(b.pix + j, gather_label<T>(x, b.x_stride, b.y + j) - (m + vlog_normal(se)));  // log p_y
      store(b.pix + b.P + j, se);
    }
  }
  if constexpr (GK != 0) {
    for (int64_t j = 0; j < b.P; j += Vec<T>::W)
      store(b.pix + j, focal_factor<T, GK>(load<V>(b.coef + j), load<V>(b.pix + j), b.gamma));
    for (int64_t j = 0; j < b.P; j += Vec<T>::W) {
      V a = load<V>(b.pix + j);
      softmax_grad_pass<T, ACC>(b, j, a, a / load<V>(b.pix + b.P + j));
    }
  }
}

template <typename T, int GK, bool ACC>
void bwd_sigmoid_focal(const BwdBlock<T>& b) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  for (int64_t j = 0; j < b.P; j += Vec<T>::W) {
    I yv = load_labels<T>(b.y + j);
    V cf = load<V>(b.coef + j);
    for (int64_t k = 0; k < b.C; ++k) {
      V v = load<V>(b.x + j + k * b.x_stride);
      I t = yv == splat<I>(k);
      V h = sigmoid_focal_grad<T, GK>(select(t, -v, v), b.gamma);
      put_grad<T, ACC>(b, k, j, zero_unlabelled<T>(yv, cf * select(t, -h, h)));
    }
  }
}

template <typename T, bool ACC>
void bwd_mse_logits(const BwdBlock<T>& b) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  for (int64_t j = 0; j < b.P; j += Vec<T>::W) {
    I yv = load_labels<T>(b.y + j);
    V cf = load<V>(b.coef + j);
    V tv = load<V>(b.tvy + j);
    for (int64_t k = 0; k < b.C; ++k) {
      V v = load<V>(b.x + j + k * b.x_stride);
      V d = v - select(yv == splat<I>(k), tv, splat<V>(0));
      put_grad<T, ACC>(b, k, j, zero_unlabelled<T>(yv, cf * d));
    }
  }
}

// grad_k = coef · p_k (d_k − Σ_i p_i d_i), d = p − t, Σ_i p_i d_i = Σ p² − p_y t_y.
template <typename T, bool ACC>
void bwd_mse_softmax(const BwdBlock<T>& b) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  const auto [eb, es] = exp_buffer(b);
  for (int64_t j = 0; j < b.P; j += Vec<T>::W) {
    const T* x = b.x + j;
    T* e_j = eb + j;
    I yv = load_labels<T>(b.y + j);
    V zero = splat<V>(0);
    V m = row_max<T>(x, b.x_stride, b.C);
    V ey = zero;
    ClassSum<V> sum, sum2;
    for (int64_t k = 0; k < b.C; ++k) {
      V e = vexp(load<V>(x + k * b.x_stride) - m);
      store(e_j + k * es, e);
      sum.add(e);
      sum2.add(e * e);
      ey = select(yv == splat<I>(k), e, ey);
    }
    V se2 = sum2.result();
    V inv = splat<V>(1) / sum.result();
    V tv = load<V>(b.tvy + j);
    V spd = se2 * inv * inv - ey * inv * tv;
    V cf = load<V>(b.coef + j);
    for (int64_t k = 0; k < b.C; ++k) {
      V p = load<V>(e_j + k * es) * inv;
      put_grad<T, ACC>(b, k, j, zero_unlabelled<T>(yv, cf * p * (p - select(yv == splat<I>(k), tv, zero) - spd)));
    }
  }
}

template <typename T, bool ACC>
void bwd_zero(const BwdBlock<T>& b) {
  if constexpr (ACC) {
    for (int64_t k = 0; k < b.C; ++k)
      for (int64_t j = 0; j < b.P; j += Vec<T>::W) put_grad<T, true>(b, k, j, splat<typename Vec<T>::V>(0));
  } else {
    for (int64_t k = 0; k < b.C; ++k)
      for (int64_t p = 0; p < b.P; ++p) b.g[k * b.g_stride + p] = T(0);
  }
}

template <typename T, template <typename, int> class F, typename B>
FI_INLINE void by_gamma(const B& b) {
  if (b.gamma == 0.0) F<T, 0>::run(b);
  else if (b.gamma == 1.0) F<T, 1>::run(b);
  else if (b.gamma == 2.0) F<T, 2>::run(b);
  else F<T, 3>::run(b);
}

template <bool AM>
struct Fwd {
  template <typename T, int GK>
  struct SoftmaxFocal {
    static FI_INLINE void run(const FwdBlock<T>& b) { fwd_softmax_focal<T, GK, AM>(b); }
  };
  template <typename T, int GK>
  struct SigmoidFocal {
    static FI_INLINE void run(const FwdBlock<T>& b) { fwd_sigmoid_focal<T, GK, AM>(b); }
  };
};

template <bool ACC>
struct Bwd {
  template <typename T, int GK>
  struct SoftmaxFocal {
    static FI_INLINE void run(const BwdBlock<T>& b) { bwd_softmax_focal<T, GK, ACC>(b); }
  };
  template <typename T, int GK>
  struct SigmoidFocal {
    static FI_INLINE void run(const BwdBlock<T>& b) { bwd_sigmoid_focal<T, GK, ACC>(b); }
  };
};

template <typename T, bool AM>
FI_INLINE void fwd_dispatch_am(int64_t mode, const FwdBlock<T>& b) {
  switch (mode) {
    case kSoftmaxFocal: by_gamma<T, Fwd<AM>::template SoftmaxFocal>(b); break;
    case kSigmoidFocal: by_gamma<T, Fwd<AM>::template SigmoidFocal>(b); break;
    case kMseLogits: fwd_mse_logits<T, AM>(b); break;
    case kMseSoftmax: fwd_mse_softmax<T, AM>(b); break;
    default: fwd_stats<T, AM>(b); break;
  }
}

template <typename T>
FI_INLINE void fwd_dispatch(int64_t mode, const FwdBlock<T>& b) {
  if (b.argmax != nullptr) fwd_dispatch_am<T, true>(mode, b);
  else fwd_dispatch_am<T, false>(mode, b);
}

template <typename T, bool ACC>
FI_INLINE void bwd_dispatch_acc(int64_t mode, const BwdBlock<T>& b) {
  switch (mode) {
    case kSoftmaxFocal: by_gamma<T, Bwd<ACC>::template SoftmaxFocal>(b); break;
    case kSigmoidFocal: by_gamma<T, Bwd<ACC>::template SigmoidFocal>(b); break;
    case kMseLogits: bwd_mse_logits<T, ACC>(b); break;
    case kMseSoftmax: bwd_mse_softmax<T, ACC>(b); break;
    default: bwd_zero<T, ACC>(b); break;
  }
}

template <typename T>
FI_INLINE void bwd_dispatch(int64_t mode, const BwdBlock<T>& b) {
  if (b.acc0 != nullptr) bwd_dispatch_acc<T, true>(mode, b);
  else bwd_dispatch_acc<T, false>(mode, b);
}

// W × W tiles through registers; the classes beyond the last whole tile and the pixels
// beyond the last whole group of W one by one.
template <typename T>
void rows_to_block_impl(const T* rows, int64_t ps, int64_t cnt, int64_t C, T* block, int64_t P) {
  constexpr int W = Vec<T>::W;
  using V = typename Vec<T>::V;
  int64_t p0 = 0;
#if FI_HAVE_TRANSPOSE
  for (; p0 + W <= cnt; p0 += W) {
    int64_t k0 = 0;
    for (; k0 + W <= C; k0 += W) {
      V r[W];
      for (int i = 0; i < W; ++i) r[i] = load<V>(rows + (p0 + i) * ps + k0);
      transpose<T>(r);
      for (int i = 0; i < W; ++i) store(block + (k0 + i) * P + p0, r[i]);
    }
    for (int i = 0; i < W; ++i)
      for (int64_t k = k0; k < C; ++k) block[k * P + p0 + i] = rows[(p0 + i) * ps + k];
  }
#endif
  for (int64_t p = p0; p < cnt; ++p)
    for (int64_t k = 0; k < C; ++k) block[k * P + p] = rows[p * ps + k];
}

template <typename T>
void block_to_rows_impl(const T* block, int64_t P, int64_t cnt, int64_t C, T* rows, int64_t ps) {
  constexpr int W = Vec<T>::W;
  using V = typename Vec<T>::V;
  int64_t p0 = 0;
#if FI_HAVE_TRANSPOSE
  for (; p0 + W <= cnt; p0 += W) {
    int64_t k0 = 0;
    for (; k0 + W <= C; k0 += W) {
      V r[W];
      for (int i = 0; i < W; ++i) r[i] = load<V>(block + (k0 + i) * P + p0);
      transpose<T>(r);
      for (int i = 0; i < W; ++i) store(rows + (p0 + i) * ps + k0, r[i]);
    }
    for (int i = 0; i < W; ++i)
      for (int64_t k = k0; k < C; ++k) rows[(p0 + i) * ps + k] = block[k * P + p0 + i];
  }
#endif
  for (int64_t p = p0; p < cnt; ++p)
    for (int64_t k = 0; k < C; ++k) rows[p * ps + k] = block[k * P + p];
}

// The horizontal pass of the resize (loss_kernels.h: resize_rows). An upsampling takes the
// sources of W outputs from a window of W consecutive elements: one vector load and one lane
// shuffle per tap instead of 2·W scalar loads. The window, its lane indices and the weights of
// a vector of outputs are the same for every class, so the class loop is the inner one. The
// outputs whose sources do not fit one window (a downsampling, the last ones when w < W) go one
// by one. Either way each output is src[i0]·w0 + src[i1]·w1 with the same two products and
// sum, so the results are the same.
template <typename T>
void resize_rows_impl(const T* src, int64_t C, int64_t w, const int32_t* i0, const int32_t* i1, const T* w0,
                      const T* w1, bool nearest, T* d, int64_t ds, int64_t n) {
  constexpr int W = Vec<T>::W;
  auto one = [&](int64_t X) {
    for (int64_t k = 0; k < C; ++k) {
      const T* s = src + k * w;
      d[k * ds + X] = nearest ? s[i0[X]] : s[i0[X]] * w0[X] + s[i1[X]] * w1[X];
    }
  };
  int64_t X = 0;
#if FI_HAVE_TRANSPOSE  // GCC: __builtin_shuffle with lane indices from memory
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  if (w >= W) {
    for (; X + W <= n; X += W) {
      // i0, i1 nondecreasing: every source of these W outputs is in [base, i1[X + W − 1]]
      const int64_t base = i0[X] < w - W ? i0[X] : w - W;  // int32 lanes: w < 2^31
      if (i1[X + W - 1] - base >= W) {
        for (int64_t q = X; q < X + W; ++q) one(q);
        continue;
      }
      const I s0 = load_labels<T>(i0 + X) - splat<I>(base);
      if (nearest) {
        for (int64_t k = 0; k < C; ++k) store(d + k * ds + X, __builtin_shuffle(load<V>(src + k * w + base), s0));
        continue;
      }
      const I s1 = load_labels<T>(i1 + X) - splat<I>(base);
      const V a0 = load<V>(w0 + X), a1 = load<V>(w1 + X);
      for (int64_t k = 0; k < C; ++k) {
        const V win = load<V>(src + k * w + base);
        store(d + k * ds + X, __builtin_shuffle(win, s0) * a0 + __builtin_shuffle(win, s1) * a1);
      }
    }
  }
#endif
  for (; X < n; ++X) one(X);
}

template <typename T>
void blend_block_impl(const T* a, const T* b, int64_t s, T w0, T w1, int64_t C, T* d, int64_t P) {
  for (int64_t k = 0; k < C; ++k, a += s, b += s, d += P)
    for (int64_t p = 0; p < P; ++p) d[p] = a[p] * w0 + b[p] * w1;
}

template <typename T>
void axpy_row_impl(T* o, const T* g, T w, int64_t n) {
  for (int64_t p = 0; p < n; ++p) o[p] += w * g[p];
}

template <typename T>
void tap_sums_impl(const T* v, int64_t C, const int64_t* start, const int64_t* tX, const T* tw, int64_t w,
                   T* out) {
  for (int64_t x = 0; x < w; ++x) {
    T* o = out + x * C;
    for (int64_t k = 0; k < C; ++k) o[k] = T(0);
    for (int64_t t = start[x]; t < start[x + 1]; ++t) axpy_row_impl(o, v + tX[t] * C, tw[t], C);
  }
}

}  // namespace

void loss_fwd_block(int64_t mode, const FwdBlock<float>& b) { fwd_dispatch(mode, b); }
void loss_fwd_block(int64_t mode, const FwdBlock<double>& b) { fwd_dispatch(mode, b); }
void loss_bwd_block(int64_t mode, const BwdBlock<float>& b) { bwd_dispatch(mode, b); }
void loss_bwd_block(int64_t mode, const BwdBlock<double>& b) { bwd_dispatch(mode, b); }
void rows_to_block(const float* rows, int64_t ps, int64_t cnt, int64_t C, float* block, int64_t P) {
  rows_to_block_impl(rows, ps, cnt, C, block, P);
}
void rows_to_block(const double* rows, int64_t ps, int64_t cnt, int64_t C, double* block,
                   int64_t P) {
  rows_to_block_impl(rows, ps, cnt, C, block, P);
}
void block_to_rows(const float* block, int64_t P, int64_t cnt, int64_t C, float* rows, int64_t ps) {
  block_to_rows_impl(block, P, cnt, C, rows, ps);
}
void block_to_rows(const double* block, int64_t P, int64_t cnt, int64_t C, double* rows,
                   int64_t ps) {
  block_to_rows_impl(block, P, cnt, C, rows, ps);
}

void resize_rows(const float* src, int64_t C, int64_t w, const int32_t* i0, const int32_t* i1, const float* w0,
                 const float* w1, bool nearest, float* d, int64_t ds, int64_t n) {
  resize_rows_impl(src, C, w, i0, i1, w0, w1, nearest, d, ds, n);
}
void resize_rows(const double* src, int64_t C, int64_t w, const int32_t* i0, const int32_t* i1,
                 const double* w0, const double* w1, bool nearest, double* d, int64_t ds, int64_t n) {
  resize_rows_impl(src, C, w, i0, i1, w0, w1, nearest, d, ds, n);
}
void blend_block(const float* a, const float* b, int64_t s, float w0, float w1, int64_t C, float* d, int64_t P) {
  blend_block_impl(a, b, s, w0, w1, C, d, P);
}
void blend_block(const double* a, const double* b, int64_t s, double w0, double w1, int64_t C, double* d,
                 int64_t P) {
  blend_block_impl(a, b, s, w0, w1, C, d, P);
}
void tap_sums(const float* v, int64_t C, const int64_t* start, const int64_t* tX, const float* tw, int64_t w,
              float* out) {
  tap_sums_impl(v, C, start, tX, tw, w, out);
}
void tap_sums(const double* v, int64_t C, const int64_t* start, const int64_t* tX, const double* tw,
              int64_t w, double* out) {
  tap_sums_impl(v, C, start, tX, tw, w, out);
}

}  // namespace FI_ISA
}  // namespace cpu
}  // namespace fused_imbalance
