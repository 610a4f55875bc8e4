"""The losses users call (docs/DESIGN.md §3): argument checks, backend choice, weights and reduction.

Every function takes keyword-only ``confusion=None`` (a (C, C) int64 tensor the same pass adds
its argmax confusion counts into), ``backend=None``, ``validate=True``, and
``upsample=None | "bilinear" | "nearest"`` with ``align_corners=False``: the loss of low-resolution
logits (B, C, h, w) against labels (B, H, W), equal to that of ``F.interpolate(logits, size=(H, W),
mode=upsample, align_corners=align_corners)`` without the interpolated tensor (docs/DESIGN.md §10,
:mod:`._upsample`).

Under activation checkpointing (``torch.utils.checkpoint``) a function called inside the checkpointed
region runs again in the backward, and its ``confusion=`` counts are added twice, as batch norm's
running statistics are updated twice. Call the loss outside the region (checkpoint the network, not
the loss: a fused loss keeps nothing of the logits' size for the backward but the logits
themselves, so checkpointing it saves little), or count outside it with
``confusion_matrix(logits.detach(), target, out=...)``.

Backends (docs/DESIGN.md §7): ``"auto"`` (default, or the environment variable
``FUSED_IMBALANCE_BACKEND``) picks Triton for CUDA tensors and the C++ kernels for CPU tensors,
falling back to ``"reference"`` (eager PyTorch) when those are not available; ``"triton"`` and
``"cpp"`` ask for one backend and fail with a clear error when it cannot run the input.

A call is one prologue shared by every function (argument checks, cached per shape so that a
training loop's repeated calls cost a dictionary lookup; the backend), then one fused forward
through :mod:`._fused`: the backend's pass over the logits computes the loss, the per-class
counts and true positives, and the backward's per-class factor, on the device (docs/DESIGN.md §2: the
loss Σ_c w_c S_c / D with D = Σ_c w_c n_c for the general losses and D = Σ_c n_c for the paper
losses). No step of it waits for the device.

``validate=True`` checks that every label is in [0, C) or ``ignore_index``: the C++ backend and
the reference at once (a ``ValueError`` naming the value; nothing is added into ``confusion``);
the Triton backend without a host sync, deferred to a later call (:mod:`._deferred`,
:func:`check_deferred`), its step treating those labels as ignored. Inside ``torch.compile`` and
CUDA-graph capture the check is a device assertion (a ``RuntimeError`` that does not name the
value). ``validate=False`` skips the check (out-of-range labels are then ignored).
"""

import os
import warnings
from typing import NamedTuple

import torch

from . import _deferred, _dice, _fused, _ohem, _upsample
from . import reference as _ref
from . import weights as _weights
from ._checks import (
    as_index,
    check_class_vector,
    check_confusion,
    check_gamma,
    check_inputs,
    check_loss_type,
    check_range,
)
from .ops import Mode, Reduction, Weighting, collapsible
from .ops.dice import DiceKind

__all__ = [
    "cross_entropy",
    "focal_loss",
    "sigmoid_focal_loss",
    "class_balanced_loss",
    "weighted_loss",
    "recall_loss",
    "cdb_loss",
    "mse_outlying_loss",
    "confusion_matrix",
    "class_stats",
    "resolve_backend",
    "check_deferred",
    "ohem_cross_entropy",
    "dice_loss",
    "generalized_dice_loss",
    "tversky_loss",
    "dice_ce_loss",
]

BACKENDS = ("auto", "triton", "cpp", "reference")
check_deferred = _deferred.check_deferred

# --- backends -------------------------------------------------------------------------------------

_loaded = {}  # name -> ops.Backend, or None when it cannot run here
_why = {}  # why a backend could not be loaded, for the error of an explicit backend=


def _load(name):
    """The backend's :class:`~fused_imbalance.ops.Backend`, or None when it cannot be imported or run here."""
    if name not in _loaded:
        try:
            if name == "triton":
                from .ops import triton_backend as source
            else:
                from .ops import cpp as source
            be = source.backend() if source.available() else None
            if be is None:
                _why[name] = getattr(source, "unavailable_reason", lambda: None)()
            else:
                _fused.register_backend(be)
            _loaded[name] = be
        except ImportError as e:
            warnings.warn(f"fused_imbalance: the {name!r} backend could not be imported ({e})", stacklevel=3)
            _loaded[name] = None
            _why[name] = f"it could not be imported ({type(e).__name__}: {e})"
    return _loaded[name]


@torch.compiler.assume_constant_result
def _backend_available(name):
    """Whether the backend loads and can run here. Loading imports modules (and may compile the C++
    sources), which torch.compile cannot trace: it runs once, and inside a trace it is a constant."""
    return _load(name) is not None


