"""Eager PyTorch implementations of every loss: the executable specification (docs/DESIGN.md §2–§4).

These are written for clarity, not speed: they materialise softmax, one-hot targets and
per-class masks. Every fused kernel is tested against them. They are also the ``"reference"``
backend of :mod:`fused_imbalance.functional`.

Conventions (all functions): logits (N, C) or (B, C, d1..dk) in any layout; target (N,) or
(B, d1..dk) with integer labels; pixels whose label is ``ignore_index`` contribute nothing;
arithmetic in float32 (float64 for float64 logits); ``"none"`` returns the per-pixel loss
shaped like ``target`` (0 at ignored pixels) — the per-(image,)class losses for the Dice family
(docs/DESIGN.md §12), which is a function of per-class sums; a zero denominator gives loss 0 and
gradient 0.
"""

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import weights as _weights
from ._checks import (
    acc_dtype,
    check_class_vector,
    check_confusion,
    check_gamma,
    check_inputs,
    check_labels,
    check_loss_type,
    check_range,
)

__all__ = [
    "cross_entropy",
    "focal_loss",
    "sigmoid_focal_loss",
    "class_balanced_loss",
    "recall_loss",
    "cdb_loss",
    "mse_outlying_loss",
    "confusion_matrix",
    "class_stats",
    "weighted_loss",
    "dice_loss",
    "generalized_dice_loss",
    "tversky_loss",
    "dice_ce_loss",
    "ohem_cross_entropy",
]


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
    """Weighted reduction of per-pixel losses (docs/DESIGN.md §2 "Mean")."""
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


def _loss(
    logits,
    target,
    per_pixel,
    weight,
    ignore_index,
    reduction,
    confusion,
    validate,
    mean_over_weights,
    weight_name="weight",
):
    """Check the arguments, compute ``per_pixel(px)`` and reduce it with the class weights."""
    ignore_index = check_inputs(logits, target, ignore_index, reduction)
    check_confusion(confusion, logits)
    w = None if weight is None else check_class_vector(weight, weight_name, logits)
    px = _Pixels(logits, target, ignore_index, validate)
    px.add_confusion(confusion)
    return _reduce(px, per_pixel(px), w, reduction, mean_over_weights)


def cross_entropy(
    logits, target, weight=None, ignore_index=-100, reduction="mean", confusion=None, validate=True
):
    """−log p_y; ``"mean"`` = Σ w_y ℓ / Σ w_y, as ``torch.nn.functional.cross_entropy``."""
    return _loss(
        logits,
        target,
        lambda px: _softmax_focal(px, 0.0),
        weight,
        ignore_index,
        reduction,
        confusion,
        validate,
        True,
    )


def focal_loss(
    logits, target, gamma=2.0, weight=None, ignore_index=-100, reduction="mean", confusion=None, validate=True
):
    """−(1 − p_y)^γ log p_y (Lin et al. 2017); γ = 0 is ``cross_entropy``."""
    gamma = check_gamma(gamma)
    return _loss(
        logits,
        target,
        lambda px: _softmax_focal(px, gamma),
        weight,
        ignore_index,
        reduction,
        confusion,
        validate,
        True,
    )


def sigmoid_focal_loss(
    logits, target, gamma=2.0, weight=None, ignore_index=-100, reduction="mean", confusion=None, validate=True
):
    """Σ_k of the sigmoid focal loss of each class logit against the one-hot target."""
    gamma = check_gamma(gamma)
    return _loss(
        logits,
        target,
        lambda px: _sigmoid_focal(px, gamma),
        weight,
        ignore_index,
        reduction,
        confusion,
        validate,
        True,
    )


def weighted_loss(
    logits,
    target,
    weight,
    loss_type="softmax",
    gamma=2.0,
    ignore_index=-100,
    reduction="mean",
    confusion=None,
    validate=True,
):
    """A ``loss_type`` loss ("softmax", "sigmoid", "focal", "softmax_focal") with fixed class
    weights and the paper mean Σ w_y ℓ / N_valid."""
    check_loss_type(loss_type)
    gamma = check_gamma(gamma) if loss_type in ("focal", "softmax_focal") else 0.0
    fn = _softmax_focal if loss_type in ("softmax", "softmax_focal") else _sigmoid_focal
    return _loss(
        logits, target, lambda px: fn(px, gamma), weight, ignore_index, reduction, confusion, validate, False
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
    confusion=None,
    validate=True,
):
    """Class-balanced loss (Cui et al. 2019) with effective-number weights summing to C.

    ``"mean"`` divides by the number of valid pixels, as the official code.
    """
    check_inputs(logits, target, ignore_index, reduction)
    w = check_class_vector(
        _weights.effective_number(samples_per_class, beta).to(logits.device), "samples_per_class", logits
    )
    return weighted_loss(logits, target, w, loss_type, gamma, ignore_index, reduction, confusion, validate)


