"""The Triton backend as a :class:`~fused_imbalance.ops.Backend`: the launchers of
:mod:`.triton_loss` (plain logits) and :mod:`.triton_upsample` (low-resolution logits) for eager
calls, and the ``torch.library.triton_op``\\ s around them for ``torch.compile`` (so that Inductor
sees the kernels). It never waits for the device: bad labels are returned, and the caller defers
their check (:mod:`fused_imbalance._deferred`).
"""

from . import Backend
from ._triton_host import available, recall_ema, supports, triton

__all__ = ["available", "supports", "backend"]

_backend = None
_keeps_lse = _up_keeps_lse = None  # the launchers' keeps_lse, bound with the backend


def keeps_lse(x, mode, gamma, upsampled):
    """Floats per pixel the forward keeps for its backward when asked (see the launchers)."""
    if _keeps_lse is None:
        backend()
    return (_up_keeps_lse if upsampled else _keeps_lse)(x, mode, gamma)


def backend():
    """The Triton :class:`~fused_imbalance.ops.Backend` (its modules imported on first use)."""
    global _backend, _keeps_lse, _up_keeps_lse
    if _backend is None:
        if triton is None:
            raise RuntimeError("fused_imbalance: the Triton backend needs the triton package")
        from . import triton_loss as tl_, triton_upsample as tu

        _keeps_lse, _up_keeps_lse = tl_.keeps_lse, tu.keeps_lse
        _backend = Backend(
            "triton",
            tl_._forward,
            tl_._backward,
            tl_.loss_fwd,
            tl_.loss_bwd,
            tu._forward,
            tu._backward,
            tu.upsample_loss_fwd,
            tu.upsample_loss_bwd,
            supports,
            keeps_lse,
            True,
            recall_ema,
        )
    return _backend
