// CPU implementation of fused_imbalance::cpp_ohem_fwd / cpp_ohem_bwd, the OHEM cross-entropy
// (contract: fused_imbalance/ops/ohem.py; definition: reference.ohem_cross_entropy), also called
// directly by an eager call (fused_imbalance.cpp).
//
// The forward is one call that runs, in order:
//   1. the cross-entropy pass of the loss op (loss_cpu.cpp, or upsample_cpu.cpp on low-resolution
//      logits), per-pixel output: ℓ_n = −log p_n at valid pixels, the confusion counts, the bad labels;
//   2. an O(N) pass: p_n = exp(−ℓ_n) at valid pixels, −1 elsewhere (the op's `pn`, kept for the
//      backward), and ℓ_n ← w_{y_n} ℓ_n in place when there are class weights;
//   3. the exact selection of the rank-th smallest p_n (select_cpu.cpp: radix digits, no sort), and
//      threshold = max(it, thresh), NaN when it is NaN;
//   4. an O(N) pass: the sum and the number of the kept pixels (p_n < threshold, strictly), or, for
//      "none", ℓ_n set to 0 at the pixels not kept.
// The backward makes the per-pixel upstream factor g_n (the upstream gradient times the mean's factor
// at a kept pixel, 0 elsewhere) from the stored p_n and threshold (an O(N) pass), then runs the loss
// op's backward with it: one read of the logits, one write of the gradient. The kept set is decided
// on the stored p_n in both directions, so the backward keeps exactly the pixels the forward kept.
//
// Chunks of the O(N) passes depend only on N, and their sums are added in chunk order: the result is
// bit-identical run to run and for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "../dispatch.h"
#include "op_common.h"

namespace fused_imbalance {
namespace cpu {

using at::Tensor;

// The ops this one is built on (loss_cpu.cpp, upsample_cpu.cpp, select_cpu.cpp).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cpp_loss_fwd_cpu(
    const Tensor& x, const Tensor& target, const std::optional<Tensor>& weight, const std::optional<Tensor>& tvals,
    const std::optional<Tensor>& confusion, int64_t mode, double gamma, int64_t ignore_index, int64_t reduction,
    int64_t weighting, bool need_tp, bool validate, bool need_lse);
Tensor cpp_loss_bwd_cpu(const Tensor& x, const Tensor& target, const std::optional<Tensor>& grad,
                        const std::optional<Tensor>& scale, const std::optional<Tensor>& tvals,
                        const std::optional<Tensor>& lse, int64_t mode, double gamma, int64_t ignore_index);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cpp_upsample_loss_fwd_cpu(
    const Tensor& x, const Tensor& target, int64_t interp, bool align_corners, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& tvals, const std::optional<Tensor>& confusion, int64_t mode, double gamma,
    int64_t ignore_index, int64_t reduction, int64_t weighting, bool need_tp, bool validate, bool need_lse);
Tensor cpp_upsample_loss_bwd_cpu(const Tensor& x, const Tensor& target, int64_t interp, bool align_corners,
                                 const std::optional<Tensor>& grad, const std::optional<Tensor>& scale,
                                 const std::optional<Tensor>& tvals, const std::optional<Tensor>& lse, int64_t mode,
                                 double gamma, int64_t ignore_index);
double select_kth_value(const Tensor& values, int64_t k);

namespace {

constexpr int64_t kChunk = int64_t(1) << 15;  // pixels per chunk of the O(N) passes

int64_t chunks_of(int64_t n) { return (n + kChunk - 1) / kChunk; }

// p_n = exp(−ℓ_n) at valid pixels and −1 elsewhere; ℓ_n ← w_{y_n} ℓ_n with class weights.
template <typename T, typename L>
void label_probabilities(T* pl, const L* t, const T* w, T* p, int64_t N, int64_t C, int64_t ignore_index) {
  at::parallel_for(0, chunks_of(N), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t n = c0 * kChunk, e = std::min(N, c1 * kChunk); n < e; ++n) {
      const int64_t v = static_cast<int64_t>(t[n]);
      const bool valid = v != ignore_index && v >= 0 && v < C;
      p[n] = valid ? std::exp(-pl[n]) : T(-1);
      if (w != nullptr && valid) pl[n] *= w[v];
    }
  });
}

