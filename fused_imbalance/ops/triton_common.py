"""Triton JIT helpers and constants that more than one kernel family uses.

Every Triton kernel module (:mod:`.triton_kernels`, :mod:`.triton_rows`, :mod:`.triton_upsample_kernels`,
:mod:`.triton_dice`, :mod:`.triton_ohem`) imports what it shares from here, and from no other family.
The helpers are inlined into the kernels that call them: where they live changes no instruction.

``MODE_*``, ``RED_*`` and ``WEIGHTING_*`` are the values of the kernels' ``MODE``, ``RED`` and
``WEIGHTING`` arguments, taken from the ops' enums (:class:`~fused_imbalance.ops.Mode`,
:class:`~fused_imbalance.ops.Reduction`, :class:`~fused_imbalance.ops.Weighting`, which the C++
enums of ``csrc/cpu/loss_kernels.h`` and ``csrc/cpu/op_common.h`` mirror). A global that a jitted
function reads must be a ``tl.constexpr`` object; a comparison with one folds at compile time, as
with a literal.
"""

import inspect

import triton
import triton.language as tl

from . import Mode, Reduction, Weighting

MODE_SOFTMAX_FOCAL = tl.constexpr(int(Mode.SOFTMAX_FOCAL))
MODE_SIGMOID_FOCAL = tl.constexpr(int(Mode.SIGMOID_FOCAL))
MODE_MSE_LOGITS = tl.constexpr(int(Mode.MSE_LOGITS))
MODE_MSE_SOFTMAX = tl.constexpr(int(Mode.MSE_SOFTMAX))
MODE_STATS = tl.constexpr(int(Mode.STATS))
RED_MEAN = tl.constexpr(int(Reduction.MEAN))
RED_SUM = tl.constexpr(int(Reduction.SUM))
RED_NONE = tl.constexpr(int(Reduction.NONE))
RED_CLASS = tl.constexpr(int(Reduction.CLASS))
WEIGHTING_NONE = tl.constexpr(int(Weighting.NONE))
WEIGHTING_GENERAL = tl.constexpr(int(Weighting.GENERAL))
WEIGHTING_PAPER = tl.constexpr(int(Weighting.PAPER))
WEIGHTING_RECALL = tl.constexpr(int(Weighting.RECALL))

LOG2E = tl.constexpr(1.4426950408889634)


NO_BAD = tl.constexpr(-(2**63))  # "no bad label yet" in the running maximum of the bad labels


# tl.fdiv takes approx= in newer triton (3.9: div.approx.f32); triton 3.6 has no such argument, and its
# default (ieee_rounding=False) is the fast full-range division, div.full.f32, also within 2 ulp.
_FDIV_APPROX = tl.constexpr("approx" in inspect.signature(tl.fdiv).parameters)


@triton.jit
def i64(v):
    """``v`` (an integer argument, possibly specialised to a constant) as an int64 scalar, so that
    ``k * v`` cannot overflow 32 bits."""
    return v + tl.zeros([], tl.int64)


@triton.jit
def acc_gamma(gamma, gamma64, acc_ty: tl.constexpr):
    """γ in the accumulation type. Every kernel takes it twice: a Python float argument is float32
    in a plain launch (γ = 0.999 off by 1e-8 for float64 logits) and float64 in an Inductor-compiled
    graph (where float32 kernels then promoted their sums to float64 and failed to compile).
    float64 kernels take gamma64, annotated float64 for both; the others round gamma once (a no-op
    in a plain launch: a float64 parameter costs float32 kernels a register, and spilled two).
    Through tl.full in both cases: the interpreter reads an annotated float64 argument as float32
    in arithmetic."""
    return tl.full((), gamma64 if acc_ty == tl.float64 else gamma, acc_ty)


@triton.jit
def log_sum_exp(m, s):
    return tl.where(m == float("-inf"), 0.0, m) + tl.log(s)


