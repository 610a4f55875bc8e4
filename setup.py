"""Builds the C++ extension fused_imbalance._C from csrc/ (metadata is in pyproject.toml).

    pip install --no-build-isolation -e .

The extension holds the CPU kernels (the GPU kernels are Triton, compiled at run time): it
builds with a C++ compiler alone, from the sources and flags of csrc/build_config.py, shared
with the JIT build of fused_imbalance/ops/cpp.py. --no-build-isolation builds against the
torch already installed, which is the torch the extension must match.
"""

import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "csrc"))
import build_config  # noqa: E402

from torch.utils.cpp_extension import BuildExtension, CppExtension  # noqa: E402

extension = CppExtension(
    "fused_imbalance._C",
    sources=[os.path.relpath(s, ROOT) for s in build_config.sources()],  # setuptools wants relative paths
    extra_compile_args={"cxx": build_config.cxx_flags()},
    extra_link_args=build_config.link_flags(),
)

# The license here, not in pyproject.toml: its SPDX-string form there needs setuptools >= 77.
setup(license="BSD-3-Clause", ext_modules=[extension], cmdclass={"build_ext": BuildExtension})