// The kept pixels' sum (in double, chunk sums added in chunk order) and number; with `clear`, the
// per-pixel losses of the pixels not kept set to 0 (the "none" output). Selected, not multiplied: a
// pixel left out may have an infinite loss (p = 0) or, weighted, a NaN one.
template <typename T>
std::pair<double, int64_t> kept_sum(T* pl, const T* p, T thr, int64_t N, bool clear) {
  const int64_t chunks = chunks_of(N);
  std::vector<double> sums(chunks, 0.0);
  std::vector<int64_t> counts(chunks, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double s = 0.0;
      int64_t k = 0;
      for (int64_t n = c * kChunk, e = std::min(N, (c + 1) * kChunk); n < e; ++n) {
        const bool kept = p[n] >= T(0) && p[n] < thr;  // p = −1: not valid; NaN: never below
        const T v = kept ? pl[n] : T(0);
        s += static_cast<double>(v);
        k += kept;
        if (clear) pl[n] = v;
      }
      sums[c] = s;
      counts[c] = k;
    }
  });
  double total = 0.0;
  int64_t kept = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    total += sums[c];
    kept += counts[c];
  }
  return {total, kept};
}

// g_n = G_n · factor at the kept pixels (G: the upstream gradient, one value or one per pixel), 0 elsewhere.
template <typename T>
void upstream_factors(const T* p, T thr, T factor, const T* G, int64_t G_stride, T* g, int64_t N) {
  at::parallel_for(0, chunks_of(N), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t n = c0 * kChunk, e = std::min(N, c1 * kChunk); n < e; ++n) {
      const bool kept = p[n] >= T(0) && p[n] < thr;
      g[n] = kept ? (G != nullptr ? G[n * G_stride] : T(1)) * factor : T(0);
    }
  });
}

