"""One autograd formula for every backend's fused loss op (see the contract in ``__init__``)."""
import torch

_libraries = []  # an Autograd kernel registration lives as long as its Library object


def _formula(bwd_op):
    """``(setup_context, backward)`` of a ``*_loss_fwd`` op whose backward op is ``bwd_op``.

    The forward's float outputs are ``pixel_loss`` (N,) and ``class_loss`` (C,); their incoming
    gradients go straight to the backward kernel, which computes
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
        grad = bwd_op(x, target, grad_pixel, grad_class, ctx.mode, ctx.gamma, tvals, ctx.ignore_index)
        return grad, None, None, None, None, None, None, None

    return setup_context, backward


def register_loss_autograd(fwd_op_name, bwd_op):
    """Register the backward of ``fwd_op_name`` (a ``*_loss_fwd`` op) using ``bwd_op``.

    ``torch.library.register_autograd`` refuses ops with a mutable argument, and the forward op
    has one: ``confusion``, int64 counts that take no gradient. So the formula is installed the
    way ``register_autograd`` itself installs it: on the op's definition for Python custom ops
    (``custom_op`` / ``triton_op``), or as the op's Autograd kernel for ops defined in C++.
    """
    setup_context, backward = _formula(bwd_op)
    opdef = torch._library.custom_ops._maybe_get_opdef(fwd_op_name)
    if opdef is not None:
        opdef._backward_fn, opdef._setup_context_fn = backward, setup_context
        return
    from torch._library.autograd import Info, make_autograd_impl
    op = torch._library.utils.lookup_op(fwd_op_name)
    namespace, name = fwd_op_name.split("::")
    lib = torch.library.Library(namespace, "FRAGMENT")
    lib.impl(name, make_autograd_impl(op, Info(backward, setup_context)), "Autograd", with_keyset=True)
    _libraries.append(lib)