def recall_weights(count, tp):
    """w_c = 1 − TP_c / n_c, and 1 for a class absent from the batch."""
    count = count.to(torch.float64)
    recall = tp.to(torch.float64) / count.clamp_min(1)
    return torch.where(count > 0, 1.0 - recall, torch.ones_like(recall))


def recall_loss(
    logits, target, ignore_index=-100, reduction="mean", recall=None, confusion=None, validate=True
):
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


def cdb_loss(
    logits,
    target,
    class_accuracy,
    tau="dynamic",
    gamma=0.0,
    ignore_index=-100,
    reduction="mean",
    confusion=None,
    validate=True,
):
    """Class-wise difficulty-balanced loss (Sinha et al. 2020): −w_y (1 − p_y)^γ log p_y,
    w = (1 − A)^τ; ``"mean"`` is over valid pixels."""
    gamma = check_gamma(gamma)
    w = _weights.cdb(class_accuracy, tau).to(logits.device)
    return _loss(
        logits,
        target,
        lambda px: _softmax_focal(px, gamma),
        w,
        ignore_index,
        reduction,
        confusion,
        validate,
        False,
        "class_accuracy",
    )


def mse_outlying_loss(
    logits,
    target,
    outlying,
    ignore_index=-100,
    reduction="mean",
    input="logits",
    confusion=None,
    validate=True,
):
    """MSE with outlying labels (eq. 4): ½ Σ_k (a_k − t_k)², t_k = outlying[y]·[k = y];
    a = logits (``input="logits"``) or softmax (``input="softmax"``); mean over valid pixels."""
    if input not in ("logits", "softmax"):
        raise ValueError(f"input must be 'logits' or 'softmax', got {input!r}")
    check_inputs(logits, target, ignore_index, reduction)
    out = check_class_vector(outlying, "outlying", logits)
    return _loss(
        logits,
        target,
        lambda px: _mse(px, out, input == "softmax"),
        None,
        ignore_index,
        reduction,
        confusion,
        validate,
        False,
    )


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
    """The logits the losses see with ``upsample`` (docs/DESIGN.md §10): ``F.interpolate`` of the
    low-resolution logits to ``size`` = (H, W), in the accumulation dtype like every other
    arithmetic of the package (16-bit logits are interpolated in float32, not rounded back).

    Any loss of this module applied to the result is the specification of that loss with
    ``upsample``: ``focal_loss(upsampled(x, y.shape[-2:], "bilinear"), y)``.
    """
    x = logits.to(acc_dtype(logits))
    kwargs = {} if upsample == "nearest" else {"align_corners": align_corners}
    return F.interpolate(x, size=tuple(size), mode=upsample, **kwargs)


# --- Dice family (docs/DESIGN.md §12) --------------------------------------------------------------
#
# Soft Dice, generalized Dice, Tversky and Dice + cross-entropy on softmax probabilities, with the
# options and the formulas of MONAI's DiceLoss, GeneralizedDiceLoss, TverskyLoss and DiceCELoss
# (``softmax=True, to_onehot_y=True``). Everything is a function of three sums per class c, taken
# per image s (or over the whole batch with ``batch=True``; (N, C) rows are one image), over valid
# pixels only:
#     I[s, c] = Σ_n p_{n,c} [y_n = c]     P[s, c] = Σ_n p_{n,c}  (Σ_n p_{n,c}² with squared_pred)
#     G[s, c] = Σ_n [y_n = c]             (an exact count)
#
# The gradient, which the backward kernels compute from these sums (``_dice_grad_coefficients`` and
# ``_dice_family_grad`` compute it this way, tested against autograd of the functions below). Write
# a[s, c] for the derivative of the reduced loss with respect to one per-class loss: 1/(S·C') for
# "mean" (S images, C' classes kept), 1 for "sum", grad_output[s, c] for "none", times weight[c].
#   Dice     N = 2I + smooth_nr, D = P + G + smooth_dr, loss = 1 − N/D:
#              ∂L/∂I = −2a/D                  ∂L/∂P = a·N/D²
#   Jaccard  N = 2I + smooth_nr, D = 2(P + G − I) + smooth_dr:
#              ∂L/∂I = −2a(D + N)/D²          ∂L/∂P = 2a·N/D²
#   Tversky  N = I + smooth_nr, D = I + α(P − I) + β(G − I) + smooth_dr, T = N/D, loss = (1 − T)^γ,
#            k = a·γ(1 − T)^(γ−1) (k = a for γ = 1; k = 0 where 1 − T <= 0 for γ != 1):
#              ∂L/∂I = −k(D − (1 − α − β)N)/D²  ∂L/∂P = k·α·N/D²
#   Generalized Dice, per image s with a[s] (1/S, 1 or grad_output[s]) and the class weights w[s, c]:
#            Num = 2 Σ_c w_c I_c + smooth_nr, Den = Σ_c w_c (P_c + G_c) + smooth_dr:
#              ∂L/∂I_c = −2a·w_c/Den          ∂L/∂P_c = a·w_c·Num/Den²
#   A zero denominator (possible only with smooth_dr = 0) has the ratio 1 and both coefficients 0.
#   A class dropped by include_background=False has both coefficients 0.
# Then, for a valid pixel n of image s with label y_n (ignored pixels: gradient 0):
#     ∂L/∂p_{n,c} = ∂L/∂I[s, c]·[y_n = c] + ∂L/∂P[s, c]·(2 p_{n,c} with squared_pred, else 1)
# — without squared_pred one of two values per (image, class): ∂L/∂I + ∂L/∂P for the pixels of
# class c, ∂L/∂P for the others — and through the softmax Jacobian, with g_c = ∂L/∂p_{n,c}:
#     ∂L/∂x_{n,k} = p_{n,k} (g_k − Σ_c p_{n,c} g_c).
# dice_ce_loss adds cross-entropy's λ_ce·b·w_{y_n}(p_{n,k} − [k = y_n]) with b = 1/Σ_valid w_y for
# "mean" (0 when that sum is 0) and 1 for "sum".

