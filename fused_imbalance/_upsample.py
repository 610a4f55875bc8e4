"""The ``upsample`` option of the losses and statistics (docs/DESIGN.md §10): argument checks,
backend choice and the fused ops' call, kept apart from :mod:`.functional`.

With ``upsample="bilinear" | "nearest"`` the logits are (B, C, h, w) and the target (B, H, W);
the result is that of ``F.interpolate(logits, size=(H, W), mode=upsample,
align_corners=align_corners)`` followed by the loss, computed without the interpolated tensor by
the ops of :mod:`.ops.upsample`.
"""

from typing import NamedTuple, Optional


from . import reference as _ref
from ._checks import check_options as check_loss_options
from ._checks import check_types
from .ops.upsample import Interp

MODES = ("bilinear", "nearest")


class Resize(NamedTuple):
    mode: str
    align_corners: bool
    size: tuple

    @property
    def interp(self):
        return int(Interp.NEAREST if self.mode == "nearest" else Interp.BILINEAR)


def check_options(upsample, align_corners):
    """The ``upsample`` and ``align_corners`` options alone (modules check them at construction).
    ``align_corners=None`` is False, as in ``F.interpolate`` (where None is the default)."""
    if align_corners is None:
        align_corners = False
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners must be a bool or None, got {align_corners!r}")
    if upsample is None:
        if align_corners:
            raise ValueError("align_corners=True needs upsample='bilinear'")
        return
    if upsample not in MODES:
        raise ValueError(f"upsample must be None, 'bilinear' or 'nearest', got {upsample!r}")
    if upsample == "nearest" and align_corners:
        raise ValueError("align_corners=True only applies to upsample='bilinear' (as in F.interpolate)")


def check(logits, target, upsample, align_corners, ignore_index=-100, reduction="mean") -> Optional[Resize]:
    """Check the inputs of a call with ``upsample``; None when ``upsample`` is None (the caller
    then checks as usual). A bad combination is a ValueError or TypeError, never a silent
    interpretation."""
    check_options(upsample, align_corners)
    if upsample is None:
        return None
    align_corners = bool(align_corners)
    check_types(logits, target)
    if logits.dim() != 4:
        raise ValueError(
            f"upsample needs 2-D images: logits (B, C, h, w), got shape {tuple(logits.shape)} "
            f"(volumes and 1-D signals are not supported)"
        )
    B, C, h, w = logits.shape
    if target.dim() != 3 or target.shape[0] != B:
        raise ValueError(
            f"with upsample, target must be (B, H, W) = ({B}, H, W) for logits {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if C < 1 or h < 1 or w < 1 or target.shape[1] < 1 or target.shape[2] < 1:
        raise ValueError(
            f"upsample needs C, h, w, H, W >= 1: logits {tuple(logits.shape)}, "
            f"target {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    check_loss_options(ignore_index, reduction)
    return Resize(upsample, align_corners, (int(target.shape[1]), int(target.shape[2])))


def reference_logits(logits, rs):
    """The interpolated logits the reference backend computes the loss of."""
    return _ref.upsampled(logits, rs.size, rs.mode, rs.align_corners)
