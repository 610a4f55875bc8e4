"""The one autograd formula of every fused loss, and the short path of an eager call.

An eager call goes from the public function to the backend's forward through one
``torch.autograd.Function``, whose backward calls the backend's backward function: the plain Python
launcher of the Triton kernels, or the C++ function through pybind11, with no ``torch.library``
layer in between. A backend may have its own autograd node for that call (``Backend.autograd``: the
C++ backend's, whose backward runs no Python), the same formula calling the same functions;
forward-mode AD takes the Python one, which has the jvp. Inside ``torch.compile`` the same formula
calls the registered ops instead (so that Inductor sees the Triton kernels); the ops run the same
functions, so both give bit-identical results.

The forward op returns the loss (a scalar, the per-pixel loss of ``"none"`` or the per-class sums
S_c), the backward's per-class factor ``scale``, the counts, true positives and bad labels
(:mod:`fused_imbalance.ops`). The gradient with respect to the logits is the backward op applied to
the upstream gradient and that factor (or, for S_c, the upstream gradient of the sums as the
factor). Forward-mode derivatives (``torch.autograd.forward_ad``, ``torch.func.jvp``) are the same
vector-Jacobian products dotted with the tangent: for a scalar loss ⟨∂L/∂x, t⟩, per pixel for
``"none"``, per class for the sums; under ``torch.func`` (grad, jvp, jacrev, jacfwd) the backward and
the jvp are torch operations on the gradient of a unit upstream gradient, which the forward computes.
``torch.func.vmap`` of the loss itself is an error that says so, never a wrong number.
"""

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _deferred
from .ops import Reduction, Weighting, acc_dtype

__all__ = ["forward", "register_backend"]

_BACKENDS = {}  # name -> ops.Backend, filled as the backends load (functional.resolve_backend)

VMAP_UNSUPPORTED = (
    "fused_imbalance: torch.func.vmap over a fused loss cannot batch the {backend!r} backend's kernels (a "
    "batch of losses is one call on the concatenated batch with reduction=\"none\"); torch.func.grad, jvp, "
    "jacrev and jacfwd of the loss work, or use backend=\"reference\" under vmap"
)
JVP_UPSAMPLED = (
    "fused_imbalance: forward-mode derivatives of the per-pixel or per-class outputs of an upsampled "
    "loss are not implemented on the fused {backend!r} backend (those of a mean or sum are); use "
    "backend=\"reference\" for them"
)
DOUBLE_BACKWARD = (
    "fused_imbalance: second derivatives of the fused losses are not implemented (the backward "
    "of the {backend!r} backend has no derivative); use backend=\"reference\" for double backward, "
    "Hessians or gradient penalties through the loss"
)


def register_backend(be):
    _BACKENDS[be.name] = be


def _fwd_call(
    name,
    graph,
    x,
    target,
    geo,
    weight,
    tvals,
    confusion,
    mode,
    gamma,
    ignore_index,
    reduction,
    weighting,
    need_tp,
    validate,
    need_lse,
):
    be = _BACKENDS[name]
    if geo:
        fn = be.up_fwd_op if graph else be.up_fwd
        return fn(
            x,
            target,
            geo[0],
            geo[1],
            weight,
            tvals,
            confusion,
            mode,
            gamma,
            ignore_index,
            reduction,
            weighting,
            need_tp,
            validate,
            need_lse,
        )
    fn = be.fwd_op if graph else be.fwd
    return fn(
        x,
        target,
        weight,
        tvals,
        confusion,
        mode,
        gamma,
        ignore_index,
        reduction,
        weighting,
        need_tp,
        validate,
        need_lse,
    )


def _bwd_call(name, graph, x, target, geo, grad, scale, tvals, lse, mode, gamma, ignore_index):
    be = _BACKENDS[name]
    if geo:
        fn = be.up_bwd_op if graph else be.up_bwd
        return fn(x, target, geo[0], geo[1], grad, scale, tvals, lse, mode, gamma, ignore_index)
    fn = be.bwd_op if graph else be.bwd
    return fn(x, target, grad, scale, tvals, lse, mode, gamma, ignore_index)