DICE_LOSSES = ("dice", "generalized_dice", "tversky")
W_TYPES = ("square", "simple", "uniform")


class DiceSums(NamedTuple):
    """Per-(image, class) sums over valid pixels, each (S, C) in the accumulation dtype."""

    intersection: torch.Tensor  # I = Σ p_c [y = c]
    prediction: torch.Tensor  # P = Σ p_c, or Σ p_c² with squared_pred
    ground: torch.Tensor  # G = Σ [y = c], an exact count


class DiceGradCoefficients(NamedTuple):
    """∂L/∂I and ∂L/∂P per (image, class), each (S, C); 0 for a class the loss leaves out."""

    d_intersection: torch.Tensor
    d_prediction: torch.Tensor


def _check_flag(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _check_number(value, name, positive=False):
    """A finite real number >= 0 (> 0 with ``positive``), as a float."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    # Comparisons, not math.isfinite, so that NaN fails them too.
    if not ((0 < value if positive else 0 <= value) and value < math.inf):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value}")
    return float(value)


def _kept_classes(logits, include_background):
    """C' = the classes the Dice terms cover: C, or C − 1 without the background class 0."""
    _check_flag(include_background, "include_background")
    C = logits.shape[1]
    if include_background:
        return C
    if C < 2:
        raise ValueError(
            "include_background=False needs at least 2 classes: with C = 1 there is no class left "
            "(and a softmax over one class is the constant 1)"
        )
    return C - 1


def _dice_weight(weight, logits, kept, validate, name="weight"):
    """The (C',) per-class weight of the Dice terms, checked: finite and >= 0, as MONAI requires."""
    if weight is None:
        return None
    C = logits.shape[1]
    if not isinstance(weight, torch.Tensor):
        weight = torch.as_tensor(weight, dtype=acc_dtype(logits), device=logits.device)
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {weight.dtype}")
    if weight.dim() != 1 or weight.numel() != kept:
        without = (
            " (include_background=False: the weight leaves out class 0, as MONAI's DiceLoss)"
            if kept != C
            else ""
        )
        raise ValueError(
            f"{name} must have shape ({kept},) for {C} classes{without}, got {tuple(weight.shape)}"
        )
    if weight.device != logits.device:
        raise ValueError(f"{name} is on {weight.device} but logits are on {logits.device}")
    w = weight.detach().to(acc_dtype(logits))
    if validate:
        bad = ~(torch.isfinite(w) & (w >= 0))
        if torch.compiler.is_compiling():
            torch._assert_async(~bad.any(), f"{name} must be finite and >= 0")
        elif bool(bad.any()):
            raise ValueError(f"{name} must be finite and >= 0 (as MONAI's Dice losses), got {w.tolist()}")
    return w


def _dice_options(logits, target, ignore_index, reduction, smooth_nr, smooth_dr, batch):
    check_inputs(logits, target, ignore_index, reduction)
    _check_flag(batch, "batch")
    return _check_number(smooth_nr, "smooth_nr"), _check_number(smooth_dr, "smooth_dr")


def _images(logits, batch):
    """S, the number of per-image sums: B for (B, C, ...) logits, 1 with batch=True or (N, C) rows."""
    return 1 if batch or logits.dim() == 2 else logits.shape[0]


def _dice_sums(px, images, squared_pred):
    """I, P, G of every (image, class); differentiable in I and P. The rows of ``px`` are image-major."""
    C = px.C
    per_image = px.y.numel() // max(images, 1)  # not -1: an empty batch has 0 images of any size
    valid = px.valid[:, None]
    p = torch.where(valid, torch.softmax(px.x, dim=1), torch.zeros_like(px.x))
    label = F.one_hot(px.y, C).bool() & valid
    inter = torch.where(label, p, torch.zeros_like(p)).reshape(images, per_image, C).sum(1)
    pred = (p * p if squared_pred else p).reshape(images, per_image, C).sum(1)
    ground = label.reshape(images, per_image, C).sum(1).to(px.x.dtype)  # counted in int64: exact
    return DiceSums(inter, pred, ground)


def _ratio(num, den):
    """num / den, and 1 where den is 0 (only with smooth_dr = 0: nothing predicted, nothing there),
    with a zero gradient there instead of inf or NaN."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.ones_like(num))


def _dice_terms(s, jaccard, smooth_nr, smooth_dr):
    I, P, G = s
    num = 2 * I + smooth_nr
    den = 2 * (P + G - I) + smooth_dr if jaccard else P + G + smooth_dr
    return 1 - _ratio(num, den)


def _tversky_terms(s, alpha, beta, gamma, smooth_nr, smooth_dr):
    I, P, G = s
    base = 1 - _ratio(I + smooth_nr, I + alpha * (P - I) + beta * (G - I) + smooth_dr)
    if gamma == 1.0:
        return base
    # (1 − T)^γ: 1 − T <= 0 only where smooth_nr > smooth_dr or P − I rounds below 0 (a perfect
    # prediction); the power of a negative base is NaN and its derivative at 0 infinite for γ < 1, so
    # the term is 0 there with gradient 0. exp(γ log b) rather than pow, as _softmax_focal.
    pos = base > 0
    safe = torch.where(pos, base, torch.ones_like(base))
    return torch.where(pos, torch.exp(gamma * torch.log(safe)), torch.zeros_like(base))


def _gdl_class_weights(G, w_type):
    """MONAI's class weights 1/G² ("square"), 1/G ("simple") or 1 ("uniform") per (image, class); a
    class with G = 0 (infinite weight) gets the largest finite weight of its image (of the batch with
    batch=True: the rows of G), and 0 when every class of the image is empty."""
    if w_type == "uniform":
        return torch.ones_like(G)
    present = G > 0
    safe = torch.where(present, G, torch.ones_like(G))
    w = torch.where(present, 1 / (safe * safe if w_type == "square" else safe), torch.zeros_like(G))
    return torch.where(present, w, w.amax(dim=1, keepdim=True))


def _gdl_terms(s, w_type, smooth_nr, smooth_dr):
    I, P, G = s
    w = _gdl_class_weights(G, w_type)
    return 1 - _ratio(2 * (w * I).sum(1) + smooth_nr, (w * (P + G)).sum(1) + smooth_dr)


def _drop_background(s, include_background):
    return s if include_background else DiceSums(*(t[:, 1:] for t in s))


def _reduce_terms(terms, reduction, per_image_shape):
    """Reduce the (S, C') or (S,) per-(image,)class losses; "mean" averages over all of them, as MONAI."""
    if reduction == "none":
        return terms.reshape(per_image_shape + terms.shape[1:])
    total = terms.sum()
    if reduction == "sum":
        return total
    return total / max(terms.numel(), 1)  # B = 0: no term, the loss is 0


def _per_image_shape(logits, batch):
    """The leading shape of ``"none"``: (B,) per image, () with batch=True or (N, C) rows."""
    return () if batch or logits.dim() == 2 else (logits.shape[0],)


def _dice_core(
    logits,
    target,
    weight,
    include_background,
    squared_pred,
    jaccard,
    smooth_nr,
    smooth_dr,
    batch,
    ignore_index,
    reduction,
    confusion,
    validate,
):
    """Checked Dice / Jaccard loss: (loss, px) so that dice_ce_loss reuses the pixels."""
    _check_flag(squared_pred, "squared_pred")
    _check_flag(jaccard, "jaccard")
    check_confusion(confusion, logits)
    kept = _kept_classes(logits, include_background)
    w = _dice_weight(weight, logits, kept, validate)
    px = _Pixels(logits, target, ignore_index, validate)
    px.add_confusion(confusion)
    s = _drop_background(_dice_sums(px, _images(logits, batch), squared_pred), include_background)
    terms = _dice_terms(s, jaccard, smooth_nr, smooth_dr)
    if w is not None:
        terms = terms * w
    return _reduce_terms(terms, reduction, _per_image_shape(logits, batch)), px


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
    validate=True,
):
    """Soft Dice loss on softmax probabilities (Milletari et al. 2016), as MONAI's
    ``DiceLoss(softmax=True, to_onehot_y=True, ...)``.

    Per class c and per image (over the whole batch with ``batch=True``; (N, C) rows are one image),
    over valid pixels: I = Σ p_c [y = c], P = Σ p_c (Σ p_c² with ``squared_pred``), G = Σ [y = c];
    loss_c = 1 − (2I + smooth_nr) / (P + G + smooth_dr), or with ``jaccard`` the soft IoU
    1 − (2I + smooth_nr) / (2(P + G − I) + smooth_dr) (MONAI's form, numerator 2I included).

    ``weight`` (C',) multiplies loss_c; C' = C, or C − 1 with ``include_background=False``, which
    leaves out class 0 (C = 1 is then a ValueError). ``validate`` also checks that the weight is
    finite and >= 0 (MONAI raises for a negative weight). ``"mean"`` averages the per-class losses
    over classes and images (not Σ w), ``"sum"`` adds them, ``"none"`` returns them: (B, C'), or
    (C',) with ``batch=True`` or (N, C) rows.

    Edge cases. A class absent from an image (G = 0) keeps its term 1 − smooth_nr/(P + smooth_dr),
    close to 1 while the class is predicted, which pushes its probability down (as MONAI;
    segmentation_models_pytorch zeroes it instead). An image whose pixels are all ignored has I = P =
    G = 0: every class's loss is 1 − smooth_nr/smooth_dr (0 with the default equal smoothing), what
    MONAI gives for an empty image, and the gradient is 0; it still counts in the mean, as in MONAI
    with its ``ignore_index``. A zero denominator, possible only with smooth_dr = 0, gives the ratio 1
    (loss 0) and gradient 0, never NaN (MONAI divides by it).

    Differences from MONAI: ignored pixels (``ignore_index``) contribute to no sum — as MONAI's
    ``ignore_index`` for a value outside [0, C), the one case this package allows; a C = 1 softmax is
    the constant 1 here (loss 0 with the default smoothing), where MONAI skips the softmax for one
    channel and uses the input as a probability; ``"none"`` is (B, C'), not (B, C', 1, ..., 1); the
    weight must have C' entries (MONAI also takes one number); arithmetic in float32 for 16-bit
    logits, float64 for float64.
    """
    smooth_nr, smooth_dr = _dice_options(logits, target, ignore_index, reduction, smooth_nr, smooth_dr, batch)
    return _dice_core(
        logits,
        target,
        weight,
        include_background,
        squared_pred,
        jaccard,
        smooth_nr,
        smooth_dr,
        batch,
        ignore_index,
        reduction,
        confusion,
        validate,
    )[0]


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
    validate=True,
):
    """Generalized Dice loss (Sudre et al. 2017), as MONAI's
    ``GeneralizedDiceLoss(softmax=True, to_onehot_y=True, ...)``.

    With the sums of :func:`dice_loss` and the class weights w_c = 1/G_c² (``w_type="square"``),
    1/G_c (``"simple"``) or 1 (``"uniform"``): loss = 1 − (2 Σ_c w_c I_c + smooth_nr) /
    (Σ_c w_c (P_c + G_c) + smooth_dr), one value per image, or one for the batch with ``batch=True``
    (sums and weights over the whole batch) or for (N, C) rows. The weights are constants for
    autograd.

    A class absent from the image (G_c = 0, an infinite weight) gets the largest finite weight of
    that image, as MONAI; when every class is absent (all pixels ignored) all weights are 0 and the
    loss is 1 − smooth_nr/smooth_dr (0 by default) with gradient 0. ``"mean"`` averages over images,
    ``"sum"`` adds them, ``"none"`` returns (B,), or a 0-dim tensor with ``batch=True`` or rows.

    Differences from MONAI: ignored pixels contribute to no sum (MONAI's GeneralizedDiceLoss has no
    ``ignore_index``); the weights are computed in the accumulation dtype (MONAI: float32 always);
    ``"none"`` is (B,), not (B, 1, ..., 1); C = 1 and zero denominators as in :func:`dice_loss`.
    """
    smooth_nr, smooth_dr = _dice_options(logits, target, ignore_index, reduction, smooth_nr, smooth_dr, batch)
    if w_type not in W_TYPES:
        raise ValueError(f"w_type must be one of {W_TYPES}, got {w_type!r}")
    check_confusion(confusion, logits)
    _kept_classes(logits, include_background)
    px = _Pixels(logits, target, ignore_index, validate)
    px.add_confusion(confusion)
    s = _drop_background(_dice_sums(px, _images(logits, batch), False), include_background)
    return _reduce_terms(
        _gdl_terms(s, w_type, smooth_nr, smooth_dr), reduction, _per_image_shape(logits, batch)
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
    validate=True,
):
    """Tversky loss (Salehi et al. 2017) and focal Tversky loss (Abraham and Khan 2019).

    With the sums of :func:`dice_loss`: TI_c = (I + smooth_nr) / (I + α(P − I) + β(G − I) +
    smooth_dr) — α weighs the false positives P − I, β the false negatives G − I — and loss_c =
    (1 − TI_c)^γ, then the reduction of :func:`dice_loss` (``"none"``: (B, C') or (C',)).
    α = β = 0.5 is :func:`dice_loss` with the smoothing halved. γ = 1 is MONAI's
    ``TverskyLoss(softmax=True, to_onehot_y=True, ...)``, including its ``ignore_index`` for a value
    outside [0, C).

    γ applies to each class's term; segmentation_models_pytorch's ``TverskyLoss(gamma=...)`` raises
    the mean over classes to γ instead, the same at γ = 1 only. For γ != 1 a term whose 1 − TI is
    <= 0 (only when smooth_nr > smooth_dr, or by rounding at a perfect prediction) is 0 with gradient
    0, not NaN; at γ = 1 the term is 1 − TI as it is, as MONAI. α, β >= 0, γ > 0, all finite.
    Edge cases and other differences from MONAI as in :func:`dice_loss`.
    """
    smooth_nr, smooth_dr = _dice_options(logits, target, ignore_index, reduction, smooth_nr, smooth_dr, batch)
    alpha, beta = _check_number(alpha, "alpha"), _check_number(beta, "beta")
    gamma = _check_number(gamma, "gamma", positive=True)
    check_confusion(confusion, logits)
    _kept_classes(logits, include_background)
    px = _Pixels(logits, target, ignore_index, validate)
    px.add_confusion(confusion)
    s = _drop_background(_dice_sums(px, _images(logits, batch), False), include_background)
    terms = _tversky_terms(s, alpha, beta, gamma, smooth_nr, smooth_dr)
    return _reduce_terms(terms, reduction, _per_image_shape(logits, batch))


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
    validate=True,
):
    """λ_ce · cross-entropy + λ_dice · Dice, as MONAI's ``DiceCELoss(softmax=True, to_onehot_y=True, ...)``.

    The cross-entropy is :func:`cross_entropy` with the class weights ``weight`` (C,) and
    ``ignore_index`` (torch's semantics: ``"mean"`` = Σ w_y ℓ / Σ w_y over valid pixels, 0 when every
    pixel is ignored); the Dice term is :func:`dice_loss` with the same options and the weight
    ``weight``, or ``weight[1:]`` with ``include_background=False``, as MONAI. ``reduction`` is
    ``"mean"`` or ``"sum"``, applied to each term, as MONAI: ``"none"`` is a ValueError, the
    cross-entropy being per pixel and the Dice per class. λ_dice, λ_ce >= 0 and finite.

    Differences from MONAI: ignored pixels count in neither term (MONAI's DiceCELoss has no
    ``ignore_index``); ``validate`` checks that all C weights are finite and >= 0 (MONAI checks the
    Dice term's, ``weight[1:]`` without background); otherwise those of :func:`dice_loss`.
    """
    if reduction == "none":
        raise ValueError(
            "dice_ce_loss takes reduction 'mean' or 'sum' (as MONAI's DiceCELoss): its "
            "cross-entropy is per pixel and its Dice per class, there is no one unreduced shape"
        )
    smooth_nr, smooth_dr = _dice_options(logits, target, ignore_index, reduction, smooth_nr, smooth_dr, batch)
    lambda_dice, lambda_ce = _check_number(lambda_dice, "lambda_dice"), _check_number(lambda_ce, "lambda_ce")
    kept = _kept_classes(logits, include_background)
    w = None if weight is None else _dice_weight(weight, logits, logits.shape[1], validate)
    dice, px = _dice_core(
        logits,
        target,
        None if w is None else w[logits.shape[1] - kept :],
        include_background,
        squared_pred,
        jaccard,
        smooth_nr,
        smooth_dr,
        batch,
        ignore_index,
        reduction,
        confusion,
        validate,
    )
    ce = _reduce(px, _softmax_focal(px, 0.0), w, reduction, True)
    return lambda_ce * ce + lambda_dice * dice


