"""The Triton backend of the upsampled loss ops (docs/DESIGN.md §10):
``fused_imbalance::triton_upsample_loss_fwd`` / ``triton_upsample_loss_bwd``, launching the kernels of
:mod:`.triton_upsample_kernels`.

Same contract as the C++ ops (:mod:`.upsample`): the loss of ``F.interpolate(x, size=(H, W),
mode, align_corners)`` for low-resolution logits x (B, C, h, w), any strides (NCHW and
channels_last read in place), without a tensor of B·C·H·W elements.

Interpolation tables (:class:`_Geometry`, built once per resize). The source indices and weights of
each axis are small tables (H and W entries) computed on the device with torch's own formulas
(aten/native/UpSample.h: area_pixel_compute_source_index and guard_index_and_lambda in the
accumulation dtype, the float index; nearest_idx with its float scale and the 1x / 2x special cases)
exactly as the C++ kernels compute them. An axis whose size does not change, and every "nearest"
axis, has one tap of weight 1 (``TAP2_* = False``): those values are copied, as torch copies them. On
a two-tap axis the second source index is min(x0 + 1, w - 1), so only x0 is tabulated; each input
index's segment of output indices (the ones whose first source index it is) is tabulated too.

Class plans (:func:`_class_plan`). Up to ``_CACHE_C`` classes (backward: ``_FUSED_C``; fewer in
float64) one group holds them all; beyond, forward groups of at most 12 (10 with the softmax focal or MSE
terms, 6 with the argmax, 6 in float64, 4 for the sigmoid focal terms) in a loop over groups, and backward
groups of at most 19 (16 in a loop, beyond 32 classes; 5 for the sigmoid focal terms; 4 in float64, 2 for
its sigmoid focal terms): the largest that compile without register spills on sm_90 (triton 3.6 and 3.9).

Launches. The forward: ``_up_fwd_kernel``, the class-sum kernel when the class sums are not
registers (more than 32 classes), the finalize. The backward: ``_up_bwd_kernel``; with class groups in
a softmax mode it needs per output pixel the scalars of the gradient (``PRE``): from a launch of
``_up_coef_kernel`` first (``PRE`` = 1), or, for the softmax focal losses, from what the forward kept
when autograd recorded it (``need_lse``, :func:`keeps_lse`; ``PRE`` = 2, no extra launch). Tiles
(:func:`_fwd_tile`, :func:`_bwd_tile`): on a GPU a forward step is one output row with cached rows and
while the statistics are per-thread registers (more rows per thread ran out of registers), with class
groups beyond 32 classes up to 4, about a whole segment; the backward steps one output pixel. The
interpreter, whose cost is per step, takes whole segments and one band per image.
"""

from typing import Optional

import torch

from . import FLOAT_DTYPES, FwdOut, Mode, Reduction, Weighting, acc_dtype, fwd_fake
from ._triton_host import (
    _cdiv,
    _class_sums,
    _dummy,
    _focal,
    _interpret,
    _np2,
    _on_device,
    cacheable,
    finalize,
    grad_arg,
    nothing,
    outputs,
    plan_cache,
    remember,
)
from ._args import check_tensor_args
from .upsample import Interp, check_lse

try:
    import triton

    from ._triton_compat import wrap
    from .triton_upsample_kernels import _up_bwd_kernel, _up_coef_kernel, _up_fwd_kernel
except ImportError:  # the package works without triton; this backend is then unavailable
    triton = None

__all__ = ["keeps_lse", "upsample_loss_fwd", "upsample_loss_bwd"]

_CACHE_C = 32  # up to this class count the forward has one class group and cached horizontal rows
_CACHE_C_F64 = 19  # the same in float64: more spilled, with the argmax
_CACHE_C_F64_SIGMOID = 12  # float64 with the sigmoid focal terms
_FUSED_C = 12  # up to this class count the backward computes the softmax itself (one group): registers
_FUSED_C_F64 = 8  # the same in float64
_FUSED_C_F64_SIGMOID = 6  # float64 with the sigmoid focal terms
_REG_STATS_C = 32  # up to this class count the forward's class statistics are per-thread registers
_UNROLL_C = 32  # up to this class count the backward's class groups are unrolled; beyond, a loop over groups
_GROUP = 12  # classes per forward group beyond _CACHE_C: see _class_plan
_GROUP_TERMS = 10  # the same with the focal terms or the softmax MSE, and in the coefficient launch
_BWD_GROUP = (
    19  # classes per backward group from the coefficient launch (unrolled; 20 took all 255 registers)
)
_BWD_GROUP_LOOP = 16  # the same in a loop over groups (more than _UNROLL_C classes)
_TP_PACK = 4096  # REG_STATS: a float count + _TP_PACK x true positives (exact for H < _TP_PACK)
_BIG_H = 1 << 24  # from this many output rows a program may count 2**31 pixels: int64 rows, no REG_STATS
_FWD_ROWS = 4  # low-resolution rows per forward program (horizontal passes: R + 1 per R rows)
_BWD_ROWS = 8  # low-resolution rows per backward program (the halo row costs 1/R)
_FWD_TY = 1  # output rows per step of the forward with cached rows (more ran out of registers)
_FWD_TY_GROUPS = 4  # at most this many output rows per step of the forward with class groups beyond
#                     _REG_STATS_C classes (_fwd_step)
_BWD_TY = 1  # output rows per step of the backward


