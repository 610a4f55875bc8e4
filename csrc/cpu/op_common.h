// Helpers shared by the CPU ops (loss_cpu.cpp, upsample_cpu.cpp): the logits-dtype
// dispatch, the accumulation dtype, the MSE target values, the labels of a block, the
// incoming gradients of the backward ops, and the forward's bookkeeping: per-class sums of a
// chunk, confusion counts, per-chunk slots folded in chunk order.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "../dispatch.h"
#include "loss_kernels.h"

namespace fused_imbalance {
namespace cpu {

// Mirrors fused_imbalance.ops.Reduction and Weighting.
enum Reduction : int64_t { kMean = 0, kSum = 1, kNone = 2, kClass = 3 };
enum Weighting : int64_t { kNoWeight = 0, kGeneral = 1, kPaper = 2, kRecall = 3 };

inline void check_reduction(int64_t reduction, int64_t weighting) {
  TORCH_CHECK(reduction >= kMean && reduction <= kClass, "fused_imbalance: unknown reduction ", reduction);
  TORCH_CHECK(weighting >= kNoWeight && weighting <= kRecall, "fused_imbalance: unknown weighting ", weighting);
}

// (logits dtype, accumulation dtype)
template <typename F>
void dispatch_logits(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: return f(Tag<float>{}, Tag<float>{});
    case at::kDouble: return f(Tag<double>{}, Tag<double>{});
    case at::kHalf: return f(Tag<at::Half>{}, Tag<float>{});
    case at::kBFloat16: return f(Tag<at::BFloat16>{}, Tag<float>{});
    default: TORCH_CHECK(false, "fused_imbalance: logits must be float16, bfloat16, float32 or float64, got ", st);
  }
}

inline at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// tvals in the accumulation dtype for the MSE modes, undefined for the others.
inline at::Tensor mse_tvals(int64_t mode, const std::optional<at::Tensor>& tvals, const at::Tensor& x) {
  if (mode != kMseLogits && mode != kMseSoftmax) return at::Tensor();
  TORCH_CHECK(tvals.has_value() && tvals->numel() == x.size(1),
              "fused_imbalance: the MSE modes need tvals with one value per class");
  return tvals->to(at::kCPU, acc_dtype(x)).contiguous();
}

// The backward op's upstream gradient in the accumulation dtype `acc`: undefined (1 for every
// pixel), a scalar (a mean or sum: stride 0, the same value for every pixel) or (N,) (a per-pixel
// output); and the per-class factor `scale` (C,), undefined for 1. The sizes are checked here,
// before any kernel indexes them.
struct Upstream {
  at::Tensor grad, scale;
  int64_t grad_stride = 0;
};

inline Upstream upstream(const std::optional<at::Tensor>& grad_in, const std::optional<at::Tensor>& scale_in,
                         int64_t N, int64_t C, at::ScalarType acc) {
  Upstream u;
  if (grad_in.has_value() && grad_in->defined()) {
    const at::Tensor& g = *grad_in;
    TORCH_CHECK(g.device().is_cpu(), "fused_imbalance: the upstream gradient must be on the CPU");
    if (g.numel() == 1) {
      u.grad = g.to(acc).reshape({1});
    } else {
      TORCH_CHECK(g.numel() == N, "fused_imbalance: the upstream gradient has ", g.numel(), " elements for ", N,
                  " pixels");
      u.grad = g.to(acc).reshape({N}).contiguous();
      u.grad_stride = 1;
    }
  }
  if (scale_in.has_value() && scale_in->defined()) {
    TORCH_CHECK(scale_in->numel() == C && scale_in->device().is_cpu(),
                "fused_imbalance: scale must have one value per class on the CPU");
    u.scale = scale_in->to(acc).contiguous();
  }
  return u;
}

// (C,) weights or MSE target values in the accumulation dtype, checked: undefined when absent.
inline at::Tensor class_vector(const std::optional<at::Tensor>& v, int64_t C, at::ScalarType acc, const char* name) {
  if (!v.has_value() || !v->defined()) return at::Tensor();
  TORCH_CHECK(v->numel() == C && v->device().is_cpu(), "fused_imbalance: ", name,
              " must have one value per class on the CPU");
  return v->to(acc).contiguous();
}

// Labels of pixels n0 .. n0 + cnt as int32 (-1: ignored, out of range or padding up to P);
// returns how many were out of range. Branch-free: ignored pixels come at random.
template <typename L>
int64_t load_labels(const L* t, int64_t n0, int64_t cnt, int64_t P, int64_t C,
                    int64_t ignore_index, int32_t* y) {
  int64_t bad = 0;
  for (int64_t p = 0; p < cnt; ++p) {
    const int64_t v = static_cast<int64_t>(t[n0 + p]);
    const bool labelled = v != ignore_index;
    const bool in_range = v >= 0 && v < C;
    bad += labelled && !in_range;
    y[p] = labelled && in_range ? static_cast<int32_t>(v) : -1;
  }
  for (int64_t p = cnt; p < P; ++p) y[p] = -1;
  return bad;
}

// The backward block's per-pixel factors of pixels n0 .. n0 + P: coef = g[n] * scale[y_n] (each 1
// when absent; 0 without a label) and, for the MSE modes, tvy = tvals[y_n].
template <typename T>
void backward_coefficients(const int32_t* y, int64_t n0, int64_t P, const T* grad, int64_t grad_stride,
                           const T* scale, const T* tvals, T* coef, T* tvy) {
  for (int64_t p = 0; p < P; ++p) {
    const int32_t c = y[p];
    T a = T(0);
    if (c >= 0) {
      a = grad != nullptr ? grad[(n0 + p) * grad_stride] : T(1);
      if (scale != nullptr) a *= scale[c];
    }
    coef[p] = a;
    if (tvals != nullptr) tvy[p] = c >= 0 ? tvals[c] : T(0);
  }
}

// Where a forward op's kernel writes its per-pixel results.
struct FwdOut {
  void* pixel_loss = nullptr;    // (N,) accumulation dtype, or nullptr
  const void* weight = nullptr;  // (C,) class weights the stored per-pixel loss is multiplied by, or nullptr
  int64_t* confusion = nullptr;  // the caller's (C, C) matrix the confusion counts are added into, or nullptr
  bool need_argmax = false;      // true positives or confusion counts are wanted
  void* lse = nullptr;  // (N,) accumulation dtype: the upsampled softmax forward's log-sum-exp, or nullptr
};

// Per-class sums of one chunk, in `banks` interleaved copies (pixel p adds to bank
// p % banks) so that neighbouring pixels of the same class, the common case, do not wait on
// each other's add; folded in a fixed order at the end of the chunk. Row C takes the pixels
// without a label, so the loop has no branch. Many classes: one bank (clearing four would
// cost more than the chains they break).
struct ClassBanks {
  int64_t C, banks;
  std::vector<double> loss;
  std::vector<int64_t> count, tp;

