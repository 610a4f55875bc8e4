"""The upsampled loss ops (DESIGN.md §10): low-resolution logits against full-resolution labels.

forward ``{backend}_upsample_loss_fwd(x, target, interp, align_corners, loss_mode, gamma, tvals,
ignore_index, need_pixel_loss, need_tp, need_confusion, need_lse=False) -> (pixel_loss,
class_loss, count, tp, bad, confusion, lse)``

    x            low-resolution logits (B, C, h, w), any float dtype, any strides (NCHW and
                 channels_last are read in place).
    target       (B, H, W) labels, uint8/int16/int32/int64, any H, W >= 1.
    interp       :class:`Interp`: the ``mode`` of ``F.interpolate``; ``align_corners`` as there
                 (bilinear only).

    The outputs are those of the loss op of :mod:`fused_imbalance.ops` on
    ``F.interpolate(x, size=(H, W), mode, align_corners)``: pixel_loss (B·H·W,) if
    need_pixel_loss else (0,); class_loss (C,); count (C,); tp (C,) if need_tp else (0,); bad ();
    confusion (C, C) — the counts of this pass, argmax of the interpolated logits — if
    need_confusion else (0, 0); lse (k·B·H·W,) in the accumulation dtype if need_lse, the loss is a
    softmax one (``Mode.SOFTMAX_FOCAL``) and the backend keeps k > 0 floats per pixel
    (``keeps_lse(x, mode, gamma)``), else (0,): each pixel's log Σ_k exp(interpolated logit k) (the
    C++ backend always; the Triton one beyond 12 classes, where its backward works in class groups,
    followed there, with γ != 0, by each pixel's focal weight ∂ℓ/∂log p_y: k = 2). No argument is
    mutated.

backward ``{backend}_upsample_loss_bwd(x, target, grad_pixel, grad_class, interp,
align_corners, loss_mode, gamma, tvals, ignore_index, lse=None) -> grad``: the vector-Jacobian
product of the forward's two float outputs with respect to the low-resolution logits, shaped,
typed and laid out like ``x``; deterministic (no float atomics). ``lse``: the forward's, which
saves the backward its max and sum passes (one exponential per logit instead of two passes
more); None: recomputed. Autograd passes it when the forward made one.

Neither op allocates anything of B·C·H·W elements.
"""
import enum

import torch

from . import Mode, fwd_fake
from ._autograd import register_loss_autograd

__all__ = ["Interp", "register"]


class Interp(enum.IntEnum):
    """The ``mode`` of ``F.interpolate`` the upsampled ops reproduce."""

    NEAREST = 0
    BILINEAR = 1


def _fake_forward(keeps_lse):
    def fake_forward(x, target, interp, align_corners, loss_mode, gamma, tvals, ignore_index, need_pixel_loss,
                     need_tp, need_confusion, need_lse=False):
        """Output shapes and dtypes of the forward op (its ``register_fake``): the loss op's, with
        target (B, H, W), and lse."""
        out = fwd_fake(x, target, need_pixel_loss, need_tp, need_confusion)
        n = target.numel() * keeps_lse(x, Mode(loss_mode), gamma) if need_lse else 0
        return out + (x.new_empty(n, dtype=out[1].dtype),)

    return fake_forward


def fake_backward(x, target, grad_pixel, grad_class, interp, align_corners, loss_mode, gamma, tvals,
                  ignore_index, lse=None):
    return torch.empty_like(x)


def register(fwd_op_name, bwd_op_name, bwd_op, keeps_lse):
    """Fake kernels and autograd of a backend's upsampled ops. The autograd formula is the loss
    ops' (``register_loss_autograd``): the backward op applies the loss gradient and the transposed
    interpolation in one pass; ``interp, align_corners`` ride along, and the forward's ``lse``
    goes to the backward. ``keeps_lse(x, mode, gamma)``: how many floats per pixel the backend's forward
    keeps for it (0: none)."""
    torch.library.register_fake(fwd_op_name)(_fake_forward(keeps_lse))
    torch.library.register_fake(bwd_op_name)(fake_backward)
    register_loss_autograd(fwd_op_name, bwd_op, geometry_args=2, lse_output=True)
