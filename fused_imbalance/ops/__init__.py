"""Fused kernel backends and the contract they share.

Every loss of the package is one of a few *per-pixel* losses ℓ_n(x_n, y_n) combined with
per-class weights and a reduction. Each backend implements two ops over the logits, and their
twins on low-resolution logits (``upsample``, :mod:`.upsample`). A backend is a :class:`Backend`
holding both the registered ``torch.library`` ops (what a ``torch.compile`` graph calls) and the
plain functions behind them (what an eager call runs, without the dispatcher's layers): the two
run the same launchers, so they give bit-identical results. The Dice family, a function of per-class
sums rather than a sum of per-pixel losses, has ops and a contract of its own (:mod:`.dice`).

forward ``{backend}_loss_fwd(x, target, weight, tvals, confusion, loss_mode, gamma, ignore_index,
reduction, weighting, need_tp, validate, need_lse) -> (loss, scale, count, tp, bad, lse)``

    x            logits, (N, C) or (B, C, d1, ..., dk), any float dtype, strides as described
                 by :func:`pixel_view` (contiguous NCHW, channels_last, (N, C) rows).
    target       N_pixels contiguous labels (any shape: (N_pixels,), (B, d1, ..., dk)), uint8/int16/int32/int64,
                 read flat: pixel n = b * S + s.
    weight       (C,) class weights in the accumulation dtype (``weighting`` 1 and 2), else None.
    tvals        (C,) target values of the MSE modes (the outlying labels), accumulation dtype;
                 None for the other modes.
    confusion    None, or the caller's (C, C) int64 contiguous matrix: the pass adds its confusion
                 counts (row = label, column = argmax: first index on ties, NaN the maximum, as
                 ``torch.argmax``) of the valid pixels into it. The only argument an op mutates.
    loss_mode    a :class:`Mode` (not named ``mode``, a keyword torch's dispatch machinery uses).
    gamma        focal exponent (ignored by the MSE modes).
    reduction    a :class:`Reduction`: the loss is () for MEAN and SUM, the per-pixel loss (N,)
                 for NONE (weighted, 0 at pixels that are not valid), the per-class sums
                 S_c = Σ_{y_n = c} ℓ_n (C,) for CLASS (the caller weights them).
    weighting    a :class:`Weighting`: the class weights w and the mean's denominator D
                 (docs/DESIGN.md §2): NONE w = 1; GENERAL ``weight``, D = Σ_n w_{y_n}; PAPER ``weight``,
                 D = N_valid; RECALL w_c = 1 − TP_c / n_c of this pass (1 for an absent class),
                 D = N_valid. A zero D divides by 1 (loss 0, gradient 0).
    need_tp      return ``tp``; otherwise it is an empty (0,) tensor (RECALL computes it anyway).
    validate     the C++ backend raises a ``ValueError`` naming a bad label before it touches
                 ``confusion``; the Triton backend only counts them (its caller defers the check,
                 :mod:`fused_imbalance._deferred`, so that no step waits for the device).
    need_lse     keep what the backward may take instead of recomputing it (``lse``): the
                 backend decides per launch (:attr:`Backend.keeps_lse`); autograd asks for it
                 when it will differentiate the call.

    loss         as ``reduction`` says, in the accumulation dtype.
    scale        (C,) accumulation dtype: the backward's per-class factor, d(loss)/dℓ_n = scale[y_n]
                 for MEAN (w_c / D), SUM and NONE (w_c); the weights w_c for CLASS.
    count        (C,) int64 n_c, valid pixels of class c.
    tp           (C,) int64 pixels of class c whose argmax is c (or (0,), see need_tp).
    bad          (2,) int64: the number of labels outside [0, C) that are not ``ignore_index``
                 (those pixels count as ignored everywhere else) and the largest of them.
    lse          (k·N,) what the forward kept for the backward, or (0,).

    Every sum has a fixed order (bit-identical run to run); integer counts are exact in any order.

backward ``{backend}_loss_bwd(x, target, grad, scale, tvals, lse, loss_mode, gamma, ignore_index) -> dx``

    dx[n, :] = g_n · scale[y_n] · ∂ℓ_n/∂x[n, :], 0 at ignored or bad pixels, where g_n is ``grad``
    (the upstream gradient: one element for a scalar loss, read on the device; (N,) for a per-pixel
    one) or 1 when None, and ``scale`` the forward's (or, for CLASS, the upstream gradient of the
    per-class sums) or 1 when None. ``dx`` has the shape, dtype and memory format of ``x``.

moving average ``recall_ema(sums, count, tp, running, seen, weight, reduction) -> (loss, scale)``
(:attr:`Backend.recall_ema`; eager calls only, a compiled graph traces ``RecallLoss``'s torch operations)

    From a CLASS forward's per-class sums S_c and its count and tp, ``RecallLoss``'s running recall R̄
    (``running``, (C,) float32 or float64) and ``seen`` ((C,) bool), both updated in place: for each class
    present (n_c > 0) R̄_c ← lerp(R̄_c, TP_c / n_c, ``weight``) (``weight`` = 1 − momentum; TP_c / n_c
    itself where not yet seen), seen_c ← True; then w_c = 1 − R̄_c, ``loss`` = Σ_c w_c S_c (MEAN: over
    D = max(Σ_c n_c, 1)), ``scale`` (C,) = w_c (MEAN: w_c / D), the backward's factor for the scalar
    upstream gradient. One small launch; ``reduction`` MEAN or SUM.

The accumulation dtype is float64 for float64 logits and float32 otherwise.
"""

import enum
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


