"""Triton kernels of the fused losses; launched and registered as ops by :mod:`.triton_loss`.

Logits are read through three strides: pixel ``s`` of image ``b``, class ``c`` lies at
``b * stride_b + c * stride_c + s * stride_s``, which covers contiguous NCHW (pixels
contiguous per class plane), channels_last (classes contiguous per pixel) and (N, C) rows
without a copy. Triton specialises integer arguments equal to 1 (and divisible by 16), so the
unit stride is a compile-time constant and NCHW planes load 16 bytes per instruction. All
offsets are int64.

Modes (``Mode`` in :mod:`fused_imbalance.ops`, compared by name: ``MODE_*`` of :mod:`.triton_common`):
0 softmax focal, 1 sigmoid focal, 2 MSE on the logits, 3 MSE on the softmax, 4 statistics only.

Two families of kernels:

**Static classes** (``_fwd_static_kernel``, ``_bwd_static_kernel``; C a compile-time constant,
up to 256). Pixels lie on the lanes -- a tile is ``ROWS x VEC`` pixels, a thread owns ``VEC``
consecutive pixels of a row (NCHW: 4 float32 in one 16-byte load per class, 4 bfloat16 in 8
bytes, 2 float64; channels_last: one pixel, its classes gathered at immediate offsets) -- and
the classes are ``tl.static_range`` loops, so nothing is padded to a power of two and every
per-pixel reduction over classes (max, sums, argmax) is a running value in a thread's
registers: no shuffle, no shared memory in the tile loop. Classes go in groups of ``GROUP``: a
max pass over the group's logits, then an exp pass over the same values (kept in registers),
the running sums rescaled once per group. Up to 32 classes every group is unrolled; beyond, a
loop over groups (``LOOP``) bounds the code size and compile time. The exp pass keeps the
label's logit (a compare and a select per logit), rather than a gather after the pass. Each
mode computes only what it uses; the argmax only when true positives or a confusion matrix are
asked for (``NEED_TP``, ``CONF``). A persistent grid: program ``pid`` walks tiles
``pid, pid + P, ...``.

Cost model, thread-instructions per logit in the SASS for sm_90 (the budget at H100 copy
bandwidth is about 45 for a float32 forward, 25 for bfloat16, twice that for a backward;
``benchmarks/sm90_driver.py`` measures it): a load (1/VEC NCHW, 1 channels_last), a conversion
for 16-bit logits, 1 max, 2 for exp(x - m) (an FFMA and the MUFU ex2; float32), 1 sum, 2 for
the label's logit (a compare, a select); focal and the softmax MSE add 2 (the exact
Σ_{k≠y} e_k: a select and an add on the same compare), the argmax
about 5, MSE on the logits 4, sigmoid focal about 20 (two ex2 on the MUFU unit and a degree-8
polynomial log1p; tl.log would be a ~24-instruction software logarithm). Per-pixel work (labels, log of the
sum, the focal power, the store) is spread
over the C classes. Class statistics: with C <= 32 the per-class loss sums, counts and true
positives are per-thread registers (about 5 per logit: a compare, selects and adds), reduced
and written once per program as one row of a (programs, C) table that the launcher sums in a
fixed order. With more classes the per-pixel loss is stored and ``_class_sum_kernel`` sums it
per class in O(N) (each thread adds its pixels into its own column of class sums);
counts and true positives are integer atomics into the program's own row, confusion counts
into the program's own int32 matrix (or the global int64 one when those would be too large):
integer sums are exact in any order.

**Chunked classes** (``_fwd_chunked_kernel``, ``_bwd_chunked_kernel``; C a runtime value, any
size). Classes are read in chunks of ``BLOCK_C`` with an online softmax; lanes run along the
contiguous axis. With one pixel per tile (classes contiguous: rows, channels_last) the pixel's
loss is added into its program's row of class sums by the program itself, in tile order (a
plain load and store: O(N) and deterministic); with several pixels per tile (NCHW) the per-pixel
losses go to an (N,) buffer summed by ``_class_sum_kernel``.

No float atomics anywhere: every float sum has a fixed order, so results are bit-identical run
to run.
"""

import triton
import triton.language as tl

from .triton_common import (
    MODE_MSE_LOGITS,
    MODE_MSE_SOFTMAX,
    MODE_SIGMOID_FOCAL,
    MODE_SOFTMAX_FOCAL,
    NO_BAD,
    RED_CLASS,
    RED_MEAN,
    RED_SUM,
    WEIGHTING_GENERAL,
    WEIGHTING_PAPER,
    WEIGHTING_RECALL,
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
    static_softmax,
    store_bad,
    take_max,
    tile_pixels,
    upstream,
    zero_rows,
)

_BIG = tl.constexpr(2147483647)  # "no index yet" in the int32 index reductions


@triton.jit
def _load_chunk(x_ptr, poff, pmask, c0, C, stride_c, BLOCK_C: tl.constexpr, acc_ty: tl.constexpr):
    """Logits of ``BLOCK_P`` pixels x classes ``c0 .. c0 + BLOCK_C`` in ``acc_ty``; -inf outside."""
    c = c0 + tl.arange(0, BLOCK_C)
    cmask = c < C
    # int64: c * stride_c reaches C * S, which can exceed 2**31
    ptrs = x_ptr + (poff[:, None] + c.to(tl.int64)[None, :] * stride_c)
    x = tl.load(ptrs, mask=pmask[:, None] & cmask[None, :], other=float("-inf"))
    return x.to(acc_ty), c, cmask


@triton.jit
def _argmax_step(x, cmax, c0, best_v, best_i, nan_i, BLOCK_C: tl.constexpr):
    """Running argmax over class chunks, first index on ties and NaN as the maximum (torch.argmax).

    One min-reduction per chunk: NaN columns get keys [0, BLOCK_C), columns equal to the chunk max
    keys [BLOCK_C, 2 BLOCK_C). A chunk with a NaN decides the argmax whatever its max is, so that
    max may be NaN (backends differ on whether max propagates NaN) without changing the result.
    """
    cols = tl.arange(0, BLOCK_C)[None, :]
    key = tl.where(x != x, cols, tl.where(x == cmax[:, None], cols + BLOCK_C, 2 * BLOCK_C))
    k = tl.min(key, 1)
    nan_i = tl.minimum(nan_i, tl.where(k < BLOCK_C, c0 + k, _BIG))
    take = (k >= BLOCK_C) & (cmax > best_v)  # strict: an equal later max keeps the first index
    best_i = tl.where(take, c0 + k - BLOCK_C, best_i)
    best_v = tl.where(take, cmax, best_v)
    return best_v, best_i, nan_i