  explicit ClassBanks(int64_t C)
      : C(C), banks(C <= 256 ? 4 : 1), loss(banks * (C + 1)), count(banks * (C + 1)),
        tp(banks * (C + 1)) {}

  void clear() {
    std::fill(loss.begin(), loss.end(), 0.0);
    std::fill(count.begin(), count.end(), 0);
    std::fill(tp.begin(), tp.end(), 0);
  }

  // argmax: nullptr when the true positives are not wanted.
  template <typename T>
  void add(const int32_t* y, const int32_t* argmax, const T* pixel_loss, int64_t cnt) {
    for (int64_t p = 0; p < cnt; ++p) {
      const int64_t c = y[p] >= 0 ? y[p] : C;
      const int64_t i = (p & (banks - 1)) * (C + 1) + c;  // banks: a power of 2
      loss[i] += static_cast<double>(pixel_loss[p]);  // 0 for pixels without a label
      count[i] += 1;
      if (argmax != nullptr) tp[i] += argmax[p] == c;
    }
  }

  void fold(double* cls_loss, int64_t* cls_count, int64_t* cls_tp) const {
    for (int64_t c = 0; c < C; ++c) {
      double s = loss[c];
      int64_t n = count[c], t = tp[c];
      for (int64_t b = 1; b < banks; ++b) {
        s += loss[b * (C + 1) + c];
        n += count[b * (C + 1) + c];
        t += tp[b * (C + 1) + c];
      }
      cls_loss[c] = s;
      cls_count[c] = n;
      cls_tp[c] = t;
    }
  }
};

// One thread's confusion counts (label, argmax) of its labelled pixels: a private (C, C) table
// while it stays small, added into the output at the end; beyond that, atomic adds straight
// into the output, spread over C^2 counters. Integer counts: exact in any order.
class ConfusionCounts {
 public:
  // pixels: how many this thread may count; a private table only when it holds fewer cells than
  // that (so the scratch stays O(pixels), never a C x C matrix per small update).
  ConfusionCounts(int64_t* out, int64_t C, int64_t pixels) : out_(out), C_(C) {
    if (out_ != nullptr && C * C <= 65536 && C * C <= pixels) table_.assign(C * C, 0);
  }

