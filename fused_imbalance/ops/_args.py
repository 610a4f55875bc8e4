"""The size, layout and device checks of the Triton ops' tensor arguments, made before any launch.

A kernel indexes its arguments with the sizes of ``x`` and ``target`` and reads ``x`` through one
pixel stride, so a wrong-sized ``target``, ``weight``, ``tvals``, ``confusion``, ``grad`` or
``scale``, or logits whose spatial dims do not collapse, would be read out of bounds on the device
rather than be an error. The C++ ops make the same checks in ``csrc/cpu/`` (``check_inputs``,
``mse_tvals``, ``class_vector``, ``checked_confusion``, ``upstream``). The functional API always
passes the right sizes and calls the launchers directly; these guard calls of the registered
``torch.ops.fused_imbalance`` ops. Errors are ``RuntimeError``s, as the C++ ops' are.
"""

import torch

from . import Mode, Weighting, collapsible


def check_tensor_args(
    op,
    x,
    target,
    pixels,
    mode,
    tvals=None,
    weight=None,
    weighting=None,
    confusion=None,
    grad=None,
    scale=None,
):
    """Raise unless the tensors fit logits ``x`` with ``pixels`` labels in mode ``mode``: ``pixels``
    None for the plain ops (one label per pixel of ``x``), target.numel() for the upsampled ones
    (whose launchers check the shapes and take any layout). ``op`` names the op in the message."""

    def fail(message):
        raise RuntimeError(f"fused_imbalance: {op}: {message}")

    if x.dim() < 2 or x.shape[1] < 1:
        fail(f"logits must be (N, C) or (B, C, ...) with C >= 1, got shape {tuple(x.shape)}")
    plain = pixels is None  # the plain ops read x through one pixel stride and target as it lies
    if plain:
        pixels = x.shape[0]
        for d in x.shape[2:]:
            pixels *= d
        if not collapsible(x):
            fail(
                f"logits of shape {tuple(x.shape)} and strides {x.stride()} do not collapse into one pixel "
                "stride: pass them .contiguous()"
            )
    C = x.shape[1]
    if target.numel() != pixels or target.device != x.device or (plain and not target.is_contiguous()):
        fail(
            f"target must be {pixels} {'contiguous ' if plain else ''}labels on {x.device}, got "
            f"{target.numel()} ({'contiguous' if target.is_contiguous() else 'not contiguous'}) on {target.device}"
        )
    if int(mode) in (Mode.MSE_LOGITS, Mode.MSE_SOFTMAX) and (
        tvals is None or tvals.numel() != C or tvals.device != x.device or not tvals.is_contiguous()
    ):
        fail(
            f"the MSE modes need tvals with one value per class ({C}, contiguous, on {x.device}), got "
            + ("None" if tvals is None else f"{tvals.numel()} on {tvals.device}")
        )
    if weighting is not None and int(weighting) in (Weighting.GENERAL, Weighting.PAPER) and weight is None:
        fail("this weighting needs class weights")
    for name, t in (("weight", weight), ("scale", scale)):
        if t is not None and (t.dim() != 1 or t.numel() != C or t.device != x.device):
            fail(f"{name} must be a ({C},) tensor on {x.device}, got shape {tuple(t.shape)} on {t.device}")
    if confusion is not None and (
        confusion.shape != (C, C)
        or confusion.dtype != torch.int64
        or confusion.device != x.device
        or not confusion.is_contiguous()
    ):
        fail(
            f"confusion must be a contiguous ({C}, {C}) int64 tensor on {x.device}, got {tuple(confusion.shape)} "
            f"{confusion.dtype} on {confusion.device}"
        )
    if grad is not None and (grad.numel() not in (1, pixels) or grad.device != x.device):
        fail(
            f"grad must hold one value, or one per pixel ({pixels}), on {x.device}, got {grad.numel()} on "
            f"{grad.device}"
        )