def _axis(n_in, n_out, interp, align_corners, dtype, device):
    """(i0, i1, w0, w1) of one axis: output index -> source indices (int32) and weights (dtype),
    torch's formulas step by step in ``dtype`` (the C++ kernels' make_axis)."""
    d = torch.arange(n_out, device=device)
    if interp == Interp.NEAREST:
        if n_out == n_in:
            s = d
        elif n_out == 2 * n_in:
            s = d // 2
        else:
            scale = torch.tensor(float(n_in), dtype=torch.float32, device=device) / float(n_out)
            s = torch.clamp((d.to(torch.float32) * scale).floor().to(torch.int64), max=n_in - 1)
        s = s.to(torch.int32)
        return (
            s,
            s,
            torch.ones(n_out, dtype=dtype, device=device),
            torch.zeros(n_out, dtype=dtype, device=device),
        )
    if n_out == n_in:  # scale factor 1 is a copy
        s = d.to(torch.int32)
        return (
            s,
            s,
            torch.ones(n_out, dtype=dtype, device=device),
            torch.zeros(n_out, dtype=dtype, device=device),
        )
    one = torch.ones((), dtype=dtype, device=device)
    dt = d.to(dtype)
    if align_corners:
        scale = one * (n_in - 1) / (n_out - 1) if n_out > 1 else one * 0
        src = scale * dt
    else:
        scale = one * n_in / n_out
        src = (scale * (dt + 0.5) - 0.5).clamp(min=0)
    i = torch.clamp(src.to(torch.float32).floor().to(torch.int64), max=n_in - 1)  # the index in float
    lam = (src - i.to(dtype)).clamp(0, 1)
    i1 = i + (i < n_in - 1).to(torch.int64)
    return i.to(torch.int32), i1.to(torch.int32), 1 - lam, lam


def _segments(i0, n_in):
    """(start, end) int32 (n_in,): the output indices whose first source index is each input index."""
    src = torch.arange(n_in, dtype=i0.dtype, device=i0.device)
    return (
        torch.searchsorted(i0, src, right=False).to(torch.int32),
        torch.searchsorted(i0, src, right=True).to(torch.int32),
    )


# --- launchers ---------------------------------------------------------------------------------


class _Geometry:
    """The resize's tables and per-axis flags, from the logits' and the labels' shapes. The tables
    depend on the sizes alone: they are built once per (sizes, mode, dtype, device), not per call
    (each is a few small device ops, launches on a GPU)."""

    def __init__(self, x, H, W, interp, align_corners):
        acc = acc_dtype(x)
        B, C, h, w = x.shape
        self.H, self.W, self.h, self.w = H, W, h, w
        ay0, _, self.wy0, self.wy1 = _axis(h, H, interp, align_corners, acc, x.device)
        self.ax0, _, self.wx0, self.wx1 = _axis(w, W, interp, align_corners, acc, x.device)
        self.sy0, self.sy1 = _segments(ay0, h)
        self.sx0, self.sx1 = _segments(self.ax0, w)
        bilinear = interp == Interp.BILINEAR
        self.tap2_y = bilinear and H != h  # otherwise one tap of weight 1: a copy, as torch makes it
        self.tap2_x = bilinear and W != w


_GEOMETRY_CACHE = 64  # resize geometries kept (a training run has one or a few)
_geometries = {}