_resolved = {}  # (backend, environment variable, device type, dtype) -> name, for the calls that resolved


def resolve_backend(backend, logits):
    """The name of the backend that will run ``logits``: "triton", "cpp" or "reference"."""
    env = os.environ.get("FUSED_IMBALANCE_BACKEND") if backend is None else None
    key = (backend, env, logits.device.type, logits.dtype)
    name = _resolved.get(key)
    if name is None:
        name = _resolve(backend, logits)
        if not torch.compiler.is_compiling():
            _resolved[key] = name
    return name


def _resolve(backend, logits):
    if backend is not None:
        name, source = backend, "backend"
    else:
        name, source = (
            os.environ.get("FUSED_IMBALANCE_BACKEND", "auto"),
            "the environment variable FUSED_IMBALANCE_BACKEND",
        )
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
        raise RuntimeError(
            f"the {name!r} backend is not available on this machine"
            + (f": {why}" if why else "")
            + (
                " (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)"
                if name == "triton" and not logits.is_cuda
                else ""
            )
        )
    if not _loaded[name].supports(logits):
        raise RuntimeError(f"the {name!r} backend does not support {logits.dtype} logits on {logits.device}")
    return name


# --- the prologue every loss shares -----------------------------------------------------------------

_CHECKED_SHAPES = 256  # argument signatures whose checks are remembered
_checked = {}  # signature -> the upsample geometry (None without upsample), for signatures that passed


def _check_all(logits, target, ignore_index, reduction, confusion, upsample, align_corners):
    rs = _upsample.check(logits, target, upsample, align_corners, ignore_index, reduction)
    if rs is None:
        check_inputs(logits, target, ignore_index, reduction)
    check_confusion(confusion, logits)
    return rs


def _prologue(logits, target, ignore_index, reduction, confusion, upsample, align_corners):
    """(ignore_index, upsample geometry or None) after the checks every loss shares. The shape checks
    are remembered per argument signature (shapes, dtypes, devices, options), so that the repeated
    calls of a training loop cost a dictionary lookup."""
    ignore_index = as_index(ignore_index, "ignore_index")
    if align_corners is None:  # as F.interpolate, where None is the default and means False
        align_corners = False
    if torch.compiler.is_compiling() or not (
        isinstance(logits, torch.Tensor) and isinstance(target, torch.Tensor)
    ):
        return ignore_index, _check_all(
            logits, target, ignore_index, reduction, confusion, upsample, align_corners
        )
    if confusion is None:
        ck = None
    elif isinstance(confusion, torch.Tensor):
        ck = (confusion.shape, confusion.dtype, confusion.device, confusion.is_contiguous())
    else:
        ck = type(confusion)
    key = (
        logits.shape,
        logits.dtype,
        logits.device,
        target.shape,
        target.dtype,
        target.device,
        reduction,
        upsample,
        align_corners,
        ck,
    )
    try:
        return ignore_index, _checked[key]
    except (KeyError, TypeError):  # TypeError: an unhashable argument, which the checks refuse
        rs = _check_all(logits, target, ignore_index, reduction, confusion, upsample, align_corners)
        if len(_checked) >= _CHECKED_SHAPES:
            _checked.clear()
        _checked[key] = rs
        return ignore_index, rs


def _backend(backend, logits, rs):
    """resolve_backend; a fused backend's call first raises what an earlier call's deferred checks found
    (:mod:`._deferred`)."""
    name = resolve_backend(backend, logits)
    if name != "reference":
        _deferred.poll()
    return name


def _interpolated(logits, rs):
    """What the reference backend computes the loss of: the logits, interpolated with ``upsample``."""
    return logits if rs is None else _upsample.reference_logits(logits, rs)


def _run(
    name,
    logits,
    target,
    rs,
    weight,
    tvals,
    confusion,
    mode,
    gamma,
    ignore_index,
    reduction,
    weighting,
    validate,
    need_tp=False,
    ema=None,
):
    """The fused forward (:func:`._fused.forward`): (loss, count, tp); the loss of ``"none"`` shaped like
    the target."""
    red = reduction if isinstance(reduction, Reduction) else Reduction.of(reduction)
    if rs is None:
        x = logits if collapsible(logits) else logits.contiguous()
        geo = ()
    else:
        x, geo = logits, (rs.interp, rs.align_corners)
    t = target if target.is_contiguous() else target.contiguous()  # the ops read the labels flat
    loss, count, tp, _ = _fused.forward(
        name,
        x,
        t,
        geo,
        weight,
        tvals,
        confusion,
        mode,
        gamma,
        ignore_index,
        red,
        weighting,
        need_tp,
        validate,
        ema,
    )
    if red == Reduction.NONE:
        loss = loss.view(target.shape)
    return loss, count, tp


