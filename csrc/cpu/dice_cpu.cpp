// CPU implementations of fused_imbalance::cpp_dice_fwd / cpp_dice_finalize / cpp_dice_bwd (the
// contract: fused_imbalance/ops/dice.py), also called directly by an eager call (fused_imbalance.cpp).
//
// The logits are seen as groups of images whose sums are one (an image each, or the whole batch,
// whose images are folded into one run of pixels where one stride walks them), the images cut into
// blocks of P pixels (never across an image) and each group's blocks into chunks. Both depend only on
// the shapes, never on the thread count: each chunk sums its pixels in a fixed order into its own
// slot and a group's slots are added in chunk order, so the sums (and so the loss and the gradient)
// are bit-identical run to run and for any number of threads. The dense sum P_c goes through the
// block kernel (dice_kernels.h); the label-indexed sums I_c, G_c and the cross-entropy's take one
// value per pixel, added into its class in four interleaved banks (consecutive pixels of one class,
// the common case, do not wait on each other's add), folded in a fixed order.
//
// The finalize turns the (S, 4, C) sums into the loss and the backward's coefficients, in double,
// from the sums as the forward returns them (in the accumulation dtype), so that a distributed caller
// finalizing all-reduced sums computes what one process computes. The backward's blocks are
// independent: any split over the threads gives the same gradient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../dispatch.h"
#include "../pixel_view.h"
#include "dice_kernels.h"
#include "loss_kernels.h"
#include "op_common.h"