def _geometry(x, H, W, interp, align_corners):
    """(geometry, off64): the cached tables of this resize, and whether offsets inside one image of
    logits (and of the gradient, laid out like them) need 64 bits."""
    key = (x.shape[2], x.shape[3], H, W, int(interp), bool(align_corners), acc_dtype(x), x.device)
    geo = _geometries.get(key)
    if geo is None or torch.compiler.is_compiling():
        geo = _Geometry(x, H, W, interp, align_corners)
        if not torch.compiler.is_compiling():  # a traced graph's tensors are not kept across calls
            if len(_geometries) >= _GEOMETRY_CACHE:
                _geometries.pop(next(iter(_geometries)))
            _geometries[key] = geo
    extent = sum((d - 1) * abs(st) for d, st in zip(x.shape[1:], x.stride()[1:]))
    return geo, extent >= 2**31


def _fwd_cached(C, mode, f64):
    """Whether the forward has one class group with cached horizontal rows (2·C values per thread,
    with the per-thread statistics' 3·C)."""
    return C <= ((_CACHE_C_F64_SIGMOID if mode == Mode.SIGMOID_FOCAL else _CACHE_C_F64) if f64 else _CACHE_C)


def _bwd_fused(C, mode, f64):
    """Whether the backward computes the softmax itself, one group of all classes (four accumulators,
    the two taps of two rows and the exponentials of every class per thread)."""
    return C <= ((_FUSED_C_F64_SIGMOID if mode == Mode.SIGMOID_FOCAL else _FUSED_C_F64) if f64 else _FUSED_C)


def _class_plan(C, mode, f64, bwd=False, need_am=False, coef=False, focal=False):
    """(GROUP, LOOP, CACHE) of a class count (see the module docstring). A forward group holds
    ``_fwd_step`` rows of interpolated values per class (and with ``need_am`` the running argmax; with
    ``coef``, the backward's coefficient launch, the upstream gradients and three outputs per pixel; with
    ``focal``, γ != 0, the focal terms), in a loop over groups (unrolled groups spilled: the compiler hoisted
    loads across them); the
    backward four accumulators and the two taps of two rows per class. Smaller groups for the
    sigmoid focal terms and float64: these sizes are the largest that compile without register
    spills on sm_90 (tests/test_sm90_compile.py)."""
    cache = _bwd_fused(C, mode, f64) if bwd else _fwd_cached(C, mode, f64)
    if cache:
        return C, False, True
    loop = C > _UNROLL_C or not bwd
    if bwd:
        # the backward from the coefficient launch: four accumulators and the two taps of two rows per class
        if f64:
            group = 2 if mode == Mode.SIGMOID_FOCAL else 4
        else:
            group = 5 if mode == Mode.SIGMOID_FOCAL else (_BWD_GROUP_LOOP if loop else _BWD_GROUP)
    elif mode == Mode.SIGMOID_FOCAL:
        group = 4  # in steps of 2 rows (8 spilled on triton 3.6)
    elif f64:
        group = 6  # in steps of 2 rows
    else:
        # in steps of 4 rows; 8 spilled with the argmax (and the softmax focal terms), 12 in the
        # coefficient launch of the softmax focal loss on triton 3.6, 11 and 12 with the focal terms (triton
        # 3.9) or the softmax MSE (3.6 and 3.9)
        small = coef or focal or mode == Mode.MSE_SOFTMAX
        group = 6 if need_am and mode != Mode.STATS else (_GROUP_TERMS if small else _GROUP)
    if (
        not loop
    ):  # the backward's unrolled groups (the forward's always loop): even groups, 30 classes are 15 + 15
        group = _cdiv(C, _cdiv(C, group))
    return group, loop, False


def _seg_bound(n_in, n_out):
    """A power of two about the longest segment of an axis (the first one, of about 1.5 n_out / n_in
    indices, bilinear with align_corners=False): the interpreter's step, from the sizes alone (no
    device sync, and traceable with fake tensors). Any step is correct: segments are walked in steps."""
    return _np2(_cdiv(3 * n_out, 2 * max(n_in, 1)) + 1)


def _fwd_tile(geo, C, mode, f64):
    """(BLOCK_X, R, TY, num_warps) of the forward: one output column per thread."""
    if _interpret():  # the interpreter's cost is per step: one band, all columns, whole segments
        return _np2(geo.W), geo.h, _seg_bound(geo.h, geo.H), 4
    block = min(128, max(32, _np2(geo.W)))
    return block, _FWD_ROWS, _fwd_step(geo, C, mode, f64), block // 32


