"""The Dice family's fused ops (docs/DESIGN.md §12) and the contract every backend keeps.

Everything the family computes is a function of three sums per class c, per image s (S images; one
with ``batch=True`` or (N, C) rows), over the valid pixels: I = Σ p_c·[y = c], P = Σ p_c (Σ p_c² with
``squared``), G = Σ [y = c] (``fused_imbalance.reference``, its comment block). So a backend's
forward is one pass over the logits that produces these sums (and the cross-entropy's per-class sums
for ``dice_ce_loss``), then a small finalize that turns them into the loss and into the backward's
coefficients: per (image, class) the derivative of the loss with respect to I and to P for a unit
upstream gradient. The backward is one more pass over the logits that writes the gradient once: for a
pixel of image s, ∂L/∂p_c takes one of two values per class (its label's or not; with ``squared`` the
second is proportional to p_c), then the softmax Jacobian. Byte floor: cross-entropy's (§8).

forward ``{backend}_dice_fwd(x, target, weight, ce_weight, confusion, kind, w_type, flags, params,
ignore_index, reduction, validate, finalize) -> (loss, sums, coef, ce_scale, bad)``

    x            logits, (N, C) or (B, C, d1, ..., dk), any float dtype; strides as ``ops.pixel_view``.
    target       the contiguous labels in their own shape, read flat (N_pixels elements), uint8/int16/int32/
                 int64, pixel n = b * S_img + s.
    weight       (C,) accumulation dtype: the Dice terms' class weights (``kind`` DICE), class 0's
                 entry unread without INCLUDE_BACKGROUND; None for 1.
    ce_weight    (C,) accumulation dtype: the cross-entropy's class weights (flag CE); None for 1.
    confusion    None, or the caller's (C, C) int64 matrix the pass adds its argmax confusion counts into
                 (as the other losses' ops; the only argument an op mutates).
    kind         a :class:`DiceKind`; ``w_type`` a :class:`WType` (GENERALIZED).
    flags        a :class:`DiceFlags` bit set.
    params       [smooth_nr, smooth_dr, alpha, beta, gamma, lambda_dice, lambda_ce] (:func:`params`).
    reduction    ``ops.Reduction`` MEAN, SUM or NONE (NONE: not with CE).
    validate     the C++ backend raises a ``ValueError`` naming a bad label (before it touches
                 ``confusion``); the Triton backend only counts them (``bad``), as the other ops.
    finalize     False: only ``sums`` and ``bad`` are computed (``loss``, ``coef`` and ``ce_scale`` are
                 empty); the caller all-reduces the sums and calls ``{backend}_dice_finalize``.

    loss         () for MEAN and SUM; for NONE the per-(image,)class terms (S, C') (C' = C, or C − 1
                 without background), or (S,) per image for GENERALIZED.
    sums         (S, 4, C) accumulation dtype: I, P, G and (flag CE) the cross-entropy's per-class sums
                 Σ_{y_n = c} −log p_{y_n} (else 0), each summed in a fixed order.
    coef         (S, 2, C) accumulation dtype: ∂L/∂I and ∂L/∂P for a unit upstream gradient, λ_dice,
                 the class weights and the reduction's factor included (for NONE, each term's own
                 derivatives); 0 for a class the loss leaves out. The upstream gradient multiplies them
                 in the backward (:func:`upstream_index`).
    ce_scale     (C,) accumulation dtype: λ_ce·w_c/D for MEAN (D = Σ_c w_c G_c over the batch, summed in
                 float64; 0 when D = 0), λ_ce·w_c for SUM; (0,) without CE.
    bad          (2,) int64: labels outside [0, C) that are not ``ignore_index`` (those pixels are
                 ignored everywhere else) and the largest of them.

finalize ``{backend}_dice_finalize(sums, weight, ce_weight, kind, w_type, flags, params, reduction,
grad_scale) -> (loss, coef, ce_scale)``: the forward's last step on given sums (the all-reduced sums of
a distributed global batch), with ``coef`` and ``ce_scale`` multiplied by ``grad_scale`` (the world
size, so that the gradients averaged by DDP are those of the global batch).

backward ``{backend}_dice_bwd(x, target, coef, ce_scale, grad, kind, flags, ignore_index, reduction) -> dx``

    grad         the upstream gradient: one element for MEAN and SUM (read on the device), (S, C')
                 (S,) for GENERALIZED, for NONE.
    dx           ∂L/∂x in the shape, dtype and memory format of ``x``; 0 at ignored and bad pixels:
                 with u the upstream gradient of the (image, class) term, a_I = u·coef[s, 0, c],
                 a_P = u·coef[s, 1, c], g_c = a_I[y = c] + a_P (2 a_P p_c with SQUARED), and
                 dx_k = p_k (g_k − Σ_c p_c g_c) + u·ce_scale[y] (p_k − [k = y]).

Sums have a fixed order: the results are bit-identical run to run. The accumulation dtype is float64
for float64 logits, float32 otherwise; the finalize computes in float64.

A backend is a :class:`DiceBackend`, looked up by name with :func:`dice_backend`: the eager functions
(what an eager call runs) and the registered ops (what a ``torch.compile`` graph calls), which run the
same functions.
"""

