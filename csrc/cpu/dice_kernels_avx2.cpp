// The Dice family's block kernels compiled for AVX2 + FMA, 32-byte vectors; dice_kernels.cpp calls this
// copy only on CPUs that have these instructions. The standard headers come before the target
// pragma, as in loss_kernels_avx2.cpp.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <immintrin.h>

#include "dice_kernels.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx2,fma")
#define FI_ISA avx2
#define FI_VECTOR_BYTES 32
#define FI_FMA 1
#include "dice_kernels_impl.h"
#endif
