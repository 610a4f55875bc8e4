"""The OHEM cross-entropy ops (docs/DESIGN.md §13) and their registry, beside the loss ops' :class:`~.Backend`.

forward ``{backend}_ohem_fwd(x, target, interp, align_corners, weight, confusion, thresh, rank, ignore_index,
reduction, mean_over_all, validate, need_lse) -> (loss, pn, aux, bad, lse)``

    x, target    as the loss ops' (:mod:`fused_imbalance.ops`) when ``interp`` is -1; otherwise the upsampled
                 ops' (:mod:`.upsample`): low-resolution logits (B, C, h, w), labels (B, H, W), ``interp`` an
                 :class:`~.upsample.Interp` and ``align_corners`` as in ``F.interpolate``, and every pixel
                 below is a pixel of the interpolated logits.
    weight       None or (C,) class weights in the accumulation dtype.
    confusion    None or the caller's (C, C) int64 matrix: the argmax confusion counts of every valid pixel,
                 kept or not, are added into it (the only argument an op mutates).
    thresh       a float in [0, 1], rounded to the accumulation dtype.
    rank         an int >= 0, clamped to n_valid - 1 on the device: ``reference.ohem_rank``.
    reduction    a :class:`~.Reduction`: MEAN, SUM or NONE.
    mean_over_all  the mean divides by every pixel, ignored ones included (mmsegmentation), instead of the
                 kept pixels (HRNet).
    validate, need_lse  as the loss ops' (the loss op's ``lse`` is kept for the upsampled backward).

    With p_n = softmax(x_n)[y_n] of valid pixel n (in the accumulation dtype, in the backend's order of
    operations), p_(k) the k-th smallest over the valid pixels of the whole call (ties included, NaN
    last) and threshold = max(p_(min(rank, n_valid - 1)), thresh) (NaN when that p is NaN; ``thresh``
    when no pixel is valid), the kept pixels are the valid ones with p_n < threshold, strictly.

    loss         the kept pixels' Σ w_{y_n} (−log p_n): for SUM; divided by the number kept (or by N with
                 ``mean_over_all``; 0 when that is 0) for MEAN; per pixel (N,), 0 where not kept, for NONE.
    pn           (N,) p_n at valid pixels, -1 elsewhere, accumulation dtype: the values the kept set was
                 decided on, which the backward reads (so that it keeps exactly the same pixels).
    aux          (2,) accumulation dtype: the threshold, and the backward's factor d(loss)/d(w ℓ_n) of a kept
                 pixel (1 / the mean's denominator, 0 when it is 0; 1 for SUM and NONE).
    bad          (2,) int64 as the loss ops' (the C++ op raises instead with ``validate``).
    lse          what the loss op kept for its backward, or (0,).

backward ``{backend}_ohem_bwd(x, target, interp, align_corners, grad, weight, pn, aux, lse, ignore_index) -> dx``:
the gradient with respect to ``x`` of the loss given the upstream ``grad`` (one value, or one per pixel for
NONE; None for 1): g_n · factor · w_{y_n} ∂(−log p_n)/∂x at the kept pixels of ``pn`` and ``aux``, 0
elsewhere; the shape, dtype and memory format of ``x``.

Both are deterministic (every float sum in a fixed order) and never wait for the device.
"""

import threading
from typing import NamedTuple

import torch

from . import Mode, Reduction, acc_dtype

__all__ = ["OhemBackend", "load", "fwd_fake"]


class OhemBackend(NamedTuple):
    """A backend's OHEM functions for eager calls and its registered ops for ``torch.compile`` (the ops
    run the same functions, so both give bit-identical results). ``defers_validation``: bad labels are
    returned, not raised (the Triton backend). ``autograd``: None, or an eager call with the backend's own
    autograd node (the C++ one, ``csrc/cpu/autograd.cpp``), ``autograd(x, target, interp, align_corners,
    weight, confusion, thresh, rank, ignore_index, reduction, mean_over_all, validate) -> loss``, as
    :mod:`fused_imbalance._ohem`'s formula (outside ``torch.compile``, ``torch.func`` and forward-mode AD)."""

    name: str
    fwd: object
    bwd: object
    fwd_op: object
    bwd_op: object
    defers_validation: bool
    autograd: object = None


def fwd_fake(x, target, reduction, lse_floats):
    """Empty outputs of a forward op with the contract's shapes and dtypes (the ops' fake kernels)."""
    acc = acc_dtype(x)
    N = target.numel()
    loss = x.new_empty((N,) if Reduction(reduction) == Reduction.NONE else (), dtype=acc)
    return (
        loss,
        x.new_empty(N, dtype=acc),
        x.new_empty(2, dtype=acc),
        x.new_empty(2, dtype=torch.int64),
        x.new_empty(N * lse_floats, dtype=acc),
    )


_lock = threading.Lock()
_loaded = {}


def load(name):
    """The :class:`OhemBackend` of the loss backend ``name`` ("triton" or "cpp"), which the caller has
    resolved (:func:`fused_imbalance.functional.resolve_backend`)."""
    be = _loaded.get(name)
    if be is None:
        with _lock:
            be = _loaded.get(name)
            if be is None:
                be = _loaded[name] = _triton() if name == "triton" else _cpp()
    return be


def _triton():
    from . import triton_ohem as T

    return OhemBackend("triton", T._forward, T._backward, T.ohem_fwd, T.ohem_bwd, True)


def _cpp():
    from . import cpp

    module = cpp.module()

    @torch.library.register_fake("fused_imbalance::cpp_ohem_fwd")
    def _(
        x,
        target,
        interp,
        align_corners,
        weight,
        confusion,
        thresh,
        rank,
        ignore_index,
        reduction,
        mean_over_all,
        validate,
        need_lse,
    ):
        return fwd_fake(
            x, target, reduction, cpp.keeps_lse(x, Mode.SOFTMAX_FOCAL, 0.0, interp >= 0) if need_lse else 0
        )

    @torch.library.register_fake("fused_imbalance::cpp_ohem_bwd")
    def _(x, target, interp, align_corners, grad, weight, pn, aux, lse, ignore_index):
        return torch.empty_like(x)

    ops = torch.ops.fused_imbalance
    return OhemBackend(
        "cpp",
        module.ohem_fwd,
        module.ohem_bwd,
        ops.cpp_ohem_fwd.default,
        ops.cpp_ohem_bwd.default,
        False,
        module.ohem_autograd,
    )