# --- the gradient of the Dice family in closed form (the comment block above) ----------------


def _dice_grad_coefficients(
    sums,
    loss="dice",
    *,
    include_background=True,
    jaccard=False,
    alpha=0.5,
    beta=0.5,
    gamma=1.0,
    w_type="square",
    smooth_nr=1e-5,
    smooth_dr=1e-5,
    weight=None,
    reduction="mean",
    grad_output=None,
):
    """∂L/∂I and ∂L/∂P per (image, class) from the sums alone, L the reduced loss.

    ``sums``: :class:`DiceSums` of all C classes, (S, C) each, as the forward produces them.
    ``loss``: "dice" (with ``jaccard``), "tversky" or "generalized_dice". ``weight``: the (C',)
    weight of "dice". ``grad_output``: the upstream gradient, a number for "mean"/"sum" (default 1),
    shaped like the ``"none"`` loss for "none". With these, for a valid pixel n of image s,
    ∂L/∂p_{n,c} = d_intersection[s, c]·[y_n = c] + d_prediction[s, c]·(2p_{n,c} or 1).
    """
    I, P, G = (t.detach() for t in sums)
    first = 0 if include_background else 1
    I, P, G = I[:, first:], P[:, first:], G[:, first:]
    S, kept = I.shape
    go = 1.0 if grad_output is None else grad_output

    def nonzero(den):
        ok = den != 0
        return ok, torch.where(ok, den, torch.ones_like(den))

    if loss == "generalized_dice":
        w = _gdl_class_weights(G, w_type)
        num = 2 * (w * I).sum(1, keepdim=True) + smooth_nr
        ok, den = nonzero((w * (P + G)).sum(1, keepdim=True) + smooth_dr)
        a = (1.0 / max(S, 1) if reduction == "mean" else 1.0) * (
            torch.as_tensor(go, dtype=I.dtype).reshape(-1, 1) if reduction == "none" else go
        )
        dI = torch.where(ok, -2 * a * w / den, torch.zeros_like(I))
        dP = torch.where(ok, a * w * num / (den * den), torch.zeros_like(I))
    else:
        if reduction == "none":
            a = torch.as_tensor(go, dtype=I.dtype).reshape(S, kept)
        else:
            a = torch.ones_like(I) * ((1.0 / max(S * kept, 1) if reduction == "mean" else 1.0) * go)
        if weight is not None:
            a = a * weight
        if loss == "dice":
            num = 2 * I + smooth_nr
            ok, den = nonzero(2 * (P + G - I) + smooth_dr if jaccard else P + G + smooth_dr)
            dI = -2 * a * (den + num) / (den * den) if jaccard else -2 * a / den
            dP = (2 if jaccard else 1) * a * num / (den * den)
        elif loss == "tversky":
            num = I + smooth_nr
            ok, den = nonzero(I + alpha * (P - I) + beta * (G - I) + smooth_dr)
            if gamma == 1.0:
                k = a
            else:
                base = 1 - torch.where(ok, num / den, torch.ones_like(num))
                pos = base > 0
                safe = torch.where(pos, base, torch.ones_like(base))
                k = torch.where(
                    pos, a * gamma * torch.exp((gamma - 1) * torch.log(safe)), torch.zeros_like(a)
                )
            dI = -k * (den - (1 - alpha - beta) * num) / (den * den)
            dP = k * alpha * num / (den * den)
        else:
            raise ValueError(f"loss must be one of {DICE_LOSSES}, got {loss!r}")
        dI = torch.where(ok, dI, torch.zeros_like(dI))
        dP = torch.where(ok, dP, torch.zeros_like(dP))
    pad = (first, 0)
    return DiceGradCoefficients(F.pad(dI, pad), F.pad(dP, pad))


