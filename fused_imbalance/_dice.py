"""The fused Dice family's call path (docs/DESIGN.md §12): option checks, the autograd formula, the call.

An eager call is one ``torch.autograd.Function`` whose forward runs the backend's forward function
(the Triton launcher, or the C++ function through pybind11) and whose backward runs its backward
function; inside ``torch.compile`` the same formula calls the registered ops (:mod:`.ops.dice`), which
run the same functions. The forward's pass gives the per-(image,)class sums, its finalize the loss and
the backward's coefficients for a unit upstream gradient; the backward multiplies them by the upstream
gradient on the device. Nothing waits for the device.

``sync`` (the modules' ``distributed=True``): a function ``sums -> (sums, grad_scale)`` called between
the pass and the finalize, which all-reduces the (1, 4, C) sums of the batch over the ranks; the loss
is then the global batch's on every rank, and ``grad_scale`` (the world size) multiplies the
coefficients, so that the gradients DDP averages over the ranks are the global batch's.
"""

import weakref

import torch

from . import _deferred, _upsample
from . import reference as _ref
from ._fused import DOUBLE_BACKWARD, bound_apply, own_node, transforms_active, unwrap_if_dead
from .ops import Reduction, acc_dtype, collapsible
from .ops.dice import BATCH, CE, INCLUDE_BACKGROUND, JACCARD, SQUARED, DiceKind, WType, dice_backend, params

__all__ = ["DiceOptions", "options", "run", "check_weight"]

TORCH_FUNC_UNSUPPORTED = (
    "fused_imbalance: torch.func transforms (grad, jvp, vmap, ...) of the fused Dice losses are not implemented "
    "on the {backend!r} backend; use backend=\"reference\" under them"
)


@torch.compiler.assume_constant_result
def _ready(name):
    """Load the backend's Dice ops (imports, which torch.compile cannot trace: once, a constant there)."""
    dice_backend(name)
    return True


_WEIGHTS = 64
_weights = {}  # id(weight) -> (weak reference, key, the op's weight or None for the tensor itself)


def check_weight(weight, logits, kept, validate, name="weight"):
    """A (kept,) Dice class weight in the accumulation dtype (shape, dtype and device as the reference's
    check). With ``validate``, finite and >= 0 (MONAI's check): at once for CPU tensors, deferred for
    device tensors (no host sync in a training step: :mod:`._deferred`).

    A weight tensor is checked and converted once per version (its in-place changes bump it): the
    repeated calls of a training loop with one weight run no tensor operation for it."""
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor) or torch.compiler.is_compiling():
        return _check_weight(weight, logits, kept, validate, name)
    try:
        version = weight._version
    except RuntimeError:  # an inference-mode tensor has no version counter: checked at every call
        return _check_weight(weight, logits, kept, validate, name)
    key = (version, logits.shape[1], kept, logits.dtype, logits.device, validate, name)
    hit = _weights.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == key:
        return weight if hit[2] is None else hit[2]
    w = _check_weight(weight, logits, kept, validate, name)
    if len(_weights) >= _WEIGHTS:
        _weights.clear()
    _weights[id(weight)] = (weakref.ref(weight), key, None if w is weight else w)
    return w


def _check_weight(weight, logits, kept, validate, name):
    C = logits.shape[1]
    if not isinstance(weight, torch.Tensor):
        weight = torch.as_tensor(weight, dtype=acc_dtype(logits), device=logits.device)
    w = _ref._dice_weight(weight, logits, kept, validate=False, name=name)
    if validate:
        ok = (torch.isfinite(w) & (w >= 0)).all()
        message = f"{name} must be finite and >= 0 (as MONAI's Dice losses)"
        if w.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(ok):
                raise ValueError(f"{message}, got {w.tolist()}")
        else:
            _deferred.flag(ok, message)
    if kept != C:  # the ops take C weights; class 0's is unread without background
        w = torch.cat([w.new_zeros(1), w])
    return w.contiguous()


