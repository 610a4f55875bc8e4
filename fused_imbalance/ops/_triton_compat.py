"""Launching Triton kernels from a ``torch.library.triton_op`` on every supported torch."""

from torch.library import wrap_triton
from triton.runtime.jit import JITFunction


def wrap(kernel):
    """``wrap_triton(kernel)`` for a compiled kernel, so that ``torch.compile`` sees the launch.

    Under ``TRITON_INTERPRET=1``, ``@triton.jit`` makes an interpreted function instead, which
    torch >= 2.13's ``wrap_triton`` hands back unchanged and older torch refuses ("wrap_triton only
    works on functions annotated with triton.jit"). Such a kernel is launched as it is on every
    version, as torch >= 2.13 does.
    """
    return wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel
