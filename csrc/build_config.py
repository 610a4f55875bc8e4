"""How fused_imbalance._C is built: the one source of truth for setup.py (ahead of time) and
fused_imbalance/ops/cpp.py (JIT on first use), so both compile the same sources the same way.
"""
import os
import sys

CSRC = os.path.dirname(os.path.abspath(__file__))


def with_cuda():
    """Build the CUDA kernels: torch has CUDA, a toolkit is installed, and the user did not
    set FUSED_IMBALANCE_CUDA=0. Whether a GPU is visible does not matter (build machines
    often have none)."""
    if os.environ.get("FUSED_IMBALANCE_CUDA", "1") == "0":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def sources(cuda):
    srcs = [
        os.path.join(CSRC, "fused_imbalance.cpp"),
        os.path.join(CSRC, "cpu", "loss_cpu.cpp"),
        os.path.join(CSRC, "cpu", "loss_kernels.cpp"),
        os.path.join(CSRC, "cpu", "loss_kernels_avx2.cpp"),
        os.path.join(CSRC, "cpu", "loss_kernels_avx512.cpp"),
        os.path.join(CSRC, "cpu", "upsample_cpu.cpp"),
    ]
    if cuda:
        srcs.append(os.path.join(CSRC, "cuda", "class_stats.cu"))
    return srcs


def cxx_flags():
    # -O3 without -march: the kernels carry their own AVX2/AVX-512 copies (loss_kernels.cpp),
    # so the binary does not depend on the CPU of the build machine. No FMA contraction, so
    # every copy rounds identically. -g0 overrides the -g of Python's own flags (debug info of
    # the kernel templates only slows the build). OpenMP: at::parallel_for is OpenMP in torch's CPU
    # build, and its header only forks threads when the extension is compiled with it.
    flags = ["-O3", "-g0", "-ffp-contract=off", "-Wno-psabi"]
    if sys.platform.startswith("linux"):
        flags.append("-fopenmp")
    return flags


def cuda_flags():
    return ["-O3"]


def link_flags():
    return ["-fopenmp"] if sys.platform.startswith("linux") else []
