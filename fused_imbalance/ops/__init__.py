"""Fused kernel backends and the contract they share.

Every loss of the package is one of a few *per-pixel* losses ℓ_n(x_n, y_n) combined with
per-class weights and a reduction. The weights and the reduction only need small per-class
vectors, so each backend implements exactly two ops over the logits:

forward  ``{backend}_loss_fwd(x, target, loss_mode, gamma, tvals, ignore_index, need_pixel_loss,
need_tp, need_confusion) -> (pixel_loss, class_loss, count, tp, bad, confusion)``

    x            logits, (N, C) or (B, C, d1, ..., dk), any float dtype, strides as described
                 by :func:`pixel_view` (contiguous NCHW, channels_last, (N, C) rows).
    target       (N_pixels,) contiguous labels, uint8/int16/int32/int64, pixel n = b * S + s.
    loss_mode    a :class:`Mode` value (not named ``mode``, which torch's dispatch machinery
                 uses for a keyword of its own).
    gamma        focal exponent (ignored by the MSE modes).
    tvals        (C,) target values of the MSE modes (the outlying labels), accumulation dtype;
                 None for the other modes.
    need_pixel_loss  return ``pixel_loss``; otherwise it is an empty (0,) tensor.
    need_tp      return ``tp``; otherwise it is an empty (0,) tensor. With ``need_confusion``
                 false as well, a backend need not compute the argmax at all.
    need_confusion   return ``confusion``; otherwise it is an empty (0, 0) tensor.

    pixel_loss   (N,) unweighted ℓ_n in the accumulation dtype, 0 at ignored or bad pixels.
    class_loss   (C,) S_c = Σ ℓ_n over valid pixels of class c, reduced in a fixed order
                 (bit-identical run to run).
    count        (C,) int64 n_c, valid pixels of class c.
    tp           (C,) int64 pixels of class c whose argmax is c.
    bad          () int64 number of labels outside [0, C) that are not ``ignore_index``;
                 those pixels count as ignored everywhere else.
    confusion    (C, C) int64 counts of this pass, row = label, column = argmax (first index
                 on ties, NaN the maximum, as ``torch.argmax``).

    No argument is mutated: the caller adds ``confusion`` into a matrix of its own (after the
    label check), so autograd registers through the public ``torch.library.register_autograd``.

backward ``{backend}_loss_bwd(x, target, grad_pixel, grad_class, loss_mode, gamma, tvals,
ignore_index) -> grad``

    grad[n, :] = (grad_pixel[n] + grad_class[y_n]) * ∂ℓ_n/∂x[n, :], 0 at ignored/bad pixels;
    either of grad_pixel (N,) / grad_class (C,) may be None (taken as 0). ``grad`` has the
    shape, dtype and memory format of ``x``. This is exactly the vector-Jacobian product of
    the forward's two float outputs, so autograd is registered once for every backend
    (:mod:`fused_imbalance.ops._autograd`).

The accumulation dtype is float64 for float64 logits and float32 otherwise.

The loss on low-resolution logits (``upsample``, DESIGN.md §10) has its own pair of ops with the
same outputs plus one (``lse``, each pixel's log-sum-exp, which the backward may take instead of
recomputing it) and two more arguments, ``interp, align_corners``: see :mod:`.upsample`.
"""
import enum

import torch


class Mode(enum.IntEnum):
    """The per-pixel loss ℓ_n a fused op computes (x = logits of one pixel, y its label)."""

    SOFTMAX_FOCAL = 0  # −(1 − p_y)^γ log p_y, p = softmax(x); γ = 0 is cross-entropy
    SIGMOID_FOCAL = 1  # Σ_k −t_k (1−q_k)^γ log q_k − (1−t_k) q_k^γ log(1−q_k), q = σ(x), t = onehot(y)
    MSE_LOGITS = 2     # ½ Σ_k (x_k − t_k)², t_k = tvals[y]·[k = y]
    MSE_SOFTMAX = 3    # ½ Σ_k (p_k − t_k)², p = softmax(x)
    STATS = 4          # no loss (pixel_loss/class_loss are 0): count, tp, bad, confusion only


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
    if x.dim() <= 2:
        return True
    dims = [(d, st) for d, st in zip(x.shape[2:], x.stride()[2:]) if d != 1]
    for (d0, s0), (d1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * d1:
            return False
    return True


def fwd_fake(x, target, need_pixel_loss, need_tp, need_confusion):
    """Empty outputs of a forward op with the contract's shapes and dtypes (the ops' fake kernels)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    C, N = x.shape[1], target.numel()
    i64 = torch.int64
    return (x.new_empty(N if need_pixel_loss else 0, dtype=acc), x.new_empty(C, dtype=acc),
            x.new_empty(C, dtype=i64), x.new_empty(C if need_tp else 0, dtype=i64), x.new_empty((), dtype=i64),
            x.new_empty((C, C) if need_confusion else (0, 0), dtype=i64))
