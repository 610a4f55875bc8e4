"""The losses users call (DESIGN.md §3): argument checks, backend choice, weights and reduction.

Every function takes keyword-only ``confusion=None`` (a (C, C) int64 tensor the same pass adds
its argmax confusion counts into), ``backend=None``, ``validate=True``, and
``upsample=None | "bilinear" | "nearest"`` with ``align_corners=False``: the loss of low-resolution
logits (B, C, h, w) against labels (B, H, W), equal to that of ``F.interpolate(logits, size=(H, W),
mode=upsample, align_corners=align_corners)`` without the interpolated tensor (DESIGN.md §10,
:mod:`._upsample`).

Under activation checkpointing (``torch.utils.checkpoint``) a function called inside the checkpointed
region runs again in the backward, and its ``confusion=`` counts are added twice, as batch norm's
running statistics are updated twice. Call the loss outside the region (checkpoint the network, not
the loss: a fused loss keeps nothing of the logits' size for the backward but the logits
themselves, so checkpointing it saves little), or count outside it with
``confusion_matrix(logits.detach(), target, out=...)``.

Backends (DESIGN.md §7): ``"auto"`` (default, or the environment variable
``FUSED_IMBALANCE_BACKEND``) picks Triton for CUDA tensors and the C++ kernels for CPU tensors,
falling back to ``"reference"`` (eager PyTorch) when those are not available; ``"triton"`` and
``"cpp"`` ask for one backend and fail with a clear error when it cannot run the input.

A fused backend reads the logits once and returns per-class loss sums S_c, counts n_c and true
positives TP_c; the loss is Σ_c w_c S_c / D from those small vectors, with D = Σ_c w_c n_c for
the general losses and D = Σ_c n_c for the paper losses (DESIGN.md §2).

``validate=True`` checks once after the pass that every label is in [0, C) or ``ignore_index``
(one small host sync); ``validate=False`` skips that check (out-of-range labels are then
ignored). Inside ``torch.compile`` the check is a device assertion instead (a ``RuntimeError``
that does not name the value).
"""
import importlib
import os
import warnings

import torch

from . import _upsample
from . import reference as _ref
from . import weights as _weights
from ._checks import check_class_vector, check_confusion, check_gamma, check_inputs, check_labels, check_loss_type
from .ops import Mode, collapsible

__all__ = ["cross_entropy", "focal_loss", "sigmoid_focal_loss", "class_balanced_loss", "recall_loss",
           "cdb_loss", "mse_outlying_loss", "confusion_matrix", "class_stats", "resolve_backend"]

BACKENDS = ("auto", "triton", "cpp", "reference")
_MODULES = {"triton": "fused_imbalance.ops.triton_loss", "cpp": "fused_imbalance.ops.cpp"}
_loaded = {}
_why = {}  # why a backend could not be loaded, for the error of an explicit backend=


@torch.compiler.assume_constant_result
def _backend_available(name):
    """Whether the backend loads and can run here. Loading imports modules (and may compile the C++
    sources), which torch.compile cannot trace: it runs once, and inside a trace it is a constant."""
    return _backend_module(name) is not None


def _backend_module(name):
    """The backend's module, or None when it cannot be imported or cannot run here."""
    if name not in _loaded:
        try:
            mod = importlib.import_module(_MODULES[name])
            _loaded[name] = mod if mod.available() else None
            if _loaded[name] is None:
                _why[name] = getattr(mod, "unavailable_reason", lambda: None)()
        except ImportError as e:
            warnings.warn(f"fused_imbalance: the {name!r} backend could not be imported ({e})", stacklevel=3)
            _loaded[name] = None
            _why[name] = f"it could not be imported ({type(e).__name__}: {e})"
    return _loaded[name]