namespace fused_imbalance {
namespace cpu {

using at::Tensor;

namespace {

// Mirrors fused_imbalance.ops.dice.DiceKind, WType and DiceFlags.
enum DiceKind : int64_t { kDice = 0, kTversky = 1, kGeneralized = 2 };
enum WType : int64_t { kSquare = 0, kSimple = 1, kUniform = 2 };
enum DiceFlag : int64_t { kIncludeBackground = 1, kSquared = 2, kJaccard = 4, kBatch = 8, kCe = 16 };

struct DiceParams {
  double smooth_nr, smooth_dr, alpha, beta, gamma, lambda_dice, lambda_ce;
};

DiceParams dice_params(at::ArrayRef<double> p) {
  TORCH_CHECK(p.size() == 7, "fused_imbalance: the Dice ops take 7 params, got ", p.size());
  return {p[0], p[1], p[2], p[3], p[4], p[5], p[6]};
}

void check_options(int64_t kind, int64_t w_type, int64_t flags, int64_t reduction) {
  TORCH_CHECK(kind >= kDice && kind <= kGeneralized, "fused_imbalance: unknown Dice kind ", kind);
  TORCH_CHECK(w_type >= kSquare && w_type <= kUniform, "fused_imbalance: unknown w_type ", w_type);
  TORCH_CHECK(flags >= 0 && flags < 32, "fused_imbalance: unknown Dice flags ", flags);
  TORCH_CHECK(reduction >= kMean && reduction <= kNone, "fused_imbalance: the Dice ops take reduction 0, 1 or 2, got ",
              reduction);
  TORCH_CHECK(!((flags & kCe) && reduction == kNone), "fused_imbalance: the Dice + cross-entropy loss has no "
              "per-term output (reduction 2)");
}

// The logits (and the gradient) as B images of S pixels, in groups of `per_group` consecutive images
// whose sums are one: an image a group, or (batch) one group of every image, folded into one image
// when one stride walks all their pixels in both tensors.
struct DiceView {
  PixelView x, g;
  int64_t groups, per_group;
};

DiceView dice_view(const Tensor& x, const Tensor* grad, int64_t flags) {
  DiceView d{pixel_view(x), grad != nullptr ? pixel_view(*grad) : pixel_view(x), 0, 1};
  const bool one = (flags & kBatch) || x.dim() == 2;
  if (!one) {
    d.groups = d.x.B;
    return d;
  }
  auto fold = [](PixelView& v) {
    if (v.S == 1) {
      v = PixelView{1, v.C, v.B, 0, v.sc, v.sb};
    } else {
      v = PixelView{1, v.C, v.B * v.S, 0, v.sc, v.ss};
    }
  };
  auto foldable = [](const PixelView& v) { return v.S == 1 || v.B == 1 || v.sb == v.S * v.ss; };
  if (foldable(d.x) && foldable(d.g)) {
    fold(d.x);
    fold(d.g);
  }
  d.groups = 1;
  d.per_group = d.x.B;
  return d;
}

// The blocks and chunks of a pass: blocks of P pixels inside an image, bpi per image; a group's
// bpg = bpi · per_group blocks in chunks of `per`, `chunks` per group (at least 64 K logits each, and
// a bounded number of slots).
struct DicePlan {
  int64_t P, bpi, bpg, per, chunks;
};

DicePlan dice_plan(const DiceView& d) {
  const int64_t C = d.x.C, S = d.x.S;
  DicePlan p;
  int64_t bp = (8192 / C) / kBlockAlign * kBlockAlign;  // about 8 K logits: L1-sized
  bp = std::min<int64_t>(std::max<int64_t>(bp, kBlockAlign), 512);
  p.P = std::min(bp, std::max<int64_t>(kBlockAlign, (S + kBlockAlign - 1) / kBlockAlign * kBlockAlign));
  p.bpi = (S + p.P - 1) / p.P;
  p.bpg = p.bpi * d.per_group;
  int64_t chunks = (p.bpg * p.P * C + 65535) / 65536;
  chunks = std::min<int64_t>(chunks, 256);
  chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, (int64_t(1) << 18) / (C * std::max<int64_t>(d.groups, 1))));
  chunks = std::max<int64_t>(1, std::min(chunks, p.bpg));
  p.per = (p.bpg + chunks - 1) / chunks;
  p.chunks = p.bpg == 0 ? 0 : (p.bpg + p.per - 1) / p.per;
  return p;
}

// A block's logits, class k of pixel p at [k * stride + p]: straight from the tensor (same dtype,
// pixels contiguous, a whole block), else gathered (and widened) into buf, zero-padded to P.
template <typename X, typename T>
std::pair<const T*, int64_t> dice_block_in(const X* xd, const PixelView& v, int64_t b, int64_t s0, int64_t cnt,
                                           int64_t P, std::vector<T>& buf) {
  const X* base = xd + b * v.sb + s0 * v.ss;  // int64: B*C*S can exceed 2^31
  if (std::is_same<X, T>::value && v.ss == 1 && cnt == P) return {reinterpret_cast<const T*>(base), v.sc};
  if (buf.empty()) buf.resize(v.C * P);
  T* dst = buf.data();
  if (std::is_same<X, T>::value && v.sc == 1 && v.C > 1) {  // channels_last / rows: tiles transposed in registers
    rows_to_block(reinterpret_cast<const T*>(base), v.ss, cnt, v.C, dst, P);
  } else {
    for (int64_t k = 0; k < v.C; ++k)
      for (int64_t p = 0; p < cnt; ++p) dst[k * P + p] = static_cast<T>(base[k * v.sc + p * v.ss]);
  }
  for (int64_t k = 0; k < v.C; ++k)
    for (int64_t p = cnt; p < P; ++p) dst[k * P + p] = T(0);
  return {dst, P};
}

template <typename X, typename T>
void dice_block_out(const T* buf, const PixelView& v, int64_t b, int64_t s0, int64_t cnt, int64_t P, X* gd) {
  X* base = gd + b * v.sb + s0 * v.ss;
  if (std::is_same<X, T>::value && v.sc == 1 && v.C > 1) {
    block_to_rows(buf, P, cnt, v.C, reinterpret_cast<T*>(base), v.ss);
    return;
  }
  for (int64_t k = 0; k < v.C; ++k)
    for (int64_t p = 0; p < cnt; ++p) base[k * v.sc + p * v.ss] = static_cast<X>(buf[k * P + p]);
}

// One chunk's label-indexed sums in 4 interleaved banks (row C takes the unlabelled pixels, so the
// loop has no branch), and its dense prediction sums.
struct DiceBanks {
  int64_t C;
  std::vector<double> inter, ce, pred;
  std::vector<int64_t> count;

  explicit DiceBanks(int64_t C) : C(C), inter(4 * (C + 1)), ce(4 * (C + 1)), pred(C), count(4 * (C + 1)) {}

  void clear() {
    std::fill(inter.begin(), inter.end(), 0.0);
    std::fill(ce.begin(), ce.end(), 0.0);
    std::fill(pred.begin(), pred.end(), 0.0);
    std::fill(count.begin(), count.end(), 0);
  }