def _weighting(weight, mean_over_weights):
    if weight is None:
        return Weighting.NONE
    return Weighting.GENERAL if mean_over_weights else Weighting.PAPER


def _loss(
    name,
    logits,
    target,
    rs,
    weight,
    tvals,
    confusion,
    mode,
    gamma,
    ignore_index,
    reduction,
    validate,
    mean_over_weights,
):
    return _run(
        name,
        logits,
        target,
        rs,
        weight,
        tvals,
        confusion,
        mode,
        gamma,
        ignore_index,
        reduction,
        _weighting(weight, mean_over_weights),
        validate,
    )[0]


def _check_recall(recall, logits):
    """A recall vector: (C,) values in [0, 1] (not a percentage): a ValueError naming ``recall``, at once
    for CPU tensors, deferred for device tensors (:mod:`._deferred`: no host sync in a training step)."""
    r = check_class_vector(recall, "recall", logits)
    check_range(r, 0.0, 1.0, "recall must hold recalls in [0, 1] (a fraction, not a percentage)")
    return r


# --- the losses ---------------------------------------------------------------------------------------


def cross_entropy(
    logits,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    *,
    confusion=None,
    backend=None,
    validate=True,
    upsample=None,
    align_corners=False,
):
    """Cross-entropy −log p_y; a drop-in for ``torch.nn.functional.cross_entropy`` with class
    indices (``"mean"`` = Σ w_y ℓ / Σ w_y over valid pixels)."""
    ii, rs = _prologue(logits, target, ignore_index, reduction, confusion, upsample, align_corners)
    name = _backend(backend, logits, rs)
    if name == "reference":
        return _ref.cross_entropy(
            _interpolated(logits, rs), target, weight, ii, reduction, confusion, validate
        )
    w = None if weight is None else check_class_vector(weight, "weight", logits)
    return _loss(
        name, logits, target, rs, w, None, confusion, Mode.SOFTMAX_FOCAL, 0.0, ii, reduction, validate, True
    )


def focal_loss(
    logits,
    target,
    gamma=2.0,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    *,
    confusion=None,
    backend=None,
    validate=True,
    upsample=None,
    align_corners=False,
):
    """Focal loss −(1 − p_y)^γ log p_y (Lin et al. 2017); γ = 0 is ``cross_entropy``."""
    ii, rs = _prologue(logits, target, ignore_index, reduction, confusion, upsample, align_corners)
    gamma = check_gamma(gamma)
    name = _backend(backend, logits, rs)
    if name == "reference":
        return _ref.focal_loss(
            _interpolated(logits, rs), target, gamma, weight, ii, reduction, confusion, validate
        )
    w = None if weight is None else check_class_vector(weight, "weight", logits)
    return _loss(
        name, logits, target, rs, w, None, confusion, Mode.SOFTMAX_FOCAL, gamma, ii, reduction, validate, True
    )


def sigmoid_focal_loss(
    logits,
    target,
    gamma=2.0,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    *,
    confusion=None,
    backend=None,
    validate=True,
    upsample=None,
    align_corners=False,
):
    """Sigmoid focal loss summed over the C class logits against the one-hot target; γ = 0 is
    ``binary_cross_entropy_with_logits`` summed over classes."""
    ii, rs = _prologue(logits, target, ignore_index, reduction, confusion, upsample, align_corners)
    gamma = check_gamma(gamma)
    name = _backend(backend, logits, rs)
    if name == "reference":
        return _ref.sigmoid_focal_loss(
            _interpolated(logits, rs), target, gamma, weight, ii, reduction, confusion, validate
        )
    w = None if weight is None else check_class_vector(weight, "weight", logits)
    return _loss(
        name, logits, target, rs, w, None, confusion, Mode.SIGMOID_FOCAL, gamma, ii, reduction, validate, True
    )