def acc_dtype(x):
    """The accumulation dtype of logits ``x``: float64 for float64, float32 for everything else."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class Mode(enum.IntEnum):
    """The per-pixel loss ℓ_n a fused op computes (x = logits of one pixel, y its label)."""

    SOFTMAX_FOCAL = 0  # −(1 − p_y)^γ log p_y, p = softmax(x); γ = 0 is cross-entropy
    SIGMOID_FOCAL = 1  # Σ_k −t_k (1−q_k)^γ log q_k − (1−t_k) q_k^γ log(1−q_k), q = σ(x), t = onehot(y)
    MSE_LOGITS = 2  # ½ Σ_k (x_k − t_k)², t_k = tvals[y]·[k = y]
    MSE_SOFTMAX = 3  # ½ Σ_k (p_k − t_k)², p = softmax(x)
    STATS = 4  # no loss: count, tp, bad, confusion only


class Reduction(enum.IntEnum):
    """What the forward op returns as ``loss``."""

    MEAN = 0  # Σ_n w_{y_n} ℓ_n / D, a scalar
    SUM = 1  # Σ_n w_{y_n} ℓ_n, a scalar
    NONE = 2  # w_{y_n} ℓ_n, (N,)
    CLASS = 3  # S_c = Σ_{y_n = c} ℓ_n, (C,): the caller weights them (weights from a callable)

    @classmethod
    def of(cls, name):
        return _REDUCTIONS[name]


_REDUCTIONS = {"mean": Reduction.MEAN, "sum": Reduction.SUM, "none": Reduction.NONE}


class Weighting(enum.IntEnum):
    """The class weights of the forward op and the denominator of its mean (docs/DESIGN.md §2)."""

    NONE = 0  # w = 1
    GENERAL = 1  # the given weights, mean over Σ_n w_{y_n} (as torch's cross_entropy)
    PAPER = 2  # the given weights, mean over the valid pixels (the paper losses)
    RECALL = 3  # w_c = 1 − TP_c / n_c of this pass, mean over the valid pixels (the recall loss)


class FwdOut(NamedTuple):
    """The forward op's outputs (see the contract above)."""

    loss: torch.Tensor
    scale: torch.Tensor
    count: torch.Tensor
    tp: torch.Tensor
    bad: torch.Tensor
    lse: torch.Tensor


class Backend(NamedTuple):
    """A fused backend: its name, the eager functions and the registered ops of the plain and the
    upsampled loss (the ops call the same functions), and what it supports.

    ``keeps_lse(x, mode, gamma, upsampled) -> int``: floats per pixel its forward keeps for the
    backward when asked (``need_lse``). ``defers_validation``: bad labels are returned, not raised
    (see the contract's ``validate``). ``recall_ema``: the moving average of ``RecallLoss`` (above).
    ``autograd``: None, or an eager call of the plain or upsampled loss whose autograd node is the
    backend's own (the C++ backend's, ``csrc/cpu/autograd.cpp``): ``autograd(x, target, interp,
    align_corners, weight, tvals, confusion, mode, gamma, ignore_index, reduction, weighting, need_tp,
    validate, running, seen, ema_weight, ema_reduction) -> (loss, count, tp, bad)``, ``interp`` −1 for
    the plain loss, ``ema_reduction`` −1 without ``RecallLoss``'s moving average (else the average's
    buffers, 1 − momentum and reduction, applied to the per-class sums as :func:`recall_ema`). It is the
    formula of :mod:`fused_imbalance._fused` calling the same functions, for calls outside
    ``torch.compile``, ``torch.func`` and forward-mode AD.
    """

    name: str
    fwd: object
    bwd: object
    fwd_op: object
    bwd_op: object
    up_fwd: object
    up_bwd: object
    up_fwd_op: object
    up_bwd_op: object
    supports: object
    keeps_lse: object
    defers_validation: bool
    recall_ema: object
    autograd: object = None


def pixel_view(x):
    """(B, C, S, stride_b, stride_c, stride_s) of logits ``x`` seen as B × C × S pixels.

    (N, C) rows are B = N, S = 1. For (B, C, d1..dk) the spatial dims must collapse into one
    stride (true for contiguous NCHW, channels_last and channels_last_3d); the caller makes
    other layouts contiguous first (:func:`collapsible`).
    """
    B, C = x.shape[0], x.shape[1]
    if x.dim() == 2:
        return B, C, 1, x.stride(0), x.stride(1), 1
    S = 1
    for d in x.shape[2:]:
        S *= d
    ss = x.stride(-1)
    for d, st in zip(reversed(x.shape[2:]), reversed(x.stride()[2:])):
        if d != 1:
            ss = st
            break
    return B, C, S, x.stride(0), x.stride(1), ss


def collapsible(x):
    """True when the spatial dims of ``x`` (dims 2..) can be read with one stride."""
    if x.dim() <= 2 or x.is_contiguous():  # the common cases first: one call, no loop
        return True
    dims = [(d, st) for d, st in zip(x.shape[2:], x.stride()[2:]) if d != 1]
    for (d0, s0), (d1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * d1:
            return False
    return True


def fwd_fake(x, target, reduction, need_tp, lse_floats):
    """Empty outputs of a forward op with the contract's shapes and dtypes (the ops' fake kernels)."""
    acc = acc_dtype(x)
    C, N = x.shape[1], target.numel()
    i64 = torch.int64
    reduction = Reduction(reduction)
    shape = (N,) if reduction == Reduction.NONE else (C,) if reduction == Reduction.CLASS else ()
    return (
        x.new_empty(shape, dtype=acc),
        x.new_empty(C, dtype=acc),
        x.new_empty(C, dtype=i64),
        x.new_empty(C if need_tp else 0, dtype=i64),
        x.new_empty(2, dtype=i64),
        x.new_empty(N * lse_floats, dtype=acc),
    )
