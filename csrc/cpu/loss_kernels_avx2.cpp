// The block kernels compiled for AVX2 + FMA (x86-64 since 2013), 32-byte vectors; loss_kernels.cpp calls this copy only
// on CPUs that have these instructions.
//
// The standard headers come before the target pragma, so none of their inline functions is
// compiled for this instruction set (the linker could otherwise use that copy everywhere).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <immintrin.h>  // _mm256/_mm512_fmadd: always inline, compiled only where called

#include "loss_kernels.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx2,fma")
#define FI_ISA avx2
#define FI_VECTOR_BYTES 32
#define FI_FMA 1
#include "loss_kernels_impl.h"
#endif