def class_balanced_loss(
    logits,
    target,
    samples_per_class,
    beta=0.9999,
    loss_type="softmax",
    gamma=2.0,
    ignore_index=-100,
    reduction="mean",
    *,
    confusion=None,
    backend=None,
    validate=True,
    upsample=None,
    align_corners=False,
):
    """Class-balanced loss (Cui et al. 2019): the ``loss_type`` loss ("softmax", "sigmoid", "focal",
    "softmax_focal") weighted by ``weights.effective_number(samples_per_class, beta)``;
    ``"mean"`` divides by the number of valid pixels."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError("logits and target must be torch.Tensor")
    w = check_class_vector(
        _weights.effective_number(samples_per_class, beta, deferred=True).to(logits.device),
        "samples_per_class",
        logits,
    )
    return weighted_loss(
        logits,
        target,
        w,
        loss_type,
        gamma,
        ignore_index,
        reduction,
        confusion=confusion,
        backend=backend,
        validate=validate,
        upsample=upsample,
        align_corners=align_corners,
    )


def weighted_loss(
    logits,
    target,
    weight,
    loss_type="softmax",
    gamma=2.0,
    ignore_index=-100,
    reduction="mean",
    *,
    confusion=None,
    backend=None,
    validate=True,
    upsample=None,
    align_corners=False,
):
    """A ``loss_type`` loss with fixed class weights and the paper mean (Σ w_y ℓ / N_valid).

    ``class_balanced_loss`` with precomputed weights: ``ClassBalancedLoss`` calls this so the
    weights are computed once, not on every step.
    """
    check_loss_type(loss_type)
    ii, rs = _prologue(logits, target, ignore_index, reduction, confusion, upsample, align_corners)
    gamma = check_gamma(gamma)
    name = _backend(backend, logits, rs)
    if name == "reference":
        return _ref.weighted_loss(
            _interpolated(logits, rs), target, weight, loss_type, gamma, ii, reduction, confusion, validate
        )
    w = check_class_vector(weight, "weight", logits)
    mode = Mode.SOFTMAX_FOCAL if loss_type in ("softmax", "softmax_focal") else Mode.SIGMOID_FOCAL
    g = gamma if loss_type in ("focal", "softmax_focal") else 0.0
    return _loss(name, logits, target, rs, w, None, confusion, mode, g, ii, reduction, validate, False)


def recall_loss(
    logits,
    target,
    ignore_index=-100,
    reduction="mean",
    recall=None,
    *,
    confusion=None,
    backend=None,
    validate=True,
    upsample=None,
    align_corners=False,
):
    """Recall loss (Tian et al. 2021): −(1 − R_y) log p_y, R = this batch's per-class recall
    (argmax), in the same single pass over the logits; ``"mean"`` is over valid pixels.

    ``recall``: a (C,) tensor of recalls in [0, 1] used instead of the batch recall, or a callable
    ``recall(count, tp) -> (C,)`` that receives the batch's per-class valid counts and true
    positives (int64) and returns the recall to use — how ``RecallLoss`` keeps a moving average
    and all-reduces the statistics over ranks without a second read of the logits. A recall
    outside [0, 1] (a percentage, say) is a ``ValueError`` naming ``recall`` (for a tensor on a GPU,
    deferred to a later call, as the label check).
    """
    return _recall_loss(
        logits,
        target,
        ignore_index,
        reduction,
        recall,
        confusion,
        backend,
        validate,
        upsample,
        align_corners,
        False,
    )


class RecallEma(NamedTuple):
    """``RecallLoss``'s moving average in a training step: its buffers, the average's weight 1 − momentum,
    and the module's callable of the batch statistics (the path of the reference backend, ``"none"``,
    ``torch.compile`` and ``torch.func``). A fused eager call updates the buffers in one small launch
    after the forward instead (:attr:`fused_imbalance.ops.Backend.recall_ema`)."""

    running: torch.Tensor
    seen: torch.Tensor
    weight: float
    fallback: object

    def fits(self, logits):
        """The buffers' device is the logits' and their dtype one the launch takes (float32, float64)."""
        r = self.running
        return r.device == logits.device and r.dtype in (torch.float32, torch.float64)


def _recall_loss(
    logits,
    target,
    ignore_index,
    reduction,
    recall,
    confusion,
    backend,
    validate,
    upsample,
    align_corners,
    own_recall,
):
    """``recall_loss``; ``own_recall``: ``recall`` is ``RecallLoss``'s own callable (or its
    :class:`RecallEma`), whose recall is finite and in [0, 1] by construction (no range check, no guard
    against NaN for absent classes)."""
    ii, rs = _prologue(logits, target, ignore_index, reduction, confusion, upsample, align_corners)
    name = _backend(backend, logits, rs)

    def run(red, weighting, weight=None, **kw):  # the fused pass of the softmax cross-entropy terms
        return _run(
            name,
            logits,
            target,
            rs,
            weight,
            None,
            confusion,
            Mode.SOFTMAX_FOCAL,
            0.0,
            ii,
            red,
            weighting,
            validate,
            **kw,
        )

    if isinstance(recall, RecallEma):
        if name != "reference" and reduction != "none" and recall.fits(logits) and _fused.eager():
            # the moving average and the weighted sum in one launch after the forward (Backend.recall_ema)
            ema = (recall.running, recall.seen, recall.weight, Reduction.of(reduction))
            return run(Reduction.CLASS, Weighting.NONE, need_tp=True, ema=ema)[0]
        recall = recall.fallback  # the module's torch operations
    if name == "reference":
        return _ref.recall_loss(_interpolated(logits, rs), target, ii, reduction, recall, confusion, validate)
    if recall is None:  # the weights from the pass's own counts, on the device
        return run(reduction, Weighting.RECALL)[0]
    if not callable(recall):  # fixed weights: the pass needs no argmax
        return run(reduction, Weighting.PAPER, 1.0 - _check_recall(recall, logits))[0]
    # weights from a function of the batch's statistics: the pass returns the per-class sums (or the
    # per-pixel losses), weighted here once the function has the counts
    red = Reduction.NONE if reduction == "none" else Reduction.CLASS
    out, count, tp = run(red, Weighting.NONE, need_tp=True)
    r = recall(count, tp)
    w = (1.0 - (r if own_recall else _check_recall(r, logits))).to(out.dtype)
    if reduction == "none":
        C = logits.shape[1]
        y = target.long()
        valid = (y != ii) & (y >= 0) & (y < C)
        return out * torch.where(valid, w[y.clamp(0, C - 1)], torch.zeros_like(out))
    # an absent class's sum is 0; a recall function may give it NaN (0 / 0), which must not reach the total
    total = torch.dot(w, out) if own_recall else torch.where(count > 0, w * out, torch.zeros_like(out)).sum()
    if reduction == "sum":
        return total
    return total / count.sum().clamp(min=1).to(total.dtype)


def cdb_loss(
    logits,
    target,
    class_accuracy,
    tau="dynamic",
    gamma=0.0,
    ignore_index=-100,
    reduction="mean",
    *,
    confusion=None,
    backend=None,
    validate=True,
    upsample=None,
    align_corners=False,
):
    """Class-wise difficulty-balanced loss (Sinha et al. 2020) with w = ``weights.cdb(class_accuracy, tau)``;
    ``"mean"`` is over valid pixels."""
    ii, rs = _prologue(logits, target, ignore_index, reduction, confusion, upsample, align_corners)
    gamma = check_gamma(gamma)
    name = _backend(backend, logits, rs)
    if name == "reference":
        return _ref.cdb_loss(
            _interpolated(logits, rs), target, class_accuracy, tau, gamma, ii, reduction, confusion, validate
        )
    w = check_class_vector(
        _weights.cdb(class_accuracy, tau, deferred=True).to(logits.device), "class_accuracy", logits
    )
    return _loss(
        name,
        logits,
        target,
        rs,
        w,
        None,
        confusion,
        Mode.SOFTMAX_FOCAL,
        gamma,
        ii,
        reduction,
        validate,
        False,
    )


def mse_outlying_loss(
    logits,
    target,
    outlying,
    ignore_index=-100,
    reduction="mean",
    input="logits",
    *,
    confusion=None,
    backend=None,
    validate=True,
    upsample=None,
    align_corners=False,
):
    """MSE with outlying labels: ½ Σ_k (a_k − t_k)², t_k = outlying[y]·[k = y], a = logits or softmax;
    ``outlying`` is a (C,) tensor such as ``weights.outlying_labels(counts, alpha)``."""
    if input not in ("logits", "softmax"):
        raise ValueError(f"input must be 'logits' or 'softmax', got {input!r}")
    ii, rs = _prologue(logits, target, ignore_index, reduction, confusion, upsample, align_corners)
    name = _backend(backend, logits, rs)
    if name == "reference":
        return _ref.mse_outlying_loss(
            _interpolated(logits, rs), target, outlying, ii, reduction, input, confusion, validate
        )
    tvals = check_class_vector(outlying, "outlying", logits).contiguous()
    mode = Mode.MSE_LOGITS if input == "logits" else Mode.MSE_SOFTMAX
    return _loss(name, logits, target, rs, None, tvals, confusion, mode, 0.0, ii, reduction, validate, False)


def confusion_matrix(
    logits,
    target,
    ignore_index=-100,
    out=None,
    *,
    backend=None,
    validate=True,
    upsample=None,
    align_corners=False,
):
    """(C, C) int64 confusion counts, row = label, column = argmax (first index on ties).

    With ``out`` the counts are added into it in place and ``out`` is returned.
    """
    ii, rs = _prologue(logits, target, ignore_index, "mean", None, upsample, align_corners)
    check_confusion(out, logits, "out")
    name = _backend(backend, logits, rs)
    if name == "reference":
        return _ref.confusion_matrix(_interpolated(logits.detach(), rs), target, ii, out, validate)
    C = logits.shape[1]
    if out is None:
        out = torch.zeros(C, C, dtype=torch.int64, device=logits.device)
    with torch.no_grad():
        _run(
            name,
            logits.detach(),
            target,
            rs,
            None,
            None,
            out,
            Mode.STATS,
            0.0,
            ii,
            Reduction.SUM,
            Weighting.NONE,
            validate,
        )
    return out


def class_stats(
    logits, target, ignore_index=-100, *, backend=None, validate=True, upsample=None, align_corners=False
):
    """(count, tp): int64 (C,) valid pixels of each class and those whose argmax is their class."""
    ii, rs = _prologue(logits, target, ignore_index, "mean", None, upsample, align_corners)
    name = _backend(backend, logits, rs)
    if name == "reference":
        return _ref.class_stats(_interpolated(logits.detach(), rs), target, ii, validate)
    with torch.no_grad():
        _, count, tp = _run(
            name,
            logits.detach(),
            target,
            rs,
            None,
            None,
            None,
            Mode.STATS,
            0.0,
            ii,
            Reduction.SUM,
            Weighting.NONE,
            validate,
            need_tp=True,
        )
    return count, tp


# --- OHEM cross-entropy (docs/DESIGN.md §13) ------------------------------------------------------------

_MAX_RANK = 1 << 62  # a rank beyond every pixel count (the op clamps it to n_valid - 1): fits int64


def ohem_cross_entropy(
    logits,
    target,
    thresh=0.7,
    min_kept=100000,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    *,
    convention="hrnet",
    confusion=None,
    backend=None,
    validate=True,
    upsample=None,
    align_corners=False,
):
    """Cross-entropy over the hard pixels only (online hard example mining), as HRNet's
    ``OhemCrossEntropy`` (``convention="hrnet"``) or mmsegmentation's ``OHEMPixelSampler`` with its
    cross-entropy (``convention="mmseg"``).

    With p_n the softmax probability of the label of valid pixel n and p_(k) the k-th smallest of them over
    the whole batch: threshold = max(p_(min(k, n_valid - 1)), thresh), with k = max(1, min_kept) (HRNet)
    or min_kept · B (mmsegmentation, B = ``logits.shape[0]``); the kept pixels are those with
    p_n < threshold, strictly (ties with the threshold are not kept). The loss is the kept pixels'
    Σ w_{y_n} (−log p_n): ``"sum"``; divided by the number of kept pixels (HRNet) or by every pixel of the
    batch, ignored ones included (mmsegmentation), for ``"mean"``; per pixel, 0 where not kept, for
    ``"none"``. No valid or no kept pixel gives loss 0 and gradient 0, never NaN. ``reference.ohem_cross_entropy``
    is the definition and lists where it differs from both codes.

    The fused backends find the threshold without sorting the probabilities (an exact radix selection on
    the device, ties included) and without a host sync; their backward keeps exactly the pixels their
    forward kept. With ``upsample`` the probabilities are those of the interpolated logits, which are
    never materialised (docs/DESIGN.md §10).
    """
    ii, rs = _prologue(logits, target, ignore_index, reduction, confusion, upsample, align_corners)
    thresh, min_kept = _ref._check_ohem(thresh, min_kept, convention)
    name = _backend(backend, logits, rs)
    if name == "reference":
        return _ref.ohem_cross_entropy(
            _interpolated(logits, rs),
            target,
            thresh,
            min_kept,
            weight,
            ii,
            reduction,
            convention=convention,
            confusion=confusion,
            validate=validate,
        )
    w = None if weight is None else check_class_vector(weight, "weight", logits)
    rank = min(_ref.ohem_rank(min_kept, logits.shape[0], convention), _MAX_RANK)
    if rs is None:
        x = logits if collapsible(logits) else logits.contiguous()
        geo = ()
    else:
        x, geo = logits, (rs.interp, rs.align_corners)
    t = target if target.is_contiguous() else target.contiguous()  # the ops read the labels flat
    loss = _ohem.forward(
        name,
        x,
        t,
        geo,
        w,
        confusion,
        thresh,
        rank,
        ii,
        Reduction.of(reduction),
        convention == "mmseg",
        validate,
    )
    return loss.view(target.shape) if reduction == "none" else loss


# --- the Dice family (docs/DESIGN.md §12) ---------------------------------------------------------------
# Soft Dice, generalized Dice, Tversky and Dice + cross-entropy on softmax probabilities, with MONAI's
# keyword names (DiceLoss(softmax=True, to_onehot_y=True, ...) and its siblings). One pass over the
# logits gives the per-(image,)class sums, the backward one more (:mod:`._dice`).

_DICE_REFERENCE = {
    "dice": _ref.dice_loss,
    "generalized_dice": _ref.generalized_dice_loss,
    "tversky": _ref.tversky_loss,
    "dice_ce": _ref.dice_ce_loss,
}
_DICE_KIND = {
    "dice": DiceKind.DICE,
    "generalized_dice": DiceKind.GENERALIZED,
    "tversky": DiceKind.TVERSKY,
    "dice_ce": DiceKind.DICE,
}


def _dice_family(
    loss,
    logits,
    target,
    ignore_index,
    reduction,
    confusion,
    backend,
    validate,
    upsample,
    align_corners,
    sync=None,
    weight=None,
    **options,
):
    """The four Dice-family functions (``loss``: a key of ``_DICE_REFERENCE``) with their own ``options``;
    ``sync``: the distributed modules' all-reduce of the sums (:mod:`._dice`)."""
    if loss == "dice_ce" and reduction == "none":
        raise ValueError(
            "dice_ce_loss takes reduction 'mean' or 'sum' (as MONAI's DiceCELoss): its "
            "cross-entropy is per pixel and its Dice per class, there is no one unreduced shape"
        )
    ii, rs = _prologue(logits, target, ignore_index, reduction, confusion, upsample, align_corners)
    name = _backend(backend, logits, rs)
    if name == "reference":
        if sync is not None:
            raise RuntimeError(
                "distributed=True needs a fused backend (cpp or triton): the reference backend "
                "computes the loss without handing out its per-class sums to all-reduce"
            )
        if loss in ("dice", "dice_ce"):
            options["weight"] = weight
        return _DICE_REFERENCE[loss](
            _interpolated(logits, rs),
            target,
            ignore_index=ii,
            reduction=reduction,
            confusion=confusion,
            validate=validate,
            **options,
        )
    o = _dice.options(logits, _DICE_KIND[loss], **options)
    C = logits.shape[1]
    ce = loss == "dice_ce"
    w = _dice.check_weight(weight, logits, C if ce else C - o.first, validate)
    return _dice.run(
        name, logits, target, rs, o, w, w if ce else None, confusion, ii, reduction, validate, sync
    )