def _fwd_step(geo, C, mode, f64):
    """Output rows per step of the forward on a GPU: 1 with cached rows, and with class groups while
    the statistics are per-thread registers (3·C of them per row: more rows spilled); beyond, a step
    covers a segment of up to 4 rows (2 for float64 and the sigmoid focal terms), about H / h, so
    each group's horizontal passes are computed once per step."""
    if _fwd_cached(C, mode, f64) or C <= _REG_STATS_C:
        return _FWD_TY
    return min(2 if f64 or mode == Mode.SIGMOID_FOCAL else _FWD_TY_GROUPS, _np2(_cdiv(geo.H, geo.h)))


def _bwd_tile(geo):
    """(BLOCK_X, R, TJ, TY, num_warps) of the backward: the lane count (32, 64 or 128, one of them
    a halo on a two-tap axis) that wastes the fewest lanes on w columns."""
    halo = 1 if geo.tap2_x else 0
    if _interpret():
        return _np2(geo.w + halo), geo.h, _seg_bound(geo.w, geo.W), _seg_bound(geo.h, geo.H), 4
    best = min((_cdiv(geo.w, lanes - halo) * lanes, -lanes) for lanes in (32, 64, 128))
    lanes = -best[1]
    return lanes, _BWD_ROWS, 1, _BWD_TY, lanes // 32


def _check(x, target, interp, loss_mode, gamma):
    if x.dim() != 4 or target.dim() != 3 or target.shape[0] != x.shape[0]:
        raise ValueError(
            f"upsampled losses take (B, C, h, w) logits and (B, H, W) labels, got "
            f"{tuple(x.shape)} and {tuple(target.shape)}"
        )
    if interp not in (Interp.NEAREST, Interp.BILINEAR):
        raise ValueError(f"unknown interpolation {interp}")
    if not 0 <= loss_mode <= int(Mode.STATS):
        raise ValueError(f"unknown mode {loss_mode}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float16/bfloat16/float32/float64, got {x.dtype}")


def keeps_lse(x, mode, gamma):
    """How many floats per pixel the forward keeps for the backward (``need_lse``): the softmax focal
    mode with class groups in the backward keeps each pixel's log-sum-exp (1), and with γ != 0 also
    ∂ℓ/∂log p_y, the focal weight of the pixel (2: lse then it, each B·H·W long). The backward then
    needs no coefficient launch (a pass over every class): its a is the upstream weight times -1 or
    that weight. ``x``: the logits (their class count and dtype)."""
    if mode != Mode.SOFTMAX_FOCAL or _bwd_fused(x.shape[1], mode, x.dtype == torch.float64):
        return 0
    return 2 if gamma != 0 else 1


_CONF_HIST_CELLS = 1024  # confusion counts in a per-program register histogram up to this many cells (C*C)
_INTERPRET_SUM_SCALE = 8  # the class-sum kernel's larger blocks under the interpreter (its cost is per block)
_ZERO_BLOCK = 256  # classes per step of a kernel's zeroing of its own rows


def _fwd_grid(geo, B, C, mode, f64):
    """(block, R, TY, warps, bands, xblocks, programs) of a launch of the forward walk (the forward and the
    coefficient launch)."""
    block, R, ty, warps = _fwd_tile(geo, C, mode, f64)
    bands, xblocks = _cdiv(geo.h, R), _cdiv(geo.W, block)
    return block, R, ty, warps, bands, xblocks, B * bands * xblocks


def _walk_args(x, geo, off64, C, mode, gamma, group, cache, grid):
    """What ``_up_fwd_kernel`` and ``_up_coef_kernel`` take alike for their shared walk: (tables, sizes,
    constexprs), the tables after the labels, the sizes after the per-launch buffers. ``grid``: :func:`_fwd_grid`'s."""
    block, R, ty, warps, bands, xblocks, _ = grid
    tables = (geo.wy0, geo.wy1, geo.sy0, geo.sy1, geo.ax0, geo.wx0, geo.wx1)
    sizes = (geo.H, geo.W, geo.h, geo.w, bands, xblocks, *x.stride())
    kw = dict(
        C=C,
        GROUP=group,
        CACHE=cache,
        MODE=int(mode),
        FOCAL=_focal(mode, gamma),
        TAP2_X=geo.tap2_x,
        TAP2_Y=geo.tap2_y,
        OFF64=off64,
        R=R,
        TY=ty,
        BLOCK_X=block,
        num_warps=warps,
    )
    return tables, sizes, kw


class _FwdLaunch:
    """What one launch of ``_up_fwd_kernel`` derives from the shapes, strides, dtypes and flags: the grid,
    the tables and sizes, every constexpr, and what to allocate (:func:`_fwd_launch`)."""

    __slots__ = ("P", "tables", "sizes", "kw", "reg", "row_ty", "conf_mode", "focal", "own_pl")