def _dice_family_grad(fn, logits, target, grad_output=None, **options):
    """∂L/∂logits of ``fn`` (one of the four Dice-family functions above) in closed form, from the
    per-class sums and :func:`_dice_grad_coefficients`: the backward the fused kernels compute. Same
    shape as ``logits``, in the accumulation dtype."""
    o = dict(
        include_background=True,
        squared_pred=False,
        jaccard=False,
        smooth_nr=1e-5,
        smooth_dr=1e-5,
        batch=False,
        ignore_index=-100,
        reduction="mean",
        weight=None,
        alpha=0.5,
        beta=0.5,
        gamma=1.0,
        w_type="square",
        lambda_dice=1.0,
        lambda_ce=1.0,
    )
    unknown = set(options) - set(o)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    o.update(options)
    loss = {
        dice_loss: "dice",
        dice_ce_loss: "dice",
        tversky_loss: "tversky",
        generalized_dice_loss: "generalized_dice",
    }[fn]
    px = _Pixels(logits.detach(), target, o["ignore_index"], validate=False)
    C = px.C
    squared = o["squared_pred"] and loss == "dice"
    sums = _dice_sums(px, _images(logits, o["batch"]), squared)
    weight, ce_weight = o["weight"], None
    if fn is dice_ce_loss and weight is not None:
        ce_weight = weight.detach().to(px.x.dtype)
        weight = ce_weight if o["include_background"] else ce_weight[1:]
    if weight is not None:
        weight = weight.detach().to(px.x.dtype)
    go = 1.0 if grad_output is None else grad_output
    if fn is dice_ce_loss:
        go = o["lambda_dice"] * go
    coef = _dice_grad_coefficients(
        sums,
        loss,
        include_background=o["include_background"],
        jaccard=o["jaccard"],
        alpha=o["alpha"],
        beta=o["beta"],
        gamma=o["gamma"],
        w_type=o["w_type"],
        smooth_nr=o["smooth_nr"],
        smooth_dr=o["smooth_dr"],
        weight=weight,
        reduction=o["reduction"],
        grad_output=go,
    )
    p = torch.softmax(px.x, dim=1)
    image = torch.arange(p.shape[0], device=p.device) // max(p.shape[0] // sums.intersection.shape[0], 1)
    dI, dP = coef.d_intersection[image], coef.d_prediction[image]
    label = F.one_hot(px.y, C).to(p.dtype)
    g = dI * label + dP * (2 * p if squared else 1)
    grad = p * (g - (p * g).sum(1, keepdim=True))
    if fn is dice_ce_loss:
        valid = px.valid.to(p.dtype)
        wy = valid if ce_weight is None else torch.where(px.valid, ce_weight[px.y], torch.zeros_like(valid))
        b = 1.0
        if o["reduction"] == "mean":
            den = wy.sum()
            b = torch.where(
                den != 0, 1 / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(den)
            )
        grad = grad + o["lambda_ce"] * (1.0 if grad_output is None else grad_output) * b * wy[:, None] * (
            p - label
        )
    grad = torch.where(px.valid[:, None], grad, torch.zeros_like(grad))
    shape = (logits.shape[0],) + tuple(logits.shape[2:]) + (C,)
    return grad.reshape(shape).movedim(-1, 1)


