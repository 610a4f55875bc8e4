// The per-block math of the Dice family's CPU kernels (dice_cpu.cpp does the blocking, the
// label-indexed sums and the finalize). A block is P pixels × C classes stored class-major
// (x[k * stride + p]), as in loss_kernels.h, all of one group of sums (one image, or the batch), and
// compiled once per instruction set (dice_kernels.cpp picks the copy loss_kernels.cpp picked).
#pragma once

#include <cstdint>

namespace fused_imbalance {
namespace cpu {

template <typename T>
struct DiceFwdBlock {
  const T* x;          // logits of class k, pixel p at x[k * x_stride + p]
  int64_t x_stride;
  int64_t C;
  int64_t P;           // pixels, a multiple of kBlockAlign (padding pixels have y = -1)
  const int32_t* y;    // (P,) label, -1 where not valid
  bool squared;        // P sums p², not p
  T* ebuf;             // (C·P) scratch: exp(x_k − max) between the passes
  T* p_label;          // (P,) out: p_y (0 where y = -1)
  T* ce;               // (P,) out: −log p_y (0 where y = -1); nullptr: not wanted
  int32_t* argmax;     // (P,) out: first index of the largest logit (NaN first); nullptr: not wanted
  T* pred;             // (C,) out: Σ_p of p_k (p_k² with squared) over the valid pixels, in block order
};

template <typename T>
struct DiceBwdBlock {
  const T* x;          // as in DiceFwdBlock
  int64_t x_stride;
  T* g;                // gradient of class k, pixel p at g[k * g_stride + p]
  int64_t g_stride;
  int64_t C;
  int64_t P;
  const int32_t* y;
  bool squared;
  const T* a_i;        // (C,) ∂L/∂I of the block's group, the upstream gradient included
  const T* a_p;        // (C,) ∂L/∂P, likewise
  const T* ce;         // (C,) the cross-entropy's per-class factor times the upstream gradient; nullptr: none
  T* ebuf;             // (C·P) scratch
};

void dice_fwd_block(const DiceFwdBlock<float>& b);
void dice_fwd_block(const DiceFwdBlock<double>& b);
void dice_bwd_block(const DiceBwdBlock<float>& b);
void dice_bwd_block(const DiceBwdBlock<double>& b);

}  // namespace cpu
}  // namespace fused_imbalance
