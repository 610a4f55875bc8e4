"""The Triton OHEM cross-entropy: ``fused_imbalance::triton_ohem_fwd`` / ``triton_ohem_bwd`` (the contract
of :mod:`.ohem`; docs/DESIGN.md §13), built on the cross-entropy launchers of :mod:`.triton_loss` (plain logits)
and :mod:`.triton_upsample` (low-resolution logits) and on the exact selection of :mod:`.triton_select`.

**Forward**, launches in order (N pixels, ``P`` persistent programs of the O(N) kernels):

1. the cross-entropy pass of the loss launcher with the per-pixel output, ℓ_n = −log p_n (0 where not
   valid), the confusion counts and the bad labels, and its finalize launch (the plain launcher beyond 32
   classes adds no class-sum launch: a per-pixel output has no class sums);
2. a zero-fill of the selection's scratch (int64, a few hundred elements);
3. ``_ohem_prob_kernel``: p_n = exp(−ℓ_n) at valid pixels, −1 elsewhere (``pn``, kept for the backward),
   ℓ_n ← w_{y_n} ℓ_n in place with class weights, the histogram of the first radix digit of the valid
   p_n added into the selection's scratch, and the rank stored on the device;
4. the selection's remaining passes over ``pn`` (:func:`.triton_select.launch_passes`: 3 histogram
   passes and a one-program final launch for float32, 7 and 1 for float64): the exact rank-th smallest
   valid p_n, ties included, the rank clamped to n_valid − 1 there;
5. ``_ohem_kept_kernel``: threshold = max(that value, thresh) (NaN when it is NaN), and per program the
   sum and the number of the kept pixels (p_n < threshold, strictly; "none": ℓ_n zeroed in place at the
   pixels not kept, which is then the output);
6. ``_ohem_finalize_kernel`` (mean and sum): the programs' rows added in a fixed order, the loss and the
   backward's factor (1 / kept pixels, or 1 / N for the mmseg mean; 0 when nothing is kept).

That is 10 launches for float32 logits (a mean or a sum; 9 for "none"), 14 for float64; nothing waits for
the host, and the launches do not depend on the data.

**Backward**: ``_ohem_factor_kernel`` writes each pixel's upstream factor g_n (the upstream gradient times
the factor at the pixels kept by the stored p_n and threshold, 0 elsewhere; O(N)), then the loss
launcher's backward with it and the class weights: one read of the logits, one write of the gradient. 2
launches (the upsampled backward's coefficient launch where it has one).

Bytes beyond the cross-entropy's (4-byte float32 values): ℓ_n written by the loss pass and read by the
prob and kept passes (12 per pixel), p_n written once and read by 3 selection passes, the kept pass and
the factor kernel (24), g_n written and read (8): about 44 bytes per pixel, against 3·C·s bytes of logits
(228 for 19 float32 classes). Every sum has a fixed order; counts are integers: deterministic.
"""

from typing import Optional

import torch

from . import Mode, Reduction, Weighting, acc_dtype
from ._args import check_tensor_args
from ._triton_host import _cdiv, _dummy, _interpret, _np2, _on_device, _sms, grad_arg

try:
    import triton
    import triton.language as tl

    from . import triton_loss, triton_select, triton_upsample
    from ._triton_compat import wrap
    from .triton_common import (
        acc_gamma,
        i64,
        load_labels,
    )
    from .triton_select import FIRST_BINS, select_first_digit
except ImportError:  # the package works without triton; this backend is then unavailable
    triton = None

__all__ = ["ohem_fwd", "ohem_bwd"]

_BLOCK = 1024  # pixels per tile of the O(N) kernels
_WARPS = 4
_PROGRAMS_PER_SM = 4  # persistent programs of the O(N) kernels: enough loads in flight
_INTERPRET_BLOCK = 2048  # the interpreter pays per tile and per program: larger tiles, few programs
_INTERPRET_PROGRAMS = 3


def _block(device):
    return _INTERPRET_BLOCK if _interpret() and device.type != "cuda" else _BLOCK


def _plan(N, device):
    """(programs, block) of a persistent O(N) launch."""
    block = _block(device)
    cap = _sms(device) * _PROGRAMS_PER_SM if device.type == "cuda" else _INTERPRET_PROGRAMS
    return max(1, min(_cdiv(N, block), cap)), block


