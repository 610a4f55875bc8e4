"""The Triton backend of the upsampled loss ops (docs/DESIGN.md §10):
``fused_imbalance::triton_upsample_loss_fwd`` / ``triton_upsample_loss_bwd``.

Same contract as the C++ ops (:mod:`.upsample`): the loss of ``F.interpolate(x, size=(H, W),
mode, align_corners)`` for low-resolution logits x (B, C, h, w), any strides (NCHW and
channels_last read in place), without a tensor of B·C·H·W elements.

Interpolation. The source indices and weights of each axis are small tables (H and W entries)
computed on the device with torch's own formulas (aten/native/UpSample.h: area_pixel_compute_
source_index and guard_index_and_lambda in the accumulation dtype, the float index; nearest_idx
with its float scale and the 1x / 2x special cases) exactly as the C++ kernels compute them. It
is separable, in torch's order: the horizontal pass of a low-resolution row at an output column
X, h_y(X) = x[y, x0(X)]·wx0(X) + x[y, x1(X)]·wx1(X), then the vertical blend of two such rows,
h_{y0(Y)}(X)·wy0(Y) + h_{y1(Y)}(X)·wy1(Y), in float32 for 16-bit and float32 logits, float64 for
float64. An axis whose size does not change, and every "nearest" axis, has one tap of weight 1
(``TAP2_* = False``): those values are copied, as torch copies them. On a two-tap axis the second
source index is min(x0 + 1, w - 1), so only x0 is tabulated. Output rows (columns) whose first
source row (column) is y form a contiguous range [sy0[y], sy1[y]) (the source index is
nondecreasing): the kernels walk those segments.

The classes are a compile-time loop (``tl.static_range``, C a constexpr, one compiled kernel per
class count as in the static kernels of :mod:`.triton_kernels`, whose per-pixel helpers these
kernels share): nothing is padded to a power of two and every reduction over classes is a
running value in a thread's registers. Up to ``_CACHE_C`` classes (backward: ``_FUSED_C``; fewer
in float64) one group holds them all; beyond, forward groups of at most 12 (6 with the argmax, 6 in
float64, 4 for the sigmoid focal terms) in a loop over groups, and backward groups of at most 19
(16 in a loop, beyond 32 classes; 5 for the sigmoid focal terms; 4 in float64, 2 for its sigmoid
focal terms). Offsets inside an image are 32-bit unless one image of logits spans 2**31 elements
(``OFF64``); image and pixel bases are int64.

Forward (``_up_fwd_kernel``). A program owns R consecutive low-resolution rows of one image and
BLOCK_X consecutive output columns, one column per thread: it walks the rows y of its band and,
for each, the output rows Y of segment y in steps of TY rows, i.e. every output row whose first
source row is in the band. (On a GPU TY is 1 with cached rows and while the statistics are
per-thread registers, since more rows per thread ran out of registers, and with class groups beyond
32 classes up to 4, about a whole segment; the interpreter, whose cost is per step, takes a whole
segment and one band per image.)
With C <= ``_CACHE_C`` the horizontal passes of rows y and y + 1 are kept in registers
(2·C values per thread), computed once per low-resolution row of the band (R + 1 per band) and
reused by the H/h output rows of the segment; beyond, each step recomputes them per class
group (4 gathered loads, cache hits, and 3 multiply-adds per class, for the TY rows of the step). Per pixel:
the label, the
softmax in one max pass and one exp pass over the group's interpolated values, or the per-class
terms of the elementwise modes; the label's interpolated logit is 4 gathered loads per pixel.
Class statistics as in the static forward: per-thread registers (a predicated add per pixel, class
and sum; the counts float32, exact below 2**24) written once per program as a
row of a (programs, C) table summed here in a fixed order (C <= 32), else the per-pixel loss
summed per class by ``_class_sum_kernel`` and integer atomics into per-program rows.

Backward (``_up_bwd_kernel``, deterministic, no float atomics). The transposed interpolation is
separable too: the gradient of low-resolution element (y, x) is Σ over the output pixels that
read it of wy·wx·g. A program owns R low-resolution rows x BLOCK_X - 1 low-resolution columns of
one image; lane i is column x_i, and one extra lane (the column left of the block) is a halo. For
each low-resolution row yy of the band (plus the row above, a halo, on a two-tap vertical axis)
lane i walks the output columns X of its segment (the columns whose first source column is x_i)
and, inside, the output rows Y of segment yy: every output pixel is visited by exactly one lane
and one row of the walk (halos apart). There it recomputes the interpolated logits (all of a
lane's columns read the same two source columns: their values in rows yy and yy + 1 are loaded once
per row, row yy + 1's kept for the next row; the horizontal passes at column X are blended from them
once per column and reused over the rows), the loss gradient g of each class, and adds wy0·wx0·g,
wy0·wx1·g, wy1·wx0·g, wy1·wx1·g into four per-thread accumulators: (row yy, column x_i), (yy, x_i + 1), (yy +
1, x_i), (yy + 1, x_i + 1)
(steps of TJ columns x TY rows: 1 x 1 on a GPU, whole segments in the interpreter).
When row yy is done its elements are complete: column x_i's value is its own first accumulator
plus the second of lane i - 1 (one ``tl.gather`` per low-resolution element); the yy + 1
accumulators carry over to the next row. With C <= ``_FUSED_C`` the softmax of each pixel is
computed in the same pass (one exp per logit, kept for the gradient); with more classes (the
exponentials of every class as well as the accumulators and taps ran out of registers) the
class groups are the outer loop and a first launch of the forward kernel stores per output pixel
the scalars the gradient needs (a, lse, q: ``COEF``; ``PRE`` = 1), O(B·H·W). For the softmax focal
losses the forward keeps them when autograd records it (``need_lse``, :func:`keeps_lse`): each
pixel's lse and, with γ != 0, its focal weight; a is the upstream weight times that weight (or -1),
and there is no launch: the gradient pass reads them itself (``PRE`` = 2). Every gradient element is the
same sum in the same order whatever the grid, so results are bit-identical run to run.

Cost model, per output logit (C classes, N = B·H·W output pixels, n = B·h·w inputs; the byte
floor is the labels plus the low-resolution logits once, or three times for the backward):

* forward, C <= ``_CACHE_C``: the vertical blend (2 multiply-adds), max, exp (a multiply-add and 1
  MUFU), sum, the statistics (a compare and predicated adds), plus about (1 + 1/R)·(h/H) horizontal passes (2
  loads, 2 multiply-adds); per pixel the label, 4 gathered loads of its logit, the loss.
* backward, C <= ``_FUSED_C``: the vertical blend, the softmax (1 exp), the gradient (3), four
  multiply-adds into the accumulators, the horizontal passes (2 multiply-adds each) per column
  amortised over the H/h rows of a segment, 2 loads per class, lane and low-resolution row;
  redundant work: the halo row (1/R of the rows) and the halo column (1/BLOCK_X).
* more classes: forward + 4 gathered loads and 3 multiply-adds per class and step of TY rows for the
  interpolation (C > ``_CACHE_C``); backward (C > ``_FUSED_C``) the gradient needs one exp per logit and the
  horizontal passes once per group, plus the coefficient launch (a forward without statistics)
  and 8-12 bytes per output pixel written and read back; the softmax focal losses from what the
  forward kept: 4-8 bytes per output pixel written by the forward and read per group.
``benchmarks/sm90_upsample_driver.py`` estimates what this costs on an H100 (compile-only).

What bounds it: every softmax mode needs at least one exponential per output logit, and the
special-function unit that computes it retires 16 per clock per SM on sm_90, an eighth of the
issue rate: about 1.3 exponentials per byte of an H100's copy bandwidth. At 4x upsampling the
byte floor is only 0.2-0.7 bytes per output logit, so these passes need 1.5 (19 float32 classes)
to 5.6 (150 bfloat16 classes) exponentials per byte: they are compute-bound by construction, and
their ceiling is the special-function rate (about 85 % of the floor's speed for 19 float32
classes, 23 % for 150 bfloat16 classes), not the memory.
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
    finalize,
    grad_arg,
    outputs,
)
from ._args import check_tensor_args
from .upsample import Interp, check_lse

try:
    import triton
    import triton.language as tl

    from ._triton_compat import wrap
    from .triton_kernels import (
        _LOG2E,
        _NO_BAD,
        _bwd_softmax_coefs,
        _conf_flush,
        _conf_hist,
        _counts_in_memory,
        _focal_coef,
        _gamma,
        _i64,
        _labels,
        _lse,
        _sigmoid_focal_grad,
        _sigmoid_focal_terms,
        _store_bad,
        _take_max,
        _upstream,
        _zero_rows,
    )
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


if triton is not None:

    @triton.jit
    def _in_image(s0, s1, s2, OFF64: tl.constexpr):
        """Three strides as the offsets inside an image are computed: int64 with OFF64, else as given."""
        if OFF64:
            s0 = _i64(s0)
            s1 = _i64(s1)
            s2 = _i64(s2)
        return s0, s1, s2

    @triton.jit
    def _taps(xp, off, o0, o1, m, sc, c0, acc_ty: tl.constexpr, NCLS: tl.constexpr, TAP2_X: tl.constexpr):
        """The low-resolution values of one row (``off`` = its row offset) at the lanes' two source
        columns, classes c0 .. c0 + NCLS - 1: two tuples of NCLS vectors (the same one twice on a
        one-tap axis)."""
        t0 = ()
        t1 = ()
        p0 = xp + o0  # the lanes' pointers, then a scalar offset per class: a 64-bit add per load
        p1 = xp + o1
        for k in tl.static_range(NCLS):
            q = (c0 + k) * sc + off
            t0 = t0 + (tl.load(p0 + q, mask=m, other=0.0).to(acc_ty),)
            if TAP2_X:
                t1 = t1 + (tl.load(p1 + q, mask=m, other=0.0).to(acc_ty),)
        if not TAP2_X:
            t1 = t0
        return t0, t1

    @triton.jit
    def _hblend(t0, t1, wx0, wx1, NCLS: tl.constexpr, TAP2_X: tl.constexpr):
        """Horizontal passes from a row's two taps (:func:`_taps`): torch's two-tap blend, a copy on a one-tap axis."""
        hs = ()
        for k in tl.static_range(NCLS):
            v = t0[k]
            if TAP2_X:
                v = tl.fma(t1[k], wx1, v * wx0)  # explicit: see _vert
            hs = hs + (v,)
        return hs

    @triton.jit
    def _hrow(
        xp, off, o0, o1, wx0, wx1, m, sc, c0, acc_ty: tl.constexpr, NCLS: tl.constexpr, TAP2_X: tl.constexpr
    ):
        """Horizontal passes of one low-resolution row at the lanes' columns, classes c0 .. c0 + NCLS - 1:
        a tuple of NCLS vectors."""
        t0, t1 = _taps(xp, off, o0, o1, m, sc, c0, acc_ty, NCLS, TAP2_X)
        return _hblend(t0, t1, wx0, wx1, NCLS, TAP2_X)

    @triton.jit
    def _vert(ha, hb, wy0, wy1, NCLS: tl.constexpr, TAP2_Y: tl.constexpr):
        """The vertical blend of two tuples of horizontal passes (the first alone on a one-tap axis)."""
        vs = ha
        if TAP2_Y:
            vs = ()
            for k in tl.static_range(NCLS):
                # one fused multiply-add, written out: left to the compilers, a · b + c · d was fused
                # differently in different unrolled classes on an H100, so equal logits of two classes
                # interpolated to values 1 ulp apart and broke argmax's ties
                vs = vs + (tl.fma(hb[k], wy1, ha[k] * wy0),)
        return vs

    @triton.jit
    def _row_vals(
        xp,
        r0,
        r1,
        o0,
        o1,
        wx0,
        wx1,
        wy0,
        wy1,
        m,
        sc,
        c0,
        acc_ty: tl.constexpr,
        NCLS: tl.constexpr,
        TAP2_X: tl.constexpr,
        TAP2_Y: tl.constexpr,
    ):
        """Interpolated logits of classes c0 .. c0 + NCLS - 1 at the lanes' pixels of one output row."""
        ha = _hrow(xp, r0, o0, o1, wx0, wx1, m, sc, c0, acc_ty, NCLS, TAP2_X)
        hb = ha
        if TAP2_Y:
            hb = _hrow(xp, r1, o0, o1, wx0, wx1, m, sc, c0, acc_ty, NCLS, TAP2_X)
        return _vert(ha, hb, wy0, wy1, NCLS, TAP2_Y)

    @triton.jit
    def _interp_at(
        xp,
        co,
        r0,
        r1,
        o0,
        o1,
        wx0,
        wx1,
        wy0,
        wy1,
        m,
        acc_ty: tl.constexpr,
        TAP2_X: tl.constexpr,
        TAP2_Y: tl.constexpr,
    ):
        """The interpolated logit of class offset ``co`` (per lane), the same operations as
        :func:`_row_vals`: 4 gathered loads (one per tap)."""
        p = xp + co
        v = tl.load(p + (r0 + o0), mask=m, other=0.0).to(acc_ty)
        if TAP2_X:
            v = tl.fma(tl.load(p + (r0 + o1), mask=m, other=0.0).to(acc_ty), wx1, v * wx0)
        if TAP2_Y:
            u = tl.load(p + (r1 + o0), mask=m, other=0.0).to(acc_ty)
            if TAP2_X:
                u = tl.fma(tl.load(p + (r1 + o1), mask=m, other=0.0).to(acc_ty), wx1, u * wx0)
            v = tl.fma(u, wy1, v * wy0)
        return v

    @triton.jit
    def _shift(s):
        """The per-pixel form of a softmax shift s for :func:`_exp_minus`: s·log2(e) in float32, s in float64."""
        if s.dtype == tl.float64:
            return s
        else:
            return s * _LOG2E

    @triton.jit
    def _exp_minus(v, sh):
        """exp(v - s) for sh = _shift(s). float32: exp2(v·log2(e) - s·log2(e)), one fused multiply-add and the
        special-function ex2 per logit (tl.exp adds range fix-ups, (v - s)·log2(e) a subtraction); the rounding
        of s·log2(e), once per pixel, scales every term of the pixel alike."""
        if sh.dtype == tl.float64:
            return tl.exp(v - sh)
        else:
            return tl.exp2(tl.fma(v, _LOG2E, -sh))

    @triton.jit
    def _fold(
        vals,
        c0,
        yk,
        tv,
        gamma,
        m,
        s,
        rest,
        s2r,
        lsum,
        bv,
        am,
        NCLS: tl.constexpr,
        MODE: tl.constexpr,
        FOCAL: tl.constexpr,
        NEED_AM: tl.constexpr,
        FIRST: tl.constexpr = False,
    ):
        """Fold one class group's interpolated logits into a pixel's running state: the softmax
        (a max pass, the sums rescaled once, an exp pass: m, s = Σ e_k, rest = Σ_{k≠y} e_k,
        s2r = Σ_{k≠y} e_k², as ``_softmax_group`` of the static kernels), or the per-class terms
        of the elementwise modes (lsum); the argmax when NEED_AM. ``yk`` is the label as
        :func:`_row_state` compares it here; yr = yk - c0 is compared with the constants k. FIRST: the
        pixel's first group (the sums are still 0: nothing to rescale)."""
        yr = yk - c0
        if MODE == 0 or MODE == 3:
            NEED_REST: tl.constexpr = FOCAL or MODE == 3
            gm = m
            for k in tl.static_range(NCLS):
                gm = tl.maximum(gm, vals[k])
            ms = tl.where(gm == float("-inf"), 0.0, gm)
            if not FIRST:
                alpha = tl.exp(m - ms)  # 0 while m is still -inf (the sums are 0 then too)
                s = s * alpha
                if NEED_REST:
                    rest = rest * alpha
                if MODE == 3:
                    s2r = s2r * (alpha * alpha)
            sh = _shift(ms)
            for k in tl.static_range(NCLS):
                e = _exp_minus(vals[k], sh)
                s += e
                if NEED_REST:  # the sums over k != y: predicated adds
                    oh = yr == k
                    rest = tl.where(oh, rest, rest + e)
                    if MODE == 3:
                        s2r = tl.where(oh, s2r, tl.fma(e, e, s2r))
            m = gm
        elif MODE == 1:
            for k in tl.static_range(NCLS):
                lsum += _sigmoid_focal_terms(vals[k], yr == k, gamma, FOCAL)
        elif MODE == 2:
            for k in tl.static_range(NCLS):
                d = vals[k] - tl.where(yr == k, tv, 0.0)
                lsum += d * d
        if NEED_AM:
            for k in tl.static_range(NCLS):
                bv, am = _take_max(vals[k], bv, am, c0 + k)
        return m, s, rest, s2r, lsum, bv, am

    @triton.jit
    def _row_state(
        xp,
        ha,
        hb,
        r0,
        r1,
        o0,
        o1,
        wx0,
        wx1,
        wy0,
        wy1,
        xm,
        sc,
        y32,
        tv,
        gamma,
        acc_ty: tl.constexpr,
        C: tl.constexpr,
        GROUP: tl.constexpr,
        CACHE: tl.constexpr,
        MODE: tl.constexpr,
        FOCAL: tl.constexpr,
        NEED_AM: tl.constexpr,
        TAP2_X: tl.constexpr,
        TAP2_Y: tl.constexpr,
    ):
        """(m, s, rest, s2r, lsum, am) of one output row's pixels over all classes: from the cached
        horizontal rows (CACHE, one group), or per class group (a loop) from the low-resolution logits."""
        # One group (C <= 32): the label as int16 for the class pass's comparisons (exact: it is -1 or below
        # C), the int32 one for the statistics': two different comparisons keep the compiler from holding
        # C predicates from one to the other (it packs them into a register, 3 instructions per class).
        if CACHE:
            yk = y32.to(tl.int16)
        else:
            yk = y32
        m = tl.full(y32.shape, float("-inf"), acc_ty)
        s = tl.zeros(y32.shape, acc_ty)
        rest = tl.zeros(y32.shape, acc_ty)
        s2r = tl.zeros(y32.shape, acc_ty)
        lsum = tl.zeros(y32.shape, acc_ty)
        bv = tl.full(y32.shape, float("-inf"), acc_ty)
        am = tl.zeros(y32.shape, tl.int32)
        if CACHE:
            vals = _vert(ha, hb, wy0, wy1, C, TAP2_Y)
            m, s, rest, s2r, lsum, bv, am = _fold(
                vals, 0, yk, tv, gamma, m, s, rest, s2r, lsum, bv, am, C, MODE, FOCAL, NEED_AM, True
            )
        else:  # a loop over the class groups (unrolled groups spilled)
            FULL: tl.constexpr = (C // GROUP) * GROUP
            for c0 in range(0, FULL, GROUP):
                vals = _row_vals(
                    xp, r0, r1, o0, o1, wx0, wx1, wy0, wy1, xm, sc, c0, acc_ty, GROUP, TAP2_X, TAP2_Y
                )
                m, s, rest, s2r, lsum, bv, am = _fold(
                    vals, c0, yk, tv, gamma, m, s, rest, s2r, lsum, bv, am, GROUP, MODE, FOCAL, NEED_AM
                )
            if C % GROUP:
                vals = _row_vals(
                    xp, r0, r1, o0, o1, wx0, wx1, wy0, wy1, xm, sc, FULL, acc_ty, C % GROUP, TAP2_X, TAP2_Y
                )
                m, s, rest, s2r, lsum, bv, am = _fold(
                    vals, FULL, yk, tv, gamma, m, s, rest, s2r, lsum, bv, am, C % GROUP, MODE, FOCAL, NEED_AM
                )
        return m, s, rest, s2r, lsum, am

    @triton.jit
    def _up_fwd_kernel(
        x_ptr,  # low-resolution logits, element (b, c, y, x) at b*sb + c*sc + y*sh + x*sw
        t_ptr,  # (B*H*W,) labels, any integer dtype; pixel (b, Y, X) at (b*H + Y)*W + X
        wy0_ptr,
        wy1_ptr,  # (H,) row weights (accumulation dtype)
        sy0_ptr,
        sy1_ptr,  # (h,) int32: output rows [sy0[y], sy1[y]) whose first source row is y
        ax0_ptr,  # (W,) int32 first source column of each output column
        wx0_ptr,
        wx1_ptr,  # (W,) column weights
        tv_ptr,  # (C,) MSE target values (accumulation dtype)
        w_ptr,  # (C,) class weights the stored per-pixel loss is multiplied by (WEIGH_PL)
        pl_ptr,  # (N,) per-pixel loss out (STORE_PL); its dtype sets the arithmetic
        lrow_ptr,  # (programs, C) out: class-loss sums of each program (SUMS and REG_STATS)
        crow_ptr,  # (programs, C) int32 valid pixels per class: out (REG_STATS) or zeroed here, added into
        #            (int64 when H >= _BIG_H)
        trow_ptr,  # (programs, C) true positives, as crow_ptr (NEED_TP)
        bad_ptr,  # (programs, 2) int64 out: bad labels (outside [0, C), not ignore_index) and the largest
        conf_ptr,  # (C, C) int64 confusion [label, argmax] added into (CONF): the caller's matrix
        gp_ptr,
        wv_ptr,  # upstream gradient and its per-class factor (COEF; see _upstream)
        coef_ptr,
        lse_ptr,
        q_ptr,  # (N,) out (COEF): a, lse, q of each output pixel; lse, q the focal weight out
        #                          (STORE_LSE)
        H,
        W,
        h,
        w,  # output and input sizes
        bands,
        xblocks,  # row bands per image, column blocks per row
        stride_b,
        stride_c,
        stride_h,
        stride_w,  # logits strides, in elements
        gp_stride,  # upstream gradient stride (0: one value for every pixel)
        ignore_index,
        gamma,
        gamma64: tl.float64,
        C: tl.constexpr,  # classes
        GROUP: tl.constexpr,  # classes per group of the loop over groups (not CACHE)
        CACHE: tl.constexpr,  # one group, horizontal passes cached per low-resolution row
        MODE: tl.constexpr,
        FOCAL: tl.constexpr,
        STORE_PL: tl.constexpr,  # write the per-pixel loss
        WEIGH_PL: tl.constexpr,  # ... times the class weight of its label
        SUMS: tl.constexpr,  # the class-loss sums in registers (REG_STATS; else the stored loss is summed)
        REG_STATS: tl.constexpr,  # class statistics in registers (C <= 32)
        NEED_TP: tl.constexpr,  # count true positives
        PACK_TP: tl.constexpr,  # REG_STATS and NEED_TP: count + TP_PACK x true positives in one float (H < TP_PACK)
        TP_PACK: tl.constexpr,
        CONF: tl.constexpr,  # 0: no confusion, 1: a register histogram (CONF_BINS cells), 2: integer atomics
        CONF_BINS: tl.constexpr,  # a power of two >= C * C (CONF == 1)
        COEF: tl.constexpr,  # the backward's first launch: per-pixel gradient scalars, no statistics
        STORE_LSE: tl.constexpr,  # the forward (softmax focal) also writes each pixel's lse (and focal weight)
        HAS_GP: tl.constexpr,
        HAS_WV: tl.constexpr,
        TAP2_X: tl.constexpr,
        TAP2_Y: tl.constexpr,  # two-tap axes (bilinear, size changed)
        OFF64: tl.constexpr,  # 64-bit offsets inside an image
        R: tl.constexpr,  # low-resolution rows per band
        TY: tl.constexpr,  # output rows per step (of one segment)
        BLOCK_X: tl.constexpr,  # output columns per program, one per thread
        ZB: tl.constexpr,  # classes per step of the rows' zeroing (not REG_STATS)
    ):
        acc_ty = pl_ptr.dtype.element_ty
        gamma = _gamma(gamma, gamma64, acc_ty)
        pid = tl.program_id(0)
        xb = pid % xblocks
        band = (pid // xblocks) % bands
        b = (pid // (xblocks * bands)).to(tl.int64)
        NEED_AM: tl.constexpr = (NEED_TP or CONF > 0) and not COEF
        SOFTMAX: tl.constexpr = MODE == 0 or MODE == 3
        X = xb * BLOCK_X + tl.arange(0, BLOCK_X)
        xm = X < W
        sc, sh, sw = _in_image(stride_c, stride_h, stride_w, OFF64)
        # the horizontal taps and weights: once per output column
        x0 = tl.load(ax0_ptr + X, mask=xm, other=0)
        o0 = x0 * sw
        o1 = o0
        wx0 = tl.zeros([BLOCK_X], acc_ty)
        wx1 = wx0
        if TAP2_X:
            o1 = tl.minimum(x0 + 1, w - 1) * sw
            wx0 = tl.load(wx0_ptr + X, mask=xm, other=0.0)
            wx1 = tl.load(wx1_ptr + X, mask=xm, other=0.0)
        xp = x_ptr + b * stride_b  # int64: B*C*h*w can exceed 2**31
        pid64 = pid.to(tl.int64)
        if REG_STATS:
            lacc = ()
            cacc = ()
            tacc = ()
            for c in tl.static_range(C):
                lacc = lacc + (tl.zeros([TY, BLOCK_X], acc_ty),)
                cacc = cacc + (tl.zeros([TY, BLOCK_X], tl.float32),)
                tacc = tacc + (tl.zeros([TY, BLOCK_X], tl.float32),)
        elif not COEF:
            _zero_rows(crow_ptr, pid64, C, ZB)
            if NEED_TP:
                _zero_rows(trow_ptr, pid64, C, ZB)
            tl.debug_barrier()  # the zeros before this program's additions into its rows
        if CONF == 1:
            hist = tl.zeros([CONF_BINS], tl.int32)
        # a lane counts at most H pixels: int32 unless the counts are int64 (H >= _BIG_H)
        nbad = tl.zeros([BLOCK_X], crow_ptr.dtype.element_ty)
        vbad = tl.full([BLOCK_X], _NO_BAD, tl.int64)
        ya = band * R
        yb = tl.minimum(ya + R, h)
        ha = o0  # placeholders when not CACHE
        hb = o0
        if CACHE:
            ha = _hrow(xp, ya * sh, o0, o1, wx0, wx1, xm, sc, 0, acc_ty, C, TAP2_X)
            hb = ha
        for y in range(ya, yb):
            r0 = y * sh
            r1 = tl.minimum(y + 1, h - 1) * sh
            if CACHE:
                if TAP2_Y:
                    hb = _hrow(xp, r1, o0, o1, wx0, wx1, xm, sc, 0, acc_ty, C, TAP2_X)
            Ye = tl.load(sy1_ptr + y)
            for Y0 in range(tl.load(sy0_ptr + y), Ye, TY):
                Y = Y0 + tl.arange(0, TY)[:, None]  # [TY, 1] rows x [BLOCK_X] columns
                ym = Y < Ye
                pm = ym & xm[None, :]
                n = (b * H + Y) * W + X[None, :]  # int64: B*H*W can exceed 2**31
                valid, bad, y32, badv = _labels(t_ptr, n, pm, ignore_index, C, -1)
                nbad += tl.sum(bad.to(nbad.dtype), 0)
                vbad = tl.maximum(vbad, tl.max(badv, 0))
                wy0 = tl.load(wy0_ptr + Y, mask=ym, other=0.0)
                wy1 = wy0
                if TAP2_Y:
                    wy1 = tl.load(wy1_ptr + Y, mask=ym, other=0.0)
                tv = tl.zeros([TY, BLOCK_X], acc_ty)
                if MODE == 2 or MODE == 3:
                    tv = tl.load(tv_ptr + y32, mask=valid, other=0.0).to(acc_ty)
                m, s, rest, s2r, lsum, am = _row_state(
                    xp,
                    ha,
                    hb,
                    r0,
                    r1,
                    o0,
                    o1,
                    wx0,
                    wx1,
                    wy0,
                    wy1,
                    xm,
                    sc,
                    y32,
                    tv,
                    gamma,
                    acc_ty,
                    C,
                    GROUP,
                    CACHE,
                    MODE,
                    FOCAL,
                    NEED_AM,
                    TAP2_X,
                    TAP2_Y,
                )
                if SOFTMAX:
                    # the label's interpolated logit: 4 gathered loads per pixel
                    xy = _interp_at(
                        xp, y32 * sc, r0, r1, o0, o1, wx0, wx1, wy0, wy1, valid, acc_ty, TAP2_X, TAP2_Y
                    )
                    lse_v = _lse(m, s)
                    logp = xy - lse_v
                    if STORE_LSE:  # the forward keeps it for the backward (softmax focal, keeps_lse)
                        tl.store(lse_ptr + n, lse_v, mask=pm)
                        if (
                            FOCAL
                        ):  # and the focal weight ∂ℓ/∂log p_y, the backward's a per unit upstream weight
                            tl.store(
                                q_ptr + n, _focal_coef(1.0, logp, tl.exp(logp), rest / s, gamma), mask=pm
                            )
                if COEF:
                    wgt = _upstream(
                        gp_ptr,
                        wv_ptr,
                        n,
                        y32,
                        valid,
                        gp_stride,
                        tl.full([TY, BLOCK_X], 1.0, acc_ty),
                        HAS_GP,
                        HAS_WV,
                    )
                    lse, a, q = _bwd_softmax_coefs(m, s, rest, s2r, xy, tv, wgt, gamma, MODE, FOCAL)
                    tl.store(coef_ptr + n, tl.where(valid, a, 0.0), mask=pm)
                    tl.store(lse_ptr + n, lse, mask=pm)
                    if MODE == 3:
                        tl.store(q_ptr + n, q, mask=pm)
                else:
                    if MODE == 0:
                        if FOCAL:
                            # (1 - p_y)^γ; 1 - p_y = 0 gives exp(-inf) = 0 for γ > 0
                            loss = -tl.exp(gamma * tl.log(rest / s)) * logp
                        else:
                            loss = -logp
                    elif MODE == 3:
                        dy = tl.exp(logp) - tv
                        loss = 0.5 * (s2r / (s * s) + dy * dy)
                    elif MODE == 2:
                        loss = 0.5 * lsum
                    else:
                        loss = lsum  # sigmoid focal terms; zeros for the statistics
                    lv = tl.where(valid, loss, 0.0)
                    if STORE_PL:
                        if WEIGH_PL:
                            tl.store(
                                pl_ptr + n,
                                lv * tl.load(w_ptr + y32, mask=valid, other=0.0).to(acc_ty),
                                mask=pm,
                            )
                        else:
                            tl.store(pl_ptr + n, lv, mask=pm)
                    hit = valid & (am == y32)
                    if REG_STATS:
                        # per-thread running sums: a compare and a predicated add per pixel, class
                        # and sum. The counts are float32 (a predicated add; integer ones compiled to
                        # three instructions), exact: a thread counts at most H < 2**24 pixels (the
                        # rows of one column); with PACK_TP (H < TP_PACK) count + TP_PACK * true
                        # positives in one, below 2**24 too (_TP_PACK = 4096).
                        if PACK_TP:
                            inc = tl.where(hit, TP_PACK + 1.0, 1.0)
                        nl = ()
                        nc = ()
                        nt = ()
                        for c in tl.static_range(C):
                            is_c = y32 == c
                            if SUMS:
                                nl = nl + (tl.where(is_c, lacc[c] + lv, lacc[c]),)
                            else:
                                nl = nl + (lacc[c],)
                            if PACK_TP:
                                nc = nc + (tl.where(is_c, cacc[c] + inc, cacc[c]),)
                            else:
                                nc = nc + (tl.where(is_c, cacc[c] + 1.0, cacc[c]),)
                            if NEED_TP and not PACK_TP:
                                nt = nt + (tl.where(is_c & hit, tacc[c] + 1.0, tacc[c]),)
                            else:
                                nt = nt + (tacc[c],)
                        lacc = nl
                        cacc = nc
                        tacc = nt
                    if CONF == 1:
                        hist = _conf_hist(hist, y32, am, valid, C, CONF_BINS)
                    _counts_in_memory(
                        crow_ptr,
                        trow_ptr,
                        conf_ptr,
                        pid64,
                        C,
                        y32,
                        am,
                        valid,
                        hit,
                        not REG_STATS,
                        NEED_TP,
                        CONF,
                    )
            if CACHE:
                if TAP2_Y:
                    ha = hb
                else:
                    ha = _hrow(xp, r1, o0, o1, wx0, wx1, xm, sc, 0, acc_ty, C, TAP2_X)  # the next row
        if not COEF:
            if REG_STATS:
                # one row per program, summed by the launcher in a fixed order: deterministic
                for c in tl.static_range(C):
                    if SUMS:
                        tl.store(lrow_ptr + pid64 * C + c, tl.sum(tl.sum(lacc[c], 1), 0))
                    ci = cacc[c].to(tl.int32)
                    if PACK_TP:
                        tl.store(crow_ptr + pid64 * C + c, tl.sum(tl.sum(ci % TP_PACK, 1), 0))
                        tl.store(trow_ptr + pid64 * C + c, tl.sum(tl.sum(ci // TP_PACK, 1), 0))
                    else:
                        tl.store(crow_ptr + pid64 * C + c, tl.sum(tl.sum(ci, 1), 0))
                        if NEED_TP:
                            tl.store(trow_ptr + pid64 * C + c, tl.sum(tl.sum(tacc[c].to(tl.int32), 1), 0))
            if CONF == 1:
                _conf_flush(conf_ptr, hist, C, CONF_BINS)
            _store_bad(bad_ptr, pid, tl.sum(nbad.to(tl.int64), 0), tl.max(vbad, 0))

    @triton.jit
    def _pixel_grads(
        vals,
        y32,
        valid,
        tv,
        a,
        lse,
        q,
        gamma,
        c0,
        acc_ty: tl.constexpr,
        NCLS: tl.constexpr,
        MODE: tl.constexpr,
        FOCAL: tl.constexpr,
        PRE: tl.constexpr,
    ):
        """∂ℓ/∂x̃_k of one output row's pixels for classes c0 .. c0 + NCLS - 1 (a tuple), 0 where not
        valid; ``a`` is the upstream weight (grad_pixel + grad_class[y]). Softmax modes: with PRE the
        per-pixel (a, lse, q) come from the coefficient launch; otherwise NCLS = C and the softmax is
        computed here, its exponentials kept for the gradient (one exp per logit)."""
        gs = ()
        if MODE == 0 or MODE == 3:
            if PRE:
                ps = ()
                sh = _shift(lse)
                for k in tl.static_range(NCLS):
                    ps = ps + (_exp_minus(vals[k], sh),)
            else:
                NEED_REST: tl.constexpr = FOCAL or MODE == 3
                m = tl.full(y32.shape, float("-inf"), acc_ty)
                for k in tl.static_range(NCLS):
                    m = tl.maximum(m, vals[k])
                ms = tl.where(m == float("-inf"), 0.0, m)
                s = tl.zeros(y32.shape, acc_ty)
                rest = s
                s2r = s
                xy = s
                es = ()
                sh = _shift(ms)
                for k in tl.static_range(NCLS):
                    e = _exp_minus(vals[k], sh)
                    es = es + (e,)
                    s += e
                    oh = y32 == k
                    xy = tl.where(oh, vals[k], xy)
                    if NEED_REST:
                        rest = tl.where(oh, rest, rest + e)
                        if MODE == 3:
                            s2r = tl.where(oh, s2r, tl.fma(e, e, s2r))
                lse, a, q = _bwd_softmax_coefs(m, s, rest, s2r, xy, tv, a, gamma, MODE, FOCAL)
                r = 1.0 / s
                ps = ()
                for k in tl.static_range(NCLS):
                    ps = ps + (es[k] * r,)
            for k in tl.static_range(NCLS):
                oh = y32 == c0 + k
                if MODE == 0:
                    g = tl.fma(-a, ps[k], tl.where(oh, a, 0.0))  # a (onehot - p), one fused multiply-add
                else:
                    g = a * ps[k] * (ps[k] - tl.where(oh, tv, 0.0) - q)
                gs = gs + (tl.where(valid, g, 0.0),)  # 0 * inf or 0 * NaN would not be 0
        else:
            for k in tl.static_range(NCLS):
                oh = y32 == c0 + k
                if MODE == 1:
                    g = a * _sigmoid_focal_grad(vals[k], oh, gamma, FOCAL)
                else:
                    g = a * (vals[k] - tl.where(oh, tv, 0.0))
                gs = gs + (tl.where(valid, g, 0.0),)
        return gs

    @triton.jit
    def _zeros_like_tuple(z, NCLS: tl.constexpr):
        t = ()
        for k in tl.static_range(NCLS):
            t = t + (z,)
        return t

    @triton.jit
    def _madd(acc, c, gs, NCLS: tl.constexpr):
        """acc_k += c·g_k, elementwise over the step's tile (reduced over it once per low-resolution row)."""
        t = ()
        for k in tl.static_range(NCLS):
            t = t + (acc[k] + c * gs[k],)
        return t

    @triton.jit
    def _bwd_classes(
        xp,
        gq,
        t_ptr,
        tv_ptr,
        gp_ptr,
        wv_ptr,
        coef_ptr,
        lse_ptr,
        q_ptr,
        wy0_ptr,
        wy1_ptr,
        sy0_ptr,
        sy1_ptr,
        wx0_ptr,
        wx1_ptr,
        bH,
        W,
        h,
        ys,
        ya,
        yb,
        xl,
        lm,
        om,
        lastc,
        prev,
        s0,
        s1,
        span,
        o0,
        o1,
        go,
        sh,
        sc,
        gsh,
        gsc,
        gp_stride,
        ignore_index,
        gamma,
        c0,
        acc_ty: tl.constexpr,
        C: tl.constexpr,
        NCLS: tl.constexpr,
        MODE: tl.constexpr,
        FOCAL: tl.constexpr,
        HAS_GP: tl.constexpr,
        HAS_WV: tl.constexpr,
        PRE: tl.constexpr,
        TAP2_X: tl.constexpr,
        TAP2_Y: tl.constexpr,
        TJ: tl.constexpr,
        TY: tl.constexpr,
        BLOCK_X: tl.constexpr,
    ):
        """The gradient of classes c0 .. c0 + NCLS - 1 of the band's low-resolution rows [ya, yb)
        at the lanes' columns (see the module docstring): A (row yy, own column), Bc (row yy, next
        column), An, Bn (row yy + 1), each a [TJ, TY, BLOCK_X] tile of partial sums."""
        zero = tl.zeros(xl.shape, acc_ty)
        one = tl.full([TJ, TY, BLOCK_X], 1.0, acc_ty)
        zt = tl.zeros([TJ, TY, BLOCK_X], acc_ty)
        A = _zeros_like_tuple(zt, NCLS)
        Bc = A
        An = A
        Bn = A
        # A lane's output columns all read the same two source columns x_i, x_i + 1: their values in rows
        # yy (u) and yy + 1 (d) are loaded once per low-resolution row, row yy + 1's kept for the next
        # row (2·NCLS loads per row and lane), and blended per output column.
        o0 = o0[None, None, :]
        o1 = o1[None, None, :]
        lm3 = lm[None, None, :]
        if TAP2_Y:
            d0, d1 = _taps(xp, ys * sh, o0, o1, lm3, sc, c0, acc_ty, NCLS, TAP2_X)
        for yy in range(ys, yb):
            Ys = tl.load(sy0_ptr + yy)
            Ye = tl.load(sy1_ptr + yy)  # [TJ, TY, lanes] tiles: columns of the lanes' segments x rows
            if TAP2_Y:
                An = _zeros_like_tuple(zt, NCLS)
                Bn = An
                u0 = d0
                u1 = d1
                d0, d1 = _taps(xp, tl.minimum(yy + 1, h - 1) * sh, o0, o1, lm3, sc, c0, acc_ty, NCLS, TAP2_X)
            else:
                u0, u1 = _taps(xp, yy * sh, o0, o1, lm3, sc, c0, acc_ty, NCLS, TAP2_X)
            for j0 in range(0, span, TJ):
                X = s0[None, None, :] + (j0 + tl.arange(0, TJ))[:, None, None]
                pmx = lm[None, None, :] & (X < s1[None, None, :])
                wx0 = zero
                wx1 = zero
                if TAP2_X:
                    wx0 = tl.load(wx0_ptr + X, mask=pmx, other=0.0)
                    wx1 = tl.load(wx1_ptr + X, mask=pmx, other=0.0)
                # the horizontal passes of rows yy, yy + 1 at columns X: once for the segment's rows
                h0 = _hblend(u0, u1, wx0, wx1, NCLS, TAP2_X)
                h1 = h0
                if TAP2_Y:
                    h1 = _hblend(d0, d1, wx0, wx1, NCLS, TAP2_X)
                for Y0 in range(Ys, Ye, TY):
                    Y = Y0 + tl.arange(0, TY)[None, :, None]
                    ym = Y < Ye
                    pm = pmx & ym
                    n = (bH + Y) * W + X  # int64: B*H*W can exceed 2**31
                    valid, bad, y32, badv = _labels(t_ptr, n, pm, ignore_index, C, -1)
                    a = zero  # the upstream weight grad[n] * scale[y], or the coefficient
                    lse = zero
                    q = zero
                    if (
                        PRE == 2
                    ):  # from the forward: a = the upstream weight x (-1, or the focal weight at q_ptr)
                        a = _upstream(gp_ptr, wv_ptr, n, y32, valid, gp_stride, one, HAS_GP, HAS_WV)
                        if FOCAL:
                            a = a * tl.load(q_ptr + n, mask=valid, other=0.0)
                        else:
                            a = -a
                        lse = tl.load(lse_ptr + n, mask=valid, other=0.0)
                    elif PRE:
                        a = tl.load(coef_ptr + n, mask=valid, other=0.0)  # 0 at ignored and bad pixels
                        lse = tl.load(lse_ptr + n, mask=valid, other=0.0)
                        if MODE == 3:
                            q = tl.load(q_ptr + n, mask=valid, other=0.0)
                    else:
                        a = _upstream(gp_ptr, wv_ptr, n, y32, valid, gp_stride, one, HAS_GP, HAS_WV)
                    tv = zero
                    if MODE == 2 or MODE == 3:
                        tv = tl.load(tv_ptr + y32, mask=valid, other=0.0).to(acc_ty)
                    wy0 = tl.load(wy0_ptr + Y, mask=ym, other=0.0)
                    wy1 = wy0
                    if TAP2_Y:
                        wy1 = tl.load(wy1_ptr + Y, mask=ym, other=0.0)
                    vals = _vert(h0, h1, wy0, wy1, NCLS, TAP2_Y)
                    gs = _pixel_grads(
                        vals, y32, valid, tv, a, lse, q, gamma, c0, acc_ty, NCLS, MODE, FOCAL, PRE
                    )
                    if TAP2_X:
                        if TAP2_Y:
                            A = _madd(A, wy0 * wx0, gs, NCLS)
                            Bc = _madd(Bc, wy0 * wx1, gs, NCLS)
                            An = _madd(An, wy1 * wx0, gs, NCLS)
                            Bn = _madd(Bn, wy1 * wx1, gs, NCLS)
                        else:
                            A = _madd(A, wx0, gs, NCLS)
                            Bc = _madd(Bc, wx1, gs, NCLS)
                    elif TAP2_Y:
                        A = _madd(A, wy0 + zero, gs, NCLS)
                        An = _madd(An, wy1 + zero, gs, NCLS)
                    else:
                        A = _madd(A, 1.0 + zero, gs, NCLS)
            if yy >= ya:
                # row yy is complete: column x_i adds lane i - 1's next-column sum (the last column
                # also its own: both of its taps are itself), and the last row its row-below sums
                # (the partial sums of a step's tile reduced once per row: tl.sum over [TJ * TY, lanes])
                TT: tl.constexpr = TJ * TY
                for k in tl.static_range(NCLS):
                    v = tl.sum(tl.reshape(A[k], [TT, BLOCK_X]), 0)
                    if TAP2_X:
                        bc = tl.sum(tl.reshape(Bc[k], [TT, BLOCK_X]), 0)
                        v = v + tl.gather(bc, prev, 0) + tl.where(lastc, bc, 0.0)
                    if TAP2_Y:
                        if yy == h - 1:
                            u = tl.sum(tl.reshape(An[k], [TT, BLOCK_X]), 0)
                            if TAP2_X:
                                bn = tl.sum(tl.reshape(Bn[k], [TT, BLOCK_X]), 0)
                                u = u + tl.gather(bn, prev, 0) + tl.where(lastc, bn, 0.0)
                            v = v + u
                    tl.store(gq + ((c0 + k) * gsc + yy * gsh) + go, v.to(gq.dtype.element_ty), mask=om)
            if TAP2_Y:
                A = An
                Bc = Bn
            else:
                A = _zeros_like_tuple(zt, NCLS)
                Bc = A

    @triton.jit
    def _up_bwd_kernel(
        x_ptr,  # low-resolution logits, element (b, c, y, x) at b*sb + c*sc + y*sh + x*sw
        t_ptr,  # (B*H*W,) labels, any integer dtype
        wy0_ptr,
        wy1_ptr,  # (H,) row weights
        sy0_ptr,
        sy1_ptr,  # (h,) int32 output rows [sy0[y], sy1[y]) whose first source row is y
        wx0_ptr,
        wx1_ptr,  # (W,) column weights
        sx0_ptr,
        sx1_ptr,  # (w,) int32 output columns [sx0[x], sx1[x]) whose first source column is x
        tv_ptr,  # (C,) MSE target values, accumulation dtype (a dummy of that dtype otherwise)
        gp_ptr,
        wv_ptr,  # upstream gradient and its per-class factor (HAS_GP, HAS_WV; see _upstream)
        coef_ptr,
        lse_ptr,
        q_ptr,  # (N,) per-pixel a, lse, q of the coefficient launch (PRE)
        g_ptr,  # gradient out, x's dtype, element (b, c, y, x) at b*gsb + c*gsc + y*gsh + x*gsw
        H,
        W,
        h,
        w,
        bands,
        xblocks,
        stride_b,
        stride_c,
        stride_h,
        stride_w,
        gstride_b,
        gstride_c,
        gstride_h,
        gstride_w,
        gp_stride,
        ignore_index,
        gamma,
        gamma64: tl.float64,
        C: tl.constexpr,
        GROUP: tl.constexpr,
        LOOP: tl.constexpr,
        MODE: tl.constexpr,
        FOCAL: tl.constexpr,
        HAS_GP: tl.constexpr,
        HAS_WV: tl.constexpr,
        PRE: tl.constexpr,  # class groups of a softmax mode: 1, the per-pixel scalars from the coefficient launch;
        #                     2, from the forward (softmax focal): lse, and a from the upstream weight and q_ptr
        TAP2_X: tl.constexpr,
        TAP2_Y: tl.constexpr,
        OFF64: tl.constexpr,
        R: tl.constexpr,  # low-resolution rows per band
        TJ: tl.constexpr,
        TY: tl.constexpr,  # output columns (of a lane's segment) and rows per step
        BLOCK_X: tl.constexpr,  # lanes: low-resolution columns (one of them a halo on a two-tap axis)
    ):
        acc_ty = tv_ptr.dtype.element_ty
        gamma = _gamma(gamma, gamma64, acc_ty)
        pid = tl.program_id(0)
        xb = pid % xblocks
        band = (pid // xblocks) % bands
        b = (pid // (xblocks * bands)).to(tl.int64)
        lane = tl.arange(0, BLOCK_X)
        if TAP2_X:
            xl = xb * (BLOCK_X - 1) - 1 + lane  # lane 0: the column left of the block (a halo)
            lm = (xl >= 0) & (xl < w)
            om = lm & (lane >= 1)
        else:
            xl = xb * BLOCK_X + lane
            lm = xl < w
            om = lm
        sc, sh, sw = _in_image(stride_c, stride_h, stride_w, OFF64)
        gsc, gsh, gsw = _in_image(gstride_c, gstride_h, gstride_w, OFF64)
        s0 = tl.load(sx0_ptr + xl, mask=lm, other=0)
        s1 = tl.load(sx1_ptr + xl, mask=lm, other=0)
        span = tl.max(s1 - s0, 0)  # the longest column segment of the block
        o0 = xl * sw
        o1 = tl.minimum(xl + 1, w - 1) * sw
        go = xl * gsw
        prev = tl.maximum(lane - 1, 0)
        lastc = xl == w - 1
        xp = x_ptr + b * stride_b  # int64 image bases
        gq = g_ptr + b * gstride_b
        ya = band * R
        yb = tl.minimum(ya + R, h)
        if TAP2_Y:
            ys = tl.maximum(ya - 1, 0)  # the row above the band feeds row ya (a halo)
        else:
            ys = ya
        bH = b * H
        FULL: tl.constexpr = (C // GROUP) * GROUP
        if LOOP:
            for c0 in range(0, FULL, GROUP):
                _bwd_classes(
                    xp,
                    gq,
                    t_ptr,
                    tv_ptr,
                    gp_ptr,
                    wv_ptr,
                    coef_ptr,
                    lse_ptr,
                    q_ptr,
                    wy0_ptr,
                    wy1_ptr,
                    sy0_ptr,
                    sy1_ptr,
                    wx0_ptr,
                    wx1_ptr,
                    bH,
                    W,
                    h,
                    ys,
                    ya,
                    yb,
                    xl,
                    lm,
                    om,
                    lastc,
                    prev,
                    s0,
                    s1,
                    span,
                    o0,
                    o1,
                    go,
                    sh,
                    sc,
                    gsh,
                    gsc,
                    gp_stride,
                    ignore_index,
                    gamma,
                    c0,
                    acc_ty,
                    C,
                    GROUP,
                    MODE,
                    FOCAL,
                    HAS_GP,
                    HAS_WV,
                    PRE,
                    TAP2_X,
                    TAP2_Y,
                    TJ,
                    TY,
                    BLOCK_X,
                )
        else:
            for c0 in tl.static_range(0, FULL, GROUP):
                _bwd_classes(
                    xp,
                    gq,
                    t_ptr,
                    tv_ptr,
                    gp_ptr,
                    wv_ptr,
                    coef_ptr,
                    lse_ptr,
                    q_ptr,
                    wy0_ptr,
                    wy1_ptr,
                    sy0_ptr,
                    sy1_ptr,
                    wx0_ptr,
                    wx1_ptr,
                    bH,
                    W,
                    h,
                    ys,
                    ya,
                    yb,
                    xl,
                    lm,
                    om,
                    lastc,
                    prev,
                    s0,
                    s1,
                    span,
                    o0,
                    o1,
                    go,
                    sh,
                    sc,
                    gsh,
                    gsc,
                    gp_stride,
                    ignore_index,
                    gamma,
                    c0,
                    acc_ty,
                    C,
                    GROUP,
                    MODE,
                    FOCAL,
                    HAS_GP,
                    HAS_WV,
                    PRE,
                    TAP2_X,
                    TAP2_Y,
                    TJ,
                    TY,
                    BLOCK_X,
                )
        if C % GROUP:
            _bwd_classes(
                xp,
                gq,
                t_ptr,
                tv_ptr,
                gp_ptr,
                wv_ptr,
                coef_ptr,
                lse_ptr,
                q_ptr,
                wy0_ptr,
                wy1_ptr,
                sy0_ptr,
                sy1_ptr,
                wx0_ptr,
                wx1_ptr,
                bH,
                W,
                h,
                ys,
                ya,
                yb,
                xl,
                lm,
                om,
                lastc,
                prev,
                s0,
                s1,
                span,
                o0,
                o1,
                go,
                sh,
                sc,
                gsh,
                gsc,
                gp_stride,
                ignore_index,
                gamma,
                FULL,
                acc_ty,
                C,
                C % GROUP,
                MODE,
                FOCAL,
                HAS_GP,
                HAS_WV,
                PRE,
                TAP2_X,
                TAP2_Y,
                TJ,
                TY,
                BLOCK_X,
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


def _class_plan(C, mode, f64, bwd=False, need_am=False, coef=False):
    """(GROUP, LOOP, CACHE) of a class count (see the module docstring). A forward group holds
    ``_fwd_step`` rows of interpolated values per class (and with ``need_am`` the running argmax; with
    ``coef``, the backward's coefficient launch, the upstream gradients and three outputs per pixel),
    in a loop over groups (unrolled groups spilled: the compiler hoisted loads across them); the
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
        # coefficient launch of the softmax focal loss on triton 3.6
        group = 6 if need_am and mode != Mode.STATS else (10 if coef else _GROUP)
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


def _launch_fwd(
    x,
    t,
    geo,
    off64,
    mode,
    gamma,
    tvals,
    ignore_index,
    acc,
    *,
    weight=None,
    weigh=False,
    sums=False,
    store_pl=None,
    need_tp=False,
    confusion=None,
    coef=None,
    grad=None,
    scale=None,
    store_lse=None,
):
    """One launch of ``_up_fwd_kernel``: the forward (``store_pl``: the (N,) per-pixel loss buffer, or None;
    ``store_lse``: the buffer of :func:`keeps_lse`, softmax focal), or (``coef`` = (a, lse, q) buffers) the
    backward's per-pixel scalars. Returns (pl, lrow, crow, trow, brow, reg) of a forward."""
    B, C = x.shape[0], x.shape[1]
    dev = x.device
    is_coef = coef is not None
    f64 = acc == torch.float64
    block, R, ty, warps = _fwd_tile(geo, C, mode, f64)
    bands, xblocks = _cdiv(geo.h, R), _cdiv(geo.W, block)
    P = B * bands * xblocks
    need_conf = confusion is not None
    group, _, cache = _class_plan(C, mode, f64, need_am=(need_tp or need_conf) and not is_coef, coef=is_coef)
    # float32 counts per thread (at most H pixels) are exact below 2**24, and a program's (its BLOCK_X <= 128
    # threads') int32 sums below 2**31; from _BIG_H rows its counts are int64 atomics instead
    big = geo.H >= _BIG_H
    reg = C <= _REG_STATS_C and not is_coef and not big
    row_ty = torch.int64 if big else torch.int32
    one = _dummy(dev, acc)
    if is_coef:
        pl = one
        lrow = crow = trow = brow = _dummy(dev, torch.int32)
        conf_mode, bins, conf = 0, 1, _dummy(dev, torch.int64)
    else:
        if store_pl is None and sums and not reg:
            store_pl = x.new_empty(t.numel(), dtype=acc)  # summed per class by the class-sum kernel
        pl = store_pl if store_pl is not None else one
        lrow = x.new_empty((P, C), dtype=acc) if reg and sums else one
        crow = x.new_empty((P, C), dtype=row_ty)
        trow = x.new_empty((P, C), dtype=row_ty) if need_tp else crow
        brow = x.new_empty((P, 2), dtype=torch.int64)
        if not need_conf:
            conf_mode, bins, conf = 0, 1, _dummy(dev, torch.int64)
        elif C * C <= _CONF_HIST_CELLS and not big:
            conf_mode, bins, conf = 1, _np2(C * C), confusion
        else:
            conf_mode, bins, conf = 2, 1, confusion
    tv = tvals if tvals is not None else one
    focal = _focal(mode, gamma)
    if is_coef:
        a, lse, q = coef
    elif store_lse is not None:  # lse, then with γ != 0 the focal weight (q_ptr)
        N = t.numel()
        a, lse, q = pl, store_lse[:N], store_lse[N:] if focal else pl
    else:
        a = lse = q = pl
    gp, gp_stride, has_gp = grad_arg(grad, t.numel(), dev, acc)
    wrap(_up_fwd_kernel)[(P,)](
        x,
        t,
        geo.wy0,
        geo.wy1,
        geo.sy0,
        geo.sy1,
        geo.ax0,
        geo.wx0,
        geo.wx1,
        tv,
        weight if weight is not None else one,
        pl,
        lrow,
        crow,
        trow,
        brow,
        conf,
        gp,
        scale if scale is not None else one,
        a,
        lse,
        q,
        geo.H,
        geo.W,
        geo.h,
        geo.w,
        bands,
        xblocks,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        x.stride(3),
        gp_stride,
        ignore_index,
        gamma,
        gamma,
        C=C,
        GROUP=group,
        CACHE=cache,
        MODE=int(mode),
        FOCAL=focal,
        STORE_PL=store_pl is not None and not is_coef,
        WEIGH_PL=weigh,
        SUMS=sums and reg,
        REG_STATS=reg,
        NEED_TP=need_tp and not is_coef,
        PACK_TP=reg and need_tp and geo.H < _TP_PACK,
        TP_PACK=_TP_PACK,
        CONF=conf_mode,
        CONF_BINS=bins,
        COEF=is_coef,
        STORE_LSE=store_lse is not None,
        HAS_GP=has_gp,
        HAS_WV=scale is not None,
        TAP2_X=geo.tap2_x,
        TAP2_Y=geo.tap2_y,
        OFF64=off64,
        R=R,
        TY=ty,
        BLOCK_X=block,
        ZB=min(_np2(C), _ZERO_BLOCK),
        num_warps=warps,
    )
    return pl, lrow, crow, trow, brow, reg


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
    _check(x, target, interp, mode, gamma)
    mode, reduction, weighting = Mode(mode), Reduction(reduction), Weighting(weighting)
    need_tp = need_tp or weighting == Weighting.RECALL
    acc = acc_dtype(x)
    B, C, h, w = x.shape
    H, W = target.shape[1], target.shape[2]
    N = B * H * W
    has_loss = mode != Mode.STATS
    sums = has_loss and reduction != Reduction.NONE
    out = outputs(x, C, N, reduction, need_tp)
    lse = x.new_empty(N * keeps_lse(x, mode, gamma) if need_lse else 0, dtype=acc)  # every element is written
    t = target.reshape(-1)
    if not t.is_contiguous():
        t = t.contiguous()
    with _on_device(x):
        if N == 0 or x.numel() == 0:  # no pixel: the finalize of no rows gives the zeros
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
        geo, off64 = _geometry(x, H, W, interp, align_corners)
        weigh = reduction == Reduction.NONE and weighting in (Weighting.GENERAL, Weighting.PAPER)
        pl, lrow, crow, trow, brow, reg = _launch_fwd(
            x,
            t,
            geo,
            off64,
            mode,
            gamma,
            tvals,
            ignore_index,
            acc,
            weight=weight,
            weigh=weigh,
            sums=sums,
            store_pl=out[0] if reduction == Reduction.NONE else None,
            need_tp=need_tp,
            confusion=confusion,
            store_lse=lse if lse.numel() else None,
        )
        if sums and not reg:
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


def _backward(x, target, interp, align_corners, grad, scale, tvals, lse_fwd, mode, gamma, ignore_index):
    """The upsampled backward op's launcher: the gradient with respect to the low-resolution logits, one
    launch (two for the class groups of a softmax mode without what the forward kept)."""
    _check(x, target, interp, mode, gamma)
    mode = Mode(mode)
    B, C, h, w = x.shape
    H, W = target.shape[1], target.shape[2]
    N = B * H * W
    if mode == Mode.STATS or x.numel() == 0 or N == 0:
        return torch.zeros_like(x)
    acc = acc_dtype(x)
    dev = x.device
    t = target.reshape(-1)
    if not t.is_contiguous():
        t = t.contiguous()
    grad_x = torch.empty_like(x)  # the shape, dtype and memory format of x
    dummy = tvals if tvals is not None else _dummy(dev, acc)  # its dtype sets the arithmetic
    focal = _focal(mode, gamma)
    group, loop, cache = _class_plan(C, mode, acc == torch.float64, bwd=True)
    pre = not cache and mode in (Mode.SOFTMAX_FOCAL, Mode.MSE_SOFTMAX)
    if lse_fwd is not None and lse_fwd.numel() == 0:
        lse_fwd = None
    if lse_fwd is not None and (not pre or mode != Mode.SOFTMAX_FOCAL):
        lse_fwd = None  # the one-group backward computes the softmax itself
    if lse_fwd is not None:
        check_lse(lse_fwd, N * keeps_lse(x, mode, gamma), acc, x.device)
    gp, gp_stride, has_gp = grad_arg(grad, N, dev, acc)
    wv = scale if scale is not None else dummy
    # PRE: 0 the softmax in the gradient pass, 1 a coefficient launch first, 2 from what the forward kept
    pre = (2 if lse_fwd is not None else 1) if pre else 0
    with _on_device(x):
        geo, off64 = _geometry(x, H, W, interp, align_corners)
        # class groups of a softmax mode: the per-pixel scalars, O(B·H·W), from what the forward kept
        # (lse, the focal weight in q), else first a launch with a pass over every class
        coef = lse = q = dummy
        if pre == 2:
            kept = lse_fwd if lse_fwd.is_contiguous() else lse_fwd.contiguous()
            lse, q = kept[:N], (kept[N:] if focal else dummy)
        elif pre:
            coef = x.new_empty(N, dtype=acc)
            lse = x.new_empty(N, dtype=acc)
            q = x.new_empty(N if mode == Mode.MSE_SOFTMAX else 1, dtype=acc)
            _launch_fwd(
                x,
                t,
                geo,
                off64,
                mode,
                gamma,
                tvals,
                ignore_index,
                acc,
                coef=(coef, lse, q),
                grad=grad,
                scale=scale,
            )
        block, R, tj, ty, warps = _bwd_tile(geo)
        bands, xblocks = _cdiv(h, R), _cdiv(w, block - (1 if geo.tap2_x else 0))
        wrap(_up_bwd_kernel)[(B * bands * xblocks,)](
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
            H,
            W,
            h,
            w,
            bands,
            xblocks,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            x.stride(3),
            grad_x.stride(0),
            grad_x.stride(1),
            grad_x.stride(2),
            grad_x.stride(3),
            gp_stride,
            ignore_index,
            gamma,
            gamma,
            C=C,
            GROUP=group,
            LOOP=loop,
            MODE=int(mode),
            FOCAL=focal,
            HAS_GP=has_gp,
            HAS_WV=scale is not None,
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