import enum
from typing import NamedTuple

import torch

from . import Reduction, acc_dtype


class DiceKind(enum.IntEnum):
    DICE = 0  # 1 − (2I + nr)/(P + G + dr) per class, or the Jaccard form (flag JACCARD)
    TVERSKY = 1  # (1 − (I + nr)/(I + α(P − I) + β(G − I) + dr))^γ per class
    GENERALIZED = 2  # 1 − (2 Σ w I + nr)/(Σ w (P + G) + dr) per image, w from G (WType)


class WType(enum.IntEnum):
    SQUARE = 0  # w = 1/G²
    SIMPLE = 1  # w = 1/G
    UNIFORM = 2  # w = 1

    @classmethod
    def of(cls, name):
        return {"square": cls.SQUARE, "simple": cls.SIMPLE, "uniform": cls.UNIFORM}[name]


class DiceFlags(enum.IntFlag):
    INCLUDE_BACKGROUND = 1  # class 0 is one of the terms
    SQUARED = 2  # P = Σ p² (DICE only)
    JACCARD = 4  # the Jaccard form (DICE only)
    BATCH = 8  # one group of sums for the whole batch
    CE = 16  # + λ_ce · cross-entropy (dice_ce_loss)


# The flags as plain ints, for the bit tests every call makes (an IntFlag's operators run Python enum code,
# and torch.compile of torch 2.11 cannot trace the making of one).
INCLUDE_BACKGROUND, SQUARED, JACCARD, BATCH, CE = (
    int(f)
    for f in (
        DiceFlags.INCLUDE_BACKGROUND,
        DiceFlags.SQUARED,
        DiceFlags.JACCARD,
        DiceFlags.BATCH,
        DiceFlags.CE,
    )
)

PARAMS = ("smooth_nr", "smooth_dr", "alpha", "beta", "gamma", "lambda_dice", "lambda_ce")


def params(smooth_nr=1e-5, smooth_dr=1e-5, alpha=0.5, beta=0.5, gamma=1.0, lambda_dice=1.0, lambda_ce=0.0):
    """The ops' ``params`` list, in the order of ``PARAMS``."""
    return [
        float(smooth_nr),
        float(smooth_dr),
        float(alpha),
        float(beta),
        float(gamma),
        float(lambda_dice),
        float(lambda_ce),
    ]


def groups(x, flags):
    """S, the number of groups of sums: 1 with BATCH or (N, C) rows, else the number of images."""
    return 1 if (int(flags) & BATCH) or x.dim() == 2 else x.shape[0]


