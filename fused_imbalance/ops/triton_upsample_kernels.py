"""Triton kernels of the upsampled losses (docs/DESIGN.md §10); launched by :mod:`.triton_upsample`.

The loss of ``F.interpolate(x, size=(H, W), mode, align_corners)`` for low-resolution logits x
(B, C, h, w) without a tensor of B·C·H·W elements. The interpolation is separable, in torch's
order: the horizontal pass of a low-resolution row at an output column X, h_y(X) = x[y, x0(X)]·wx0(X)
+ x[y, x1(X)]·wx1(X), then the vertical blend of two such rows, h_{y0(Y)}(X)·wy0(Y) +
h_{y1(Y)}(X)·wy1(Y), in float32 for 16-bit and float32 logits, float64 for float64; the source
indices and weights come from the launcher's tables. A one-tap axis (``TAP2_* = False``: the size
does not change, or "nearest") copies the values, as torch does. Output rows (columns) whose first
source row (column) is y form a contiguous range [sy0[y], sy1[y]) (the source index is
nondecreasing): the kernels walk those segments. The classes are a compile-time loop
(``tl.static_range``, C a constexpr, one compiled kernel per class count as in the static kernels of
:mod:`.triton_kernels`): nothing is padded to a power of two and every reduction over classes is a
running value in a thread's registers. Offsets inside an image are 32-bit unless one image of
logits spans 2**31 elements (``OFF64``); image and pixel bases are int64.

Three kernels: ``_up_fwd_kernel`` (the forward), ``_up_coef_kernel`` (the backward's per-pixel
scalars for the class groups of a softmax mode, a launch of its own, sharing the forward's walk and
pixel state) and ``_up_bwd_kernel`` (the gradient: a tiled transposed interpolation without float
atomics). Their docstrings say how they walk; docs/DESIGN.md §16 has the cost model.
"""

import triton
import triton.language as tl

from .triton_common import (
    LOG2E,
    MODE_MSE_LOGITS,
    MODE_MSE_SOFTMAX,
    MODE_SIGMOID_FOCAL,
    MODE_SOFTMAX_FOCAL,
    NO_BAD,
    acc_gamma,
    bwd_softmax_coefs,
    conf_flush,
    conf_hist,
    counts_in_memory,
    focal_coef,
    i64,
    load_labels,
    log_sum_exp,
    sigmoid_focal_grad,
    sigmoid_focal_terms,
    store_bad,
    take_max,
    upstream,
    zero_rows,
)


@triton.jit
def _in_image(s0, s1, s2, OFF64: tl.constexpr):
    """Three strides as the offsets inside an image are computed: int64 with OFF64, else as given."""
    if OFF64:
        s0 = i64(s0)
        s1 = i64(s1)
        s2 = i64(s2)
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
        return s * LOG2E


