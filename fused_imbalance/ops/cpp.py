"""The C++ backend: fused CPU kernels (``csrc/cpu/``).

The ops are defined in C++ (``csrc/fused_imbalance.cpp``) and live in ``fused_imbalance._C``,
built by ``pip install --no-build-isolation -e .``. When that module is missing, the same
sources are compiled on first use with :func:`torch.utils.cpp_extension.load` (cached in the
torch extensions directory). When neither works, :func:`available` is False, one warning says
why, and ``backend="auto"`` uses the reference instead.

:func:`backend` is the :class:`~fused_imbalance.ops.Backend`: the module's functions for eager
calls (``_C.loss_fwd`` ...: the same C++ functions as the ops, without the dispatcher's Python
layers) and the registered ops ``fused_imbalance::cpp_loss_fwd`` ... for ``torch.compile``, with
the contract of :mod:`fused_imbalance.ops`. :func:`cpu_isa` names the instruction-set copy of the
CPU kernels in use (``FUSED_IMBALANCE_CPU_ISA=base|avx2|avx512`` caps the choice; any other value
is an error). :func:`unavailable_reason` says why the backend could not be loaded.
"""

import importlib.util
import os
import shutil
import threading
import warnings

import torch

from . import FLOAT_DTYPES, Backend, Mode, Weighting, fwd_fake

__all__ = ["available", "unavailable_reason", "supports", "cpu_isa", "backend", "keeps_lse", "module"]

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
_lock = threading.Lock()
_loaded = None  # None: not tried yet; then True or False
_reason = None  # why loading failed
_backend = None
_module = None  # the loaded extension module (its pybind11 functions)
ISAS = ("base", "avx2", "avx512")


def _check_isa_env():
    isa = os.environ.get("FUSED_IMBALANCE_CPU_ISA")
    if isa is not None and isa not in ISAS:
        raise ValueError(
            f"the environment variable FUSED_IMBALANCE_CPU_ISA must be one of {ISAS} "
            f"(or unset), got {isa!r}"
        )


def _build_config():
    spec = importlib.util.spec_from_file_location(
        "_fused_imbalance_build_config", os.path.join(_CSRC, "build_config.py")
    )
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    return cfg


def _load_library():
    """Load the compiled module (it registers the ops); returns (module, None) or (None, why it failed)."""
    try:
        from fused_imbalance import _C

        return _C, None
    except (ImportError, OSError) as e:
        prebuilt = f"fused_imbalance._C is not built ({e})"
    if not os.path.isfile(os.path.join(_CSRC, "build_config.py")):
        return None, prebuilt + " and the C++ sources are not in this installation"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0] if cxx.strip() else "c++") is None:
        return (
            None,
            f"{prebuilt}, and there is no C++ compiler to build csrc/ ({cxx!r} is not on PATH; set CXX)",
        )
    try:
        from torch.utils.cpp_extension import load

        cfg = _build_config()
        module = load(
            name="fused_imbalance_C",
            sources=cfg.sources(),
            extra_cflags=cfg.cxx_flags(),
            extra_ldflags=cfg.link_flags(),
            is_python_module=True,
            verbose=False,
        )
        return module, None
    except Exception as e:  # failed build: the reference backend takes over
        return None, f"{prebuilt}, and compiling csrc/ failed: {_build_error_summary(e)}"


def _build_error_summary(e):
    """The build error's first informative line, with the whole message saved to a log file."""
    import traceback

    text = (
        f"Building the fused_imbalance C++ extension from {_CSRC} failed "
        f"(CXX={os.environ.get('CXX', 'c++')!r}):\n" + "".join(traceback.format_exception(e))
    )
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # the compiler's or linker's own message, not torch's "Error building extension ...: [1/7] c++ ..."
    marks = ("error:", "error ", "cannot find", "no such file", "not found")
    first = next(
        (ln for ln in lines[1:] if any(m in ln.lower() for m in marks) and not ln.startswith("[")),
        lines[0] if lines else type(e).__name__,
    )
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


def keeps_lse(x, mode, gamma, upsampled):
    """Floats per pixel the forward keeps for its backward when asked: the upsampled softmax focal
    forward keeps each pixel's log-sum-exp (its backward then needs one pass over the classes, one
    exponential per logit); the plain forward nothing (its backward re-reads a block from cache)."""
    return int(upsampled and mode == Mode.SOFTMAX_FOCAL)


def _register(module):
    """The fake kernels of the ops (for torch.compile) and the backend object."""
    ops = torch.ops.fused_imbalance

    @torch.library.register_fake("fused_imbalance::cpp_loss_fwd")
    def _(
        x,
        target,
        weight,
        tvals,
        confusion,
        loss_mode,
        gamma,
        ignore_index,
        reduction,
        weighting,
        need_tp,
        validate,
        need_lse,
    ):
        return fwd_fake(
            x,
            target,
            reduction,
            need_tp or weighting == Weighting.RECALL,
            keeps_lse(x, loss_mode, gamma, False) if need_lse else 0,
        )

    @torch.library.register_fake("fused_imbalance::cpp_loss_bwd")
    def _(x, target, grad, scale, tvals, lse, loss_mode, gamma, ignore_index):
        return torch.empty_like(x)

    @torch.library.register_fake("fused_imbalance::cpp_upsample_loss_fwd")
    def _(
        x,
        target,
        interp,
        align_corners,
        weight,
        tvals,
        confusion,
        loss_mode,
        gamma,
        ignore_index,
        reduction,
        weighting,
        need_tp,
        validate,
        need_lse,
    ):
        return fwd_fake(
            x,
            target,
            reduction,
            need_tp or weighting == Weighting.RECALL,
            keeps_lse(x, loss_mode, gamma, True) if need_lse else 0,
        )

    @torch.library.register_fake("fused_imbalance::cpp_upsample_loss_bwd")
    def _(x, target, interp, align_corners, grad, scale, tvals, lse, loss_mode, gamma, ignore_index):
        return torch.empty_like(x)

    return Backend(
        "cpp",
        module.loss_fwd,
        module.loss_bwd,
        ops.cpp_loss_fwd.default,
        ops.cpp_loss_bwd.default,
        module.upsample_loss_fwd,
        module.upsample_loss_bwd,
        ops.cpp_upsample_loss_fwd.default,
        ops.cpp_upsample_loss_bwd.default,
        supports,
        keeps_lse,
        False,
        module.recall_ema,
        module.loss_autograd,
    )


def available():
    """True when the C++ ops are loaded (built ahead of time, or compiled now on first use)."""
    global _loaded, _reason, _backend, _module
    _check_isa_env()
    if _loaded is None:
        with _lock:
            if _loaded is None:
                module, err = _load_library()
                if err is None:
                    _backend = _register(module)
                    _module = module
                else:
                    warnings.warn(
                        f"fused_imbalance: the C++ backend is unavailable, the reference "
                        f"backend is used instead: {err}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                _loaded, _reason = err is None, err
    return _loaded


def backend():
    """The C++ :class:`~fused_imbalance.ops.Backend` (loading it first); an error saying why when it cannot."""
    if not available():
        raise RuntimeError(f"fused_imbalance: the C++ backend is not available: {_reason}")
    return _backend


def module():
    """The loaded extension module, whose pybind11 functions an eager call runs (loading it first)."""
    backend()
    return _module


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
    return x.device.type == "cpu" and x.dtype in FLOAT_DTYPES
