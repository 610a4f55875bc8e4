"""The C++ backend: fused CPU kernels (``csrc/cpu/``) and a CUDA statistics kernel (``csrc/cuda/``).

The ops are defined in C++ (``csrc/fused_imbalance.cpp``) and live in ``fused_imbalance._C``,
built by ``pip install --no-build-isolation -e .``. When that module is missing, the same
sources are compiled on first use with :func:`torch.utils.cpp_extension.load` (cached in the
torch extensions directory). When neither works, :func:`available` is False, one warning says
why, and ``backend="auto"`` uses the reference instead.

``loss_fwd`` / ``loss_bwd`` follow the contract of :mod:`fused_imbalance.ops`; ``class_stats``
is ``(x, target, ignore_index, need_confusion) -> (count, tp, bad, confusion)`` on CPU and, when the CUDA
kernels were built, CUDA tensors. :func:`cpu_isa` names the instruction-set copy of the CPU
kernels in use (``FUSED_IMBALANCE_CPU_ISA=base|avx2|avx512`` caps the choice; any other value
is an error). :func:`unavailable_reason` says why the backend could not be loaded.
"""
import importlib.util
import os
import shutil
import threading
import warnings

import torch

from . import Mode, fwd_fake
from . import upsample as _upsample
from ._autograd import register_loss_autograd

__all__ = ["available", "unavailable_reason", "supports", "cpu_isa", "loss_fwd", "loss_bwd", "class_stats",
           "upsample_loss_fwd", "upsample_loss_bwd"]

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_lock = threading.Lock()
_loaded = None  # None: not tried yet; then True or False
_reason = None  # why loading failed
ISAS = ("base", "avx2", "avx512")


def _check_isa_env():
    isa = os.environ.get("FUSED_IMBALANCE_CPU_ISA")
    if isa is not None and isa not in ISAS:
        raise ValueError(f"the environment variable FUSED_IMBALANCE_CPU_ISA must be one of {ISAS} "
                         f"(or unset), got {isa!r}")


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
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0] if cxx.strip() else "c++") is None:
        return f"{prebuilt}, and there is no C++ compiler to build csrc/ ({cxx!r} is not on PATH; set CXX)"
    try:
        from torch.utils.cpp_extension import load
        cfg = _build_config()
        cuda = cfg.with_cuda()
        cfg.set_cuda_arch_list(cuda)
        load(name="fused_imbalance_C", sources=cfg.sources(cuda), extra_cflags=cfg.cxx_flags(),
             extra_cuda_cflags=cfg.cuda_flags(), extra_ldflags=cfg.link_flags(),
             is_python_module=False, verbose=False)
        return None
    except Exception as e:  # failed build: the reference backend takes over
        return f"{prebuilt}, and compiling csrc/ failed: {_build_error_summary(e)}"


def _build_error_summary(e):
    """The build error's first informative line, with the whole message saved to a log file."""
    import traceback
    text = (f"Building the fused_imbalance C++ extension from {_CSRC} failed "
            f"(CXX={os.environ.get('CXX', 'c++')!r}):\n" + "".join(traceback.format_exception(e)))
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # the compiler's or linker's own message, not torch's "Error building extension ...: [1/7] c++ ..."
    marks = ("error:", "error ", "cannot find", "no such file", "not found")
    first = next((ln for ln in lines[1:] if any(m in ln.lower() for m in marks) and not ln.startswith("[")),
                 lines[0] if lines else type(e).__name__)
    first = first if len(first) <= 300 else first[:297] + "..."
    try:
        import tempfile
        fd, log = tempfile.mkstemp(prefix="fused_imbalance_build_", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        where = f"full log: {log}"
    except OSError:
        where = "no log could be written"
    return f"{first} ({where})"


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
                       upsample_loss_bwd, keeps_lse=lambda x, mode, gamma: int(mode == Mode.SOFTMAX_FOCAL))


def available():
    """True when the C++ ops are loaded (built ahead of time, or compiled now on first use)."""
    global _loaded, _reason
    _check_isa_env()
    if _loaded is None:
        with _lock:
            if _loaded is None:
                err = _load_library()
                if err is None:
                    _register()
                else:
                    warnings.warn(f"fused_imbalance: the C++ backend is unavailable, the reference "
                                  f"backend is used instead: {err}", RuntimeWarning, stacklevel=2)
                _loaded, _reason = err is None, err
    return _loaded


def unavailable_reason():
    """Why the C++ backend could not be loaded (None when it is loaded or not tried yet)."""
    return _reason


def cpu_isa():
    """The instruction set the CPU kernels run with here: "base", "avx2" or "avx512"."""
    if not available():
        raise RuntimeError(f"fused_imbalance: the C++ backend is not available: {_reason}")
    return torch.ops.fused_imbalance.cpp_cpu_isa()


def supports(x):
    """The fused loss ops run CPU tensors of float16, bfloat16, float32 and float64."""
    return x.device.type == "cpu" and x.dtype in _DTYPES


def __getattr__(name):
    # loss_fwd / loss_bwd / class_stats exist once the library is loaded
    if name in ("loss_fwd", "loss_bwd", "class_stats", "upsample_loss_fwd", "upsample_loss_bwd"):
        if available():
            return globals()[name]
        raise RuntimeError(f"fused_imbalance: the C++ backend is not available: {_reason}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
