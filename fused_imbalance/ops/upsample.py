"""The upsampled loss ops (DESIGN.md §10): low-resolution logits against full-resolution labels.

forward ``{backend}_upsample_loss_fwd(x, target, interp, align_corners, loss_mode, gamma, tvals,
ignore_index, need_pixel_loss, need_tp, need_confusion) -> (pixel_loss, class_loss, count, tp,
bad, confusion)``

    x            low-resolution logits (B, C, h, w), any float dtype, any strides (NCHW and
                 channels_last are read in place).
    target       (B, H, W) labels, uint8/int16/int32/int64, any H, W >= 1.
    interp       :class:`Interp`: the ``mode`` of ``F.interpolate``; ``align_corners`` as there
                 (bilinear only).

    The outputs are those of the loss op of :mod:`fused_imbalance.ops` on
    ``F.interpolate(x, size=(H, W), mode, align_corners)``: pixel_loss (B·H·W,) if
    need_pixel_loss else (0,); class_loss (C,); count (C,); tp (C,) if need_tp else (0,); bad ();
    confusion (C, C) — the counts of this pass, argmax of the interpolated logits — if
    need_confusion else (0, 0). No argument is mutated.

backward ``{backend}_upsample_loss_bwd(x, target, grad_pixel, grad_class, interp,
align_corners, loss_mode, gamma, tvals, ignore_index) -> grad``: the vector-Jacobian product of
the forward's two float outputs with respect to the low-resolution logits, shaped, typed and
laid out like ``x``; deterministic (no float atomics).

Neither op allocates anything of B·C·H·W elements.
"""
import enum

import torch

from . import fwd_fake
from ._autograd import register_loss_autograd

__all__ = ["Interp", "register"]


class Interp(enum.IntEnum):
    """The ``mode`` of ``F.interpolate`` the upsampled ops reproduce."""

    NEAREST = 0
    BILINEAR = 1


def fake_forward(x, target, interp, align_corners, loss_mode, gamma, tvals, ignore_index, need_pixel_loss,
                 need_tp, need_confusion):
    """Output shapes and dtypes of the forward op (its ``register_fake``): the loss op's, with
    target (B, H, W)."""
    return fwd_fake(x, target, need_pixel_loss, need_tp, need_confusion)


def fake_backward(x, target, grad_pixel, grad_class, interp, align_corners, loss_mode, gamma, tvals,
                  ignore_index):
    return torch.empty_like(x)


def register(fwd_op_name, bwd_op_name, bwd_op):
    """Fake kernels and autograd of a backend's upsampled ops. The autograd formula is the loss
    ops' (``register_loss_autograd``): the backward op applies the loss gradient and the transposed
    interpolation in one pass; ``interp, align_corners`` ride along."""
    torch.library.register_fake(fwd_op_name)(fake_forward)
    torch.library.register_fake(bwd_op_name)(fake_backward)
    register_loss_autograd(fwd_op_name, bwd_op, geometry_args=2)
