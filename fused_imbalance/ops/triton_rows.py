"""Triton kernels of the fused losses for logits whose classes are contiguous and dense: channels_last,
channels_last_3d and (N, C) rows with a pixel stride of C, up to 256 classes (C a compile-time constant);
launched by :mod:`.triton_loss`, which also holds the kernels of the other layouts (:mod:`.triton_kernels`).

Such logits are a matrix of pixels x C contiguous classes, so the P pixels of a tile are one contiguous
run of P·C elements. A thread that owns a pixel and reads its classes one by one (the static kernels'
layout, right for NCHW, where a class of consecutive pixels is contiguous) makes each warp instruction
touch 32 sectors for 128 useful bytes here, and its gradient stores leave every sector partly written.
These kernels read a tile as that run instead: a block of ``BL`` elements (a power of two, the first P·C
valid), 16-byte vectors on consecutive lanes, every sector whole. One ``tl.gather`` then hands it to the
threads through shared memory (Triton stores the block once, vectorised, and each thread reads its slots
at constant offsets: one shared load per logit): thread (p, part) holds ``CPART`` consecutive classes of
pixel p, ``PARTS`` threads per pixel (1 up to 40 classes, 20 in float64; 4 for 150 classes), in
``CP2 = 2**LV`` register slots, the power of two above CPART. Slot CPART holds the pixel's label logit,
read by the same gather (no load of its own). Every reduction over classes is a running value in a
thread's registers, then, with several parts, a reduction across the PARTS lanes of a pixel (in one
warp): nothing is padded to a power of two in the arithmetic but the last part's few slots past C.
The backward computes the gradient in the same slots and writes it back through a second gather in
the flat order: the same 16-byte vectors, every gradient sector written whole by one warp.

With every class of a pixel in registers after one read, the backward needs no second pass over the
logits and nothing kept by the forward. Per-pixel work (labels, the loss, the statistics, the bad
labels, per-program rows) is that of the static kernels, whose helpers these kernels share: per-thread
registers for the class statistics up to 32 classes (then PARTS is 1), else the per-pixel loss summed by
``_class_sum_kernel`` and integer atomics into the program's rows; confusion counts in a per-program
register histogram (C·C up to 1024, one part) or by integer atomics.

Cost model, per logit (SASS for sm_90, ``benchmarks/sm90_driver.py``): the tile's load and the shared
store, 1/4 of an instruction each in float32 (16-byte vectors; 1/8 for 16-bit logits), one shared load,
the conversion of 16-bit logits, then the arithmetic of the static kernels (max, exp, sums: about 5;
focal, argmax, sigmoid focal as there); the backward's store side adds a shared store of the slots
(CP2 per thread, vectorised) and one shared load per logit. The padding costs PPIX/P - 1 of the
per-thread work (pixel slots without a pixel: 0 for 19 classes, 23 % for 150) and BL/(P·C) - 1 of
the block's loads and stores (59 % of the block holds data for 19 classes; 95 % for 150 in float32).
Shared memory per program: the block (BL elements) and, in the backward, the gradient slots.
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
    load_labels,
    log_sum_exp,
    sigmoid_focal_grad,
    sigmoid_focal_terms,
    store_bad,
    take_max,
    upstream,
)

__all__ = ["_fwd_rows_kernel", "_bwd_rows_kernel"]


@triton.jit
def _split_slots(x, LV: tl.constexpr):
    """The 2**LV tensors x[..., j] of x shaped [..., 2, ..., 2] (LV twos, j = their bits, most
    significant first), in the order of j: each a set of registers, no data movement."""
    parts = (x,)
    for _ in tl.static_range(LV):
        lo = ()
        hi = ()
        for i in tl.static_range(len(parts)):
            a, b = tl.split(parts[i])
            lo = lo + (a,)
            hi = hi + (b,)
        parts = lo + hi
    return parts


@triton.jit
def _join_slots(parts, LV: tl.constexpr):
    """The inverse of _split_slots: 2**LV tensors joined into one shaped [..., 2, ..., 2], so that
    flattened, parts[j] of a thread lies at position (thread's element) * 2**LV + j."""
    for _ in tl.static_range(LV):
        nxt = ()
        for i in tl.static_range(len(parts) // 2):
            nxt = nxt + (tl.join(parts[i], parts[i + len(parts) // 2]),)
        parts = nxt
    return parts[0]


@triton.jit
def _rows_tile(
    x_ptr,
    base,
    FULL: tl.constexpr,
    lim,
    p2,
    cls,
    y32,
    acc_ty: tl.constexpr,
    C: tl.constexpr,
    CPART: tl.constexpr,
    LV: tl.constexpr,
    P: tl.constexpr,
    BL: tl.constexpr,
):
    """(v, xs) of a tile: its BL elements at ``base`` in ``acc_ty`` (P·C of them when ``FULL``, else ``lim``;
    0 past them), and their slots (each [PPIX, PARTS]): slot j < CPART class cls + j of pixel p2 (anything
    where there is no such class or pixel), slot CPART the label's logit (y32 >= 0; anything where it is
    -1). Converted before the gather: one shared load per slot, no unpacking of 16-bit pairs."""
    f = tl.arange(0, BL)
    if FULL:  # a constant bound: 16-byte vectors
        v = tl.load(x_ptr + (base + f), mask=f < P * C, other=0.0)
    else:
        v = tl.load(x_ptr + (base + f), mask=f < lim, other=0.0)
    v = v.to(acc_ty)
    pc = p2 * C + cls
    idx = ()
    for j in tl.static_range(2**LV):
        if j < CPART:
            k = pc + j
        elif j == CPART:
            k = pc - cls + tl.maximum(y32, 0)[:, None]
        else:
            k = pc  # a slot nothing reads: the compiler drops its load
        idx = idx + (tl.minimum(k, BL - 1),)
    g = tl.gather(v, tl.reshape(_join_slots(idx, LV), [idx[0].numel * 2**LV]), 0)
    return v, _split_slots(tl.reshape(g, [p2.shape[0], cls.shape[1]] + [2] * LV), LV)


@triton.jit
def _slot(
    xs,
    j: tl.constexpr,
    cls,
    fill,
    acc_ty: tl.constexpr,
    C: tl.constexpr,
    CPART: tl.constexpr,
    PARTS: tl.constexpr,
):
    """Slot j in ``acc_ty``; ``fill`` where it lies past the last class (the last part's slots only)."""
    x = xs[j]
    if (PARTS - 1) * CPART + j >= C:
        x = tl.where(cls + j < C, x, fill)
    return x


@triton.jit
def _argmax_combine(va, ia, vb, ib):
    """Two parts' (value, first index) of the argmax: the first NaN wins, else the larger value, and
    the smaller index on ties (torch.argmax)."""
    na = va != va
    nb = vb != vb
    a = (na & (~nb | (ia < ib))) | (~na & ~nb & ((va > vb) | ((va == vb) & (ia < ib))))
    return tl.where(a, va, vb), tl.where(a, ia, ib)


@triton.jit
def _rows_argmax(bv, am, PARTS: tl.constexpr):
    """The argmax of each pixel ([PPIX]) from its parts' running ones ([PPIX, PARTS])."""
    if PARTS == 1:
        return tl.sum(am, 1)
    else:
        return tl.reduce((bv, am), 1, _argmax_combine)[1]


@triton.jit
def _rows_softmax(
    xs,
    cls,
    y2,
    acc_ty: tl.constexpr,
    C: tl.constexpr,
    CPART: tl.constexpr,
    PARTS: tl.constexpr,
    NEED_REST: tl.constexpr,
    NEED_S2: tl.constexpr,
    NEED_AM: tl.constexpr,
):
    """(m, s, rest, s2r, am) of each pixel ([PPIX]) as static_softmax defines them: a max pass and
    an exp pass over the thread's slots, then across the pixel's parts."""
    m = tl.full(xs[0].shape, float("-inf"), acc_ty)
    bv = m
    am = cls + tl.zeros(xs[0].shape, tl.int32)
    for j in tl.static_range(CPART):
        x = _slot(xs, j, cls, float("-inf"), acc_ty, C, CPART, PARTS)
        m = tl.maximum(m, x)
        if NEED_AM:
            bv, am = take_max(x, bv, am, cls + j)
    m = tl.max(m, 1)
    ms = tl.where(m == float("-inf"), 0.0, m)[:, None]
    s = tl.zeros(xs[0].shape, acc_ty)
    rest = s
    s2r = s
    for j in tl.static_range(CPART):
        x = _slot(xs, j, cls, float("-inf"), acc_ty, C, CPART, PARTS)
        # as in static_softmax's groups: the special-function ex2 of the difference in float32
        if acc_ty == tl.float64:
            e = tl.exp(x - ms)
        else:
            e = tl.exp2((x - ms) * LOG2E)
        s += e
        if NEED_REST:
            er = tl.where(y2 == cls + j, 0.0, e)
            rest += er
            if NEED_S2:
                s2r += er * er
    s = tl.sum(s, 1)
    if NEED_REST:
        rest = tl.sum(rest, 1)
        if NEED_S2:
            s2r = tl.sum(s2r, 1)
    if NEED_AM:
        am = _rows_argmax(bv, am, PARTS)
    else:
        am = tl.sum(am, 1)
    return m, s, rest, s2r, am


@triton.jit
def _rows_terms(
    xs,
    cls,
    y2,
    tv2,
    gamma,
    acc_ty: tl.constexpr,
    C: tl.constexpr,
    CPART: tl.constexpr,
    PARTS: tl.constexpr,
    MODE: tl.constexpr,
    FOCAL: tl.constexpr,
    NEED_AM: tl.constexpr,
):
    """(Σ_k term_k, argmax) of each pixel for the per-class modes, as _static_terms."""
    lsum = tl.zeros(xs[0].shape, acc_ty)
    bv = tl.full(xs[0].shape, float("-inf"), acc_ty)
    am = cls + tl.zeros(xs[0].shape, tl.int32)
    for j in tl.static_range(CPART):
        x = xs[j]
        oh = y2 == cls + j
        if MODE == MODE_SIGMOID_FOCAL:
            t = sigmoid_focal_terms(x, oh, gamma, FOCAL)
        elif MODE == MODE_MSE_LOGITS:
            d = x - tl.where(oh, tv2, 0.0)
            t = d * d
        if MODE == MODE_SIGMOID_FOCAL or MODE == MODE_MSE_LOGITS:
            if (PARTS - 1) * CPART + j >= C:
                t = tl.where(cls + j < C, t, 0.0)
            lsum += t
        if NEED_AM:
            bv, am = take_max(_slot(xs, j, cls, float("-inf"), acc_ty, C, CPART, PARTS), bv, am, cls + j)
    if NEED_AM:
        am = _rows_argmax(bv, am, PARTS)
    else:
        am = tl.sum(am, 1)
    return tl.sum(lsum, 1), am


@triton.jit
def _rows_pixels(
    t_ptr,
    t,
    tiles_per_b,
    S,
    ignore_index,
    C: tl.constexpr,
    P: tl.constexpr,
    PPIX: tl.constexpr,
    FOLD: tl.constexpr,
):
    """Tile ``t``: P pixels from s0 of image b, in PPIX slots: (b, s0, s, n, pmask, valid, bad, y32, badv).
    FOLD: one image (the batch folded into the pixels), no division by tiles_per_b."""
    if FOLD:
        b = tl.zeros([], tl.int64)
        # int64: pixel and element offsets can exceed 2**31
        s0 = (t + tl.zeros([], tl.int64)) * P
    else:
        b = t // tiles_per_b
        s0 = (t - b * tiles_per_b).to(tl.int64) * P
        b = b.to(tl.int64)
    p = tl.arange(0, PPIX)
    s = s0 + p
    pmask = (p < P) & (s < S)
    n = b * S + s
    valid, bad, y32, badv = load_labels(t_ptr, n, pmask, ignore_index, C, -1)
    return b, s0, s, n, pmask, valid, bad, y32, badv


@triton.jit
def _fwd_rows_tile(
    x_ptr,
    t_ptr,
    tv_ptr,
    w_ptr,
    pl_ptr,
    crow_ptr,
    trow_ptr,
    conf_ptr,
    t,
    S,
    tiles_per_b,
    stride_b,
    ignore_index,
    gamma,
    pid64,
    p2,
    cls,
    lacc,
    cacc,
    tacc,
    hist,
    nbad,
    vbad,
    acc_ty: tl.constexpr,
    C: tl.constexpr,
    PARTS: tl.constexpr,
    CPART: tl.constexpr,
    LV: tl.constexpr,
    PPIX: tl.constexpr,
    P: tl.constexpr,
    BL: tl.constexpr,
    MODE: tl.constexpr,
    FOCAL: tl.constexpr,
    STORE_PL: tl.constexpr,
    WEIGH_PL: tl.constexpr,
    SUMS: tl.constexpr,
    NEED_TP: tl.constexpr,
    CONF: tl.constexpr,
    CONF_BINS: tl.constexpr,
    FOLD: tl.constexpr,
    FULL: tl.constexpr,
):
    """The forward of tile t (FULL: all its P pixels inside the image, a constant mask), folded into the
    program's running statistics, which it returns."""
    NEED_AM: tl.constexpr = NEED_TP or CONF > 0
    b, s0, s, n, pmask, valid, bad, y32, badv = _rows_pixels(
        t_ptr, t, tiles_per_b, S, ignore_index, C, P, PPIX, FOLD
    )
    nbad += bad.to(tl.int32)
    vbad = tl.maximum(vbad, badv)
    v, xs = _rows_tile(
        x_ptr, b * stride_b + s0 * C, FULL, (S - s0) * C, p2, cls, y32, acc_ty, C, CPART, LV, P, BL
    )
    y2 = y32[:, None]
    tv = tl.zeros([PPIX], acc_ty)
    if MODE == MODE_MSE_LOGITS or MODE == MODE_MSE_SOFTMAX:
        tv = tl.load(tv_ptr + y32, mask=valid, other=0.0).to(acc_ty)
    if MODE == MODE_SOFTMAX_FOCAL or MODE == MODE_MSE_SOFTMAX:
        m, ssum, rest, s2r, am = _rows_softmax(
            xs,
            cls,
            y2,
            acc_ty,
            C,
            CPART,
            PARTS,
            FOCAL or MODE == MODE_MSE_SOFTMAX,
            MODE == MODE_MSE_SOFTMAX,
            NEED_AM,
        )
        xy = tl.max(xs[CPART], 1)  # the label's logit (the same in every part)
        logp = xy - log_sum_exp(m, ssum)
        if MODE == MODE_SOFTMAX_FOCAL:
            if FOCAL:
                # (1 - p_y)^γ; 1 - p_y = 0 gives exp(-inf) = 0 for γ > 0
                loss = -tl.exp(gamma * tl.log(rest / ssum)) * logp
            else:
                loss = -logp
        else:
            dy = tl.exp(logp) - tv
            loss = 0.5 * (s2r / (ssum * ssum) + dy * dy)
    else:
        lsum, am = _rows_terms(xs, cls, y2, tv[:, None], gamma, acc_ty, C, CPART, PARTS, MODE, FOCAL, NEED_AM)
        if MODE == MODE_MSE_LOGITS:
            loss = 0.5 * lsum
        else:
            loss = lsum
    lv = tl.where(valid, loss, 0.0)
    if STORE_PL:
        if WEIGH_PL:
            tl.store(pl_ptr + n, lv * tl.load(w_ptr + y32, mask=valid, other=0.0).to(acc_ty), mask=pmask)
        else:
            tl.store(pl_ptr + n, lv, mask=pmask)
    hit = valid & (am == y32)

    # per-thread running sums of the thread's classes: a compare and a few selects and adds per pixel and
    # class (no atomics, no per-pixel store)
    lv2 = lv[:, None]
    hit2 = hit[:, None]
    nl = ()
    nc = ()
    nt = ()
    for j in tl.static_range(CPART):
        is_c = y2 == cls + j
        if SUMS:
            nl = nl + (lacc[j] + tl.where(is_c, lv2, 0.0),)
        else:
            nl = nl + (lacc[j],)
        nc = nc + (cacc[j] + is_c.to(tl.int32),)
        if NEED_TP:
            nt = nt + (tacc[j] + (is_c & hit2).to(tl.int32),)
        else:
            nt = nt + (tacc[j],)
    lacc = nl
    cacc = nc
    tacc = nt
    if CONF == 1:
        hist = conf_hist(hist, y32, am, valid, C, CONF_BINS)
    counts_in_memory(crow_ptr, trow_ptr, conf_ptr, pid64, C, y32, am, valid, hit, False, NEED_TP, CONF)
    return lacc, cacc, tacc, hist, nbad, vbad


@triton.jit
def _fwd_rows_kernel(
    x_ptr,  # logits, element (b, c, s) at b*stride_b + s*C + c (classes contiguous, pixels dense)
    t_ptr,  # (N,) labels, any integer dtype; pixel n = b*S + s
    tv_ptr,  # (C,) MSE target values (accumulation dtype); unread by the other modes
    w_ptr,  # (C,) class weights the stored per-pixel loss is multiplied by (WEIGH_PL)
    pl_ptr,  # (N,) per-pixel loss out (STORE_PL), accumulation dtype; its dtype sets the arithmetic
    lrow_ptr,  # (programs, C) out: class-loss sums of each program (SUMS)
    crow_ptr,  # (programs, C) int32 out: valid pixels per class, of each program
    trow_ptr,  # (programs, C) int32 out: true positives, of each program (NEED_TP)
    bad_ptr,  # (programs, 2) int64 out: bad labels (outside [0, C), not ignore_index) and the largest
    conf_ptr,  # (C, C) int64 confusion counts [label, argmax] added into (CONF): the caller's matrix
    S,  # pixels per image
    tiles_per_b,  # pixel tiles per image
    num_tiles,  # pixel tiles in all
    num_full,  # FOLD: the tiles of P pixels (num_tiles - 1 when the last has fewer)
    stride_b,  # logits image stride, in elements
    ignore_index,  # label of pixels that take no part
    gamma,
    gamma64: tl.float64,  # focal exponent, twice (see acc_gamma)
    C: tl.constexpr,  # classes
    PARTS: tl.constexpr,  # threads per pixel
    CPART: tl.constexpr,  # classes per thread
    LV: tl.constexpr,  # 2**LV >= CPART + 1 register slots per thread
    PPIX: tl.constexpr,  # pixel slots per tile (PPIX * PARTS threads)
    P: tl.constexpr,  # pixels per tile (<= PPIX)
    BL: tl.constexpr,  # elements of a tile's block (>= P * C, a power of two)
    MODE: tl.constexpr,  # Mode
    FOCAL: tl.constexpr,  # gamma != 0
    STORE_PL: tl.constexpr,  # write the per-pixel loss
    WEIGH_PL: tl.constexpr,  # ... times the class weight of its label
    SUMS: tl.constexpr,  # the class-loss sums
    NEED_TP: tl.constexpr,  # count true positives
    CONF: tl.constexpr,  # 0: no confusion, 1: a register histogram (CONF_BINS cells, PARTS == 1), 2: atomics
    CONF_BINS: tl.constexpr,  # a power of two >= C * C (CONF == 1)
    FOLD: tl.constexpr,  # one image: the batch folded into the pixels
):
    acc_ty = pl_ptr.dtype.element_ty
    gamma = acc_gamma(gamma, gamma64, acc_ty)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    pid64 = pid.to(tl.int64)
    # the class statistics of the program: per-thread registers for the thread's classes (CPART of them),
    # summed over its pixels and written once, as a row of a (programs, C) table the finalize launch sums
    lacc = ()
    cacc = ()
    tacc = ()
    for j in tl.static_range(CPART):
        lacc = lacc + (tl.zeros([PPIX, PARTS], acc_ty),)
        cacc = cacc + (tl.zeros([PPIX, PARTS], tl.int32),)
        tacc = tacc + (tl.zeros([PPIX, PARTS], tl.int32),)
    if CONF == 1:
        hist = tl.zeros([CONF_BINS], tl.int32)
    nbad = tl.zeros([PPIX], tl.int32)
    vbad = tl.full([PPIX], NO_BAD, tl.int64)
    p2 = tl.arange(0, PPIX)[:, None]
    cls = tl.arange(0, PARTS)[None, :] * CPART  # the first class of each part

    if not CONF == 1:
        hist = nbad  # unused
    if FOLD:
        # the full tiles, then the last one (fewer pixels: a mask that is not a constant) after them, by the
        # program whose turn it is: every program's rows in a fixed order
        for t in range(pid, num_full, nprog):
            lacc, cacc, tacc, hist, nbad, vbad = _fwd_rows_tile(
                x_ptr,
                t_ptr,
                tv_ptr,
                w_ptr,
                pl_ptr,
                crow_ptr,
                trow_ptr,
                conf_ptr,
                t,
                S,
                tiles_per_b,
                stride_b,
                ignore_index,
                gamma,
                pid64,
                p2,
                cls,
                lacc,
                cacc,
                tacc,
                hist,
                nbad,
                vbad,
                acc_ty,
                C,
                PARTS,
                CPART,
                LV,
                PPIX,
                P,
                BL,
                MODE,
                FOCAL,
                STORE_PL,
                WEIGH_PL,
                SUMS,
                NEED_TP,
                CONF,
                CONF_BINS,
                FOLD,
                True,
            )
        if (num_full < num_tiles) & (pid == num_full % nprog):
            lacc, cacc, tacc, hist, nbad, vbad = _fwd_rows_tile(
                x_ptr,
                t_ptr,
                tv_ptr,
                w_ptr,
                pl_ptr,
                crow_ptr,
                trow_ptr,
                conf_ptr,
                num_full,
                S,
                tiles_per_b,
                stride_b,
                ignore_index,
                gamma,
                pid64,
                p2,
                cls,
                lacc,
                cacc,
                tacc,
                hist,
                nbad,
                vbad,
                acc_ty,
                C,
                PARTS,
                CPART,
                LV,
                PPIX,
                P,
                BL,
                MODE,
                FOCAL,
                STORE_PL,
                WEIGH_PL,
                SUMS,
                NEED_TP,
                CONF,
                CONF_BINS,
                FOLD,
                False,
            )
    else:
        for t in range(pid, num_tiles, nprog):
            lacc, cacc, tacc, hist, nbad, vbad = _fwd_rows_tile(
                x_ptr,
                t_ptr,
                tv_ptr,
                w_ptr,
                pl_ptr,
                crow_ptr,
                trow_ptr,
                conf_ptr,
                t,
                S,
                tiles_per_b,
                stride_b,
                ignore_index,
                gamma,
                pid64,
                p2,
                cls,
                lacc,
                cacc,
                tacc,
                hist,
                nbad,
                vbad,
                acc_ty,
                C,
                PARTS,
                CPART,
                LV,
                PPIX,
                P,
                BL,
                MODE,
                FOCAL,
                STORE_PL,
                WEIGH_PL,
                SUMS,
                NEED_TP,
                CONF,
                CONF_BINS,
                FOLD,
                False,
            )

    # one row per program, reduced by the finalize launch in a fixed order: deterministic
    c1 = tl.arange(0, PARTS) * CPART
    for j in tl.static_range(CPART):
        cm = c1 + j < C
        if SUMS:
            tl.store(lrow_ptr + pid64 * C + c1 + j, tl.sum(lacc[j], 0), mask=cm)
        tl.store(crow_ptr + pid64 * C + c1 + j, tl.sum(cacc[j], 0), mask=cm)
        if NEED_TP:
            tl.store(trow_ptr + pid64 * C + c1 + j, tl.sum(tacc[j], 0), mask=cm)
    if CONF == 1:
        conf_flush(conf_ptr, hist, C, CONF_BINS)
    store_bad(bad_ptr, pid, tl.sum(nbad, 0), tl.max(vbad, 0))


@triton.jit
def _bwd_rows_tile(
    x_ptr,
    t_ptr,
    tv_ptr,
    gp_ptr,
    wv_ptr,
    g_ptr,
    t,
    S,
    tiles_per_b,
    stride_b,
    gstride_b,
    gp_stride,
    ignore_index,
    gamma,
    p2,
    cls,
    f,
    pf,
    kf,
    acc_ty: tl.constexpr,
    C: tl.constexpr,
    PARTS: tl.constexpr,
    CPART: tl.constexpr,
    LV: tl.constexpr,
    PPIX: tl.constexpr,
    P: tl.constexpr,
    BL: tl.constexpr,
    MODE: tl.constexpr,
    FOCAL: tl.constexpr,
    HAS_GP: tl.constexpr,
    HAS_WV: tl.constexpr,
    FOLD: tl.constexpr,
    FULL: tl.constexpr,
):
    """The gradient of tile t (FULL: a constant mask)."""
    SOFTMAX: tl.constexpr = MODE == MODE_SOFTMAX_FOCAL or MODE == MODE_MSE_SOFTMAX
    b, s0, s, n, pmask, valid, bad, y32, badv = _rows_pixels(
        t_ptr, t, tiles_per_b, S, ignore_index, C, P, PPIX, FOLD
    )
    lim = (S - s0) * C
    v, xs = _rows_tile(x_ptr, b * stride_b + s0 * C, FULL, lim, p2, cls, y32, acc_ty, C, CPART, LV, P, BL)
    w = upstream(gp_ptr, wv_ptr, n, y32, valid, gp_stride, tl.full([PPIX], 1.0, acc_ty), HAS_GP, HAS_WV)
    tv = tl.zeros([PPIX], acc_ty)
    if MODE == MODE_MSE_LOGITS or MODE == MODE_MSE_SOFTMAX:
        tv = tl.load(tv_ptr + y32, mask=valid, other=0.0).to(acc_ty)
    a = w
    if SOFTMAX:
        m, ssum, rest, s2r, am = _rows_softmax(
            xs,
            cls,
            y32[:, None],
            acc_ty,
            C,
            CPART,
            PARTS,
            FOCAL or MODE == MODE_MSE_SOFTMAX,
            MODE == MODE_MSE_SOFTMAX,
            False,
        )
        lse, a, q = bwd_softmax_coefs(m, ssum, rest, s2r, tl.max(xs[CPART], 1), tv, w, gamma, MODE, FOCAL)
    # the pixel's label (-1 where it is not valid) and coefficients at each element of the block: three or
    # four gathers of one value per pixel
    yf = tl.gather(y32.to(acc_ty), pf, 0)
    af = tl.gather(a, pf, 0)
    oh = kf == yf
    if SOFTMAX:
        d = v - tl.gather(lse, pf, 0)
        if acc_ty == tl.float64:
            pk = tl.exp(d)
        else:
            pk = tl.exp2(d * LOG2E)  # the special-function ex2, as in the forward
        if MODE == MODE_SOFTMAX_FOCAL:
            g = af * (tl.where(oh, 1.0, 0.0) - pk)
        else:
            g = af * pk * (pk - tl.where(oh, tl.gather(tv, pf, 0), 0.0) - tl.gather(q, pf, 0))
    elif MODE == MODE_SIGMOID_FOCAL:
        g = af * sigmoid_focal_grad(v, oh, gamma, FOCAL)
    else:
        g = af * (v - tl.where(oh, tl.gather(tv, pf, 0), 0.0))
    # a = 0 at ignored pixels, but 0 * inf or 0 * NaN would not be 0
    g = tl.where(yf >= 0.0, g, 0.0).to(g_ptr.dtype.element_ty)
    gq = g_ptr + (b * gstride_b + s0 * C + f)
    if FULL:
        tl.store(gq, g, mask=f < P * C)
    else:
        tl.store(gq, g, mask=f < lim)


@triton.jit
def _bwd_rows_kernel(
    x_ptr,  # logits, element (b, c, s) at b*stride_b + s*C + c
    t_ptr,  # (N,) labels, any integer dtype
    tv_ptr,  # (C,) MSE target values, accumulation dtype (a dummy of that dtype otherwise)
    gp_ptr,  # upstream gradient: (N,) of a per-pixel output, or the scalar one with gp_stride 0 (HAS_GP)
    wv_ptr,  # (C,) per-class factor of the upstream weight (HAS_WV; see upstream)
    g_ptr,  # gradient out, x's dtype, element (b, c, s) at b*gstride_b + s*C + c
    S,
    tiles_per_b,
    num_tiles,
    num_full,  # FOLD: the tiles of P pixels (num_tiles - 1 when the last has fewer)
    stride_b,  # logits image stride
    gstride_b,  # gradient image stride
    gp_stride,  # upstream gradient stride (0: one value for every pixel)
    ignore_index,
    gamma,
    gamma64: tl.float64,
    C: tl.constexpr,
    PARTS: tl.constexpr,
    CPART: tl.constexpr,
    LV: tl.constexpr,
    PPIX: tl.constexpr,
    P: tl.constexpr,
    BL: tl.constexpr,
    MODE: tl.constexpr,
    FOCAL: tl.constexpr,
    HAS_GP: tl.constexpr,
    HAS_WV: tl.constexpr,
    FOLD: tl.constexpr,
):
    """The gradient of a tile: its slots as in the forward (one read) give each pixel's softmax state and
    coefficients; these few per-pixel values are gathered back to the tile's flat layout, where each logit's
    gradient is computed and stored in the same 16-byte vectors it was read in."""
    acc_ty = tv_ptr.dtype.element_ty
    gamma = acc_gamma(gamma, gamma64, acc_ty)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    p2 = tl.arange(0, PPIX)[:, None]
    cls = tl.arange(0, PARTS)[None, :] * CPART
    # each element of the flat block: its pixel slot and class (the block's tail past P·C is masked off)
    f = tl.arange(0, BL)
    pf = tl.minimum(f // C, PPIX - 1)
    kf = (f % C).to(acc_ty)
    if FOLD:
        for t in range(pid, num_full, nprog):
            _bwd_rows_tile(
                x_ptr,
                t_ptr,
                tv_ptr,
                gp_ptr,
                wv_ptr,
                g_ptr,
                t,
                S,
                tiles_per_b,
                stride_b,
                gstride_b,
                gp_stride,
                ignore_index,
                gamma,
                p2,
                cls,
                f,
                pf,
                kf,
                acc_ty,
                C,
                PARTS,
                CPART,
                LV,
                PPIX,
                P,
                BL,
                MODE,
                FOCAL,
                HAS_GP,
                HAS_WV,
                FOLD,
                True,
            )
        if (num_full < num_tiles) & (pid == num_full % nprog):
            _bwd_rows_tile(
                x_ptr,
                t_ptr,
                tv_ptr,
                gp_ptr,
                wv_ptr,
                g_ptr,
                num_full,
                S,
                tiles_per_b,
                stride_b,
                gstride_b,
                gp_stride,
                ignore_index,
                gamma,
                p2,
                cls,
                f,
                pf,
                kf,
                acc_ty,
                C,
                PARTS,
                CPART,
                LV,
                PPIX,
                P,
                BL,
                MODE,
                FOCAL,
                HAS_GP,
                HAS_WV,
                FOLD,
                False,
            )
    else:
        for t in range(pid, num_tiles, nprog):
            _bwd_rows_tile(
                x_ptr,
                t_ptr,
                tv_ptr,
                gp_ptr,
                wv_ptr,
                g_ptr,
                t,
                S,
                tiles_per_b,
                stride_b,
                gstride_b,
                gp_stride,
                ignore_index,
                gamma,
                p2,
                cls,
                f,
                pf,
                kf,
                acc_ty,
                C,
                PARTS,
                CPART,
                LV,
                PPIX,
                P,
                BL,
                MODE,
                FOCAL,
                HAS_GP,
                HAS_WV,
                FOLD,
                False,
            )
