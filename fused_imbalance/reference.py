"""Eager PyTorch implementations of every loss: the executable specification (DESIGN.md §2–§4).

These are written for clarity, not speed: they materialise softmax, one-hot targets and
per-class masks. Every fused kernel is tested against them. They are also the ``"reference"``
backend of :mod:`fused_imbalance.functional`.

Conventions (all functions): logits (N, C) or (B, C, d1..dk) in any layout; target (N,) or
(B, d1..dk) with integer labels; pixels whose label is ``ignore_index`` contribute nothing;
arithmetic in float32 (float64 for float64 logits); ``"none"`` returns the per-pixel loss
shaped like ``target`` (0 at ignored pixels); a zero denominator gives loss 0 and gradient 0.
"""
import math
import numbers

import torch
import torch.nn.functional as F

from . import weights as _weights
from ._checks import (acc_dtype, check_class_vector, check_confusion, check_gamma, check_inputs, check_labels,
                      check_loss_type)

__all__ = ["cross_entropy", "focal_loss", "sigmoid_focal_loss", "class_balanced_loss", "recall_loss",
           "cdb_loss", "mse_outlying_loss", "confusion_matrix", "class_stats", "weighted_loss",
           "ohem_cross_entropy"]

class _Pixels:
    """Logits as (N, C) rows in the accumulation dtype, labels, and the validity mask."""

    def __init__(self, logits, target, ignore_index, validate=True):
        C = logits.shape[1]
        self.C = C
        self.shape = target.shape
        self.x = logits.movedim(1, -1).reshape(-1, C).to(acc_dtype(logits))
        y = target.reshape(-1).long()
        self.valid = y != ignore_index
        in_range = (y >= 0) & (y < C)
        if validate:
            check_labels((self.valid & ~in_range).sum(), target, C, ignore_index)
        self.valid = self.valid & in_range
        self.y = torch.where(self.valid, y, torch.zeros_like(y))
        # Ignored pixels contribute nothing, not even a NaN gradient from non-finite logits.
        self.x = torch.where(self.valid[:, None], self.x, torch.zeros_like(self.x))

    def onehot(self):
        return F.one_hot(self.y, self.C).to(self.x.dtype)

    def stats(self):
        """(count, tp): valid pixels of each class and those whose argmax is their class."""
        pred = self.x.argmax(dim=1)
        count = torch.bincount(self.y[self.valid], minlength=self.C)
        tp = torch.bincount(self.y[self.valid & (pred == self.y)], minlength=self.C)
        return count, tp

    def add_confusion(self, confusion):
        if confusion is None:
            return
        pred = self.x.argmax(dim=1)
        idx = self.y[self.valid] * self.C + pred[self.valid]
        confusion += torch.bincount(idx, minlength=self.C * self.C).view(self.C, self.C)


def _softmax_focal(px, gamma):
    logp = torch.log_softmax(px.x, dim=1).gather(1, px.y[:, None]).squeeze(1)
    if gamma == 0.0:
        return -logp
    one_minus_p = -torch.expm1(logp)
    # (1 − p)^γ has an infinite derivative at p = 1 for γ < 1, though the loss's is 0 there
    # (log p = 0): select 0 instead of letting autograd form 0·inf = NaN. exp(γ log b) rather
    # than pow, as in _sigmoid_focal: inductor fails to lower a symbolic γ (dynamic=True) that
    # feeds both a pow and a mul in one graph.
    pos = one_minus_p > 0
    safe = torch.where(pos, one_minus_p, torch.ones_like(one_minus_p))
    focal = torch.where(pos, torch.exp(gamma * torch.log(safe)), torch.zeros_like(one_minus_p))
    return -focal * logp