def resolve_backend(backend, logits):
    """The name of the backend that will run ``logits``: "triton", "cpp" or "reference"."""
    if backend is not None:
        name, source = backend, "backend"
    else:
        name, source = os.environ.get("FUSED_IMBALANCE_BACKEND", "auto"), "the environment variable FUSED_IMBALANCE_BACKEND"
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    if name == "reference":
        return name
    if name == "auto":
        cand = "triton" if logits.is_cuda else "cpp"
        if _backend_available(cand) and _loaded[cand].supports(logits):
            return cand
        return "reference"
    if not _backend_available(name):
        why = _why.get(name)
        raise RuntimeError(f"the {name!r} backend is not available on this machine"
                           + (f": {why}" if why else "")
                           + (" (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)"
                              if name == "triton" and not logits.is_cuda else ""))
    if not _loaded[name].supports(logits):
        raise RuntimeError(f"the {name!r} backend does not support {logits.dtype} logits on {logits.device}")
    return name


TORCH_FUNC_UNSUPPORTED = (
    "fused_imbalance: torch.func transforms (grad, jacrev, jacfwd, jvp, ...) cannot differentiate the "
    "fused {backend!r} backend's ops; use torch.autograd.grad / .backward() with it, or backend=\"reference\" "
    "inside torch.func")


def _fused(name, logits, target, mode, gamma, tvals, ignore_index, reduction, confusion, validate, need_tp=False,
           rs=None):
    """Run the backend's forward op: (pixel_loss or None, class_loss, count, tp or None).

    The pass returns its confusion counts; they are added into ``confusion`` only once the labels
    are known good, so an update that raises leaves the caller's matrix as it was. ``rs``: the
    ``upsample`` geometry (:mod:`._upsample`), or None.
    """
    if rs is not None:
        pixel, class_loss, count, tp, bad, counts = _upsample.forward(
            _loaded[name], rs, logits, target, mode, gamma, tvals, ignore_index, reduction == "none", need_tp,
            confusion is not None)
        if validate:
            check_labels(bad, target, logits.shape[1], ignore_index)
        if confusion is not None:
            confusion.add_(counts)
        return (pixel if reduction == "none" else None), class_loss, count, (tp if need_tp else None)
    x = logits if collapsible(logits) else logits.contiguous()
    y = target.reshape(-1).contiguous()
    args = (x, y, int(mode), float(gamma), tvals, ignore_index, reduction == "none", need_tp, confusion is not None)
    if torch.compiler.is_compiling():
        out = _loaded[name].loss_fwd(*args)
    else:
        try:
            out = _loaded[name].loss_fwd(*args)
        except RuntimeError as e:
            # torch.func's grad/jacrev/jvp cannot differentiate a custom op whose autograd formula is
            # registered with torch.library (torch's message speaks of an autograd.Function).
            if "functorch transforms" in str(e):
                raise RuntimeError(TORCH_FUNC_UNSUPPORTED.format(backend=name)) from e
            raise
    pixel, class_loss, count, tp, bad, counts = out
    if validate:
        check_labels(bad, target, logits.shape[1], ignore_index)
    if confusion is not None:
        confusion.add_(counts)
    return (pixel if reduction == "none" else None), class_loss, count, (tp if need_tp else None)


def _reduce(pixel, class_loss, count, w, target, ignore_index, reduction, mean_over_weights):
    """Σ_c w_c S_c over the denominator of DESIGN.md §2, or the weighted per-pixel loss.

    As ``torch.nn.functional.cross_entropy``, a weight enters only through the pixels of its
    class: an inf or NaN weight of a class absent from the batch, or of the class an ignored
    pixel's label is clamped to, changes nothing (``inf · 0`` is never formed), and a negative
    Σ w_y is divided by as it is. Only a zero denominator differs: it gives 0 (DESIGN.md §2).
    """
    if reduction == "none":
        if w is None:
            return pixel.view(target.shape)
        C = class_loss.numel()
        y = target.reshape(-1).long()
        valid = (y != ignore_index) & (y >= 0) & (y < C)
        wy = torch.where(valid, w.gather(0, y.clamp(0, C - 1)), torch.zeros_like(pixel))
        return (pixel * wy).view(target.shape)  # pixel is 0 where not valid
    if w is None:
        total = class_loss.sum()
        if reduction == "sum":
            return total
        # the integer count, exact, rounded once; 0 valid pixels: total is 0, and so is the mean.
        # Four small ops (each a launch on a GPU, where the host's time is most of a small loss's)
        return total / count.sum().clamp(min=1).to(total.dtype)
    present = count > 0
    total = torch.where(present, w * class_loss, torch.zeros_like(class_loss)).sum()
    if reduction == "sum":
        return total
    n = count.to(torch.float64)
    if mean_over_weights:
        wn = w.to(torch.float64) * n
        denom = torch.where(present, wn, torch.zeros_like(wn)).sum()
    else:
        denom = n.sum()
    denom = denom.to(total.dtype)
    return total / torch.where(denom != 0, denom, torch.ones_like(denom))