@triton.jit
def _softplus_parts(z):
    """(e, w, l) with e = exp(-|z|), w = 1 + e and l = log(1 + e), so softplus(z) = max(z, 0) + l
    and softplus(-z) = max(-z, 0) + l, with the relative accuracy of the dtype down to a tiny e.

    float32: e = exp2(-|z| log2(e)), the special-function unit's ex2 (tl.exp adds a multiply
    and range fix-ups; an e below float32's normal range flushes to 0), and l = e P(e), P the
    degree-8 polynomial closest to log1p(e) / e on [0, 1] in relative error (3e-8; about 4 ulp
    evaluated in float32 by Horner's rule): eight explicit fused multiply-adds (tl.fma: the same
    on any triton, whatever its default for fusing a multiply and an add) and a multiply, where tl.log is a
    ~24-instruction software logarithm on sm_90 and the special-function lg2 is accurate only to
    2^-22 absolute near 1 (not at all, relatively, for a small e). Written inline: the
    interpreter pays for every call of a jit function.
    float64: l = log(w) - δ/w with δ = (w - 1) - e exact, so a tiny e keeps its digits (l = e
    when w = 1); 1/w ~ 2 - w on [1, 2], no division (the correction, at most 2^-53, changes by
    at most half)."""
    if z.dtype == tl.float64:
        e = tl.exp(-tl.abs(z))
        w = 1.0 + e
        l = tl.log(w) - ((w - 1.0) - e) * (2.0 - w)
    else:
        e = tl.exp2(tl.abs(z) * -LOG2E)
        w = 1.0 + e
        p = tl.fma(e, 0.005232746247202158, -0.02950545959174633)
        p = tl.fma(p, e, 0.07822633534669876)
        p = tl.fma(p, e, -0.13663281500339508)
        p = tl.fma(p, e, 0.19106024503707886)
        p = tl.fma(p, e, -0.24842987954616547)
        p = tl.fma(p, e, 0.3331909775733948)
        p = tl.fma(p, e, -0.4999949336051941)
        p = tl.fma(p, e, 0.9999999403953552)
        l = p * e
    return e, w, l


@triton.jit
def _recip(w):
    """1 / w: the fast approximate division in float32 (2 ulp), IEEE in float64."""
    if w.dtype == tl.float64:
        return 1.0 / w
    else:
        if _FDIV_APPROX:
            return tl.fdiv(tl.full(w.shape, 1.0, w.dtype), w, approx=True)
        else:
            return tl.fdiv(tl.full(w.shape, 1.0, w.dtype), w)


@triton.jit
def sigmoid_focal_terms(x, oh, gamma, FOCAL: tl.constexpr):
    """Per-class FL_k = σ(z)^γ softplus(z) with z = x_k for k ≠ y and z = -x_y for k = y.

    Both halves of the sigmoid focal loss are this one function of z: -log(1 - σ(x)) =
    softplus(x), -log σ(x) = softplus(-x), and σ(z)^γ = exp(-γ softplus(-z)): two exponentials
    per logit on the special-function unit and a polynomial log1p, no division.
    """
    z = tl.where(oh, -x, x)
    e, w, l = _softplus_parts(z)
    sp = tl.maximum(z, 0.0) + l
    if FOCAL:
        u = tl.maximum(-z, 0.0) + l
        if u.dtype == tl.float64:
            sp = tl.exp(-gamma * u) * sp
        else:
            sp = tl.exp2(u * (-gamma * LOG2E)) * sp  # the special-function ex2, as in _softplus_parts
    return sp


@triton.jit
def sigmoid_focal_grad(x, oh, gamma, FOCAL: tl.constexpr):
    """∂ℓ/∂x_k of the sigmoid focal loss, ±d/dz [σ(z)^γ sp(z)] = ±σ(z)^γ (γ σ(-z) sp(z) + σ(z)),
    sp = softplus; σ(±z) from e = exp(-|z|) and one reciprocal of 1 + e (no overflow)."""
    z = tl.where(oh, -x, x)
    e, w, l = _softplus_parts(z)
    r = _recip(w)
    pos = z >= 0.0
    sig = tl.where(pos, 1.0, e) * r  # σ(z)
    if FOCAL:
        sp = tl.maximum(z, 0.0) + l
        sig_neg = tl.where(pos, e, 1.0) * r  # σ(-z)
        u = tl.maximum(-z, 0.0) + l
        if u.dtype == tl.float64:
            fz = tl.exp(-gamma * u)  # σ(z)^γ
        else:
            fz = tl.exp2(u * (-gamma * LOG2E))
        d = fz * (gamma * sig_neg * sp + sig)
    else:
        d = sig
    return tl.where(oh, -d, d)


