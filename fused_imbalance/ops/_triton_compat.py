"""Launching Triton kernels from a ``torch.library.triton_op`` and from the eager path on every supported
torch."""

import torch
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

_dispatch_modes = torch._C._len_torch_dispatch_stack
_get_mode = torch._C._get_dispatch_mode
_TRACE_MODES = tuple(torch._C._TorchDispatchModeKey.__members__.values())  # FUNCTIONAL, PROXY, FAKE


def traced():
    """Whether what runs now is being traced: ``torch.compile`` (Dynamo or AOTAutograd), or a trace's dispatch
    mode (fake tensors, functionalization, proxy tracing, as under ``make_fx``)."""
    return torch.compiler.is_compiling() or (
        _dispatch_modes() > 0 and any(_get_mode(key) is not None for key in _TRACE_MODES)
    )


def wrap(kernel):
    """The kernel to launch: the kernel itself for an eager launch on real tensors, ``wrap_triton(kernel)``
    where a trace must see the launch.

    ``wrap_triton`` makes a launch a higher-order op (``triton_kernel_wrapper_mutation``) whenever torch's
    switch for it is on, which it is everywhere but inside a ``triton_op``'s own eager implementation. That
    is what ``torch.compile``, ``make_fx`` and ``torch.export`` need to record the kernel, but on an eager
    call it costs the host about 55 µs per launch (the op's dispatch), adds an entry to torch's kernel
    side table that is never removed, and fails under a dispatch mode that has no rule for the op (a
    user's ``TorchDispatchMode``). The eager path (:mod:`fused_imbalance._fused`) calls the launchers
    outside any ``triton_op``, so the kernel is launched directly, as the ``triton_op``'s eager
    implementation does, unless ``torch.compile`` is tracing or a trace's dispatch mode (fake tensors,
    functionalization, proxy tracing) is active.

    Under ``TRITON_INTERPRET=1``, ``@triton.jit`` makes an interpreted function instead, which torch >=
    2.13's ``wrap_triton`` hands back unchanged and older torch refuses ("wrap_triton only works on
    functions annotated with triton.jit"). Such a kernel is launched as it is on every version.
    """
    if not isinstance(kernel, JITFunction):
        return kernel
    return wrap_triton(kernel) if traced() else kernel