def _upstream(grad_loss, scale, reduction, weighting):
    """(grad, scale) of the backward op: the upstream gradient and the per-class factor."""
    if reduction == Reduction.CLASS:
        return None, grad_loss  # the gradient of each class's sum, per pixel of that class
    if reduction != Reduction.MEAN and weighting == Weighting.NONE:
        return grad_loss, None  # a factor of 1 for every class
    return grad_loss, scale


def _vjp(s, x, scale, lse, grad_loss, graph):
    if s.ema is None:
        grad, sc = _upstream(grad_loss, scale, s.reduction, s.weighting)
    else:  # the per-class sums weighted after the forward: a scalar loss with the factor of its weighting
        grad, sc = grad_loss, scale
    if graph:
        return _bwd_call(
            s.name, True, x, s.target, s.geo, grad, sc, s.tvals, lse, s.mode, s.gamma, s.ignore_index
        )
    return s.bwd(x, grad, sc, lse)


def _jvp(s, x, scale, lse, x_t, graph=False):
    """The loss's tangent for the logits' tangent ``x_t``: the backward with a unit upstream gradient,
    dotted with it per pixel (and summed as the loss sums). ``graph``: through the registered op (under
    torch.func, whose wrapped tensors only dispatched ops can take)."""
    if x_t is None:
        return None
    acc = acc_dtype(x)
    N = s.target.numel()
    if s.reduction in (Reduction.MEAN, Reduction.SUM) or s.ema is not None:
        g = _vjp(s, x, scale, lse, torch.ones((), dtype=acc, device=x.device), graph)
        return (g.to(acc) * x_t.to(acc)).sum()
    if s.geo:  # a per-pixel output of the interpolated logits: its tangent needs the full-resolution gradient
        raise RuntimeError(JVP_UPSAMPLED.format(backend=s.name))
    if s.reduction == Reduction.NONE:
        g = _vjp(s, x, scale, lse, torch.ones(N, dtype=acc, device=x.device), graph)
        return (g.to(acc) * x_t.to(acc)).sum(1).reshape(-1)
    # per-class sums: each pixel's dot added into its class (0 at pixels that are not valid)
    C = x.shape[1]
    unit = torch.ones(C, dtype=acc, device=x.device)
    g = _bwd_call(
        s.name, graph, x, s.target, s.geo, None, unit, s.tvals, lse, s.mode, s.gamma, s.ignore_index
    )
    dots = (g.to(acc) * x_t.to(acc)).sum(1).reshape(-1)
    y = s.target.reshape(-1).long()
    return torch.zeros(C, dtype=acc, device=x.device).index_add_(0, y.clamp(0, C - 1), dots)


class _Call:
    """One call's arguments other than the logits: the labels and the non-differentiable tensors
    (weights, MSE targets, the caller's confusion matrix) and the options. They ride along as one
    object, so that autograd's ``apply`` handles a single tensor input (the logits). ``args`` is the
    tuple the backend's eager forward function takes after the logits (the upsampled one's with
    ``geo`` after the labels); the eager path's forward leaves the counts, true positives and bad
    labels here (``count``, ``tp``, ``bad``), outside autograd, and the backward's ``scale`` and ``lse``.
    ``ema``: None, or ``RecallLoss``'s moving average (running, seen, 1 − momentum, reduction) that the
    eager forward applies to the per-class sums (``Backend.recall_ema``), making the loss a scalar."""

    __slots__ = ("name", "be", "geo", "args", "count", "tp", "bad", "scale", "lse", "ema")

    def __init__(
        self,
        name,
        target,
        geo,
        weight,
        tvals,
        confusion,
        mode,
        gamma,
        ignore_index,
        reduction,
        weighting,
        need_tp,
        validate,
        need_lse,
    ):
        self.name, self.be, self.geo, self.ema = name, _BACKENDS[name], geo, None
        self.args = (
            target,
            *geo,
            weight,
            tvals,
            confusion,
            mode,
            gamma,
            ignore_index,
            reduction,
            weighting,
            need_tp,
            validate,
            need_lse,
        )

    # the arguments by name, counted from the end (``geo`` sits after the labels)
    target = property(lambda self: self.args[0])
    weight = property(lambda self: self.args[-11])
    tvals = property(lambda self: self.args[-10])
    confusion = property(lambda self: self.args[-9])
    mode = property(lambda self: self.args[-8])
    gamma = property(lambda self: self.args[-7])
    ignore_index = property(lambda self: self.args[-6])
    reduction = property(lambda self: self.args[-5])
    weighting = property(lambda self: self.args[-4])
    need_tp = property(lambda self: self.args[-3])
    validate = property(lambda self: self.args[-2])
    need_lse = property(lambda self: self.args[-1])

    def bwd(self, x, grad, scale, lse):
        """The backend's eager backward function on the logits ``x``."""
        a = self.args
        if self.geo:
            return self.be.up_bwd(x, a[0], a[1], a[2], grad, scale, a[-10], lse, a[-8], a[-7], a[-6])
        return self.be.bwd(x, a[0], grad, scale, a[-10], lse, a[-8], a[-7], a[-6])


