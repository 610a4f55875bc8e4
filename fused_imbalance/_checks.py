"""Argument checks shared by the reference and the fused backends: bad input gets a clear
error, never a wrong number."""

import math
import numbers

import torch

from .ops import FLOAT_DTYPES as LOGIT_DTYPES
from .ops import LABEL_DTYPES, acc_dtype

REDUCTIONS = ("mean", "sum", "none")
LOSS_TYPES = ("softmax", "sigmoid", "focal", "softmax_focal")


def as_index(value, name):
    """An integer argument as torch takes one (``F.cross_entropy``'s ``ignore_index``, ``F.one_hot``'s
    ``num_classes``): a Python int, a numpy integer, or a 0-dim integer tensor (read once: for a tensor
    on a GPU that is a sync, as in torch), returned as a Python int. Booleans and floats are refused."""
    if type(value) is int:
        return value
    if isinstance(value, torch.Tensor):
        if (
            value.dim() == 0
            and not value.is_floating_point()
            and not value.is_complex()
            and value.dtype != torch.bool
        ):
            return int(value)
    elif (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and type(value).__name__ != "bool_"
    ):
        return int(value)
    raise TypeError(f"{name} must be an int, got {value!r}")


def check_types(logits, target):
    """Tensors, with a logits dtype and a label dtype the package takes."""
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("logits and target must be torch.Tensor")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if target.dtype not in LABEL_DTYPES:
        raise TypeError(f"target must be uint8, int16, int32 or int64 labels, got {target.dtype}")


def check_inputs(logits, target, ignore_index, reduction="mean"):
    """The shared checks of logits, target and options; returns ``ignore_index`` as a Python int."""
    check_types(logits, target)
    if logits.dim() < 2:
        raise ValueError(f"logits must be (N, C) or (B, C, d1, ..., dk), got shape {tuple(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError("logits must have at least one class (dim 1)")
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}: "
            f"expected {expected}"
            + (
                "; for (B, C, h, w) logits at a lower resolution than (B, H, W) labels pass upsample='bilinear' "
                "or 'nearest'"
                if logits.dim() == 4 and target.dim() == 3
                else ""
            )
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    return check_options(ignore_index, reduction)


def check_options(ignore_index=-100, reduction="mean"):
    """The ``ignore_index`` and ``reduction`` every loss and module takes; returns ``ignore_index`` as
    a Python int (:func:`as_index`)."""
    ignore_index = as_index(ignore_index, "ignore_index")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return ignore_index


def check_num_classes(num_classes):
    """A positive class count (:func:`as_index`: numpy integers too), as a Python int."""
    try:
        n = as_index(num_classes, "num_classes")
    except TypeError:
        n = None
    if n is None or n < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return n


def check_range(values, lo, hi, message):
    """Every element of ``values`` in [lo, hi] (NaN fails): a ``ValueError(message)`` at once for CPU
    tensors, deferred for device tensors (no host sync in a training step: :mod:`._deferred`)."""
    ok = ((values >= lo) & (values <= hi)).all()
    if values.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(message)
    else:
        from . import _deferred

        _deferred.flag(ok, message)


def check_loss_type(loss_type):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def dist_ready():
    """True when torch.distributed is available and a process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def check_class_vector(vec, name, logits):
    """A (C,) float per-class tensor on the logits' device, returned in the accumulation dtype."""
    C = logits.shape[1]
    if not isinstance(vec, torch.Tensor):
        vec = torch.as_tensor(vec, dtype=acc_dtype(logits), device=logits.device)
    if not vec.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {vec.dtype}")
    if vec.dim() != 1 or vec.numel() != C:
        raise ValueError(f"{name} must have shape ({C},) for {C} classes, got {tuple(vec.shape)}")
    if vec.device != logits.device:
        raise ValueError(f"{name} is on {vec.device} but logits are on {logits.device}")
    acc = acc_dtype(logits)
    if vec.requires_grad:  # a constant of the loss (the ops have no derivative in it)
        vec = vec.detach()
    return vec if vec.dtype == acc else vec.to(acc)  # each skipped call is an aten op less per step


def check_gamma(gamma):
    """γ as a float: a number >= 0, or a one-element tensor."""
    if isinstance(gamma, torch.Tensor) and gamma.numel() == 1:
        gamma = float(gamma)
    if isinstance(gamma, bool) or not isinstance(gamma, (numbers.Real, torch.SymInt, torch.SymFloat)):
        what = (
            f"a tensor of shape {tuple(gamma.shape)}"
            if isinstance(gamma, torch.Tensor)
            else f"{type(gamma).__name__} {gamma!r}"
        )
        raise TypeError(
            f"gamma must be a number (the focal exponent), got {what}; per-class weights " "go in weight="
        )
    # Comparisons, not math.isfinite, so a symbolic γ is checked by guards; NaN fails both.
    if not (0 <= gamma < math.inf):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
    return float(gamma)  # under torch.compile(dynamic=True) a symbolic γ stays symbolic


def check_confusion(confusion, logits, name="confusion"):
    if confusion is None:
        return
    C = logits.shape[1]
    if not isinstance(confusion, torch.Tensor) or confusion.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor")
    if tuple(confusion.shape) != (C, C):
        raise ValueError(f"{name} must have shape ({C}, {C}), got {tuple(confusion.shape)}")
    if confusion.device != logits.device:
        raise ValueError(f"{name} is on {confusion.device} but logits are on {logits.device}")
    if not confusion.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_labels(bad, target, num_classes, ignore_index):
    """Raise when ``bad`` (a count of labels outside [0, C) that are not ``ignore_index``) is not 0:
    the reference backend's check. Eagerly a read of ``bad`` (a host sync for a GPU tensor: the
    reference is the specification, not a training path) and a ``ValueError`` naming the value;
    inside ``torch.compile`` a device assertion (a ``RuntimeError`` that cannot name it), so the
    graph has no data-dependent branch. The fused backends never wait (see :mod:`._deferred`).
    """
    if torch.compiler.is_compiling():
        torch._assert_async(bad == 0, "target contains a label outside [0, C) that is not ignore_index")
    elif int(bad) != 0:
        raise bad_label_error(target, num_classes, ignore_index)


def bad_label_error(target, num_classes, ignore_index):
    """The ValueError for labels outside [0, C) (called once a bad label is known to exist)."""
    y = target.reshape(-1).long()
    bad = (y != ignore_index) & ((y < 0) | (y >= num_classes))
    values = torch.unique(y[bad]).tolist()
    shown = ", ".join(str(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
    return ValueError(
        f"target contains label {values[0] if values else '?'} outside [0, {num_classes}) "
        f"(values: {shown}; ignore_index={ignore_index})"
    )
