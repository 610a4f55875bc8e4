// Logits (N, C) or (B, C, d1, ..., dk) seen as B × C × S pixels with three strides: the C++
// twin of fused_imbalance.ops.pixel_view / collapsible, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

namespace fused_imbalance {

struct PixelView {
  int64_t B, C, S;     // images, classes, pixels per image
  int64_t sb, sc, ss;  // strides (elements) of image, class and pixel; int64: sizes can pass 2^31
};

// True when the spatial dims of x can be read with one stride.
inline bool collapsible(const at::Tensor& x) {
  int64_t prev_stride = 0;
  bool first = true;
  for (int64_t d = 2; d < x.dim(); ++d) {
    if (x.size(d) == 1) continue;
    if (!first && prev_stride != x.stride(d) * x.size(d)) return false;
    prev_stride = x.stride(d);
    first = false;
  }
  return true;
}

inline PixelView pixel_view(const at::Tensor& x) {
  PixelView v{x.size(0), x.size(1), 1, x.stride(0), x.stride(1), 1};
  if (x.dim() == 2) return v;
  for (int64_t d = 2; d < x.dim(); ++d) v.S *= x.size(d);
  v.ss = x.stride(-1);
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (x.size(d) != 1) {
      v.ss = x.stride(d);
      break;
    }
  }
  return v;
}

}  // namespace fused_imbalance