@triton.jit
def _exp_minus(v, sh):
    """exp(v - s) for sh = _shift(s). float32: exp2(v·log2(e) - s·log2(e)), one fused multiply-add and the
    special-function ex2 per logit (tl.exp adds range fix-ups, (v - s)·log2(e) a subtraction); the rounding
    of s·log2(e), once per pixel, scales every term of the pixel alike."""
    if sh.dtype == tl.float64:
        return tl.exp(v - sh)
    else:
        return tl.exp2(tl.fma(v, LOG2E, -sh))


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
    xy,
    NCLS: tl.constexpr,
    MODE: tl.constexpr,
    FOCAL: tl.constexpr,
    NEED_AM: tl.constexpr,
    FIRST: tl.constexpr = False,
    NEED_XY: tl.constexpr = False,
):
    """Fold one class group's interpolated logits into a pixel's running state: the softmax
    (a max pass, the sums rescaled once, an exp pass: m, s = Σ e_k, rest = Σ_{k≠y} e_k,
    s2r = Σ_{k≠y} e_k², as the groups of :func:`static_softmax`; with NEED_XY the label's
    interpolated logit xy, kept with a select), or the per-class terms
    of the elementwise modes (lsum); the argmax when NEED_AM. ``yk`` is the label as
    :func:`_row_state` compares it here; yr = yk - c0 is compared with the constants k. FIRST: the
    pixel's first group (the sums are still 0: nothing to rescale)."""
    yr = yk - c0
    if MODE == MODE_SOFTMAX_FOCAL or MODE == MODE_MSE_SOFTMAX:
        NEED_REST: tl.constexpr = FOCAL or MODE == MODE_MSE_SOFTMAX
        gm = m
        for k in tl.static_range(NCLS):
            gm = tl.maximum(gm, vals[k])
        ms = tl.where(gm == float("-inf"), 0.0, gm)
        if not FIRST:
            alpha = tl.exp(m - ms)  # 0 while m is still -inf (the sums are 0 then too)
            s = s * alpha
            if NEED_REST:
                rest = rest * alpha
            if MODE == MODE_MSE_SOFTMAX:
                s2r = s2r * (alpha * alpha)
        sh = _shift(ms)
        for k in tl.static_range(NCLS):
            e = _exp_minus(vals[k], sh)
            s += e
            oh = yr == k
            if NEED_XY:
                xy = tl.where(oh, vals[k], xy)
            if NEED_REST:  # the sums over k != y: predicated adds
                rest = tl.where(oh, rest, rest + e)
                if MODE == MODE_MSE_SOFTMAX:
                    s2r = tl.where(oh, s2r, tl.fma(e, e, s2r))
        m = gm
    elif MODE == MODE_SIGMOID_FOCAL:
        for k in tl.static_range(NCLS):
            lsum += sigmoid_focal_terms(vals[k], yr == k, gamma, FOCAL)
    elif MODE == MODE_MSE_LOGITS:
        for k in tl.static_range(NCLS):
            d = vals[k] - tl.where(yr == k, tv, 0.0)
            lsum += d * d
    if NEED_AM:
        for k in tl.static_range(NCLS):
            bv, am = take_max(vals[k], bv, am, c0 + k)
    return m, s, rest, s2r, lsum, bv, am, xy


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
    valid,
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
    """(m, s, rest, s2r, lsum, am, xy) of one output row's pixels over all classes: from the cached
    horizontal rows (CACHE, one group), or per class group (a loop) from the low-resolution logits.
    xy, in a softmax mode: the label's interpolated logit (0 where the pixel is not ``valid``).
    With CACHE the exp pass keeps it with a select per logit: there the classes' taps are loaded once
    per low-resolution row, and a gather of the label's 4 taps after the pass, a sector per lane and
    tap, would be most of the loads' sectors (sm90_memory); the select also costs fewer instructions
    than the gather's addressing (sm90_static). After the group loop it is gathered
    (:func:`_interp_at`): its sectors are few beside the loop's own gathered taps of every class, and
    there the select costs more (sm90_static: 12.9 → 16.1 instructions per logit at 150 classes,
    float32)."""
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
    xy = tl.zeros(y32.shape, acc_ty)
    if CACHE:
        vals = _vert(ha, hb, wy0, wy1, C, TAP2_Y)
        m, s, rest, s2r, lsum, bv, am, xy = _fold(
            vals, 0, yk, tv, gamma, m, s, rest, s2r, lsum, bv, am, xy, C, MODE, FOCAL, NEED_AM, True, True
        )
    else:  # a loop over the class groups (unrolled groups spilled)
        FULL: tl.constexpr = (C // GROUP) * GROUP
        for c0 in range(0, FULL, GROUP):
            vals = _row_vals(
                xp, r0, r1, o0, o1, wx0, wx1, wy0, wy1, xm, sc, c0, acc_ty, GROUP, TAP2_X, TAP2_Y
            )
            m, s, rest, s2r, lsum, bv, am, xy = _fold(
                vals, c0, yk, tv, gamma, m, s, rest, s2r, lsum, bv, am, xy, GROUP, MODE, FOCAL, NEED_AM
            )
        if C % GROUP:
            vals = _row_vals(
                xp, r0, r1, o0, o1, wx0, wx1, wy0, wy1, xm, sc, FULL, acc_ty, C % GROUP, TAP2_X, TAP2_Y
            )
            m, s, rest, s2r, lsum, bv, am, xy = _fold(
                vals, FULL, yk, tv, gamma, m, s, rest, s2r, lsum, bv, am, xy, C % GROUP, MODE, FOCAL, NEED_AM
            )
        if MODE == MODE_SOFTMAX_FOCAL or MODE == MODE_MSE_SOFTMAX:
            xy = _interp_at(xp, y32 * sc, r0, r1, o0, o1, wx0, wx1, wy0, wy1, valid, acc_ty, TAP2_X, TAP2_Y)
    return m, s, rest, s2r, lsum, am, xy


@triton.jit
def _fwd_columns(
    x_ptr,
    ax0_ptr,
    wx0_ptr,
    wx1_ptr,
    pid,
    W,
    w,
    bands,
    xblocks,
    stride_b,
    stride_c,
    stride_h,
    stride_w,
    acc_ty: tl.constexpr,
    TAP2_X: tl.constexpr,
    OFF64: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    """A forward-walk program's image b, row band and output columns X (mask xm), with the columns'
    horizontal taps (offsets o0, o1) and weights, loaded once per output column; sc, sh the class and
    row strides inside an image, xp the image's logits."""
    xb = pid % xblocks
    band = (pid // xblocks) % bands
    b = (pid // (xblocks * bands)).to(tl.int64)
    X = xb * BLOCK_X + tl.arange(0, BLOCK_X)
    xm = X < W
    sc, sh, sw = _in_image(stride_c, stride_h, stride_w, OFF64)
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
    return band, b, X, xm, sc, sh, o0, o1, wx0, wx1, xp


@triton.jit
def _band_start(
    xp,
    band,
    h,
    sh,
    o0,
    o1,
    wx0,
    wx1,
    xm,
    sc,
    acc_ty: tl.constexpr,
    C: tl.constexpr,
    CACHE: tl.constexpr,
    TAP2_X: tl.constexpr,
    R: tl.constexpr,
):
    """The band's low-resolution rows [ya, yb) and, CACHE, the horizontal passes of its first row (ha, hb:
    placeholders otherwise)."""
    ya = band * R
    yb = tl.minimum(ya + R, h)
    ha = o0  # placeholders when not CACHE
    hb = o0
    if CACHE:
        ha = _hrow(xp, ya * sh, o0, o1, wx0, wx1, xm, sc, 0, acc_ty, C, TAP2_X)
        hb = ha
    return ya, yb, ha, hb


@triton.jit
def _cached_below(
    xp,
    r1,
    hb,
    o0,
    o1,
    wx0,
    wx1,
    xm,
    sc,
    acc_ty: tl.constexpr,
    C: tl.constexpr,
    TAP2_X: tl.constexpr,
    TAP2_Y: tl.constexpr,
):
    """CACHE, at a low-resolution row: the horizontal passes of the row below (offset r1) on a two-tap
    vertical axis (hb kept otherwise)."""
    if TAP2_Y:
        hb = _hrow(xp, r1, o0, o1, wx0, wx1, xm, sc, 0, acc_ty, C, TAP2_X)
    return hb


@triton.jit
def _cached_next(
    xp,
    r1,
    hb,
    o0,
    o1,
    wx0,
    wx1,
    xm,
    sc,
    acc_ty: tl.constexpr,
    C: tl.constexpr,
    TAP2_X: tl.constexpr,
    TAP2_Y: tl.constexpr,
):
    """CACHE, after a low-resolution row: the horizontal passes of the next row (ha), those of the row
    below (hb) on a two-tap vertical axis."""
    if TAP2_Y:
        ha = hb
    else:
        ha = _hrow(xp, r1, o0, o1, wx0, wx1, xm, sc, 0, acc_ty, C, TAP2_X)  # the next row
    return ha


@triton.jit
def _step_labels(t_ptr, Y0, Ye, X, xm, b, H, W, ignore_index, C, TY: tl.constexpr):
    """The pixels of one step, output rows Y0 .. Y0 + TY - 1 (below Ye) x the program's columns: rows Y
    [TY, 1] (mask ym), pixel mask pm, pixel index n, and their labels (:func:`load_labels`)."""
    Y = Y0 + tl.arange(0, TY)[:, None]  # [TY, 1] rows x [BLOCK_X] columns
    ym = Y < Ye
    pm = ym & xm[None, :]
    n = (b * H + Y) * W + X[None, :]  # int64: B*H*W can exceed 2**31
    valid, bad, y32, badv = load_labels(t_ptr, n, pm, ignore_index, C, -1)
    return Y, ym, pm, n, valid, bad, y32, badv


@triton.jit
def _step_state(
    xp,
    ha,
    hb,
    Y,
    ym,
    r0,
    r1,
    o0,
    o1,
    wx0,
    wx1,
    wy0_ptr,
    wy1_ptr,
    tv_ptr,
    xm,
    sc,
    y32,
    valid,
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
    TY: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    """The state of one step's pixels over all classes (:func:`_row_state`): tv (the MSE target values),
    m, s, rest, s2r, lsum, am, and in a softmax mode the label's interpolated logit xy (0 in the other
    modes)."""
    wy0 = tl.load(wy0_ptr + Y, mask=ym, other=0.0)
    wy1 = wy0
    if TAP2_Y:
        wy1 = tl.load(wy1_ptr + Y, mask=ym, other=0.0)
    tv = tl.zeros([TY, BLOCK_X], acc_ty)
    if MODE == MODE_MSE_LOGITS or MODE == MODE_MSE_SOFTMAX:
        tv = tl.load(tv_ptr + y32, mask=valid, other=0.0).to(acc_ty)
    m, s, rest, s2r, lsum, am, xy = _row_state(
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
        valid,
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
    return tv, m, s, rest, s2r, lsum, am, xy


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
    lse_ptr,
    q_ptr,  # (N,) out (STORE_LSE): each output pixel's lse and focal weight
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
    STORE_LSE: tl.constexpr,  # the forward (softmax focal) also writes each pixel's lse (and focal weight)
    TAP2_X: tl.constexpr,
    TAP2_Y: tl.constexpr,  # two-tap axes (bilinear, size changed)
    OFF64: tl.constexpr,  # 64-bit offsets inside an image
    R: tl.constexpr,  # low-resolution rows per band
    TY: tl.constexpr,  # output rows per step (of one segment)
    BLOCK_X: tl.constexpr,  # output columns per program, one per thread
    ZB: tl.constexpr,  # classes per step of the rows' zeroing (not REG_STATS)
):
    """The forward: loss, class statistics, bad labels and confusion of the interpolated logits.

    A program owns R consecutive low-resolution rows of one image and BLOCK_X consecutive output
    columns, one column per thread: it walks the rows y of its band and, for each, the output rows Y of
    segment y in steps of TY rows, i.e. every output row whose first source row is in the band. With
    CACHE the horizontal passes of rows y and y + 1 are kept in registers (2·C values per thread),
    computed once per low-resolution row of the band (R + 1 per band) and reused by the H/h output rows
    of the segment; beyond, each step recomputes them per class group (4 gathered loads, cache hits, and
    3 multiply-adds per class, for the TY rows of the step). Per pixel: the label, the softmax in one max
    pass and one exp pass over the group's interpolated values, or the per-class terms of the
    elementwise modes; the label's interpolated logit from the exp pass (CACHE) or 4 gathered loads per
    pixel (beyond). Class statistics as
    in the static forward: per-thread registers (REG_STATS: a predicated add per pixel, class and sum;
    the counts float32, exact below 2**24) written once per program as a row of a (programs, C) table,
    else the per-pixel loss summed per class by ``_class_sum_kernel`` and integer atomics into
    per-program rows. STORE_LSE (softmax focal, the backward with class groups): each pixel's lse and,
    with FOCAL, its focal weight ∂ℓ/∂log p_y, so that the backward needs no coefficient launch."""
    acc_ty = pl_ptr.dtype.element_ty
    gamma = acc_gamma(gamma, gamma64, acc_ty)
    pid = tl.program_id(0)
    band, b, X, xm, sc, sh, o0, o1, wx0, wx1, xp = _fwd_columns(
        x_ptr,
        ax0_ptr,
        wx0_ptr,
        wx1_ptr,
        pid,
        W,
        w,
        bands,
        xblocks,
        stride_b,
        stride_c,
        stride_h,
        stride_w,
        acc_ty,
        TAP2_X,
        OFF64,
        BLOCK_X,
    )
    NEED_AM: tl.constexpr = NEED_TP or CONF > 0
    SOFTMAX: tl.constexpr = MODE == MODE_SOFTMAX_FOCAL or MODE == MODE_MSE_SOFTMAX
    pid64 = pid.to(tl.int64)
    if REG_STATS:
        lacc = ()
        cacc = ()
        tacc = ()
        for c in tl.static_range(C):
            lacc = lacc + (tl.zeros([TY, BLOCK_X], acc_ty),)
            cacc = cacc + (tl.zeros([TY, BLOCK_X], tl.float32),)
            tacc = tacc + (tl.zeros([TY, BLOCK_X], tl.float32),)
    else:
        zero_rows(crow_ptr, pid64, C, ZB)
        if NEED_TP:
            zero_rows(trow_ptr, pid64, C, ZB)
        tl.debug_barrier()  # the zeros before this program's additions into its rows
    if CONF == 1:
        hist = tl.zeros([CONF_BINS], tl.int32)
    # a lane counts at most H pixels: int32 unless the counts are int64 (H >= _BIG_H)
    nbad = tl.zeros([BLOCK_X], crow_ptr.dtype.element_ty)
    vbad = tl.full([BLOCK_X], NO_BAD, tl.int64)
    ya, yb, ha, hb = _band_start(xp, band, h, sh, o0, o1, wx0, wx1, xm, sc, acc_ty, C, CACHE, TAP2_X, R)
    for y in range(ya, yb):
        r0 = y * sh
        r1 = tl.minimum(y + 1, h - 1) * sh
        # the cached horizontal passes (CACHE; ha, hb are placeholders otherwise, not carried by the loop)
        if CACHE:
            hb = _cached_below(xp, r1, hb, o0, o1, wx0, wx1, xm, sc, acc_ty, C, TAP2_X, TAP2_Y)
        Ye = tl.load(sy1_ptr + y)
        for Y0 in range(tl.load(sy0_ptr + y), Ye, TY):
            Y, ym, pm, n, valid, bad, y32, badv = _step_labels(
                t_ptr, Y0, Ye, X, xm, b, H, W, ignore_index, C, TY
            )
            nbad += tl.sum(bad.to(nbad.dtype), 0)
            vbad = tl.maximum(vbad, tl.max(badv, 0))
            tv, m, s, rest, s2r, lsum, am, xy = _step_state(
                xp,
                ha,
                hb,
                Y,
                ym,
                r0,
                r1,
                o0,
                o1,
                wx0,
                wx1,
                wy0_ptr,
                wy1_ptr,
                tv_ptr,
                xm,
                sc,
                y32,
                valid,
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
                TY,
                BLOCK_X,
            )
            if SOFTMAX:
                lse_v = log_sum_exp(m, s)
                logp = xy - lse_v
                if STORE_LSE:  # the forward keeps it for the backward (softmax focal, keeps_lse)
                    tl.store(lse_ptr + n, lse_v, mask=pm)
                    if FOCAL:  # and the focal weight ∂ℓ/∂log p_y, the backward's a per unit upstream weight
                        tl.store(q_ptr + n, focal_coef(1.0, logp, tl.exp(logp), rest / s, gamma), mask=pm)
            if MODE == MODE_SOFTMAX_FOCAL:
                if FOCAL:
                    # (1 - p_y)^γ; 1 - p_y = 0 gives exp(-inf) = 0 for γ > 0
                    loss = -tl.exp(gamma * tl.log(rest / s)) * logp
                else:
                    loss = -logp
            elif MODE == MODE_MSE_SOFTMAX:
                dy = tl.exp(logp) - tv
                loss = 0.5 * (s2r / (s * s) + dy * dy)
            elif MODE == MODE_MSE_LOGITS:
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
                hist = conf_hist(hist, y32, am, valid, C, CONF_BINS)
            counts_in_memory(
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
            ha = _cached_next(xp, r1, hb, o0, o1, wx0, wx1, xm, sc, acc_ty, C, TAP2_X, TAP2_Y)
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
        conf_flush(conf_ptr, hist, C, CONF_BINS)
    store_bad(bad_ptr, pid, tl.sum(nbad.to(tl.int64), 0), tl.max(vbad, 0))


@triton.jit
def _up_coef_kernel(
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
    gp_ptr,
    wv_ptr,  # upstream gradient and its per-class factor (see upstream)
    coef_ptr,  # (N,) out: a of each output pixel (0 where not valid); its dtype sets the arithmetic
    lse_ptr,  # (N,) out: lse of each output pixel
    q_ptr,  # (N,) out: q of each output pixel (MSE on the softmax)
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
    MODE: tl.constexpr,  # a softmax mode
    FOCAL: tl.constexpr,
    HAS_GP: tl.constexpr,
    HAS_WV: tl.constexpr,
    TAP2_X: tl.constexpr,
    TAP2_Y: tl.constexpr,  # two-tap axes (bilinear, size changed)
    OFF64: tl.constexpr,  # 64-bit offsets inside an image
    R: tl.constexpr,  # low-resolution rows per band
    TY: tl.constexpr,  # output rows per step (of one segment)
    BLOCK_X: tl.constexpr,  # output columns per program, one per thread
):
    """The backward's first launch for the class groups of a softmax mode (``PRE`` = 1 of
    :func:`_up_bwd_kernel`): per output pixel the scalars its gradient needs, a (the upstream weight
    times ∂ℓ/∂log p_y), lse and, for the MSE on the softmax, q; O(B·H·W). The forward's walk and pixel
    state (:func:`_up_fwd_kernel`), without statistics."""
    acc_ty = coef_ptr.dtype.element_ty
    gamma = acc_gamma(gamma, gamma64, acc_ty)
    pid = tl.program_id(0)
    band, b, X, xm, sc, sh, o0, o1, wx0, wx1, xp = _fwd_columns(
        x_ptr,
        ax0_ptr,
        wx0_ptr,
        wx1_ptr,
        pid,
        W,
        w,
        bands,
        xblocks,
        stride_b,
        stride_c,
        stride_h,
        stride_w,
        acc_ty,
        TAP2_X,
        OFF64,
        BLOCK_X,
    )
    ya, yb, ha, hb = _band_start(xp, band, h, sh, o0, o1, wx0, wx1, xm, sc, acc_ty, C, CACHE, TAP2_X, R)
    for y in range(ya, yb):
        r0 = y * sh
        r1 = tl.minimum(y + 1, h - 1) * sh
        # the cached horizontal passes (CACHE; ha, hb are placeholders otherwise, not carried by the loop)
        if CACHE:
            hb = _cached_below(xp, r1, hb, o0, o1, wx0, wx1, xm, sc, acc_ty, C, TAP2_X, TAP2_Y)
        Ye = tl.load(sy1_ptr + y)
        for Y0 in range(tl.load(sy0_ptr + y), Ye, TY):
            Y, ym, pm, n, valid, bad, y32, badv = _step_labels(
                t_ptr, Y0, Ye, X, xm, b, H, W, ignore_index, C, TY
            )
            tv, m, s, rest, s2r, lsum, am, xy = _step_state(
                xp,
                ha,
                hb,
                Y,
                ym,
                r0,
                r1,
                o0,
                o1,
                wx0,
                wx1,
                wy0_ptr,
                wy1_ptr,
                tv_ptr,
                xm,
                sc,
                y32,
                valid,
                gamma,
                acc_ty,
                C,
                GROUP,
                CACHE,
                MODE,
                FOCAL,
                False,
                TAP2_X,
                TAP2_Y,
                TY,
                BLOCK_X,
            )
            wgt = upstream(
                gp_ptr, wv_ptr, n, y32, valid, gp_stride, tl.full([TY, BLOCK_X], 1.0, acc_ty), HAS_GP, HAS_WV
            )
            lse, a, q = bwd_softmax_coefs(m, s, rest, s2r, xy, tv, wgt, gamma, MODE, FOCAL)
            tl.store(coef_ptr + n, tl.where(valid, a, 0.0), mask=pm)
            tl.store(lse_ptr + n, lse, mask=pm)
            if MODE == MODE_MSE_SOFTMAX:
                tl.store(q_ptr + n, q, mask=pm)
        if CACHE:
            ha = _cached_next(xp, r1, hb, o0, o1, wx0, wx1, xm, sc, acc_ty, C, TAP2_X, TAP2_Y)


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
    if MODE == MODE_SOFTMAX_FOCAL or MODE == MODE_MSE_SOFTMAX:
        if PRE:
            ps = ()
            sh = _shift(lse)
            for k in tl.static_range(NCLS):
                ps = ps + (_exp_minus(vals[k], sh),)
        else:
            NEED_REST: tl.constexpr = FOCAL or MODE == MODE_MSE_SOFTMAX
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
                    if MODE == MODE_MSE_SOFTMAX:
                        s2r = tl.where(oh, s2r, tl.fma(e, e, s2r))
            lse, a, q = bwd_softmax_coefs(m, s, rest, s2r, xy, tv, a, gamma, MODE, FOCAL)
            r = 1.0 / s
            ps = ()
            for k in tl.static_range(NCLS):
                ps = ps + (es[k] * r,)
        for k in tl.static_range(NCLS):
            oh = y32 == c0 + k
            if MODE == MODE_SOFTMAX_FOCAL:
                g = tl.fma(-a, ps[k], tl.where(oh, a, 0.0))  # a (onehot - p), one fused multiply-add
            else:
                g = a * ps[k] * (ps[k] - tl.where(oh, tv, 0.0) - q)
            gs = gs + (tl.where(valid, g, 0.0),)  # 0 * inf or 0 * NaN would not be 0
    else:
        for k in tl.static_range(NCLS):
            oh = y32 == c0 + k
            if MODE == MODE_SIGMOID_FOCAL:
                g = a * sigmoid_focal_grad(vals[k], oh, gamma, FOCAL)
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
    at the lanes' columns (see :func:`_up_bwd_kernel`): A (row yy, own column), Bc (row yy, next
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
                valid, bad, y32, badv = load_labels(t_ptr, n, pm, ignore_index, C, -1)
                a = zero  # the upstream weight grad[n] * scale[y], or the coefficient
                lse = zero
                q = zero
                if PRE == 2:  # from the forward: a = the upstream weight x (-1, or the focal weight at q_ptr)
                    a = upstream(gp_ptr, wv_ptr, n, y32, valid, gp_stride, one, HAS_GP, HAS_WV)
                    if FOCAL:
                        a = a * tl.load(q_ptr + n, mask=valid, other=0.0)
                    else:
                        a = -a
                    lse = tl.load(lse_ptr + n, mask=valid, other=0.0)
                elif PRE:
                    a = tl.load(coef_ptr + n, mask=valid, other=0.0)  # 0 at ignored and bad pixels
                    lse = tl.load(lse_ptr + n, mask=valid, other=0.0)
                    if MODE == MODE_MSE_SOFTMAX:
                        q = tl.load(q_ptr + n, mask=valid, other=0.0)
                else:
                    a = upstream(gp_ptr, wv_ptr, n, y32, valid, gp_stride, one, HAS_GP, HAS_WV)
                tv = zero
                if MODE == MODE_MSE_LOGITS or MODE == MODE_MSE_SOFTMAX:
                    tv = tl.load(tv_ptr + y32, mask=valid, other=0.0).to(acc_ty)
                wy0 = tl.load(wy0_ptr + Y, mask=ym, other=0.0)
                wy1 = wy0
                if TAP2_Y:
                    wy1 = tl.load(wy1_ptr + Y, mask=ym, other=0.0)
                vals = _vert(h0, h1, wy0, wy1, NCLS, TAP2_Y)
                gs = _pixel_grads(vals, y32, valid, tv, a, lse, q, gamma, c0, acc_ty, NCLS, MODE, FOCAL, PRE)
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
    wv_ptr,  # upstream gradient and its per-class factor (HAS_GP, HAS_WV; see upstream)
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
    """The gradient with respect to the low-resolution logits (deterministic, no float atomics).

    The transposed interpolation is separable too: the gradient of low-resolution element (y, x) is
    Σ over the output pixels that read it of wy·wx·g. A program owns R low-resolution rows x
    BLOCK_X - 1 low-resolution columns of one image; lane i is column x_i, and one extra lane (the
    column left of the block) is a halo. For each low-resolution row yy of the band (plus the row above,
    a halo, on a two-tap vertical axis) lane i walks the output columns X of its segment (the columns
    whose first source column is x_i) and, inside, the output rows Y of segment yy: every output pixel
    is visited by exactly one lane and one row of the walk (halos apart). There it recomputes the
    interpolated logits (all of a lane's columns read the same two source columns: their values in rows
    yy and yy + 1 are loaded once per row, row yy + 1's kept for the next row; the horizontal passes at
    column X are blended from them once per column and reused over the rows), the loss gradient g of
    each class, and adds wy0·wx0·g, wy0·wx1·g, wy1·wx0·g, wy1·wx1·g into four per-thread accumulators:
    (row yy, column x_i), (yy, x_i + 1), (yy + 1, x_i), (yy + 1, x_i + 1) (steps of TJ columns x TY
    rows). When row yy is done its elements are complete: column x_i's value is its own first
    accumulator plus the second of lane i - 1 (one ``tl.gather`` per low-resolution element); the
    yy + 1 accumulators carry over to the next row. With one class group (``PRE`` = 0) the softmax of
    each pixel is computed in the same pass (one exp per logit, kept for the gradient); with class
    groups (the exponentials of every class as well as the accumulators and taps ran out of registers)
    the groups are the outer loop (``LOOP``, or unrolled) and a softmax mode reads per output pixel the
    scalars of its gradient: a, lse, q of :func:`_up_coef_kernel` (``PRE`` = 1), or what the forward
    kept (``PRE`` = 2): lse and, with γ != 0, the focal weight, a being the upstream weight times that
    weight (or -1). Every gradient element is the same sum in the same order whatever the grid, so
    results are bit-identical run to run."""
    acc_ty = tv_ptr.dtype.element_ty
    gamma = acc_gamma(gamma, gamma64, acc_ty)
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
