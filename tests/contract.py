"""The op contract of ``fused_imbalance.ops`` computed from the reference: what a backend's forward and
backward must return, for the op-level tests of every backend.

The oracle computes in ``x``'s dtype (its accumulation dtype for 16-bit logits): pass ``x.double()``
for a float64 oracle.

``forward``/``grad`` are the contract itself. ``per_pixel_and_class`` runs a backend's forward twice
(``"none"`` and the per-class sums, without weights) and returns what the per-pixel tests compare:
(pixel_loss, class_loss, count, tp, bad count, confusion counts).
"""

import torch

import fused_imbalance.reference as R
from fused_imbalance.ops import Mode, Reduction, Weighting, acc_dtype


def _labels(x, y):
    """Labels shaped like the target of ``x``, from that shape or flattened to (N,)."""
    return y.reshape((x.shape[0],) + tuple(x.shape[2:]))


def pixel_loss(x, y, mode, gamma, tvals, ignore):
    """The reference's per-pixel loss ℓ_n (0 at ignored and bad pixels), flattened to (N,)."""
    y = _labels(x, y)
    kw = dict(ignore_index=ignore, reduction="none", validate=False)
    if mode == Mode.SOFTMAX_FOCAL:
        out = R.focal_loss(x, y, gamma, **kw)
    elif mode == Mode.SIGMOID_FOCAL:
        out = R.sigmoid_focal_loss(x, y, gamma, **kw)
    elif mode in (Mode.MSE_LOGITS, Mode.MSE_SOFTMAX):
        out = R.mse_outlying_loss(
            x, y, tvals.to(x.device), input="logits" if mode == Mode.MSE_LOGITS else "softmax", **kw
        )
    else:
        out = torch.zeros(y.shape, dtype=acc_dtype(x), device=x.device) + 0 * x.sum()
    return out.reshape(-1)


def _valid(x, y, ignore):
    C = x.shape[1]
    yl = y.reshape(-1).long()
    return yl, (yl != ignore) & (yl >= 0) & (yl < C)


def weights_of(x, y, weight, weighting, ignore):
    """The class weights of a weighting (the recall loss's from the batch's statistics)."""
    C = x.shape[1]
    acc = acc_dtype(x)
    if weighting in (Weighting.GENERAL, Weighting.PAPER):
        return weight.to(acc)
    if weighting == Weighting.RECALL:
        count, tp = R.class_stats(x, _labels(x, y), ignore, validate=False)
        return R.recall_weights(count, tp).to(acc)
    return torch.ones(C, dtype=acc, device=x.device)


def forward(x, y, weight, tvals, mode, gamma, ignore, reduction, weighting):
    """(loss, scale, count, tp, bad count, confusion) of the contract's forward, ``y`` shaped like the
    target or flattened."""
    C = x.shape[1]
    y = _labels(x, y)
    pl = pixel_loss(x, y, mode, gamma, tvals, ignore)
    yl, valid = _valid(x, y, ignore)
    w = weights_of(x, y, weight, weighting, ignore)
    wy = torch.where(valid, w[yl.clamp(0, C - 1)], torch.zeros_like(pl))
    class_loss = torch.zeros(C, dtype=pl.dtype, device=x.device).index_add_(0, yl[valid], pl[valid])
    count, tp = R.class_stats(x, y, ignore, validate=False)
    conf = R.confusion_matrix(x, y, ignore, validate=False)
    bad = ((yl != ignore) & ~((yl >= 0) & (yl < C))).sum()
    present = count > 0
    if weighting == Weighting.GENERAL:
        denom = torch.where(present, w.double() * count.double(), torch.zeros_like(w.double())).sum()
    else:
        denom = count.double().sum()
    denom = denom.to(pl.dtype)
    denom = torch.where(denom != 0, denom, torch.ones_like(denom))
    total = torch.where(present, w * class_loss, torch.zeros_like(class_loss)).sum()
    if reduction == Reduction.MEAN:
        loss, scale = total / denom, w / denom
    elif reduction == Reduction.SUM:
        loss, scale = total, w
    elif reduction == Reduction.NONE:
        loss, scale = pl * wy, w
    else:
        loss, scale = class_loss, None
    return loss, scale, count, tp, bad, conf


def grad(x, y, up, scale, mode, gamma, tvals, ignore=-100):
    """The contract's backward: Σ_n g_n scale[y_n] ∂ℓ_n/∂x by autograd of the reference, g_n the
    upstream ``up`` (a scalar, (N,), or None for 1) and ``scale`` (C,) or None for 1."""
    C = x.shape[1]
    xr = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    pl = pixel_loss(xr, y, mode, gamma, tvals, ignore)
    yl = y.reshape(-1).long().clamp(0, C - 1)  # the loss is 0 at ignored and bad pixels
    w = torch.ones_like(pl)
    if up is not None:
        w = w * up.to(pl.dtype).reshape(-1) if up.numel() > 1 else w * up.to(pl.dtype).reshape(())
    if scale is not None:
        w = w * scale.to(pl.dtype)[yl]
    (g,) = torch.autograd.grad(pl, xr, w, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def per_pixel_and_class(
    fwd, x, target, mode, gamma, tvals, ignore, need_tp=True, need_confusion=True, geo=()
):
    """A backend forward's per-pixel and per-class losses without weights, from two calls (``"none"``
    and the per-class sums): (pixel_loss, class_loss, count, tp, bad count, confusion or None). Both
    calls must agree on the statistics."""
    C = x.shape[1]
    conf = torch.zeros(C, C, dtype=torch.int64, device=x.device) if need_confusion else None
    pl, _, count, tp, bad, _ = fwd(
        x,
        target,
        *geo,
        None,
        tvals,
        None,
        int(mode),
        gamma,
        ignore,
        int(Reduction.NONE),
        int(Weighting.NONE),
        need_tp,
        False,
        False,
    )
    cl, _, count2, tp2, bad2, _ = fwd(
        x,
        target,
        *geo,
        None,
        tvals,
        conf,
        int(mode),
        gamma,
        ignore,
        int(Reduction.CLASS),
        int(Weighting.NONE),
        need_tp,
        False,
        False,
    )
    assert torch.equal(count, count2) and torch.equal(tp, tp2) and torch.equal(bad, bad2)
    assert bad.shape == (2,) and bad.dtype == torch.int64
    return pl, cl, count, tp, bad[0], conf
