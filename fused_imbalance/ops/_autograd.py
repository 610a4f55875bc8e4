"""One autograd formula for every backend's fused loss op (see the contract in ``__init__``)."""
import torch


def _formula(bwd_op, geometry_args, lse_output):
    """``(setup_context, backward)`` of a ``*_loss_fwd`` op whose backward op is ``bwd_op``.

    The forward's float outputs are ``pixel_loss`` (N,) and ``class_loss`` (C,); their incoming
    gradients go straight to the backward kernel, which computes
    ``(grad_pixel[n] + grad_class[y_n]) * ∂ℓ_n/∂x``. The integer outputs take no gradient.
    ``geometry_args`` non-tensor arguments follow ``target`` in both ops (the upsampled ops'
    ``interp, align_corners``). With ``lse_output`` the forward has a seventh output, each
    pixel's log-sum-exp (and what else the backend keeps; empty when not computed), which is saved
    and handed to the backward op as its last argument, so that the backward need not recompute
    it; it takes no gradient.
    """
    k = geometry_args

    def setup_context(ctx, inputs, output):
        x, target = inputs[:2]
        mode, gamma, tvals, ignore_index = inputs[2 + k:6 + k]
        lse = output[6] if lse_output and output[6].numel() else None
        if lse_output:
            ctx.mark_non_differentiable(output[6])
        # an output nothing differentiates gets None, not a tensor of zeros (lse is B·H·W floats or more)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, target, tvals, lse)
        ctx.geometry = tuple(inputs[2:2 + k])
        ctx.mode, ctx.gamma, ctx.ignore_index = mode, gamma, ignore_index
        ctx.num_inputs = len(inputs)

    def backward(ctx, grad_pixel, grad_class, *_g_integer_outputs):
        x, target, tvals, lse = ctx.saved_tensors
        if grad_pixel is not None and grad_pixel.numel() != target.numel():
            grad_pixel = None  # pixel_loss was not requested (an empty tensor)
        extra = (lse,) if lse_output else ()
        grad = bwd_op(x, target, grad_pixel, grad_class, *ctx.geometry, ctx.mode, ctx.gamma, tvals,
                      ctx.ignore_index, *extra)
        return (grad,) + (None,) * (ctx.num_inputs - 1)

    return setup_context, backward


DOUBLE_BACKWARD = ("fused_imbalance: second derivatives of the fused losses are not implemented (the "
                   "backward of {op} has no derivative); use backend=\"reference\" for double backward, "
                   "Hessians or gradient penalties through the loss")


def _no_double_backward(op_name):
    """The autograd formula of a backward op: it raises, so a second derivative is an error,
    never a number that silently lacks the second-order term."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD.format(op=op_name))

    return setup_context, backward


def register_loss_autograd(fwd_op_name, bwd_op, geometry_args=0, lse_output=False):
    """Register the backward of ``fwd_op_name`` (a ``*_loss_fwd`` op) using ``bwd_op``, through the
    public ``torch.library.register_autograd`` (the op mutates no argument: its confusion counts are
    an output), and make differentiating ``bwd_op`` itself an error."""
    setup_context, backward = _formula(bwd_op, geometry_args, lse_output)
    torch.library.register_autograd(fwd_op_name, backward, setup_context=setup_context)
    bwd_setup, bwd_backward = _no_double_backward(fwd_op_name.replace("_fwd", "_bwd"))
    torch.library.register_autograd(bwd_op, bwd_backward, setup_context=bwd_setup)
