// CPU implementations of fused_imbalance::cpp_upsample_loss_fwd / cpp_upsample_loss_bwd: the
// loss of docs/DESIGN.md §10 on low-resolution logits x (B, C, h, w) against labels (B, H, W), equal
// to F.interpolate(x, size=(H, W), mode, align_corners) followed by the loss, without ever
// holding more than a few interpolated rows.
//
// The interpolation is separable and is computed exactly as torch's CPU upsample kernels do:
// for each low-resolution row y the horizontal pass h_y[k, X] = x[k, y, x0(X)]·wx0(X) +
// x[k, y, x1(X)]·wx1(X), then out[k, Y, X] = h_{y0(Y)}[k, X]·wy0(Y) + h_{y1(Y)}[k, X]·wy1(Y)
// (nearest: out = x[k, yn(Y), xn(X)]). The indices and weights are those of
// aten/native/UpSample.h (area_pixel_compute_source_index, guard_index_and_lambda,
// nearest_idx), in the accumulation dtype. The interpolated block of a row of P pixels × C
// classes goes through the same per-block loss kernels as the plain loss (loss_kernels.h).
//
// Forward: chunks of full-resolution rows (a chunk never depends on the thread count); each
// chunk keeps the two horizontal rows it needs (each low-resolution row is interpolated once
// per chunk, and a chunk spans at least 4·⌈H/h⌉ rows so that the rows it refills at its start
// stay a small share) and sums its losses in a fixed order into its own per-class slot; the
// slots are added in chunk order, so the sums are bit-identical run to run and for any thread
// count. The horizontal pass (resize_rows) first copies the C class rows of the low-resolution
// row into one contiguous buffer (widened to the accumulation dtype: any layout, any dtype),
// then takes the two sources of a vector of outputs from one window of a row by lane shuffles
// when they fit one (an upsampling), the class loop inside so that the lane indices and weights
// stay in registers.
// Threads take chunks (and backward bands) one at a time from a shared counter
// (for_each_task), so a thread that runs late on a busy machine does not hold up a fixed share.
//
// Backward (deterministic, no float atomics): the separable transposed interpolation, vertical
// then horizontal. A task owns a band of low-resolution rows [ya, yb) of one image and walks the
// full-resolution rows Y whose interpolation uses one of them, in increasing Y (a block of
// columns at a time through each run of rows that share their two low-resolution rows, so that
// the block's slices stay in cache; every element still sums its rows in increasing Y); for each Y it
// recomputes the interpolated row and the loss gradient of its pixels (C × W, one block at a
// time, never stored: the block kernel adds it, times wy, as it computes it, BwdBlock::acc0/acc1;
// a softmax loss takes each pixel's log-sum-exp from the forward when autograd kept it, so that
// the gradient is one pass over the classes, one exponential per logit, instead of three)
// into the full-width accumulator of each of its low-resolution rows y0(Y), y1(Y) (C × W each,
// two open at a time: y0 and y1 are consecutive and nondecreasing in Y). Once Y has passed a
// low-resolution row, that row's accumulator is transposed to pixel-major (W × C, tiles) and
// goes through the horizontal transpose (out[x] = Σ taps of x, a fixed list in increasing X,
// each tap a vector over the classes: tap_sums) into the gradient. Every low-resolution gradient element is therefore the same
// sum in the same order whatever the bands are, i.e. whatever the thread count. Sums are in the
// accumulation dtype (float for float32 and 16-bit logits, as torch's upsample backward): an
// element sums at most (⌈H/h⌉ + 1)·(⌈W/w⌉ + 1) terms in a fixed order.
// Cost model: a full-resolution row costs C·W·(loss gradient + 3 flops of vertical
// interpolation + 4 of vertical accumulation); a low-resolution row C·W·(3 flops of horizontal
// interpolation + 2 tile transposes + 2·2 flops of horizontal transpose), i.e. h/H of that per
// full-resolution row. The rows next to a band boundary feed two bands and are computed twice:
// about 1/R of the work for bands of R rows, so the plan (plan_bands) keeps bands of at least 8
// rows and makes only about two tasks per thread. Memory: per thread one widened
// low-resolution row (C·w), two horizontal rows, two accumulators and their pixel-major copy
// (5·C·W) and one block, never anything of B·C·H·W elements.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../dispatch.h"
#include "loss_kernels.h"
#include "op_common.h"

