"""Host-side helpers shared by the Triton launchers (:mod:`.triton_loss`, :mod:`.triton_upsample`).

Kept apart from both so that neither imports the other for them: :mod:`.triton_loss` serves the
upsampled ops too (it imports :mod:`.triton_upsample` at its end).
"""
import contextlib
import os

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

try:
    import triton
except ImportError:  # the package works without triton; the Triton backend is then unavailable
    triton = None


def _interpret():
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available():
    """Whether the Triton kernels can run here (a GPU, or the interpreter on CPU tensors)."""
    return triton is not None and (torch.cuda.is_available() or _interpret())


def supports(x):
    """Whether the Triton backend handles logits ``x`` (its device and dtype)."""
    if triton is None or x.dtype not in _FLOATS:
        return False
    return x.is_cuda or (x.device.type == "cpu" and _interpret())


def _focal(mode, gamma):
    """Whether a launch computes focal terms (the FOCAL constexpr): a focal mode with γ ≠ 0."""
    from . import Mode
    return gamma != 0 and mode in (Mode.SOFTMAX_FOCAL, Mode.SIGMOID_FOCAL)


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _np2(n):
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a, b):
    return -(-a // b)


def _on_device(x):
    """Launch on the logits' device, whatever device is current."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