def _run_forward(s, x):
    """The eager forward, and the deferred check of its bad labels (made here, on the plain tensors
    even under torch.func, whose outputs are wrapped)."""
    a = s.args
    out = (s.be.up_fwd if s.geo else s.be.fwd)(x, *a)
    if a[-2] and s.be.defers_validation:
        _deferred.labels(out[4], x.shape[1], a[-6])
    return out


class _Eager(torch.autograd.Function):
    """The eager path: ctx-style (no per-call signature binding), one output (the loss), with forward-mode
    derivatives. The counts, true positives and bad labels stay on the call object: not autograd's
    outputs, they cost it nothing."""

    @staticmethod
    def forward(ctx, x, s):
        loss, s.scale, s.count, s.tp, s.bad, s.lse = _run_forward(s, x)
        if s.ema is not None:
            loss, s.scale = s.be.recall_ema(loss, s.count, s.tp, *s.ema)
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.s = s
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (x,) = ctx.saved_tensors
        s = ctx.s
        if torch.is_grad_enabled():  # create_graph=True: a step whose own derivative is an error
            return _Backward.apply(x, s.scale, s.lse, grad_loss, s), None
        return _vjp(s, x, s.scale, s.lse, grad_loss, False), None

    @staticmethod
    def jvp(ctx, x_t, _):
        s = ctx.s
        return _jvp(s, ctx.saved_tensors[0], s.scale, s.lse, x_t)


class _Backward(torch.autograd.Function):
    """The backward op as a differentiable step, so that a second derivative is an error that says so
    (create_graph=True would otherwise give a gradient silently missing its second-order term)."""

    @staticmethod
    def forward(ctx, x, scale, lse, grad_loss, s):
        ctx.s = s
        return _vjp(s, x, scale, lse, grad_loss, False)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD.format(backend=ctx.s.name))