def _fwd_launch(x, N, geo, off64, mode, gamma, acc, *, weigh, sums, store_pl, need_tp, need_conf, store_lse):
    """The :class:`_FwdLaunch` of a forward (``store_pl``: the caller passes the (N,) per-pixel loss buffer;
    ``store_lse``: it passes the buffer of :func:`keeps_lse`, softmax focal)."""
    B, C = x.shape[0], x.shape[1]
    f64 = acc == torch.float64
    grid = _fwd_grid(geo, B, C, mode, f64)
    group, _, cache = _class_plan(C, mode, f64, need_am=need_tp or need_conf, focal=_focal(mode, gamma))
    tables, sizes, walk = _walk_args(x, geo, off64, C, mode, gamma, group, cache, grid)
    # float32 counts per thread (at most H pixels) are exact below 2**24, and a program's (its BLOCK_X <= 128
    # threads') int32 sums below 2**31; from _BIG_H rows its counts are int64 atomics instead
    big = geo.H >= _BIG_H
    reg = C <= _REG_STATS_C and not big
    if not need_conf:
        conf_mode, bins = 0, 1
    elif C * C <= _CONF_HIST_CELLS and not big:
        conf_mode, bins = 1, _np2(C * C)
    else:
        conf_mode, bins = 2, 1
    lp = _FwdLaunch()
    lp.P, lp.tables, lp.sizes, lp.reg, lp.conf_mode, lp.focal = (
        grid[-1],
        tables,
        sizes,
        reg,
        conf_mode,
        walk["FOCAL"],
    )
    lp.row_ty = torch.int64 if big else torch.int32
    lp.own_pl = not store_pl and sums and not reg  # a per-pixel loss the class-sum kernel sums per class
    lp.kw = dict(
        walk,
        STORE_PL=store_pl or lp.own_pl,
        WEIGH_PL=weigh,
        SUMS=sums and reg,
        REG_STATS=reg,
        NEED_TP=need_tp,
        PACK_TP=reg and need_tp and geo.H < _TP_PACK,
        TP_PACK=_TP_PACK,
        CONF=conf_mode,
        CONF_BINS=bins,
        STORE_LSE=store_lse,
        ZB=min(_np2(C), _ZERO_BLOCK),
    )
    return lp


def _launch_fwd(
    lp, x, t, N, C, acc, gamma, tvals, ignore_index, weight, store_pl, need_tp, confusion, store_lse
):
    """One launch of ``_up_fwd_kernel`` as planned by ``lp`` (:func:`_fwd_launch`); ``store_pl``: the (N,)
    per-pixel loss buffer or None; ``store_lse``: the lse buffer or None. Returns (pl, lrow, crow, trow, brow)."""
    dev = x.device
    one = _dummy(dev, acc)
    P = lp.P
    if lp.own_pl:
        store_pl = x.new_empty(N, dtype=acc)
    pl = store_pl if store_pl is not None else one
    lrow = x.new_empty((P, C), dtype=acc) if lp.kw["SUMS"] else one
    crow = x.new_empty((P, C), dtype=lp.row_ty)
    trow = x.new_empty((P, C), dtype=lp.row_ty) if need_tp else crow
    brow = x.new_empty((P, 2), dtype=torch.int64)
    conf = confusion if lp.conf_mode else _dummy(dev, torch.int64)
    tv = tvals if tvals is not None else one
    if store_lse is not None:  # lse, then with γ != 0 the focal weight (q_ptr)
        lse, q = store_lse[:N], store_lse[N:] if lp.focal else pl
    else:
        lse = q = pl
    wrap(_up_fwd_kernel)[(P,)](
        x,
        t,
        *lp.tables,
        tv,
        weight if weight is not None else one,
        pl,
        lrow,
        crow,
        trow,
        brow,
        conf,
        lse,
        q,
        *lp.sizes,
        ignore_index,
        gamma,
        gamma,
        **lp.kw,
    )
    return pl, lrow, crow, trow, brow


def _coef_launch(x, geo, off64, mode, gamma, acc):
    """(grid, tables, sizes, constexprs) of a launch of ``_up_coef_kernel``."""
    B, C = x.shape[0], x.shape[1]
    f64 = acc == torch.float64
    grid = _fwd_grid(geo, B, C, mode, f64)
    group, _, cache = _class_plan(C, mode, f64, coef=True)
    tables, sizes, walk = _walk_args(x, geo, off64, C, mode, gamma, group, cache, grid)
    return grid[-1], tables, sizes, walk