  template <typename T>
  void add(const int32_t* y, const T* p_label, const T* ce_pixel, int64_t cnt) {
    for (int64_t p = 0; p < cnt; ++p) {
      const int64_t i = (p & 3) * (C + 1) + (y[p] >= 0 ? y[p] : C);
      inter[i] += static_cast<double>(p_label[p]);  // 0 for pixels without a label
      count[i] += 1;
      if (ce_pixel != nullptr) ce[i] += static_cast<double>(ce_pixel[p]);
    }
  }

  // The chunk's slot: (4, C) rows I, P, G, CE, in double.
  void fold(double* slot) const {
    for (int64_t c = 0; c < C; ++c) {
      double i = 0.0, e = 0.0;
      int64_t n = 0;
      for (int bank = 0; bank < 4; ++bank) {
        i += inter[bank * (C + 1) + c];
        e += ce[bank * (C + 1) + c];
        n += count[bank * (C + 1) + c];
      }
      slot[c] = i;
      slot[C + c] = pred[c];
      slot[2 * C + c] = static_cast<double>(n);
      slot[3 * C + c] = e;
    }
  }
};

template <typename X, typename T, typename L>
int64_t dice_pass(const Tensor& x, const DiceView& d, const L* labels, int64_t ignore_index, bool squared, bool ce,
                  int64_t* confusion, T* sums) {
  const int64_t C = d.x.C, S = d.x.S;
  const DicePlan plan = dice_plan(d);
  const int64_t P = plan.P, total = d.groups * plan.chunks;
  std::vector<double> slots(total * 4 * C, 0.0);
  std::vector<int64_t> bad(total, 0);
  const X* xd = x.data_ptr<X>();
  at::parallel_for(0, total, 1, [&](int64_t c0, int64_t c1) {
    std::vector<int32_t> y(P), argmax(P);
    std::vector<T> ebuf(C * P), p_label(P), ce_pixel(ce ? P : 0), pred(C), xbuf;
    ConfusionCounts conf(confusion, C, (c1 - c0) * plan.per * P);
    DiceBanks banks(C);
    DiceFwdBlock<T> fb;
    fb.C = C;
    fb.P = P;
    fb.y = y.data();
    fb.squared = squared;
    fb.ebuf = ebuf.data();
    fb.p_label = p_label.data();
    fb.ce = ce ? ce_pixel.data() : nullptr;
    fb.argmax = confusion != nullptr ? argmax.data() : nullptr;
    fb.pred = pred.data();
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t g = chunk / plan.chunks, q = chunk % plan.chunks;
      banks.clear();
      const int64_t end = std::min(plan.bpg, (q + 1) * plan.per);
      for (int64_t lb = q * plan.per; lb < end; ++lb) {
        const int64_t b = g * d.per_group + lb / plan.bpi, s0 = (lb % plan.bpi) * P;
        const int64_t cnt = std::min(P, S - s0);
        bad[chunk] += load_labels(labels, b * S + s0, cnt, P, C, ignore_index, y.data());
        std::tie(fb.x, fb.x_stride) = dice_block_in<X, T>(xd, d.x, b, s0, cnt, P, xbuf);
        dice_fwd_block(fb);
        for (int64_t k = 0; k < C; ++k) banks.pred[k] += static_cast<double>(pred[k]);
        banks.add(y.data(), p_label.data(), ce ? ce_pixel.data() : static_cast<const T*>(nullptr), cnt);
        conf.add(y.data(), argmax.data(), cnt);
      }
      banks.fold(slots.data() + chunk * 4 * C);
    }
    conf.flush();
  });
  int64_t nbad = 0;
  for (int64_t g = 0; g < d.groups; ++g) {  // chunk order: bit-identical
    std::vector<double> acc(4 * C, 0.0);
    for (int64_t q = 0; q < plan.chunks; ++q) {
      const double* slot = slots.data() + (g * plan.chunks + q) * 4 * C;
      for (int64_t i = 0; i < 4 * C; ++i) acc[i] += slot[i];
      nbad += bad[g * plan.chunks + q];
    }
    for (int64_t i = 0; i < 4 * C; ++i) sums[g * 4 * C + i] = static_cast<T>(acc[i]);
  }
  return nbad;
}

