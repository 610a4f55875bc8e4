"""The autograd formula of the fused OHEM cross-entropy (docs/DESIGN.md §13), the pattern of :mod:`._fused`.

An eager call goes from :func:`fused_imbalance.functional.ohem_cross_entropy` through one
``torch.autograd.Function`` to the backend's forward (the Triton launcher, or the C++ function through
pybind11), and its backward calls the backend's backward with the forward's per-pixel label
probabilities ``pn`` and (threshold, factor) ``aux``: the kept set is decided on the same stored values in
both directions. Inside ``torch.compile`` the same formula calls the registered ops (:mod:`.ops.ohem`),
which run the same functions: bit-identical results.

The kept set is a constant for autograd (the loss is piecewise smooth): the gradient is that of the kept
pixels' terms, linear in the upstream gradient. Forward-mode derivatives and ``torch.func`` (grad, jvp,
jacrev, jacfwd) use that linearity as :mod:`._fused` does; ``vmap`` of the loss, second derivatives and
forward-mode derivatives of the per-pixel output of an upsampled call are errors that say so.
"""

import torch

from . import _deferred, _fused
from ._fused import DOUBLE_BACKWARD, JVP_UPSAMPLED, VMAP_UNSUPPORTED
from .ops import Mode, Reduction, acc_dtype
from .ops import ohem as _ops

__all__ = ["forward"]


class _Call:
    """One call's arguments other than the logits (see :class:`._fused._Call`); the eager path's forward
    leaves the backward's per-pixel probabilities ``pn``, (threshold, factor) ``aux`` and ``lse`` here."""

    __slots__ = (
        "name",
        "be",
        "target",
        "geo",
        "weight",
        "confusion",
        "thresh",
        "rank",
        "ignore_index",
        "reduction",
        "mean_over_all",
        "validate",
        "need_lse",
        "pn",
        "aux",
        "lse",
    )

    def __init__(
        self,
        name,
        target,
        geo,
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
        self.name, self.be = name, _ops.load(name)
        self.target, self.geo, self.weight, self.confusion = target, geo, weight, confusion
        self.thresh, self.rank, self.ignore_index, self.reduction = thresh, rank, ignore_index, reduction
        self.mean_over_all, self.validate, self.need_lse = mean_over_all, validate, need_lse

    def with_tensors(self, target, weight, confusion):
        return _Call(
            self.name,
            target,
            self.geo,
            weight,
            confusion,
            self.thresh,
            self.rank,
            self.ignore_index,
            self.reduction,
            self.mean_over_all,
            self.validate,
            self.need_lse,
        )

    @property
    def interp(self):
        return _fused.interp_args(self.geo)


def _fwd_call(s, x, graph):
    fn = s.be.fwd_op if graph else s.be.fwd
    return fn(
        x,
        s.target,
        *s.interp,
        s.weight,
        s.confusion,
        s.thresh,
        s.rank,
        s.ignore_index,
        int(s.reduction),
        s.mean_over_all,
        s.validate,
        s.need_lse,
    )


def _bwd_call(s, x, grad, pn, aux, lse, graph):
    fn = s.be.bwd_op if graph else s.be.bwd
    return fn(x, s.target, *s.interp, grad, s.weight, pn, aux, lse, s.ignore_index)


def _run_forward(s, x):
    """The eager forward: (loss, pn, aux, lse), the deferred check of its bad labels made here."""
    loss, pn, aux, bad, lse = _fwd_call(s, x, False)
    if s.validate and s.be.defers_validation:
        _deferred.labels(bad, x.shape[1], s.ignore_index)
    return loss, pn, aux, lse


def _unit_grad(s, x, pn, aux, lse, graph=False):
    """The gradient for a unit upstream gradient (every pixel's, for "none")."""
    acc = acc_dtype(x)
    if s.reduction == Reduction.NONE:
        one = torch.ones(s.target.numel(), dtype=acc, device=x.device)
    else:
        one = torch.ones((), dtype=acc, device=x.device)
    return _bwd_call(s, x, one, pn, aux, lse, graph)


def _tangent(s, unit, x_t):
    """The loss's tangent for the logits' tangent ``x_t``, from the gradient of a unit upstream gradient."""
    if s.reduction != Reduction.NONE:
        return (unit.to(acc_dtype(unit)) * x_t.to(acc_dtype(unit))).sum()
    if s.geo:  # a per-pixel output of the interpolated logits: its tangent needs the full-resolution gradient
        raise RuntimeError(JVP_UPSAMPLED.format(backend=s.name))
    return (unit.to(acc_dtype(unit)) * x_t.to(acc_dtype(unit))).sum(1).reshape(-1)


class _Eager(torch.autograd.Function):
    """The eager path: ctx-style, one output (the loss), with forward-mode derivatives; the backward's
    tensors other than the logits stay on the call object."""

    @staticmethod
    def forward(ctx, x, s):
        loss, s.pn, s.aux, s.lse = _run_forward(s, x)
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.s = s
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (x,) = ctx.saved_tensors
        s = ctx.s
        if torch.is_grad_enabled():  # create_graph=True: a step whose own derivative is an error
            return _Backward.apply(x, s.pn, s.aux, s.lse, grad_loss, s), None
        return _bwd_call(s, x, grad_loss, s.pn, s.aux, s.lse, False), None

    @staticmethod
    def jvp(ctx, x_t, _):
        if x_t is None:
            return None
        s = ctx.s
        return _tangent(s, _unit_grad(s, ctx.saved_tensors[0], s.pn, s.aux, s.lse), x_t)


class _Backward(torch.autograd.Function):
    """The backward as a differentiable step, so that a second derivative is an error that says so."""

    @staticmethod
    def forward(ctx, x, pn, aux, lse, grad_loss, s):
        ctx.s = s
        return _bwd_call(s, x, grad_loss, pn, aux, lse, False)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD.format(backend=ctx.s.name))


