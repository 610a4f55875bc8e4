"""The Triton backend of the Dice family: ``fused_imbalance::triton_dice_fwd``, ``triton_dice_finalize``
and ``triton_dice_bwd`` (the contract: :mod:`.dice`). Kernels, launchers and ``torch.library.triton_op``
registration, so that ``torch.compile`` sees the kernels; the shared JIT helpers (tiles of pixels and
their labels, the grouped online softmax, confusion counts, bad labels) are those of
:mod:`.triton_common`, the grid and buffers those of :mod:`._triton_host`.

The grid is (P, S): S groups of sums (an image each, or one for the batch, whose images are folded into
one run of pixels where one stride walks them) and P persistent programs per group, program ``pid``
walking its group's tiles pid, pid + P, ... A tile is ``ROWS x VEC`` pixels of one image (NCHW: VEC
consecutive pixels per thread, one vector load per class, 4 or, where the per-class sums or coefficients
take the registers, 2 (``_plan``); channels_last and float64: one pixel per thread), the classes a
compile-time loop (C is a constant of the kernels: one compiled kernel per class
count), unrolled up to 24 classes and a loop over groups of classes beyond.

Forward, per tile: the softmax's max and sum in groups of classes (``static_softmax``: a max pass and
an exp pass over the same values), then one more pass over the classes for p_c = exp(x_c − lse):
I_c += p_c [y = c], P_c += p_c (p_c²), G_c += [y = c] and, with the cross-entropy, its per-class sums
of −log p_y. Up to 24 classes these are per-thread registers (a select and two adds per logit); beyond,
each class's tile sum is added into a per-program vector of C sums. A program writes its row of the
(S·P, 4, C) table once; the finalize launch sums a group's rows in a fixed order (in float64), computes
the loss and the backward's coefficients (float64), and reduces the bad-label rows. A table over
2^16 values is first reduced by a launch over (group, block of classes). No float atomics: the results
are bit-identical run to run.

Backward, per tile: the max, Σ e and q = Σ_c e_c a_P[c] (Σ e_c² a_P[c] with squared) in the same
online pass (rescaled together when the max grows), the label's p_y and a_I[y], then one pass that
writes dx_k = p_k (g_k − Σ_c p_c g_c) + a_ce (p_k − [k = y]); the coefficients of a class are one
scalar load per tile. Cost per logit: a load, the exponential, about six FLOPs per pass; the per-tile
coefficient loads are spread over the tile's pixels.
"""

from typing import NamedTuple, Optional

import torch

from . import acc_dtype, collapsible, pixel_view
from ._triton_host import (
    _INTERPRET_PROGRAMS,
    _RESIDENT_WARPS,
    _cdiv,
    _dummy,
    _interpret,
    _np2,
    _on_device,
    _sms,
    cacheable,
    plan_cache,
    remember,
)
from .dice import (
    BATCH,
    CE,
    INCLUDE_BACKGROUND,
    JACCARD,
    SQUARED,
    DiceBackend,
    DiceKind,
    WType,
    finalize_fake,
    fwd_fake,
    groups,
    loss_shape,
    upstream_index,
)

try:
    import triton
    import triton.language as tl

    from ._triton_compat import wrap
    from .triton_common import (
        LOG2E,
        NO_BAD,
        RED_MEAN,
        RED_NONE,
        conf_flush,
        conf_hist,
        counts_in_memory,
        i64,
        static_softmax,
        store_bad,
        tile_pixels,
    )
except ImportError:  # the package works without triton; this backend is then unavailable
    triton = None

__all__ = ["backend"]

_WARPS = 4
_REG_C = 24  # up to this class count the sums are per-thread registers and every class is unrolled
_LOOP_GROUP = 16  # classes per group of the loop beyond (8 in float64)
_GROUP_VALUES = 96  # logits a thread holds per max/exp group
_SUM_GROUP = 4  # classes per step of the forward's sums beyond _REG_C classes (16 spilled with triton 3.6)
_FINALIZE_ELEMS = 1 << 16  # table values the one-warp finalize sums itself; beyond, a reduce launch first
_FIN_BR, _FIN_BC = 16, 128  # rows and classes per step of the finalize
_FIN_WARPS = 1  # the finalize's one program: with 2, 4 or 8 warps ptxas spilled it (benchmarks/sm90_dice.py)
_INTERPRET_TILE_SCALE = 8  # the interpreter's cost is per tile: larger tiles there