if triton is not None:
    _BINS = tl.constexpr(FIRST_BINS)  # bins of the selection's first digit

    @triton.jit
    def _ohem_prob_kernel(
        pl_ptr,  # (N,) per-pixel −log p_n, 0 where not valid, accumulation dtype: times w_{y_n} in place (WEIGHTED)
        t_ptr,  # (N,) labels, any integer dtype
        w_ptr,  # (C,) class weights, accumulation dtype (WEIGHTED)
        p_ptr,  # (N,) out: p_n = exp(−ℓ_n) at valid pixels, −1 elsewhere
        work_ptr,  # the selection's zeroed int64 scratch: the first digits' histogram is added at offset 0
        k_ptr,  # () int64 out: the rank, stored by program 0
        rank,  # the rank to select (clamped to n_valid − 1 by the selection)
        N,
        C,
        ignore_index,
        WEIGHTED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        if pid == 0:
            tl.store(k_ptr, i64(rank))
        counts = tl.zeros([_BINS], tl.int32)  # fewer than 2**31 pixels per program
        lanes = tl.arange(0, BLOCK)
        for start in range(pid.to(tl.int64) * BLOCK, N, nprog * BLOCK):  # int64: N can exceed 2**31
            n = start + lanes
            inside = n < N
            valid, bad, y32, badv = load_labels(t_ptr, n, inside, ignore_index, C, 0)
            loss = tl.load(pl_ptr + n, mask=inside, other=0.0)
            p = tl.where(valid, tl.exp(-loss), -1.0)
            tl.store(p_ptr + n, p, mask=inside)
            if WEIGHTED:
                w = tl.load(w_ptr + y32, mask=valid, other=0.0).to(loss.dtype)
                tl.store(pl_ptr + n, loss * w, mask=valid)
            digit, ok = select_first_digit(p)
            counts += tl.histogram(digit, _BINS, mask=valid & ok)
        bins = tl.arange(0, _BINS)
        tl.atomic_add(work_ptr + bins, counts.to(tl.int64), mask=counts != 0, sem="relaxed")

    @triton.jit
    def _ohem_kept_kernel(
        p_ptr,  # (N,) p_n, −1 where not valid
        pl_ptr,  # (N,) the (weighted) per-pixel loss; with CLEAR set to 0 in place at the pixels not kept
        sel_ptr,  # () the rank-th smallest valid p_n (0 when none is valid)
        aux_ptr,  # (2,) out: the threshold (program 0), and the backward's factor 1 (UNIT)
        srow_ptr,  # (programs,) out: each program's sum of the kept losses, accumulation dtype
        crow_ptr,  # (programs,) int64 out: each program's number of kept pixels
        thresh,
        thresh64: tl.float64,  # the threshold's floor, twice (see triton_common.acc_gamma)
        N,
        CLEAR: tl.constexpr,  # reduction "none": the output is pl, zero where not kept
        UNIT: tl.constexpr,  # the backward's factor is 1 (sum, none): stored here, no finalize
        BLOCK: tl.constexpr,
    ):
        acc_ty = pl_ptr.dtype.element_ty
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        sel = tl.load(sel_ptr)
        floor = acc_gamma(thresh, thresh64, acc_ty)
        # max(p_k, thresh) as the reference's clamp: NaN stays NaN (and keeps nothing)
        thr = tl.where(sel != sel, sel, tl.maximum(sel, floor))
        if pid == 0:
            tl.store(aux_ptr, thr)
            if UNIT:
                tl.store(aux_ptr + 1, tl.full((), 1.0, acc_ty))
        total = tl.zeros([BLOCK], acc_ty)
        kept_n = tl.zeros([BLOCK], tl.int32)  # fewer than 2**31 pixels per lane
        lanes = tl.arange(0, BLOCK)
        for start in range(pid.to(tl.int64) * BLOCK, N, nprog * BLOCK):
            n = start + lanes
            inside = n < N
            p = tl.load(p_ptr + n, mask=inside, other=-1.0)
            kept = (p >= 0.0) & (p < thr)  # −1: not valid; NaN is never below
            # selected, not multiplied: a pixel left out may have an infinite (or, weighted, NaN) loss
            v = tl.where(kept, tl.load(pl_ptr + n, mask=inside & kept, other=0.0), 0.0)
            if CLEAR:
                tl.store(pl_ptr + n, v, mask=inside)
            total += v
            kept_n += kept.to(tl.int32)
        tl.store(srow_ptr + pid, tl.sum(total, 0))
        tl.store(crow_ptr + pid, tl.sum(kept_n.to(tl.int64), 0))

    @triton.jit
    def _ohem_finalize_kernel(
        srow_ptr,  # (R,) the programs' sums of the kept losses
        crow_ptr,  # (R,) int64 the programs' kept pixels
        loss_ptr,  # () out: the loss
        aux_ptr,  # (2,): out at 1, the backward's factor d(loss)/dℓ_n of a kept pixel
        R,  # rows
        n_all,  # pixels in all (the mmseg mean's denominator)
        MEAN: tl.constexpr,  # the mean (else the sum)
        MEAN_ALL: tl.constexpr,  # the mean over every pixel (mmseg), else over the kept ones (HRNet)
        BR: tl.constexpr,  # a power of two >= R
    ):
        acc_ty = srow_ptr.dtype.element_ty
        r = tl.arange(0, BR)
        total = tl.sum(tl.load(srow_ptr + r, mask=r < R, other=0.0), 0)
        if MEAN:
            if MEAN_ALL:
                den = i64(n_all)
            else:
                den = tl.sum(tl.load(crow_ptr + r, mask=r < R, other=0), 0)
            d = tl.maximum(den, 1).to(acc_ty)
            # nothing kept (or no pixel): loss 0, gradient 0
            tl.store(loss_ptr, tl.where(den > 0, total / d, 0.0))
            tl.store(aux_ptr + 1, tl.where(den > 0, 1.0 / d, 0.0))
        else:
            tl.store(loss_ptr, total)
            tl.store(aux_ptr + 1, tl.full((), 1.0, acc_ty))

    @triton.jit
    def _ohem_factor_kernel(
        p_ptr,  # (N,) the forward's p_n
        aux_ptr,  # (2,) the forward's threshold and factor
        gp_ptr,  # the upstream gradient: one value (gp_stride 0) or (N,) (HAS_GP)
        g_ptr,  # (N,) out: the backward's per-pixel upstream factor
        N,
        gp_stride,
        HAS_GP: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = n < N
        thr = tl.load(aux_ptr)
        f = tl.load(aux_ptr + 1)
        p = tl.load(p_ptr + n, mask=inside, other=-1.0)
        kept = (p >= 0.0) & (p < thr)
        if HAS_GP:
            f = tl.load(gp_ptr + n * gp_stride, mask=inside & kept, other=0.0).to(f.dtype) * f
        tl.store(g_ptr + n, tl.where(kept, f, 0.0), mask=inside)


def _loss_fwd(x, t, interp, align_corners, confusion, ignore_index, validate, need_lse):
    """The per-pixel cross-entropy of the loss launchers: (ℓ (N,), bad, lse)."""
    args = (
        None,
        None,
        confusion,
        Mode.SOFTMAX_FOCAL,
        0.0,
        ignore_index,
        Reduction.NONE,
        Weighting.NONE,
        False,
        validate,
        need_lse,
    )
    if interp < 0:
        out = triton_loss._forward(x, t, *args)
    else:
        out = triton_upsample._forward(x, t, interp, align_corners, *args)
    return out.loss, out.bad, out.lse


def _forward(
    x,
    target,
    interp,
    align_corners,
    weight,
    confusion,
    thresh,
    rank,
    ignore_index,
    reduction,
    mean_over_all,
    validate,
    need_lse,
):
    """The forward op's launcher (the module docstring lists its launches)."""
    reduction = Reduction(reduction)
    pl, bad, lse = _loss_fwd(x, target, interp, align_corners, confusion, ignore_index, validate, need_lse)
    acc = acc_dtype(x)
    dev = x.device
    N = pl.numel()
    t = target.reshape(-1)
    if not t.is_contiguous():
        t = t.contiguous()
    pn = pl.new_empty(N)
    aux = pl.new_empty(2)
    work = torch.zeros(triton_select.work_layout(acc)[2], dtype=torch.int64, device=dev)
    k = pl.new_empty((), dtype=torch.int64)
    sel = pl.new_empty(())
    P, block = _plan(N, dev)
    with _on_device(x):
        wrap(_ohem_prob_kernel)[(P,)](
            pl,
            t,
            weight if weight is not None else _dummy(dev, acc),
            pn,
            work,
            k,
            rank,
            N,
            x.shape[1],
            ignore_index,
            WEIGHTED=weight is not None,
            BLOCK=block,
            num_warps=_WARPS,
        )
        triton_select.launch_passes(pn, k, work, sel, True)
        srow = pl.new_empty(P)
        crow = pl.new_empty(P, dtype=torch.int64)
        wrap(_ohem_kept_kernel)[(P,)](
            pn,
            pl,
            sel,
            aux,
            srow,
            crow,
            thresh,
            thresh,
            N,
            CLEAR=reduction == Reduction.NONE,
            UNIT=reduction != Reduction.MEAN,
            BLOCK=block,
            num_warps=_WARPS,
        )
        if reduction == Reduction.NONE:
            loss = pl
        else:
            loss = pl.new_empty(())
            wrap(_ohem_finalize_kernel)[(1,)](
                srow,
                crow,
                loss,
                aux,
                P,
                N,
                MEAN=reduction == Reduction.MEAN,
                MEAN_ALL=bool(mean_over_all),
                BR=_np2(P),
                num_warps=1,
            )
    return loss, pn, aux, bad, lse


def _backward(x, target, interp, align_corners, grad, weight, pn, aux, lse, ignore_index):
    """The backward op's launcher: the per-pixel upstream factors, then the loss launcher's backward."""
    acc = acc_dtype(x)
    N = target.numel()
    if pn.numel() != N or pn.dtype != acc or aux.numel() != 2 or aux.dtype != acc:
        raise RuntimeError(
            f"fused_imbalance: triton_ohem_bwd: pn and aux must be the forward's ({N},) and (2,) "
            f"{acc} tensors, got {tuple(pn.shape)} {pn.dtype} and {tuple(aux.shape)} {aux.dtype}"
        )
    t = target.reshape(-1)
    if not t.is_contiguous():
        t = t.contiguous()
    g = pn.new_empty(N)
    if N:
        gp, gp_stride, has_gp = grad_arg(grad, N, x.device, acc)
        block = _block(x.device)
        with _on_device(x):
            wrap(_ohem_factor_kernel)[(_cdiv(N, block),)](
                pn, aux, gp, g, N, gp_stride, HAS_GP=has_gp, BLOCK=block, num_warps=_WARPS
            )
    if interp < 0:
        return triton_loss._backward(x, t, g, weight, None, lse, Mode.SOFTMAX_FOCAL, 0.0, ignore_index)
    return triton_upsample._backward(
        x, target, interp, align_corners, g, weight, None, lse, Mode.SOFTMAX_FOCAL, 0.0, ignore_index
    )


def _check_args(op, x, target, interp, weight, confusion):
    if interp < 0:
        check_tensor_args(op, x, target, None, Mode.SOFTMAX_FOCAL, weight=weight, confusion=confusion)
    else:
        check_tensor_args(
            op, x, target, target.numel(), Mode.SOFTMAX_FOCAL, weight=weight, confusion=confusion
        )


if triton is not None:

    @torch.library.triton_op("fused_imbalance::triton_ohem_fwd", mutates_args=("confusion",))
    def ohem_fwd(
        x: torch.Tensor,
        target: torch.Tensor,
        interp: int,
        align_corners: bool,
        weight: Optional[torch.Tensor],
        confusion: Optional[torch.Tensor],
        thresh: float,
        rank: int,
        ignore_index: int,
        reduction: int,
        mean_over_all: bool,
        validate: bool,
        need_lse: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_args("triton_ohem_fwd", x, target, interp, weight, confusion)
        return _forward(
            x,
            target,
            interp,
            align_corners,
            weight,
            confusion,
            thresh,
            rank,
            ignore_index,
            reduction,
            mean_over_all,
            validate,
            need_lse,
        )

    @ohem_fwd.register_fake
    def _ohem_fwd_fake(
        x,
        target,
        interp,
        align_corners,
        weight,
        confusion,
        thresh,
        rank,
        ignore_index,
        reduction,
        mean_over_all,
        validate,
        need_lse,
    ):
        from .ohem import fwd_fake
        from .triton_backend import keeps_lse

        return fwd_fake(
            x, target, reduction, keeps_lse(x, Mode.SOFTMAX_FOCAL, 0.0, interp >= 0) if need_lse else 0
        )

    @torch.library.triton_op("fused_imbalance::triton_ohem_bwd", mutates_args=())
    def ohem_bwd(
        x: torch.Tensor,
        target: torch.Tensor,
        interp: int,
        align_corners: bool,
        grad: Optional[torch.Tensor],
        weight: Optional[torch.Tensor],
        pn: torch.Tensor,
        aux: torch.Tensor,
        lse: Optional[torch.Tensor],
        ignore_index: int,
    ) -> torch.Tensor:
        _check_args("triton_ohem_bwd", x, target, interp, weight, None)
        return _backward(x, target, interp, align_corners, grad, weight, pn, aux, lse, ignore_index)

    @ohem_bwd.register_fake
    def _ohem_bwd_fake(x, target, interp, align_corners, grad, weight, pn, aux, lse, ignore_index):
        return torch.empty_like(x)
else:
    ohem_fwd = None
    ohem_bwd = None