@triton.jit
def _softmax_step(x, oh, cmax, m, s, rest, s2r, xy, NEED_S2: tl.constexpr):
    """Online softmax over one class chunk.

    Running state relative to ``ms = m`` (or 0 while every logit so far is -inf, so that
    exp(-inf - ms) stays 0 instead of NaN): s = Σ e_k, rest = Σ_{k≠y} e_k, s2r = Σ_{k≠y} e_k²,
    with e_k = exp(x_k - ms), and xy = x_y. ``rest / s`` is 1 - p_y without the cancellation of
    1 - exp(log p_y), and s2r / s² the Σ_{k≠y} p_k² of the softmax MSE.
    """
    m_new = tl.maximum(m, cmax)
    ms_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - ms_new)  # 0 while m is still -inf
    e = tl.exp(x - ms_new[:, None])
    e_rest = tl.where(oh, 0.0, e)
    s = s * alpha + tl.sum(e, 1)
    rest = rest * alpha + tl.sum(e_rest, 1)
    if NEED_S2:
        s2r = s2r * (alpha * alpha) + tl.sum(e_rest * e_rest, 1)
    xy = xy + tl.sum(tl.where(oh, x, 0.0), 1)
    return m_new, s, rest, s2r, xy


@triton.jit
def _fwd_chunk(
    x_ptr,
    poff,
    pmask,
    y32,
    tv,
    c0,
    C,
    stride_c,
    m,
    s,
    rest,
    s2r,
    xy,
    lsum,
    best_v,
    best_i,
    nan_i,
    gamma,
    MODE: tl.constexpr,
    FOCAL: tl.constexpr,
    NEED_AM: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Fold classes ``c0 .. c0 + BLOCK_C`` of a pixel tile into its running forward state."""
    x, c, cmask = _load_chunk(x_ptr, poff, pmask, c0, C, stride_c, BLOCK_C, m.dtype)
    oh = c[None, :] == y32[:, None]
    if NEED_AM or MODE == MODE_SOFTMAX_FOCAL or MODE == MODE_MSE_SOFTMAX:
        cmax = tl.max(x, 1)
    if NEED_AM:
        best_v, best_i, nan_i = _argmax_step(x, cmax, c0, best_v, best_i, nan_i, BLOCK_C)
    if MODE == MODE_SOFTMAX_FOCAL or MODE == MODE_MSE_SOFTMAX:
        m, s, rest, s2r, xy = _softmax_step(x, oh, cmax, m, s, rest, s2r, xy, MODE == MODE_MSE_SOFTMAX)
    elif MODE == MODE_SIGMOID_FOCAL:
        lsum += tl.sum(sigmoid_focal_terms(x, oh, gamma, FOCAL), 1)
    elif MODE == MODE_MSE_LOGITS:
        d = x - tl.where(oh, tv[:, None], 0.0)
        lsum += tl.sum(tl.where(cmask[None, :], d * d, 0.0), 1)
    return m, s, rest, s2r, xy, lsum, best_v, best_i, nan_i


@triton.jit
def _tile_labels(t_ptr, t, tiles_per_b, S, ignore_index, C, BLOCK_P: tl.constexpr):
    """Pixel indices, offsets-to-be and labels of tile ``t``: (b, s, n, pmask, valid, bad, y32, badv)."""
    b = t // tiles_per_b
    # int64: pixel and element offsets can exceed 2**31
    s = (t - b * tiles_per_b).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = s < S
    b = b.to(tl.int64)
    n = b * S + s
    valid, bad, y32, badv = load_labels(t_ptr, n, pmask, ignore_index, C, 0)
    return b, s, n, pmask, valid, bad, y32, badv


@triton.jit
def _fwd_chunked_kernel(
    x_ptr,  # logits, element (b, c, s) at b*stride_b + c*stride_c + s*stride_s
    t_ptr,  # (N,) labels, any integer dtype; pixel n = b*S + s
    tv_ptr,  # (C,) MSE target values (accumulation dtype); unread by the other modes
    w_ptr,  # (C,) class weights the stored per-pixel loss is multiplied by (WEIGH_PL)
    pl_ptr,  # (N,) per-pixel loss out (STORE_PL), accumulation dtype; its dtype sets the arithmetic
    lrow_ptr,  # (programs, C) class-loss rows, one per program, zeroed here (ROWSUM)
    crow_ptr,  # (programs, C) int32 valid pixels per class, one row per program, zeroed here
    trow_ptr,  # (programs, C) int32 valid pixels whose argmax is their label (NEED_TP), as crow_ptr
    bad_ptr,  # (programs, 2) int64 out: bad labels (outside [0, C), not ignore_index) and the largest
    conf_ptr,  # (C, C) int64 confusion counts [label, argmax], added into (CONF): the caller's matrix
    lse_ptr,  # (k * NP,) out (STORE_LSE): what the backward takes instead of a pass over the classes (_keep_lse)
    C,  # classes
    S,  # pixels per image
    NP,  # pixels in all
    tiles_per_b,  # pixel tiles per image
    num_tiles,  # pixel tiles in all
    stride_b,
    stride_c,
    stride_s,  # logits strides, in elements
    ignore_index,  # label of pixels that take no part
    gamma,
    gamma64: tl.float64,  # focal exponent, twice (see acc_gamma)
    MODE: tl.constexpr,  # Mode
    FOCAL: tl.constexpr,  # gamma != 0
    STORE_LSE: tl.constexpr,  # keep each pixel's lse (and focal weight or q) for the backward
    STORE_PL: tl.constexpr,  # write the per-pixel loss
    WEIGH_PL: tl.constexpr,  # ... times the class weight of its label
    ROWSUM: tl.constexpr,  # add each pixel's loss into the program's class row (BLOCK_P == 1)
    NEED_TP: tl.constexpr,  # count true positives
    CONF: tl.constexpr,  # count the confusion matrix
    SINGLE: tl.constexpr,  # C <= BLOCK_C: one chunk
    BLOCK_P: tl.constexpr,  # pixels per tile
    BLOCK_C: tl.constexpr,  # classes per chunk
    ZB: tl.constexpr,  # classes per step of the rows' zeroing
):
    acc_ty = pl_ptr.dtype.element_ty
    gamma = acc_gamma(gamma, gamma64, acc_ty)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    pid64 = pid.to(tl.int64)
    NEED_AM: tl.constexpr = NEED_TP or CONF
    zero_rows(crow_ptr, pid64, C, ZB)
    if NEED_TP:
        zero_rows(trow_ptr, pid64, C, ZB)
    if ROWSUM:
        zero_rows(lrow_ptr, pid64, C, ZB)
    tl.debug_barrier()  # the zeros before this program's additions into its rows
    nbad = tl.zeros([BLOCK_P], tl.int32)
    vbad = tl.full([BLOCK_P], NO_BAD, tl.int64)
    one = tl.full([BLOCK_P], 1, tl.int32)

    for t in range(pid, num_tiles, nprog):
        b, s, n, pmask, valid, bad, y32, badv = _tile_labels(
            t_ptr, t, tiles_per_b, S, ignore_index, C, BLOCK_P
        )
        nbad += bad.to(tl.int32)
        vbad = tl.maximum(vbad, badv)
        poff = b * stride_b + s * stride_s
        tv = tl.zeros([BLOCK_P], acc_ty)
        if MODE == MODE_MSE_LOGITS or MODE == MODE_MSE_SOFTMAX:
            tv = tl.load(tv_ptr + y32, mask=valid, other=0.0).to(acc_ty)

        m = tl.full([BLOCK_P], float("-inf"), acc_ty)
        ssum = tl.zeros([BLOCK_P], acc_ty)
        rest = tl.zeros([BLOCK_P], acc_ty)
        s2r = tl.zeros([BLOCK_P], acc_ty)
        xy = tl.zeros([BLOCK_P], acc_ty)
        lsum = tl.zeros([BLOCK_P], acc_ty)
        best_v = tl.full([BLOCK_P], float("-inf"), acc_ty)
        best_i = tl.zeros([BLOCK_P], tl.int32)
        nan_i = tl.full([BLOCK_P], _BIG, tl.int32)
        if SINGLE:
            m, ssum, rest, s2r, xy, lsum, best_v, best_i, nan_i = _fwd_chunk(
                x_ptr,
                poff,
                pmask,
                y32,
                tv,
                0,
                C,
                stride_c,
                m,
                ssum,
                rest,
                s2r,
                xy,
                lsum,
                best_v,
                best_i,
                nan_i,
                gamma,
                MODE,
                FOCAL,
                NEED_AM,
                BLOCK_C,
            )
        else:
            for c0 in range(0, C, BLOCK_C):
                m, ssum, rest, s2r, xy, lsum, best_v, best_i, nan_i = _fwd_chunk(
                    x_ptr,
                    poff,
                    pmask,
                    y32,
                    tv,
                    c0,
                    C,
                    stride_c,
                    m,
                    ssum,
                    rest,
                    s2r,
                    xy,
                    lsum,
                    best_v,
                    best_i,
                    nan_i,
                    gamma,
                    MODE,
                    FOCAL,
                    NEED_AM,
                    BLOCK_C,
                )

        if MODE == MODE_SOFTMAX_FOCAL:
            logp = xy - log_sum_exp(m, ssum)
            if FOCAL:
                # (1 - p_y)^γ; 1 - p_y = 0 gives exp(-inf) = 0 for γ > 0
                loss = -tl.exp(gamma * tl.log(rest / ssum)) * logp
            else:
                loss = -logp
        elif MODE == MODE_SIGMOID_FOCAL:
            loss = lsum
        elif MODE == MODE_MSE_LOGITS:
            loss = 0.5 * lsum
        elif MODE == MODE_MSE_SOFTMAX:
            dy = tl.exp(xy - log_sum_exp(m, ssum)) - tv
            loss = 0.5 * (s2r / (ssum * ssum) + dy * dy)
        else:
            loss = lsum  # zeros
        if STORE_LSE:
            _keep_lse(lse_ptr, n, NP, pmask, m, ssum, rest, s2r, xy, tv, gamma, MODE, FOCAL)
        lv = tl.where(valid, loss, 0.0)
        if ROWSUM:
            # one pixel per tile, tiles in a fixed order: a deterministic running sum per class
            rp = lrow_ptr + pid64 * C + y32
            tl.store(rp, tl.load(rp, mask=valid, other=0.0) + lv, mask=valid)
        if STORE_PL:
            if WEIGH_PL:
                lv = lv * tl.load(w_ptr + y32, mask=valid, other=0.0).to(acc_ty)
            tl.store(pl_ptr + n, lv, mask=pmask)

        # integer sums into the program's own rows: exact in any order
        tl.atomic_add(crow_ptr + (pid64 * C + y32), one, mask=valid, sem="relaxed")
        if NEED_AM:
            am = tl.where(nan_i < _BIG, nan_i, best_i)
            if NEED_TP:
                tl.atomic_add(trow_ptr + (pid64 * C + y32), one, mask=valid & (am == y32), sem="relaxed")
            if CONF:
                tl.atomic_add(
                    conf_ptr + (y32.to(tl.int64) * C + am),
                    tl.full([BLOCK_P], 1, tl.int64),
                    mask=valid,
                    sem="relaxed",
                )
    store_bad(bad_ptr, pid, tl.sum(nbad, 0), tl.max(vbad, 0))


@triton.jit
def _class_sum_kernel(
    t_ptr,  # (N,) labels, any integer dtype
    pl_ptr,  # (N,) per-pixel loss, 0 at ignored and bad pixels
    acc_ptr,  # (C, T) scratch, T = programs x BLOCK: column j holds thread j's C running sums
    part_ptr,  # (programs, C) out: Σ of pl over each program's pixels of class c
    N,  # pixels
    C,  # classes
    BLOCK: tl.constexpr,  # threads' lanes per program: pixels per step
    K: tl.constexpr,  # classes per step of the zeroing and the final reduction
):
    """Deterministic per-class sums in O(N): thread j of the T in the grid walks pixels
    j, j + T, ... in order and adds each pixel's loss into its own column of sums at the
    pixel's class (a load and a store; no other thread touches that column), then each program
    reduces its BLOCK columns into its row of ``part`` in a fixed order. The columns are
    zeroed here (K classes per step), never read from memory the caller wrote, and small
    enough to stay in L2 (one program of 256 per SM on an H100: C x 132 KB, 20 MB for C = 150).
    About 10 instructions per pixel whatever C is; the old O(N C) form spent 3 per pixel and
    class."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lane = tl.arange(0, BLOCK)
    T = nprog.to(tl.int64) * BLOCK
    col = acc_ptr + (pid.to(tl.int64) * BLOCK + lane)
    ks = tl.arange(0, K)
    for c0 in range(0, C, K):
        c = c0 + ks
        tl.store(
            col[None, :] + c.to(tl.int64)[:, None] * T,
            tl.zeros([K, BLOCK], pl_ptr.dtype.element_ty),
            mask=(c < C)[:, None],
        )
    # the [K, BLOCK] blocks may lie on other threads than the [BLOCK] pixel vectors: a barrier
    # orders the zeroing (and, below, the last additions) before another thread reads them
    tl.debug_barrier()
    for n0 in range(pid.to(tl.int64) * BLOCK, N, T):
        n = n0 + lane
        nm = n < N
        # widened before comparing: a label outside [0, C) carries pl = 0 and is skipped
        y = tl.load(t_ptr + n, mask=nm, other=-1).to(tl.int64)
        ok = nm & (y >= 0) & (y < C)
        v = tl.load(pl_ptr + n, mask=ok, other=0.0)
        a = col + y * T
        tl.store(a, tl.load(a, mask=ok, other=0.0) + v, mask=ok)
    tl.debug_barrier()
    for c0 in range(0, C, K):
        c = c0 + ks
        cm = c < C
        sums = tl.sum(tl.load(col[None, :] + c.to(tl.int64)[:, None] * T, mask=cm[:, None], other=0.0), 1)
        tl.store(part_ptr + pid.to(tl.int64) * C + c, sums, mask=cm)


@triton.jit
def _reduce_rows_kernel(
    lrow_ptr,  # (R, C) accumulation dtype: class-loss rows (SUMS)
    crow_ptr,  # (R, C) int32 or int64: count rows
    trow_ptr,  # (R, C): true-positive rows (NEED_TP)
    lout_ptr,
    cout_ptr,
    tout_ptr,  # (C,) out: their sums over the rows (counts int64)
    RL,
    RC,
    C,  # rows of the class-loss table and of the integer tables, classes
    SUMS: tl.constexpr,
    NEED_TP: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,  # rows and classes per step
):
    """The per-program rows summed over the programs, BC classes per program of this launch, rows in
    a fixed order (deterministic): ahead of the finalize launch when the rows are too many for its
    one program (rows x C beyond _FINALIZE_ELEMS)."""
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    cm = c < C
    acc_ty = lout_ptr.dtype.element_ty
    S = tl.zeros([BC], acc_ty)
    n = tl.zeros([BC], tl.int64)
    tp = tl.zeros([BC], tl.int64)
    for r0 in range(0, RC, BR):
        r = r0 + tl.arange(0, BR)
        off = r.to(tl.int64)[:, None] * C + c[None, :]
        mk = (r < RC)[:, None] & cm[None, :]
        n += tl.sum(tl.load(crow_ptr + off, mask=mk, other=0).to(tl.int64), 0)
        if NEED_TP:
            tp += tl.sum(tl.load(trow_ptr + off, mask=mk, other=0).to(tl.int64), 0)
    if SUMS:
        for r0 in range(0, RL, BR):
            r = r0 + tl.arange(0, BR)
            off = r.to(tl.int64)[:, None] * C + c[None, :]
            S += tl.sum(tl.load(lrow_ptr + off, mask=(r < RL)[:, None] & cm[None, :], other=0.0), 0)
    tl.store(cout_ptr + c, n, mask=cm)
    if NEED_TP:
        tl.store(tout_ptr + c, tp, mask=cm)
    if SUMS:
        tl.store(lout_ptr + c, S, mask=cm)


@triton.jit
def _recall_ema_kernel(
    sums_ptr,  # (C,) accumulation dtype: this step's per-class loss sums S_c
    cnt_ptr,
    tp_ptr,  # (C,) int64: valid pixels and true positives per class
    run_ptr,  # (C,) float32 or float64, in/out: RecallLoss's running recall
    seen_ptr,  # (C,) bool, in/out: the classes seen so far
    wt_ptr,  # () float64: the moving average's weight 1 - momentum
    loss_ptr,  # out (): the loss
    scale_ptr,  # out (C,): the backward's per-class factor w_c (/ D for the mean); its dtype sets the arithmetic
    C,
    RED: tl.constexpr,  # RED_MEAN or RED_SUM
    BC: tl.constexpr,  # classes per step
):
    """RecallLoss's moving average and loss, one program after the forward (with the per-class sums):
    for each class present R̄_c ← lerp(R̄_c, TP_c / n_c, 1 - m) (TP_c / n_c the first time it is seen),
    seen |= present; w_c = 1 - R̄_c; the loss Σ_c w_c S_c, over D = max(Σ_c n_c, 1) for the mean, and
    the backward's factor w_c / D. The batch recall in float64 and the average in the buffer's dtype with
    ``torch.lerp``'s formula, as the module's torch operations compute them (its other paths)."""
    acc_ty = scale_ptr.dtype.element_ty
    run_ty = run_ptr.dtype.element_ty
    cs = tl.arange(0, BC)
    valid = tl.zeros([BC], tl.int64)
    for c0 in range(0, C, BC):
        valid += tl.load(cnt_ptr + c0 + cs, mask=c0 + cs < C, other=0)
    d = tl.maximum(tl.sum(valid, 0), 1).to(acc_ty)
    w = tl.load(wt_ptr).to(run_ty)
    small = tl.abs(w) < 0.5
    total = tl.zeros([BC], acc_ty)
    for c0 in range(0, C, BC):
        c = c0 + cs
        cm = c < C
        n = tl.load(cnt_ptr + c, mask=cm, other=0)
        present = n > 0
        batch = (tl.load(tp_ptr + c, mask=cm, other=0).to(tl.float64) / tl.maximum(n, 1).to(tl.float64)).to(
            run_ty
        )
        r = tl.load(run_ptr + c, mask=cm, other=0.0)
        seen = tl.load(seen_ptr + c, mask=cm, other=0) != 0
        ema = tl.where(small, r + w * (batch - r), batch - (batch - r) * (1.0 - w))
        r = tl.where(present, tl.where(seen, ema, batch), r)
        tl.store(run_ptr + c, r, mask=cm & present)
        tl.store(seen_ptr + c, seen | present, mask=cm & present)
        wc = (1.0 - r).to(acc_ty)
        total += tl.where(cm, wc * tl.load(sums_ptr + c, mask=cm, other=0.0), 0.0)
        if RED == RED_MEAN:
            wc = wc / d
        tl.store(scale_ptr + c, wc, mask=cm)
    tot = tl.sum(total, 0)
    if RED == RED_MEAN:
        tot = tot / d
    tl.store(loss_ptr, tot)


@triton.jit
def _finalize_kernel(
    lrow_ptr,  # (RL, C) accumulation dtype: class-loss sums per program (SUMS)
    crow_ptr,  # (RC, C) int32 or int64: valid pixels per class, per program
    trow_ptr,  # (RC, C): true positives per class, per program (NEED_TP)
    brow_ptr,  # (RB, 2) int64: bad labels per program and the largest
    w_ptr,  # (C,) class weights, accumulation dtype (WEIGHTING 1 and 2)
    loss_ptr,  # out: the loss, () for MEAN and SUM; S_c (C,) for CLASS
    scale_ptr,  # out (C,) accumulation dtype: the backward's per-class factor d(loss)/dℓ_n of a pixel of
    #            class c (MEAN: w_c / D; SUM, NONE and CLASS: w_c); its dtype sets the arithmetic
    cnt_ptr,
    tp_ptr,  # out (C,) int64: valid pixels and true positives per class
    bad_ptr,  # out (2,) int64: bad labels in all, the largest of them
    RL,
    RC,
    RB,
    C,  # rows of each table, classes
    RED: tl.constexpr,  # Reduction: 0 mean, 1 sum, 2 none, 3 per-class sums
    WEIGHTING: tl.constexpr,  # Weighting: 0 none, 1 weights with the mean over Σ w_y, 2 over N_valid,
    #                           3 the batch's recall weights 1 - TP_c / n_c (mean over N_valid)
    SUMS: tl.constexpr,  # there are class-loss rows (a loss and RED != RED_NONE)
    NEED_TP: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,  # rows and classes per step
):
    """The forward's one small launch after the loss kernel: the programs' rows reduced in a fixed
    order (deterministic), and from those C-vectors what the caller needs, on the device: the counts,
    true positives and bad-label count, the class weights (the recall loss's from the counts), the
    loss Σ_c w_c S_c / D (docs/DESIGN.md §2: D = Σ_c w_c n_c or Σ_c n_c; a zero D divides by 1) and the
    backward's per-class factor. As ``torch.nn.functional.cross_entropy``, a weight enters only
    through the pixels of its class (``where(n_c > 0, w_c S_c, 0)``: an inf or NaN weight of an absent
    class changes nothing). The weighted denominator is summed in float64, as the counts are exact
    integers. One program: the tables are small (the launcher reduces large ones first)."""
    acc_ty = scale_ptr.dtype.element_ty
    cs = tl.arange(0, BC)
    rs = tl.arange(0, BR)
    total = tl.zeros([BC], acc_ty)
    denom = tl.zeros([BC], tl.float64)
    for c0 in range(0, C, BC):
        c = c0 + cs
        cm = c < C
        n = tl.zeros([BC], tl.int64)
        tp = tl.zeros([BC], tl.int64)
        S = tl.zeros([BC], acc_ty)
        # at least one (masked) step even without rows, so that the compiler keeps one copy of the class loop
        # (a second, for no rows, only stored zeros)
        for r0 in range(0, tl.maximum(RC, 1), BR):
            r = r0 + rs
            off = r.to(tl.int64)[:, None] * C + c[None, :]
            mk = (r < RC)[:, None] & cm[None, :]
            n += tl.sum(tl.load(crow_ptr + off, mask=mk, other=0).to(tl.int64), 0)
            if NEED_TP:
                tp += tl.sum(tl.load(trow_ptr + off, mask=mk, other=0).to(tl.int64), 0)
        if SUMS:
            for r0 in range(0, tl.maximum(RL, 1), BR):
                r = r0 + rs
                off = r.to(tl.int64)[:, None] * C + c[None, :]
                S += tl.sum(tl.load(lrow_ptr + off, mask=(r < RL)[:, None] & cm[None, :], other=0.0), 0)
        tl.store(cnt_ptr + c, n, mask=cm)
        if NEED_TP:
            tl.store(tp_ptr + c, tp, mask=cm)
        if RED == RED_CLASS:
            tl.store(loss_ptr + c, S, mask=cm)
        present = cm & (n > 0)
        if WEIGHTING == WEIGHTING_GENERAL or WEIGHTING == WEIGHTING_PAPER:
            w = tl.load(w_ptr + c, mask=cm, other=0.0).to(acc_ty)
        elif WEIGHTING == WEIGHTING_RECALL:
            n64 = n.to(tl.float64)
            w = tl.where(n > 0, 1.0 - tp.to(tl.float64) / tl.maximum(n64, 1.0), 1.0).to(acc_ty)
        else:
            w = tl.full([BC], 1.0, acc_ty)
        if SUMS and RED != RED_CLASS:
            total += tl.where(present, w * S, 0.0)
        if RED == RED_MEAN:
            if WEIGHTING == WEIGHTING_GENERAL:
                denom += tl.where(present, w.to(tl.float64) * n.to(tl.float64), 0.0)
            else:
                denom += n.to(tl.float64)
        tl.store(scale_ptr + c, w, mask=cm)
    if RED == RED_MEAN or RED == RED_SUM:
        tot = tl.sum(total, 0)
        if RED == RED_MEAN:
            d = tl.sum(denom, 0).to(acc_ty)
            d = tl.where(d != 0.0, d, 1.0)  # no valid pixel (or Σ w_y = 0): loss 0, gradient 0
            tl.store(loss_ptr, tot / d)
            tl.debug_barrier()  # the weights stored above, read back by other threads
            for c0 in range(0, C, BC):
                c = c0 + cs
                cm = c < C
                tl.store(scale_ptr + c, tl.load(scale_ptr + c, mask=cm, other=0.0) / d, mask=cm)
        else:
            tl.store(loss_ptr, tot)
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
def _weigh_kernel(
    pl_ptr,  # (N,) per-pixel loss, 0 at pixels that are not valid: multiplied in place
    t_ptr,  # (N,) labels
    scale_ptr,  # (C,) class weights
    N,
    C,
    ignore_index,
    BLOCK: tl.constexpr,
):
    """pl[n] *= w[y_n] at the valid pixels: the per-pixel output of a loss whose weights come from the
    pass's own statistics (the recall loss with reduction="none"), once the finalize launch has them."""
    n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = n < N
    valid, bad, y32, badv = load_labels(t_ptr, n, m, ignore_index, C, 0)
    w = tl.load(scale_ptr + y32, mask=valid, other=0.0)
    tl.store(pl_ptr + n, tl.load(pl_ptr + n, mask=valid, other=0.0) * w, mask=valid)


@triton.jit
def _keep_lse(lse_ptr, n, NP, pmask, m, s, rest, s2r, xy, tv, gamma, MODE: tl.constexpr, FOCAL: tl.constexpr):
    """What the forward keeps for the backward of a softmax mode (STORE_LSE, ``keeps_lse``): each pixel's
    log-sum-exp at lse[n] and, for the focal loss, ∂ℓ/∂log p_y per unit upstream weight (its a over w), for the
    softmax MSE Σ_j p_j (p_j - t_j) (its q), at lse[NP + n]: the backward's coefficients without a pass over the
    classes."""
    lse = log_sum_exp(m, s)
    tl.store(lse_ptr + n, lse, mask=pmask)
    if MODE == MODE_SOFTMAX_FOCAL:
        if FOCAL:
            logp = xy - lse
            tl.store(lse_ptr + NP + n, focal_coef(1.0, logp, tl.exp(logp), rest / s, gamma), mask=pmask)
    else:
        py = tl.exp(xy - lse)
        tl.store(lse_ptr + NP + n, s2r / (s * s) + py * py - tv * py, mask=pmask)


@triton.jit
def _kept_coefs(lse_ptr, n, NP, valid, w, MODE: tl.constexpr, FOCAL: tl.constexpr):
    """(lse, a, q) of the backward of a softmax mode from what the forward kept (_keep_lse), as
    bwd_softmax_coefs gives them: a = w·(-1, or the kept focal weight) for mode 0, w for mode 3."""
    lse = tl.load(lse_ptr + n, mask=valid, other=0.0)
    q = w
    if MODE == MODE_SOFTMAX_FOCAL:
        if FOCAL:
            a = w * tl.load(lse_ptr + NP + n, mask=valid, other=0.0)
        else:
            a = -w
    else:
        a = w
        q = tl.load(lse_ptr + NP + n, mask=valid, other=0.0)
    return lse, a, q


@triton.jit
def _bwd_chunk(x, c, cmask, y32, tv, lse, a, q, gamma, MODE: tl.constexpr, FOCAL: tl.constexpr):
    oh = c[None, :] == y32[:, None]
    if MODE == MODE_SOFTMAX_FOCAL:
        p = tl.exp(x - lse[:, None])
        g = a[:, None] * (tl.where(oh, 1.0, 0.0) - p)
    elif MODE == MODE_MSE_SOFTMAX:
        p = tl.exp(x - lse[:, None])
        g = a[:, None] * p * (p - tl.where(oh, tv[:, None], 0.0) - q[:, None])
    elif MODE == MODE_SIGMOID_FOCAL:
        g = a[:, None] * sigmoid_focal_grad(x, oh, gamma, FOCAL)
    else:
        g = a[:, None] * (x - tl.where(oh, tv[:, None], 0.0))
    return g


@triton.jit
def _bwd_chunked_kernel(
    x_ptr,  # logits, element (b, c, s) at b*stride_b + c*stride_c + s*stride_s
    t_ptr,  # (N,) labels, any integer dtype
    tv_ptr,  # (C,) MSE target values, accumulation dtype (a dummy of that dtype otherwise)
    gp_ptr,  # upstream gradient: (N,) of a per-pixel output, or the scalar one with gp_stride 0 (HAS_GP)
    wv_ptr,  # (C,) per-class factor of the upstream weight (HAS_WV; see upstream)
    g_ptr,  # gradient out, x's dtype, element (b, c, s) at b*gstride_b + c*gstride_c + s*gstride_s
    lse_ptr,  # (k * NP,) what the forward kept (HAS_LSE, _keep_lse)
    C,
    S,
    NP,
    tiles_per_b,
    num_tiles,
    stride_b,
    stride_c,
    stride_s,  # logits strides
    gstride_b,
    gstride_c,
    gstride_s,  # gradient strides
    gp_stride,  # upstream gradient stride (0: one value for every pixel)
    ignore_index,
    gamma,
    gamma64: tl.float64,
    MODE: tl.constexpr,
    FOCAL: tl.constexpr,
    HAS_GP: tl.constexpr,
    HAS_WV: tl.constexpr,
    HAS_LSE: tl.constexpr,  # the softmax coefficients from what the forward kept: one pass over the classes
    SINGLE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    acc_ty = tv_ptr.dtype.element_ty
    gamma = acc_gamma(gamma, gamma64, acc_ty)
    pid = tl.program_id(0)
    SOFTMAX: tl.constexpr = MODE == MODE_SOFTMAX_FOCAL or MODE == MODE_MSE_SOFTMAX
    for t in range(pid, num_tiles, tl.num_programs(0)):
        b, s, n, pmask, valid, bad, y32, badv = _tile_labels(
            t_ptr, t, tiles_per_b, S, ignore_index, C, BLOCK_P
        )
        poff = b * stride_b + s * stride_s
        goff = b * gstride_b + s * gstride_s
        w = upstream(
            gp_ptr, wv_ptr, n, y32, valid, gp_stride, tl.full([BLOCK_P], 1.0, acc_ty), HAS_GP, HAS_WV
        )
        tv = tl.zeros([BLOCK_P], acc_ty)
        if MODE == MODE_MSE_LOGITS or MODE == MODE_MSE_SOFTMAX:
            tv = tl.load(tv_ptr + y32, mask=valid, other=0.0).to(acc_ty)

        m = tl.full([BLOCK_P], float("-inf"), acc_ty)
        ssum = tl.zeros([BLOCK_P], acc_ty)
        rest = tl.zeros([BLOCK_P], acc_ty)
        s2r = tl.zeros([BLOCK_P], acc_ty)
        xy = tl.zeros([BLOCK_P], acc_ty)
        lse = m
        a = w
        q = w
        if SINGLE:
            x, c, cmask = _load_chunk(x_ptr, poff, pmask, 0, C, stride_c, BLOCK_C, acc_ty)
            if SOFTMAX:
                oh = c[None, :] == y32[:, None]
                m, ssum, rest, s2r, xy = _softmax_step(
                    x, oh, tl.max(x, 1), m, ssum, rest, s2r, xy, MODE == MODE_MSE_SOFTMAX
                )
                lse, a, q = bwd_softmax_coefs(m, ssum, rest, s2r, xy, tv, w, gamma, MODE, FOCAL)
            g = _bwd_chunk(x, c, cmask, y32, tv, lse, a, q, gamma, MODE, FOCAL)
            g = tl.where(valid[:, None], g, 0.0)
            gptrs = g_ptr + (goff[:, None] + c.to(tl.int64)[None, :] * gstride_c)
            tl.store(gptrs, g.to(g_ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])
        else:
            if HAS_LSE:
                lse, a, q = _kept_coefs(lse_ptr, n, NP, valid, w, MODE, FOCAL)
            elif SOFTMAX:
                # the first pass only reduces; its re-read in the second pass hits the cache
                for c0 in range(0, C, BLOCK_C):
                    x, c, cmask = _load_chunk(x_ptr, poff, pmask, c0, C, stride_c, BLOCK_C, acc_ty)
                    oh = c[None, :] == y32[:, None]
                    m, ssum, rest, s2r, xy = _softmax_step(
                        x, oh, tl.max(x, 1), m, ssum, rest, s2r, xy, MODE == MODE_MSE_SOFTMAX
                    )
                lse, a, q = bwd_softmax_coefs(m, ssum, rest, s2r, xy, tv, w, gamma, MODE, FOCAL)
            for c0 in range(0, C, BLOCK_C):
                x, c, cmask = _load_chunk(x_ptr, poff, pmask, c0, C, stride_c, BLOCK_C, acc_ty)
                g = _bwd_chunk(x, c, cmask, y32, tv, lse, a, q, gamma, MODE, FOCAL)
                g = tl.where(valid[:, None], g, 0.0)
                gptrs = g_ptr + (goff[:, None] + c.to(tl.int64)[None, :] * gstride_c)
                tl.store(gptrs, g.to(g_ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])


# ---------------------------------------------------------------------------------------------
# Static classes: pixels on lanes, classes unrolled (C constexpr)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _terms_group(
    xp,
    stride_c,
    pmask,
    y32,
    tv,
    gamma,
    c0,
    lsum,
    bv,
    am,
    acc_ty: tl.constexpr,
    NCLS: tl.constexpr,
    MODE: tl.constexpr,
    FOCAL: tl.constexpr,
    NEED_AM: tl.constexpr,
):
    xg = xp + c0 * stride_c
    for k in tl.static_range(NCLS):
        x = tl.load(xg + k * stride_c, mask=pmask, other=0.0).to(acc_ty)
        if MODE == MODE_SIGMOID_FOCAL:
            lsum += sigmoid_focal_terms(x, y32 == c0 + k, gamma, FOCAL)
        elif MODE == MODE_MSE_LOGITS:
            d = x - tl.where(y32 == c0 + k, tv, 0.0)
            lsum += d * d
        if NEED_AM:
            bv, am = take_max(x, bv, am, c0 + k)
    return lsum, bv, am


@triton.jit
def _static_terms(
    xp,
    stride_c,
    pmask,
    y32,
    tv,
    gamma,
    acc_ty: tl.constexpr,
    C: tl.constexpr,
    GROUP: tl.constexpr,
    LOOP: tl.constexpr,
    MODE: tl.constexpr,
    FOCAL: tl.constexpr,
    NEED_AM: tl.constexpr,
):
    """(Σ_k term_k, argmax) of the per-class modes over groups as in ``static_softmax``:
    sigmoid focal terms (MODE 1), (x_k - t_k)² (MODE 2), nothing (MODE 4); the argmax only
    when NEED_AM."""
    lsum = tl.zeros(y32.shape, acc_ty)
    bv = tl.full(y32.shape, float("-inf"), acc_ty)
    am = tl.zeros(y32.shape, tl.int32)
    FULL: tl.constexpr = (C // GROUP) * GROUP
    if LOOP:
        for c0 in range(0, FULL, GROUP):
            lsum, bv, am = _terms_group(
                xp, stride_c, pmask, y32, tv, gamma, c0, lsum, bv, am, acc_ty, GROUP, MODE, FOCAL, NEED_AM
            )
    else:
        for c0 in tl.static_range(0, FULL, GROUP):
            lsum, bv, am = _terms_group(
                xp, stride_c, pmask, y32, tv, gamma, c0, lsum, bv, am, acc_ty, GROUP, MODE, FOCAL, NEED_AM
            )
    if C % GROUP:
        lsum, bv, am = _terms_group(
            xp, stride_c, pmask, y32, tv, gamma, FULL, lsum, bv, am, acc_ty, C % GROUP, MODE, FOCAL, NEED_AM
        )
    return lsum, am


@triton.jit
def _grad_group(
    xp,
    gq,
    stride_c,
    gstride_c,
    pmask,
    valid,
    y32,
    tv,
    lse,
    a,
    q,
    gamma,
    c0,
    acc_ty: tl.constexpr,
    NCLS: tl.constexpr,
    MODE: tl.constexpr,
    FOCAL: tl.constexpr,
):
    """Store the gradient of classes c0 .. c0 + NCLS - 1 (unrolled)."""
    xg = xp + c0 * stride_c
    gg = gq + c0 * gstride_c
    for k in tl.static_range(NCLS):
        x = tl.load(xg + k * stride_c, mask=pmask, other=0.0).to(acc_ty)
        oh = y32 == c0 + k
        if MODE == MODE_SOFTMAX_FOCAL:
            g = a * (tl.where(oh, 1.0, 0.0) - tl.exp(x - lse))
        elif MODE == MODE_MSE_SOFTMAX:
            p = tl.exp(x - lse)
            g = a * p * (p - tl.where(oh, tv, 0.0) - q)
        elif MODE == MODE_SIGMOID_FOCAL:
            g = a * sigmoid_focal_grad(x, oh, gamma, FOCAL)
        else:
            g = a * (x - tl.where(oh, tv, 0.0))
        # a = 0 at ignored pixels, but 0 * inf or 0 * NaN would not be 0
        g = tl.where(valid, g, 0.0)
        tl.store(gg + k * gstride_c, g.to(gq.dtype.element_ty), mask=pmask)


@triton.jit
def _fwd_static_kernel(
    x_ptr,  # logits, element (b, c, s) at b*stride_b + c*stride_c + s*stride_s
    t_ptr,  # (N,) labels, any integer dtype; pixel n = b*S + s
    tv_ptr,  # (C,) MSE target values (accumulation dtype); unread by the other modes
    w_ptr,  # (C,) class weights the stored per-pixel loss is multiplied by (WEIGH_PL)
    pl_ptr,  # (N,) per-pixel loss out (STORE_PL), accumulation dtype; its dtype sets the arithmetic
    lrow_ptr,  # (programs, C) out: class-loss sums of each program (SUMS and REG_STATS)
    crow_ptr,  # (programs, C) int32: valid pixels per class; out (REG_STATS) or zeroed here, added into
    trow_ptr,  # (programs, C) int32: true positives, as crow_ptr (NEED_TP)
    bad_ptr,  # (programs, 2) int64 out: bad labels (outside [0, C), not ignore_index) and the largest
    conf_ptr,  # (C, C) int64 confusion counts [label, argmax] added into (CONF): the caller's matrix
    lse_ptr,  # (k * NP,) out (STORE_LSE): what the backward takes instead of a pass over the classes (_keep_lse)
    S,  # pixels per image
    NP,  # pixels in all
    tiles_per_b,  # pixel tiles per image
    num_tiles,  # pixel tiles in all
    stride_b,
    stride_c,
    stride_s,  # logits strides, in elements
    ignore_index,  # label of pixels that take no part
    gamma,
    gamma64: tl.float64,  # focal exponent, twice (see acc_gamma)
    C: tl.constexpr,  # classes
    GROUP: tl.constexpr,  # classes per group (max/exp passes of the softmax)
    LOOP: tl.constexpr,  # a loop over the groups (large C); otherwise all unrolled
    MODE: tl.constexpr,  # Mode
    FOCAL: tl.constexpr,  # gamma != 0
    STORE_LSE: tl.constexpr,  # keep each pixel's lse (and focal weight or q) for the backward
    STORE_PL: tl.constexpr,  # write the per-pixel loss
    WEIGH_PL: tl.constexpr,  # ... times the class weight of its label
    SUMS: tl.constexpr,  # the class-loss sums in registers (REG_STATS; else the stored loss is summed)
    REG_STATS: tl.constexpr,  # class sums, counts, true positives in registers (small C)
    NEED_TP: tl.constexpr,  # count true positives
    CONF: tl.constexpr,  # 0: no confusion, 1: a register histogram (CONF_BINS cells), 2: integer atomics
    CONF_BINS: tl.constexpr,  # a power of two >= C * C (CONF == 1)
    ROWS: tl.constexpr,  # pixel rows per tile
    VEC: tl.constexpr,  # consecutive pixels per thread and row
    ZB: tl.constexpr,  # classes per step of the rows' zeroing (not REG_STATS)
):
    acc_ty = pl_ptr.dtype.element_ty
    gamma = acc_gamma(gamma, gamma64, acc_ty)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    NEED_AM: tl.constexpr = NEED_TP or CONF > 0
    pid64 = pid.to(tl.int64)
    if REG_STATS:
        lacc = ()
        cacc = ()
        tacc = ()
        for c in tl.static_range(C):
            lacc = lacc + (tl.zeros([ROWS], acc_ty),)
            cacc = cacc + (tl.zeros([ROWS], tl.int32),)
            tacc = tacc + (tl.zeros([ROWS], tl.int32),)
    else:
        zero_rows(crow_ptr, pid64, C, ZB)
        if NEED_TP:
            zero_rows(trow_ptr, pid64, C, ZB)
        tl.debug_barrier()  # the zeros before this program's additions into its rows
    if CONF == 1:
        hist = tl.zeros([CONF_BINS], tl.int32)
    nbad = tl.zeros([ROWS, VEC], tl.int32)
    vbad = tl.full([ROWS, VEC], NO_BAD, tl.int64)
    sc = i64(stride_c)

    for t in range(pid, num_tiles, nprog):
        b, s, n, pmask, valid, bad, y32, badv = tile_pixels(
            t_ptr, t, tiles_per_b, S, ignore_index, C, ROWS, VEC
        )
        nbad += bad.to(tl.int32)
        vbad = tl.maximum(vbad, badv)
        xp = x_ptr + (b * stride_b + s * stride_s)
        tv = tl.zeros([ROWS, VEC], acc_ty)
        if MODE == MODE_MSE_LOGITS or MODE == MODE_MSE_SOFTMAX:
            tv = tl.load(tv_ptr + y32, mask=valid, other=0.0).to(acc_ty)
        if MODE == MODE_SOFTMAX_FOCAL or MODE == MODE_MSE_SOFTMAX:
            m, ssum, rest, s2r, am, xy = static_softmax(
                xp,
                sc,
                pmask,
                y32,
                acc_ty,
                C,
                GROUP,
                LOOP,
                FOCAL or MODE == MODE_MSE_SOFTMAX,
                MODE == MODE_MSE_SOFTMAX,
                NEED_AM,
                True,
            )
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
            if STORE_LSE:
                _keep_lse(lse_ptr, n, NP, pmask, m, ssum, rest, s2r, xy, tv, gamma, MODE, FOCAL)
        else:
            lsum, am = _static_terms(
                xp, sc, pmask, y32, tv, gamma, acc_ty, C, GROUP, LOOP, MODE, FOCAL, NEED_AM
            )
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

        if REG_STATS:
            # per-thread running sums: a compare and a few selects and adds per pixel and class
            nl = ()
            nc = ()
            nt = ()
            for c in tl.static_range(C):
                is_c = y32 == c
                if SUMS:
                    nl = nl + (lacc[c] + tl.sum(tl.where(is_c, lv, 0.0), 1),)
                else:
                    nl = nl + (lacc[c],)
                nc = nc + (cacc[c] + tl.sum(is_c.to(tl.int32), 1),)
                if NEED_TP:
                    nt = nt + (tacc[c] + tl.sum((is_c & hit).to(tl.int32), 1),)
                else:
                    nt = nt + (tacc[c],)
            lacc = nl
            cacc = nc
            tacc = nt
        if CONF == 1:
            hist = conf_hist(hist, y32, am, valid, C, CONF_BINS)
        counts_in_memory(
            crow_ptr, trow_ptr, conf_ptr, pid64, C, y32, am, valid, hit, not REG_STATS, NEED_TP, CONF
        )

    if REG_STATS:
        # one row per program, reduced by the finalize launch in a fixed order: deterministic
        for c in tl.static_range(C):
            if SUMS:
                tl.store(lrow_ptr + pid64 * C + c, tl.sum(lacc[c], 0))
            tl.store(crow_ptr + pid64 * C + c, tl.sum(cacc[c], 0))
            if NEED_TP:
                tl.store(trow_ptr + pid64 * C + c, tl.sum(tacc[c], 0))
    if CONF == 1:
        conf_flush(conf_ptr, hist, C, CONF_BINS)
    store_bad(bad_ptr, pid, tl.sum(tl.sum(nbad, 1), 0), tl.max(tl.max(vbad, 1), 0))


@triton.jit
def _bwd_static_kernel(
    x_ptr,  # logits, element (b, c, s) at b*stride_b + c*stride_c + s*stride_s
    t_ptr,  # (N,) labels, any integer dtype
    tv_ptr,  # (C,) MSE target values, accumulation dtype (a dummy of that dtype otherwise)
    gp_ptr,  # upstream gradient: (N,) of a per-pixel output, or the scalar one with gp_stride 0 (HAS_GP)
    wv_ptr,  # (C,) per-class factor of the upstream weight (HAS_WV; see upstream)
    g_ptr,  # gradient out, x's dtype, element (b, c, s) at b*gstride_b + c*gstride_c + s*gstride_s
    lse_ptr,  # (k * NP,) what the forward kept (HAS_LSE, _keep_lse)
    S,
    NP,
    tiles_per_b,
    num_tiles,
    stride_b,
    stride_c,
    stride_s,  # logits strides
    gstride_b,
    gstride_c,
    gstride_s,  # gradient strides
    gp_stride,  # upstream gradient stride (0: one value for every pixel)
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
    HAS_LSE: tl.constexpr,  # the softmax coefficients from what the forward kept: one pass over the classes
    ROWS: tl.constexpr,
    VEC: tl.constexpr,
):
    """The gradient of one tile: the softmax state as in the forward (same loop), then one
    unrolled pass that recomputes each class's p_k from its logit and stores the gradient
    (with C <= GROUP the logits are still in registers; beyond, the re-read hits the cache)."""
    acc_ty = tv_ptr.dtype.element_ty
    gamma = acc_gamma(gamma, gamma64, acc_ty)
    pid = tl.program_id(0)
    SOFTMAX: tl.constexpr = MODE == MODE_SOFTMAX_FOCAL or MODE == MODE_MSE_SOFTMAX
    sc = i64(stride_c)
    gsc = i64(gstride_c)
    for t in range(pid, num_tiles, tl.num_programs(0)):
        b, s, n, pmask, valid, bad, y32, badv = tile_pixels(
            t_ptr, t, tiles_per_b, S, ignore_index, C, ROWS, VEC
        )
        xp = x_ptr + (b * stride_b + s * stride_s)
        gq = g_ptr + (b * gstride_b + s * gstride_s)
        w = upstream(
            gp_ptr, wv_ptr, n, y32, valid, gp_stride, tl.full([ROWS, VEC], 1.0, acc_ty), HAS_GP, HAS_WV
        )
        tv = tl.zeros([ROWS, VEC], acc_ty)
        if MODE == MODE_MSE_LOGITS or MODE == MODE_MSE_SOFTMAX:
            tv = tl.load(tv_ptr + y32, mask=valid, other=0.0).to(acc_ty)
        lse = w
        a = w
        q = w
        if HAS_LSE:
            lse, a, q = _kept_coefs(lse_ptr, n, NP, valid, w, MODE, FOCAL)
        elif SOFTMAX:
            m, ssum, rest, s2r, am, xy = static_softmax(
                xp,
                sc,
                pmask,
                y32,
                acc_ty,
                C,
                GROUP,
                LOOP,
                FOCAL or MODE == MODE_MSE_SOFTMAX,
                MODE == MODE_MSE_SOFTMAX,
                False,
                True,
            )
            lse, a, q = bwd_softmax_coefs(m, ssum, rest, s2r, xy, tv, w, gamma, MODE, FOCAL)
        FULL: tl.constexpr = (C // GROUP) * GROUP
        if LOOP:
            for c0 in range(0, FULL, GROUP):
                _grad_group(
                    xp, gq, sc, gsc, pmask, valid, y32, tv, lse, a, q, gamma, c0, acc_ty, GROUP, MODE, FOCAL
                )
        else:
            for c0 in tl.static_range(0, FULL, GROUP):
                _grad_group(
                    xp, gq, sc, gsc, pmask, valid, y32, tv, lse, a, q, gamma, c0, acc_ty, GROUP, MODE, FOCAL
                )
        if C % GROUP:
            _grad_group(
                xp, gq, sc, gsc, pmask, valid, y32, tv, lse, a, q, gamma, FULL, acc_ty, C % GROUP, MODE, FOCAL
            )
