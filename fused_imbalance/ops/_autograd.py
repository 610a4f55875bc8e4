"""One autograd formula for every backend's fused loss op (see the contract in ``__init__``)."""
import torch


def register_loss_autograd(fwd_op_name, bwd_op):
    """Register the backward of ``fwd_op_name`` (a ``*_loss_fwd`` op) using ``bwd_op``.

    The forward's float outputs are ``pixel_loss`` (N,) and ``class_loss`` (C,); their
    incoming gradients are passed straight to the backward kernel, which computes
    ``(grad_pixel[n] + grad_class[y_n]) * ∂ℓ_n/∂x``. The integer outputs take no gradient.
    """

    def setup_context(ctx, inputs, output):
        x, target, mode, gamma, tvals, ignore_index, _need_pixel_loss, _confusion = inputs
        ctx.save_for_backward(x, target, tvals)
        ctx.mode, ctx.gamma, ctx.ignore_index = mode, gamma, ignore_index

    def backward(ctx, grad_pixel, grad_class, _g_count, _g_tp, _g_bad):
        x, target, tvals = ctx.saved_tensors
        if grad_pixel is not None and grad_pixel.numel() != target.numel():
            grad_pixel = None  # pixel_loss was not requested (an empty tensor)
        grad = bwd_op(x, target, grad_pixel, grad_class, ctx.mode, ctx.gamma, tvals,
                      ctx.ignore_index)
        return grad, None, None, None, None, None, None, None

    torch.library.register_autograd(fwd_op_name, backward, setup_context=setup_context)