@triton.jit
def focal_coef(w, logp, p, omp, gamma):
    """The softmax focal backward's per-pixel weight a = w ∂ℓ/∂log p_y, given p = p_y and omp = 1 - p_y:
    ∂ℓ/∂log p = -(1-p)^γ + γ p log p (1-p)^(γ-1) = -(1-p)^γ (1 - γ p log p / (1-p)); log p / (1-p) -> -1
    as p -> 1, and (1-p)^γ = 0 there (γ > 0), so the limit is 0, not 0*inf."""
    wf = tl.exp(gamma * tl.log(omp))
    r = tl.where(omp > 0.0, logp / omp, -1.0)
    return -w * wf * (1.0 - gamma * p * r)


@triton.jit
def bwd_softmax_coefs(m, s, rest, s2r, xy, tv, w, gamma, MODE: tl.constexpr, FOCAL: tl.constexpr):
    """Per-pixel (lse, a, q): ∂ℓ/∂x_k = a (onehot_k - p_k) for mode 0, a p_k (p_k - t onehot_k - q)
    for mode 3, with the upstream gradient w already folded into a."""
    lse = log_sum_exp(m, s)
    logp = xy - lse
    if MODE == MODE_SOFTMAX_FOCAL:
        if FOCAL:
            a = focal_coef(w, logp, tl.exp(logp), rest / s, gamma)
        else:
            a = -w
        q = a  # unused
    else:
        py = tl.exp(logp)
        q = s2r / (s * s) + py * py - tv * py  # Σ_j p_j (p_j - t_j)
        a = w
    return lse, a, q


@triton.jit
def load_labels(t_ptr, n, pmask, ignore_index, C, NOT_VALID: tl.constexpr):
    """(valid, bad, y32, badv) of the labels at pixels ``n``: y32 is NOT_VALID where not valid, badv the
    label (int64) where it is bad (outside [0, C) and not ``ignore_index``) and NO_BAD elsewhere."""
    y = tl.load(t_ptr + n, mask=pmask, other=0).to(tl.int64)  # widen before comparing
    keep = pmask & (y != ignore_index)
    inr = (y >= 0) & (y < C)
    valid = keep & inr
    bad = keep & ~inr
    return valid, bad, tl.where(valid, y, NOT_VALID).to(tl.int32), tl.where(bad, y, NO_BAD)


@triton.jit
def store_bad(bad_ptr, pid, nbad, vbad):
    """A program's row of the bad-label table (scalars): how many of its labels were bad and the largest
    of them (NO_BAD when none), which the finalize launch reduces; the caller's error names that label."""
    tl.store(bad_ptr + 2 * pid.to(tl.int64), nbad.to(tl.int64))
    tl.store(bad_ptr + 2 * pid.to(tl.int64) + 1, vbad)


@triton.jit
def upstream(gp_ptr, wv_ptr, n, y32, valid, gp_stride, one, HAS_GP: tl.constexpr, HAS_WV: tl.constexpr):
    """The backward's upstream weight of each pixel, d(output)/dℓ_n times the output's gradient:
    grad[n · gp_stride] (a per-pixel gradient, or the scalar one with stride 0) times the per-class
    factor wv[y_n] (the class weight over the mean's denominator, or the gradient of a per-class
    sum); either is 1 when absent. 0 where the pixel is not valid. ``one`` gives the shape and dtype."""
    w = one
    if HAS_GP:
        w = tl.load(gp_ptr + n * gp_stride, mask=valid, other=0.0).to(one.dtype)
    if HAS_WV:
        w = w * tl.load(wv_ptr + y32, mask=valid, other=0.0).to(one.dtype)
    return tl.where(valid, w, 0.0)


@triton.jit
def zero_rows(ptr, pid64, C, ZB: tl.constexpr):
    """Zero the program's own row of C values at ``ptr`` (its dtype), ZB at a time: the per-program rows
    it adds into, so that the launcher needs no zeroed buffer (a memset launch on a GPU). The caller
    orders these stores before its additions with a barrier."""
    cs = tl.arange(0, ZB)
    for c0 in range(0, C, ZB):
        c = c0 + cs
        tl.store(ptr + (pid64 * C + c), tl.zeros([ZB], ptr.dtype.element_ty), mask=c < C)


