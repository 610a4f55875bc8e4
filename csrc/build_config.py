"""How fused_imbalance._C is built: the one source of truth for setup.py (ahead of time) and
fused_imbalance/ops/cpp.py (JIT on first use), so both compile the same sources the same way.
"""
import os
import sys

CSRC = os.path.dirname(os.path.abspath(__file__))


# Architectures of the CUDA kernel when no GPU is visible to detect them from: Ampere, Ada and
# Hopper, with PTX for newer GPUs (the JIT compiles it there). TORCH_CUDA_ARCH_LIST overrides it.
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def with_cuda():
    """Build the CUDA kernels: torch has CUDA, a toolkit is installed, and the user did not
    set FUSED_IMBALANCE_CUDA=0. Whether a GPU is visible does not decide it (build machines
    often have none); it only decides the architectures (:func:`set_cuda_arch_list`)."""
    if os.environ.get("FUSED_IMBALANCE_CUDA", "1") == "0":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and toolkit_complete(CUDA_HOME)


def toolkit_complete(cuda_home):
    """A CUDA toolkit the extension can be built and linked with: headers and libcudart.

    torch takes the directory above the first nvcc on PATH as the toolkit; an nvcc linked into
    /usr/local/bin makes that /usr/local, where neither is, and the link then fails
    (-lcudart). Such a half toolkit builds the CPU part only (set CUDA_HOME to use it)."""
    if not cuda_home:
        return False
    header = os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime.h"))
    libs = [os.path.join(cuda_home, d) for d in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"))]
    cudart = any(os.path.isdir(d) and any(f.startswith("libcudart") for f in os.listdir(d)) for d in libs)
    return header and cudart


def set_cuda_arch_list(cuda):
    """Give torch's CUDA build its target architectures when no GPU is visible.

    Without TORCH_CUDA_ARCH_LIST, torch derives the -gencode flags from the visible GPUs, and
    with a CUDA build of torch and none visible that detection fails. Then the build targets
    DEFAULT_CUDA_ARCHS. A set TORCH_CUDA_ARCH_LIST, or a visible GPU, is left to torch.
    Returns the list it set, or None.
    """
    if not cuda or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return None
    import torch

    if torch.cuda.is_available():
        return None
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    return DEFAULT_CUDA_ARCHS


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


def sanitizers():
    """The sanitizers of FUSED_IMBALANCE_SANITIZE (e.g. "address,undefined"; scripts/sanitize.sh),
    or "" for a normal build. Another name is an error: a typo must not build without them."""
    value = os.environ.get("FUSED_IMBALANCE_SANITIZE", "").strip()
    names = [n for n in value.split(",") if n]
    unknown = [n for n in names if n not in ("address", "undefined")]
    if unknown:
        raise ValueError(f"FUSED_IMBALANCE_SANITIZE names {unknown}: only 'address' and 'undefined' are supported")
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


def cuda_flags():
    return ["-O3"]


def link_flags():
    flags = ["-fopenmp"] if sys.platform.startswith("linux") else []
    san = sanitizers()
    return flags + ([f"-fsanitize={san}"] if san else [])
