"""The Triton backend: ``fused_imbalance::triton_loss_fwd`` / ``triton_loss_bwd``.

Implements the kernel contract of :mod:`fused_imbalance.ops` with the kernels of
:mod:`.triton_kernels` (their docstring states the cost model). Both ops are
``torch.library.triton_op``s launching through ``_triton_compat.wrap``, so ``torch.compile``
sees the kernels; autograd is the shared formula of :mod:`._autograd`. Every launch runs on the
logits' device, whichever device is current, and every kernel argument is its own buffer.

Tiling, chosen here from C and the strides (the kernels take any strides):

* C <= 256 (segmentation): the static kernels, C a compile-time constant (one compiled kernel
  per class count). A tile is 128 threads x VEC pixels: VEC consecutive pixels per thread when
  pixels are contiguous (NCHW: 4, one 16-byte float32 vector per class; fewer with true
  positives or float64), one
  pixel per thread otherwise (channels_last). Up to 32 classes everything is unrolled and the
  class-loss sums, counts and true positives are per-thread registers, written once per program
  as rows that are summed here in a fixed order; with more classes the class groups are a loop,
  the per-pixel loss is stored and summed per class by ``_class_sum_kernel`` (O(N): each of its
  threads adds its pixels into its own column of class sums), and counts go to per-program
  integer rows. Confusion counts: per-program int32 matrices (integer atomics
  inside a program), or the int64 matrix when those would exceed 16 MB.
* larger C: the chunked kernels, an online softmax over chunks of classes. Classes contiguous
  (rows, channels_last): one pixel per tile, chunks of up to 4096 classes over the lanes, the
  pixel's loss added into its program's class row (O(N), deterministic). NCHW: 32 pixels (16 in
  float64) x 64 classes per chunk, the per-pixel loss summed by ``_class_sum_kernel``. Counts, true positives
  and confusion counts are integer atomics (exact in any order).

The grid is persistent: a fixed number of programs (enough for 32 resident warps per SM), each
walking tiles pid, pid + P, ...: fixed per-program rows, hence deterministic sums.
The backward recomputes the softmax from the logits (beyond one class group, its second pass
over a pixel's logits hits the cache) and writes the gradient once.
"""

import math
from typing import NamedTuple, Optional

import torch

from . import FwdOut, Mode, Reduction, Weighting, acc_dtype, collapsible, fwd_fake, pixel_view
from ._args import check_tensor_args
from ._triton_host import (
    _cdiv,
    _class_sums,
    _dummy,
    _focal,
    _interpret,
    _np2,
    _on_device,
    _programs,
    cacheable,
    finalize,
    grad_arg,
    nothing,
    outputs,
    plan_cache,
    remember,
)

# Re-exported, unused here: the sm90_memory tool's calibration driver reads triton_loss._RESIDENT_WARPS.
from ._triton_host import _RESIDENT_WARPS  # noqa: F401
from .upsample import check_lse

try:
    import triton

    from ._triton_compat import wrap
    from .triton_kernels import (
        _bwd_chunked_kernel,
        _bwd_static_kernel,
        _fwd_chunked_kernel,
        _fwd_static_kernel,
    )
    from .triton_rows import _bwd_rows_kernel, _fwd_rows_kernel
except ImportError:  # the package works without triton; this backend is then unavailable
    triton = None

