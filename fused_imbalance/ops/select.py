"""The k-th smallest valid value of a vector, exactly and without a host sync: the threshold of the
OHEM cross-entropy (docs/DESIGN.md §13) found without sorting the per-pixel probabilities.

``select_kth(values, k, first_hist=None, *, backend=None) -> Tensor``

values      float32 or float64 tensor, read flattened as (N,) (a copy only when not contiguous). An entry
            < 0 (e.g. -1) is *invalid* and never selected; every other entry is valid: ±0,
            positive values, +inf and NaN. A loss writes its label probabilities there, and -1
            at ignored pixels.
k           an int, or a one-element integer tensor on the values' device (a rank computed on
            the device: nothing waits for it). It is clamped to [0, n_valid - 1], so OHEM passes
            its rank (``reference.ohem_rank``) as it is and gets p_(min(rank, n_valid - 1)).
first_hist  None, or the (FIRST_BINS,) = (256,) int64 histogram of the first key digit of the
            valid entries, on the values' device, when the pass that wrote the values counted it
            (``triton_select.select_first_digit`` gives the digit in a Triton kernel); the first
            pass over the values is then skipped. A histogram not of ``values`` gives an
            unspecified value (never an out-of-bounds access).
returns     a 0-d tensor of the values' dtype: the k-th smallest valid value, 0-based, equal to
            position k of ``torch.sort`` of the valid entries, ties included (NaN sorts last;
            -0.0 is returned as +0.0, an equal value); 0.0 when no entry is valid.

Backends: ``"triton"`` (``fused_imbalance::triton_select_kth``, :mod:`.triton_select`: a radix
select of 4 passes for float32, 8 for float64, over the values' bit patterns; CPU tensors run it
under ``TRITON_INTERPRET=1``), ``"cpp"`` (``fused_imbalance::cpp_select_kth``,
``csrc/cpu/select_cpu.cpp``: the same radix digits, parallel, finished by ``std::nth_element``
on the keys of one bin) and ``"reference"`` (:func:`select_kth_reference`, a sort). ``None``
picks Triton for CUDA tensors and C++ for CPU tensors (the reference when the extension is not
built). Every backend is exact, deterministic, free of host syncs (the C++ op reads ``k`` from
CPU memory) and traceable by ``torch.compile(fullgraph=True)``.
"""

import math
import threading

import torch

from . import cpp as _cpp
from . import triton_select as _triton_select
from ._triton_host import available as _triton_available

__all__ = ["select_kth", "select_kth_reference", "FIRST_BINS", "BACKENDS"]

FIRST_BINS = _triton_select.FIRST_BINS  # bins of first_hist, float32 and float64 alike
BACKENDS = ("triton", "cpp", "reference")
_lock = threading.Lock()
_cpp_fake = False


@torch.compiler.assume_constant_result
def _cpp_ready():
    """The C++ op loads (built ahead of time or compiled now) and has its fake kernel; loading is
    not traceable, so inside torch.compile this is a constant."""
    global _cpp_fake
    if not _cpp.available():
        return False
    with _lock:
        if not _cpp_fake:

            @torch.library.register_fake("fused_imbalance::cpp_select_kth")
            def _(values, k, first_hist=None):
                return values.new_empty(())

            _cpp_fake = True
    return True


def select_kth_reference(values, k):
    """The definition, by a sort (no data-dependent shape: invalid entries become NaN, which sorts
    after every value as a valid NaN does, so position i < n_valid holds the i-th valid value)."""
    v = values.reshape(-1)
    valid = ~(v < 0)
    if v.numel() == 0:
        return v.new_zeros(())
    ranked = torch.sort(torch.where(valid, v.abs(), torch.full_like(v, math.nan))).values
    n_valid = valid.sum()
    k = (
        k.reshape(())
        if isinstance(k, torch.Tensor)
        else torch.full((), k, dtype=torch.int64, device=v.device)
    )
    i = torch.clamp(torch.clamp(k.to(torch.int64), max=n_valid - 1), min=0)
    return torch.where(n_valid > 0, ranked.gather(0, i.reshape(1)).reshape(()), v.new_zeros(()))


def _check(values, k, first_hist, backend):
    if not isinstance(values, torch.Tensor) or values.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            "values must be a float32 or float64 tensor, got "
            + (str(values.dtype) if isinstance(values, torch.Tensor) else type(values).__name__)
        )
    if isinstance(k, torch.Tensor):
        if k.numel() != 1 or k.dtype.is_floating_point or k.dtype.is_complex or k.dtype == torch.bool:
            raise TypeError(
                f"k must be an int or a one-element integer tensor, got {k.dtype} of shape "
                f"{tuple(k.shape)}"
            )
        if k.device != values.device:
            raise ValueError(f"k is on {k.device} but values are on {values.device}")
    elif isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)):
        raise TypeError(f"k must be an int or a one-element integer tensor, got {type(k).__name__} {k!r}")
    if first_hist is not None:
        if not isinstance(first_hist, torch.Tensor) or first_hist.dtype != torch.int64:
            raise TypeError("first_hist must be an int64 tensor")
        if tuple(first_hist.shape) != (FIRST_BINS,):
            raise ValueError(f"first_hist must have shape ({FIRST_BINS},), got {tuple(first_hist.shape)}")
        if first_hist.device != values.device:
            raise ValueError(f"first_hist is on {first_hist.device} but values are on {values.device}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def select_kth(values, k, first_hist=None, *, backend=None):
    """The k-th smallest valid entry of ``values`` (see the module docstring)."""
    _check(values, k, first_hist, backend)
    v = values.reshape(-1).contiguous()
    if backend is None:
        backend = "triton" if v.is_cuda else ("cpp" if _cpp_ready() else "reference")
    if backend == "reference":
        return select_kth_reference(v, k)
    if not isinstance(k, torch.Tensor):
        k = torch.full((), k, dtype=torch.int64, device=v.device)  # a fill, not a host-to-device copy
    if backend == "cpp":
        if v.is_cuda or not _cpp_ready():
            raise RuntimeError(
                "the 'cpp' select runs CPU tensors and needs the C++ extension"
                + ("" if v.is_cuda else f": {_cpp.unavailable_reason()}")
            )
        return torch.ops.fused_imbalance.cpp_select_kth(v, k.reshape(()), first_hist)
    if _triton_select.select_kth is None or not (v.is_cuda or _triton_available()):
        raise RuntimeError(
            "the 'triton' select needs triton and a CUDA tensor, or TRITON_INTERPRET=1 for " "CPU tensors"
        )
    return _triton_select.select_kth(v, k.reshape(()), first_hist)
