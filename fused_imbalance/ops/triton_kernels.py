"""Triton kernels of the fused losses; launched and registered as ops by :mod:`.triton_loss`.

Logits are read through three strides: pixel ``s`` of image ``b``, class ``c`` lies at
``b * stride_b + c * stride_c + s * stride_s``, which covers contiguous NCHW (pixels
contiguous per class plane), channels_last (classes contiguous per pixel) and (N, C) rows
without a copy. Triton specialises integer arguments equal to 1, so the unit stride is a
compile-time constant and the loads are vectorised along whichever axis it belongs to.

A program walks a run of ``per_prog`` consecutive pixel tiles; a tile is ``BLOCK_P`` pixels of
one image. Classes are read in chunks of ``BLOCK_C`` with an online softmax (running max, sum of
exponentials, rescaled when the max grows), so every per-pixel quantity of every mode is known
after one read of the logits. When the whole class dim fits one chunk (``SINGLE``) the tile is
loaded once and kept in registers.

Modes (``Mode`` in :mod:`fused_imbalance.ops`): 0 softmax focal, 1 sigmoid focal, 2 MSE on the
logits, 3 MSE on the softmax, 4 statistics only.
"""
import triton
import triton.language as tl

_BIG = tl.constexpr(2147483647)  # "no index yet" in the int32 index reductions


@triton.jit
def _log1p_small(e):
    # log(1 + e) for e in [0, 1]: Kahan's form keeps the digits of a tiny e, which log(1 + e) rounds away
    w = 1.0 + e
    return tl.where(w == 1.0, e, tl.log(w) * e / (w - 1.0))


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
def _lse(m, s):
    return tl.where(m == float("-inf"), 0.0, m) + tl.log(s)


@triton.jit
def _sigmoid_focal_terms(x, oh, gamma, FOCAL: tl.constexpr):
    """Per-class FL_k = σ(z)^γ softplus(z) with z = x_k for k ≠ y and z = -x_y for k = y.

    Both halves of the sigmoid focal loss are this one function of z: -log(1 - σ(x)) =
    softplus(x), -log σ(x) = softplus(-x), and q^γ = exp(-γ softplus(-z)). Padding columns
    (x = -inf, k ≠ y) give exactly 0.
    """
    z = tl.where(oh, -x, x)
    l = _log1p_small(tl.exp(-tl.abs(z)))
    sp = tl.maximum(z, 0.0) + l
    if FOCAL:
        sp = tl.exp(-gamma * (tl.maximum(-z, 0.0) + l)) * sp
    return sp


@triton.jit
def _sigmoid_focal_grad(x, oh, gamma, FOCAL: tl.constexpr):
    """∂ℓ/∂x_k of the sigmoid focal loss, ±d/dz [σ(z)^γ sp(z)] = ±σ(z)^γ (γ σ(-z) sp(z) + σ(z)),
    sp = softplus."""
    z = tl.where(oh, -x, x)
    e = tl.exp(-tl.abs(z))
    w1 = 1.0 + e
    pos = z >= 0.0
    sig = tl.where(pos, 1.0, e) / w1  # σ(z), no overflow on either side
    if FOCAL:
        l = _log1p_small(e)
        sp = tl.maximum(z, 0.0) + l
        sig_neg = tl.where(pos, e, 1.0) / w1  # σ(-z)
        d = tl.exp(-gamma * (tl.maximum(-z, 0.0) + l)) * (gamma * sig_neg * sp + sig)
    else:
        d = sig
    return tl.where(oh, -d, d)