namespace fused_imbalance {
namespace cpu {
namespace {

using at::Tensor;

enum Interp : int64_t { kNearest = 0, kBilinear = 1 };

// One axis of the resize: output index -> two source indices and their weights (nearest: one).
template <typename T>
struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<T> w0, w1;
};

template <typename T>
Axis<T> make_axis(int64_t in, int64_t out, int64_t interp, bool align_corners) {
  Axis<T> a;
  a.i0.resize(out);
  a.i1.resize(out);
  a.w0.resize(out);
  a.w1.resize(out);
  if (interp == kNearest) {
    // nearest_idx: the scale is float whatever the dtype, and sizes 1x and 2x are special cases
    const float scale = static_cast<float>(in) / out;
    for (int64_t d = 0; d < out; ++d) {
      int64_t s;
      if (out == in) s = d;
      else if (out == 2 * in) s = d >> 1;
      else s = std::min(static_cast<int64_t>(std::floor(static_cast<float>(d) * scale)), in - 1);
      a.i0[d] = a.i1[d] = s;
      a.w0[d] = T(1);
      a.w1[d] = T(0);
    }
    return a;
  }
  const T scale = align_corners ? (out > 1 ? static_cast<T>(in - 1) / static_cast<T>(out - 1) : T(0))
                                : static_cast<T>(in) / static_cast<T>(out);
  for (int64_t d = 0; d < out; ++d) {
    if (out == in) {  // compute_source_index_and_lambda: scale factor 1 is a copy
      a.i0[d] = a.i1[d] = d;
      a.w0[d] = T(1);
      a.w1[d] = T(0);
      continue;
    }
    T src = align_corners ? scale * static_cast<T>(d) : scale * (static_cast<T>(d) + T(0.5)) - T(0.5);
    if (!align_corners && src < T(0)) src = T(0);
    // guard_index_and_lambda: floorf, i.e. the index of a double source position is taken in float
    const int64_t i = std::min(static_cast<int64_t>(std::floor(static_cast<float>(src))), in - 1);
    const T lambda = std::min(std::max(src - static_cast<T>(i), T(0)), T(1));
    a.i0[d] = i;
    a.i1[d] = i + (i < in - 1 ? 1 : 0);
    a.w0[d] = T(1) - lambda;
    a.w1[d] = lambda;
  }
  return a;
}

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// body(next) on each of torch's intra-op threads, next() handing out the tasks 0 .. n − 1 one at
// a time (then −1) from a shared counter rather than in fixed shares: on a machine shared with
// other jobs, a thread that starts late or is descheduled leaves its tasks to the others instead
// of holding the pass up by a whole share. Which thread runs a task never changes a result.
// At most one thread per kGrain interpolated logits of work: on a small input the threads'
// start-up and wait cost more than they save (and much more on a busy machine), as with the
// grain size of at::parallel_for.
constexpr int64_t kGrain = 1 << 16;

int64_t useful_threads(int64_t work) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work / kGrain));
}

template <typename F>
void for_each_task(int64_t n, int64_t threads, F&& body) {
  std::atomic<int64_t> counter{0};
  auto next = [&]() -> int64_t {
    const int64_t t = counter.fetch_add(1, std::memory_order_relaxed);
    return t < n ? t : -1;
  };
  threads = std::max<int64_t>(1, std::min(n, threads));
  if (threads == 1) {
    body(next);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { body(next); });
}

// Pixels per block: about `logits` interpolated logits, at least min_pixels, a multiple of
// kBlockAlign. The forward reads its block two or three times (8 K logits: L1/L2-sized); the
// backward reads it once but adds into two accumulator slices of the same size, and runs
// fastest with about half that (measured on Cityscapes- and ADE-like shapes), but with at
// least 48 pixels, over which the per-pixel work of a class row is spread.
int64_t block_pixels(int64_t C, int64_t Wp, int64_t logits, int64_t min_pixels) {
  int64_t p = std::max<int64_t>((logits / C) / kBlockAlign * kBlockAlign, min_pixels);
  return std::min(p, Wp);
}