class _Func(torch.autograd.Function):
    """The path under torch.func transforms (grad, jvp): setup_context style, as they require, and every
    tensor an input (the transforms unwrap inputs only: the labels, made inside the transform, are
    wrapped tensors there). The transforms' tensors cannot reach a kernel in a backward or a jvp, so
    the forward computes the gradient for a unit upstream gradient too, and the backward and the jvp
    are torch operations on it: the gradient is linear in the upstream one (per pixel, or per class for
    the per-class sums)."""

    @staticmethod
    def forward(x, target, weight, tvals, confusion, s):
        s = _with_tensors(s, target, weight, tvals, confusion)
        loss, scale, count, tp, bad, lse = _run_forward(s, x)
        if s.reduction == Reduction.CLASS:
            unit = _bwd_call(
                s.name, False, x, s.target, s.geo, None, None, s.tvals, lse, s.mode, s.gamma, s.ignore_index
            )
        else:
            unit = _vjp(s, x, scale, lse, torch.ones((), dtype=acc_dtype(x), device=x.device), False)
        return loss, count, tp, bad, unit

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, target, weight, tvals, confusion, s = inputs
        loss, count, tp, bad, unit = output
        ctx.mark_non_differentiable(count, tp, bad, unit)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(target, unit)
        ctx.save_for_forward(target, unit)
        ctx.s = s

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if grad_loss is None:
            return (None,) * 6
        target, unit = ctx.saved_tensors
        return (_scaled(ctx.s, unit, target, grad_loss),) + (None,) * 5

    @staticmethod
    def jvp(ctx, x_t, *_):
        target, unit = ctx.saved_tensors
        if x_t is None:
            return None, None, None, None, None
        s = ctx.s
        dots = unit.to(x_t.dtype) * x_t
        if s.reduction in (Reduction.MEAN, Reduction.SUM):
            out = dots.sum()
        else:
            if s.geo:
                raise RuntimeError(JVP_UPSAMPLED.format(backend=s.name))
            dots = dots.sum(1).reshape(-1)
            if s.reduction == Reduction.CLASS:
                C = unit.shape[1]
                dots = torch.zeros(C, dtype=dots.dtype, device=dots.device).index_add(
                    0, target.reshape(-1).long().clamp(0, C - 1), dots
                )
            out = dots
        return out.to(acc_dtype(unit)), None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, target, weight, tvals, confusion, s):
        raise RuntimeError(VMAP_UNSUPPORTED.format(backend=s.name))


def _scaled(s, unit, target, grad_loss):
    """The gradient for the upstream ``grad_loss`` from the one for a unit upstream gradient."""
    if s.reduction in (Reduction.MEAN, Reduction.SUM):
        return unit * grad_loss.to(unit.dtype)
    if s.geo:
        raise RuntimeError(
            JVP_UPSAMPLED.replace("forward-mode derivatives", "torch.func derivatives").format(backend=s.name)
        )
    if s.reduction == Reduction.CLASS:  # the gradient of each class's sum, at the pixels of that class
        C = unit.shape[1]
        grad_loss = grad_loss[target.reshape(-1).long().clamp(0, C - 1)]
    shape = (unit.shape[0], 1) + tuple(unit.shape[2:])
    return unit * grad_loss.to(unit.dtype).reshape(shape)


def _with_tensors(s, target, weight, tvals, confusion):
    """A copy of the call ``s`` with its tensors replaced (the transforms' unwrapped ones)."""
    return _Call(
        s.name,
        target,
        s.geo,
        weight,
        tvals,
        confusion,
        s.mode,
        s.gamma,
        s.ignore_index,
        s.reduction,
        s.weighting,
        s.need_tp,
        s.validate,
        s.need_lse,
    )


class _Graph(torch.autograd.Function):
    """The path inside torch.compile: the registered ops, which Dynamo and Inductor trace."""

    @staticmethod
    def forward(
        ctx,
        x,
        target,
        weight,
        tvals,
        confusion,
        name,
        geo,
        mode,
        gamma,
        ignore_index,
        reduction,
        weighting,
        need_tp,
        validate,
        need_lse,
    ):
        loss, scale, count, tp, bad, lse = _fwd_call(
            name,
            True,
            x,
            target,
            geo,
            weight,
            tvals,
            confusion,
            mode,
            gamma,
            ignore_index,
            reduction,
            weighting,
            need_tp,
            validate,
            need_lse,
        )
        ctx.mark_non_differentiable(count, tp, bad)
        ctx.save_for_backward(x, target, tvals, scale, lse)
        ctx.name, ctx.geo, ctx.mode, ctx.gamma, ctx.ignore_index = name, geo, mode, gamma, ignore_index
        ctx.reduction, ctx.weighting = reduction, weighting
        return loss, count, tp, bad

    @staticmethod
    def backward(ctx, grad_loss, *_):
        x, target, tvals, scale, lse = ctx.saved_tensors
        grad, sc = _upstream(grad_loss, scale, ctx.reduction, ctx.weighting)
        dx = _bwd_call(
            ctx.name, True, x, target, ctx.geo, grad, sc, tvals, lse, ctx.mode, ctx.gamma, ctx.ignore_index
        )
        return (dx,) + (None,) * 14