@triton.jit
def _fwd_chunk(x_ptr, poff, pmask, y32, tv, c0, C, stride_c,
               m, s, rest, s2r, xy, lsum, best_v, best_i, nan_i, gamma,
               MODE: tl.constexpr, FOCAL: tl.constexpr, BLOCK_C: tl.constexpr):
    """Fold classes ``c0 .. c0 + BLOCK_C`` of a pixel tile into its running forward state."""
    x, c, cmask = _load_chunk(x_ptr, poff, pmask, c0, C, stride_c, BLOCK_C, m.dtype)
    oh = c[None, :] == y32[:, None]
    cmax = tl.max(x, 1)
    best_v, best_i, nan_i = _argmax_step(x, cmax, c0, best_v, best_i, nan_i, BLOCK_C)
    if MODE == 0 or MODE == 3:
        m, s, rest, s2r, xy = _softmax_step(x, oh, cmax, m, s, rest, s2r, xy, MODE == 3)
    elif MODE == 1:
        lsum += tl.sum(_sigmoid_focal_terms(x, oh, gamma, FOCAL), 1)
    elif MODE == 2:
        d = x - tl.where(oh, tv[:, None], 0.0)
        lsum += tl.sum(tl.where(cmask[None, :], d * d, 0.0), 1)
    return m, s, rest, s2r, xy, lsum, best_v, best_i, nan_i


@triton.jit
def _tile_labels(t_ptr, t, tiles_per_b, S, ignore_index, C, BLOCK_P: tl.constexpr):
    """Pixel indices, offsets-to-be and labels of tile ``t``: (s, n, pmask, valid, bad, y32)."""
    b = t // tiles_per_b
    # int64: pixel and element offsets can exceed 2**31
    s = (t - b * tiles_per_b).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = s < S
    b = b.to(tl.int64)
    n = b * S + s
    y = tl.load(t_ptr + n, mask=pmask, other=0).to(tl.int64)  # widen before comparing
    keep = pmask & (y != ignore_index)
    inr = (y >= 0) & (y < C)
    valid = keep & inr
    bad = keep & ~inr
    y32 = tl.where(valid, y, 0).to(tl.int32)
    return b, s, n, pmask, valid, bad, y32