class _Func(torch.autograd.Function):
    """The path under torch.func transforms (see :class:`._fused._Func`): the forward also computes the
    gradient of a unit upstream gradient, and the backward and the jvp are torch operations on it."""

    @staticmethod
    def forward(x, target, weight, confusion, s):
        s = s.with_tensors(target, weight, confusion)
        loss, pn, aux, lse = _run_forward(s, x)
        return loss, _unit_grad(s, x, pn, aux, lse)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[1])
        ctx.save_for_forward(output[1])
        ctx.s = inputs[-1]

    @staticmethod
    def backward(ctx, grad_loss, _):
        if grad_loss is None:
            return (None,) * 5
        (unit,) = ctx.saved_tensors
        s = ctx.s
        if s.reduction != Reduction.NONE:
            return (unit * grad_loss.to(unit.dtype),) + (None,) * 4
        if s.geo:
            raise RuntimeError(
                JVP_UPSAMPLED.replace("forward-mode derivatives", "torch.func derivatives").format(
                    backend=s.name
                )
            )
        shape = (unit.shape[0], 1) + tuple(unit.shape[2:])
        return (unit * grad_loss.to(unit.dtype).reshape(shape),) + (None,) * 4

    @staticmethod
    def jvp(ctx, x_t, *_):
        if x_t is None:
            return None, None
        (unit,) = ctx.saved_tensors
        return _tangent(ctx.s, unit, x_t).to(acc_dtype(unit)), None

    @staticmethod
    def vmap(info, in_dims, x, target, weight, confusion, s):
        raise RuntimeError(VMAP_UNSUPPORTED.format(backend=s.name))


class _Graph(torch.autograd.Function):
    """The path inside torch.compile: the registered ops, which Dynamo and Inductor trace (the options are
    plain arguments, as in :class:`._fused._Graph`)."""

    @staticmethod
    def forward(
        ctx,
        x,
        target,
        weight,
        confusion,
        name,
        geo,
        thresh,
        rank,
        ignore_index,
        reduction,
        mean_over_all,
        validate,
        need_lse,
    ):
        s = _Call(
            name,
            target,
            geo,
            weight,
            confusion,
            thresh,
            rank,
            ignore_index,
            reduction,
            mean_over_all,
            validate,
            need_lse,
        )
        loss, pn, aux, bad, lse = _fwd_call(s, x, True)
        ctx.mark_non_differentiable(bad)
        ctx.save_for_backward(x, target, weight, pn, aux, lse)
        ctx.name, ctx.geo, ctx.ignore_index = name, geo, ignore_index
        return loss, bad

    @staticmethod
    def backward(ctx, grad_loss, _):
        x, target, weight, pn, aux, lse = ctx.saved_tensors
        s = _Call(
            ctx.name,
            target,
            ctx.geo,
            weight,
            None,
            0.0,
            0,
            ctx.ignore_index,
            Reduction.MEAN,
            False,
            False,
            False,
        )
        return (_bwd_call(s, x, grad_loss, pn, aux, lse, True),) + (None,) * 12


@torch.compiler.assume_constant_result
def _loaded(name):
    """Load the backend's OHEM ops (imports and fake kernels, which torch.compile cannot trace): once, and
    a constant inside a trace."""
    _ops.load(name)
    return True


def forward(
    name, x, target, geo, weight, confusion, thresh, rank, ignore_index, reduction, mean_over_all, validate
):
    """The fused OHEM loss of backend ``name`` through the autograd formula: the loss (a scalar, or (N,) for
    "none"). ``geo`` is () or the upsampled ops' (interp, align_corners)."""
    _loaded(name)
    node = _ops.load(name).autograd
    if node is not None and _fused.own_node():
        # the backend's own autograd node (the C++ one: no Python in the step's backward)
        return node(
            _fused.unwrap_if_dead(x),
            target,
            *_fused.interp_args(geo),
            weight,
            confusion,
            float(thresh),
            rank,
            ignore_index,
            int(reduction),
            bool(mean_over_all),
            validate,
        )
    need_lse = (
        torch.is_grad_enabled()
        and x.requires_grad
        and _fused._BACKENDS[name].keeps_lse(x, Mode.SOFTMAX_FOCAL, 0.0, bool(geo)) > 0
    )
    if torch.compiler.is_compiling():
        loss, bad = _Graph.apply(
            x,
            target,
            weight,
            confusion,
            name,
            geo,
            float(thresh),
            rank,
            ignore_index,
            int(reduction),
            bool(mean_over_all),
            validate,
            need_lse,
        )
        if validate and _ops.load(name).defers_validation:
            _deferred.labels(bad, x.shape[1], ignore_index)  # a device assertion in the graph
        return loss
    s = _Call(
        name,
        target,
        geo,
        weight,
        confusion,
        float(thresh),
        rank,
        ignore_index,
        Reduction(reduction),
        bool(mean_over_all),
        validate,
        need_lse,
    )
    if _fused.transforms_active():  # torch.func: a setup_context-style Function, every tensor an input
        return _Func.apply(x, target, weight, confusion, s)[0]
    return _eager_apply(_fused.unwrap_if_dead(x), s)


_eager_apply = _fused.bound_apply(_Eager)