_STATIC_C = 256  # up to this class count the classes are a compile-time loop (static kernels)
_REG_STATS_C = 32  # up to this class count the class statistics are per-thread registers
_UNROLL_C = 32  # up to this class count every class is unrolled; beyond, a loop over groups
_LOOP_GROUP = 16  # classes per group of that loop (fewer when registers are short)
_GROUP_VALUES = 96  # logits a thread holds per max/exp group (GROUP x VEC x rows per thread)
_LSE_GROUP = (
    10  # classes per step of the backward's loop from the forward's lse (16 made ptxas spill 8 bytes)
)
_L1_TILE_BYTES = (
    1 << 16
)  # a tile's logits beyond this many bytes: a second pass over them misses L1 (keeps_lse)
_WARPS = 4  # warps per program of the static kernels
_ROW_CHUNK = 4096  # classes per chunk when classes are contiguous (chunked kernels)
_STRIDED_TILE = (32, 64)  # (pixels, classes) per chunk when pixels are contiguous and C is large
_ROWSUM_PROGRAMS_PER_SM = 2  # persistent programs per SM when each owns a class-loss row of C
_CONF_HIST_CELLS = 1024  # confusion counts in a per-program register histogram up to this many cells (C*C)
_ZERO_BLOCK = 256  # classes per step of a kernel's zeroing of its own rows
_ROWS_PART_C = (
    24  # classes per thread of the rows kernels (half in float64); more classes, more threads per pixel
)
_ROWS_BLOCK_BYTES = 16384  # bytes of a rows kernel's tile block, at most (32 elements of 4 bytes per thread)
# The interpreter runs a tile as whole-array numpy operations and programs one after another,
# so its cost is per tile and per unrolled class: larger tiles there, and still several programs.
_INTERPRET_TILE_SCALE = 8


def _geometry(x, grad=None):
    """``(B, C, S, x_strides, grad_strides)`` of the pixel view, strides as (b, c, s).

    The batch is folded into the pixel axis whenever one stride walks both (rows, 1x1 images,
    channels_last, B = 1), so tiles never stop at an image boundary there.
    """
    B, C, S, sb, sc, ss = pixel_view(x)
    gsb, gsc, gss = pixel_view(grad)[3:] if grad is not None else (sb, sc, ss)
    if S == 1:
        return 1, C, B, (0, sc, sb), (0, gsc, gsb)
    if B == 1 or (sb == S * ss and gsb == S * gss):
        return 1, C, B * S, (0, sc, ss), (0, gsc, gss)
    return B, C, S, (sb, sc, ss), (gsb, gsc, gss)


def _softmax_terms(mode, focal):
    """Whether a pixel's softmax forward keeps per-class terms beyond the max and the sum: the focal loss
    (γ != 0) and the softmax MSE."""
    return (focal and mode == Mode.SOFTMAX_FOCAL) or mode == Mode.MSE_SOFTMAX


