// The per-block math of the CPU loss kernels: one block is P pixels × C classes, stored
// class-major (x[k * stride + p]), which is an NCHW plane as it lies in memory and a
// transposed copy for the other layouts (loss_cpu.cpp does the gathering and the
// per-class bookkeeping). Everything here is plain C++ over raw pointers so that the
// kernels can be compiled for several instruction sets (loss_kernels.cpp).
#pragma once

#include <cstdint>

namespace fused_imbalance {
namespace cpu {

// Mirrors fused_imbalance.ops.Mode.
enum Mode : int64_t {
  kSoftmaxFocal = 0,
  kSigmoidFocal = 1,
  kMseLogits = 2,
  kMseSoftmax = 3,
  kStats = 4,
};

// Pixels per block: a multiple of every vector width (8 floats, 4 doubles).
constexpr int64_t kBlockAlign = 16;

template <typename T>
struct FwdBlock {
  const T* x;          // logits of class k, pixel p at x[k * x_stride + p]
  int64_t x_stride;    // int64: a class plane can hold more than 2^31 elements
  int64_t C;           // classes
  int64_t P;           // pixels, a multiple of kBlockAlign (padding lanes have y = -1)
  const int32_t* y;    // (P,) label, -1 for ignored, bad or padding pixels
  const T* tvy;        // (P,) tvals[y] (MSE modes), 0 where y = -1
  double gamma;        // focal exponent, >= 0
  T* loss;             // (P,) out: the unweighted per-pixel loss, 0 where y = -1
  int32_t* argmax;     // (P,) out: first index of the largest logit; nullptr: not wanted
  T* lse = nullptr;    // (P,) out, softmax focal only: log Σ_k exp(x_k); nullptr: not wanted
};

template <typename T>
struct BwdBlock {
  const T* x;          // as in FwdBlock
  int64_t x_stride;
  T* g;                // gradient of class k, pixel p at g[k * g_stride + p]
  int64_t g_stride;
  int64_t C;
  int64_t P;
  const int32_t* y;
  const T* tvy;
  const T* coef;       // (P,) grad_pixel[n] + grad_class[y_n], 0 where y = -1
  double gamma;
  // Optional, softmax focal only: (P,) the forward's log-sum-exp (FwdBlock::lse) of each pixel;
  // then p_k = exp(x_k − lse) in one pass over the classes, without the max and the sum.
  const T* lse = nullptr;
  T* pix = nullptr;    // (2·P) scratch for per-pixel values (the softmax focal factors)
  // (C·P) scratch for the softmax modes' exponentials between their passes, class stride P;
  // nullptr: they go into g. When g is an NCHW gradient, its class rows lie a plane apart (a
  // power of two, often): the C rows of a vector of pixels then share a few cache sets.
  T* ebuf = nullptr;
  // Optional (the upsampled backward, upsample_cpu.cpp): with acc0 set, the gradient is not
  // stored into g (then only scratch) but added, times acc_w0, into acc0[k * acc_stride + p]
  // and, with acc1 set, times acc_w1 into acc1: o += w·g, element by element (a fused
  // multiply-add in the copies that have one).
  T* acc0 = nullptr;
  T* acc1 = nullptr;
  T acc_w0 = T(0), acc_w1 = T(0);
  int64_t acc_stride = 0;
};

void loss_fwd_block(int64_t mode, const FwdBlock<float>& b);
void loss_fwd_block(int64_t mode, const FwdBlock<double>& b);
void loss_bwd_block(int64_t mode, const BwdBlock<float>& b);
void loss_bwd_block(int64_t mode, const BwdBlock<double>& b);

// Pixel-major rows (pixel p, class k at rows[p * pixel_stride + k]: channels_last, (N, C))
// to a class-major block (block[k * P + p]) and back, for cnt <= P pixels.
void rows_to_block(const float* rows, int64_t pixel_stride, int64_t cnt, int64_t C, float* block,
                   int64_t P);
void rows_to_block(const double* rows, int64_t pixel_stride, int64_t cnt, int64_t C,
                   double* block, int64_t P);
void block_to_rows(const float* block, int64_t P, int64_t cnt, int64_t C, float* rows,
                   int64_t pixel_stride);
void block_to_rows(const double* block, int64_t P, int64_t cnt, int64_t C, double* rows,
                   int64_t pixel_stride);

// The row loops of the resize (upsample_cpu.cpp), all in the accumulation dtype:
// resize_rows: the horizontal pass of C class rows, src contiguous (class k at src[k * w], w
//   elements), i0 <= i1 < w both nondecreasing in X:
//   d[k * ds + X] = s[i0[X]]·w0[X] + s[i1[X]]·w1[X], s = src + k·w (torch's order; nearest:
//   s[i0[X]]) for X < n;
// blend_block: the vertical pass of a block, d[k * P + p] = a[k * s + p]·w0 + b[k * s + p]·w1
//   for k < C, p < P.
void resize_rows(const float* src, int64_t C, int64_t w, const int32_t* i0, const int32_t* i1, const float* w0,
                 const float* w1, bool nearest, float* d, int64_t ds, int64_t n);
void resize_rows(const double* src, int64_t C, int64_t w, const int32_t* i0, const int32_t* i1,
                 const double* w0, const double* w1, bool nearest, double* d, int64_t ds, int64_t n);
void blend_block(const float* a, const float* b, int64_t s, float w0, float w1, int64_t C, float* d, int64_t P);
void blend_block(const double* a, const double* b, int64_t s, double w0, double w1, int64_t C, double* d,
                 int64_t P);
// The transposed horizontal pass of the upsampled backward, on pixel-major rows (v[X * C + k]):
// out[x * C + k] = Σ tw[t] · v[tX[t] * C + k] over the taps t of x, [start[x], start[x + 1]),
// summed from 0 in increasing t, for x < w.
void tap_sums(const float* v, int64_t C, const int64_t* start, const int64_t* tX, const float* tw, int64_t w,
              float* out);
void tap_sums(const double* v, int64_t C, const int64_t* start, const int64_t* tX, const double* tw,
              int64_t w, double* out);

// The instruction set of the copy in use: "base", "avx2" or "avx512".
const char* cpu_isa_name();

}  // namespace cpu
}  // namespace fused_imbalance