  void add(const int32_t* y, const int32_t* argmax, int64_t cnt) {
    if (out_ == nullptr) return;
    for (int64_t p = 0; p < cnt; ++p) {
      const int64_t c = y[p];
      if (c < 0) continue;
      if (!table_.empty())
        table_[c * C_ + argmax[p]] += 1;
      else
        __atomic_fetch_add(out_ + c * C_ + argmax[p], int64_t(1), __ATOMIC_RELAXED);
    }
  }

  // Adds the private table into the output (once, at the end of the thread's work).
  void flush() {
    for (size_t i = 0; i < table_.size(); ++i)
      if (table_[i] != 0) __atomic_fetch_add(out_ + i, table_[i], __ATOMIC_RELAXED);
    table_.clear();
  }

 private:
  int64_t* out_;
  int64_t C_;
  std::vector<int64_t> table_;
};

// The forward's per-class totals: loss sums (double), counts and true positives, and the bad labels.
struct Totals {
  std::vector<double> loss;
  std::vector<int64_t> count, tp;
  int64_t bad = 0;
};

// The forward's per-chunk results, one slot a chunk, folded in chunk order: the per-class sums
// are bit-identical run to run and for any thread count whenever the chunks do not depend on
// the thread count.
struct ChunkSlots {
  int64_t C;
  std::vector<double> loss;
  std::vector<int64_t> count, tp, bad;

  ChunkSlots(int64_t chunks, int64_t C)
      : C(C), loss(chunks * C, 0.0), count(chunks * C, 0), tp(chunks * C, 0), bad(chunks, 0) {}

  void store(int64_t chunk, const ClassBanks& banks, int64_t chunk_bad) {
    banks.fold(loss.data() + chunk * C, count.data() + chunk * C, tp.data() + chunk * C);
    bad[chunk] = chunk_bad;
  }