// The geometry shared by the forward and the backward.
template <typename T>
struct Resize {
  using Acc = T;
  int64_t B, C, h, w, H, W, Wp;  // Wp: W rounded up to kBlockAlign (row buffers are padded)
  // The class stride of the row buffers: one vector more than Wp, never a power of two, so that
  // the C lines a block kernel reads (or adds) for one vector of pixels spread over the cache
  // sets (with W = 512 a stride of 2 KB would put them into a few).
  int64_t Ws;
  int64_t sb, sc, sh, sw;        // strides of the low-resolution logits (any layout)
  bool nearest;
  Axis<T> ay, ax;
  std::vector<int32_t> xi0, xi1;  // ax.i0, ax.i1 as the int32 lanes of resize_rows
};

template <typename T>
Resize<T> make_resize(const Tensor& x, int64_t H, int64_t W, int64_t interp, bool align_corners) {
  Resize<T> r;
  r.B = x.size(0);
  r.C = x.size(1);
  r.h = x.size(2);
  r.w = x.size(3);
  r.H = H;
  r.W = W;
  r.Wp = round_up(W, kBlockAlign);
  r.Ws = r.Wp + kBlockAlign;
  r.sb = x.stride(0);
  r.sc = x.stride(1);
  r.sh = x.stride(2);
  r.sw = x.stride(3);
  r.nearest = interp == kNearest;
  r.ay = make_axis<T>(r.h, H, interp, align_corners);
  r.ax = make_axis<T>(r.w, W, interp, align_corners);
  TORCH_CHECK(r.w <= std::numeric_limits<int32_t>::max(),
              "fused_imbalance: upsampling needs a low-resolution width below 2^31, got ", r.w);
  r.xi0.assign(r.ax.i0.begin(), r.ax.i0.end());
  r.xi1.assign(r.ax.i1.begin(), r.ax.i1.end());
  return r;
}

// The horizontal pass of low-resolution rows, class-major (class k at [k * Ws + X], zero
// padding up to Ws), cached two at a time: consecutive full-resolution rows use the same or
// the next low-resolution rows, so each is computed once per run of rows.
template <typename X, typename T>
class RowCache {
 public:
  RowCache(const Resize<T>& r, const X* x) : r_(r), x_(x), src_(r.C * r.w) {
    for (int i = 0; i < 2; ++i) buf_[i].assign(r.C * r.Ws, T(0));
  }

  // Row y of image b; `keep` (another row) is not evicted.
  const T* get(int64_t b, int64_t y, int64_t keep) {
    const int64_t key = b * r_.h + y, keep_key = b * r_.h + keep;
    for (int i = 0; i < 2; ++i)
      if (tag_[i] == key) return buf_[i].data();
    const int i = tag_[0] == keep_key ? 1 : 0;
    fill(b, y, buf_[i].data());
    tag_[i] = key;
    return buf_[i].data();
  }

 private:
  // The C class rows of low-resolution row y, contiguous and widened (src_[k * w + x]), then
  // their horizontal pass, in torch's order x[x0]·w0 + x[x1]·w1.
  void fill(int64_t b, int64_t y, T* out) {
    const int64_t C = r_.C, w = r_.w, sc = r_.sc, sw = r_.sw;
    const X* base = x_ + b * r_.sb + y * r_.sh;  // int64: B*C*h*w can exceed 2^31
    T* dst = src_.data();
    if (sw == 1) {
      // Class rows lie a plane apart, so the hardware does not fetch them ahead: ask for the
      // row kAhead classes on (a hint, no effect on any value).
      constexpr int64_t kAhead = 8, kLine = 64 / sizeof(X);
      auto prefetch_row = [&](int64_t k) {
        if (k >= C) return;
        for (int64_t o = 0; o < w; o += kLine) __builtin_prefetch(base + k * sc + o);
        __builtin_prefetch(base + k * sc + w - 1);
      };
      for (int64_t k = 0; k < kAhead; ++k) prefetch_row(k);
      for (int64_t k = 0; k < C; ++k) {
        prefetch_row(k + kAhead);
        const X* s = base + k * sc;
        for (int64_t xs = 0; xs < w; ++xs) dst[k * w + xs] = static_cast<T>(s[xs]);
      }
    } else {  // channels_last and other strides: walk the pixels, classes inside
      for (int64_t xs = 0; xs < w; ++xs)
        for (int64_t k = 0; k < C; ++k) dst[k * w + xs] = static_cast<T>(base[k * sc + xs * sw]);
    }
    resize_rows(dst, C, w, r_.xi0.data(), r_.xi1.data(), r_.ax.w0.data(), r_.ax.w1.data(), r_.nearest, out, r_.Ws,
                r_.W);
  }