// The loss and the backward's coefficients from the sums (the comment block of
// fused_imbalance/reference.py), in double. Writes loss (() or the per-term shape), coef (S, 2, C)
// and ce_scale (C,) when the CE flag is set.
template <typename T>
void dice_finalize_impl(const T* sums, int64_t S, int64_t C, const T* weight, const T* ce_weight, int64_t kind,
                        int64_t w_type, int64_t flags, const DiceParams& o, int64_t reduction, double grad_scale,
                        T* loss, T* coef, T* ce_scale) {
  const int64_t first = (flags & kIncludeBackground) ? 0 : 1, kept = C - first;
  const bool jaccard = flags & kJaccard;
  auto I = [&](int64_t s, int64_t c) { return static_cast<double>(sums[(s * 4 + 0) * C + c]); };
  auto Pp = [&](int64_t s, int64_t c) { return static_cast<double>(sums[(s * 4 + 1) * C + c]); };
  auto G = [&](int64_t s, int64_t c) { return static_cast<double>(sums[(s * 4 + 2) * C + c]); };
  auto CE = [&](int64_t s, int64_t c) { return static_cast<double>(sums[(s * 4 + 3) * C + c]); };
  std::fill(coef, coef + S * 2 * C, T(0));
  const double lam = (flags & kCe) ? o.lambda_dice : 1.0;
  double total = 0.0;
  if (kind == kGeneralized) {
    const double f = reduction == kMean ? 1.0 / static_cast<double>(std::max<int64_t>(S, 1)) : 1.0;
    std::vector<double> w(C);
    for (int64_t s = 0; s < S; ++s) {
      double wmax = 0.0;  // the largest finite weight of the image: that of its absent classes
      for (int64_t c = first; c < C; ++c) {
        const double g = G(s, c);
        w[c] = w_type == kUniform ? 1.0 : g > 0 ? (w_type == kSquare ? 1.0 / (g * g) : 1.0 / g) : 0.0;
        if (g > 0 && w[c] > wmax) wmax = w[c];
      }
      double num = 0.0, den = 0.0;
      for (int64_t c = first; c < C; ++c) {
        if (w_type != kUniform && !(G(s, c) > 0)) w[c] = wmax;
        num += w[c] * I(s, c);
        den += w[c] * (Pp(s, c) + G(s, c));
      }
      num = 2.0 * num + o.smooth_nr;
      den += o.smooth_dr;
      const double term = den != 0.0 ? 1.0 - num / den : 0.0;
      if (reduction == kNone) loss[s] = static_cast<T>(term);
      total += term;
      if (den != 0.0) {
        const double a = f * lam * grad_scale;
        for (int64_t c = first; c < C; ++c) {
          coef[(s * 2 + 0) * C + c] = static_cast<T>(-2.0 * a * w[c] / den);
          coef[(s * 2 + 1) * C + c] = static_cast<T>(a * w[c] * num / (den * den));
        }
      }
    }
    total *= f;
  } else {
    const double f = reduction == kMean ? 1.0 / static_cast<double>(std::max<int64_t>(S * kept, 1)) : 1.0;
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t c = first; c < C; ++c) {
        const double i = I(s, c), p = Pp(s, c), g = G(s, c);
        const double w = weight != nullptr ? static_cast<double>(weight[c]) : 1.0;
        double term, di = 0.0, dp = 0.0;
        if (kind == kDice) {
          const double num = 2.0 * i + o.smooth_nr;
          const double den = jaccard ? 2.0 * (p + g - i) + o.smooth_dr : p + g + o.smooth_dr;
          term = den != 0.0 ? 1.0 - num / den : 0.0;
          if (den != 0.0) {
            di = jaccard ? -2.0 * (den + num) / (den * den) : -2.0 / den;
            dp = (jaccard ? 2.0 : 1.0) * num / (den * den);
          }
        } else {
          const double num = i + o.smooth_nr;
          const double den = i + o.alpha * (p - i) + o.beta * (g - i) + o.smooth_dr;
          const double base = den != 0.0 ? 1.0 - num / den : 0.0;
          double k = 1.0;
          if (o.gamma == 1.0) {
            term = base;
          } else if (base > 0.0) {  // (1 − T)^γ, and 0 with gradient 0 where 1 − T <= 0 (reference)
            term = std::exp(o.gamma * std::log(base));
            k = o.gamma * std::exp((o.gamma - 1.0) * std::log(base));
          } else {
            term = 0.0;
            k = 0.0;
          }
          if (den != 0.0) {
            di = -k * (den - (1.0 - o.alpha - o.beta) * num) / (den * den);
            dp = k * o.alpha * num / (den * den);
          }
        }
        if (reduction == kNone) loss[s * kept + c - first] = static_cast<T>(w * term);
        total += w * term;
        const double a = f * lam * grad_scale * w;
        coef[(s * 2 + 0) * C + c] = static_cast<T>(a * di);
        coef[(s * 2 + 1) * C + c] = static_cast<T>(a * dp);
      }
    }
    total *= f;
  }
  if (reduction == kNone) return;
  if (flags & kCe) {
    // as torch's cross_entropy: a weight enters only through the pixels of its class (an inf or NaN
    // weight of an absent class changes nothing), the mean over Σ w_y, a zero Σ w_y gives 0
    double num = 0.0, den = 0.0;
    std::vector<double> n(C, 0.0), l(C, 0.0);
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t s = 0; s < S; ++s) {
        n[c] += G(s, c);
        l[c] += CE(s, c);
      }
      if (n[c] > 0) {
        const double w = ce_weight != nullptr ? static_cast<double>(ce_weight[c]) : 1.0;
        num += w * l[c];
        den += w * n[c];
      }
    }
    const double b = reduction == kMean ? (den != 0.0 ? 1.0 / den : 0.0) : 1.0;
    for (int64_t c = 0; c < C; ++c) {
      const double w = ce_weight != nullptr ? static_cast<double>(ce_weight[c]) : 1.0;
      ce_scale[c] = static_cast<T>(o.lambda_ce * w * b * grad_scale);
    }
    total = o.lambda_dice * total + o.lambda_ce * num * b;
  }
  *loss = static_cast<T>(total);
}