def dice_loss(
    logits,
    target,
    weight=None,
    include_background=True,
    squared_pred=False,
    jaccard=False,
    smooth_nr=1e-5,
    smooth_dr=1e-5,
    batch=False,
    ignore_index=-100,
    reduction="mean",
    *,
    confusion=None,
    backend=None,
    validate=True,
    upsample=None,
    align_corners=False,
):
    """Soft Dice loss on softmax probabilities, as MONAI's ``DiceLoss(softmax=True, to_onehot_y=True, ...)``:
    per class c and per image (the whole batch with ``batch=True``; (N, C) rows are one image), over the
    valid pixels, I = Σ p_c [y = c], P = Σ p_c (Σ p_c² with ``squared_pred``), G = Σ [y = c] and
    loss_c = 1 − (2I + smooth_nr) / (P + G + smooth_dr) (``jaccard``: 1 − (2I + smooth_nr) /
    (2(P + G − I) + smooth_dr)), times ``weight[c]`` ((C',): C' = C, or C − 1 with
    ``include_background=False``). ``"mean"`` averages the per-class losses over classes and images,
    ``"sum"`` adds them, ``"none"`` returns them: (B, C'), or (C',) with ``batch=True`` or rows.

    Edge cases and the differences from MONAI are those of :func:`fused_imbalance.reference.dice_loss`:
    ignored pixels (``ignore_index``) count in no sum; a class absent from an image keeps its term
    1 − smooth_nr / (P + smooth_dr); an all-ignored image gives 1 − smooth_nr / smooth_dr (0 by default)
    and gradient 0; a zero denominator (smooth_dr = 0) gives loss 0 and gradient 0, never NaN; a C = 1
    softmax is the constant 1 (MONAI uses the one channel as a probability); ``"none"`` is (B, C'), not
    (B, C', 1, ..., 1). ``validate`` also checks that the weight is finite and >= 0 (MONAI's check; on a
    GPU deferred, as the label check). ``upsample``: the logits are interpolated with ``F.interpolate``
    first, the Dice pass is fused but the interpolation is not (the interpolated logits and their
    gradient are allocated).
    """
    return _dice_family(
        "dice",
        logits,
        target,
        ignore_index,
        reduction,
        confusion,
        backend,
        validate,
        upsample,
        align_corners,
        weight=weight,
        include_background=include_background,
        squared_pred=squared_pred,
        jaccard=jaccard,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
        batch=batch,
    )


