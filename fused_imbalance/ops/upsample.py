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

__all__ = ["Interp", "register_autograd", "register_fake"]


class Interp(enum.IntEnum):
    """The ``mode`` of ``F.interpolate`` the upsampled ops reproduce."""

    NEAREST = 0
    BILINEAR = 1


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def fake_forward(x, target, interp, align_corners, loss_mode, gamma, tvals, ignore_index, need_pixel_loss,
                 need_tp, need_confusion):
    """Output shapes and dtypes of the forward op (its ``register_fake``)."""
    acc, C = _acc(x), x.shape[1]
    kc = C if need_confusion else 0
    return (x.new_empty((target.numel() if need_pixel_loss else 0,), dtype=acc),
            x.new_empty((C,), dtype=acc),
            x.new_empty((C,), dtype=torch.int64),
            x.new_empty((C if need_tp else 0,), dtype=torch.int64),
            x.new_empty((), dtype=torch.int64),
            x.new_empty((kc, kc), dtype=torch.int64))


def fake_backward(x, target, grad_pixel, grad_class, interp, align_corners, loss_mode, gamma, tvals,
                  ignore_index):
    return torch.empty_like(x)


def register_fake(fwd_op_name, bwd_op_name):
    torch.library.register_fake(fwd_op_name)(fake_forward)
    torch.library.register_fake(bwd_op_name)(fake_backward)


def register_autograd(fwd_op_name, bwd_op):
    """The backward of ``fwd_op_name`` through ``bwd_op``, with the public ``register_autograd``
    (the ops mutate nothing). The forward's float outputs are pixel_loss and class_loss; their
    gradients go to the backward op, which applies the loss gradient and the transposed
    interpolation in one pass. The integer outputs take no gradient."""

    def setup_context(ctx, inputs, output):
        x, target, interp, align_corners, loss_mode, gamma, tvals, ignore_index = inputs[:8]
        ctx.save_for_backward(x, target, tvals)
        ctx.args = (interp, align_corners, loss_mode, gamma)
        ctx.ignore_index = ignore_index

    def backward(ctx, grad_pixel, grad_class, *_integer_outputs):
        x, target, tvals = ctx.saved_tensors
        if grad_pixel is not None and grad_pixel.numel() != target.numel():
            grad_pixel = None  # pixel_loss was not requested (an empty tensor)
        interp, align_corners, loss_mode, gamma = ctx.args
        grad = bwd_op(x, target, grad_pixel, grad_class, interp, align_corners, loss_mode, gamma, tvals,
                      ctx.ignore_index)
        return (grad,) + (None,) * 10

    torch.library.register_autograd(fwd_op_name, backward, setup_context=setup_context)
