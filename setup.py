"""Builds the C++ extension fused_imbalance._C from csrc/ (metadata is in pyproject.toml).

    pip install --no-build-isolation -e .

The CPU kernels are always built; the CUDA kernels too when torch has CUDA and a CUDA toolkit
is installed, unless FUSED_IMBALANCE_CUDA=0 (csrc/build_config.py, shared with the JIT build
of fused_imbalance/ops/cpp.py). --no-build-isolation builds against the torch already
installed, which is the torch the extension must match.
"""
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "csrc"))
import build_config  # noqa: E402

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

cuda = build_config.with_cuda()
build_config.set_cuda_arch_list(cuda)  # a CUDA torch with no visible GPU cannot detect the architectures
extension = (CUDAExtension if cuda else CppExtension)(
    "fused_imbalance._C",
    sources=[os.path.relpath(s, ROOT) for s in build_config.sources(cuda)],  # setuptools wants relative paths
    extra_compile_args={"cxx": build_config.cxx_flags(), "nvcc": build_config.cuda_flags()},
    extra_link_args=build_config.link_flags(),
)

# The license here, not in pyproject.toml: its SPDX-string form there needs setuptools >= 77.
setup(license="BSD-3-Clause", ext_modules=[extension], cmdclass={"build_ext": BuildExtension})