def _launch_coef(cp, x, t, N, acc, gamma, tvals, ignore_index, coef, lse, q, grad, scale):
    """One launch of ``_up_coef_kernel`` (``cp``: :func:`_coef_launch`'s): the backward's per-pixel scalars into
    the (N,) buffers ``coef`` (a), ``lse`` and ``q``."""
    P, tables, sizes, walk = cp
    dev = x.device
    one = _dummy(dev, acc)
    gp, gp_stride, has_gp = grad_arg(grad, N, dev, acc)
    wrap(_up_coef_kernel)[(P,)](
        x,
        t,
        *tables,
        tvals if tvals is not None else one,
        gp,
        scale if scale is not None else one,
        coef,
        lse,
        q,
        *sizes,
        gp_stride,
        ignore_index,
        gamma,
        gamma,
        **walk,
        HAS_GP=has_gp,
        HAS_WV=scale is not None,
    )


# Launch plans (see _triton_host: one dict lookup per repeated call), not while torch.compile traces (a
# traced graph's geometry tensors are not kept across calls) nor for symbolic sizes.
_fwd_plans = plan_cache()
_bwd_plans = plan_cache()


def _keep_plans(x):
    return not torch.compiler.is_compiling() and cacheable(x)


class _FwdPlan:
    __slots__ = ("acc", "C", "N", "need_tp", "sums", "kept", "geo", "off64", "launch")


def _fwd_plan(
    x, target, interp, align_corners, mode, gamma, reduction, weighting, need_tp, need_lse, need_conf
):
    _check(x, target, interp, mode, gamma)
    mode, reduction, weighting = Mode(mode), Reduction(reduction), Weighting(weighting)
    plan = _FwdPlan()
    plan.acc = acc = acc_dtype(x)
    B, C, h, w = x.shape
    H, W = target.shape[1], target.shape[2]
    plan.C, plan.N = C, B * H * W
    plan.need_tp = need_tp = bool(need_tp) or weighting == Weighting.RECALL
    plan.sums = sums = mode != Mode.STATS and reduction != Reduction.NONE
    plan.kept = keeps_lse(x, mode, gamma) if need_lse else 0
    plan.geo = plan.off64 = plan.launch = None
    if plan.N and x.numel():
        plan.geo, plan.off64 = _geometry(x, H, W, interp, align_corners)
        weigh = reduction == Reduction.NONE and weighting in (Weighting.GENERAL, Weighting.PAPER)
        plan.launch = _fwd_launch(
            x,
            plan.N,
            plan.geo,
            plan.off64,
            mode,
            gamma,
            acc,
            weigh=weigh,
            sums=sums,
            store_pl=reduction == Reduction.NONE,
            need_tp=need_tp,
            need_conf=need_conf,
            store_lse=plan.kept > 0,
        )
    return plan


def _forward(
    x,
    target,
    interp,
    align_corners,
    weight,
    tvals,
    confusion,
    mode,
    gamma,
    ignore_index,
    reduction,
    weighting,
    need_tp,
    validate,
    need_lse,
):
    """The upsampled forward op's launcher (the contract of :mod:`fused_imbalance.ops` with the loss of the
    interpolated logits): the loss kernel, the class-sum kernel when the class sums are not registers,
    the finalize launch."""
    # mode, reduction and weighting as given (ints or their enums: equal keys); every flag the plan reads
    key = (
        x.shape, x.stride(), x.dtype, x.device, target.shape, interp, align_corners, mode, reduction, weighting,
        bool(need_tp), bool(need_lse), confusion is not None, gamma == 0, gamma < 0,
    )  # fmt: skip
    cache = _keep_plans(x)
    plan = _fwd_plans.get(key) if cache else None
    if plan is None:
        plan = _fwd_plan(
            x,
            target,
            interp,
            align_corners,
            mode,
            gamma,
            reduction,
            weighting,
            need_tp,
            need_lse,
            confusion is not None,
        )
        if cache:
            remember(_fwd_plans, key, plan)
    acc, C, N, sums, need_tp = plan.acc, plan.C, plan.N, plan.sums, plan.need_tp
    out = outputs(x, C, N, reduction, need_tp)
    lse = x.new_empty(N * plan.kept, dtype=acc) if plan.kept else nothing(x, acc)  # every element is written
    t = target.reshape(-1)
    if not t.is_contiguous():
        t = t.contiguous()
    with _on_device(x):
        if plan.launch is None:  # no pixel: the finalize of no rows gives the zeros
            z = x.new_empty((0, C), dtype=torch.int32)
            finalize(
                x.new_empty((0, C), dtype=acc),
                z,
                z,
                x.new_empty((0, 2), dtype=torch.int64),
                weight,
                out,
                C,
                reduction,
                weighting,
                sums,
                need_tp,
                ignore_index,
                t,
            )
            if lse.numel():
                lse.zero_()
            return FwdOut(*out, lse)
        lp = plan.launch
        pl, lrow, crow, trow, brow = _launch_fwd(
            lp,
            x,
            t,
            N,
            C,
            acc,
            gamma,
            tvals,
            ignore_index,
            weight,
            out[0] if reduction == Reduction.NONE else None,
            need_tp,
            confusion,
            lse if plan.kept else None,
        )
        if sums and not lp.reg:
            lrow = _class_sums(t, pl, C, _INTERPRET_SUM_SCALE)
        finalize(
            lrow if sums else None,
            crow,
            trow,
            brow,
            weight,
            out,
            C,
            reduction,
            weighting,
            sums,
            need_tp,
            ignore_index,
            t,
        )
    return FwdOut(*out, lse)