def _sigmoid_focal(px, gamma):
    # The label's term −(1−q_y)^γ log q_y and the others' −q_k^γ log(1−q_k), selected, not multiplied
    # by a one-hot target: 0 · log q_k would turn a −inf logit of another class into NaN.
    x_y = px.x.gather(1, px.y[:, None]).squeeze(1)
    label = F.one_hot(px.y, px.C).bool()
    # The other classes' term is computed with 0 at the label's place, not computed and then
    # discarded: the discarded term's derivative at a +inf label logit is inf, and 0 · inf = NaN.
    x_neg = torch.where(label, torch.zeros_like(px.x), px.x)
    pos = -F.logsigmoid(x_y)
    neg = -F.logsigmoid(-x_neg)  # −log(1 − q) = softplus(x)
    if gamma != 0.0:
        # σ(u)^γ as exp(γ log σ(u)): pow's derivative γ σ^(γ−1) is infinite where σ(u) rounds to 0
        # (a confident or +inf label logit) and would meet a zero log term as inf · 0 = NaN;
        # this form's derivative γ σ^γ (1 − σ) is finite everywhere.
        pos = torch.exp(gamma * F.logsigmoid(-x_y)) * pos  # 1 − q_y = σ(−x_y)
        neg = torch.exp(gamma * F.logsigmoid(x_neg)) * neg
    return pos + torch.where(label, torch.zeros_like(neg), neg).sum(dim=1)


def _mse(px, outlying, on_softmax):
    a = torch.softmax(px.x, dim=1) if on_softmax else px.x
    t = px.onehot() * outlying[px.y][:, None]
    return 0.5 * (a - t).pow(2).sum(dim=1)


def _reduce(px, loss, w, reduction, mean_over_weights):
    """Weighted reduction of per-pixel losses (DESIGN.md §2 "Mean")."""
    valid = px.valid.to(loss.dtype)
    loss = torch.where(px.valid, loss, torch.zeros_like(loss))
    # As torch's cross_entropy: an ignored pixel never meets a weight (an inf weight of the class
    # its label is clamped to would give inf · 0 = NaN), and a negative Σ w_y is divided by as it is.
    wp = valid if w is None else torch.where(px.valid, w[px.y], torch.zeros_like(loss))
    weighted = wp * loss
    if reduction == "none":
        return weighted.reshape(px.shape)
    total = weighted.sum()
    if reduction == "sum":
        return total
    denom = wp.sum() if mean_over_weights else valid.sum()
    return total / torch.where(denom != 0, denom, torch.ones_like(denom))


def _loss(logits, target, per_pixel, weight, ignore_index, reduction, confusion, validate, mean_over_weights,
          weight_name="weight"):
    """Check the arguments, compute ``per_pixel(px)`` and reduce it with the class weights."""
    check_inputs(logits, target, ignore_index, reduction)
    check_confusion(confusion, logits)
    w = None if weight is None else check_class_vector(weight, weight_name, logits)
    px = _Pixels(logits, target, ignore_index, validate)
    px.add_confusion(confusion)
    return _reduce(px, per_pixel(px), w, reduction, mean_over_weights)


def cross_entropy(logits, target, weight=None, ignore_index=-100, reduction="mean", confusion=None,
                  validate=True):
    """−log p_y; ``"mean"`` = Σ w_y ℓ / Σ w_y, as ``torch.nn.functional.cross_entropy``."""
    return _loss(logits, target, lambda px: _softmax_focal(px, 0.0), weight, ignore_index, reduction, confusion,
                 validate, True)


def focal_loss(logits, target, gamma=2.0, weight=None, ignore_index=-100, reduction="mean", confusion=None,
               validate=True):
    """−(1 − p_y)^γ log p_y (Lin et al. 2017); γ = 0 is ``cross_entropy``."""
    gamma = check_gamma(gamma)
    return _loss(logits, target, lambda px: _softmax_focal(px, gamma), weight, ignore_index, reduction, confusion,
                 validate, True)


def sigmoid_focal_loss(logits, target, gamma=2.0, weight=None, ignore_index=-100, reduction="mean",
                       confusion=None, validate=True):
    """Σ_k of the sigmoid focal loss of each class logit against the one-hot target."""
    gamma = check_gamma(gamma)
    return _loss(logits, target, lambda px: _sigmoid_focal(px, gamma), weight, ignore_index, reduction, confusion,
                 validate, True)


