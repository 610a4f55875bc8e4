"""Eager PyTorch implementations of every loss: the executable specification (DESIGN.md §2–§4).

These are written for clarity, not speed: they materialise softmax, one-hot targets and
per-class masks. Every fused kernel is tested against them. They are also the ``"reference"``
backend of :mod:`fused_imbalance.functional`.

Conventions (all functions): logits (N, C) or (B, C, d1..dk) in any layout; target (N,) or
(B, d1..dk) with integer labels; pixels whose label is ``ignore_index`` contribute nothing;
arithmetic in float32 (float64 for float64 logits); ``"none"`` returns the per-pixel loss
shaped like ``target`` (0 at ignored pixels); a zero denominator gives loss 0 and gradient 0.
"""
import torch
import torch.nn.functional as F

from . import weights as _weights
from ._checks import (acc_dtype, check_class_vector, check_confusion, check_gamma, check_inputs, check_labels,
                      check_loss_type, check_range)

__all__ = ["cross_entropy", "focal_loss", "sigmoid_focal_loss", "class_balanced_loss", "recall_loss",
           "cdb_loss", "mse_outlying_loss", "confusion_matrix", "class_stats", "weighted_loss"]

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
    ignore_index = check_inputs(logits, target, ignore_index, reduction)
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
    ignore_index = check_inputs(logits, target, ignore_index, reduction)
    check_confusion(confusion, logits)
    px = _Pixels(logits, target, ignore_index, validate)
    px.add_confusion(confusion)
    if recall is None:
        w = recall_weights(*px.stats())
    else:
        if callable(recall):
            recall = recall(*px.stats())
        r = check_class_vector(recall, "recall", logits)
        check_range(r, 0.0, 1.0, "recall must hold recalls in [0, 1] (a fraction, not a percentage)")
        w = 1.0 - r
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
    ignore_index = check_inputs(logits, target, ignore_index)
    check_confusion(out, logits, "out")
    C = logits.shape[1]
    if out is None:
        out = torch.zeros(C, C, dtype=torch.int64, device=logits.device)
    px = _Pixels(logits.detach(), target, ignore_index, validate)
    px.add_confusion(out)
    return out


def class_stats(logits, target, ignore_index=-100, validate=True):
    """(count, tp): int64 (C,) valid pixels per class and those whose argmax is their class."""
    ignore_index = check_inputs(logits, target, ignore_index)
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