def _loss(name, logits, target, mode, gamma, weight, ignore_index, reduction, confusion, validate,
          mean_over_weights, tvals=None, weight_from_stats=None, rs=None):
    """The common path of every fused loss. ``weight_from_stats(count, tp)`` gives dynamic weights."""
    pixel, class_loss, count, tp = _fused(name, logits, target, mode, gamma, tvals, ignore_index, reduction,
                                          confusion, validate, need_tp=weight_from_stats is not None, rs=rs)
    w = weight if weight_from_stats is None else weight_from_stats(count, tp).to(class_loss.dtype)
    return _reduce(pixel, class_loss, count, w, target, ignore_index, reduction, mean_over_weights)


def _common_checks(logits, target, ignore_index, reduction, confusion, upsample=None, align_corners=False):
    """Checks every loss shares; returns the ``upsample`` geometry (None without it)."""
    rs = _upsample.check(logits, target, upsample, align_corners, ignore_index, reduction)
    if rs is None:
        check_inputs(logits, target, ignore_index, reduction)
    check_confusion(confusion, logits)
    return rs


def _backend(backend, logits, rs):
    """resolve_backend, and for ``upsample`` a backend that implements it (see :mod:`._upsample`)."""
    name = resolve_backend(backend, logits)
    return name if rs is None else _upsample.backend(name, backend)


def _interpolated(logits, rs):
    """What the reference backend computes the loss of: the logits, interpolated with ``upsample``."""
    return logits if rs is None else _upsample.reference_logits(logits, rs)


def cross_entropy(logits, target, weight=None, ignore_index=-100, reduction="mean", *, confusion=None,
                  backend=None, validate=True, upsample=None,
                  align_corners=False):
    """Cross-entropy −log p_y; a drop-in for ``torch.nn.functional.cross_entropy`` with class
    indices (``"mean"`` = Σ w_y ℓ / Σ w_y over valid pixels)."""
    rs = _common_checks(logits, target, ignore_index, reduction, confusion, upsample, align_corners)
    name = _backend(backend, logits, rs)
    if name == "reference":
        return _ref.cross_entropy(_interpolated(logits, rs), target, weight, ignore_index, reduction, confusion, validate)
    w = None if weight is None else check_class_vector(weight, "weight", logits)
    return _loss(name, logits, target, Mode.SOFTMAX_FOCAL, 0.0, w, ignore_index, reduction, confusion,
                 validate, True, rs=rs)


def focal_loss(logits, target, gamma=2.0, weight=None, ignore_index=-100, reduction="mean", *,
               confusion=None, backend=None, validate=True, upsample=None,
               align_corners=False):
    """Focal loss −(1 − p_y)^γ log p_y (Lin et al. 2017); γ = 0 is ``cross_entropy``."""
    rs = _common_checks(logits, target, ignore_index, reduction, confusion, upsample, align_corners)
    gamma = check_gamma(gamma)
    name = _backend(backend, logits, rs)
    if name == "reference":
        return _ref.focal_loss(_interpolated(logits, rs), target, gamma, weight, ignore_index, reduction, confusion, validate)
    w = None if weight is None else check_class_vector(weight, "weight", logits)
    return _loss(name, logits, target, Mode.SOFTMAX_FOCAL, gamma, w, ignore_index, reduction, confusion,
                 validate, True, rs=rs)


