"""The C++ backend's Dice ops (``csrc/cpu/dice_cpu.cpp``): ``fused_imbalance::cpp_dice_fwd``,
``cpp_dice_finalize`` and ``cpp_dice_bwd``, with the contract of :mod:`.dice`. An eager call runs the
module's functions (``_C.dice_fwd`` ...: the same C++ functions as the ops, through pybind11); a
``torch.compile`` graph calls the registered ops, whose fake kernels are here."""

import torch

from . import cpp
from .dice import DiceBackend, finalize_fake, fwd_fake

__all__ = ["backend"]

_backend = None


def backend():
    """The C++ :class:`~.dice.DiceBackend` (the C++ backend must be available: ``cpp.available()``)."""
    global _backend
    if _backend is None:
        cpp.backend()  # loads the extension (or raises why it cannot)
        from fused_imbalance import _C

        @torch.library.register_fake("fused_imbalance::cpp_dice_fwd")
        def _(
            x,
            target,
            weight,
            ce_weight,
            confusion,
            kind,
            w_type,
            flags,
            params,
            ignore_index,
            reduction,
            validate,
            finalize,
        ):
            return fwd_fake(x, target, kind, flags, reduction, finalize)

        @torch.library.register_fake("fused_imbalance::cpp_dice_finalize")
        def _(sums, weight, ce_weight, kind, w_type, flags, params, reduction, grad_scale):
            return finalize_fake(sums, kind, flags, reduction)

        @torch.library.register_fake("fused_imbalance::cpp_dice_bwd")
        def _(x, target, coef, ce_scale, grad, kind, flags, ignore_index, reduction):
            return torch.empty_like(x)

        ops = torch.ops.fused_imbalance
        _backend = DiceBackend(
            "cpp",
            _C.dice_fwd,
            _C.dice_finalize,
            _C.dice_bwd,
            ops.cpp_dice_fwd.default,
            ops.cpp_dice_finalize.default,
            ops.cpp_dice_bwd.default,
            _C.dice_autograd,
        )
    return _backend