  const Resize<T>& r_;
  const X* x_;
  std::vector<T> buf_[2];
  std::vector<T> src_;  // the widened class rows of one low-resolution row (C × w)
  int64_t tag_[2] = {-1, -1};
};

// Interpolated logits of pixels X0 .. X0 + P of full-resolution row Y (P a multiple of
// kBlockAlign, padding lanes 0): a pointer and class stride, into `buf` unless no vertical
// blend is needed (nearest).
template <typename T>
std::pair<const T*, int64_t> interpolated_block(const Resize<T>& r, const T* r0, const T* r1, int64_t Y,
                                                int64_t X0, int64_t P, std::vector<T>& buf) {
  if (r.nearest) return {r0 + X0, r.Ws};
  blend_block(r0 + X0, r1 + X0, r.Ws, r.ay.w0[Y], r.ay.w1[Y], r.C, buf.data(), P);  // torch's order: h0·wy0 + h1·wy1
  return {buf.data(), P};
}

template <typename X, typename T, typename L>
Totals upsample_fwd_kernel(const Tensor& x, const Resize<T>& r, const L* labels, int64_t mode, double gamma,
                           const T* tvals, int64_t ignore_index, const FwdOut& out) {
  const int64_t C = r.C, W = r.W, rows = r.B * r.H;
  // Chunks of whole rows, at least 64 K logits each, at most 256 chunks and 256 K per-class slots.
  int64_t chunks = std::min<int64_t>((rows * W * C + 65535) / 65536, 256);
  chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, (int64_t(1) << 18) / C));
  chunks = std::max<int64_t>(1, std::min(chunks, rows));
  // A chunk refills the horizontal rows it starts with: at least 4·⌈H/h⌉ rows keep that under
  // about a quarter of the horizontal work.
  const int64_t per = std::max((rows + chunks - 1) / chunks, std::min(rows, 4 * ((r.H + r.h - 1) / r.h)));
  chunks = (rows + per - 1) / per;
  ChunkSlots slots(chunks, C);
  const X* xd = x.data_ptr<X>();
  T* pixel_loss = static_cast<T*>(out.pixel_loss);
  const T* weight = static_cast<const T*>(out.weight);
  T* lse_out = static_cast<T*>(out.lse);
  const int64_t Pb = block_pixels(C, r.Wp, 8192, kBlockAlign);

  for_each_task(chunks, useful_threads(rows * W * C), [&](auto&& next) {
    RowCache<X, T> cache(r, xd);
    std::vector<T> buf(r.nearest ? 0 : C * Pb), tvy(Pb, T(0)), loss(Pb), lse(lse_out != nullptr ? Pb : 0);
    std::vector<int32_t> y(Pb), argmax(Pb);
    ClassBanks banks(C);
    ConfusionCounts confusion(out.confusion, C, rows * W);
    FwdBlock<T> fb;
    fb.C = C;
    fb.y = y.data();
    fb.tvy = tvy.data();
    fb.gamma = gamma;
    fb.loss = loss.data();
    fb.argmax = out.need_argmax ? argmax.data() : nullptr;  // else not wanted
    fb.lse = lse_out != nullptr ? lse.data() : nullptr;
    for (int64_t chunk; (chunk = next()) >= 0;) {
      banks.clear();
      int64_t bad = 0;
      const int64_t row_end = std::min(rows, (chunk + 1) * per);
      for (int64_t row = chunk * per; row < row_end; ++row) {
        const int64_t b = row / r.H, Y = row % r.H;
        const int64_t y0 = r.ay.i0[Y], y1 = r.ay.i1[Y];
        const T* r0 = cache.get(b, y0, y1);
        const T* r1 = r.nearest ? r0 : cache.get(b, y1, y0);
        for (int64_t X0 = 0; X0 < W; X0 += Pb) {
          const int64_t cnt = std::min(Pb, W - X0), P = round_up(cnt, kBlockAlign);
          const int64_t n0 = row * W + X0;  // int64: B*H*W can exceed 2^31
          std::tie(fb.x, fb.x_stride) = interpolated_block(r, r0, r1, Y, X0, P, buf);
          fb.P = P;
          bad += forward_block(mode, fb, labels, n0, cnt, ignore_index, tvals, y.data(), tvy.data(), pixel_loss,
                               weight, banks, confusion);
          if (lse_out != nullptr) std::copy(lse.data(), lse.data() + cnt, lse_out + n0);
        }
      }
      slots.store(chunk, banks, bad);
    }
    confusion.flush();
  });
  return slots.finish();
}