def _static_plan(
    C, S, ss, itemsize, mode=Mode.SOFTMAX_FOCAL, need_tp=False, focal=False, bwd=False, scaled=True
):
    """(ROWS, VEC, GROUP, LOOP) of the static kernels, for the forward or (``bwd``) the backward; ``scaled``
    False: the GPU's tile, without the interpreter's larger one.

    Contiguous pixels (NCHW): a thread owns VEC consecutive pixels, one 16-byte vector load per class
    (4 float32, 8 float16/bfloat16), fewer where registers are short: 4 16-bit pixels in the focal and
    softmax MSE forwards (8 spilled), 2 when true positives are counted (a third set of per-class
    registers), 1 for float64, which spilled with more. Otherwise (logits whose classes are neither the
    planes nor dense rows) VEC = 1: a thread owns one pixel whose classes it gathers. GROUP: classes per
    max/exp group, so that a thread keeps at most about ``_GROUP_VALUES`` float32 logits live (half as many
    float64), split evenly (19 classes of 8 16-bit pixels: 10 + 9); a third of that in the backward of 8
    16-bit pixels with per-class softmax terms (focal, softmax MSE: groups of 10 spilled 20-44 bytes), and
    loop groups of 8 in their 16-bit forward (16 spilled 4 bytes with triton 3.6). A backward with more than one group
    reads a tile's logits twice, the second time from L1 where the tile is small, unless it has what the
    forward kept (:func:`keeps_lse`). Up to ``_UNROLL_C`` classes every group is unrolled;
    beyond, LOOP: a loop over groups of at most ``_LOOP_GROUP`` classes, then the last C % GROUP classes
    unrolled (150 unrolled classes take minutes to compile; a loop of 16 seconds).
    """
    if ss == 1:
        if itemsize == 8:
            vec = 1
        elif need_tp and not bwd:
            # the focal terms beside the true positives spilled 8 bytes with 2 float32 pixels (triton 3.6)
            vec = 1 if (focal and itemsize == 4) else 2
        elif itemsize == 2 and (bwd or not (focal or mode == Mode.MSE_SOFTMAX)):
            vec = 8
        else:
            vec = 4
    else:
        vec = 1
    rows = 32 * _WARPS
    values = _GROUP_VALUES // (2 if itemsize == 8 else 1)
    if vec == 8 and bwd and _softmax_terms(mode, focal):
        values //= 3  # their per-pixel terms: groups of 10 classes of 8 pixels spilled 20-44 bytes
    cap = max(1, values // vec)
    loop = C > _UNROLL_C
    if loop:  # C // group >= 2 full groups: the loop stays a loop
        # the sigmoid focal terms hold more temporaries per logit, and a float64 takes two registers:
        # groups of 16 spilled there
        group = min(
            cap,
            _LOOP_GROUP // 2
            if (
                mode == Mode.SIGMOID_FOCAL or itemsize == 8 or (itemsize == 2 and _softmax_terms(mode, focal))
            )
            else _LOOP_GROUP,
        )
    else:
        group = _cdiv(C, _cdiv(C, cap))
    if scaled and _interpret():
        rows *= _INTERPRET_TILE_SCALE
    rows = max(1, min(rows, _np2(_cdiv(S, vec))))
    return rows, vec, group, loop


def _rows_path(C, sc, ss, gsc=1, gss=None):
    """Whether logits with these class and pixel strides (and their gradient's) take the rows kernels:
    classes contiguous and dense (channels_last, channels_last_3d, (N, C) rows), C <= _STATIC_C."""
    return 1 < C <= _STATIC_C and sc == 1 and ss == C and gsc == 1 and (gss is None or gss == C)


def _rows_plan(C, S, itemsize):
    """(PARTS, CPART, LV, PPIX, P, BL) of the rows kernels (:mod:`.triton_rows`).

    PARTS threads per pixel, each holding CPART consecutive classes in 2**LV register slots (slot CPART
    the label's logit): one up to ``_ROWS_PART_C`` classes (half in float64), more parts, a power of two,
    beyond. PPIX = 128 / PARTS pixel slots per tile; P pixels, as many as fit a block of
    ``_ROWS_BLOCK_BYTES`` (32 elements per thread), fewer so that P·C is a whole number of 16-byte vectors
    (each tile starts aligned); BL the power of two above P·C. The interpreter takes larger tiles.
    """
    parts = _np2(_cdiv(C, _ROWS_PART_C // (2 if itemsize == 8 else 1)))
    cpart = _cdiv(C, parts)
    lv = cpart.bit_length()  # 2**lv > cpart: a slot for the label's logit
    ppix = 32 * _WARPS // parts
    vec = 16 // itemsize
    step = vec // math.gcd(C, vec)  # P a multiple of it: P·C a multiple of vec
    bl_max = _ROWS_BLOCK_BYTES // itemsize
    if _interpret():
        ppix *= _INTERPRET_TILE_SCALE
        bl_max *= _INTERPRET_TILE_SCALE
    ppix = max(1, min(ppix, _np2(S)))
    p = min(ppix, bl_max // C)
    if p >= step:
        p -= p % step
    p = max(1, p)
    return parts, cpart, lv, ppix, p, _np2(p * C)


def _chunked_plan(C, S, ss, f64, scaled=True):
    """(BLOCK_P, BLOCK_C, single chunk, num_warps) of the chunked kernels (C > _STATIC_C); ``scaled`` as
    for :func:`_static_plan`.

    Classes contiguous (rows, channels_last): one pixel per tile, its classes in chunks of up to
    ``_ROW_CHUNK`` across the lanes (reductions inside a warp and once across warps per chunk).
    Pixels contiguous (NCHW): 32 pixels (16 in float64) x 64 classes per chunk on 4 warps; 64 x 64 on
    8 warps spilled on sm_90 (4-16 bytes in the float32 forward, 36 in the float64 sigmoid focal backward).
    """
    bc = _np2(C)
    if ss == 1:
        (block_p, block_c), single = _STRIDED_TILE, False
        num_warps = 4  # no spill on sm_90 with triton 3.6 or 3.9 (tests/test_sm90_compile.py)
        if f64:
            block_p //= 2
    else:
        block_c = min(bc, _ROW_CHUNK // 4 if f64 else _ROW_CHUNK)
        single, block_p = bc <= block_c, 1
        num_warps = 8 if block_c >= 4096 else 4
    if scaled and _interpret() and block_p > 1:
        block_p *= _INTERPRET_TILE_SCALE
    return min(block_p, _np2(S)), block_c, single, num_warps


def _confusion_mode(has_conf, C):
    """(CONF, CONF_BINS) of a forward launch: none; a per-program register histogram flushed into the
    caller's matrix (C * C up to _CONF_HIST_CELLS cells); else integer atomics straight into it. No
    scratch beyond the caller's matrix in either case."""
    if not has_conf:
        return 0, 1
    if C * C <= _CONF_HIST_CELLS:
        return 1, _np2(C * C)
    return 2, 1


# The launch plans (_triton_host.plan_cache) of the forward and backward launches, and keeps_lse's answers
_fwd_plans = plan_cache()
_bwd_plans = plan_cache()
_lse_keeps = plan_cache()


class _FwdPlan(NamedTuple):
    acc: torch.dtype
    C: int
    N: int
    sums: bool
    need_tp: bool
    kept: int  # floats per pixel of the kept log-sum-exp (:func:`keeps_lse`)
    kernel: object  # None: no pixel, the finalize of no rows alone
    P: int  # programs
    pl: int  # the per-pixel loss buffer: 0 the "none" loss output, 1 a dummy, 2 its own (N,)
    lrow: bool  # the loss kernel writes (P, C) class-loss rows
    lse_arg: bool  # the static and chunked kernels take the lse buffer (or a stand-in) after ``conf``
    ints: tuple  # the kernel's integer arguments before (ignore_index, gamma, gamma)
    kw: dict  # its constexprs and num_warps
    class_sums: bool  # the class-loss rows come from the class-sum kernel over the per-pixel loss


class _BwdPlan(NamedTuple):
    kernel: object
    P: int
    N: int
    acc: torch.dtype
    kept: int
    lse_arg: bool  # the static and chunked kernels take the lse buffer (or a stand-in) after ``dx``
    ints: tuple  # the kernel's integer arguments between the tensors and (gp_stride, ...)
    kw: dict  # its constexprs (HAS_GP excepted: the upstream gradient's) and num_warps


def _fwd_plan(x, mode, gamma, reduction, weighting, need_tp, need_lse, has_conf):
    """The :class:`_FwdPlan` of a forward launch (computed; :func:`_forward` caches it)."""
    acc = acc_dtype(x)
    B, C, S, (sb, sc, ss), _ = _geometry(x)
    N = B * S
    has_loss = mode != Mode.STATS
    sums = has_loss and reduction != Reduction.NONE
    kept = keeps_lse(x, mode, gamma) if need_lse else 0
    none = reduction == Reduction.NONE
    if N == 0:  # no pixel: the finalize of no rows gives the zeros
        return _FwdPlan(
            acc, C, N, sums, need_tp, kept, kernel=None, P=0, pl=1, lrow=False,
            lse_arg=False, ints=(), kw={}, class_sums=False,
        )  # fmt: skip
    dev = x.device
    weigh = none and weighting in (Weighting.GENERAL, Weighting.PAPER)
    focal = _focal(mode, gamma)
    conf_mode, conf_bins = _confusion_mode(has_conf, C)
    if _rows_path(C, sc, ss):
        parts, cpart, lv, ppix, p, bl = _rows_plan(C, S, x.element_size())
        if parts > 1 and conf_mode == 1:
            conf_mode, conf_bins = 2, 1  # the register histogram wants one thread per pixel
        tiles_per_b = _cdiv(S, p)
        num_tiles = B * tiles_per_b
        P = _programs(num_tiles, _WARPS, dev)
        kw = dict(
            C=C,
            PARTS=parts,
            CPART=cpart,
            LV=lv,
            PPIX=ppix,
            P=p,
            BL=bl,
            MODE=int(mode),
            FOCAL=focal,
            STORE_PL=none,
            WEIGH_PL=weigh,
            SUMS=sums,
            NEED_TP=need_tp,
            CONF=conf_mode,
            CONF_BINS=conf_bins,
            FOLD=B == 1,
            num_warps=_WARPS,
        )
        ints = (S, tiles_per_b, num_tiles, S // p, sb)
        return _FwdPlan(
            acc, C, N, sums, need_tp, kept, kernel=_fwd_rows_kernel, P=P, pl=0 if none else 1, lrow=sums,
            lse_arg=False, ints=ints, kw=kw, class_sums=False,
        )  # fmt: skip
    if C <= _STATIC_C:
        rows, vec, group, loop = _static_plan(C, S, ss, x.element_size(), mode, need_tp, focal)
        tiles_per_b = _cdiv(S, rows * vec)
        num_tiles = B * tiles_per_b
        P = _programs(num_tiles, _WARPS, dev)
        reg = C <= _REG_STATS_C
        store_pl = none or (sums and not reg)  # "none": zeros without a loss
        kw = dict(
            C=C,
            GROUP=group,
            LOOP=loop,
            MODE=int(mode),
            FOCAL=focal,
            STORE_LSE=kept > 0,
            STORE_PL=store_pl,
            WEIGH_PL=weigh,
            SUMS=sums and reg,
            REG_STATS=reg,
            NEED_TP=need_tp,
            CONF=conf_mode,
            CONF_BINS=conf_bins,
            ROWS=rows,
            VEC=vec,
            ZB=min(_np2(C), _ZERO_BLOCK),
            num_warps=_WARPS,
        )
        ints = (S, N, tiles_per_b, num_tiles, sb, sc, ss)
        pl = 0 if none else (2 if store_pl else 1)
        return _FwdPlan(
            acc, C, N, sums, need_tp, kept, kernel=_fwd_static_kernel, P=P, pl=pl, lrow=reg and sums,
            lse_arg=True, ints=ints, kw=kw, class_sums=sums and not reg,
        )  # fmt: skip
    block_p, block_c, single, num_warps = _chunked_plan(C, S, ss, acc == torch.float64)
    tiles_per_b = _cdiv(S, block_p)
    num_tiles = B * tiles_per_b
    rowsum = sums and block_p == 1
    P = _programs(num_tiles, num_warps, dev, _ROWSUM_PROGRAMS_PER_SM if rowsum else None)
    store_pl = none or (sums and not rowsum)
    kw = dict(
        MODE=int(mode),
        FOCAL=focal,
        STORE_LSE=kept > 0,
        STORE_PL=store_pl,
        WEIGH_PL=weigh,
        ROWSUM=rowsum,
        NEED_TP=need_tp,
        CONF=conf_mode > 0,
        SINGLE=single,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        ZB=min(_np2(C), _ZERO_BLOCK),
        num_warps=num_warps,
    )
    ints = (C, S, N, tiles_per_b, num_tiles, sb, sc, ss)
    pl = 0 if none else (2 if store_pl else 1)
    return _FwdPlan(
        acc, C, N, sums, need_tp, kept, kernel=_fwd_chunked_kernel, P=P, pl=pl, lrow=rowsum,
        lse_arg=True, ints=ints, kw=kw, class_sums=sums and not rowsum,
    )  # fmt: skip


def _forward(
    x,
    target,
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
    """The forward op's launcher (the contract of :mod:`fused_imbalance.ops`): the loss kernel, the
    class-sum kernel beyond 32 classes, then the finalize launch. ``validate`` is the caller's: this
    backend returns the bad labels (``bad``) and never waits for the device."""
    need_tp = bool(need_tp) or weighting == Weighting.RECALL
    # mode, reduction and weighting as given (ints or their enums: equal keys); every flag the plan reads
    key = (
        x.shape, x.stride(), x.dtype, x.device, mode, reduction, weighting, need_tp, bool(need_lse),
        confusion is not None, gamma == 0,
    )  # fmt: skip
    cache = cacheable(x)
    plan = _fwd_plans.get(key) if cache else None
    if plan is None:
        mode, reduction, weighting = Mode(mode), Reduction(reduction), Weighting(weighting)
        plan = _fwd_plan(x, mode, gamma, reduction, weighting, need_tp, need_lse, confusion is not None)
        if cache:
            remember(_fwd_plans, key, plan)
    acc, C, N, sums = plan.acc, plan.C, plan.N, plan.sums
    dev = x.device
    out = outputs(x, C, N, reduction, need_tp)
    # every element is written by the loss kernel
    lse = x.new_empty(N * plan.kept, dtype=acc) if plan.kept else nothing(x, acc)
    i32 = torch.int32
    with _on_device(x):
        if plan.kernel is None:
            z = x.new_empty((0, C), dtype=i32)
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
                target,
            )
            return FwdOut(*out, lse)
        P = plan.P
        wt = weight if weight is not None else _dummy(dev, acc)
        tv = tvals if tvals is not None else _dummy(dev, acc)  # its dtype sets the arithmetic
        conf = confusion if confusion is not None else _dummy(dev, torch.int64)
        if plan.pl == 0:
            pl = out[0]
        elif plan.pl == 1:
            pl = _dummy(dev, acc)  # not stored: the kernel never writes it
        else:
            pl = x.new_empty(N, dtype=acc)
        lrow = x.new_empty((P, C), dtype=acc) if plan.lrow else None
        crow = x.new_empty((P, C), dtype=i32)
        trow = x.new_empty((P, C), dtype=i32) if need_tp else crow
        brow = x.new_empty((P, 2), dtype=torch.int64)
        tensors = (x, target, tv, wt, pl, lrow if lrow is not None else pl, crow, trow, brow, conf)
        if plan.lse_arg:
            tensors += (lse if plan.kept else pl,)
        wrap(plan.kernel)[(P,)](*tensors, *plan.ints, ignore_index, gamma, gamma, **plan.kw)
        if plan.class_sums:
            lrow = _class_sums(target, pl, C, _INTERPRET_TILE_SCALE)
        finalize(
            lrow, crow, trow, brow, weight, out, C, reduction, weighting, sums, need_tp, ignore_index, target
        )
    return FwdOut(*out, lse)


def _bwd_plan(x, dx, mode, gamma, has_lse, has_wv):
    """The :class:`_BwdPlan` of a backward launch (computed; :func:`_backward` caches it). ``has_lse``:
    the caller passed a non-empty lse (read only where this layout keeps one)."""
    acc = acc_dtype(x)
    B, C, S, (sb, sc, ss), (gsb, gsc, gss) = _geometry(x, dx)
    dev = x.device
    focal = _focal(mode, gamma)
    kept = keeps_lse(x, mode, gamma)
    lse = has_lse and kept > 0  # else the backward reads the logits once anyway
    if _rows_path(C, sc, ss, gsc, gss):
        parts, cpart, lv, ppix, p, bl = _rows_plan(C, S, x.element_size())
        tiles_per_b = _cdiv(S, p)
        num_tiles = B * tiles_per_b
        kw = dict(
            C=C,
            PARTS=parts,
            CPART=cpart,
            LV=lv,
            PPIX=ppix,
            P=p,
            BL=bl,
            MODE=int(mode),
            FOCAL=focal,
            HAS_WV=has_wv,
            FOLD=B == 1,
            num_warps=_WARPS,
        )
        ints = (S, tiles_per_b, num_tiles, S // p, sb, gsb)
        P = _programs(num_tiles, _WARPS, dev)
        return _BwdPlan(_bwd_rows_kernel, P, B * S, acc, kept, False, ints, kw)
    if C <= _STATIC_C:
        rows, vec, group, loop = _static_plan(C, S, ss, x.element_size(), mode, focal=focal, bwd=True)
        if lse and loop:
            group = _LSE_GROUP  # one streaming pass: nothing is held across a group
        tiles_per_b = _cdiv(S, rows * vec)
        num_tiles = B * tiles_per_b
        kw = dict(
            C=C,
            GROUP=group,
            LOOP=loop,
            MODE=int(mode),
            FOCAL=focal,
            HAS_WV=has_wv,
            HAS_LSE=lse,
            ROWS=rows,
            VEC=vec,
            num_warps=_WARPS,
        )
        ints = (S, B * S, tiles_per_b, num_tiles, sb, sc, ss, gsb, gsc, gss)
        P = _programs(num_tiles, _WARPS, dev)
        return _BwdPlan(_bwd_static_kernel, P, B * S, acc, kept, True, ints, kw)
    block_p, block_c, single, num_warps = _chunked_plan(C, S, ss, acc == torch.float64)
    tiles_per_b = _cdiv(S, block_p)
    num_tiles = B * tiles_per_b
    kw = dict(
        MODE=int(mode),
        FOCAL=focal,
        HAS_WV=has_wv,
        HAS_LSE=lse,
        SINGLE=single,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    ints = (C, S, B * S, tiles_per_b, num_tiles, sb, sc, ss, gsb, gsc, gss)
    P = _programs(num_tiles, num_warps, dev)
    return _BwdPlan(_bwd_chunked_kernel, P, B * S, acc, kept, True, ints, kw)


def _backward(x, target, grad, scale, tvals, lse, mode, gamma, ignore_index):
    """The backward op's launcher: grad[n] * scale[y_n] * dℓ_n/dx in x's layout (the contract of
    :mod:`fused_imbalance.ops`); one launch."""
    if mode == Mode.STATS or x.numel() == 0:
        return torch.zeros_like(x)
    dx = torch.empty_like(x)
    has_lse = lse is not None and lse.numel() > 0
    has_wv = scale is not None
    # dx's strides follow from x's (empty_like of the same layout): x's key covers both
    key = (x.shape, x.stride(), x.dtype, x.device, mode, gamma == 0, has_lse, has_wv)
    cache = cacheable(x)
    plan = _bwd_plans.get(key) if cache else None
    if plan is None:
        plan = _bwd_plan(x, dx, Mode(mode), gamma, has_lse, has_wv)
        if cache:
            remember(_bwd_plans, key, plan)
    acc = plan.acc
    dev = x.device
    tv = tvals if tvals is not None else _dummy(dev, acc)  # its dtype sets the arithmetic
    gp, gp_stride, has_gp = grad_arg(grad, plan.N, dev, acc)
    wv = scale if has_wv else tv
    if has_lse and plan.kept:
        check_lse(lse, plan.N * plan.kept, acc, dev)
    else:
        lse = None
    tensors = (x, target, tv, gp, wv, dx)
    if plan.lse_arg:
        tensors += (lse if lse is not None else tv,)
    with _on_device(x):
        wrap(plan.kernel)[(plan.P,)](
            *tensors, *plan.ints, gp_stride, ignore_index, gamma, gamma, HAS_GP=has_gp, **plan.kw
        )
    return dx


def keeps_lse(x, mode, gamma):
    """Floats per pixel the plain forward keeps for its backward when asked (``need_lse``): where the
    backward of a softmax mode would read a pixel's logits twice from memory (a max/sum pass, then the
    gradient pass, over a tile larger than ``_L1_TILE_BYTES``: the static kernels beyond one class group,
    the chunked kernels beyond one chunk, e.g. 150 classes in NCHW), each pixel's log-sum-exp and, for the
    focal loss (γ != 0) and the softmax MSE, one more coefficient (``_keep_lse`` of the kernels): 1 or 2.
    Then the backward is one read of the logits and one write of the gradient. 0 where one read suffices
    (the rows kernels, one group or chunk, the per-class modes) or the second pass hits L1 (19 classes of
    16-bit logits in two groups: 38 KB per tile). ``x``: the logits (their class count, layout and dtype)."""
    mode = int(mode)  # not Mode(mode): torch.compile of torch 2.11 cannot trace the making of an enum
    if mode not in (Mode.SOFTMAX_FOCAL, Mode.MSE_SOFTMAX) or x.dim() < 2:
        return 0
    # every eager step asks (before its forward): one dict lookup when the logits' geometry repeats; not
    # while torch.compile traces (no global state written there; the answer is recomputed)
    cache = not torch.compiler.is_compiling() and cacheable(x)
    key = (x.shape, x.stride(), x.dtype, mode, gamma != 0)
    keep = _lse_keeps.get(key) if cache else None
    if keep is None:
        keep = _keeps_lse(x, mode, gamma)
        if cache:
            remember(_lse_keeps, key, keep)
    return keep


def _keeps_lse(x, mode, gamma):
    if not collapsible(x):
        return 0
    B, C, S, (sb, sc, ss), _ = _geometry(x)
    if _rows_path(C, sc, ss):
        return 0
    if C <= _STATIC_C:
        # the GPU's tile (the interpreter's larger tiles must not change what the op returns)
        rows, vec, group, _ = _static_plan(
            C, S, ss, x.element_size(), mode, focal=_focal(mode, gamma), bwd=True, scaled=False
        )
        twice = group < C and rows * vec * C * x.element_size() > _L1_TILE_BYTES
    else:
        block_p, _, single, _ = _chunked_plan(C, S, ss, x.dtype == torch.float64, scaled=False)
        twice = not single and block_p * C * x.element_size() > _L1_TILE_BYTES
    if not twice:
        return 0
    return 2 if (mode == Mode.MSE_SOFTMAX or gamma != 0) else 1


if triton is not None:

    @torch.library.triton_op("fused_imbalance::triton_loss_fwd", mutates_args=("confusion",))
    def loss_fwd(
        x: torch.Tensor,
        target: torch.Tensor,
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
        check_tensor_args("triton_loss_fwd", x, target, None, loss_mode, tvals, weight, weighting, confusion)
        return tuple(
            _forward(
                x,
                target,
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

    @loss_fwd.register_fake
    def _loss_fwd_fake(
        x,
        target,
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

    @torch.library.triton_op("fused_imbalance::triton_loss_bwd", mutates_args=())
    def loss_bwd(
        x: torch.Tensor,
        target: torch.Tensor,
        grad: Optional[torch.Tensor],
        scale: Optional[torch.Tensor],
        tvals: Optional[torch.Tensor],
        lse: Optional[torch.Tensor],
        loss_mode: int,
        gamma: float,
        ignore_index: int,
    ) -> torch.Tensor:
        check_tensor_args("triton_loss_bwd", x, target, None, loss_mode, tvals, grad=grad, scale=scale)
        return _backward(x, target, grad, scale, tvals, lse, loss_mode, gamma, ignore_index)

    @loss_bwd.register_fake
    def _loss_bwd_fake(x, target, grad, scale, tvals, lse, loss_mode, gamma, ignore_index):
        return torch.empty_like(x)
else:
    loss_fwd = None
    loss_bwd = None