def sigmoid_focal_loss(logits, target, gamma=2.0, weight=None, ignore_index=-100, reduction="mean", *,
                       confusion=None, backend=None, validate=True, upsample=None,
                       align_corners=False):
    """Sigmoid focal loss summed over the C class logits against the one-hot target; γ = 0 is
    ``binary_cross_entropy_with_logits`` summed over classes."""
    rs = _common_checks(logits, target, ignore_index, reduction, confusion, upsample, align_corners)
    gamma = check_gamma(gamma)
    name = _backend(backend, logits, rs)
    if name == "reference":
        return _ref.sigmoid_focal_loss(_interpolated(logits, rs), target, gamma, weight, ignore_index, reduction, confusion,
                                       validate)
    w = None if weight is None else check_class_vector(weight, "weight", logits)
    return _loss(name, logits, target, Mode.SIGMOID_FOCAL, gamma, w, ignore_index, reduction, confusion,
                 validate, True, rs=rs)


def class_balanced_loss(logits, target, samples_per_class, beta=0.9999, loss_type="softmax", gamma=2.0,
                        ignore_index=-100, reduction="mean", *, confusion=None, backend=None, validate=True,
                        upsample=None, align_corners=False):
    """Class-balanced loss (Cui et al. 2019): the ``loss_type`` loss ("softmax", "sigmoid", "focal",
    "softmax_focal") weighted by ``weights.effective_number(samples_per_class, beta)``;
    ``"mean"`` divides by the number of valid pixels."""
    w = check_class_vector(_weights.effective_number(samples_per_class, beta).to(logits.device),
                           "samples_per_class", logits)
    return weighted_loss(logits, target, w, loss_type, gamma, ignore_index, reduction, confusion=confusion,
                         backend=backend, validate=validate, upsample=upsample, align_corners=align_corners)


def weighted_loss(logits, target, weight, loss_type="softmax", gamma=2.0, ignore_index=-100, reduction="mean",
                  *, confusion=None, backend=None, validate=True, upsample=None,
                  align_corners=False):
    """A ``loss_type`` loss with fixed class weights and the paper mean (Σ w_y ℓ / N_valid).

    ``class_balanced_loss`` with precomputed weights: ``ClassBalancedLoss`` calls this so the
    weights are computed once, not on every step.
    """
    check_loss_type(loss_type)
    rs = _common_checks(logits, target, ignore_index, reduction, confusion, upsample, align_corners)
    gamma = check_gamma(gamma)
    name = _backend(backend, logits, rs)
    if name == "reference":
        return _ref.weighted_loss(_interpolated(logits, rs), target, weight, loss_type, gamma, ignore_index, reduction, confusion,
                                  validate)
    w = check_class_vector(weight, "weight", logits)
    mode = Mode.SOFTMAX_FOCAL if loss_type in ("softmax", "softmax_focal") else Mode.SIGMOID_FOCAL
    g = gamma if loss_type in ("focal", "softmax_focal") else 0.0
    return _loss(name, logits, target, mode, g, w, ignore_index, reduction, confusion, validate, False, rs=rs)


def recall_loss(logits, target, ignore_index=-100, reduction="mean", recall=None, *, confusion=None,
                backend=None, validate=True, upsample=None,
                align_corners=False):
    """Recall loss (Tian et al. 2021): −(1 − R_y) log p_y, R = this batch's per-class recall
    (argmax), in the same single pass over the logits; ``"mean"`` is over valid pixels.

    ``recall``: a (C,) tensor used instead of the batch recall, or a callable
    ``recall(count, tp) -> (C,)`` that receives the batch's per-class valid counts and true
    positives (int64) and returns the recall to use — how ``RecallLoss`` keeps a moving average
    and all-reduces the statistics over ranks without a second read of the logits.
    """
    rs = _common_checks(logits, target, ignore_index, reduction, confusion, upsample, align_corners)
    name = _backend(backend, logits, rs)
    if name == "reference":
        return _ref.recall_loss(_interpolated(logits, rs), target, ignore_index, reduction, recall, confusion,
                                validate)
    w, weight_from_stats = None, None
    if recall is None:
        weight_from_stats = _ref.recall_weights
    elif callable(recall):
        def weight_from_stats(count, tp):
            return 1.0 - check_class_vector(recall(count, tp), "recall", logits)
    else:
        w = 1.0 - check_class_vector(recall, "recall", logits)  # fixed weights: the pass needs no argmax
    return _loss(name, logits, target, Mode.SOFTMAX_FOCAL, 0.0, w, ignore_index, reduction, confusion,
                 validate, False, weight_from_stats=weight_from_stats, rs=rs)


