// CUDA kernel of fused_imbalance::cpp_class_stats: per-class valid counts, true positives,
// out-of-range labels and the argmax confusion matrix, in one read of the logits.
//
// One thread per pixel (grid-stride) finds the argmax over the classes; adjacent threads
// read adjacent pixels, which is coalesced for NCHW. Each block counts into shared-memory
// histograms and adds them to the int64 outputs once at the end, so the global atomics
// are C-per-block rather than one per pixel. When the (C, C) confusion table does not fit
// in shared memory it is counted with global atomics instead (spread over C^2 counters).
// Integer counts are exact in any order: the result is deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../dispatch.h"
#include "../pixel_view.h"

namespace fused_imbalance {
namespace cuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int64_t kSharedBytes = 48 * 1024;  // without the opt-in for larger shared memory

template <typename X>
struct Acc {
  using type = float;  // float16/bfloat16/float32 compare in float32
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename X, typename L>
__global__ void class_stats_kernel(
    const X* __restrict__ x,          // logits, pixel n = b * S + s at b*sb + k*sc + s*ss
    PixelView v,                      // sizes and strides of x
    const L* __restrict__ target,     // (N,) labels
    int64_t ignore_index,             // label of ignored pixels
    int64_t N,                        // pixels, int64: B*S can exceed 2^31
    bool shared_stats,                // count/tp/bad histograms in shared memory
    bool shared_confusion,            // (C, C) histogram in shared memory too
    unsigned long long* count,        // (C,) out, added to
    unsigned long long* tp,           // (C,) out, added to
    unsigned long long* bad,          // () out, added to
    unsigned long long* confusion) {  // (C, C) out, added to; nullptr: not wanted
  extern __shared__ unsigned int smem[];  // count[C], tp[C], bad, confusion[C*C]
  const int64_t C = v.C;
  unsigned int* s_count = smem;
  unsigned int* s_tp = smem + C;
  unsigned int* s_bad = smem + 2 * C;
  unsigned int* s_conf = smem + 2 * C + 1;
  const int64_t n_shared =
      shared_stats ? 2 * C + 1 + (shared_confusion ? C * C : 0) : 0;
  for (int64_t i = threadIdx.x; i < n_shared; i += blockDim.x) smem[i] = 0;
  __syncthreads();

  using T = typename Acc<X>::type;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < N; n += stride) {
    const int64_t label = static_cast<int64_t>(target[n]);
    if (label == ignore_index) continue;
    if (label < 0 || label >= C) {
      if (shared_stats) atomicAdd(s_bad, 1u);
      else atomicAdd(bad, 1ull);
      continue;
    }
    const int64_t b = n / v.S, s = n - b * v.S;
    const X* px = x + b * v.sb + s * v.ss;
    // torch.argmax: the first index of the largest value, or of the first NaN
    T best = static_cast<T>(px[0]);
    int64_t arg = 0;
    bool nan = best != best;
    for (int64_t k = 1; k < C && !nan; ++k) {
      const T val = static_cast<T>(px[k * v.sc]);
      if (val != val) {
        nan = true;
        arg = k;
      } else if (val > best) {
        best = val;
        arg = k;
      }
    }
    if (shared_stats) {
      atomicAdd(s_count + label, 1u);
      if (arg == label) atomicAdd(s_tp + label, 1u);
    } else {
      atomicAdd(count + label, 1ull);
      if (arg == label) atomicAdd(tp + label, 1ull);
    }
    if (confusion != nullptr) {
      if (shared_confusion) atomicAdd(s_conf + label * C + arg, 1u);
      else atomicAdd(confusion + label * C + arg, 1ull);
    }
  }
  if (!shared_stats) return;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < C; i += blockDim.x) {
    if (s_count[i] != 0) atomicAdd(count + i, static_cast<unsigned long long>(s_count[i]));
    if (s_tp[i] != 0) atomicAdd(tp + i, static_cast<unsigned long long>(s_tp[i]));
  }
  if (threadIdx.x == 0 && *s_bad != 0) atomicAdd(bad, static_cast<unsigned long long>(*s_bad));
  if (shared_confusion && confusion != nullptr)
    for (int64_t i = threadIdx.x; i < C * C; i += blockDim.x)
      if (s_conf[i] != 0) atomicAdd(confusion + i, static_cast<unsigned long long>(s_conf[i]));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> class_stats_cuda(const Tensor& x_in,
                                                            const Tensor& target_in,
                                                            int64_t ignore_index,
                                                            bool need_confusion) {
  TORCH_CHECK(x_in.is_cuda() && target_in.device() == x_in.device(),
              "fused_imbalance: logits and target must be on the same CUDA device");
  TORCH_CHECK(x_in.dim() >= 2 && x_in.size(1) >= 1,
              "fused_imbalance: logits must be (N, C) or (B, C, d1, ...) with C >= 1");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = collapsible(x_in) ? x_in : x_in.contiguous();
  const Tensor target = target_in.contiguous();
  const PixelView v = pixel_view(x);
  const int64_t N = v.B * v.S, C = v.C;
  TORCH_CHECK(target.numel() == N, "fused_imbalance: target has ", target.numel(), " labels for ",
              N, " pixels");
  const auto opts = x.options().dtype(at::kLong);
  Tensor count = at::zeros({C}, opts), tp = at::zeros({C}, opts), bad = at::zeros({}, opts);
  Tensor conf = need_confusion ? at::zeros({C, C}, opts) : at::empty({0, 0}, opts);
  if (N == 0) return {count, tp, bad, conf};

  const int64_t stats_bytes = (2 * C + 1) * int64_t(sizeof(unsigned int));
  const int64_t conf_bytes = C * C * int64_t(sizeof(unsigned int));
  const bool shared_stats = stats_bytes <= kSharedBytes;
  const bool shared_confusion = need_confusion && shared_stats && stats_bytes + conf_bytes <= kSharedBytes;
  const size_t smem = shared_stats ? stats_bytes + (shared_confusion ? conf_bytes : 0) : 0;

  // Enough blocks to fill the GPU, and enough that a block's 32-bit shared counters cannot
  // overflow (at most 2^30 pixels per block).
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  int64_t blocks = std::min<int64_t>((N + kThreads - 1) / kThreads, int64_t(sms) * 8);
  blocks = std::max<int64_t>(blocks, (N + (int64_t(1) << 30) - 1) >> 30);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto ull = [](const Tensor& t) {
    return reinterpret_cast<unsigned long long*>(t.data_ptr<int64_t>());
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cpp_class_stats", [&] {
    using X = scalar_t;
    dispatch_labels(target.scalar_type(), [&](auto lt) {
      using L = typename decltype(lt)::type;
      class_stats_kernel<X, L><<<blocks, kThreads, smem, stream>>>(
          x.data_ptr<X>(), v, target.data_ptr<L>(), ignore_index, N, shared_stats,
          shared_confusion, ull(count), ull(tp), ull(bad),
          need_confusion ? ull(conf) : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {count, tp, bad, conf};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_imbalance, CUDA, m) {
  m.impl("cpp_class_stats", &class_stats_cuda);
}

}  // namespace cuda
}  // namespace fused_imbalance