@triton.jit
def _loss_fwd_kernel(
    x_ptr,  # logits, element (b, c, s) at b*stride_b + c*stride_c + s*stride_s
    t_ptr,  # (N,) labels, any integer dtype; pixel n = b*S + s
    tv_ptr,  # (C,) MSE target values (accumulation dtype); unread by the other modes
    pl_ptr,  # (N,) per-pixel loss out, accumulation dtype; its dtype sets the arithmetic
    part_ptr,  # (programs, C) per-program class-loss partials out (PARTIALS)
    cnt_ptr,  # (C,) int64 valid pixels per class, added into
    tp_ptr,  # (C,) int64 valid pixels whose argmax is their label, added into
    bad_ptr,  # () int64 labels outside [0, C) that are not ignore_index, added into
    conf_ptr,  # (C, C) int64 confusion counts [label, argmax], added into (CONF > 0)
    C,  # classes
    S,  # pixels per image
    tiles_per_b,  # pixel tiles per image
    num_tiles,  # pixel tiles in all
    per_prog,  # consecutive tiles per program
    stride_b, stride_c, stride_s,  # logits strides, in elements
    ignore_index,  # label of pixels that take no part
    gamma,  # focal exponent
    MODE: tl.constexpr,  # Mode
    FOCAL: tl.constexpr,  # gamma != 0
    STORE_PL: tl.constexpr,  # write the per-pixel loss
    SINGLE: tl.constexpr,  # C <= BLOCK_C: one chunk
    PARTIALS: tl.constexpr,  # class statistics reduced in registers (SINGLE and a small C)
    CONF: tl.constexpr,  # 0: no confusion, 1: one atomic per pixel, 2: per-program histogram
    BLOCK_P: tl.constexpr,  # pixels per tile
    BLOCK_C: tl.constexpr,  # classes per chunk
):
    acc_ty = pl_ptr.dtype.element_ty
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    HAS_LOSS: tl.constexpr = MODE != 4
    if PARTIALS:
        loss_acc = tl.zeros([BLOCK_C], acc_ty)
        cnt_acc = tl.zeros([BLOCK_C], tl.int32)
        tp_acc = tl.zeros([BLOCK_C], tl.int32)
    if CONF == 2:
        conf_acc = tl.zeros([BLOCK_C * BLOCK_C], tl.int32)
    bad_acc = tl.zeros([BLOCK_P], tl.int32)
    one = tl.full([BLOCK_P], 1, tl.int64)

    for t in range(pid * per_prog, tl.minimum(pid * per_prog + per_prog, num_tiles)):
        b, s, n, pmask, valid, bad, y32 = _tile_labels(t_ptr, t, tiles_per_b, S, ignore_index, C,
                                                       BLOCK_P)
        bad_acc += bad.to(tl.int32)
        poff = b * stride_b + s * stride_s
        tv = tl.zeros([BLOCK_P], acc_ty)
        if MODE == 2 or MODE == 3:
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
                x_ptr, poff, pmask, y32, tv, 0, C, stride_c, m, ssum, rest, s2r, xy, lsum,
                best_v, best_i, nan_i, gamma, MODE, FOCAL, BLOCK_C)
        else:
            for c0 in range(0, C, BLOCK_C):
                m, ssum, rest, s2r, xy, lsum, best_v, best_i, nan_i = _fwd_chunk(
                    x_ptr, poff, pmask, y32, tv, c0, C, stride_c, m, ssum, rest, s2r, xy, lsum,
                    best_v, best_i, nan_i, gamma, MODE, FOCAL, BLOCK_C)
        am = tl.where(nan_i < _BIG, nan_i, best_i)

        if MODE == 0:
            logp = xy - _lse(m, ssum)
            if FOCAL:
                # (1 - p_y)^γ; 1 - p_y = 0 gives exp(-inf) = 0 for γ > 0
                loss = -tl.exp(gamma * tl.log(rest / ssum)) * logp
            else:
                loss = -logp
        elif MODE == 1:
            loss = lsum
        elif MODE == 2:
            loss = 0.5 * lsum
        elif MODE == 3:
            dy = tl.exp(xy - _lse(m, ssum)) - tv
            loss = 0.5 * (s2r / (ssum * ssum) + dy * dy)
        else:
            loss = lsum  # zeros
        lv = tl.where(valid, loss, 0.0)
        if STORE_PL:
            tl.store(pl_ptr + n, lv, mask=pmask)

        hit = valid & (am == y32)
        if PARTIALS:
            if HAS_LOSS:
                oh = cols[None, :] == y32[:, None]
                loss_acc += tl.sum(tl.where(oh, lv[:, None], 0.0), 0)
            cnt_acc += tl.histogram(y32, BLOCK_C, mask=valid)
            tp_acc += tl.histogram(y32, BLOCK_C, mask=hit)
        else:
            tl.atomic_add(cnt_ptr + y32, one, mask=valid, sem="relaxed")
            tl.atomic_add(tp_ptr + y32, one, mask=hit, sem="relaxed")
        if CONF == 2:
            conf_acc += tl.histogram(y32 * BLOCK_C + am, BLOCK_C * BLOCK_C, mask=valid)
        elif CONF == 1:
            tl.atomic_add(conf_ptr + (y32.to(tl.int64) * C + am), one, mask=valid, sem="relaxed")

    if PARTIALS:
        cmask = cols < C
        # a fixed row per program, summed in a fixed order by the launcher: deterministic
        tl.store(part_ptr + pid * C + cols, loss_acc, mask=cmask)
        tl.atomic_add(cnt_ptr + cols, cnt_acc.to(tl.int64), mask=cmask & (cnt_acc > 0), sem="relaxed")
        tl.atomic_add(tp_ptr + cols, tp_acc.to(tl.int64), mask=cmask & (tp_acc > 0), sem="relaxed")
    if CONF == 2:
        k = tl.arange(0, BLOCK_C * BLOCK_C)
        row = k // BLOCK_C
        col = k % BLOCK_C
        tl.atomic_add(conf_ptr + (row * C + col), conf_acc.to(tl.int64),
                      mask=(row < C) & (col < C) & (conf_acc > 0), sem="relaxed")
    nbad = tl.sum(bad_acc, 0)
    tl.atomic_add(bad_ptr, nbad.to(tl.int64), mask=nbad > 0, sem="relaxed")