@triton.jit
def tile_pixels(t_ptr, t, tiles_per_b, S, ignore_index, C, ROWS: tl.constexpr, VEC: tl.constexpr):
    """Tile ``t`` as a [ROWS, VEC] block of pixels, VEC consecutive ones per thread:
    (b, s, n, pmask, valid, bad, y32, badv); y32 is -1 where the pixel is not valid."""
    b = t // tiles_per_b
    r = tl.arange(0, ROWS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    # int64: pixel and element offsets can exceed 2**31
    s = (t - b * tiles_per_b).to(tl.int64) * (ROWS * VEC) + r
    pmask = s < S
    b = b.to(tl.int64)
    n = b * S + s
    valid, bad, y32, badv = load_labels(t_ptr, n, pmask, ignore_index, C, -1)
    return b, s, n, pmask, valid, bad, y32, badv


@triton.jit
def take_max(x, bv, bi, c):
    """Running argmax step: first index on ties, and the first NaN wins (torch.argmax)."""
    take = ((x > bv) | (x != x)) & (bv == bv)
    return tl.where(take, x, bv), tl.where(take, c, bi)


@triton.jit
def _softmax_group(
    xp,
    stride_c,
    pmask,
    y32,
    c0,
    m,
    s,
    rest,
    s2r,
    bv,
    am,
    xy,
    acc_ty: tl.constexpr,
    NCLS: tl.constexpr,
    NEED_REST: tl.constexpr,
    NEED_S2: tl.constexpr,
    NEED_AM: tl.constexpr,
    NEED_XY: tl.constexpr,
):
    """Fold classes c0 .. c0 + NCLS - 1 (NCLS unrolled) into the running softmax state: a max
    pass over their logits, the sums rescaled once, then an exp pass over the same values
    (same addresses, no store in between: the compiler keeps them in registers); with NEED_XY the
    exp pass also takes the label's logit ``xy`` (0 where no class is the label: y32 = -1)."""
    gm = m
    xg = xp + c0 * stride_c
    for k in tl.static_range(NCLS):
        x = tl.load(xg + k * stride_c, mask=pmask, other=0.0).to(acc_ty)
        gm = tl.maximum(gm, x)
        if NEED_AM:
            bv, am = take_max(x, bv, am, c0 + k)
    ms = tl.where(gm == float("-inf"), 0.0, gm)
    alpha = tl.exp(m - ms)  # 0 while m is still -inf (the sums are 0 then too)
    s = s * alpha
    if NEED_REST:
        rest = rest * alpha
    if NEED_S2:
        s2r = s2r * (alpha * alpha)
    # float32: exp(x - ms) = exp2((x - ms) log2(e)) on the special-function ex2 (tl.exp adds range
    # fix-ups: 2-3 more instructions per logit); e_k below float32's normal range flush to 0. Not
    # exp2(x log2(e) - ms log2(e)) as one fused multiply-add: that one's exact product minus the
    # rounded ms log2(e) leaves the rounding error of the latter, |ms| 2^-25 log2(e), in every
    # exponent, which overflows ex2 for logits beyond about 1e9.
    for k in tl.static_range(NCLS):
        x = tl.load(xg + k * stride_c, mask=pmask, other=0.0).to(acc_ty)
        if acc_ty == tl.float64:
            e = tl.exp(x - ms)
        else:
            e = tl.exp2((x - ms) * LOG2E)
        s += e
        hit = y32 == c0 + k
        if NEED_REST:
            er = tl.where(hit, 0.0, e)
            rest += er
            if NEED_S2:
                s2r += er * er
        if NEED_XY:
            xy = tl.where(hit, x, xy)
    return gm, s, rest, s2r, bv, am, xy


@triton.jit
def static_softmax(
    xp,
    stride_c,
    pmask,
    y32,
    acc_ty: tl.constexpr,
    C: tl.constexpr,
    GROUP: tl.constexpr,
    LOOP: tl.constexpr,
    NEED_REST: tl.constexpr,
    NEED_S2: tl.constexpr,
    NEED_AM: tl.constexpr,
    NEED_XY: tl.constexpr,
):
    """(m, s, rest, s2r, am, xy) of a pixel block over classes 0..C-1, in groups of GROUP classes.

    m = max_k x_k, s = Σ e_k, rest = Σ_{k≠y} e_k, s2r = Σ_{k≠y} e_k² with e_k = exp(x_k - ms),
    ms = m (0 while every logit is -inf, so that exp(-inf - ms) is 0, not NaN); ``rest / s``
    is 1 - p_y without the cancellation of 1 - exp(log p_y). am: argmax (NEED_AM). xy: the
    label's logit, 0 where the pixel is not valid (NEED_XY; else 0), kept by the exp pass with a
    compare and a select per logit. Not a gathered load ``x[y]`` after the pass: its lanes pick
    different class planes, a sector each (81 % load sector efficiency for 16-bit logits at 19
    classes, traced with sm90_memory), and beyond one group the tile outgrows a program's share
    of L2 on an H100 (150 classes of 1024 16-bit pixels: 300 KB against about 130 KB), so that
    the gather reads each pixel's sector from DRAM a second time.
    LOOP false: every group unrolled (small C). LOOP true: a loop over the C // GROUP full
    groups, then the C % GROUP last classes unrolled (bounded code size for large C).
    """
    m = tl.full(y32.shape, float("-inf"), acc_ty)
    s = tl.zeros(y32.shape, acc_ty)
    rest = tl.zeros(y32.shape, acc_ty)
    s2r = tl.zeros(y32.shape, acc_ty)
    bv = tl.full(y32.shape, float("-inf"), acc_ty)
    am = tl.zeros(y32.shape, tl.int32)
    xy = tl.zeros(y32.shape, acc_ty)
    FULL: tl.constexpr = (C // GROUP) * GROUP
    if LOOP:
        for c0 in range(0, FULL, GROUP):
            m, s, rest, s2r, bv, am, xy = _softmax_group(
                xp,
                stride_c,
                pmask,
                y32,
                c0,
                m,
                s,
                rest,
                s2r,
                bv,
                am,
                xy,
                acc_ty,
                GROUP,
                NEED_REST,
                NEED_S2,
                NEED_AM,
                NEED_XY,
            )
    else:
        for c0 in tl.static_range(0, FULL, GROUP):
            m, s, rest, s2r, bv, am, xy = _softmax_group(
                xp,
                stride_c,
                pmask,
                y32,
                c0,
                m,
                s,
                rest,
                s2r,
                bv,
                am,
                xy,
                acc_ty,
                GROUP,
                NEED_REST,
                NEED_S2,
                NEED_AM,
                NEED_XY,
            )
    if C % GROUP:
        m, s, rest, s2r, bv, am, xy = _softmax_group(
            xp,
            stride_c,
            pmask,
            y32,
            FULL,
            m,
            s,
            rest,
            s2r,
            bv,
            am,
            xy,
            acc_ty,
            C % GROUP,
            NEED_REST,
            NEED_S2,
            NEED_AM,
            NEED_XY,
        )
    return m, s, rest, s2r, am, xy


@triton.jit
def counts_in_memory(
    crow_ptr,
    trow_ptr,
    conf_ptr,
    pid64,
    C,
    y32,
    am,
    valid,
    hit,
    ROWS: tl.constexpr,
    NEED_TP: tl.constexpr,
    CONF: tl.constexpr,
):
    """The forwards' integer statistics that are added into memory (integer atomics: any order gives the
    same sums): with ROWS the program's row of class counts and true positives (when they are not
    per-thread registers), with CONF == 2 the confusion [label, argmax] straight into the caller's
    int64 matrix (CONF == 1 counts in registers: conf_hist)."""
    if ROWS:
        tl.atomic_add(crow_ptr + (pid64 * C + y32), 1, mask=valid, sem="relaxed")
        if NEED_TP:
            tl.atomic_add(trow_ptr + (pid64 * C + y32), 1, mask=hit, sem="relaxed")
    if CONF == 2:
        tl.atomic_add(
            conf_ptr + (y32.to(tl.int64) * C + am), tl.full(y32.shape, 1, tl.int64), mask=valid, sem="relaxed"
        )


@triton.jit
def conf_hist(hist, y32, am, valid, C, BINS: tl.constexpr):
    """The program's confusion counts kept in registers (CONF == 1, C*C <= BINS): a histogram of
    label * C + argmax over the tile's valid pixels added into ``hist`` ([BINS] int32)."""
    key = y32 * C + am
    return hist + tl.histogram(tl.reshape(key, [key.numel]), BINS, mask=tl.reshape(valid, [valid.numel]))


@triton.jit
def conf_flush(conf_ptr, hist, C, BINS: tl.constexpr):
    """Add a program's register histogram (conf_hist) into the caller's (C, C) int64 matrix: one
    integer atomic per non-empty cell, so contention stays low however skewed the classes are."""
    cell = tl.arange(0, BINS)
    tl.atomic_add(conf_ptr + cell, hist.to(tl.int64), mask=(cell < C * C) & (hist != 0), sem="relaxed")