def weighted_loss(logits, target, weight, loss_type="softmax", gamma=2.0, ignore_index=-100, reduction="mean",
                  confusion=None, validate=True):
    """A ``loss_type`` loss ("softmax", "sigmoid", "focal", "softmax_focal") with fixed class
    weights and the paper mean Σ w_y ℓ / N_valid."""
    check_loss_type(loss_type)
    gamma = check_gamma(gamma) if loss_type in ("focal", "softmax_focal") else 0.0
    fn = _softmax_focal if loss_type in ("softmax", "softmax_focal") else _sigmoid_focal
    return _loss(logits, target, lambda px: fn(px, gamma), weight, ignore_index, reduction, confusion, validate,
                 False)


def class_balanced_loss(logits, target, samples_per_class, beta=0.9999, loss_type="softmax", gamma=2.0,
                        ignore_index=-100, reduction="mean", confusion=None, validate=True):
    """Class-balanced loss (Cui et al. 2019) with effective-number weights summing to C.

    ``"mean"`` divides by the number of valid pixels, as the official code.
    """
    check_inputs(logits, target, ignore_index, reduction)
    w = check_class_vector(_weights.effective_number(samples_per_class, beta).to(logits.device),
                           "samples_per_class", logits)
    return weighted_loss(logits, target, w, loss_type, gamma, ignore_index, reduction, confusion, validate)


def recall_weights(count, tp):
    """w_c = 1 − TP_c / n_c, and 1 for a class absent from the batch."""
    count = count.to(torch.float64)
    recall = tp.to(torch.float64) / count.clamp_min(1)
    return torch.where(count > 0, 1.0 - recall, torch.ones_like(recall))


def recall_loss(logits, target, ignore_index=-100, reduction="mean", recall=None, confusion=None,
                validate=True):
    """Recall loss (Tian et al. 2021): −(1 − R_y) log p_y with R the batch recall.

    ``recall`` may be a (C,) tensor used instead of the batch recall, or a callable
    ``recall(count, tp) -> (C,) tensor`` given the batch's per-class counts and true positives
    (for moving averages and all-reduced statistics). ``"mean"`` is over valid pixels.
    """
    check_inputs(logits, target, ignore_index, reduction)
    check_confusion(confusion, logits)
    px = _Pixels(logits, target, ignore_index, validate)
    px.add_confusion(confusion)
    if recall is None:
        w = recall_weights(*px.stats())
    else:
        if callable(recall):
            recall = recall(*px.stats())
        w = 1.0 - check_class_vector(recall, "recall", logits)
    w = w.to(px.x.dtype)
    return _reduce(px, _softmax_focal(px, 0.0), w, reduction, False)


def cdb_loss(logits, target, class_accuracy, tau="dynamic", gamma=0.0, ignore_index=-100, reduction="mean",
             confusion=None, validate=True):
    """Class-wise difficulty-balanced loss (Sinha et al. 2020): −w_y (1 − p_y)^γ log p_y,
    w = (1 − A)^τ; ``"mean"`` is over valid pixels."""
    gamma = check_gamma(gamma)
    w = _weights.cdb(class_accuracy, tau).to(logits.device)
    return _loss(logits, target, lambda px: _softmax_focal(px, gamma), w, ignore_index, reduction, confusion,
                 validate, False, "class_accuracy")


def mse_outlying_loss(logits, target, outlying, ignore_index=-100, reduction="mean", input="logits",
                      confusion=None, validate=True):
    """MSE with outlying labels (eq. 4): ½ Σ_k (a_k − t_k)², t_k = outlying[y]·[k = y];
    a = logits (``input="logits"``) or softmax (``input="softmax"``); mean over valid pixels."""
    if input not in ("logits", "softmax"):
        raise ValueError(f"input must be 'logits' or 'softmax', got {input!r}")
    check_inputs(logits, target, ignore_index, reduction)
    out = check_class_vector(outlying, "outlying", logits)
    return _loss(logits, target, lambda px: _mse(px, out, input == "softmax"), None, ignore_index, reduction,
                 confusion, validate, False)