if triton is not None:
    # KIND and W_TYPE by name (a global read inside a jitted function must be a tl.constexpr)
    KIND_DICE = tl.constexpr(int(DiceKind.DICE))
    KIND_TVERSKY = tl.constexpr(int(DiceKind.TVERSKY))
    KIND_GENERALIZED = tl.constexpr(int(DiceKind.GENERALIZED))
    W_TYPE_SQUARE = tl.constexpr(int(WType.SQUARE))
    W_TYPE_SIMPLE = tl.constexpr(int(WType.SIMPLE))
    W_TYPE_UNIFORM = tl.constexpr(int(WType.UNIFORM))

    @triton.jit
    def _dice_p(xp, c, stride_c, pmask, valid, ms, inv, acc_ty: tl.constexpr):
        """p_c of a tile's pixels (0 where not valid, whatever the logits)."""
        x = tl.load(xp + c * stride_c, mask=pmask, other=0.0).to(acc_ty)
        if acc_ty == tl.float64:
            e = tl.exp(x - ms)
        else:
            e = tl.exp2((x - ms) * LOG2E)  # as static_softmax's sum
        return tl.where(valid, e * inv, 0.0)

    @triton.jit
    def _dice_sums_group(
        xp,
        stride_c,
        pmask,
        valid,
        y32,
        ms,
        inv,
        ce,
        c0,
        iv,
        pv,
        gv,
        cv,
        cidx,
        acc_ty: tl.constexpr,
        NCLS: tl.constexpr,
        SQUARED: tl.constexpr,
        CE: tl.constexpr,
    ):
        """Classes c0 .. c0 + NCLS − 1 (unrolled) of a tile added into the program's vectors of C sums
        (many classes: one tile sum per class and quantity, put at its class by a select)."""
        for k in tl.static_range(NCLS):
            c = c0 + k
            p = _dice_p(xp, c, stride_c, pmask, valid, ms, inv, acc_ty)
            is_c = y32 == c
            at = cidx == c
            iv += tl.where(at, tl.sum(tl.sum(tl.where(is_c, p, 0.0), 1), 0), 0.0)
            if SQUARED:
                pv += tl.where(at, tl.sum(tl.sum(p * p, 1), 0), 0.0)
            else:
                pv += tl.where(at, tl.sum(tl.sum(p, 1), 0), 0.0)
            gv += tl.where(at, tl.sum(tl.sum(is_c.to(tl.int32), 1), 0), 0)
            if CE:
                cv += tl.where(at, tl.sum(tl.sum(tl.where(is_c, ce, 0.0), 1), 0), 0.0)
        return iv, pv, gv, cv

    @triton.jit
    def _dice_fwd_kernel(
        x_ptr,  # logits, element (b, c, s) at b*stride_b + c*stride_c + s*stride_s
        t_ptr,  # (N,) labels, any integer dtype; pixel n = b*S + s
        row_ptr,  # (groups * programs, 4, C) out, accumulation dtype: each program's I, P, G, CE sums
        bad_ptr,  # (groups * programs, 2) int64 out: bad labels and the largest
        conf_ptr,  # (C, C) int64 confusion counts [label, argmax] added into (CONF): the caller's matrix
        S,  # pixels per image
        tiles_per_b,  # pixel tiles per image
        tiles_per_g,  # pixel tiles per group (its images' tiles, image-major)
        stride_b,
        stride_c,
        stride_s,  # logits strides, in elements
        ignore_index,  # label of pixels that take no part
        C: tl.constexpr,  # classes
        GROUP: tl.constexpr,  # classes per max/exp group of the softmax
        LOOP: tl.constexpr,  # a loop over the class groups (C > 24), the sums in vectors of C
        SQUARED: tl.constexpr,  # P sums p²
        CE: tl.constexpr,  # the cross-entropy's per-class sums too
        CONF: tl.constexpr,  # 0: no confusion, 1: a register histogram (CONF_BINS cells), 2: integer atomics
        CONF_BINS: tl.constexpr,  # a power of two >= C * C (CONF == 1)
        ROWS: tl.constexpr,  # pixel rows per tile
        VEC: tl.constexpr,  # consecutive pixels per thread and row
        CP: tl.constexpr,  # a power of two >= C (LOOP)
        SUM_GROUP: tl.constexpr,  # classes per step of the sums (LOOP)
    ):
        acc_ty = row_ptr.dtype.element_ty
        pid = tl.program_id(0)
        grp = tl.program_id(1)
        nprog = tl.num_programs(0)
        NEED_AM: tl.constexpr = CONF > 0
        sc = i64(stride_c)
        if LOOP:
            cidx = tl.arange(0, CP)
            iv = tl.zeros([CP], acc_ty)
            pv = tl.zeros([CP], acc_ty)
            gv = tl.zeros([CP], tl.int32)
            cv = tl.zeros([CP], acc_ty)
        else:
            iacc = ()
            pacc = ()
            gacc = ()
            cacc = ()
            for c in tl.static_range(C):
                iacc = iacc + (tl.zeros([ROWS], acc_ty),)
                pacc = pacc + (tl.zeros([ROWS], acc_ty),)
                gacc = gacc + (tl.zeros([ROWS], tl.int32),)
                cacc = cacc + (tl.zeros([ROWS], acc_ty),)
        if CONF == 1:
            hist = tl.zeros([CONF_BINS], tl.int32)
        nbad = tl.zeros([ROWS, VEC], tl.int32)
        vbad = tl.full([ROWS, VEC], NO_BAD, tl.int64)
        t0 = grp.to(tl.int64) * tiles_per_g  # the group's first tile, image-major

        for t in range(pid, tiles_per_g, nprog):
            b, s, n, pmask, valid, bad, y32, badv = tile_pixels(
                t_ptr, t0 + t, tiles_per_b, S, ignore_index, C, ROWS, VEC
            )
            nbad += bad.to(tl.int32)
            vbad = tl.maximum(vbad, badv)
            xp = x_ptr + (b * stride_b + s * stride_s)
            m, ssum, rest, s2r, am, xy = static_softmax(
                xp, sc, pmask, y32, acc_ty, C, GROUP, LOOP, False, False, NEED_AM, CE
            )
            ms = tl.where(m == float("-inf"), 0.0, m)
            inv = tl.where(valid, 1.0 / ssum, 0.0)
            ce = inv
            if CE:
                ce = tl.where(valid, ms + tl.log(ssum) - xy, 0.0)  # −log p_y
            if LOOP:
                # a few classes per step: each takes four tile sums, whose reductions the compiler
                # would otherwise overlap across a whole group's classes (and spill)
                FULL: tl.constexpr = (C // SUM_GROUP) * SUM_GROUP
                for c0 in range(0, FULL, SUM_GROUP):
                    iv, pv, gv, cv = _dice_sums_group(
                        xp,
                        sc,
                        pmask,
                        valid,
                        y32,
                        ms,
                        inv,
                        ce,
                        c0,
                        iv,
                        pv,
                        gv,
                        cv,
                        cidx,
                        acc_ty,
                        SUM_GROUP,
                        SQUARED,
                        CE,
                    )
                if C % SUM_GROUP:
                    iv, pv, gv, cv = _dice_sums_group(
                        xp,
                        sc,
                        pmask,
                        valid,
                        y32,
                        ms,
                        inv,
                        ce,
                        FULL,
                        iv,
                        pv,
                        gv,
                        cv,
                        cidx,
                        acc_ty,
                        C % SUM_GROUP,
                        SQUARED,
                        CE,
                    )
            else:
                # per-thread running sums: a compare, a select and a few adds per pixel and class
                ni = ()
                npp = ()
                ng = ()
                nc = ()
                for c in tl.static_range(C):
                    p = _dice_p(xp, c, sc, pmask, valid, ms, inv, acc_ty)
                    is_c = y32 == c
                    ni = ni + (iacc[c] + tl.sum(tl.where(is_c, p, 0.0), 1),)
                    if SQUARED:
                        npp = npp + (pacc[c] + tl.sum(p * p, 1),)
                    else:
                        npp = npp + (pacc[c] + tl.sum(p, 1),)
                    ng = ng + (gacc[c] + tl.sum(is_c.to(tl.int32), 1),)
                    if CE:
                        nc = nc + (cacc[c] + tl.sum(tl.where(is_c, ce, 0.0), 1),)
                    else:
                        nc = nc + (cacc[c],)
                iacc = ni
                pacc = npp
                gacc = ng
                cacc = nc
            if CONF == 1:
                hist = conf_hist(hist, y32, am, valid, C, CONF_BINS)
            if CONF == 2:
                counts_in_memory(conf_ptr, conf_ptr, conf_ptr, 0, C, y32, am, valid, valid, False, False, 2)

        row = grp * nprog + pid
        base = row_ptr + row.to(tl.int64) * (4 * C)
        if LOOP:
            cm = cidx < C
            tl.store(base + cidx, iv, mask=cm)
            tl.store(base + C + cidx, pv, mask=cm)
            tl.store(base + 2 * C + cidx, gv.to(acc_ty), mask=cm)
            tl.store(base + 3 * C + cidx, cv, mask=cm)
        else:
            # one row per program, summed by the finalize launch in a fixed order: deterministic
            for c in tl.static_range(C):
                tl.store(base + c, tl.sum(iacc[c], 0))
                tl.store(base + C + c, tl.sum(pacc[c], 0))
                tl.store(base + 2 * C + c, tl.sum(gacc[c], 0).to(acc_ty))
                tl.store(base + 3 * C + c, tl.sum(cacc[c], 0))
        if CONF == 1:
            conf_flush(conf_ptr, hist, C, CONF_BINS)
        store_bad(bad_ptr, row, tl.sum(tl.sum(nbad, 1), 0), tl.max(tl.max(vbad, 1), 0))

    @triton.jit
    def _dice_reduce_block(row_ptr, sums_ptr, grp, c0, R, C, BR: tl.constexpr, BC: tl.constexpr):
        """A group's rows summed, in float64 and a fixed order, for classes c0 .. c0 + BC − 1."""
        c = c0 + tl.arange(0, BC)
        cm = c < C
        rs = tl.arange(0, BR)
        g64 = i64(grp)
        for q in tl.static_range(4):
            acc = tl.zeros([BC], tl.float64)
            for r0 in range(0, R, BR):
                r = r0 + rs
                off = ((g64 * R + r)[:, None] * 4 + q) * C + c[None, :]
                v = tl.load(row_ptr + off, mask=(r < R)[:, None] & cm[None, :], other=0.0)
                acc += tl.sum(v.to(tl.float64), 0)
            tl.store(sums_ptr + (g64 * 4 + q) * C + c, acc.to(sums_ptr.dtype.element_ty), mask=cm)

    @triton.jit
    def _dice_reduce_bad(brow_ptr, bad_ptr, RB, BR: tl.constexpr):
        rs = tl.arange(0, BR)
        nb = tl.zeros([BR], tl.int64)
        vb = tl.full([BR], NO_BAD, tl.int64)
        for r0 in range(0, RB, BR):
            r = r0 + rs
            rm = r < RB
            nb += tl.load(brow_ptr + 2 * r.to(tl.int64), mask=rm, other=0)
            vb = tl.maximum(vb, tl.load(brow_ptr + 2 * r.to(tl.int64) + 1, mask=rm, other=NO_BAD))
        tl.store(bad_ptr, tl.sum(nb, 0))
        tl.store(bad_ptr + 1, tl.max(vb, 0))

    @triton.jit
    def _dice_reduce_kernel(
        row_ptr,  # (groups * R, 4, C) the programs' rows
        brow_ptr,  # (RB, 2) int64 their bad labels
        sums_ptr,  # (groups, 4, C) out
        bad_ptr,  # (2,) int64 out
        R,
        RB,
        C,  # rows per group, bad rows, classes
        BR: tl.constexpr,
        BC: tl.constexpr,
    ):
        """The rows of a large table summed over (group, block of classes) programs, ahead of the finalize."""
        grp = tl.program_id(0)
        cb = tl.program_id(1)
        _dice_reduce_block(row_ptr, sums_ptr, grp, cb * BC, R, C, BR, BC)
        if (grp == 0) & (cb == 0):
            _dice_reduce_bad(brow_ptr, bad_ptr, RB, BR)

    @triton.jit
    def _f64(v):
        """A float64 scalar argument as float64 (the interpreter reads an annotated float64 argument as
        float32 in arithmetic; through tl.full it keeps its value)."""
        return tl.full((), v, tl.float64)

    @triton.jit
    def _gdl_weight(Gc, cm, W_TYPE: tl.constexpr):
        """MONAI's generalized Dice weights of present classes (0 elsewhere): 1/G², 1/G or 1."""
        present = cm & (Gc > 0)
        safe = tl.where(present, Gc, 1.0)
        if W_TYPE == W_TYPE_SQUARE:
            w = 1.0 / (safe * safe)
        elif W_TYPE == W_TYPE_SIMPLE:
            w = 1.0 / safe
        else:
            w = tl.full(Gc.shape, 1.0, tl.float64)
        return tl.where(present, w, 0.0)

    @triton.jit
    def _dice_finalize_kernel(
        row_ptr,  # (groups * R, 4, C) the programs' rows (REDUCE)
        brow_ptr,  # (RB, 2) int64 their bad labels (BAD)
        sums_ptr,  # (groups, 4, C) I, P, G, CE: written (REDUCE), then read (COMPUTE)
        w_ptr,  # (C,) the Dice terms' class weights (HAS_W)
        cew_ptr,  # (C,) the cross-entropy's class weights (HAS_CEW)
        loss_ptr,  # out: () or the per-term losses (RED == RED_NONE)
        coef_ptr,  # (groups, 2, C) out: ∂L/∂I, ∂L/∂P for a unit upstream gradient
        ce_ptr,  # (C,) out: the cross-entropy's per-class factor (CE)
        bad_ptr,  # (2,) int64 out (BAD)
        R,
        RB,
        G,
        C,  # rows per group, bad rows, groups, classes
        smooth_nr: tl.float64,
        smooth_dr: tl.float64,
        alpha: tl.float64,
        beta: tl.float64,
        gamma: tl.float64,
        lam_dice: tl.float64,
        lam_ce: tl.float64,
        grad_scale: tl.float64,
        KIND: tl.constexpr,  # DiceKind
        W_TYPE: tl.constexpr,  # WType (KIND 2)
        FIRST: tl.constexpr,  # 0, or 1 without the background class
        JACCARD: tl.constexpr,
        GAMMA_ONE: tl.constexpr,  # Tversky's γ = 1: the term as it is
        CE: tl.constexpr,
        RED: tl.constexpr,  # Reduction: 0 mean, 1 sum, 2 none
        HAS_W: tl.constexpr,
        HAS_CEW: tl.constexpr,
        REDUCE: tl.constexpr,
        BAD: tl.constexpr,
        COMPUTE: tl.constexpr,  # which steps this launch takes
        BR: tl.constexpr,
        BC: tl.constexpr,
    ):
        """The forward's small launch (the formulas of fused_imbalance.reference's comment block, in
        float64, from the sums as they are stored): one program, the tables are small."""
        if REDUCE:
            for gi in range(0, G):
                for c0 in range(0, C, BC):
                    _dice_reduce_block(row_ptr, sums_ptr, gi, c0, R, C, BR, BC)
        if BAD:
            _dice_reduce_bad(brow_ptr, bad_ptr, RB, BR)
        if COMPUTE:
            if REDUCE:
                tl.debug_barrier()  # the sums stored above, read back by other threads
            out_ty = coef_ptr.dtype.element_ty
            nr = _f64(smooth_nr)
            dr = _f64(smooth_dr)
            gs = _f64(grad_scale)
            if CE:
                lam = _f64(lam_dice)
            else:
                lam = _f64(1.0)
            cs = tl.arange(0, BC)
            kept = C - FIRST
            total = tl.zeros([BC], tl.float64)
            if KIND == KIND_GENERALIZED:
                if RED == RED_MEAN:
                    f = 1.0 / tl.maximum(G, 1).to(tl.float64)
                else:
                    f = _f64(1.0)
                a = f * lam * gs
                for gi in range(0, G):
                    base = sums_ptr + i64(gi) * 4 * C
                    wmax = tl.zeros([BC], tl.float64)
                    for c0 in range(0, C, BC):
                        c = c0 + cs
                        cm = (c < C) & (c >= FIRST)
                        Gc = tl.load(base + 2 * C + c, mask=cm, other=0.0).to(tl.float64)
                        wmax = tl.maximum(wmax, _gdl_weight(Gc, cm, W_TYPE))
                    wm = tl.max(wmax, 0)  # the weight of the absent classes: the largest finite one
                    nv = tl.zeros([BC], tl.float64)
                    dv = tl.zeros([BC], tl.float64)
                    for c0 in range(0, C, BC):
                        c = c0 + cs
                        cm = (c < C) & (c >= FIRST)
                        Ic = tl.load(base + c, mask=cm, other=0.0).to(tl.float64)
                        Pc = tl.load(base + C + c, mask=cm, other=0.0).to(tl.float64)
                        Gc = tl.load(base + 2 * C + c, mask=cm, other=0.0).to(tl.float64)
                        w = tl.where(cm, tl.where(Gc > 0, _gdl_weight(Gc, cm, W_TYPE), wm), 0.0)
                        nv += w * Ic
                        dv += w * (Pc + Gc)
                    num = 2.0 * tl.sum(nv, 0) + nr
                    den = tl.sum(dv, 0) + dr
                    ok = den != 0.0
                    dsafe = tl.where(ok, den, 1.0)
                    term = tl.where(ok, 1.0 - num / dsafe, 0.0)
                    if RED == RED_NONE:
                        tl.store(loss_ptr + gi, term.to(out_ty))
                    total += tl.where(cs == 0, term, 0.0)
                    for c0 in range(0, C, BC):
                        c = c0 + cs
                        cm = (c < C) & (c >= FIRST)
                        Gc = tl.load(base + 2 * C + c, mask=cm, other=0.0).to(tl.float64)
                        w = tl.where(cm, tl.where(Gc > 0, _gdl_weight(Gc, cm, W_TYPE), wm), 0.0)
                        w = tl.where(ok, w, 0.0)
                        cp = coef_ptr + i64(gi) * 2 * C + c
                        tl.store(cp, (-2.0 * a * w / dsafe).to(out_ty), mask=c < C)
                        tl.store(cp + C, (a * w * num / (dsafe * dsafe)).to(out_ty), mask=c < C)
                total = total * f
            else:
                if RED == RED_MEAN:
                    f = 1.0 / tl.maximum(G * kept, 1).to(tl.float64)
                else:
                    f = _f64(1.0)
                al = _f64(alpha)
                be = _f64(beta)
                gm = _f64(gamma)
                for gi in range(0, G):
                    base = sums_ptr + i64(gi) * 4 * C
                    for c0 in range(0, C, BC):
                        c = c0 + cs
                        cm = (c < C) & (c >= FIRST)
                        Ic = tl.load(base + c, mask=cm, other=0.0).to(tl.float64)
                        Pc = tl.load(base + C + c, mask=cm, other=0.0).to(tl.float64)
                        Gc = tl.load(base + 2 * C + c, mask=cm, other=0.0).to(tl.float64)
                        w = tl.full([BC], 1.0, tl.float64)
                        if HAS_W:
                            w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float64)
                        if KIND == KIND_DICE:
                            num = 2.0 * Ic + nr
                            if JACCARD:
                                den = 2.0 * (Pc + Gc - Ic) + dr
                            else:
                                den = Pc + Gc + dr
                            ok = den != 0.0
                            dsafe = tl.where(ok, den, 1.0)
                            term = tl.where(ok, 1.0 - num / dsafe, 0.0)
                            if JACCARD:
                                di = -2.0 * (den + num) / (dsafe * dsafe)
                                dp = 2.0 * num / (dsafe * dsafe)
                            else:
                                di = -2.0 / dsafe
                                dp = num / (dsafe * dsafe)
                        else:
                            num = Ic + nr
                            den = Ic + al * (Pc - Ic) + be * (Gc - Ic) + dr
                            ok = den != 0.0
                            dsafe = tl.where(ok, den, 1.0)
                            tb = tl.where(ok, 1.0 - num / dsafe, 0.0)
                            if GAMMA_ONE:
                                term = tb
                                k = tl.full([BC], 1.0, tl.float64)
                            else:
                                # (1 − T)^γ, and 0 with gradient 0 where 1 − T <= 0 (the reference)
                                pos = tb > 0.0
                                lg = tl.log(tl.where(pos, tb, 1.0))
                                term = tl.where(pos, tl.exp(gm * lg), 0.0)
                                k = tl.where(pos, gm * tl.exp((gm - 1.0) * lg), 0.0)
                            di = -k * (den - (1.0 - al - be) * num) / (dsafe * dsafe)
                            dp = k * al * num / (dsafe * dsafe)
                        wt = tl.where(cm, w * term, 0.0)
                        if RED == RED_NONE:
                            tl.store(loss_ptr + (i64(gi) * kept + c - FIRST), wt.to(out_ty), mask=cm)
                        total += wt
                        sa = tl.where(cm, tl.where(ok, f * lam * gs * w, 0.0), 0.0)
                        cp = coef_ptr + i64(gi) * 2 * C + c
                        tl.store(cp, (sa * di).to(out_ty), mask=c < C)
                        tl.store(cp + C, (sa * dp).to(out_ty), mask=c < C)
                total = total * f
            loss = tl.sum(total, 0)
            if CE:
                # as torch's cross_entropy: a weight enters only through the pixels of its class, the mean
                # over Σ w_y, a zero Σ w_y gives 0
                lce = _f64(lam_ce)
                numer = tl.zeros([BC], tl.float64)
                denom = tl.zeros([BC], tl.float64)
                for c0 in range(0, C, BC):
                    c = c0 + cs
                    cm = c < C
                    n = tl.zeros([BC], tl.float64)
                    ls = tl.zeros([BC], tl.float64)
                    for gi in range(0, G):
                        base = sums_ptr + i64(gi) * 4 * C
                        n += tl.load(base + 2 * C + c, mask=cm, other=0.0).to(tl.float64)
                        ls += tl.load(base + 3 * C + c, mask=cm, other=0.0).to(tl.float64)
                    w = tl.full([BC], 1.0, tl.float64)
                    if HAS_CEW:
                        w = tl.load(cew_ptr + c, mask=cm, other=0.0).to(tl.float64)
                    present = cm & (n > 0)
                    numer += tl.where(present, w * ls, 0.0)
                    denom += tl.where(present, w * n, 0.0)
                d = tl.sum(denom, 0)
                if RED == RED_MEAN:
                    b = tl.where(d != 0.0, 1.0 / tl.where(d != 0.0, d, 1.0), 0.0)
                else:
                    b = _f64(1.0)
                for c0 in range(0, C, BC):
                    c = c0 + cs
                    cm = c < C
                    w = tl.full([BC], 1.0, tl.float64)
                    if HAS_CEW:
                        w = tl.load(cew_ptr + c, mask=cm, other=0.0).to(tl.float64)
                    tl.store(ce_ptr + c, (lce * w * b * gs).to(out_ty), mask=cm)
                loss = lam * loss + lce * tl.sum(numer, 0) * b
            if RED != RED_NONE:
                tl.store(loss_ptr, loss.to(out_ty))

    @triton.jit
    def _dice_coefs(cf, up, u_sc, first, c, C):
        """(a_I, a_P) of class c: the coefficients times the upstream gradient of its term."""
        u = tl.load(up + (c - first) * u_sc, mask=c >= first, other=0.0)
        return tl.load(cf + c) * u, tl.load(cf + C + c) * u

    @triton.jit
    def _dice_bwd_group(
        xp,
        stride_c,
        pmask,
        c0,
        m,
        s,
        q,
        xy,
        y32,
        cf,
        up,
        u_sc,
        first,
        C,
        acc_ty: tl.constexpr,
        NCLS: tl.constexpr,
        SQUARED: tl.constexpr,
        NEED_XY: tl.constexpr,
    ):
        """Fold classes c0 .. c0 + NCLS − 1 into the running max m, Σ e and q = Σ e·a_P (Σ e²·a_P): a max
        pass over their logits, the sums rescaled once, then an exp pass over the same values, which keeps
        the label's logit xy with a select (NEED_XY)."""
        gm = m
        xg = xp + c0 * stride_c
        for k in tl.static_range(NCLS):
            gm = tl.maximum(gm, tl.load(xg + k * stride_c, mask=pmask, other=0.0).to(acc_ty))
        ms = tl.where(gm == float("-inf"), 0.0, gm)
        alpha = tl.exp(m - ms)  # 0 while m is still -inf (the sums are 0 then too)
        s = s * alpha
        if SQUARED:
            q = q * (alpha * alpha)
        else:
            q = q * alpha
        for k in tl.static_range(NCLS):
            x = tl.load(xg + k * stride_c, mask=pmask, other=0.0).to(acc_ty)
            if acc_ty == tl.float64:
                e = tl.exp(x - ms)
            else:
                e = tl.exp2((x - ms) * LOG2E)
            s += e
            if NEED_XY:
                xy = tl.where(y32 == c0 + k, x, xy)
            ai, ap = _dice_coefs(cf, up, u_sc, first, c0 + k, C)
            if SQUARED:
                q += e * e * ap.to(acc_ty)
            else:
                q += e * ap.to(acc_ty)
        return gm, s, q, xy

    @triton.jit
    def _dice_grad_group(
        xp,
        gq,
        stride_c,
        gstride_c,
        pmask,
        valid,
        y32,
        ms,
        inv,
        shift,
        a,
        c0,
        cf,
        up,
        u_sc,
        first,
        C,
        acc_ty: tl.constexpr,
        NCLS: tl.constexpr,
        SQUARED: tl.constexpr,
    ):
        """Store the gradient of classes c0 .. c0 + NCLS − 1 (unrolled)."""
        xg = xp + c0 * stride_c
        gg = gq + c0 * gstride_c
        for k in tl.static_range(NCLS):
            x = tl.load(xg + k * stride_c, mask=pmask, other=0.0).to(acc_ty)
            if acc_ty == tl.float64:
                p = tl.exp(x - ms) * inv
            else:
                p = tl.exp2((x - ms) * LOG2E) * inv
            ai, ap = _dice_coefs(cf, up, u_sc, first, c0 + k, C)
            ap = ap.to(acc_ty)
            if SQUARED:
                gk = 2.0 * ap * p
            else:
                gk = ap
            lab = y32 == c0 + k
            d = p * (gk + tl.where(lab, ai.to(acc_ty), 0.0) + shift) - tl.where(lab, a, 0.0)
            # 0 at pixels that are not valid, even where their logits are inf or NaN
            tl.store(gg + k * gstride_c, tl.where(valid, d, 0.0).to(gq.dtype.element_ty), mask=pmask)

    @triton.jit
    def _dice_bwd_kernel(
        x_ptr,  # logits, element (b, c, s) at b*stride_b + c*stride_c + s*stride_s
        t_ptr,  # (N,) labels
        coef_ptr,  # (groups, 2, C) the forward's ∂L/∂I, ∂L/∂P; its dtype sets the arithmetic
        ce_ptr,  # (C,) the cross-entropy's per-class factor (CE)
        gp_ptr,  # the upstream gradient: the term (g, c)'s at g*u_ss + (c − first)*u_sc; element 0 the scalar one
        g_ptr,  # gradient out, x's dtype and layout
        S,
        tiles_per_b,
        tiles_per_g,
        stride_b,
        stride_c,
        stride_s,  # logits strides
        gstride_b,
        gstride_c,
        gstride_s,  # gradient strides
        u_ss,
        u_sc,
        first,  # the upstream gradient's strides (0 for a scalar loss) and first class
        ignore_index,
        C: tl.constexpr,
        GROUP: tl.constexpr,
        LOOP: tl.constexpr,
        SQUARED: tl.constexpr,
        CE: tl.constexpr,
        ROWS: tl.constexpr,
        VEC: tl.constexpr,
    ):
        acc_ty = coef_ptr.dtype.element_ty
        pid = tl.program_id(0)
        grp = tl.program_id(1)
        nprog = tl.num_programs(0)
        sc = i64(stride_c)
        gsc = i64(gstride_c)
        g64 = grp.to(tl.int64)
        cf = coef_ptr + g64 * (2 * C)
        up = gp_ptr + g64 * u_ss
        t0 = g64 * tiles_per_g
        FULL: tl.constexpr = (C // GROUP) * GROUP
        for t in range(pid, tiles_per_g, nprog):
            b, s, n, pmask, valid, bad, y32, badv = tile_pixels(
                t_ptr, t0 + t, tiles_per_b, S, ignore_index, C, ROWS, VEC
            )
            xp = x_ptr + (b * stride_b + s * stride_s)
            gq = g_ptr + (b * gstride_b + s * gstride_s)
            m = tl.full([ROWS, VEC], float("-inf"), acc_ty)
            ssum = tl.zeros([ROWS, VEC], acc_ty)
            q = tl.zeros([ROWS, VEC], acc_ty)
            # The label's logit (0 where not valid: y32 = -1). Where a tile's pixels are contiguous and its
            # classes unrolled, kept by the exp pass with a select: a gather after the pass takes a sector
            # per lane (82 % load sector efficiency for 16-bit logits at 19 classes, 95 % with the select,
            # sm90_memory). Beyond (LOOP: 92-96 % with the gather; the select carried through the loop
            # spilled at 150 float32 classes) and with strided pixels (the class loads are a sector per lane
            # too), a gather.
            SELECT_XY: tl.constexpr = VEC > 1 and not LOOP
            xy = tl.zeros([ROWS, VEC], acc_ty)
            if LOOP:
                for c0 in range(0, FULL, GROUP):
                    m, ssum, q, xy = _dice_bwd_group(
                        xp, sc, pmask, c0, m, ssum, q, xy, y32, cf, up, u_sc, first, C, acc_ty, GROUP,
                        SQUARED, SELECT_XY,
                    )  # fmt: skip
            else:
                for c0 in tl.static_range(0, FULL, GROUP):
                    m, ssum, q, xy = _dice_bwd_group(
                        xp, sc, pmask, c0, m, ssum, q, xy, y32, cf, up, u_sc, first, C, acc_ty, GROUP,
                        SQUARED, SELECT_XY,
                    )  # fmt: skip
            if C % GROUP:
                m, ssum, q, xy = _dice_bwd_group(
                    xp, sc, pmask, FULL, m, ssum, q, xy, y32, cf, up, u_sc, first, C, acc_ty, C % GROUP,
                    SQUARED, SELECT_XY,
                )  # fmt: skip
            ms = tl.where(m == float("-inf"), 0.0, m)
            inv = 1.0 / ssum
            if not SELECT_XY:
                xy = tl.load(xp + y32 * sc, mask=valid, other=0.0).to(acc_ty)
            if acc_ty == tl.float64:
                py = tl.exp(xy - ms) * inv
            else:
                py = tl.exp2((xy - ms) * LOG2E) * inv
            uy = tl.load(up + (y32 - first) * u_sc, mask=valid & (y32 >= first), other=0.0).to(acc_ty)
            aiy = tl.load(cf + y32, mask=valid, other=0.0).to(acc_ty) * uy
            # Σ_c p_c g_c with g_c = a_I[c]·[c = y] + a_P[c] (2 a_P[c] p_c with squared)
            if SQUARED:
                dot = py * aiy + 2.0 * q * inv * inv
            else:
                dot = py * aiy + q * inv
            a = tl.zeros([ROWS, VEC], acc_ty)
            if CE:
                a = tl.load(ce_ptr + y32, mask=valid, other=0.0).to(acc_ty) * tl.load(gp_ptr).to(acc_ty)
            shift = a - dot
            if LOOP:
                for c0 in range(0, FULL, GROUP):
                    _dice_grad_group(
                        xp,
                        gq,
                        sc,
                        gsc,
                        pmask,
                        valid,
                        y32,
                        ms,
                        inv,
                        shift,
                        a,
                        c0,
                        cf,
                        up,
                        u_sc,
                        first,
                        C,
                        acc_ty,
                        GROUP,
                        SQUARED,
                    )
            else:
                for c0 in tl.static_range(0, FULL, GROUP):
                    _dice_grad_group(
                        xp,
                        gq,
                        sc,
                        gsc,
                        pmask,
                        valid,
                        y32,
                        ms,
                        inv,
                        shift,
                        a,
                        c0,
                        cf,
                        up,
                        u_sc,
                        first,
                        C,
                        acc_ty,
                        GROUP,
                        SQUARED,
                    )
            if C % GROUP:
                _dice_grad_group(
                    xp,
                    gq,
                    sc,
                    gsc,
                    pmask,
                    valid,
                    y32,
                    ms,
                    inv,
                    shift,
                    a,
                    FULL,
                    cf,
                    up,
                    u_sc,
                    first,
                    C,
                    acc_ty,
                    C % GROUP,
                    SQUARED,
                )


def _geometry(x, flags, grad=None):
    """(groups, images per group, S, x strides, grad strides) of the pixel view, strides as (b, c, s).

    With one group (BATCH, or (N, C) rows) the images are folded into one run of pixels whenever one
    stride walks them in both tensors, so that tiles do not stop at an image boundary."""
    B, C, S, sb, sc, ss = pixel_view(x)
    gsb, gsc, gss = pixel_view(grad)[3:] if grad is not None else (sb, sc, ss)
    if groups(x, flags) != 1:
        return B, 1, S, (sb, sc, ss), (gsb, gsc, gss)
    if S == 1:
        return 1, 1, B, (0, sc, sb), (0, gsc, gsb)
    if B == 1 or (sb == S * ss and gsb == S * gss):
        return 1, 1, B * S, (0, sc, ss), (0, gsc, gss)
    return 1, B, S, (sb, sc, ss), (gsb, gsc, gss)


def _plan(C, S, ss, itemsize, forward):
    """(ROWS, VEC, GROUP, LOOP) as the static loss kernels' plan: VEC = 4 consecutive pixels per thread
    when pixels are contiguous (one pixel in float64, whose registers are twice as many), one pixel per
    thread otherwise; GROUP classes per max/exp group (a thread holds about _GROUP_VALUES logits). The
    forward holds three or four per-class sums per thread beside the logits: VEC = 2 beyond 8 classes
    (4 spilled on sm_90 with 19 classes and the cross-entropy); the backward its coefficients: VEC = 2
    from 21 to 24 classes (4 spilled with 24; benchmarks/sm90_dice.py)."""
    if ss != 1 or itemsize == 8:
        vec = 1
    elif forward:
        vec = 4 if C <= 8 else 2
    else:
        vec = 2 if 20 < C <= _REG_C else 4
    rows = 32 * _WARPS
    values = _GROUP_VALUES // (2 if itemsize == 8 else 1)
    cap = max(1, values // vec)
    loop = C > _REG_C
    if loop:
        group = min(cap, _LOOP_GROUP // 2 if itemsize == 8 else _LOOP_GROUP)
    else:
        group = _cdiv(C, _cdiv(C, cap))
    if _interpret():
        rows *= _INTERPRET_TILE_SCALE
    rows = max(1, min(rows, _np2(_cdiv(max(S, 1), vec))))
    return rows, vec, group, loop


def _programs_per_group(tiles, G, device):
    """Persistent programs of each group: enough for _RESIDENT_WARPS warps per SM over all the groups."""
    cap = _sms(device) * max(1, _RESIDENT_WARPS // _WARPS) if device.type == "cuda" else _INTERPRET_PROGRAMS
    return max(1, min(tiles, _cdiv(cap, max(G, 1))))


class _Pass(NamedTuple):
    """A pass's launch plan: the geometry (:func:`_geometry`), the tiling (:func:`_plan`) and the grid."""

    G: int
    ipg: int
    S: int
    xs: tuple  # the logits' (b, c, s) strides
    gs: tuple  # the gradient's
    rows: int
    vec: int
    group: int
    loop: bool
    tiles_per_b: int
    tiles_per_g: int
    P: int  # programs per group


_passes = plan_cache()


def _pass(x, flags, forward, grad=None):
    """The :class:`_Pass` of a forward or (``grad`` the gradient's tensor) backward pass over ``x``, cached
    per shape, strides, dtype, device and grouping, so that a training step's repeated call looks it up."""
    key = (
        x.shape, x.stride(), None if grad is None else grad.stride(), x.dtype, x.device, int(flags) & BATCH,
        forward,
    )  # fmt: skip
    cache = cacheable(x)
    plan = _passes.get(key) if cache else None
    if plan is None:
        G, ipg, S, xs, gs = _geometry(x, flags, grad)
        rows, vec, group, loop = _plan(x.shape[1], S, xs[2], x.element_size(), forward)
        tiles_per_b = _cdiv(S, rows * vec)
        P = _programs_per_group(ipg * tiles_per_b, G, x.device)
        plan = _Pass(G, ipg, S, xs, gs, rows, vec, group, loop, tiles_per_b, ipg * tiles_per_b, P)
        if cache:
            remember(_passes, key, plan)
    return plan


def _check_args(op, x, target, weight=None, ce_weight=None, confusion=None):
    """The sizes a launch indexes with, checked before it (as the C++ ops do)."""

    def fail(message):
        raise RuntimeError(f"fused_imbalance: {op}: {message}")

    if x.dim() < 2 or x.shape[1] < 1:
        fail(f"logits must be (N, C) or (B, C, ...) with C >= 1, got shape {tuple(x.shape)}")
    if not collapsible(x):
        fail(
            f"logits of shape {tuple(x.shape)} and strides {x.stride()} do not collapse into one pixel stride: "
            "pass them .contiguous()"
        )
    C, pixels = x.shape[1], x.shape[0]
    for d in x.shape[2:]:
        pixels *= d
    if target.numel() != pixels or target.device != x.device or not target.is_contiguous():
        fail(
            f"target must be {pixels} contiguous labels on {x.device}, got {target.numel()} on {target.device}"
        )
    for name, t in (("weight", weight), ("ce_weight", ce_weight)):
        if t is not None and (t.dim() != 1 or t.numel() != C or t.device != x.device):
            fail(f"{name} must be a ({C},) tensor on {x.device}, got shape {tuple(t.shape)} on {t.device}")
    if confusion is not None and (
        confusion.shape != (C, C)
        or confusion.dtype != torch.int64
        or confusion.device != x.device
        or not confusion.is_contiguous()
    ):
        fail(f"confusion must be a contiguous ({C}, {C}) int64 tensor on {x.device}")


def _finalize(
    rows, brow, sums, R, weight, ce_weight, out, kind, w_type, flags, prm, reduction, grad_scale, steps
):
    """One launch of the finalize kernel: ``steps`` = (REDUCE, BAD, COMPUTE)."""
    loss, coef, ce_scale, bad = out
    dev = sums.device
    acc = sums.dtype
    G, _, C = sums.shape
    reduce, take_bad, compute = steps
    wrap(_dice_finalize_kernel)[(1,)](
        rows if rows is not None else _dummy(dev, acc),
        brow if brow is not None else _dummy(dev, torch.int64),
        sums,
        weight if weight is not None else _dummy(dev, acc),
        ce_weight if ce_weight is not None else _dummy(dev, acc),
        loss if loss is not None else _dummy(dev, acc),
        coef if coef is not None else _dummy(dev, acc),
        ce_scale if ce_scale is not None and ce_scale.numel() else _dummy(dev, acc),
        bad if bad is not None else _dummy(dev, torch.int64),
        R,
        brow.shape[0] if brow is not None else 0,
        G,
        C,
        *prm,
        float(grad_scale),
        KIND=int(kind),
        W_TYPE=int(w_type),
        FIRST=0 if int(flags) & INCLUDE_BACKGROUND else 1,
        JACCARD=bool(int(flags) & JACCARD),
        GAMMA_ONE=prm[4] == 1.0,
        CE=bool(int(flags) & CE),
        RED=int(reduction),
        HAS_W=weight is not None,
        HAS_CEW=ce_weight is not None,
        REDUCE=reduce,
        BAD=take_bad,
        COMPUTE=compute,
        BR=_FIN_BR,
        BC=min(_np2(C), _FIN_BC),
        num_warps=_FIN_WARPS,
    )


def _outputs(sums, kind, flags, reduction):
    G, _, C = sums.shape
    ce = bool(int(flags) & CE)
    return (
        sums.new_empty(loss_shape(G, C, kind, flags, reduction)),
        sums.new_empty((G, 2, C)),
        sums.new_empty(C if ce else 0),
    )


def _forward(
    x,
    target,
    weight,
    ce_weight,
    confusion,
    kind,
    w_type,
    flags,
    prm,
    ignore_index,
    reduction,
    validate,
    finalize,
):
    """The forward op's launcher: the pass, then the finalize (a reduce launch first for a large table).
    ``validate`` is the caller's: this backend returns the bad labels and never waits for the device."""
    acc = acc_dtype(x)
    C = x.shape[1]
    dev = x.device
    pl = _pass(x, flags, True)
    G, S, (sb, sc, ss), P = pl.G, pl.S, pl.xs, pl.P
    rows_, vec, group, loop, tiles_per_b, tiles_per_g = (
        pl.rows,
        pl.vec,
        pl.group,
        pl.loop,
        pl.tiles_per_b,
        pl.tiles_per_g,
    )
    sums = x.new_empty((G, 4, C), dtype=acc)
    bad = x.new_empty(2, dtype=torch.int64)
    with _on_device(x):
        rows = x.new_empty((G * P, 4, C), dtype=acc)
        brow = x.new_empty((G * P, 2), dtype=torch.int64)
        if G > 0:
            if confusion is None:
                conf_mode, conf_bins, conf = 0, 1, _dummy(dev, torch.int64)
            elif C * C <= 1024:
                conf_mode, conf_bins, conf = 1, _np2(C * C), confusion
            else:
                conf_mode, conf_bins, conf = 2, 1, confusion
            wrap(_dice_fwd_kernel)[(P, G)](
                x,
                target,
                rows,
                brow,
                conf,
                S,
                tiles_per_b,
                tiles_per_g,
                sb,
                sc,
                ss,
                ignore_index,
                C=C,
                GROUP=group,
                LOOP=loop,
                SQUARED=bool(int(flags) & SQUARED),
                CE=bool(int(flags) & CE),
                CONF=conf_mode,
                CONF_BINS=conf_bins,
                ROWS=rows_,
                VEC=vec,
                CP=_np2(C),
                SUM_GROUP=_SUM_GROUP,
                num_warps=_WARPS,
            )
        big = G * P * 4 * C > _FINALIZE_ELEMS
        if big:
            bc = min(_np2(C), _FIN_BC)
            wrap(_dice_reduce_kernel)[(G, _cdiv(C, bc))](
                rows, brow, sums, bad, P, G * P, C, BR=_FIN_BR, BC=bc
            )
        if finalize:
            out = _outputs(sums, kind, flags, reduction)
            _finalize(
                None if big else rows,
                brow,
                sums,
                P,
                weight,
                ce_weight,
                out + (bad,),
                kind,
                w_type,
                flags,
                prm,
                reduction,
                1.0,
                (not big, not big, True),
            )
            return (out[0], sums, out[1], out[2], bad)
        if not big:
            _finalize(
                rows,
                brow,
                sums,
                P,
                None,
                None,
                (None, None, None, bad),
                kind,
                w_type,
                flags,
                prm,
                reduction,
                1.0,
                (True, True, False),
            )
    return x.new_empty(0, dtype=acc), sums, x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc), bad


def _finalize_op(sums, weight, ce_weight, kind, w_type, flags, prm, reduction, grad_scale):
    out = _outputs(sums, kind, flags, reduction)
    with _on_device(sums):
        _finalize(
            None,
            None,
            sums.contiguous(),
            1,
            weight,
            ce_weight,
            out + (None,),
            kind,
            w_type,
            flags,
            prm,
            reduction,
            grad_scale,
            (False, False, True),
        )
    return out


def _backward(x, target, coef, ce_scale, grad, kind, flags, ignore_index, reduction):
    """The backward op's launcher: one launch."""
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx
    C = x.shape[1]
    pl = _pass(x, flags, False, dx)
    G, S, (sb, sc, ss), (gsb, gsc, gss), P = pl.G, pl.S, pl.xs, pl.gs, pl.P
    u_ss, u_sc, first = upstream_index(grad, G, C, kind, flags, reduction)
    if grad.numel() > 1 and all(st == 0 for st in grad.stride()):
        g, u_ss, u_sc = grad, 0, 0  # autograd's expansion of one value (a sum of the terms): no copy
    else:
        g = grad.reshape(-1)
        if not g.is_contiguous():
            g = g.contiguous()
    rows_, vec, group, loop, tiles_per_b, tiles_per_g = (
        pl.rows,
        pl.vec,
        pl.group,
        pl.loop,
        pl.tiles_per_b,
        pl.tiles_per_g,
    )
    ce = bool(int(flags) & CE)
    with _on_device(x):
        wrap(_dice_bwd_kernel)[(P, G)](
            x,
            target,
            coef,
            ce_scale if ce else coef,
            g,
            dx,
            S,
            tiles_per_b,
            tiles_per_g,
            sb,
            sc,
            ss,
            gsb,
            gsc,
            gss,
            u_ss,
            u_sc,
            first,
            ignore_index,
            C=C,
            GROUP=group,
            LOOP=loop,
            SQUARED=bool(int(flags) & SQUARED),
            CE=ce,
            ROWS=rows_,
            VEC=vec,
            num_warps=_WARPS,
        )
    return dx


if triton is not None:

    @torch.library.triton_op("fused_imbalance::triton_dice_fwd", mutates_args=("confusion",))
    def dice_fwd(
        x: torch.Tensor,
        target: torch.Tensor,
        weight: Optional[torch.Tensor],
        ce_weight: Optional[torch.Tensor],
        confusion: Optional[torch.Tensor],
        kind: int,
        w_type: int,
        flags: int,
        params: list[float],
        ignore_index: int,
        reduction: int,
        validate: bool,
        finalize: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_args("triton_dice_fwd", x, target, weight, ce_weight, confusion)
        return tuple(
            _forward(
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
            )
        )

    @dice_fwd.register_fake
    def _dice_fwd_fake(
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

    @torch.library.triton_op("fused_imbalance::triton_dice_finalize", mutates_args=())
    def dice_finalize(
        sums: torch.Tensor,
        weight: Optional[torch.Tensor],
        ce_weight: Optional[torch.Tensor],
        kind: int,
        w_type: int,
        flags: int,
        params: list[float],
        reduction: int,
        grad_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if sums.dim() != 3 or sums.shape[1] != 4:
            raise RuntimeError(
                f"fused_imbalance: triton_dice_finalize: sums must be (S, 4, C), got {tuple(sums.shape)}"
            )
        return tuple(
            _finalize_op(sums, weight, ce_weight, kind, w_type, flags, params, reduction, grad_scale)
        )

    @dice_finalize.register_fake
    def _dice_finalize_fake(sums, weight, ce_weight, kind, w_type, flags, params, reduction, grad_scale):
        return finalize_fake(sums, kind, flags, reduction)

    @torch.library.triton_op("fused_imbalance::triton_dice_bwd", mutates_args=())
    def dice_bwd(
        x: torch.Tensor,
        target: torch.Tensor,
        coef: torch.Tensor,
        ce_scale: Optional[torch.Tensor],
        grad: torch.Tensor,
        kind: int,
        flags: int,
        ignore_index: int,
        reduction: int,
    ) -> torch.Tensor:
        _check_args("triton_dice_bwd", x, target)
        G, C = groups(x, flags), x.shape[1]
        if coef.numel() != G * 2 * C or (int(flags) & CE and (ce_scale is None or ce_scale.numel() != C)):
            raise RuntimeError(
                f"fused_imbalance: triton_dice_bwd: coef must be ({G}, 2, {C}) and ce_scale ({C},)"
            )
        return _backward(x, target, coef, ce_scale, grad, kind, flags, ignore_index, reduction)

    @dice_bwd.register_fake
    def _dice_bwd_fake(x, target, coef, ce_scale, grad, kind, flags, ignore_index, reduction):
        return torch.empty_like(x)


_backend = None


def backend():
    """The Triton :class:`~.dice.DiceBackend`."""
    global _backend
    if _backend is None:
        if triton is None:
            raise RuntimeError("fused_imbalance: the Triton backend needs the triton package")
        _backend = DiceBackend("triton", _forward, _finalize_op, _backward, dice_fwd, dice_finalize, dice_bwd)
    return _backend
