"""The kernel contract of ``fused_imbalance.ops`` computed from the reference: what a backend's raw
``loss_fwd`` / ``loss_bwd`` must return, for the op-level tests of every backend.

The oracle computes in ``x``'s dtype (its accumulation dtype for 16-bit logits): pass
``x.double()`` for a float64 oracle.
"""
import torch

import fused_imbalance.reference as R
from fused_imbalance.ops import Mode


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
        out = R.mse_outlying_loss(x, y, tvals.to(x.device), input="logits" if mode == Mode.MSE_LOGITS else "softmax",
                                  **kw)
    else:
        out = torch.zeros(y.shape, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                          device=x.device) + 0 * x.sum()
    return out.reshape(-1)


def forward(x, y, mode, gamma, tvals, ignore=-100):
    """(pixel_loss, class_loss, count, tp, bad, confusion) of the contract's forward; ``y`` shaped
    like the target or flattened."""
    C = x.shape[1]
    y = _labels(x, y)
    pl = pixel_loss(x, y, mode, gamma, tvals, ignore)
    yl = y.reshape(-1).long()
    valid = (yl != ignore) & (yl >= 0) & (yl < C)
    class_loss = torch.zeros(C, dtype=pl.dtype, device=x.device).index_add_(0, yl[valid], pl[valid])
    count, tp = R.class_stats(x, y, ignore, validate=False)
    conf = R.confusion_matrix(x, y, ignore, validate=False)
    bad = ((yl != ignore) & ~((yl >= 0) & (yl < C))).sum()
    return pl, class_loss, count, tp, bad, conf


def grad(x, y, grad_pixel, grad_class, mode, gamma, tvals, ignore=-100):
    """The contract's backward: Σ_n (grad_pixel[n] + grad_class[y_n]) ∂ℓ_n/∂x, by autograd of the
    reference; either upstream may be None."""
    C = x.shape[1]
    xr = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    pl = pixel_loss(xr, y, mode, gamma, tvals, ignore)
    yl = y.reshape(-1).long().clamp(0, C - 1)  # the loss is 0 at ignored and bad pixels
    up = torch.zeros_like(pl)
    if grad_pixel is not None:
        up = up + grad_pixel.to(pl.dtype)
    if grad_class is not None:
        up = up + grad_class.to(pl.dtype)[yl]
    (g,) = torch.autograd.grad(pl, xr, up, allow_unused=True)
    return torch.zeros_like(x) if g is None else g
