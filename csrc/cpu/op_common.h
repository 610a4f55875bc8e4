// Helpers shared by the CPU ops (loss_cpu.cpp, upsample_cpu.cpp): the logits-dtype
// dispatch, the accumulation dtype, the MSE target values, the labels of a block and the
// incoming gradients of the backward ops.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>

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

}  // namespace cpu
}  // namespace fused_imbalance
