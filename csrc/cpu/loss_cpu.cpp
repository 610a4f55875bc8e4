// CPU implementations of fused_imbalance::cpp_loss_fwd / cpp_loss_bwd (contract:
// fused_imbalance/ops/__init__.py), also called directly by an eager call (fused_imbalance.cpp).
//
// The pixels are cut into blocks of P pixels (loss_kernels.h) and the blocks into chunks.
// Both depend only on (N, C), never on the thread count: each chunk sums its pixels'
// losses in a fixed order into its own slot and the slots are added in chunk order, so the
// per-class sums are bit-identical run to run and for any number of threads. The integer
// statistics (counts, true positives, confusion) are exact in any order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../dispatch.h"
#include "../pixel_view.h"
#include "loss_kernels.h"
#include "op_common.h"

namespace fused_imbalance {
namespace cpu {
namespace {

using at::Tensor;

// Blocks of about 8 K logits (32 KB of float32, L1-sized) and at least 16 pixels.
int64_t block_pixels(int64_t C) {
  int64_t p = (8192 / C) / kBlockAlign * kBlockAlign;
  return std::min<int64_t>(std::max<int64_t>(p, kBlockAlign), 512);
}

struct ChunkPlan {
  int64_t P;        // pixels per block
  int64_t blocks;   // ceil(N / P)
  int64_t per;      // blocks per chunk
  int64_t chunks;   // ceil(blocks / per)
};

// At least 64 K logits per chunk (thread hand-off is then negligible), at most 256 chunks
// and 256 K per-class slots (the slots are the only O(C) scratch per chunk).
ChunkPlan plan_chunks(int64_t N, int64_t C) {
  ChunkPlan c;
  // a small input is one block of its own size, not a whole block of padding
  c.P = std::min(block_pixels(C), std::max<int64_t>(kBlockAlign, (N + kBlockAlign - 1) / kBlockAlign * kBlockAlign));
  c.blocks = (N + c.P - 1) / c.P;
  int64_t chunks = (N * C + 65535) / 65536;
  chunks = std::min<int64_t>(chunks, 256);
  chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, (int64_t(1) << 18) / C));
  chunks = std::max<int64_t>(1, std::min(chunks, c.blocks));
  c.per = (c.blocks + chunks - 1) / chunks;
  c.chunks = c.blocks == 0 ? 0 : (c.blocks + c.per - 1) / c.per;
  return c;
}

// Offsets of pixels n0 .. n0 + cnt in a tensor with pixel view v.
void pixel_offsets(const PixelView& v, int64_t n0, int64_t cnt, int64_t* off) {
  int64_t b = n0 / v.S, s = n0 % v.S;
  for (int64_t p = 0; p < cnt; ++p) {
    off[p] = b * v.sb + s * v.ss;  // int64: B*C*S can exceed 2^31
    if (++s == v.S) {
      s = 0;
      ++b;
    }
  }
}

// Block pointer straight into the tensor: same dtype, pixels contiguous, whole block in
// one image. Otherwise nullptr and the block goes through a class-major scratch copy.
template <typename X, typename T>
X* direct_block(X* base, const PixelView& v, int64_t n0, int64_t cnt, int64_t P) {
  if (!std::is_same<std::remove_const_t<X>, T>::value || v.ss != 1 || cnt != P || n0 / v.S != (n0 + P - 1) / v.S)
    return nullptr;
  return base + (n0 / v.S) * v.sb + (n0 % v.S);
}

// True when the block's pixels are consecutive elements of each class plane (NCHW).
bool plane_run(const PixelView& v, const int64_t* off, int64_t cnt) {
  return v.ss == 1 && off[cnt - 1] - off[0] == cnt - 1;
}

// The stride between the block's pixels when they are rows of C contiguous classes a fixed
// stride apart (channels_last, (N, C)): the block is then a matrix that is transposed in
// tiles. -1 otherwise. Offsets advance by one stride inside an image and jump between
// images, so equal first and average steps mean a single stride.
int64_t row_run(const PixelView& v, const int64_t* off, int64_t cnt) {
  if (v.sc != 1) return -1;
  const int64_t ps = cnt > 1 ? off[1] - off[0] : v.C;
  return off[cnt - 1] - off[0] == (cnt - 1) * ps ? ps : -1;
}

// Copy (and widen) a block into buf[k * P + p], zero padding after cnt.
template <typename X, typename T>
void gather_block(const X* x, const PixelView& v, const int64_t* off, int64_t cnt, int64_t P,
                  T* buf) {
  const int64_t ps = std::is_same<X, T>::value ? row_run(v, off, cnt) : -1;
  if (ps >= 0) {
    rows_to_block(reinterpret_cast<const T*>(x + off[0]), ps, cnt, v.C, buf, P);
  } else if (plane_run(v, off, cnt)) {  // NCHW in 16-bit, or a block across images: one run per class
    for (int64_t k = 0; k < v.C; ++k) {
      const X* src = x + k * v.sc + off[0];
      T* dst = buf + k * P;
      for (int64_t p = 0; p < cnt; ++p) dst[p] = static_cast<T>(src[p]);
    }
  } else if (v.sc == 1) {  // channels_last / (N, C) rows: a pixel's classes are contiguous
    for (int64_t p = 0; p < cnt; ++p) {
      const X* src = x + off[p];
      for (int64_t k = 0; k < v.C; ++k) buf[k * P + p] = static_cast<T>(src[k]);
    }
  } else {
    for (int64_t k = 0; k < v.C; ++k) {
      const X* src = x + k * v.sc;
      T* dst = buf + k * P;
      for (int64_t p = 0; p < cnt; ++p) dst[p] = static_cast<T>(src[off[p]]);
    }
  }
  for (int64_t k = 0; k < v.C; ++k)
    for (int64_t p = cnt; p < P; ++p) buf[k * P + p] = T(0);
}

// A block's logits, class k of pixel p at [k * stride + p]: straight from the tensor when
// direct_block allows it, else gathered (and widened) into xbuf.
template <typename X, typename T>
std::pair<const T*, int64_t> logits_block(const X* xd, const PixelView& v, int64_t n0, int64_t cnt, int64_t P,
                                          std::vector<int64_t>& off, std::vector<T>& xbuf) {
  if (const X* direct = direct_block<const X, T>(xd, v, n0, cnt, P))
    return {reinterpret_cast<const T*>(direct), v.sc};
  if (xbuf.empty()) xbuf.resize(v.C * P);
  pixel_offsets(v, n0, cnt, off.data());
  gather_block(xd, v, off.data(), cnt, P, xbuf.data());
  return {xbuf.data(), P};
}

template <typename X, typename T>
void scatter_block(const T* buf, const PixelView& v, const int64_t* off, int64_t cnt,
                   int64_t P, X* g) {
  const int64_t ps = std::is_same<X, T>::value ? row_run(v, off, cnt) : -1;
  if (ps >= 0) {
    block_to_rows(buf, P, cnt, v.C, reinterpret_cast<T*>(g + off[0]), ps);
  } else if (plane_run(v, off, cnt)) {
    for (int64_t k = 0; k < v.C; ++k) {
      X* dst = g + k * v.sc + off[0];
      const T* src = buf + k * P;
      for (int64_t p = 0; p < cnt; ++p) dst[p] = static_cast<X>(src[p]);
    }
  } else if (v.sc == 1) {
    for (int64_t p = 0; p < cnt; ++p) {
      X* dst = g + off[p];
      for (int64_t k = 0; k < v.C; ++k) dst[k] = static_cast<X>(buf[k * P + p]);
    }
  } else {
    for (int64_t k = 0; k < v.C; ++k) {
      X* dst = g + k * v.sc;
      const T* src = buf + k * P;
      for (int64_t p = 0; p < cnt; ++p) dst[off[p]] = static_cast<X>(src[p]);
    }
  }
}

template <typename X, typename T, typename L>
Totals loss_fwd_kernel(const Tensor& x, const PixelView& v, const L* labels, int64_t mode, double gamma,
                       const T* tvals, int64_t ignore_index, const FwdOut& out) {
  const int64_t N = v.B * v.S, C = v.C;
  const ChunkPlan plan = plan_chunks(N, C);
  const int64_t P = plan.P;
  ChunkSlots slots(plan.chunks, C);
  const X* xd = x.data_ptr<X>();
  T* pixel_loss = static_cast<T*>(out.pixel_loss);
  const T* weight = static_cast<const T*>(out.weight);

  at::parallel_for(0, plan.chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<int32_t> y(P), argmax(P);
    std::vector<T> tvy(P, T(0)), loss(P);
    std::vector<int64_t> off(P);
    std::vector<T> xbuf;
    ConfusionCounts confusion(out.confusion, C, (c1 - c0) * plan.per * P);
    FwdBlock<T> fb;
    fb.C = C;
    fb.P = P;
    fb.y = y.data();
    fb.tvy = tvy.data();
    fb.gamma = gamma;
    fb.loss = loss.data();
    fb.argmax = out.need_argmax ? argmax.data() : nullptr;  // else not wanted
    ClassBanks banks(C);
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      banks.clear();
      int64_t bad = 0;
      const int64_t b_end = std::min(plan.blocks, (chunk + 1) * plan.per);
      for (int64_t blk = chunk * plan.per; blk < b_end; ++blk) {
        const int64_t n0 = blk * P, cnt = std::min(P, N - n0);
        std::tie(fb.x, fb.x_stride) = logits_block<X, T>(xd, v, n0, cnt, P, off, xbuf);
        bad += forward_block(mode, fb, labels, n0, cnt, ignore_index, tvals, y.data(), tvy.data(), pixel_loss, weight,
                             banks, confusion);
      }
      slots.store(chunk, banks, bad);
    }
    confusion.flush();
  });
  return slots.finish();
}