// Bands of low-resolution rows per image for the backward: tasks (B·bands) enough for two per
// thread, so that for_each_task can even out threads that run late, but bands of at least 8
// rows, as each band boundary repeats the full-resolution rows between two low-resolution rows
// (about 1/R of the work for bands of R rows). Only the amount of repeated work depends on the
// plan, never a result.
int64_t plan_bands(int64_t B, int64_t h, int64_t threads) {
  const int64_t want = (2 * threads + B - 1) / B;
  return std::max<int64_t>(1, std::min(want, h / 8));
}

// The transposed horizontal interpolation of one low-resolution row, class k:
// out[k * w + x] = Σ_t tap_w[t] · v[k * Ws + tap_X[t]] over the taps of x in increasing X.
template <typename T>
struct Taps {
  std::vector<int64_t> start;  // (w + 1,) taps of x: [start[x], start[x + 1])
  std::vector<int64_t> X;
  std::vector<T> w;
};

template <typename T>
Taps<T> make_taps(const Resize<T>& r) {
  Taps<T> t;
  std::vector<std::vector<std::pair<int64_t, T>>> per(r.w);
  for (int64_t X0 = 0; X0 < r.W; ++X0) {
    per[r.ax.i0[X0]].push_back({X0, r.ax.w0[X0]});
    if (!r.nearest) per[r.ax.i1[X0]].push_back({X0, r.ax.w1[X0]});
  }
  t.start.assign(r.w + 1, 0);
  for (int64_t x = 0; x < r.w; ++x) {
    t.start[x + 1] = t.start[x] + static_cast<int64_t>(per[x].size());
    for (const auto& tw : per[x]) {
      t.X.push_back(tw.first);
      t.w.push_back(tw.second);
    }
  }
  return t;
}