def generalized_dice_loss(
    logits,
    target,
    w_type="square",
    include_background=True,
    smooth_nr=1e-5,
    smooth_dr=1e-5,
    batch=False,
    ignore_index=-100,
    reduction="mean",
    *,
    confusion=None,
    backend=None,
    validate=True,
    upsample=None,
    align_corners=False,
):
    """Generalized Dice loss (Sudre et al. 2017), as MONAI's
    ``GeneralizedDiceLoss(softmax=True, to_onehot_y=True, ...)``: with the sums of :func:`dice_loss` and
    class weights w_c = 1/G_c² (``"square"``), 1/G_c (``"simple"``) or 1 (``"uniform"``),
    loss = 1 − (2 Σ_c w_c I_c + smooth_nr) / (Σ_c w_c (P_c + G_c) + smooth_dr) per image (per batch with
    ``batch=True``). A class absent from the image gets the largest finite weight of that image, as
    MONAI. ``"none"`` returns (B,), or a 0-dim tensor with ``batch=True`` or rows. Differences from MONAI
    as :func:`fused_imbalance.reference.generalized_dice_loss` (ignored pixels count in no sum, the
    weights in the accumulation dtype).
    """
    return _dice_family(
        "generalized_dice",
        logits,
        target,
        ignore_index,
        reduction,
        confusion,
        backend,
        validate,
        upsample,
        align_corners,
        w_type=w_type,
        include_background=include_background,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
        batch=batch,
    )