struct Finalized {
  Tensor loss, coef, ce_scale;
};

Finalized finalize(const Tensor& sums, const Tensor& weight, const Tensor& ce_weight, int64_t kind, int64_t w_type,
                   int64_t flags, const DiceParams& o, int64_t reduction, double grad_scale) {
  const int64_t S = sums.size(0), C = sums.size(2);
  const int64_t kept = (flags & kIncludeBackground) ? C : C - 1;
  const auto opt = sums.options();
  Finalized f;
  f.loss = reduction != kNone ? at::empty({}, opt) : kind == kGeneralized ? at::empty({S}, opt)
                                                                          : at::empty({S, kept}, opt);
  f.coef = at::empty({S, 2, C}, opt);
  f.ce_scale = at::empty({(flags & kCe) ? C : 0}, opt);
  AT_DISPATCH_FLOATING_TYPES(sums.scalar_type(), "dice_finalize", [&] {
    dice_finalize_impl<scalar_t>(sums.data_ptr<scalar_t>(), S, C,
                                 weight.defined() ? weight.data_ptr<scalar_t>() : nullptr,
                                 ce_weight.defined() ? ce_weight.data_ptr<scalar_t>() : nullptr, kind, w_type, flags,
                                 o, reduction, grad_scale, f.loss.data_ptr<scalar_t>(), f.coef.data_ptr<scalar_t>(),
                                 f.ce_scale.numel() ? f.ce_scale.data_ptr<scalar_t>() : nullptr);
  });
  return f;
}