@triton.jit
def _class_sum_kernel(
    t_ptr,  # (N,) labels, any integer dtype
    pl_ptr,  # (N,) per-pixel loss, 0 at ignored and bad pixels
    part_ptr,  # (segments, C) out: Σ of pl over each segment's pixels of class c
    N,  # pixels
    C,  # classes
    per_seg,  # pixels per segment, a multiple of BLOCK_N
    BLOCK_N: tl.constexpr,  # pixels per step
    BLOCK_K: tl.constexpr,  # classes per program
):
    # Deterministic per-class sums for class counts too large for per-program rows: every
    # (class block, segment) is one program adding its pixels in order.
    kb = tl.program_id(0)
    seg = tl.program_id(1)
    ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_K], pl_ptr.dtype.element_ty)
    start = seg.to(tl.int64) * per_seg
    for i in range(0, per_seg, BLOCK_N):
        n = start + i + tl.arange(0, BLOCK_N)
        nm = n < N
        # a label outside [0, C) carries pl = 0, so truncating it cannot misplace any loss
        y = tl.load(t_ptr + n, mask=nm, other=0).to(tl.int32)
        v = tl.load(pl_ptr + n, mask=nm, other=0.0)
        acc += tl.sum(tl.where(y[:, None] == ks[None, :], v[:, None], 0.0), 0)
    tl.store(part_ptr + seg * C + ks, acc, mask=ks < C)


@triton.jit
def _bwd_softmax_coefs(m, s, rest, s2r, xy, tv, w, gamma, MODE: tl.constexpr, FOCAL: tl.constexpr):
    """Per-pixel (lse, a, q): ∂ℓ/∂x_k = a (onehot_k - p_k) for mode 0, a p_k (p_k - t onehot_k - q)
    for mode 3, with the upstream gradient w already folded into a."""
    lse = _lse(m, s)
    logp = xy - lse
    if MODE == 0:
        if FOCAL:
            # ∂ℓ/∂log p = -(1-p)^γ + γ p log p (1-p)^(γ-1) = -(1-p)^γ (1 - γ p log p / (1-p));
            # log p / (1-p) -> -1 as p -> 1, and (1-p)^γ = 0 there, so the limit is 0, not 0*inf
            omp = rest / s
            wf = tl.exp(gamma * tl.log(omp))
            r = tl.where(omp > 0.0, logp / omp, -1.0)
            a = -w * wf * (1.0 - gamma * tl.exp(logp) * r)
        else:
            a = -w
        q = a  # unused
    else:
        py = tl.exp(logp)
        q = s2r / (s * s) + py * py - tv * py  # Σ_j p_j (p_j - t_j)
        a = w
    return lse, a, q


@triton.jit
def _bwd_chunk(x, c, cmask, y32, tv, lse, a, q, gamma,
               MODE: tl.constexpr, FOCAL: tl.constexpr):
    oh = c[None, :] == y32[:, None]
    if MODE == 0:
        p = tl.exp(x - lse[:, None])
        g = a[:, None] * (tl.where(oh, 1.0, 0.0) - p)
    elif MODE == 3:
        p = tl.exp(x - lse[:, None])
        g = a[:, None] * p * (p - tl.where(oh, tv[:, None], 0.0) - q[:, None])
    elif MODE == 1:
        g = a[:, None] * _sigmoid_focal_grad(x, oh, gamma, FOCAL)
    else:
        g = a[:, None] * (x - tl.where(oh, tv[:, None], 0.0))
    return g


