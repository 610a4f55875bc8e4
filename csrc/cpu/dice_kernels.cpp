// The portable copy of the Dice family's block kernels and the run-time choice between the copies
// (dice_kernels_avx2.cpp, dice_kernels_avx512.cpp): the copy of the instruction set the loss kernels
// use (loss_kernels.cpp: cpu_isa_name(), capped by FUSED_IMBALANCE_CPU_ISA).
#include "dice_kernels.h"

#include <cstring>

#include "loss_kernels.h"

#define FI_ISA base
#define FI_VECTOR_BYTES 16
#include "dice_kernels_impl.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FI_DICE_X86_COPIES 1
#else
#define FI_DICE_X86_COPIES 0
#endif

namespace fused_imbalance {
namespace cpu {

#define FI_DECLARE_DICE_COPY(isa)                       \
  namespace isa {                                       \
  void dice_fwd_block(const DiceFwdBlock<float>& b);    \
  void dice_fwd_block(const DiceFwdBlock<double>& b);   \
  void dice_bwd_block(const DiceBwdBlock<float>& b);    \
  void dice_bwd_block(const DiceBwdBlock<double>& b);   \
  }
#if FI_DICE_X86_COPIES
FI_DECLARE_DICE_COPY(avx2)
FI_DECLARE_DICE_COPY(avx512)
#endif
#undef FI_DECLARE_DICE_COPY

namespace {

// 0 base, 1 AVX2, 2 AVX-512: decided once, by the loss kernels' choice.
int dice_isa() {
  static const int isa = std::strcmp(cpu_isa_name(), "avx512") == 0 ? 2 : std::strcmp(cpu_isa_name(), "avx2") == 0;
  return isa;
}

}  // namespace

#if FI_DICE_X86_COPIES
#define FI_DICE_PICK(call)              \
  switch (dice_isa()) {                 \
    case 2: return avx512::call;        \
    case 1: return avx2::call;          \
    default: return base::call;         \
  }
#else
#define FI_DICE_PICK(call) return base::call;
#endif

void dice_fwd_block(const DiceFwdBlock<float>& b) { FI_DICE_PICK(dice_fwd_block(b)) }
void dice_fwd_block(const DiceFwdBlock<double>& b) { FI_DICE_PICK(dice_fwd_block(b)) }
void dice_bwd_block(const DiceBwdBlock<float>& b) { FI_DICE_PICK(dice_bwd_block(b)) }
void dice_bwd_block(const DiceBwdBlock<double>& b) { FI_DICE_PICK(dice_bwd_block(b)) }
#undef FI_DICE_PICK

}  // namespace cpu
}  // namespace fused_imbalance
