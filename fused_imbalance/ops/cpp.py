"""The C++ backend: fused CPU kernels (``csrc/cpu/``) and a CUDA statistics kernel (``csrc/cuda/``).

The ops are defined in C++ (``csrc/fused_imbalance.cpp``) and live in ``fused_imbalance._C``,
built by ``pip install --no-build-isolation -e .``. When that module is missing, the same
sources are compiled on first use with :func:`torch.utils.cpp_extension.load` (cached in the
torch extensions directory). When neither works, :func:`available` is False, one warning says
why, and ``backend="auto"`` uses the reference instead.

``loss_fwd`` / ``loss_bwd`` follow the contract of :mod:`fused_imbalance.ops`; ``class_stats``
is ``(x, target, ignore_index, need_confusion) -> (count, tp, bad, confusion)`` on CPU and, when the CUDA
kernels were built, CUDA tensors. :func:`cpu_isa` names the instruction-set copy of the CPU
kernels in use (``FUSED_IMBALANCE_CPU_ISA=base|avx2`` lowers the choice).
"""
import importlib.util
import os
import threading
import warnings

import torch

from . import fwd_fake
from . import upsample as _upsample
from ._autograd import register_loss_autograd

__all__ = ["available", "supports", "cpu_isa", "loss_fwd", "loss_bwd", "class_stats", "upsample_loss_fwd",
           "upsample_loss_bwd"]

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_lock = threading.Lock()
_loaded = None  # None: not tried yet; then True or False


def _build_config():
    spec = importlib.util.spec_from_file_location("_fused_imbalance_build_config",
                                                  os.path.join(_CSRC, "build_config.py"))
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    return cfg


def _load_library():
    """Load the compiled ops; returns None on success, else why it failed."""
    try:
        from fused_imbalance import _C  # noqa: F401  (registers the ops on import)
        return None
    except (ImportError, OSError) as e:
        prebuilt = f"fused_imbalance._C is not built ({e})"
    if not os.path.isfile(os.path.join(_CSRC, "build_config.py")):
        return prebuilt + " and the C++ sources are not in this installation"
    try:
        from torch.utils.cpp_extension import load
        cfg = _build_config()
        cuda = cfg.with_cuda()
        load(name="fused_imbalance_C", sources=cfg.sources(cuda), extra_cflags=cfg.cxx_flags(),
             extra_cuda_cflags=cfg.cuda_flags(), extra_ldflags=cfg.link_flags(),
             is_python_module=False, verbose=False)
        return None
    except Exception as e:  # no compiler, failed build: the reference backend takes over
        return f"{prebuilt}, and compiling csrc/ failed: {type(e).__name__}: {e}"


def _register():
    ops = torch.ops.fused_imbalance
    globals().update(loss_fwd=ops.cpp_loss_fwd.default, loss_bwd=ops.cpp_loss_bwd.default,
                     class_stats=ops.cpp_class_stats.default)

    @torch.library.register_fake("fused_imbalance::cpp_loss_fwd")
    def _(x, target, loss_mode, gamma, tvals, ignore_index, need_pixel_loss, need_tp, need_confusion):
        return fwd_fake(x, target, need_pixel_loss, need_tp, need_confusion)

    @torch.library.register_fake("fused_imbalance::cpp_loss_bwd")
    def _(x, target, grad_pixel, grad_class, loss_mode, gamma, tvals, ignore_index):
        return torch.empty_like(x)

    @torch.library.register_fake("fused_imbalance::cpp_class_stats")
    def _(x, target, ignore_index, need_confusion):
        _, _, count, tp, bad, confusion = fwd_fake(x, target, False, True, need_confusion)
        return count, tp, bad, confusion

    register_loss_autograd("fused_imbalance::cpp_loss_fwd", loss_bwd)

    # The loss on low-resolution logits (DESIGN.md §10, csrc/cpu/upsample_cpu.cpp).
    globals().update(upsample_loss_fwd=ops.cpp_upsample_loss_fwd.default,
                     upsample_loss_bwd=ops.cpp_upsample_loss_bwd.default)
    _upsample.register("fused_imbalance::cpp_upsample_loss_fwd", "fused_imbalance::cpp_upsample_loss_bwd",
                       upsample_loss_bwd)


def available():
    """True when the C++ ops are loaded (built ahead of time, or compiled now on first use)."""
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                err = _load_library()
                if err is None:
                    _register()
                else:
                    warnings.warn(f"fused_imbalance: the C++ backend is unavailable, the reference "
                                  f"backend is used instead: {err}", RuntimeWarning, stacklevel=2)
                _loaded = err is None
    return _loaded


def cpu_isa():
    """The instruction set the CPU kernels run with here: "base", "avx2" or "avx512"."""
    if not available():
        raise RuntimeError("fused_imbalance: the C++ backend is not available")
    return torch.ops.fused_imbalance.cpp_cpu_isa()


def supports(x):
    """The fused loss ops run CPU tensors of float16, bfloat16, float32 and float64."""
    return x.device.type == "cpu" and x.dtype in _DTYPES


def __getattr__(name):
    # loss_fwd / loss_bwd / class_stats exist once the library is loaded
    if name in ("loss_fwd", "loss_bwd", "class_stats", "upsample_loss_fwd", "upsample_loss_bwd"):
        if available():
            return globals()[name]
        raise RuntimeError("fused_imbalance: the C++ backend is not available")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
