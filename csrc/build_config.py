"""How fused_imbalance._C is built: the one source of truth for setup.py (ahead of time) and
fused_imbalance/ops/cpp.py (JIT on first use), so both compile the same sources the same way.

The extension is C++ for the CPU only (the GPU kernels are Triton): it needs no CUDA toolkit, and
its build does not depend on whether one, or a GPU, is present.
"""
import os
import sys

CSRC = os.path.dirname(os.path.abspath(__file__))


def sources():
    return [
        os.path.join(CSRC, "fused_imbalance.cpp"),
        os.path.join(CSRC, "cpu", "loss_cpu.cpp"),
        os.path.join(CSRC, "cpu", "loss_kernels.cpp"),
        os.path.join(CSRC, "cpu", "loss_kernels_avx2.cpp"),
        os.path.join(CSRC, "cpu", "loss_kernels_avx512.cpp"),
        os.path.join(CSRC, "cpu", "upsample_cpu.cpp"),
        os.path.join(CSRC, "cpu", "select_cpu.cpp"),
    ]


def cxx_flags():
    # -O3 without -march: the kernels carry their own AVX2/AVX-512 copies (loss_kernels.cpp),
    # so the binary does not depend on the CPU of the build machine. No FMA contraction: the
    # kernels fuse a multiply-add only where they say so (simd.h: fmadd), the same in every
    # copy that has FMA, so those copies round identically. -g0 overrides the -g of Python's own flags (debug info of
    # the kernel templates only slows the build). OpenMP: at::parallel_for is OpenMP in torch's CPU
    # build, and its header only forks threads when the extension is compiled with it.
    flags = ["-O3", "-g0", "-ffp-contract=off", "-Wno-psabi"]
    if sys.platform.startswith("linux"):
        flags.append("-fopenmp")
    return flags


def link_flags():
    return ["-fopenmp"] if sys.platform.startswith("linux") else []