template <typename X, typename T, typename L>
void loss_bwd_kernel(const Tensor& x, const PixelView& v, const L* labels, const T* up_grad, int64_t up_stride,
                     const T* scale, int64_t mode, double gamma, const T* tvals, int64_t ignore_index, Tensor& grad,
                     const PixelView& gv) {
  const int64_t N = v.B * v.S, C = v.C;
  const ChunkPlan plan = plan_chunks(N, C);
  const int64_t P = plan.P;
  const X* xd = x.data_ptr<X>();
  X* gd = grad.data_ptr<X>();

  at::parallel_for(0, plan.chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<int32_t> y(P);
    std::vector<T> tvy(P, T(0)), coef(P), pix(2 * P), ebuf(mode == kSoftmaxFocal || mode == kMseSoftmax ? C * P : 0);
    std::vector<int64_t> off(P), goff(P);
    std::vector<T> xbuf, gbuf;
    BwdBlock<T> bb;
    bb.C = C;
    bb.P = P;
    bb.y = y.data();
    bb.tvy = tvy.data();
    bb.coef = coef.data();
    bb.pix = pix.data();
    bb.ebuf = ebuf.empty() ? nullptr : ebuf.data();
    bb.gamma = gamma;
    const int64_t b_end = std::min(plan.blocks, c1 * plan.per);
    for (int64_t blk = c0 * plan.per; blk < b_end; ++blk) {
      const int64_t n0 = blk * P, cnt = std::min(P, N - n0);
      load_labels(labels, n0, cnt, P, C, ignore_index, y.data());
      backward_coefficients(y.data(), n0, P, up_grad, up_stride, scale, tvals, coef.data(), tvy.data());
      std::tie(bb.x, bb.x_stride) = logits_block<X, T>(xd, v, n0, cnt, P, off, xbuf);
      X* gdir = direct_block<X, T>(gd, gv, n0, cnt, P);
      if (gdir != nullptr) {
        bb.g = reinterpret_cast<T*>(gdir);
        bb.g_stride = gv.sc;
      } else {
        if (gbuf.empty()) gbuf.resize(C * P);
        bb.g = gbuf.data();
        bb.g_stride = P;
      }
      loss_bwd_block(mode, bb);
      if (gdir == nullptr) {
        pixel_offsets(gv, n0, cnt, goff.data());
        scatter_block(gbuf.data(), gv, goff.data(), cnt, P, gd);
      }
    }
  });
}