def forward(
    name,
    x,
    target,
    geo,
    weight,
    tvals,
    confusion,
    mode,
    gamma,
    ignore_index,
    reduction,
    weighting,
    need_tp,
    validate,
    ema=None,
):
    """Run the fused forward of backend ``name`` through the autograd formula: (loss, count, tp, bad).
    ``geo`` is () or the upsampled ops' (interp, align_corners). ``ema``: ``RecallLoss``'s moving average
    applied to the per-class sums of this CLASS call (see :class:`_Call`; only where :func:`eager`)."""
    be = _BACKENDS[name]
    if be.autograd is not None and own_node():
        # the backend's own autograd node (the C++ one: no Python in the step's backward)
        if ema is None:
            running = seen = None
            ema_weight, ema_reduction = 0.0, -1
        else:
            running, seen, ema_weight, ema_reduction = ema
        return be.autograd(
            unwrap_if_dead(x),
            target,
            *interp_args(geo),
            weight,
            tvals,
            confusion,
            mode,
            gamma,
            ignore_index,
            reduction,
            weighting,
            need_tp,
            validate,
            running,
            seen,
            ema_weight,
            ema_reduction,
        )
    # whether autograd will differentiate the call: the backend keeps what its backward may take, or
    # nothing where one read of the logits suffices (Backend.keeps_lse, decided in the launch)
    need_lse = torch.is_grad_enabled() and x.requires_grad
    if torch.compiler.is_compiling():
        out = _Graph.apply(
            x,
            target,
            weight,
            tvals,
            confusion,
            name,
            geo,
            int(mode),
            float(gamma),
            ignore_index,
            int(reduction),
            int(weighting),
            need_tp,
            validate,
            need_lse,
        )
        if validate and be.defers_validation:
            _deferred.labels(out[3], x.shape[1], ignore_index)  # a device assertion in the graph
    else:
        s = _Call(
            name,
            target,
            geo,
            weight,
            tvals,
            confusion,
            mode,
            gamma,
            ignore_index,
            reduction,
            weighting,
            need_tp,
            validate,
            need_lse,
        )
        if transforms_active():  # torch.func: a setup_context-style Function, every tensor an input
            return _Func.apply(x, target, weight, tvals, confusion, s)[:4]
        s.ema = ema
        out = (_eager_apply(unwrap_if_dead(x), s), s.count, s.tp, s.bad)
    return out


# Function.apply without its Python layer, which on the eager paths only checks for torch.func's transforms
# (the callers check them first) and unwraps a tensor that escaped one: the same steps, a few microseconds
# less per call.
transforms_active = torch._C._are_functorch_transforms_active
try:
    _apply = torch._C._FunctionBase.__dict__["apply"]
    unwrap_if_dead = torch._C._functorch.unwrap_if_dead
except (AttributeError, KeyError):  # another torch: the public entry point
    _apply = None
    unwrap_if_dead = lambda x: x  # noqa: E731


def eager():
    """True on the eager path: neither traced by torch.compile nor under torch.func's transforms."""
    return not (torch.compiler.is_compiling() or transforms_active())


def interp_args(geo):
    """(interp, align_corners) of the upsampled ops' geometry ``geo``; (-1, False) for the plain loss (``()``),
    as the C++ calls that serve both take them."""
    return (geo[0], geo[1]) if geo else (-1, False)


def own_node():
    """Whether an eager call may take its backend's own autograd node (``Backend.autograd``): outside
    torch.compile, torch.func and forward-mode AD (an open ``torch.autograd.forward_ad`` level: that node
    has no jvp)."""
    return _forward_ad._current_level < 0 and eager()


def bound_apply(fn):
    """``fn.apply`` (a ctx-style ``torch.autograd.Function``) for a call made outside torch.func's transforms."""
    return fn.apply if _apply is None else _apply.__get__(None, fn)


_eager_apply = bound_apply(_Eager)