# --- OHEM cross-entropy (docs/DESIGN.md §13) --------------------------------------------------------

OHEM_CONVENTIONS = ("hrnet", "mmseg")


def _check_ohem(thresh, min_kept, convention):
    """(thresh, min_kept) of ``ohem_cross_entropy`` as a float and an int, or a clear error."""
    if convention not in OHEM_CONVENTIONS:
        raise ValueError(f"convention must be one of {OHEM_CONVENTIONS}, got {convention!r}")
    if thresh is None:
        raise TypeError(
            "thresh must be a number in [0, 1]; mmsegmentation's thresh=None (keep exactly the "
            "min_kept pixels of largest loss, ties in sort order) is not supported: thresh=0.0 "
            "keeps those strictly below the min_kept-th smallest probability instead"
        )
    if isinstance(thresh, bool) or not isinstance(thresh, (numbers.Real, torch.SymFloat)):
        raise TypeError(
            f"thresh must be a number in [0, 1] (a probability), got {type(thresh).__name__} " f"{thresh!r}"
        )
    # Comparisons, not math.isfinite, so that a symbolic thresh is checked by guards; NaN fails both.
    if not (0 <= thresh <= 1):
        raise ValueError(f"thresh must be in [0, 1] (a probability), got {thresh}")
    if isinstance(min_kept, bool) or not isinstance(min_kept, (numbers.Integral, torch.SymInt)):
        raise TypeError(
            f"min_kept must be an int >= 0 (a number of pixels), got {type(min_kept).__name__} "
            f"{min_kept!r}"
        )
    if min_kept < 0:
        raise ValueError(f"min_kept must be an int >= 0, got {min_kept}")
    return float(thresh), int(min_kept)


def ohem_rank(min_kept, batch, convention):
    """The 0-based rank, before clamping to ``n_valid - 1``, whose label probability sets the
    threshold: ``max(1, min_kept)`` (HRNet) or ``min_kept * batch`` (mmsegmentation)."""
    return max(1, min_kept) if convention == "hrnet" else min_kept * batch


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
    validate=True,
):
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