  Totals finish() const {
    const int64_t chunks = static_cast<int64_t>(bad.size());
    Totals t;
    t.loss.assign(C, 0.0);
    t.count.assign(C, 0);
    t.tp.assign(C, 0);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {  // fixed order: bit-identical
      for (int64_t c = 0; c < C; ++c) {
        t.loss[c] += loss[chunk * C + c];
        t.count[c] += count[chunk * C + c];
        t.tp[c] += tp[chunk * C + c];
      }
      t.bad += bad[chunk];
    }
    return t;
  }
};

// One forward block whose logits fb.x, fb.x_stride, fb.P the caller has set: the labels of
// pixels n0 .. n0 + cnt (into y, which fb.y points at), the MSE targets (into tvy, fb.tvy), the
// block's losses, the per-pixel loss if asked (times its class weight with `weight`), and the
// chunk's per-class sums and confusion counts. Returns the block's out-of-range labels.
template <typename T, typename L>
int64_t forward_block(int64_t mode, FwdBlock<T>& fb, const L* labels, int64_t n0, int64_t cnt,
                      int64_t ignore_index, const T* tvals, int32_t* y, T* tvy, T* pixel_loss, const T* weight,
                      ClassBanks& banks, ConfusionCounts& confusion) {
  const int64_t bad = load_labels(labels, n0, cnt, fb.P, fb.C, ignore_index, y);
  if (tvals != nullptr)
    for (int64_t p = 0; p < fb.P; ++p) tvy[p] = y[p] >= 0 ? tvals[y[p]] : T(0);
  loss_fwd_block(mode, fb);
  if (pixel_loss != nullptr) {
    if (weight != nullptr) {
      for (int64_t p = 0; p < cnt; ++p) pixel_loss[n0 + p] = y[p] >= 0 ? fb.loss[p] * weight[y[p]] : T(0);
    } else {
      std::copy(fb.loss, fb.loss + cnt, pixel_loss + n0);
    }
  }
  banks.add(y, fb.argmax, fb.loss, cnt);
  confusion.add(y, fb.argmax, cnt);
  return bad;
}

// How many labels are outside [0, C) and not ignore_index, in parallel chunks (exact in any order).
template <typename L>
int64_t count_bad_labels(const L* t, int64_t N, int64_t C, int64_t ignore_index) {
  std::atomic<int64_t> total{0};
  at::parallel_for(0, N, 1 << 16, [&](int64_t n0, int64_t n1) {
    int64_t bad = 0;
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t v = static_cast<int64_t>(t[n]);
      bad += v != ignore_index && (v < 0 || v >= C);
    }
    total += bad;
  });
  return total.load();
}

// The largest bad label (the op's bad[1]) and the error the losses raise for bad labels: a ValueError
// naming the smallest and up to five of them, as fused_imbalance._checks.bad_label_error words it.
// Called only once a bad label is known to exist.
template <typename L>
int64_t largest_bad_label(const L* t, int64_t N, int64_t C, int64_t ignore_index) {
  int64_t best = std::numeric_limits<int64_t>::min();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t v = static_cast<int64_t>(t[n]);
    if (v != ignore_index && (v < 0 || v >= C)) best = std::max(best, v);
  }
  return best;
}

template <typename L>
void raise_bad_labels(const L* t, int64_t N, int64_t C, int64_t ignore_index) {
  std::set<int64_t> values;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t v = static_cast<int64_t>(t[n]);
    if (v != ignore_index && (v < 0 || v >= C)) values.insert(v);
  }
  std::string shown;
  int shown_count = 0;
  for (const int64_t v : values) {
    if (shown_count == 5) {
      shown += ", ...";
      break;
    }
    shown += (shown_count++ ? ", " : "") + std::to_string(v);
  }
  TORCH_CHECK_VALUE(false, "target contains label ", values.empty() ? 0 : *values.begin(), " outside [0, ", C,
                    ") (values: ", shown, "; ignore_index=", ignore_index, ")");
}

// The caller's confusion matrix, checked before any kernel writes into it; undefined when absent.
inline at::Tensor checked_confusion(const std::optional<at::Tensor>& conf, int64_t C) {
  if (!conf.has_value() || !conf->defined()) return at::Tensor();
  TORCH_CHECK(conf->device().is_cpu() && conf->scalar_type() == at::kLong && conf->dim() == 2 &&
                  conf->size(0) == C && conf->size(1) == C && conf->is_contiguous(),
              "fused_imbalance: confusion must be a contiguous (", C, ", ", C, ") int64 tensor on the CPU");
  return *conf;
}

// The forward op's outputs (loss, scale, count, tp, bad, lse), uninitialised except bad: every other
// element is written by the pass (the per-pixel loss of "none") or by finish_forward.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_outputs(
    const at::Tensor& x, int64_t C, int64_t N, int64_t reduction, bool need_tp, int64_t lse_numel = 0) {
  const auto opt = x.options().dtype(acc_dtype(x));
  const auto i64 = x.options().dtype(at::kLong);
  at::Tensor loss = reduction == kNone ? at::empty({N}, opt) : reduction == kClass ? at::empty({C}, opt)
                                                                                   : at::empty({}, opt);
  at::Tensor bad = at::empty({2}, i64);
  bad.data_ptr<int64_t>()[0] = 0;
  bad.data_ptr<int64_t>()[1] = std::numeric_limits<int64_t>::min();  // no bad label: as the Triton backend
  return {loss, at::empty({C}, opt), at::empty({C}, i64), at::empty({need_tp ? C : 0}, i64), bad,
          at::empty({lse_numel}, opt)};
}