template <typename X, typename T, typename L>
void upsample_bwd_kernel(const Tensor& x, const Resize<T>& r, const L* labels, const T* up_grad, int64_t up_stride,
                         const T* scale, int64_t mode, double gamma, const T* tvals, int64_t ignore_index,
                         const T* lse_in, Tensor& grad) {
  const int64_t C = r.C, W = r.W, h = r.h, w = r.w, Wp = r.Wp, Ws = r.Ws;
  const X* xd = x.data_ptr<X>();
  X* gd = grad.data_ptr<X>();
  const int64_t gsb = grad.stride(0), gsc = grad.stride(1), gsh = grad.stride(2), gsw = grad.stride(3);
  const int64_t threads = useful_threads(r.B * r.H * W * C);
  const int64_t bands = plan_bands(r.B, h, threads), R = (h + bands - 1) / bands;
  const int64_t Pb = block_pixels(C, Wp, 4096, 3 * kBlockAlign);
  const Taps<T> taps = make_taps(r);
  const int64_t Cp = round_up(C, 8);  // whole vectors in the tap sums (8 floats, two 4-double vectors)

  for_each_task(r.B * bands, threads, [&](auto&& next) {
    RowCache<X, T> cache(r, xd);
    // vt and hg: pixel-major, rows of Cp >= C classes (whole vectors; the padding stays 0)
    std::vector<T> buf(r.nearest ? 0 : C * Pb), gbuf(C * Pb), tvy(Pb, T(0)), coef(Pb), pix(2 * Pb), hg(w * Cp), vt(W * Cp, T(0));
    std::vector<T> vacc[2] = {std::vector<T>(C * Ws), std::vector<T>(C * Ws)};
    std::vector<int32_t> y(Pb);
    std::vector<T> lse(lse_in != nullptr ? Pb : 0, T(0));  // the block's log-sum-exp, padding lanes 0
    BwdBlock<T> bb;
    bb.C = C;
    bb.y = y.data();
    bb.tvy = tvy.data();
    bb.coef = coef.data();
    bb.pix = pix.data();
    bb.gamma = gamma;
    bb.g = gbuf.data();  // scratch: the gradient goes straight into the accumulators
    bb.acc_stride = Ws;  // the row buffers' layout (Resize::Ws)
    bb.lse = lse_in != nullptr ? lse.data() : nullptr;
    for (int64_t task; (task = next()) >= 0;) {
      const int64_t b = task / bands, ya = (task % bands) * R, yb = std::min(h, ya + R);
      int64_t open[2] = {-1, -1};  // the low-resolution row accumulating in vacc[ys & 1]
      int64_t written = ya;        // rows [ya, written) of the band are in grad
      // Row ys of the band is complete: its horizontal transpose goes into grad, and the rows
      // before it that no full-resolution row used (a downsampling) get their zero gradient.
      auto flush = [&](int64_t ys) {
        for (; written < ys; ++written)
          for (int64_t k = 0; k < C; ++k)
            for (int64_t xs = 0; xs < w; ++xs) gd[b * gsb + k * gsc + written * gsh + xs * gsw] = X(0);
        // Pixel-major (vt[X * C + k], a tiled transpose), so that the tap sums of a
        // low-resolution pixel run over contiguous class vectors.
        block_to_rows(vacc[ys & 1].data(), Ws, W, C, vt.data(), Cp);
        tap_sums(vt.data(), Cp, taps.start.data(), taps.X.data(), taps.w.data(), w, hg.data());  // hg[xs * Cp + k]
        X* dst = gd + b * gsb + ys * gsh;  // int64 offsets
        if (std::is_same<X, T>::value && gsw == 1) {  // NCHW: back to class-major, tiled
          rows_to_block(hg.data(), Cp, w, C, reinterpret_cast<T*>(dst), gsc);
        } else if (std::is_same<X, T>::value && gsc == 1) {  // channels_last: a pixel's classes are contiguous
          for (int64_t xs = 0; xs < w; ++xs) std::copy(hg.data() + xs * Cp, hg.data() + xs * Cp + C, dst + xs * gsw);
        } else {
          for (int64_t xs = 0; xs < w; ++xs)
            for (int64_t k = 0; k < C; ++k) dst[k * gsc + xs * gsw] = static_cast<X>(hg[xs * Cp + k]);
        }
        written = ys + 1;
        open[ys & 1] = -1;
      };
      auto flush_below = [&](int64_t limit) {  // the open rows below limit, lower first
        for (;;) {
          const int i = open[0] >= 0 && (open[1] < 0 || open[0] < open[1]) ? 0 : (open[1] >= 0 ? 1 : -1);
          if (i < 0 || open[i] >= limit) return;
          flush(open[i]);
        }
      };
      // Runs of full-resolution rows [Y, Ye) with the same two low-resolution rows: a block of
      // columns goes through every row of its run before the next block, so that its slices of
      // the horizontal rows and of the accumulators stay in the L1/L2 cache across the run.
      for (int64_t Y = 0, Ye; Y < r.H; Y = Ye) {
        const int64_t y0 = r.ay.i0[Y], y1 = r.ay.i1[Y];  // y0 <= y1 <= y0 + 1, both nondecreasing in Y
        Ye = Y + 1;
        while (Ye < r.H && r.ay.i0[Ye] == y0 && r.ay.i1[Ye] == y1) ++Ye;
        if (y1 < ya) continue;
        if (y0 >= yb) break;
        flush_below(y0);  // rows below y0 get nothing from this or any later full-resolution row
        for (const int64_t ys : {y0, y1}) {
          if (ys < ya || ys >= yb || open[ys & 1] == ys) continue;
          std::fill(vacc[ys & 1].begin(), vacc[ys & 1].end(), T(0));
          open[ys & 1] = ys;
        }
        const T* r0 = cache.get(b, y0, y1);
        const T* r1 = r.nearest ? r0 : cache.get(b, y1, y0);
        T* a0 = y0 >= ya && y0 < yb ? vacc[y0 & 1].data() : nullptr;
        T* a1 = !r.nearest && y1 >= ya && y1 < yb ? vacc[y1 & 1].data() : nullptr;
        for (int64_t X0 = 0; X0 < W; X0 += Pb) {
          const int64_t cnt = std::min(Pb, W - X0), P = round_up(cnt, kBlockAlign);
          for (int64_t Yr = Y; Yr < Ye; ++Yr) {
            const int64_t n0 = (b * r.H + Yr) * W + X0;  // int64: B*H*W can exceed 2^31
            load_labels(labels, n0, cnt, P, C, ignore_index, y.data());
            backward_coefficients(y.data(), n0, P, up_grad, up_stride, scale, tvals, coef.data(), tvy.data());
            if (lse_in != nullptr) std::copy(lse_in + n0, lse_in + n0 + cnt, lse.data());
            std::tie(bb.x, bb.x_stride) = interpolated_block(r, r0, r1, Yr, X0, P, buf);
            bb.P = P;
            bb.g_stride = P;
            // Vertical transpose: the block's gradient, weighted, added into its low-resolution
            // rows by the block kernel (padding lanes add 0). Each element sums its
            // full-resolution rows in increasing Y, the y0 row's term before the y1 row's.
            const T wy0 = r.ay.w0[Yr], wy1 = r.ay.w1[Yr];
            bb.acc0 = a0 != nullptr ? a0 + X0 : a1 + X0;
            bb.acc_w0 = a0 != nullptr ? (r.nearest ? T(1) : wy0) : wy1;
            bb.acc1 = a0 != nullptr && a1 != nullptr ? a1 + X0 : nullptr;
            bb.acc_w1 = wy1;
            loss_bwd_block(mode, bb);
          }
        }
      }
      flush_below(yb);
      for (; written < yb; ++written)  // rows no full-resolution row used
        for (int64_t k = 0; k < C; ++k)
          for (int64_t xs = 0; xs < w; ++xs) gd[b * gsb + k * gsc + written * gsh + xs * gsw] = X(0);
    }
  });
}