Tensor check_logits(const Tensor& x, const Tensor& target) {
  TORCH_CHECK(x.device().is_cpu() && target.device().is_cpu(), "fused_imbalance cpp ops: tensors must be on the CPU");
  TORCH_CHECK(x.dim() >= 2 && x.size(1) >= 1, "fused_imbalance: logits must be (N, C) or (B, C, d1, ...) with C >= 1");
  int64_t n = x.size(0);
  for (int64_t d = 2; d < x.dim(); ++d) n *= x.size(d);
  TORCH_CHECK(target.numel() == n, "fused_imbalance: target has ", target.numel(), " labels for ", n, " pixels");
  return collapsible(x) ? x : x.contiguous();
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cpp_dice_fwd_cpu(
    const Tensor& x_in, const Tensor& target_in, const std::optional<Tensor>& weight_in,
    const std::optional<Tensor>& ce_weight_in, const std::optional<Tensor>& confusion_in, int64_t kind,
    int64_t w_type, int64_t flags, at::ArrayRef<double> params, int64_t ignore_index, int64_t reduction,
    bool validate, bool finalize_now) {
  const Tensor x = check_logits(x_in, target_in);
  check_options(kind, w_type, flags, reduction);
  const DiceParams o = dice_params(params);
  const Tensor target = target_in.contiguous();
  const int64_t C = x.size(1), N = target.numel();
  const auto acc = acc_dtype(x);
  const Tensor weight = class_vector(weight_in, C, acc, "weight");
  const Tensor ce_weight = class_vector(ce_weight_in, C, acc, "ce_weight");
  const Tensor confusion = checked_confusion(confusion_in, C);
  const DiceView d = dice_view(x, nullptr, flags);
  Tensor sums = at::empty({d.groups, 4, C}, x.options().dtype(acc));
  Tensor bad = at::empty({2}, x.options().dtype(at::kLong));
  bad.data_ptr<int64_t>()[0] = 0;
  bad.data_ptr<int64_t>()[1] = std::numeric_limits<int64_t>::min();
  dispatch_logits(x.scalar_type(), [&](auto xt, auto tt) {
    using X = typename decltype(xt)::type;
    using T = typename decltype(tt)::type;
    dispatch_labels(target.scalar_type(), [&](auto lt) {
      using L = typename decltype(lt)::type;
      const L* labels = target.data_ptr<L>();
      // nothing is added into the caller's matrix from labels that will raise
      if (validate && confusion.defined() && count_bad_labels(labels, N, C, ignore_index) > 0)
        raise_bad_labels(labels, N, C, ignore_index);
      const int64_t nbad = dice_pass<X, T, L>(x, d, labels, ignore_index, flags & kSquared, flags & kCe,
                                              confusion.defined() ? confusion.data_ptr<int64_t>() : nullptr,
                                              sums.data_ptr<T>());
      record_bad(nbad, labels, N, C, ignore_index, validate, bad);
    });
  });
  if (!finalize_now)  // three distinct empty outputs: an op's outputs must not alias each other
    return {at::empty({0}, sums.options()), sums, at::empty({0}, sums.options()), at::empty({0}, sums.options()), bad};
  const Finalized f = finalize(sums, weight, ce_weight, kind, w_type, flags, o, reduction, 1.0);
  return {f.loss, sums, f.coef, f.ce_scale, bad};
}

std::tuple<Tensor, Tensor, Tensor> cpp_dice_finalize_cpu(const Tensor& sums_in, const std::optional<Tensor>& weight_in,
                                                         const std::optional<Tensor>& ce_weight_in, int64_t kind,
                                                         int64_t w_type, int64_t flags, at::ArrayRef<double> params,
                                                         int64_t reduction, double grad_scale) {
  TORCH_CHECK(sums_in.device().is_cpu() && sums_in.dim() == 3 && sums_in.size(1) == 4 &&
                  (sums_in.scalar_type() == at::kFloat || sums_in.scalar_type() == at::kDouble),
              "fused_imbalance: sums must be a float32 or float64 (S, 4, C) tensor on the CPU");
  check_options(kind, w_type, flags, reduction);
  const Tensor sums = sums_in.contiguous();
  const int64_t C = sums.size(2);
  const Tensor weight = class_vector(weight_in, C, sums.scalar_type(), "weight");
  const Tensor ce_weight = class_vector(ce_weight_in, C, sums.scalar_type(), "ce_weight");
  const Finalized f = finalize(sums, weight, ce_weight, kind, w_type, flags, dice_params(params), reduction, grad_scale);
  return {f.loss, f.coef, f.ce_scale};
}

Tensor cpp_dice_bwd_cpu(const Tensor& x_in, const Tensor& target_in, const Tensor& coef_in,
                        const std::optional<Tensor>& ce_scale_in, const Tensor& grad_in, int64_t kind, int64_t flags,
                        int64_t ignore_index, int64_t reduction) {
  const Tensor x = check_logits(x_in, target_in);
  check_options(kind, kSquare, flags, reduction);
  const Tensor target = target_in.contiguous();
  const int64_t C = x.size(1);
  const auto acc = acc_dtype(x);
  Tensor grad = at::empty_like(x_in);  // the dtype, shape and memory format of the logits
  Tensor work = collapsible(grad) ? grad : at::empty_like(x);
  const DiceView d = dice_view(x, &work, flags);
  const int64_t S = d.groups, first = (flags & kIncludeBackground) ? 0 : 1, kept = C - first;
  TORCH_CHECK(coef_in.device().is_cpu() && coef_in.numel() == S * 2 * C,
              "fused_imbalance: coef must be the forward's (", S, ", 2, ", C, ") coefficients on the CPU");
  const bool ce = flags & kCe;
  TORCH_CHECK(!ce || (ce_scale_in.has_value() && ce_scale_in->numel() == C && ce_scale_in->device().is_cpu()),
              "fused_imbalance: ce_scale must have one value per class on the CPU");
  TORCH_CHECK(grad_in.device().is_cpu(), "fused_imbalance: the upstream gradient must be on the CPU");
  const int64_t want = reduction != kNone ? 1 : kind == kGeneralized ? S : S * kept;
  TORCH_CHECK(grad_in.numel() == want, "fused_imbalance: the upstream gradient has ", grad_in.numel(),
              " elements for ", want, " terms");
  if (x.numel() == 0) return grad;
  // the upstream gradient folded into the coefficients: a_I, a_P (S, C) and the CE factor (C,)
  const Tensor coef = coef_in.to(acc).reshape({S, 2, C});
  const Tensor up = grad_in.to(acc).reshape({-1});
  Tensor scaled;
  if (reduction != kNone) {
    scaled = coef * up;
  } else {
    Tensor u = kind == kGeneralized ? up.reshape({S, 1}).expand({S, C}).clone()
                                    : at::constant_pad_nd(up.reshape({S, kept}), {first, 0});
    scaled = coef * u.reshape({S, 1, C});
  }
  scaled = scaled.contiguous();
  Tensor ce_a = ce ? (ce_scale_in->to(acc) * up).contiguous() : Tensor();
  const DicePlan plan = dice_plan(d);
  const int64_t P = plan.P, blocks = d.x.B * plan.bpi;
  dispatch_logits(x.scalar_type(), [&](auto xt, auto tt) {
    using X = typename decltype(xt)::type;
    using T = typename decltype(tt)::type;
    dispatch_labels(target.scalar_type(), [&](auto lt) {
      using L = typename decltype(lt)::type;
      const L* labels = target.data_ptr<L>();
      const X* xd = x.data_ptr<X>();
      X* gd = work.data_ptr<X>();
      const T* sc = scaled.data_ptr<T>();
      const T* cea = ce ? ce_a.data_ptr<T>() : nullptr;
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        std::vector<int32_t> y(P);
        std::vector<T> ebuf(C * P), xbuf, gbuf;
        DiceBwdBlock<T> bb;
        bb.C = C;
        bb.P = P;
        bb.y = y.data();
        bb.squared = flags & kSquared;
        bb.ce = cea;
        bb.ebuf = ebuf.data();
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t b = blk / plan.bpi, s0 = (blk % plan.bpi) * P, cnt = std::min(P, d.x.S - s0);
          const int64_t g = b / d.per_group;
          bb.a_i = sc + g * 2 * C;
          bb.a_p = sc + g * 2 * C + C;
          load_labels(labels, b * d.x.S + s0, cnt, P, C, ignore_index, y.data());
          std::tie(bb.x, bb.x_stride) = dice_block_in<X, T>(xd, d.x, b, s0, cnt, P, xbuf);
          const bool direct = std::is_same<X, T>::value && d.g.ss == 1 && cnt == P;
          if (direct) {
            bb.g = reinterpret_cast<T*>(gd + b * d.g.sb + s0);
            bb.g_stride = d.g.sc;
          } else {
            if (gbuf.empty()) gbuf.resize(C * P);
            bb.g = gbuf.data();
            bb.g_stride = P;
          }
          dice_bwd_block(bb);
          if (!direct) dice_block_out<X, T>(gbuf.data(), d.g, b, s0, cnt, P, gd);
        }
      });
    });
  });
  if (!work.is_same(grad)) grad.copy_(work);
  return grad;
}

TORCH_LIBRARY_IMPL(fused_imbalance, CPU, m) {
  m.impl("cpp_dice_fwd", &cpp_dice_fwd_cpu);
  m.impl("cpp_dice_finalize", &cpp_dice_finalize_cpu);
  m.impl("cpp_dice_bwd", &cpp_dice_bwd_cpu);
}

}  // namespace cpu
}  // namespace fused_imbalance
