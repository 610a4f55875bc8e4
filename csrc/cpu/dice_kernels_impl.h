// The Dice family's block kernels (dice_kernels.h), compiled once per instruction set: the
// including file defines FI_ISA and FI_VECTOR_BYTES (see simd.h), as for loss_kernels_impl.h.
//
// Forward, per vector of W pixels: the max (and the argmax for confusion counts), then
// e_k = exp(x_k − max) into a block buffer with their sum; then, class by class over the whole
// block, P_k = Σ_p e_k/Σe (or its square) in a vector register, reduced once per class and block.
// The label-indexed sums (I, G, the cross-entropy) take one value per pixel (p_y, −log p_y), which the
// caller adds into its class. Backward, per vector: the max, then e_k with Σ e and
// q = Σ_k e_k·a_P[k] (Σ e_k²·a_P[k] with squared) in the same pass, then the gradient
// p_k (g_k − Σ_c p_c g_c) + a_ce (p_k − [k = y]) in one more. The block was just read, so the passes
// after the first hit the cache; the logits are read from memory once per pass over the tensor.
#pragma once

#include "dice_kernels.h"

#include "simd.h"

namespace fused_imbalance {
namespace cpu {
namespace FI_ISA {
namespace {

using namespace simd;

// The helpers below are those of loss_kernels_impl.h (labels, the label's logit, the compensated
// class sum, torch.argmax's running argmax), repeated: that header defines the loss kernels' exported
// functions and cannot be included twice.

template <typename T>
FI_INLINE typename Vec<T>::I dice_labels(const int32_t* y) {
  return __builtin_convertvector(load<typename Vec<T>::L>(y), typename Vec<T>::I);
}

// v[y_i * stride + i] for each lane i (class 0 where y_i < 0: a value of the lane's own pixel).
template <typename T>
FI_INLINE typename Vec<T>::V dice_gather(const T* v, int64_t stride, const int32_t* y) {
  typename Vec<T>::V r;
  for (int i = 0; i < Vec<T>::W; ++i) r[i] = v[int64_t(y[i] >= 0 ? y[i] : 0) * stride + i];
  return r;
}

// c[y_i] per lane (0 where y_i < 0): a per-class factor at each pixel's label.
template <typename T>
FI_INLINE typename Vec<T>::V dice_at_label(const T* c, const int32_t* y) {
  typename Vec<T>::V r;
  for (int i = 0; i < Vec<T>::W; ++i) r[i] = y[i] >= 0 ? c[y[i]] : T(0);
  return r;
}

// Σ of a per-class term over the class loop: plain sums of 16 terms added into a compensated total,
// so the error is about 18 ulps whatever C is, in an order fixed by k alone.
template <typename V>
struct DiceClassSum {
  V part, total, comp;
  int n;

  FI_INLINE DiceClassSum() : part(splat<V>(0)), total(splat<V>(0)), comp(splat<V>(0)), n(0) {}

  FI_INLINE void add(V v) {
    part += v;
    if (++n == 16) flush();
  }

  FI_INLINE void flush() {
    V zero = splat<V>(0);
    V yv = part - comp;
    V t = total + yv;
    comp = select((t - t) == zero, (t - total) - yv, zero);  // inf: no compensation (inf − inf = NaN)
    total = t;
    part = zero;
    n = 0;
  }