void check_inputs(const Tensor& x, const Tensor& target, int64_t interp, int64_t mode, double gamma) {
  TORCH_CHECK(x.device().is_cpu() && target.device().is_cpu(),
              "fused_imbalance cpp ops: tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 4, "fused_imbalance: upsampled losses take (B, C, h, w) logits, got ", x.dim(), " dims");
  TORCH_CHECK(target.dim() == 3 && target.size(0) == x.size(0),
              "fused_imbalance: upsampled losses take (B, H, W) labels for (B, C, h, w) logits");
  TORCH_CHECK(x.size(1) >= 1 && x.size(2) >= 1 && x.size(3) >= 1 && target.size(1) >= 1 && target.size(2) >= 1,
              "fused_imbalance: upsampling needs C, h, w, H, W >= 1");
  TORCH_CHECK(interp == kNearest || interp == kBilinear, "fused_imbalance: unknown interpolation ", interp);
  TORCH_CHECK(mode >= kSoftmaxFocal && mode <= kStats, "fused_imbalance: unknown mode ", mode);
  TORCH_CHECK(gamma >= 0.0, "fused_imbalance: gamma must be >= 0, got ", gamma);
}

// f(Tag<X>, Tag<L>, resize) for the logits' dtype X, the labels' dtype L and the geometry in
// the accumulation dtype.
template <typename F>
void dispatch_upsample(const Tensor& x, const Tensor& target, int64_t interp, bool align_corners, F&& f) {
  dispatch_logits(x.scalar_type(), [&](auto xt, auto tt) {
    using T = typename decltype(tt)::type;
    const Resize<T> r = make_resize<T>(x, target.size(1), target.size(2), interp, align_corners);
    dispatch_labels(target.scalar_type(), [&](auto lt) { f(xt, lt, r); });
  });
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cpp_upsample_loss_fwd_cpu(
    const Tensor& x, const Tensor& target_in, int64_t interp, bool align_corners, const std::optional<Tensor>& weight_in,
    const std::optional<Tensor>& tvals_in, const std::optional<Tensor>& confusion_in, int64_t mode, double gamma,
    int64_t ignore_index, int64_t reduction, int64_t weighting, bool need_tp, bool validate, bool need_lse) {
  check_inputs(x, target_in, interp, mode, gamma);
  check_reduction(reduction, weighting);
  need_lse = need_lse && mode == kSoftmaxFocal;
  const Tensor target = target_in.contiguous();
  const int64_t C = x.size(1), N = target.numel();
  const auto acc = acc_dtype(x);
  const Tensor tvals = mse_tvals(mode, tvals_in, x);
  const Tensor weight = class_vector(weight_in, C, acc, "weight");
  TORCH_CHECK(weight.defined() || (weighting != kGeneral && weighting != kPaper),
              "fused_imbalance: this weighting needs class weights");
  const Tensor confusion = checked_confusion(confusion_in, C);
  need_tp = need_tp || weighting == kRecall;
  Tensor loss, scale, count, tp, bad, lse;
  std::tie(loss, scale, count, tp, bad, lse) = forward_outputs(x, C, N, reduction, need_tp, need_lse ? N : 0);
  const bool weigh = reduction == kNone && (weighting == kGeneral || weighting == kPaper);
  if (N == 0 || x.numel() == 0) lse.zero_();
  dispatch_upsample(x, target, interp, align_corners, [&](auto xt, auto lt, const auto& r) {
    using X = typename decltype(xt)::type;
    using T = typename std::decay_t<decltype(r)>::Acc;
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
    out.lse = need_lse ? lse.data_ptr() : nullptr;
    Totals tot;
    if (N > 0 && x.numel() > 0) {
      tot = upsample_fwd_kernel<X, T, L>(x, r, labels, mode, gamma, tvals.defined() ? tvals.data_ptr<T>() : nullptr,
                                         ignore_index, out);
    } else {
      tot = Totals{std::vector<double>(C, 0.0), std::vector<int64_t>(C, 0), std::vector<int64_t>(C, 0), 0};
      if (reduction == kNone) loss.zero_();
    }
    record_bad(tot.bad, labels, N, C, ignore_index, validate, bad);
    finish_forward<T>(tot, weight.defined() ? weight.data_ptr<T>() : nullptr, reduction, weighting, loss, scale, count,
                      tp, need_tp);
    if (reduction == kNone && weighting == kRecall)
      weigh_pixels(loss.data_ptr<T>(), labels, N, C, ignore_index, scale.data_ptr<T>());
  });
  return {loss, scale, count, tp, bad, lse};
}

Tensor cpp_upsample_loss_bwd_cpu(const Tensor& x, const Tensor& target_in, int64_t interp, bool align_corners,
                                 const std::optional<Tensor>& grad_in, const std::optional<Tensor>& scale_in,
                                 const std::optional<Tensor>& tvals_in, const std::optional<Tensor>& lse_in,
                                 int64_t mode, double gamma, int64_t ignore_index) {
  check_inputs(x, target_in, interp, mode, gamma);
  const Tensor target = target_in.contiguous();
  const int64_t C = x.size(1), N = target.numel();
  const auto acc = acc_dtype(x);
  const Tensor tvals = mse_tvals(mode, tvals_in, x);
  const Upstream up = upstream(grad_in, scale_in, N, C, acc);
  // The forward's log-sum-exp (softmax focal only; other modes do not use it), checked before any read.
  Tensor lse;
  if (lse_in.has_value() && lse_in->defined() && lse_in->numel() > 0 && mode == kSoftmaxFocal) {
    TORCH_CHECK(lse_in->dim() == 1 && lse_in->numel() == N && lse_in->scalar_type() == acc &&
                    lse_in->device().is_cpu(),
                "fused_imbalance: lse must be the forward's (", N, ",) ", acc, " log-sum-exp, got ",
                lse_in->sizes(), " ", lse_in->scalar_type());
    lse = lse_in->contiguous();
  }
  Tensor grad = at::empty_like(x);  // the dtype, shape and memory format of the low-resolution logits
  if (x.numel() == 0) return grad;
  if (N == 0 || mode == kStats) return grad.zero_();
  dispatch_upsample(x, target, interp, align_corners, [&](auto xt, auto lt, const auto& r) {
    using X = typename decltype(xt)::type;
    using T = typename std::decay_t<decltype(r)>::Acc;
    using L = typename decltype(lt)::type;
    upsample_bwd_kernel<X, T, L>(x, r, target.data_ptr<L>(), up.grad.defined() ? up.grad.data_ptr<T>() : nullptr,
                                 up.grad_stride, up.scale.defined() ? up.scale.data_ptr<T>() : nullptr, mode, gamma,
                                 tvals.defined() ? tvals.data_ptr<T>() : nullptr, ignore_index,
                                 lse.defined() ? lse.data_ptr<T>() : nullptr, grad);
  });
  return grad;
}

TORCH_LIBRARY_IMPL(fused_imbalance, CPU, m) {
  m.impl("cpp_upsample_loss_fwd", &cpp_upsample_loss_fwd_cpu);
  m.impl("cpp_upsample_loss_bwd", &cpp_upsample_loss_bwd_cpu);
}

}  // namespace cpu
}  // namespace fused_imbalance