def confusion_matrix(logits, target, ignore_index=-100, out=None, validate=True):
    """(C, C) int64 counts, row = label, column = argmax (first index on ties); adds into ``out``."""
    check_inputs(logits, target, ignore_index)
    check_confusion(out, logits, "out")
    C = logits.shape[1]
    if out is None:
        out = torch.zeros(C, C, dtype=torch.int64, device=logits.device)
    px = _Pixels(logits.detach(), target, ignore_index, validate)
    px.add_confusion(out)
    return out


def class_stats(logits, target, ignore_index=-100, validate=True):
    """(count, tp): int64 (C,) valid pixels per class and those whose argmax is their class."""
    check_inputs(logits, target, ignore_index)
    return _Pixels(logits.detach(), target, ignore_index, validate).stats()


def upsampled(logits, size, upsample, align_corners=False):
    """The logits the losses see with ``upsample`` (DESIGN.md §10): ``F.interpolate`` of the
    low-resolution logits to ``size`` = (H, W), in the accumulation dtype like every other
    arithmetic of the package (16-bit logits are interpolated in float32, not rounded back).

    Any loss of this module applied to the result is the specification of that loss with
    ``upsample``: ``focal_loss(upsampled(x, y.shape[-2:], "bilinear"), y)``.
    """
    x = logits.to(acc_dtype(logits))
    kwargs = {} if upsample == "nearest" else {"align_corners": align_corners}
    return F.interpolate(x, size=tuple(size), mode=upsample, **kwargs)


# --- OHEM cross-entropy (DESIGN.md §13) --------------------------------------------------------

OHEM_CONVENTIONS = ("hrnet", "mmseg")


def _check_ohem(thresh, min_kept, convention):
    """(thresh, min_kept) of ``ohem_cross_entropy`` as a float and an int, or a clear error."""
    if convention not in OHEM_CONVENTIONS:
        raise ValueError(f"convention must be one of {OHEM_CONVENTIONS}, got {convention!r}")
    if thresh is None:
        raise TypeError("thresh must be a number in [0, 1]; mmsegmentation's thresh=None (keep exactly the "
                        "min_kept pixels of largest loss, ties in sort order) is not supported: thresh=0.0 "
                        "keeps those strictly below the min_kept-th smallest probability instead")
    if isinstance(thresh, bool) or not isinstance(thresh, (numbers.Real, torch.SymFloat)):
        raise TypeError(f"thresh must be a number in [0, 1] (a probability), got {type(thresh).__name__} "
                        f"{thresh!r}")
    # Comparisons, not math.isfinite, so that a symbolic thresh is checked by guards; NaN fails both.
    if not (0 <= thresh <= 1):
        raise ValueError(f"thresh must be in [0, 1] (a probability), got {thresh}")
    if isinstance(min_kept, bool) or not isinstance(min_kept, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"min_kept must be an int >= 0 (a number of pixels), got {type(min_kept).__name__} "
                        f"{min_kept!r}")
    if min_kept < 0:
        raise ValueError(f"min_kept must be an int >= 0, got {min_kept}")
    return float(thresh), int(min_kept)


def ohem_rank(min_kept, batch, convention):
    """The 0-based rank, before clamping to ``n_valid - 1``, whose label probability sets the
    threshold: ``max(1, min_kept)`` (HRNet) or ``min_kept * batch`` (mmsegmentation)."""
    return max(1, min_kept) if convention == "hrnet" else min_kept * batch