  FI_INLINE V result() {
    flush();
    return total;
  }
};

// The max of the class loop and, with AM, torch.argmax's first index of the largest logit (the
// first NaN when a pixel has one: the rare lanes that saw one are searched again).
template <typename T, bool AM>
FI_INLINE typename Vec<T>::V dice_max(const T* x, int64_t xs, int64_t C, int32_t* argmax) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  V m = load<V>(x);
  I am = splat<I>(0), nan = m != m;
  for (int64_t k = 1; k < C; ++k) {
    V v = load<V>(x + k * xs);
    I gt = v > m;
    m = select(gt, v, m);
    if constexpr (AM) {
      am = select(gt, splat<I>(k), am);
      nan |= v != v;
    }
  }
  if constexpr (AM) {
    for (int i = 0; i < Vec<T>::W; ++i) {
      if (nan[i] == 0) continue;
      int64_t k = 0;
      while (x[k * xs + i] == x[k * xs + i]) ++k;
      am[i] = k;
    }
    store(argmax, __builtin_convertvector(am, typename Vec<T>::L));
  }
  return m;
}

template <typename T, bool AM, bool CE>
void dice_fwd(const DiceFwdBlock<T>& b) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  constexpr int W = Vec<T>::W;
  const V zero = splat<V>(0);
  // per pixel: p = e_k · inv, with inv = 1/Σe kept in p_label until the class loop below needs it
  for (int64_t j = 0; j < b.P; j += W) {
    const T* x = b.x + j;
    I valid = dice_labels<T>(b.y + j) >= splat<I>(0);
    V m = dice_max<T, AM>(x, b.x_stride, b.C, b.argmax + j);
    DiceClassSum<V> sum;
    for (int64_t k = 0; k < b.C; ++k) {
      V e = vexp(load<V>(x + k * b.x_stride) - m);
      // an unlabelled lane (ignored, bad, padding) keeps 0: it adds nothing below, even where its
      // logits are inf or NaN
      store(b.ebuf + k * b.P + j, select(valid, e, zero));
      sum.add(e);
    }
    V se = sum.result();
    V inv = select(valid, splat<V>(1) / se, zero);
    store(b.p_label + j, inv);
    if constexpr (CE) {
      V l = dice_gather<T>(x, b.x_stride, b.y + j) - (m + vlog_normal(se));  // log p_y <= 0
      store(b.ce + j, select(valid, -l, zero));
    }
  }
  // Σ_p in 16 lanes whatever the vector width (pixel p adds into lane p % 16, then the lanes in
  // order): the same sum in the AVX2 and AVX-512 copies. P is a multiple of 16 (kBlockAlign).
  constexpr int K = 16 / W;
  for (int64_t k = 0; k < b.C; ++k) {
    const T* e = b.ebuf + k * b.P;
    V acc[K];
    for (int a = 0; a < K; ++a) acc[a] = zero;
    for (int64_t j = 0; j < b.P; j += 16) {
      for (int a = 0; a < K; ++a) {
        V p = load<V>(e + j + a * W) * load<V>(b.p_label + j + a * W);
        acc[a] += b.squared ? p * p : p;
      }
    }
    T s = T(0);
    for (int a = 0; a < K; ++a)
      for (int i = 0; i < W; ++i) s += acc[a][i];
    b.pred[k] = s;
  }
  for (int64_t j = 0; j < b.P; j += W)
    store(b.p_label + j, dice_gather<T>(b.ebuf + j, b.P, b.y + j) * load<V>(b.p_label + j));
}

template <typename T, bool SQUARED, bool CE>
void dice_bwd(const DiceBwdBlock<T>& b) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  constexpr int W = Vec<T>::W;
  const V zero = splat<V>(0);
  for (int64_t j = 0; j < b.P; j += W) {
    const T* x = b.x + j;
    T* eb = b.ebuf + j;
    I yv = dice_labels<T>(b.y + j);
    I valid = yv >= splat<I>(0);
    V m = dice_max<T, false>(x, b.x_stride, b.C, nullptr);
    DiceClassSum<V> sum, qsum;
    for (int64_t k = 0; k < b.C; ++k) {
      V e = vexp(load<V>(x + k * b.x_stride) - m);
      store(eb + k * b.P, e);
      sum.add(e);
      qsum.add((SQUARED ? e * e : e) * splat<V>(b.a_p[k]));
    }
    V inv = splat<V>(1) / sum.result();
    V ai_y = dice_at_label<T>(b.a_i, b.y + j);
    V p_y = dice_gather<T>(eb, b.P, b.y + j) * inv;
    // Σ_c p_c g_c, g_c = a_I[c]·[c = y] + a_P[c] (2 a_P[c] p_c with squared)
    V q = qsum.result() * inv;
    V dot = p_y * ai_y + (SQUARED ? splat<V>(2) * q * inv : q);
    V a = CE ? dice_at_label<T>(b.ce, b.y + j) : zero;
    V shift = a - dot;
    for (int64_t k = 0; k < b.C; ++k) {
      V p = load<V>(eb + k * b.P) * inv;
      V ap = splat<V>(b.a_p[k]);
      V gk = SQUARED ? splat<V>(2) * ap * p : ap;
      I lab = yv == splat<I>(k);
      V d = p * (gk + select(lab, splat<V>(b.a_i[k]), zero) + shift) - select(lab, a, zero);
      // an unlabelled lane gets an exact 0, even where its logits are inf or NaN
      store(b.g + k * b.g_stride + j, select(valid, d, zero));
    }
  }
}

}  // namespace

void dice_fwd_block(const DiceFwdBlock<float>& b) {
  if (b.argmax != nullptr) {
    if (b.ce != nullptr) dice_fwd<float, true, true>(b);
    else dice_fwd<float, true, false>(b);
  } else {
    if (b.ce != nullptr) dice_fwd<float, false, true>(b);
    else dice_fwd<float, false, false>(b);
  }
}

void dice_fwd_block(const DiceFwdBlock<double>& b) {
  if (b.argmax != nullptr) {
    if (b.ce != nullptr) dice_fwd<double, true, true>(b);
    else dice_fwd<double, true, false>(b);
  } else {
    if (b.ce != nullptr) dice_fwd<double, false, true>(b);
    else dice_fwd<double, false, false>(b);
  }
}

template <typename T>
FI_INLINE void dice_bwd_dispatch(const DiceBwdBlock<T>& b) {
  if (b.squared) {
    if (b.ce != nullptr) dice_bwd<T, true, true>(b);
    else dice_bwd<T, true, false>(b);
  } else {
    if (b.ce != nullptr) dice_bwd<T, false, true>(b);
    else dice_bwd<T, false, false>(b);
  }
}

void dice_bwd_block(const DiceBwdBlock<float>& b) { dice_bwd_dispatch(b); }
void dice_bwd_block(const DiceBwdBlock<double>& b) { dice_bwd_dispatch(b); }

}  // namespace FI_ISA
}  // namespace cpu
}  // namespace fused_imbalance