@triton.jit
def _loss_bwd_kernel(
    x_ptr,  # logits, element (b, c, s) at b*stride_b + c*stride_c + s*stride_s
    t_ptr,  # (N,) labels, any integer dtype
    tv_ptr,  # (C,) MSE target values, accumulation dtype (a dummy of that dtype otherwise)
    gp_ptr,  # (N,) upstream gradient of the per-pixel loss (HAS_GP)
    gc_ptr,  # (C,) upstream gradient of the class-loss sums (HAS_GC)
    g_ptr,  # gradient out, x's dtype, element (b, c, s) at b*gstride_b + c*gstride_c + s*gstride_s
    C, S, tiles_per_b, num_tiles, per_prog,
    stride_b, stride_c, stride_s,  # logits strides
    gstride_b, gstride_c, gstride_s,  # gradient strides
    gp_stride,  # grad_pixel stride (0 when autograd expands a scalar)
    gc_stride,  # grad_class stride
    ignore_index,
    gamma,
    MODE: tl.constexpr,
    FOCAL: tl.constexpr,
    HAS_GP: tl.constexpr,
    HAS_GC: tl.constexpr,
    SINGLE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    acc_ty = tv_ptr.dtype.element_ty
    pid = tl.program_id(0)
    SOFTMAX: tl.constexpr = MODE == 0 or MODE == 3
    for t in range(pid * per_prog, tl.minimum(pid * per_prog + per_prog, num_tiles)):
        b, s, n, pmask, valid, bad, y32 = _tile_labels(t_ptr, t, tiles_per_b, S, ignore_index, C,
                                                       BLOCK_P)
        poff = b * stride_b + s * stride_s
        goff = b * gstride_b + s * gstride_s
        w = tl.zeros([BLOCK_P], acc_ty)
        if HAS_GP:
            w += tl.load(gp_ptr + n * gp_stride, mask=valid, other=0.0).to(acc_ty)
        if HAS_GC:
            w += tl.load(gc_ptr + y32 * gc_stride, mask=valid, other=0.0).to(acc_ty)
        tv = tl.zeros([BLOCK_P], acc_ty)
        if MODE == 2 or MODE == 3:
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
                m, ssum, rest, s2r, xy = _softmax_step(x, oh, tl.max(x, 1), m, ssum, rest, s2r,
                                                       xy, MODE == 3)
                lse, a, q = _bwd_softmax_coefs(m, ssum, rest, s2r, xy, tv, w, gamma, MODE, FOCAL)
            g = _bwd_chunk(x, c, cmask, y32, tv, lse, a, q, gamma, MODE, FOCAL)
            g = tl.where(valid[:, None], g, 0.0)
            gptrs = g_ptr + (goff[:, None] + c.to(tl.int64)[None, :] * gstride_c)
            tl.store(gptrs, g.to(g_ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])
        else:
            if SOFTMAX:
                # the first pass only reduces; its re-read in the second pass hits the cache
                for c0 in range(0, C, BLOCK_C):
                    x, c, cmask = _load_chunk(x_ptr, poff, pmask, c0, C, stride_c, BLOCK_C, acc_ty)
                    oh = c[None, :] == y32[:, None]
                    m, ssum, rest, s2r, xy = _softmax_step(x, oh, tl.max(x, 1), m, ssum, rest,
                                                           s2r, xy, MODE == 3)
                lse, a, q = _bwd_softmax_coefs(m, ssum, rest, s2r, xy, tv, w, gamma, MODE, FOCAL)
            for c0 in range(0, C, BLOCK_C):
                x, c, cmask = _load_chunk(x_ptr, poff, pmask, c0, C, stride_c, BLOCK_C, acc_ty)
                g = _bwd_chunk(x, c, cmask, y32, tv, lse, a, q, gamma, MODE, FOCAL)
                g = tl.where(valid[:, None], g, 0.0)
                gptrs = g_ptr + (goff[:, None] + c.to(tl.int64)[None, :] * gstride_c)
                tl.store(gptrs, g.to(g_ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])
