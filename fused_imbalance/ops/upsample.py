"""The upsampled loss ops (docs/DESIGN.md §10): low-resolution logits against full-resolution labels.

forward ``{backend}_upsample_loss_fwd(x, target, interp, align_corners, weight, tvals, confusion,
loss_mode, gamma, ignore_index, reduction, weighting, need_tp, validate, need_lse) -> (loss, scale,
count, tp, bad, lse)``

    x            low-resolution logits (B, C, h, w), any float dtype, any strides (NCHW and
                 channels_last are read in place).
    target       (B, H, W) labels, uint8/int16/int32/int64, any H, W >= 1.
    interp       :class:`Interp`: the ``mode`` of ``F.interpolate``; ``align_corners`` as there
                 (bilinear only).

    The other arguments and the outputs are those of the loss op of :mod:`fused_imbalance.ops` on
    ``F.interpolate(x, size=(H, W), mode, align_corners)`` (the per-pixel loss of ``"none"`` is
    (B·H·W,), the confusion counts those of the interpolated argmax), with ``lse`` (k·B·H·W,) in
    the accumulation dtype when ``need_lse`` and the backend keeps k > 0 floats per pixel
    (``keeps_lse``), else (0,): each pixel's log Σ_k exp(interpolated logit k) (the C++ backend for
    the softmax focal mode; the Triton one beyond 12 classes, where its backward works in class
    groups, followed there, with γ != 0, by each pixel's focal weight ∂ℓ/∂log p_y: k = 2).

backward ``{backend}_upsample_loss_bwd(x, target, interp, align_corners, grad, scale, tvals, lse,
loss_mode, gamma, ignore_index) -> dx``: the loss op's backward with respect to the low-resolution
logits, shaped, typed and laid out like ``x``; deterministic (no float atomics). ``lse``: the
forward's, which saves the backward its max and sum passes (one exponential per logit instead of two
passes more); None or empty: recomputed.

Neither op allocates anything of B·C·H·W elements.
"""

import enum

__all__ = ["Interp", "check_lse"]


class Interp(enum.IntEnum):
    """The ``mode`` of ``F.interpolate`` the upsampled ops reproduce."""

    NEAREST = 0
    BILINEAR = 1


def check_lse(lse, numel, dtype, device):
    """The backward's ``lse`` must be what the forward kept: checked before any kernel reads it."""
    if lse.dim() != 1 or lse.numel() != numel or lse.dtype != dtype or lse.device != device:
        raise RuntimeError(
            f"fused_imbalance: lse must be the forward's ({numel},) {dtype} tensor on {device} "
            f"(log-sum-exp, and focal weight), got {tuple(lse.shape)} {lse.dtype} on {lse.device}"
        )