def tversky_loss(
    logits,
    target,
    alpha=0.5,
    beta=0.5,
    gamma=1.0,
    include_background=True,
    smooth_nr=1e-5,
    smooth_dr=1e-5,
    batch=False,
    ignore_index=-100,
    reduction="mean",
    *,
    confusion=None,
    backend=None,
    validate=True,
    upsample=None,
    align_corners=False,
):
    """Tversky loss (Salehi et al. 2017) and focal Tversky loss (Abraham and Khan 2019): with the sums of
    :func:`dice_loss`, TI_c = (I + smooth_nr) / (I + α(P − I) + β(G − I) + smooth_dr) (α weighs the false
    positives, β the false negatives) and loss_c = (1 − TI_c)^γ, reduced as :func:`dice_loss`. γ = 1 is
    MONAI's ``TverskyLoss(softmax=True, to_onehot_y=True, ...)``; γ applies to each class's term
    (segmentation_models_pytorch raises the class mean to γ instead). For γ != 1 a term with 1 − TI <= 0
    is 0 with gradient 0. α, β >= 0, γ > 0, all finite.
    """
    return _dice_family(
        "tversky",
        logits,
        target,
        ignore_index,
        reduction,
        confusion,
        backend,
        validate,
        upsample,
        align_corners,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        include_background=include_background,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
        batch=batch,
    )