def ohem_cross_entropy(logits, target, thresh=0.7, min_kept=100000, weight=None, ignore_index=-100,
                       reduction="mean", *, convention="hrnet", confusion=None, validate=True):
    """Cross-entropy over the hard pixels only (online hard example mining), by sorting.

    With p_n = softmax(x_n)[y_n] the label probability of valid pixel n, in the accumulation
    dtype, and p_(0) <= p_(1) <= ... those of the ``n_valid`` valid pixels of the whole batch
    sorted ascending:

        threshold = max(p_(min(k, n_valid - 1)), thresh),   kept = {valid n : p_n < threshold},

    strictly below, so pixels tied with the threshold are not kept. ``thresh`` takes part in the
    comparisons rounded to the accumulation dtype, as a float in a comparison with a float32
    tensor is in torch. The per-pixel loss is w_{y_n} (-log p_n) at kept pixels and 0 elsewhere
    (``weight`` as in ``torch.nn.CrossEntropyLoss(reduction="none")``); ``"sum"`` adds it up,
    ``"none"`` returns it shaped like ``target``. The kept set is a constant for autograd: the
    loss is piecewise smooth, its gradient that of the kept pixels' terms.

    ``convention="hrnet"`` (HRNet-Semantic-Segmentation, ``lib/core/criterion.py``,
    ``OhemCrossEntropy``): k = max(1, min_kept), one threshold for the whole batch, and
    ``"mean"`` divides by the number of kept pixels (not by Σ w_y).

    ``convention="mmseg"`` (mmsegmentation's ``OHEMPixelSampler`` with its ``CrossEntropyLoss``
    defaults): k = min_kept · B with B = ``logits.shape[0]`` (each row of (N, C) logits is then an
    image), one threshold for the batch, and ``"mean"`` divides the kept pixels' sum by every
    pixel of the batch, ignored ones included (``avg_non_ignore=False``).

    Where this differs from that code: no valid pixel or no kept pixel gives loss 0 and gradient
    0 (HRNet raises an IndexError or returns NaN); 16-bit logits are computed in float32 (both
    compute the softmax in the logits' dtype outside autocast); min_kept must be an int >= 0
    and thresh a number in [0, 1] (mmsegmentation asserts min_kept > 1, where min_kept 0 and 1
    take the same formula here, and also takes thresh=None, a top-k by weighted loss whose ties
    fall in sort order, not supported here). Both codes first resize logits of another size
    than the labels (bilinear); this function does not: pass
    ``upsampled(logits, target.shape[-2:], "bilinear", align_corners)``.

    A fused backend computes p_n in its own order of operations: a pixel within rounding of the
    threshold may be kept by one and not by the other; exact ties (equal logits) stay ties.
    ``confusion`` counts every valid pixel, kept or not.
    """
    check_inputs(logits, target, ignore_index, reduction)
    check_confusion(confusion, logits)
    thresh, min_kept = _check_ohem(thresh, min_kept, convention)
    w = None if weight is None else check_class_vector(weight, "weight", logits)
    px = _Pixels(logits, target, ignore_index, validate)
    px.add_confusion(confusion)
    logp = torch.log_softmax(px.x, dim=1).gather(1, px.y[:, None]).squeeze(1)
    with torch.no_grad():
        p = torch.softmax(px.x, dim=1).gather(1, px.y[:, None]).squeeze(1)  # as HRNet: softmax, gathered
        kept = _ohem_kept(p, px.valid, ohem_rank(min_kept, logits.shape[0], convention), thresh)
    loss = -logp if w is None else w[px.y] * -logp
    # selected, not multiplied: a pixel left out with p = 0 has an infinite loss
    loss = torch.where(kept, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(px.shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    if convention == "mmseg":
        return total / max(1, px.valid.numel())  # every pixel of the batch; total is 0 without one
    denom = kept.sum().to(total.dtype)
    return total / torch.where(denom != 0, denom, torch.ones_like(denom))


def _ohem_kept(p, valid, rank, thresh):
    """Valid pixels whose ``p`` lies strictly below max(p_(min(rank, n_valid - 1)), thresh).

    Written without a data-dependent shape (so that it compiles as one graph): the invalid
    entries become NaN, which sorts after every value, as a valid NaN does, so position i <
    n_valid of the sort holds the i-th smallest valid value. No valid pixel leaves NaN at
    position 0, hence a NaN threshold and nothing kept; so does a NaN among the valid values
    reached by the rank (nothing compares below NaN), as in HRNet's code.
    """
    if p.numel() == 0:
        return valid
    ranked = torch.sort(torch.where(valid, p, torch.full_like(p, math.nan))).values
    n_valid = valid.sum()
    i = torch.clamp(torch.clamp(n_valid - 1, max=rank), min=0)
    # clamp propagates NaN like HRNet's max(p_k, thresh) with p_k NaN, and rounds thresh to p's dtype
    threshold = ranked.gather(0, i.reshape(1)).clamp(min=thresh)
    return valid & (p < threshold)