void check_ohem_args(const Tensor& x, const Tensor& target, int64_t interp, double thresh, int64_t rank,
                     int64_t reduction) {
  TORCH_CHECK(x.device().is_cpu() && target.device().is_cpu(), "fused_imbalance cpp ops: tensors must be on the CPU");
  TORCH_CHECK(interp >= -1 && interp <= 1, "fused_imbalance: interp must be -1 (none), 0 (nearest) or 1 (bilinear)");
  TORCH_CHECK(thresh >= 0.0 && thresh <= 1.0, "fused_imbalance: thresh must be in [0, 1], got ", thresh);
  TORCH_CHECK(rank >= 0, "fused_imbalance: rank must be >= 0, got ", rank);
  TORCH_CHECK(reduction == kMean || reduction == kSum || reduction == kNone,
              "fused_imbalance: the OHEM reduction must be mean, sum or none, got ", reduction);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cpp_ohem_fwd_cpu(
    const Tensor& x, const Tensor& target_in, int64_t interp, bool align_corners,
    const std::optional<Tensor>& weight_in, const std::optional<Tensor>& confusion, double thresh, int64_t rank,
    int64_t ignore_index, int64_t reduction, bool mean_over_all, bool validate, bool need_lse) {
  check_ohem_args(x, target_in, interp, thresh, rank, reduction);
  const int64_t C = x.size(1);
  const auto acc = acc_dtype(x);
  const Tensor weight = class_vector(weight_in, C, acc, "weight");
  Tensor pl, scale, count, tp, bad, lse;
  if (interp < 0) {
    std::tie(pl, scale, count, tp, bad, lse) =
        cpp_loss_fwd_cpu(x, target_in, std::nullopt, std::nullopt, confusion, kSoftmaxFocal, 0.0, ignore_index, kNone,
                         kNoWeight, false, validate, false);
  } else {
    std::tie(pl, scale, count, tp, bad, lse) =
        cpp_upsample_loss_fwd_cpu(x, target_in, interp, align_corners, std::nullopt, std::nullopt, confusion,
                                  kSoftmaxFocal, 0.0, ignore_index, kNone, kNoWeight, false, validate, need_lse);
  }
  const Tensor target = target_in.contiguous();
  const int64_t N = pl.numel();
  Tensor pn = at::empty({N}, pl.options());
  Tensor aux = at::empty({2}, pl.options());  // (threshold, the mean's factor of the backward)
  Tensor loss = reduction == kNone ? pl : at::empty({}, pl.options());
  dispatch_logits(x.scalar_type(), [&](auto, auto tt) {
    using T = typename decltype(tt)::type;
    dispatch_labels(target.scalar_type(), [&](auto lt) {
      using L = typename decltype(lt)::type;
      T* l = pl.data_ptr<T>();
      T* p = pn.data_ptr<T>();
      label_probabilities<T, L>(l, target.data_ptr<L>(), weight.defined() ? weight.data_ptr<T>() : nullptr, p, N,
                                C, ignore_index);
      const T sel = static_cast<T>(select_kth_value(pn, rank));  // 0 when no pixel is valid
      // As max(p_k, thresh) in the reference: thresh rounded to T, and a NaN p_k keeps nothing.
      const T thr = std::isnan(sel) ? sel : std::max(sel, static_cast<T>(thresh));
      const auto [total, kept] = kept_sum<T>(l, p, thr, N, reduction == kNone);
      T factor = T(1);
      if (reduction == kMean) {
        const int64_t den = mean_over_all ? N : kept;  // every pixel (mmseg), or the kept ones (HRNet)
        factor = den > 0 ? T(1) / static_cast<T>(den) : T(0);  // nothing kept: loss 0, gradient 0
        *loss.data_ptr<T>() = den > 0 ? static_cast<T>(total) / static_cast<T>(den) : T(0);
      } else if (reduction == kSum) {
        *loss.data_ptr<T>() = static_cast<T>(total);
      }
      T* a = aux.data_ptr<T>();
      a[0] = thr;
      a[1] = factor;
    });
  });
  return {loss, pn, aux, bad, lse};
}

Tensor cpp_ohem_bwd_cpu(const Tensor& x, const Tensor& target, int64_t interp, bool align_corners,
                        const std::optional<Tensor>& grad_in, const std::optional<Tensor>& weight,
                        const Tensor& pn_in, const Tensor& aux_in, const std::optional<Tensor>& lse,
                        int64_t ignore_index) {
  TORCH_CHECK(interp >= -1 && interp <= 1, "fused_imbalance: interp must be -1 (none), 0 (nearest) or 1 (bilinear)");
  const auto acc = acc_dtype(x);
  const int64_t N = target.numel();
  TORCH_CHECK(pn_in.device().is_cpu() && pn_in.scalar_type() == acc && pn_in.numel() == N,
              "fused_imbalance: pn must be the forward's (", N, ",) ", acc, " tensor on the CPU");
  TORCH_CHECK(aux_in.device().is_cpu() && aux_in.scalar_type() == acc && aux_in.numel() == 2,
              "fused_imbalance: aux must be the forward's (2,) ", acc, " tensor on the CPU");
  const Upstream up = upstream(grad_in, std::nullopt, N, x.size(1), acc);
  const Tensor pn = pn_in.contiguous();
  const Tensor aux = aux_in.contiguous();
  Tensor g = at::empty({N}, pn.options());
  dispatch_logits(x.scalar_type(), [&](auto, auto tt) {
    using T = typename decltype(tt)::type;
    const T* a = aux.data_ptr<T>();
    upstream_factors<T>(pn.data_ptr<T>(), a[0], a[1], up.grad.defined() ? up.grad.data_ptr<T>() : nullptr,
                        up.grad_stride, g.data_ptr<T>(), N);
  });
  if (interp < 0)
    return cpp_loss_bwd_cpu(x, target, g, weight, std::nullopt, lse, kSoftmaxFocal, 0.0, ignore_index);
  return cpp_upsample_loss_bwd_cpu(x, target, interp, align_corners, g, weight, std::nullopt, lse, kSoftmaxFocal, 0.0,
                                   ignore_index);
}

TORCH_LIBRARY_IMPL(fused_imbalance, CPU, m) {
  m.impl("cpp_ohem_fwd", &cpp_ohem_fwd_cpu);
  m.impl("cpp_ohem_bwd", &cpp_ohem_bwd_cpu);
}

}  // namespace cpu
}  // namespace fused_imbalance