class _BwdPlan:
    __slots__ = ("zero", "acc", "N", "kept", "pre", "geo", "coef", "grid", "ints", "kw", "mse")


def _bwd_plan(x, grad_x, target, interp, align_corners, mode, gamma, has_lse, has_wv):
    _check(x, target, interp, mode, gamma)
    mode = Mode(mode)
    plan = _BwdPlan()
    B, C, h, w = x.shape
    H, W = target.shape[1], target.shape[2]
    plan.N = N = B * H * W
    plan.zero = mode == Mode.STATS or x.numel() == 0 or N == 0
    if plan.zero:
        return plan
    plan.acc = acc = acc_dtype(x)
    focal = _focal(mode, gamma)
    group, loop, cache = _class_plan(C, mode, acc == torch.float64, bwd=True)
    pre = not cache and mode in (Mode.SOFTMAX_FOCAL, Mode.MSE_SOFTMAX)
    # PRE: 0 the softmax in the gradient pass, 1 a coefficient launch first, 2 from what the forward kept (the
    # one-group backward computes the softmax itself; only the softmax focal losses keep anything)
    plan.kept = keeps_lse(x, mode, gamma) if pre and mode == Mode.SOFTMAX_FOCAL and has_lse else 0
    plan.pre = pre = (2 if plan.kept else 1) if pre else 0
    plan.mse = mode == Mode.MSE_SOFTMAX
    geo, off64 = _geometry(x, H, W, interp, align_corners)
    plan.geo = geo
    plan.coef = _coef_launch(x, geo, off64, mode, gamma, acc) if pre == 1 else None
    block, R, tj, ty, warps = _bwd_tile(geo)
    bands, xblocks = _cdiv(h, R), _cdiv(w, block - (1 if geo.tap2_x else 0))
    plan.grid = (B * bands * xblocks,)
    plan.ints = (H, W, h, w, bands, xblocks, *x.stride(), *grad_x.stride())
    plan.kw = dict(
        C=C,
        GROUP=group,
        LOOP=loop,
        MODE=int(mode),
        FOCAL=focal,
        HAS_WV=has_wv,
        PRE=pre,
        TAP2_X=geo.tap2_x,
        TAP2_Y=geo.tap2_y,
        OFF64=off64,
        R=R,
        TJ=tj,
        TY=ty,
        BLOCK_X=block,
        num_warps=warps,
    )
    return plan