class DiceOptions:
    """The checked options of one call: the op arguments (``kind``, ``w_type``, ``flags``, ``params``)."""

    __slots__ = ("kind", "w_type", "flags", "params", "first")

    def __init__(
        self,
        logits,
        kind,
        include_background=True,
        squared_pred=False,
        jaccard=False,
        smooth_nr=1e-5,
        smooth_dr=1e-5,
        batch=False,
        alpha=0.5,
        beta=0.5,
        gamma=1.0,
        w_type="square",
        lambda_dice=1.0,
        lambda_ce=None,
    ):
        chk, num = _ref._check_flag, _ref._check_number
        flags = 0  # plain ints: torch.compile of torch 2.11 cannot trace the making of an IntFlag
        if chk(include_background, "include_background"):
            flags |= INCLUDE_BACKGROUND
        if chk(squared_pred, "squared_pred"):
            flags |= SQUARED
        if chk(jaccard, "jaccard"):
            flags |= JACCARD
        if chk(batch, "batch"):
            flags |= BATCH
        if lambda_ce is not None:
            flags |= CE
        _ref._kept_classes(logits, include_background)
        if kind == DiceKind.GENERALIZED and w_type not in _ref.W_TYPES:
            raise ValueError(f"w_type must be one of {_ref.W_TYPES}, got {w_type!r}")
        prm = dict(smooth_nr=num(smooth_nr, "smooth_nr"), smooth_dr=num(smooth_dr, "smooth_dr"))
        if kind == DiceKind.TVERSKY:
            prm.update(
                alpha=num(alpha, "alpha"), beta=num(beta, "beta"), gamma=num(gamma, "gamma", positive=True)
            )
        if lambda_ce is not None:
            prm.update(lambda_dice=num(lambda_dice, "lambda_dice"), lambda_ce=num(lambda_ce, "lambda_ce"))
        self.kind = int(kind)
        self.w_type = int(WType.of(w_type)) if kind == DiceKind.GENERALIZED else 0
        self.flags = int(flags)
        self.params = params(**prm)
        self.first = 0 if include_background else 1


_PLAIN = (bool, int, float, str)
_OPTIONS = 256
_options = {}  # (kind, C, options, their types) -> DiceOptions


def options(logits, kind, **kw):
    """:class:`DiceOptions`, remembered per (kind, class count, options) when the options are plain
    numbers, flags and names: the repeated calls of a training loop cost a dictionary lookup."""
    types = tuple(map(type, kw.values()))
    if torch.compiler.is_compiling() or not all(t in _PLAIN for t in types):
        return DiceOptions(logits, kind, **kw)
    key = (kind, logits.shape[1], tuple(kw.items()), types)  # the types: True and 1 are equal keys
    o = _options.get(key)
    if o is None:
        o = DiceOptions(logits, kind, **kw)
        if len(_options) >= _OPTIONS:
            _options.clear()
        _options[key] = o
    return o


class _Call:
    """One call's arguments other than the logits, riding along as one object (as ``_fused._Call``)."""

    __slots__ = (
        "name",
        "target",
        "weight",
        "ce_weight",
        "confusion",
        "o",
        "ignore_index",
        "reduction",
        "validate",
        "sync",
        "coef",
        "ce_scale",
    )

    def __init__(
        self, name, target, weight, ce_weight, confusion, o, ignore_index, reduction, validate, sync
    ):
        self.name, self.target, self.weight, self.ce_weight = name, target, weight, ce_weight
        self.confusion, self.o, self.ignore_index, self.reduction = confusion, o, ignore_index, reduction
        self.validate, self.sync = validate, sync


def _forward(
    be,
    graph,
    x,
    target,
    weight,
    ce_weight,
    confusion,
    kind,
    w_type,
    flags,
    prm,
    ignore_index,
    reduction,
    validate,
    sync,
):
    """(loss, coef, ce_scale, bad): the pass and its finalize, with the sums all-reduced between them
    when there is a ``sync``."""
    fwd = be.fwd_op if graph else be.fwd
    if sync is None:
        loss, _, coef, ce_scale, bad = fwd(
            x,
            target,
            weight,
            ce_weight,
            confusion,
            kind,
            w_type,
            flags,
            prm,
            ignore_index,
            reduction,
            validate,
            True,
        )
        return loss, coef, ce_scale, bad
    _, sums, _, _, bad = fwd(
        x,
        target,
        weight,
        ce_weight,
        confusion,
        kind,
        w_type,
        flags,
        prm,
        ignore_index,
        reduction,
        validate,
        False,
    )
    sums, grad_scale = sync(sums)
    fin = be.finalize_op if graph else be.finalize
    loss, coef, ce_scale = fin(
        sums, weight, ce_weight, kind, w_type, flags, prm, reduction, float(grad_scale)
    )
    return loss, coef, ce_scale, bad


def _check_labels(name, bad, C, ignore_index, validate):
    if validate and name == "triton":  # the C++ ops raise at once; the Triton backend defers
        _deferred.labels(bad, C, ignore_index)


def _backward(be, graph, x, target, coef, ce_scale, grad, kind, flags, ignore_index, reduction):
    bwd = be.bwd_op if graph else be.bwd
    return bwd(
        x, target, coef, ce_scale if ce_scale.numel() else None, grad, kind, flags, ignore_index, reduction
    )