def kept(C, flags):
    """C', the classes the Dice terms cover."""
    return C if int(flags) & INCLUDE_BACKGROUND else C - 1


def loss_shape(S, C, kind, flags, reduction):
    if Reduction(reduction) != Reduction.NONE:
        return ()
    return (S,) if DiceKind(kind) == DiceKind.GENERALIZED else (S, kept(C, flags))


def fwd_fake(x, target, kind, flags, reduction, finalize):
    """Empty outputs of a forward op (its fake kernel)."""
    acc, C, S = acc_dtype(x), x.shape[1], groups(x, flags)
    ce = bool(int(flags) & CE)
    if not finalize:
        return (
            x.new_empty(0, dtype=acc),
            x.new_empty((S, 4, C), dtype=acc),
            x.new_empty(0, dtype=acc),
            x.new_empty(0, dtype=acc),
            x.new_empty(2, dtype=torch.int64),
        )
    return (
        x.new_empty(loss_shape(S, C, kind, flags, reduction), dtype=acc),
        x.new_empty((S, 4, C), dtype=acc),
        x.new_empty((S, 2, C), dtype=acc),
        x.new_empty(C if ce else 0, dtype=acc),
        x.new_empty(2, dtype=torch.int64),
    )


def finalize_fake(sums, kind, flags, reduction):
    S, _, C = sums.shape
    ce = bool(int(flags) & CE)
    return (
        sums.new_empty(loss_shape(S, C, kind, flags, reduction)),
        sums.new_empty((S, 2, C)),
        sums.new_empty(C if ce else 0),
    )


def upstream_index(grad, S, C, kind, flags, reduction):
    """(stride_s, stride_c, first) of the upstream gradient: the gradient of term (s, c) is
    grad[s * stride_s + (c − first) * stride_c] for c >= first (the coefficients of c < first are 0).
    A scalar loss has strides 0; raises for a gradient of the wrong size."""
    if Reduction(reduction) != Reduction.NONE:
        if grad.numel() != 1:
            raise RuntimeError(
                f"fused_imbalance: the upstream gradient of a scalar Dice loss has {grad.numel()} " "elements"
            )
        return 0, 0, 0
    first = 0 if int(flags) & INCLUDE_BACKGROUND else 1
    if DiceKind(kind) == DiceKind.GENERALIZED:
        want, strides = S, (1, 0)
    else:
        want, strides = S * (C - first), (C - first, 1)
    if grad.numel() != want:
        raise RuntimeError(
            f"fused_imbalance: the upstream gradient of the per-term Dice loss has {grad.numel()} "
            f"elements for {want} terms"
        )
    return strides + (first,)


class DiceBackend(NamedTuple):
    """A backend's Dice ops: the eager functions and the registered ops (the same code). ``autograd``:
    None, or an eager call with the backend's own autograd node (the C++ one, ``csrc/cpu/autograd.cpp``),
    ``autograd(x, target, weight, ce_weight, confusion, kind, w_type, flags, params, ignore_index,
    reduction, validate) -> loss``: the forward with its finalize, the backward op in the node's backward,
    as :mod:`fused_imbalance._dice`'s formula (outside ``torch.compile``, ``torch.func``, forward-mode AD and
    a distributed all-reduce of the sums)."""

    name: str
    fwd: object
    finalize: object
    bwd: object
    fwd_op: object
    finalize_op: object
    bwd_op: object
    autograd: object = None


_loaded = {}  # name -> DiceBackend


def dice_backend(name):
    """The :class:`DiceBackend` of backend ``name`` ("triton" or "cpp"), its module imported on first
    use (the caller has checked that the backend is available: ``functional.resolve_backend``)."""
    be = _loaded.get(name)
    if be is None:
        if name == "triton":
            from . import triton_dice as source
        else:
            from . import cpp_dice as source
        be = _loaded[name] = source.backend()
    return be
