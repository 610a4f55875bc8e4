// The portable copy of the block kernels and the run-time choice between the copies
// (loss_kernels_avx2.cpp, loss_kernels_avx512.cpp). The build needs no -march and its output
// does not depend on the build machine; the choice is made once, from the CPU running it.
//
// FUSED_IMBALANCE_CPU_ISA=base|avx2|avx512 caps the choice (for tests and benchmarks; any
// other value is an error). The AVX2 and AVX-512 copies give bit-identical results (both use
// fused multiply-adds); the portable copy rounds those twice and agrees to within a few ulps.
#include "loss_kernels.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#define FI_ISA base
#define FI_VECTOR_BYTES 16  // SSE2 / NEON: wider vectors would be split lane by lane
#include "loss_kernels_impl.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FI_X86_COPIES 1
#else
#define FI_X86_COPIES 0
#endif

namespace fused_imbalance {
namespace cpu {

#define FI_DECLARE_COPY(isa)                                           \
  namespace isa {                                                      \
  void loss_fwd_block(int64_t mode, const FwdBlock<float>& b);         \
  void loss_fwd_block(int64_t mode, const FwdBlock<double>& b);        \
  void loss_bwd_block(int64_t mode, const BwdBlock<float>& b);         \
  void loss_bwd_block(int64_t mode, const BwdBlock<double>& b);        \
  void rows_to_block(const float*, int64_t, int64_t, int64_t, float*, int64_t);     \
  void rows_to_block(const double*, int64_t, int64_t, int64_t, double*, int64_t);   \
  void block_to_rows(const float*, int64_t, int64_t, int64_t, float*, int64_t);     \
  void block_to_rows(const double*, int64_t, int64_t, int64_t, double*, int64_t);   \
  void resize_rows(const float*, int64_t, int64_t, const int32_t*, const int32_t*, const float*, const float*, \
                   bool, float*, int64_t, int64_t);                                                            \
  void resize_rows(const double*, int64_t, int64_t, const int32_t*, const int32_t*, const double*,            \
                   const double*, bool, double*, int64_t, int64_t);                                           \
  void blend_block(const float*, const float*, int64_t, float, float, int64_t, float*, int64_t);       \
  void blend_block(const double*, const double*, int64_t, double, double, int64_t, double*, int64_t);  \
  void tap_sums(const float*, int64_t, const int64_t*, const int64_t*, const float*, int64_t, float*);      \
  void tap_sums(const double*, int64_t, const int64_t*, const int64_t*, const double*, int64_t, double*);   \
  }
#if FI_X86_COPIES
FI_DECLARE_COPY(avx2)
FI_DECLARE_COPY(avx512)
#endif
#undef FI_DECLARE_COPY

namespace {

enum class Isa { kBase, kAvx2, kAvx512 };

Isa detect_isa() {
  Isa best = Isa::kBase;
#if FI_X86_COPIES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq"))
    best = Isa::kAvx512;
#endif
  const char* cap = std::getenv("FUSED_IMBALANCE_CPU_ISA");
  if (cap != nullptr) {
    Isa want;
    if (std::strcmp(cap, "base") == 0) want = Isa::kBase;
    else if (std::strcmp(cap, "avx2") == 0) want = Isa::kAvx2;
    else if (std::strcmp(cap, "avx512") == 0) want = Isa::kAvx512;
    else  // a typo must not silently run another copy than the one asked for
      throw std::invalid_argument(std::string("FUSED_IMBALANCE_CPU_ISA must be base, avx2 or avx512, got '") +
                                  cap + "'");
    if (want < best) best = want;
  }
  return best;
}

Isa isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

}  // namespace

const char* cpu_isa_name() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "base";
  }
}

#if FI_X86_COPIES
#define FI_PICK(call)                              \
  switch (isa()) {                                 \
    case Isa::kAvx512: return avx512::call;        \
    case Isa::kAvx2: return avx2::call;            \
    default: return base::call;                    \
  }
#else
#define FI_PICK(call) return base::call;
#endif

void loss_fwd_block(int64_t mode, const FwdBlock<float>& b) { FI_PICK(loss_fwd_block(mode, b)) }
void loss_fwd_block(int64_t mode, const FwdBlock<double>& b) { FI_PICK(loss_fwd_block(mode, b)) }
void loss_bwd_block(int64_t mode, const BwdBlock<float>& b) { FI_PICK(loss_bwd_block(mode, b)) }
void loss_bwd_block(int64_t mode, const BwdBlock<double>& b) { FI_PICK(loss_bwd_block(mode, b)) }
void rows_to_block(const float* r, int64_t ps, int64_t n, int64_t C, float* b, int64_t P) {
  FI_PICK(rows_to_block(r, ps, n, C, b, P))
}
void rows_to_block(const double* r, int64_t ps, int64_t n, int64_t C, double* b, int64_t P) {
  FI_PICK(rows_to_block(r, ps, n, C, b, P))
}
void block_to_rows(const float* b, int64_t P, int64_t n, int64_t C, float* r, int64_t ps) {
  FI_PICK(block_to_rows(b, P, n, C, r, ps))
}
void block_to_rows(const double* b, int64_t P, int64_t n, int64_t C, double* r, int64_t ps) {
  FI_PICK(block_to_rows(b, P, n, C, r, ps))
}
void resize_rows(const float* src, int64_t C, int64_t w, const int32_t* i0, const int32_t* i1, const float* w0,
                 const float* w1, bool nearest, float* d, int64_t ds, int64_t n) {
  FI_PICK(resize_rows(src, C, w, i0, i1, w0, w1, nearest, d, ds, n))
}
void resize_rows(const double* src, int64_t C, int64_t w, const int32_t* i0, const int32_t* i1,
                 const double* w0, const double* w1, bool nearest, double* d, int64_t ds, int64_t n) {
  FI_PICK(resize_rows(src, C, w, i0, i1, w0, w1, nearest, d, ds, n))
}
void blend_block(const float* a, const float* b, int64_t s, float w0, float w1, int64_t C, float* d, int64_t P) {
  FI_PICK(blend_block(a, b, s, w0, w1, C, d, P))
}
void blend_block(const double* a, const double* b, int64_t s, double w0, double w1, int64_t C, double* d,
                 int64_t P) {
  FI_PICK(blend_block(a, b, s, w0, w1, C, d, P))
}
void tap_sums(const float* v, int64_t C, const int64_t* start, const int64_t* tX, const float* tw, int64_t w,
              float* out) {
  FI_PICK(tap_sums(v, C, start, tX, tw, w, out))
}
void tap_sums(const double* v, int64_t C, const int64_t* start, const int64_t* tX, const double* tw,
              int64_t w, double* out) {
  FI_PICK(tap_sums(v, C, start, tX, tw, w, out))
}
#undef FI_PICK

}  // namespace cpu
}  // namespace fused_imbalance