// The op's bad-label output once the pass has counted them; with validate, the ValueError instead.
template <typename L>
void record_bad(int64_t nbad, const L* labels, int64_t N, int64_t C, int64_t ignore_index, bool validate,
                at::Tensor& bad) {
  if (nbad == 0) return;
  if (validate) raise_bad_labels(labels, N, C, ignore_index);
  bad.data_ptr<int64_t>()[0] = nbad;
  bad.data_ptr<int64_t>()[1] = largest_bad_label(labels, N, C, ignore_index);
}

// The forward op's outputs from the pass's totals (the contract of fused_imbalance.ops): the counts,
// true positives and bad labels; the class weights (the recall loss's from the counts); the loss
// Σ_c w_c S_c / D (D = Σ_c w_c n_c summed in double, or Σ_c n_c; a zero D divides by 1) and the
// backward's per-class factor (for the per-class sums, the weights). As torch's cross_entropy, a
// weight enters only through the pixels of its class: an inf or NaN weight of an absent class
// changes nothing.
template <typename T>
void finish_forward(const Totals& tot, const T* weight, int64_t reduction, int64_t weighting, at::Tensor& loss,
                    at::Tensor& scale, at::Tensor& count, at::Tensor& tp, bool need_tp) {
  const int64_t C = static_cast<int64_t>(tot.count.size());
  int64_t* cnt = count.data_ptr<int64_t>();
  for (int64_t c = 0; c < C; ++c) cnt[c] = tot.count[c];
  if (need_tp) {
    int64_t* t = tp.data_ptr<int64_t>();
    for (int64_t c = 0; c < C; ++c) t[c] = tot.tp[c];
  }
  T* sc = scale.data_ptr<T>();
  if (reduction == kClass) {
    T* l = loss.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) l[c] = static_cast<T>(tot.loss[c]);
  }
  T total = T(0);
  double denom = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    T w = T(1);
    if (weighting == kGeneral || weighting == kPaper) {
      w = weight[c];
    } else if (weighting == kRecall) {
      const double n = static_cast<double>(tot.count[c]);
      w = static_cast<T>(tot.count[c] > 0 ? 1.0 - static_cast<double>(tot.tp[c]) / std::max(n, 1.0) : 1.0);
    }
    sc[c] = w;
    if (tot.count[c] > 0) {
      total += w * static_cast<T>(tot.loss[c]);
      denom += weighting == kGeneral ? static_cast<double>(w) * static_cast<double>(tot.count[c])
                                     : static_cast<double>(tot.count[c]);
    }
  }
  if (reduction == kMean) {
    T d = static_cast<T>(denom);
    d = d != T(0) ? d : T(1);  // no valid pixel (or Σ w_y = 0): loss 0, gradient 0
    *loss.data_ptr<T>() = total / d;
    for (int64_t c = 0; c < C; ++c) sc[c] = sc[c] / d;
  } else if (reduction == kSum) {
    *loss.data_ptr<T>() = total;
  }
}

// The recall loss's per-pixel output ("none"): its weights come from the pass's own statistics,
// so the pixels are weighted once the pass is done.
template <typename T, typename L>
void weigh_pixels(T* pixel_loss, const L* t, int64_t N, int64_t C, int64_t ignore_index, const T* w) {
  at::parallel_for(0, N, 1 << 14, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t v = static_cast<int64_t>(t[n]);
      pixel_loss[n] = v != ignore_index && v >= 0 && v < C ? pixel_loss[n] * w[v] : T(0);
    }
  });
}

}  // namespace cpu
}  // namespace fused_imbalance
