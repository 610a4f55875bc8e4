// Compile-time dispatch on the label dtype, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fused_imbalance {

// Carries a type into a generic lambda: f(Tag<T>{}) then uses typename decltype(tag)::type.
template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void dispatch_labels(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kByte: return f(Tag<uint8_t>{});
    case at::kShort: return f(Tag<int16_t>{});
    case at::kInt: return f(Tag<int32_t>{});
    case at::kLong: return f(Tag<int64_t>{});
    default: TORCH_CHECK(false, "fused_imbalance: target must be uint8, int16, int32 or int64, got ", st);
  }
}

}  // namespace fused_imbalance