def _backward(x, target, interp, align_corners, grad, scale, tvals, lse_fwd, mode, gamma, ignore_index):
    """The upsampled backward op's launcher: the gradient with respect to the low-resolution logits, one
    launch (two for the class groups of a softmax mode without what the forward kept)."""
    grad_x = torch.empty_like(x)  # the shape, dtype and memory format of x
    has_lse = lse_fwd is not None and lse_fwd.numel() > 0
    has_wv = scale is not None
    # grad_x's strides follow from x's (empty_like of the same layout): x's key covers both
    key = (
        x.shape, x.stride(), x.dtype, x.device, target.shape, interp, align_corners, mode, gamma == 0, gamma < 0,
        has_lse, has_wv,
    )  # fmt: skip
    cache = _keep_plans(x)
    plan = _bwd_plans.get(key) if cache else None
    if plan is None:
        plan = _bwd_plan(x, grad_x, target, interp, align_corners, mode, gamma, has_lse, has_wv)
        if cache:
            remember(_bwd_plans, key, plan)
    if plan.zero:
        return grad_x.zero_()
    acc, N, geo = plan.acc, plan.N, plan.geo
    dev = x.device
    t = target.reshape(-1)
    if not t.is_contiguous():
        t = t.contiguous()
    dummy = tvals if tvals is not None else _dummy(dev, acc)  # its dtype sets the arithmetic
    if plan.kept:
        check_lse(lse_fwd, N * plan.kept, acc, dev)
    gp, gp_stride, has_gp = grad_arg(grad, N, dev, acc)
    wv = scale if has_wv else dummy
    with _on_device(x):
        # class groups of a softmax mode: the per-pixel scalars, O(B·H·W), from what the forward kept
        # (lse, the focal weight in q), else first a launch with a pass over every class
        coef = lse = q = dummy
        if plan.pre == 2:
            kept = lse_fwd if lse_fwd.is_contiguous() else lse_fwd.contiguous()
            lse, q = kept[:N], (kept[N:] if plan.kw["FOCAL"] else dummy)
        elif plan.pre:
            coef = x.new_empty(N, dtype=acc)
            lse = x.new_empty(N, dtype=acc)
            q = x.new_empty(N if plan.mse else 1, dtype=acc)
            _launch_coef(plan.coef, x, t, N, acc, gamma, tvals, ignore_index, coef, lse, q, grad, scale)
        wrap(_up_bwd_kernel)[plan.grid](
            x,
            t,
            geo.wy0,
            geo.wy1,
            geo.sy0,
            geo.sy1,
            geo.wx0,
            geo.wx1,
            geo.sx0,
            geo.sx1,
            dummy,
            gp,
            wv,
            coef,
            lse,
            q,
            grad_x,
            *plan.ints,
            gp_stride,
            ignore_index,
            gamma,
            gamma,
            HAS_GP=has_gp,
            **plan.kw,
        )
    return grad_x


if triton is not None:

    @torch.library.triton_op("fused_imbalance::triton_upsample_loss_fwd", mutates_args=("confusion",))
    def upsample_loss_fwd(
        x: torch.Tensor,
        target: torch.Tensor,
        interp: int,
        align_corners: bool,
        weight: Optional[torch.Tensor],
        tvals: Optional[torch.Tensor],
        confusion: Optional[torch.Tensor],
        loss_mode: int,
        gamma: float,
        ignore_index: int,
        reduction: int,
        weighting: int,
        need_tp: bool,
        validate: bool,
        need_lse: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        check_tensor_args(
            "triton_upsample_loss_fwd",
            x,
            target,
            target.numel(),
            loss_mode,
            tvals,
            weight,
            weighting,
            confusion,
        )
        return tuple(
            _forward(
                x,
                target,
                interp,
                align_corners,
                weight,
                tvals,
                confusion,
                loss_mode,
                gamma,
                ignore_index,
                reduction,
                weighting,
                need_tp,
                validate,
                need_lse,
            )
        )

    @upsample_loss_fwd.register_fake
    def _upsample_loss_fwd_fake(
        x,
        target,
        interp,
        align_corners,
        weight,
        tvals,
        confusion,
        loss_mode,
        gamma,
        ignore_index,
        reduction,
        weighting,
        need_tp,
        validate,
        need_lse,
    ):
        lse = keeps_lse(x, loss_mode, gamma) if need_lse else 0
        return fwd_fake(x, target, reduction, need_tp or weighting == Weighting.RECALL, lse)

    @torch.library.triton_op("fused_imbalance::triton_upsample_loss_bwd", mutates_args=())
    def upsample_loss_bwd(
        x: torch.Tensor,
        target: torch.Tensor,
        interp: int,
        align_corners: bool,
        grad: Optional[torch.Tensor],
        scale: Optional[torch.Tensor],
        tvals: Optional[torch.Tensor],
        lse: Optional[torch.Tensor],
        loss_mode: int,
        gamma: float,
        ignore_index: int,
    ) -> torch.Tensor:
        check_tensor_args(
            "triton_upsample_loss_bwd", x, target, target.numel(), loss_mode, tvals, grad=grad, scale=scale
        )
        return _backward(
            x, target, interp, align_corners, grad, scale, tvals, lse, loss_mode, gamma, ignore_index
        )

    @upsample_loss_bwd.register_fake
    def _upsample_loss_bwd_fake(
        x, target, interp, align_corners, grad, scale, tvals, lse, loss_mode, gamma, ignore_index
    ):
        return torch.empty_like(x)
else:
    upsample_loss_fwd = None
    upsample_loss_bwd = None