class _Eager(torch.autograd.Function):
    """The eager path: ctx-style, one output (the loss); the backward's coefficients stay on the call object."""

    @staticmethod
    def forward(ctx, x, s):
        o = s.o
        loss, s.coef, s.ce_scale, bad = _forward(
            dice_backend(s.name),
            False,
            x,
            s.target,
            s.weight,
            s.ce_weight,
            s.confusion,
            o.kind,
            o.w_type,
            o.flags,
            o.params,
            s.ignore_index,
            s.reduction,
            s.validate,
            s.sync,
        )
        _check_labels(s.name, bad, x.shape[1], s.ignore_index, s.validate)
        ctx.save_for_backward(x)
        ctx.s = s
        return loss

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = ctx.s
        args = (x, s.target, s.coef, s.ce_scale, grad, s.o.kind, s.o.flags, s.ignore_index, s.reduction)
        if torch.is_grad_enabled():  # create_graph=True: a step whose own derivative is an error
            return _Backward.apply(s.name, *args), None
        return _backward(dice_backend(s.name), False, *args), None


class _Backward(torch.autograd.Function):
    """The backward as a differentiable step, so that a second derivative is an error that says so."""

    @staticmethod
    def forward(ctx, name, *args):
        ctx.name = name
        return _backward(dice_backend(name), False, *args)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD.format(backend=ctx.name))


class _Graph(torch.autograd.Function):
    """The path inside torch.compile: the registered ops, which Dynamo and Inductor trace."""

    @staticmethod
    def forward(
        ctx,
        x,
        target,
        weight,
        ce_weight,
        confusion,
        name,
        kind,
        w_type,
        flags,
        prm,
        ignore_index,
        reduction,
        validate,
        sync,
        same,
    ):
        be = dice_backend(name)
        if same:
            ce_weight = weight
        loss, coef, ce_scale, bad = _forward(
            be,
            True,
            x,
            target,
            weight,
            ce_weight,
            confusion,
            kind,
            w_type,
            flags,
            prm,
            ignore_index,
            reduction,
            validate,
            sync,
        )
        ctx.mark_non_differentiable(bad)
        ctx.save_for_backward(x, target, coef, ce_scale)
        ctx.name, ctx.kind, ctx.flags, ctx.ignore_index, ctx.reduction = (
            name,
            kind,
            flags,
            ignore_index,
            reduction,
        )
        return loss, bad

    @staticmethod
    def backward(ctx, grad, _):
        x, target, coef, ce_scale = ctx.saved_tensors
        dx = _backward(
            dice_backend(ctx.name),
            True,
            x,
            target,
            coef,
            ce_scale,
            grad,
            ctx.kind,
            ctx.flags,
            ctx.ignore_index,
            ctx.reduction,
        )
        return (dx,) + (None,) * 14


def run(
    name, logits, target, rs, o, weight, ce_weight, confusion, ignore_index, reduction, validate, sync=None
):
    """The fused loss of backend ``name`` ("triton" or "cpp") with the checked options ``o``; the loss of
    ``"none"`` shaped as the reference's ((B, C') or (C',); (B,) or () for the generalized Dice).

    ``rs``: the upsample geometry, or None. With ``upsample`` the logits are interpolated with
    ``F.interpolate`` first (in the accumulation dtype, :func:`fused_imbalance.reference.upsampled`):
    the Dice pass is fused, the interpolation is not."""
    _ready(name)
    if rs is not None:
        logits = _upsample.reference_logits(logits, rs)
    x = logits if collapsible(logits) else logits.contiguous()
    t = target if target.is_contiguous() else target.contiguous()  # the ops read the labels flat
    red = int(Reduction.of(reduction))
    if torch.compiler.is_compiling():
        # dice_ce_loss's one weight for both terms goes in once: Dynamo refuses a tensor given twice
        same = ce_weight is weight and weight is not None
        loss, bad = _Graph.apply(
            x,
            t,
            weight,
            None if same else ce_weight,
            confusion,
            name,
            o.kind,
            o.w_type,
            o.flags,
            o.params,
            ignore_index,
            red,
            validate,
            sync,
            same,
        )
        _check_labels(name, bad, x.shape[1], ignore_index, validate)  # a device assertion in the graph
    else:
        if transforms_active():
            raise RuntimeError(TORCH_FUNC_UNSUPPORTED.format(backend=name))
        node = dice_backend(name).autograd
        if node is not None and sync is None and own_node():
            # the backend's own autograd node (the C++ one: no Python in the step's backward)
            loss = node(
                unwrap_if_dead(x),
                t,
                weight,
                ce_weight,
                confusion,
                o.kind,
                o.w_type,
                o.flags,
                o.params,
                ignore_index,
                red,
                validate,
            )
        else:
            loss = _eager_apply(
                unwrap_if_dead(x),
                _Call(name, t, weight, ce_weight, confusion, o, ignore_index, red, validate, sync),
            )
    if red == Reduction.NONE:
        loss = loss.reshape(_ref._per_image_shape(logits, bool(o.flags & BATCH)) + loss.shape[1:])
    return loss


_eager_apply = bound_apply(_Eager)