def dice_ce_loss(
    logits,
    target,
    lambda_dice=1.0,
    lambda_ce=1.0,
    weight=None,
    include_background=True,
    squared_pred=False,
    jaccard=False,
    smooth_nr=1e-5,
    smooth_dr=1e-5,
    batch=False,
    ignore_index=-100,
    reduction="mean",
    *,
    confusion=None,
    backend=None,
    validate=True,
    upsample=None,
    align_corners=False,
):
    """λ_ce · cross-entropy + λ_dice · Dice, as MONAI's ``DiceCELoss(softmax=True, to_onehot_y=True, ...)``,
    both from the same pass over the logits. The cross-entropy is :func:`cross_entropy` with the class
    weights ``weight`` (C,) and ``ignore_index`` (``"mean"`` = Σ w_y ℓ / Σ w_y over the valid pixels, 0
    when every pixel is ignored); the Dice term is :func:`dice_loss` with the same options and
    ``weight``, or ``weight[1:]`` with ``include_background=False`` (as MONAI). ``reduction`` is
    ``"mean"`` or ``"sum"`` (applied to each term, as MONAI); ``"none"`` is a ValueError.
    Differences from MONAI: ignored pixels count in neither term (MONAI's DiceCELoss has no
    ``ignore_index``); ``validate`` checks that all C weights are finite and >= 0.
    """
    return _dice_family(
        "dice_ce",
        logits,
        target,
        ignore_index,
        reduction,
        confusion,
        backend,
        validate,
        upsample,
        align_corners,
        weight=weight,
        lambda_dice=lambda_dice,
        lambda_ce=lambda_ce,
        include_background=include_background,
        squared_pred=squared_pred,
        jaccard=jaccard,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
        batch=batch,
    )
