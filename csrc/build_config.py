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
        os.path.join(CSRC, "cpu", "autograd.cpp"),
        os.path.join(CSRC, "cpu", "loss_kernels.cpp"),
        os.path.join(CSRC, "cpu", "loss_kernels_avx2.cpp"),
        os.path.join(CSRC, "cpu", "loss_kernels_avx512.cpp"),
        os.path.join(CSRC, "cpu", "upsample_cpu.cpp"),
        os.path.join(CSRC, "cpu", "select_cpu.cpp"),
        os.path.join(CSRC, "cpu", "ohem_cpu.cpp"),
        os.path.join(CSRC, "cpu", "dice_cpu.cpp"),
        os.path.join(CSRC, "cpu", "dice_kernels.cpp"),
        os.path.join(CSRC, "cpu", "dice_kernels_avx2.cpp"),
        os.path.join(CSRC, "cpu", "dice_kernels_avx512.cpp"),
    ]


def sanitizers():
    """The sanitizers of FUSED_IMBALANCE_SANITIZE (e.g. "address,undefined"; scripts/sanitize.sh),
    or "" for a normal build. Another name is an error: a typo must not build without them."""
    value = os.environ.get("FUSED_IMBALANCE_SANITIZE", "").strip()
    names = [n for n in value.split(",") if n]
    unknown = [n for n in names if n not in ("address", "undefined")]
    if unknown:
        raise ValueError(
            f"FUSED_IMBALANCE_SANITIZE names {unknown}: only 'address' and 'undefined' are supported"
        )
    return ",".join(names)


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
    san = sanitizers()
    if san:
        # Abort at the first report (a test cannot pass over one); line tables for the reports' stacks;
        # -O1 (after -O3, so it wins): half the build time of -O3 with the instrumentation, and stacks
        # closer to the source.
        flags += [f"-fsanitize={san}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g1", "-O1"]
    return flags


def link_flags():
    flags = ["-fopenmp"] if sys.platform.startswith("linux") else []
    san = sanitizers()
    return flags + ([f"-fsanitize={san}"] if san else [])