def cdb_loss(logits, target, class_accuracy, tau="dynamic", gamma=0.0, ignore_index=-100, reduction="mean", *,
             confusion=None, backend=None, validate=True, upsample=None,
             align_corners=False):
    """Class-wise difficulty-balanced loss (Sinha et al. 2020) with w = ``weights.cdb(class_accuracy, tau)``;
    ``"mean"`` is over valid pixels."""
    rs = _common_checks(logits, target, ignore_index, reduction, confusion, upsample, align_corners)
    gamma = check_gamma(gamma)
    name = _backend(backend, logits, rs)
    if name == "reference":
        return _ref.cdb_loss(_interpolated(logits, rs), target, class_accuracy, tau, gamma, ignore_index, reduction, confusion,
                             validate)
    w = check_class_vector(_weights.cdb(class_accuracy, tau).to(logits.device), "class_accuracy", logits)
    return _loss(name, logits, target, Mode.SOFTMAX_FOCAL, gamma, w, ignore_index, reduction, confusion,
                 validate, False, rs=rs)


def mse_outlying_loss(logits, target, outlying, ignore_index=-100, reduction="mean", input="logits", *,
                      confusion=None, backend=None, validate=True, upsample=None,
                      align_corners=False):
    """MSE with outlying labels: ½ Σ_k (a_k − t_k)², t_k = outlying[y]·[k = y], a = logits or softmax;
    ``outlying`` is a (C,) tensor such as ``weights.outlying_labels(counts, alpha)``."""
    if input not in ("logits", "softmax"):
        raise ValueError(f"input must be 'logits' or 'softmax', got {input!r}")
    rs = _common_checks(logits, target, ignore_index, reduction, confusion, upsample, align_corners)
    name = _backend(backend, logits, rs)
    if name == "reference":
        return _ref.mse_outlying_loss(_interpolated(logits, rs), target, outlying, ignore_index, reduction, input, confusion,
                                      validate)
    tvals = check_class_vector(outlying, "outlying", logits).contiguous()
    mode = Mode.MSE_LOGITS if input == "logits" else Mode.MSE_SOFTMAX
    return _loss(name, logits, target, mode, 0.0, None, ignore_index, reduction, confusion, validate, False,
                 tvals=tvals, rs=rs)


def confusion_matrix(logits, target, ignore_index=-100, out=None, *, backend=None, validate=True, upsample=None,
                     align_corners=False):
    """(C, C) int64 confusion counts, row = label, column = argmax (first index on ties).

    With ``out`` the counts are added into it in place and ``out`` is returned.
    """
    rs = _common_checks(logits, target, ignore_index, "mean", None, upsample, align_corners)
    check_confusion(out, logits, "out")
    name = _backend(backend, logits, rs)
    if name == "reference":
        return _ref.confusion_matrix(_interpolated(logits.detach(), rs), target, ignore_index, out, validate)
    C = logits.shape[1]
    if out is None:
        out = torch.zeros(C, C, dtype=torch.int64, device=logits.device)
    with torch.no_grad():
        _fused(name, logits.detach(), target, Mode.STATS, 0.0, None, ignore_index, "sum", out, validate, rs=rs)
    return out


def class_stats(logits, target, ignore_index=-100, *, backend=None, validate=True, upsample=None,
                align_corners=False):
    """(count, tp): int64 (C,) valid pixels of each class and those whose argmax is their class."""
    rs = _common_checks(logits, target, ignore_index, "mean", None, upsample, align_corners)
    name = _backend(backend, logits, rs)
    if name == "reference":
        return _ref.class_stats(_interpolated(logits.detach(), rs), target, ignore_index, validate)
    with torch.no_grad():
        _, _, count, tp = _fused(name, logits.detach(), target, Mode.STATS, 0.0, None, ignore_index, "sum",
                                 None, validate, need_tp=True, rs=rs)
    return count, tp
