// Helpers shared by the CPU ops (loss_cpu.cpp, upsample_cpu.cpp): the logits-dtype
// dispatch, the accumulation dtype, the MSE target values, the labels of a block, the
// incoming gradients of the backward ops, and the forward's bookkeeping: per-class sums of a
// chunk, confusion counts, per-chunk slots folded in chunk order.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include "../dispatch.h"
#include "loss_kernels.h"

namespace fused_imbalance {
namespace cpu {

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

// The backward ops' grad_pixel (N,) and grad_class (C,) in the accumulation dtype `acc`;
// undefined where not given.
inline std::pair<at::Tensor, at::Tensor> upstream_grads(const std::optional<at::Tensor>& grad_pixel_in,
                                                        const std::optional<at::Tensor>& grad_class_in,
                                                        int64_t N, int64_t C, at::ScalarType acc) {
  at::Tensor grad_pixel, grad_class;
  if (grad_pixel_in.has_value() && grad_pixel_in->defined()) {
    TORCH_CHECK(grad_pixel_in->numel() == N, "fused_imbalance: grad_pixel must have one value per pixel");
    grad_pixel = grad_pixel_in->to(acc).reshape({N});  // a stride-0 expand stays a view
  }
  if (grad_class_in.has_value() && grad_class_in->defined()) {
    TORCH_CHECK(grad_class_in->numel() == C, "fused_imbalance: grad_class must have C elements");
    grad_class = grad_class_in->to(acc).contiguous();
  }
  return {grad_pixel, grad_class};
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

// The backward block's per-pixel factors of pixels n0 .. n0 + P: coef = grad_pixel[n] +
// grad_class[y_n] (0 without a label) and, for the MSE modes, tvy = tvals[y_n].
template <typename T>
void backward_coefficients(const int32_t* y, int64_t n0, int64_t P, const T* grad_pixel,
                           int64_t grad_pixel_stride, const T* grad_class, const T* tvals, T* coef,
                           T* tvy) {
  for (int64_t p = 0; p < P; ++p) {
    const int32_t c = y[p];
    T a = T(0);
    if (c >= 0) {
      if (grad_pixel != nullptr) a += grad_pixel[(n0 + p) * grad_pixel_stride];
      if (grad_class != nullptr) a += grad_class[c];
    }
    coef[p] = a;
    if (tvals != nullptr) tvy[p] = c >= 0 ? tvals[c] : T(0);
  }
}

// Where a forward op's kernel writes its results.
struct FwdOut {
  void* pixel_loss;    // (N,) accumulation dtype, or nullptr
  void* class_loss;    // (C,) accumulation dtype
  int64_t* count;      // (C,)
  int64_t* tp;         // (C,), or nullptr
  int64_t* bad;        // ()
  int64_t* confusion;  // (C, C) contiguous zeros, or nullptr
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
  ConfusionCounts(int64_t* out, int64_t C) : out_(out), C_(C) {
    if (out_ != nullptr && C * C <= 65536) table_.assign(C * C, 0);
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

  template <typename T>
  void finish(const FwdOut& out) const {
    const int64_t chunks = static_cast<int64_t>(bad.size());
    T* class_loss = static_cast<T*>(out.class_loss);
    for (int64_t c = 0; c < C; ++c) {
      double s = 0.0;
      int64_t n = 0, t = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {  // fixed order: bit-identical
        s += loss[chunk * C + c];
        n += count[chunk * C + c];
        t += tp[chunk * C + c];
      }
      class_loss[c] = static_cast<T>(s);
      out.count[c] = n;
      if (out.tp != nullptr) out.tp[c] = t;
    }
    int64_t total = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) total += bad[chunk];
    *out.bad = total;
  }
};

// One forward block whose logits fb.x, fb.x_stride, fb.P the caller has set: the labels of
// pixels n0 .. n0 + cnt (into y, which fb.y points at), the MSE targets (into tvy, fb.tvy), the
// block's losses, the per-pixel loss if asked, and the chunk's per-class sums and confusion
// counts. Returns the block's out-of-range labels.
template <typename T, typename L>
int64_t forward_block(int64_t mode, FwdBlock<T>& fb, const L* labels, int64_t n0, int64_t cnt,
                      int64_t ignore_index, const T* tvals, int32_t* y, T* tvy, T* pixel_loss,
                      ClassBanks& banks, ConfusionCounts& confusion) {
  const int64_t bad = load_labels(labels, n0, cnt, fb.P, fb.C, ignore_index, y);
  if (tvals != nullptr)
    for (int64_t p = 0; p < fb.P; ++p) tvy[p] = y[p] >= 0 ? tvals[y[p]] : T(0);
  loss_fwd_block(mode, fb);
  if (pixel_loss != nullptr) std::copy(fb.loss, fb.loss + cnt, pixel_loss + n0);
  banks.add(y, fb.argmax, fb.loss, cnt);
  confusion.add(y, fb.argmax, cnt);
  return bad;
}

}  // namespace cpu
}  // namespace fused_imbalance