// Common checks; returns x in a layout pixel_view can describe.
Tensor check_inputs(const Tensor& x, const Tensor& target, int64_t mode, double gamma) {
  TORCH_CHECK(x.device().is_cpu() && target.device().is_cpu(),
              "fused_imbalance cpp ops: tensors must be on the CPU");
  TORCH_CHECK(x.dim() >= 2, "fused_imbalance: logits must be (N, C) or (B, C, d1, ...), got ",
              x.dim(), " dims");
  TORCH_CHECK(x.size(1) >= 1, "fused_imbalance: logits need at least one class");
  int64_t n = x.size(0);
  for (int64_t d = 2; d < x.dim(); ++d) n *= x.size(d);
  TORCH_CHECK(target.numel() == n, "fused_imbalance: target has ", target.numel(),
              " labels for ", n, " pixels");
  TORCH_CHECK(mode >= kSoftmaxFocal && mode <= kStats, "fused_imbalance: unknown mode ", mode);
  TORCH_CHECK(gamma >= 0.0, "fused_imbalance: gamma must be >= 0, got ", gamma);
  return collapsible(x) ? x : x.contiguous();
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cpp_loss_fwd_cpu(
    const Tensor& x_in, const Tensor& target_in, const std::optional<Tensor>& weight_in,
    const std::optional<Tensor>& tvals_in, const std::optional<Tensor>& confusion_in, int64_t mode, double gamma,
    int64_t ignore_index, int64_t reduction, int64_t weighting, bool need_tp, bool validate, bool need_lse) {
  const Tensor x = check_inputs(x_in, target_in, mode, gamma);
  check_reduction(reduction, weighting);
  const Tensor target = target_in.contiguous();
  const PixelView v = pixel_view(x);
  const int64_t N = v.B * v.S, C = v.C;
  const auto acc = acc_dtype(x);
  const Tensor tvals = mse_tvals(mode, tvals_in, x);
  const Tensor weight = class_vector(weight_in, C, acc, "weight");
  TORCH_CHECK(weight.defined() || (weighting != kGeneral && weighting != kPaper),
              "fused_imbalance: this weighting needs class weights");
  const Tensor confusion = checked_confusion(confusion_in, C);
  need_tp = need_tp || weighting == kRecall;
  Tensor loss, scale, count, tp, bad, lse;
  std::tie(loss, scale, count, tp, bad, lse) = forward_outputs(x, C, N, reduction, need_tp);
  const bool weigh = reduction == kNone && (weighting == kGeneral || weighting == kPaper);
  dispatch_logits(x.scalar_type(), [&](auto xt, auto tt) {
    using X = typename decltype(xt)::type;
    using T = typename decltype(tt)::type;
    dispatch_labels(target.scalar_type(), [&](auto lt) {
      using L = typename decltype(lt)::type;
      const L* labels = target.data_ptr<L>();
      // nothing is added into the caller's matrix from labels that will raise
      if (validate && confusion.defined() && count_bad_labels(labels, N, C, ignore_index) > 0)
        raise_bad_labels(labels, N, C, ignore_index);
      FwdOut out;
      out.pixel_loss = reduction == kNone ? loss.data_ptr() : nullptr;
      out.weight = weigh ? weight.data_ptr() : nullptr;
      out.confusion = confusion.defined() ? confusion.data_ptr<int64_t>() : nullptr;
      out.need_argmax = need_tp || confusion.defined();
      const Totals tot = N > 0 ? loss_fwd_kernel<X, T, L>(x, v, labels, mode, gamma,
                                                           tvals.defined() ? tvals.data_ptr<T>() : nullptr,
                                                           ignore_index, out)
                               : Totals{std::vector<double>(C, 0.0), std::vector<int64_t>(C, 0),
                                        std::vector<int64_t>(C, 0), 0};
      record_bad(tot.bad, labels, N, C, ignore_index, validate, bad);
      finish_forward<T>(tot, weight.defined() ? weight.data_ptr<T>() : nullptr, reduction, weighting, loss, scale,
                        count, tp, need_tp);
      if (reduction == kNone && weighting == kRecall)
        weigh_pixels(loss.data_ptr<T>(), labels, N, C, ignore_index, scale.data_ptr<T>());
    });
  });
  return {loss, scale, count, tp, bad, lse};
}

Tensor cpp_loss_bwd_cpu(const Tensor& x_in, const Tensor& target_in, const std::optional<Tensor>& grad_in,
                        const std::optional<Tensor>& scale_in, const std::optional<Tensor>& tvals_in,
                        const std::optional<Tensor>& lse_in, int64_t mode, double gamma, int64_t ignore_index) {
  const Tensor x = check_inputs(x_in, target_in, mode, gamma);
  const Tensor target = target_in.contiguous();
  const PixelView v = pixel_view(x);
  const int64_t N = v.B * v.S, C = v.C;
  const auto acc = acc_dtype(x);
  const Tensor tvals = mse_tvals(mode, tvals_in, x);
  const Upstream up = upstream(grad_in, scale_in, N, C, acc);
  (void)lse_in;  // the plain forward keeps nothing (keeps_lse = 0): a block's logits are re-read from cache
  Tensor grad = at::empty_like(x_in);  // the dtype, shape and memory format of the logits
  if (N == 0) return grad;
  if (mode == kStats) return grad.zero_();
  Tensor work = collapsible(grad) ? grad : at::empty_like(x);
  const PixelView gv = pixel_view(work);
  dispatch_logits(x.scalar_type(), [&](auto xt, auto tt) {
    using X = typename decltype(xt)::type;
    using T = typename decltype(tt)::type;
    dispatch_labels(target.scalar_type(), [&](auto lt) {
      using L = typename decltype(lt)::type;
      loss_bwd_kernel<X, T, L>(x, v, target.data_ptr<L>(), up.grad.defined() ? up.grad.data_ptr<T>() : nullptr,
                               up.grad_stride, up.scale.defined() ? up.scale.data_ptr<T>() : nullptr, mode, gamma,
                               tvals.defined() ? tvals.data_ptr<T>() : nullptr, ignore_index, work, gv);
    });
  });
  if (!work.is_same(grad)) grad.copy_(work);
  return grad;
}

namespace {

// RecallLoss's moving average (fused_imbalance/ops/__init__.py, recall_ema): from this step's per-class
// sums S_c, counts n_c and true positives TP_c, R̄_c ← lerp(R̄_c, TP_c / n_c, weight) for the classes present
// (R̄_c = TP_c / n_c the first time a class is seen), seen |= present; w_c = 1 − R̄_c; the loss Σ_c w_c S_c
// (over max(Σ n_c, 1) for the mean) and the backward's factor w_c (/ D). Writes running and seen in place.
template <typename R, typename T>
void recall_ema_impl(const T* sums, const int64_t* count, const int64_t* tp, R* running, bool* seen, int64_t C,
                     double weight, bool mean, T* loss, T* scale) {
  int64_t valid = 0;
  for (int64_t c = 0; c < C; ++c) valid += count[c];
  const T D = mean ? static_cast<T>(std::max<int64_t>(valid, 1)) : T(1);
  const R w = static_cast<R>(weight);  // as torch.lerp's scalar weight: in the buffer's dtype
  T total = 0;
  for (int64_t c = 0; c < C; ++c) {
    R r = running[c];
    if (count[c] > 0) {
      const R batch = static_cast<R>(static_cast<double>(tp[c]) / static_cast<double>(count[c]));
      // torch.lerp's formula (aten/src/ATen/native/Lerp.h), without a fused multiply-add
      const R ema = std::abs(w) < R(0.5) ? r + w * (batch - r) : batch - (batch - r) * (R(1) - w);
      r = seen[c] ? ema : batch;
      running[c] = r;
      seen[c] = true;
    }
    const T wc = static_cast<T>(R(1) - r);
    total += wc * sums[c];
    scale[c] = mean ? wc / D : wc;
  }
  *loss = mean ? total / D : total;
}

}  // namespace

std::tuple<Tensor, Tensor> recall_ema_cpu(const Tensor& sums, const Tensor& count, const Tensor& tp, Tensor running,
                                          Tensor seen, double weight, int64_t reduction) {
  const int64_t C = sums.numel();
  TORCH_CHECK(reduction == kMean || reduction == kSum, "fused_imbalance: recall_ema: reduction must be MEAN or SUM");
  TORCH_CHECK(sums.dim() == 1 && sums.is_contiguous() && (sums.scalar_type() == at::kFloat ||
                                                          sums.scalar_type() == at::kDouble),
              "fused_imbalance: recall_ema: sums must be a contiguous (C,) float32 or float64 vector");
  for (const Tensor* t : {&count, &tp})
    TORCH_CHECK(t->dim() == 1 && t->numel() == C && t->scalar_type() == at::kLong && t->is_contiguous(),
                "fused_imbalance: recall_ema: count and tp must be contiguous (", C, ",) int64 vectors");
  TORCH_CHECK(running.dim() == 1 && running.numel() == C && running.is_contiguous() &&
                  (running.scalar_type() == at::kFloat || running.scalar_type() == at::kDouble),
              "fused_imbalance: recall_ema: running must be a contiguous (", C, ",) float32 or float64 vector");
  TORCH_CHECK(seen.dim() == 1 && seen.numel() == C && seen.is_contiguous() && seen.scalar_type() == at::kBool,
              "fused_imbalance: recall_ema: seen must be a contiguous (", C, ",) bool vector");
  for (const Tensor* t : {&count, &tp, static_cast<const Tensor*>(&running), static_cast<const Tensor*>(&seen)})
    TORCH_CHECK(t->device().is_cpu() && sums.device().is_cpu(), "fused_imbalance: recall_ema: CPU tensors only");
  Tensor loss = at::empty({}, sums.options());
  Tensor scale = at::empty({C}, sums.options());
  AT_DISPATCH_FLOATING_TYPES(running.scalar_type(), "recall_ema", [&] {
    using R = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(sums.scalar_type(), "recall_ema", [&] {
      recall_ema_impl<R, scalar_t>(sums.data_ptr<scalar_t>(), count.data_ptr<int64_t>(), tp.data_ptr<int64_t>(),
                                   running.data_ptr<R>(), seen.data_ptr<bool>(), C, weight, reduction == kMean,
                                   loss.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>());
    });
  });
  return {loss, scale};
}

TORCH_LIBRARY_IMPL(fused_imbalance, CPU, m) {
  m.impl("cpp_loss_fwd", &cpp_loss_fwd_cpu);
  m.impl("cpp_loss_bwd", &cpp_loss_bwd_cpu);
}

}  // namespace cpu
}  // namespace fused_imbalance
