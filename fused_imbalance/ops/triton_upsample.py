"""The Triton backend of the upsampled loss ops (DESIGN.md §10):
``fused_imbalance::triton_upsample_loss_fwd`` / ``triton_upsample_loss_bwd``.

Same contract as the C++ ops (:mod:`.upsample`): the loss of ``F.interpolate(x, size=(H, W),
mode, align_corners)`` for low-resolution logits x (B, C, h, w), any strides (NCHW and
channels_last read in place), without a tensor of B·C·H·W elements.

Interpolation. The source indices and weights of each axis are small tables (H and W entries)
computed on the device with torch's own formulas (aten/native/UpSample.h: area_pixel_compute_
source_index and guard_index_and_lambda in the accumulation dtype, the float index; nearest_idx
with its float scale and the 1x / 2x special cases) exactly as the C++ kernels compute them, so
every pixel reads the same 2 x 2 (nearest: 1) low-resolution neighbours with the same weights;
the blend is torch's separable order (x0·wx0 + x1·wx1 per row, then rows by wy0, wy1), float32
for 16-bit and float32 logits, float64 for float64.

Forward (``_up_fwd_kernel``): full-resolution pixels on the lanes (tiles of BLOCK_P consecutive
pixels of the flattened B·H·W), classes on the second axis: the whole class dim in one chunk up
to 64 classes, otherwise chunks of 32 with an online softmax. Per class chunk the tile gathers
its 4 (nearest: 1) neighbours — neighbouring pixels share them, so the gathers hit L1/L2 and DRAM
sees each low-resolution logit about once — and runs the per-pixel math of the plain loss. With
one chunk, each program keeps its per-class loss sums, counts and true positives in registers
over a fixed run of tiles, stores its loss row (summed here in a fixed order: deterministic) and
adds its counts with integer atomics; with chunks, per-pixel losses go to an (N,) buffer summed
per class by a second deterministic kernel, counts with one integer atomic per pixel.

Backward (deterministic, no float atomics), two kernels:

1. ``_up_coef_kernel``: per full-resolution pixel, the scalars its gradient needs — the folded
   upstream weight a = (grad_pixel[n] + grad_class[y_n]) (times the focal factor), and for the
   softmax modes lse (and q for the softmax MSE) — into an O(B·H·W) scratch (1 to 3 vectors of
   N floats of the accumulation dtype).
2. ``_up_gather_kernel``: low-resolution elements (flattened (b, y, x)) x the columns X that
   read them on the lanes, classes on the second axis. Each element visits the full-resolution
   pixels whose interpolation uses it: rows Y in [uy0[y], uy1[y]) one after another, columns X in
   [ux0[x], ux1[x]) on SPAN_X lanes (index ranges, contiguous because the source indices are
   nondecreasing); it recomputes the interpolated logit and the loss gradient there from the
   scratch scalars and adds wy·wx·g; the SPAN_X lane sums are then added by one fixed reduction
   tree. Every element's sum is the same sequence of operations whatever the grid: bit-identical
   run to run.

Cost model (N = B·H·W full-resolution pixels, n = B·h·w low-resolution positions, C classes,
e the logits' element size, l the labels'):

* forward: DRAM bytes = N·l (labels) + n·C·e (the low-resolution logits, once: the neighbour
  gathers of a tile hit L1/L2) + 4·N if the per-pixel loss is asked; instructions ≈ N·C·(4
  gathered loads + 6 flops of interpolation + the mode's per-logit math).
* backward: DRAM bytes = 2·N·l (labels, read by both kernels) + 2·n·C·e (logits, read by both)
  + n·C·e (gradient) + the scratch (1-3 vectors of 4·N bytes, written once and read back once);
  instructions: the coefficient kernel is a forward; the gather kernel evaluates the
  per-(pixel, class) gradient once per low-resolution neighbour that the pixel reads, i.e.
  4·N·C (nearest: N·C) evaluations of 4 gathers + an exp, on SPAN_X (a power of two) lanes per
  element of which about 2·W/w carry a column. That recomputation is the price of the
  deterministic gather without float atomics; benchmarks/sm90_upsample_driver.py estimates
  what it costs on the H100.
"""
import functools
import math
import struct
from typing import Optional

import torch

from . import Mode, fwd_fake
from .upsample import Interp, register

try:
    import triton
    import triton.language as tl

    from ._triton_compat import wrap
except ImportError:  # the package works without triton; this backend is then unavailable
    triton = None

__all__ = ["available", "supports", "upsample_loss_fwd", "upsample_loss_bwd"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SINGLE_C = 64  # up to this (padded) class count: one chunk, class statistics in registers
_CHUNK_C = 32  # classes per chunk beyond it (online softmax)
# Logits per tile: each is 4 gathered corners with their 64-bit addresses, so 4 per thread at
# 4 warps keeps the tile in registers (2048 spilled hundreds of bytes per thread on sm_90).
_TILE = 512
_WARPS_PER_SM = 16
_WAVES = 8
_INTERPRET_TILE_SCALE = 32  # the interpreter's cost is per tile: larger tiles there
_INTERPRET_PROGRAMS = 3


def _interpret():
    import os
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available():
    """Whether the kernels can run here (a GPU, or the interpreter on CPU tensors)."""
    return triton is not None and (torch.cuda.is_available() or _interpret())


def supports(x):
    if triton is None or x.dtype not in _FLOATS:
        return False
    return x.is_cuda or (x.device.type == "cpu" and _interpret())


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _np2(n):
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a, b):
    return -(-a // b)


# --- the interpolation tables ------------------------------------------------------------------

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
        return s, s, torch.ones(n_out, dtype=dtype, device=device), torch.zeros(n_out, dtype=dtype, device=device)
    if n_out == n_in:  # scale factor 1 is a copy
        s = d.to(torch.int32)
        return s, s, torch.ones(n_out, dtype=dtype, device=device), torch.zeros(n_out, dtype=dtype, device=device)
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


def _f32(v):
    """v rounded to float32 (a float32 +, -, *, / of float32 operands computed in double and rounded
    once is the correctly rounded float32 result)."""
    return struct.unpack("f", struct.pack("f", v))[0]


@functools.lru_cache(maxsize=256)
def _span(n_in, n_out, interp, align_corners, f64):
    """The most output indices that read one source index: the indices of :func:`_axis`, computed
    on the host in plain Python with the same roundings, so a launch needs no device sync."""
    if n_out == n_in:
        return 1
    r = (lambda v: v) if f64 else _f32
    i0 = []
    for d in range(n_out):
        if interp == Interp.NEAREST:
            i = d // 2 if n_out == 2 * n_in else min(math.floor(_f32(float(d) * _f32(n_in / n_out))), n_in - 1)
        else:
            if align_corners:
                src = r(r((n_in - 1) / (n_out - 1)) * d) if n_out > 1 else 0.0
            else:
                src = max(r(r(r(n_in / n_out) * r(d + 0.5)) - 0.5), 0.0)
            i = min(math.floor(_f32(src)), n_in - 1)
        i0.append(i)
    users = [0] * n_in
    for i in i0:
        users[i] += 1
        if interp != Interp.NEAREST and i < n_in - 1:
            users[i + 1] += 1
    return max(users)


def _users(i0, i1, n_in):
    """(first, end) output index of the outputs that read each source index: [first, end)."""
    src = torch.arange(n_in, dtype=torch.int32, device=i0.device)
    return (torch.searchsorted(i1, src, right=False).to(torch.int32),
            torch.searchsorted(i0, src, right=True).to(torch.int32))


if triton is not None:
    _BIG = tl.constexpr(2147483647)

    @triton.jit
    def _log1p_small(e):
        # log(1 + e) for e in [0, 1]: Kahan's form keeps the digits of a tiny e
        w = 1.0 + e
        return tl.where(w == 1.0, e, tl.log(w) * e / (w - 1.0))

    @triton.jit
    def _lse(m, s):
        return tl.where(m == float("-inf"), 0.0, m) + tl.log(s)

    @triton.jit
    def _pixel_geometry(n, pmask, HW, W, ay0_ptr, ay1_ptr, wy0_ptr, wy1_ptr, ax0_ptr, ax1_ptr, wx0_ptr, wx1_ptr,
                        stride_b, stride_h, stride_w, acc_ty: tl.constexpr, NEAREST: tl.constexpr):
        """Offsets of the low-resolution neighbours of full-resolution pixels n and their weights."""
        b = n // HW
        r = n - b * HW
        Y = r // W
        X = r - Y * W
        y0 = tl.load(ay0_ptr + Y, mask=pmask, other=0).to(tl.int64)
        x0 = tl.load(ax0_ptr + X, mask=pmask, other=0).to(tl.int64)
        base = b * stride_b
        o00 = base + y0 * stride_h + x0 * stride_w  # int64: B*C*h*w can exceed 2**31
        if NEAREST:
            one = tl.full(n.shape, 1.0, acc_ty)
            return o00, o00, o00, o00, one, one, one, one
        y1 = tl.load(ay1_ptr + Y, mask=pmask, other=0).to(tl.int64)
        x1 = tl.load(ax1_ptr + X, mask=pmask, other=0).to(tl.int64)
        wy0 = tl.load(wy0_ptr + Y, mask=pmask, other=0.0)
        wy1 = tl.load(wy1_ptr + Y, mask=pmask, other=0.0)
        wx0 = tl.load(wx0_ptr + X, mask=pmask, other=0.0)
        wx1 = tl.load(wx1_ptr + X, mask=pmask, other=0.0)
        o01 = base + y0 * stride_h + x1 * stride_w
        o10 = base + y1 * stride_h + x0 * stride_w
        o11 = base + y1 * stride_h + x1 * stride_w
        return o00, o01, o10, o11, wy0, wy1, wx0, wx1

    @triton.jit
    def _interp_chunk(x_ptr, o00, o01, o10, o11, wy0, wy1, wx0, wx1, pmask, c0, C, stride_c,
                      BLOCK_C: tl.constexpr, acc_ty: tl.constexpr, NEAREST: tl.constexpr):
        """Interpolated logits of a tile's pixels x classes c0 .. c0 + BLOCK_C (-inf outside)."""
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        m2 = pmask[:, None] & cmask[None, :]
        co = c.to(tl.int64)[None, :] * stride_c
        v00 = tl.load(x_ptr + (o00[:, None] + co), mask=m2, other=0.0).to(acc_ty)
        if NEAREST:
            v = v00
        else:
            v01 = tl.load(x_ptr + (o01[:, None] + co), mask=m2, other=0.0).to(acc_ty)
            v10 = tl.load(x_ptr + (o10[:, None] + co), mask=m2, other=0.0).to(acc_ty)
            v11 = tl.load(x_ptr + (o11[:, None] + co), mask=m2, other=0.0).to(acc_ty)
            # torch's order: the horizontal pass of each row, then the rows
            h0 = v00 * wx0[:, None] + v01 * wx1[:, None]
            h1 = v10 * wx0[:, None] + v11 * wx1[:, None]
            v = h0 * wy0[:, None] + h1 * wy1[:, None]
        return tl.where(m2, v, float("-inf")), c, cmask

    @triton.jit
    def _argmax_step(x, cmax, c0, best_v, best_i, nan_i, BLOCK_C: tl.constexpr):
        """Running argmax over chunks: first index on ties, NaN the maximum (torch.argmax)."""
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
        """Online softmax over one chunk, relative to ms = m (0 while all logits are -inf):
        s = Σ e_k, rest = Σ_{k≠y} e_k, s2r = Σ_{k≠y} e_k², xy = x_y."""
        m_new = tl.maximum(m, cmax)
        ms_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - ms_new)
        e = tl.exp(x - ms_new[:, None])
        e_rest = tl.where(oh, 0.0, e)
        s = s * alpha + tl.sum(e, 1)
        rest = rest * alpha + tl.sum(e_rest, 1)
        if NEED_S2:
            s2r = s2r * (alpha * alpha) + tl.sum(e_rest * e_rest, 1)
        xy = xy + tl.sum(tl.where(oh, x, 0.0), 1)
        return m_new, s, rest, s2r, xy

    @triton.jit
    def _sigmoid_focal_terms(x, oh, gamma, FOCAL: tl.constexpr):
        """FL_k = σ(z)^γ softplus(z), z = x_k (k ≠ y), -x_y (k = y); padding (-inf) gives 0."""
        z = tl.where(oh, -x, x)
        l = _log1p_small(tl.exp(-tl.abs(z)))
        sp = tl.maximum(z, 0.0) + l
        if FOCAL:
            sp = tl.exp(-gamma * (tl.maximum(-z, 0.0) + l)) * sp
        return sp

    @triton.jit
    def _sigmoid_focal_grad(x, oh, gamma, FOCAL: tl.constexpr):
        """∂ℓ/∂x_k of the sigmoid focal loss: ±σ(z)^γ (γ σ(-z) sp(z) + σ(z))."""
        z = tl.where(oh, -x, x)
        e = tl.exp(-tl.abs(z))
        w1 = 1.0 + e
        pos = z >= 0.0
        sig = tl.where(pos, 1.0, e) / w1
        if FOCAL:
            l = _log1p_small(e)
            sp = tl.maximum(z, 0.0) + l
            sig_neg = tl.where(pos, e, 1.0) / w1
            d = tl.exp(-gamma * (tl.maximum(-z, 0.0) + l)) * (gamma * sig_neg * sp + sig)
        else:
            d = sig
        return tl.where(oh, -d, d)

    @triton.jit
    def _pixel_state(x_ptr, o00, o01, o10, o11, wy0, wy1, wx0, wx1, pmask, y32, tv, C, stride_c, gamma,
                     acc_ty: tl.constexpr, MODE: tl.constexpr, FOCAL: tl.constexpr, NEED_ARGMAX: tl.constexpr,
                     SINGLE: tl.constexpr, NEAREST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """One pass over the classes of a tile's interpolated logits: the softmax state, the
        per-pixel sums of the elementwise modes and the argmax."""
        m = tl.full([BLOCK_P], float("-inf"), acc_ty)
        ssum = tl.zeros([BLOCK_P], acc_ty)
        rest = tl.zeros([BLOCK_P], acc_ty)
        s2r = tl.zeros([BLOCK_P], acc_ty)
        xy = tl.zeros([BLOCK_P], acc_ty)
        lsum = tl.zeros([BLOCK_P], acc_ty)
        best_v = tl.full([BLOCK_P], float("-inf"), acc_ty)
        best_i = tl.zeros([BLOCK_P], tl.int32)
        nan_i = tl.full([BLOCK_P], _BIG, tl.int32)
        for c0 in range(0, C, BLOCK_C):  # one chunk when SINGLE (C <= BLOCK_C)
            x, c, cmask = _interp_chunk(x_ptr, o00, o01, o10, o11, wy0, wy1, wx0, wx1, pmask, c0, C, stride_c,
                                        BLOCK_C, acc_ty, NEAREST)
            oh = c[None, :] == y32[:, None]
            cmax = tl.max(x, 1)
            if NEED_ARGMAX:
                best_v, best_i, nan_i = _argmax_step(x, cmax, c0, best_v, best_i, nan_i, BLOCK_C)
            if MODE == 0 or MODE == 3:
                m, ssum, rest, s2r, xy = _softmax_step(x, oh, cmax, m, ssum, rest, s2r, xy, MODE == 3)
            elif MODE == 1:
                lsum += tl.sum(_sigmoid_focal_terms(x, oh, gamma, FOCAL), 1)
            elif MODE == 2:
                d = x - tl.where(oh, tv[:, None], 0.0)
                lsum += tl.sum(tl.where(cmask[None, :], d * d, 0.0), 1)
        am = tl.where(nan_i < _BIG, nan_i, best_i)
        return m, ssum, rest, s2r, xy, lsum, am

    @triton.jit
    def _labels(t_ptr, n, pmask, ignore_index, C):
        y = tl.load(t_ptr + n, mask=pmask, other=0).to(tl.int64)  # widen before comparing
        keep = pmask & (y != ignore_index)
        inr = (y >= 0) & (y < C)
        valid = keep & inr
        return valid, keep & ~inr, tl.where(valid, y, 0).to(tl.int32)

    @triton.jit
    def _up_fwd_kernel(
        x_ptr,  # low-resolution logits, element (b, c, y, x) at b*sb + c*sc + y*sh + x*sw
        t_ptr,  # (N,) labels, any integer dtype; pixel n = (b*H + Y)*W + X
        ay0_ptr, ay1_ptr, wy0_ptr, wy1_ptr,  # (H,) row source indices (int32) and weights
        ax0_ptr, ax1_ptr, wx0_ptr, wx1_ptr,  # (W,) column source indices and weights
        tv_ptr,  # (C,) MSE target values (accumulation dtype)
        pl_ptr,  # (N,) per-pixel loss out (STORE_PL); its dtype sets the arithmetic
        part_ptr,  # (programs, C) per-program class-loss rows out (PARTIALS)
        cnt_ptr,  # (C,) int64 valid pixels per class, added into
        tp_ptr,  # (C,) int64 valid pixels whose argmax is their label, added into
        bad_ptr,  # () int64 labels outside [0, C) that are not ignore_index, added into
        conf_ptr,  # (C, C) int64 confusion [label, argmax], added into (CONF)
        N, C, HW, W,  # pixels, classes, pixels per image, columns
        num_tiles, per_prog,  # pixel tiles, consecutive tiles per program
        stride_b, stride_c, stride_h, stride_w,  # logits strides, in elements
        ignore_index, gamma,
        MODE: tl.constexpr, FOCAL: tl.constexpr, NEAREST: tl.constexpr,
        STORE_PL: tl.constexpr,  # write the per-pixel loss
        SINGLE: tl.constexpr,  # C <= BLOCK_C
        PARTIALS: tl.constexpr,  # class statistics in registers (SINGLE)
        NEED_ARGMAX: tl.constexpr,  # tp or confusion asked
        CONF: tl.constexpr,  # confusion asked
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        acc_ty = pl_ptr.dtype.element_ty
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        if PARTIALS:
            loss_acc = tl.zeros([BLOCK_C], acc_ty)
            cnt_acc = tl.zeros([BLOCK_C], tl.int32)
            tp_acc = tl.zeros([BLOCK_C], tl.int32)
        bad_acc = tl.zeros([BLOCK_P], tl.int32)
        one = tl.full([BLOCK_P], 1, tl.int64)
        for t in range(pid * per_prog, tl.minimum(pid * per_prog + per_prog, num_tiles)):
            n = tl.cast(t, tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # int64: B*H*W can exceed 2**31
            pmask = n < N
            valid, bad, y32 = _labels(t_ptr, n, pmask, ignore_index, C)
            bad_acc += bad.to(tl.int32)
            o00, o01, o10, o11, wy0, wy1, wx0, wx1 = _pixel_geometry(
                n, pmask, HW, W, ay0_ptr, ay1_ptr, wy0_ptr, wy1_ptr, ax0_ptr, ax1_ptr, wx0_ptr, wx1_ptr,
                stride_b, stride_h, stride_w, acc_ty, NEAREST)
            tv = tl.zeros([BLOCK_P], acc_ty)
            if MODE == 2 or MODE == 3:
                tv = tl.load(tv_ptr + y32, mask=valid, other=0.0).to(acc_ty)
            m, ssum, rest, s2r, xy, lsum, am = _pixel_state(
                x_ptr, o00, o01, o10, o11, wy0, wy1, wx0, wx1, pmask, y32, tv, C, stride_c, gamma,
                acc_ty, MODE, FOCAL, NEED_ARGMAX, SINGLE, NEAREST, BLOCK_P, BLOCK_C)
            if MODE == 0:
                logp = xy - _lse(m, ssum)
                if FOCAL:
                    loss = -tl.exp(gamma * tl.log(rest / ssum)) * logp  # (1 - p_y)^γ, 0 at p_y = 1
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
                if MODE != 4:
                    oh = cols[None, :] == y32[:, None]
                    loss_acc += tl.sum(tl.where(oh, lv[:, None], 0.0), 0)
                cnt_acc += tl.histogram(y32, BLOCK_C, mask=valid)
                if NEED_ARGMAX:
                    tp_acc += tl.histogram(y32, BLOCK_C, mask=hit)
            else:
                tl.atomic_add(cnt_ptr + y32, one, mask=valid, sem="relaxed")
                if NEED_ARGMAX:
                    tl.atomic_add(tp_ptr + y32, one, mask=hit, sem="relaxed")
            if CONF:  # integer counts: exact in any order
                tl.atomic_add(conf_ptr + (y32.to(tl.int64) * C + am), one, mask=valid, sem="relaxed")
        if PARTIALS:
            cmask = cols < C
            tl.store(part_ptr + pid * C + cols, loss_acc, mask=cmask)  # a fixed row per program
            tl.atomic_add(cnt_ptr + cols, cnt_acc.to(tl.int64), mask=cmask & (cnt_acc > 0), sem="relaxed")
            if NEED_ARGMAX:
                tl.atomic_add(tp_ptr + cols, tp_acc.to(tl.int64), mask=cmask & (tp_acc > 0), sem="relaxed")
        nbad = tl.sum(bad_acc, 0)
        tl.atomic_add(bad_ptr, nbad.to(tl.int64), mask=nbad > 0, sem="relaxed")

    @triton.jit
    def _up_class_sum_kernel(
        t_ptr,  # (N,) labels
        pl_ptr,  # (N,) per-pixel loss, 0 at ignored and bad pixels
        part_ptr,  # (segments, C) out: Σ pl over each segment's pixels of class c
        N, C, per_seg,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # deterministic per-class sums: every (class block, segment) adds its pixels in order
        kb = tl.program_id(0)
        seg = tl.program_id(1)
        ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_K], pl_ptr.dtype.element_ty)
        start = seg.to(tl.int64) * per_seg
        for i in range(0, per_seg, BLOCK_N):
            n = start + i + tl.arange(0, BLOCK_N)
            nm = n < N
            y = tl.load(t_ptr + n, mask=nm, other=0).to(tl.int32)  # a bad label carries pl = 0
            v = tl.load(pl_ptr + n, mask=nm, other=0.0)
            acc += tl.sum(tl.where(y[:, None] == ks[None, :], v[:, None], 0.0), 0)
        tl.store(part_ptr + seg * C + ks, acc, mask=ks < C)

    @triton.jit
    def _up_coef_kernel(
        x_ptr, t_ptr,
        ay0_ptr, ay1_ptr, wy0_ptr, wy1_ptr, ax0_ptr, ax1_ptr, wx0_ptr, wx1_ptr,
        tv_ptr,  # (C,) MSE target values, accumulation dtype (a dummy of that dtype otherwise)
        gp_ptr,  # (N,) upstream gradient of the per-pixel loss (HAS_GP)
        gc_ptr,  # (C,) upstream gradient of the class-loss sums (HAS_GC)
        coef_ptr,  # (N,) out: a per full-resolution pixel (0 where not valid)
        lse_ptr,  # (N,) out: lse (softmax modes)
        q_ptr,  # (N,) out: q (MSE on the softmax)
        N, C, HW, W,
        stride_b, stride_c, stride_h, stride_w,
        gp_stride, gc_stride,  # upstream strides (0 when autograd expands a scalar)
        ignore_index, gamma,
        MODE: tl.constexpr, FOCAL: tl.constexpr, NEAREST: tl.constexpr,
        HAS_GP: tl.constexpr, HAS_GC: tl.constexpr, SINGLE: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        acc_ty = tv_ptr.dtype.element_ty
        n = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = n < N
        valid, bad, y32 = _labels(t_ptr, n, pmask, ignore_index, C)
        w = tl.zeros([BLOCK_P], acc_ty)
        if HAS_GP:
            w += tl.load(gp_ptr + n * gp_stride, mask=valid, other=0.0).to(acc_ty)
        if HAS_GC:
            w += tl.load(gc_ptr + y32 * gc_stride, mask=valid, other=0.0).to(acc_ty)
        a = w
        lse = tl.zeros([BLOCK_P], acc_ty)
        q = tl.zeros([BLOCK_P], acc_ty)
        if MODE == 0 or MODE == 3:
            tv = tl.zeros([BLOCK_P], acc_ty)
            if MODE == 3:
                tv = tl.load(tv_ptr + y32, mask=valid, other=0.0).to(acc_ty)
            o00, o01, o10, o11, wy0, wy1, wx0, wx1 = _pixel_geometry(
                n, pmask, HW, W, ay0_ptr, ay1_ptr, wy0_ptr, wy1_ptr, ax0_ptr, ax1_ptr, wx0_ptr, wx1_ptr,
                stride_b, stride_h, stride_w, acc_ty, NEAREST)
            m, s, rest, s2r, xy, lsum, am = _pixel_state(
                x_ptr, o00, o01, o10, o11, wy0, wy1, wx0, wx1, pmask, y32, tv, C, stride_c, gamma,
                acc_ty, MODE, FOCAL, False, SINGLE, NEAREST, BLOCK_P, BLOCK_C)
            lse = _lse(m, s)
            logp = xy - lse
            if MODE == 0:
                if FOCAL:
                    # ∂ℓ/∂log p = -(1-p)^γ (1 - γ p log p / (1-p)); log p / (1-p) -> -1 as p -> 1
                    omp = rest / s
                    wf = tl.exp(gamma * tl.log(omp))
                    r = tl.where(omp > 0.0, logp / omp, -1.0)
                    a = -w * wf * (1.0 - gamma * tl.exp(logp) * r)
                else:
                    a = -w
            else:
                py = tl.exp(logp)
                q = s2r / (s * s) + py * py - tv * py  # Σ_j p_j (p_j - t_j)
        a = tl.where(valid, a, 0.0)
        tl.store(coef_ptr + n, a, mask=pmask)
        if MODE == 0 or MODE == 3:
            tl.store(lse_ptr + n, lse, mask=pmask)
        if MODE == 3:
            tl.store(q_ptr + n, q, mask=pmask)

    @triton.jit
    def _up_gather_kernel(
        x_ptr, t_ptr,
        ay0_ptr, ay1_ptr, wy0_ptr, wy1_ptr, ax0_ptr, ax1_ptr, wx0_ptr, wx1_ptr,
        uy0_ptr, uy1_ptr,  # (h,) rows [uy0, uy1) of the output that read low-resolution row y
        ux0_ptr, ux1_ptr,  # (w,) columns [ux0, ux1) that read low-resolution column x
        tv_ptr,  # (C,) MSE target values
        coef_ptr, lse_ptr, q_ptr,  # (N,) a, lse, q per full-resolution pixel
        g_ptr,  # gradient out, x's dtype, element (b, c, y, x) at b*gsb + c*gsc + y*gsh + x*gsw
        N, C, H, W, h, w, nq,  # nq = B*h*w low-resolution positions
        stride_b, stride_c, stride_h, stride_w,
        gstride_b, gstride_c, gstride_h, gstride_w,
        ignore_index, gamma,
        span_y,  # the most rows that read one low-resolution row
        MODE: tl.constexpr, FOCAL: tl.constexpr, NEAREST: tl.constexpr,
        SPAN_X: tl.constexpr,  # a power of two >= the most columns that read one low-resolution column
        BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # Lanes are (element q, column offset dx) pairs, q-major: lane group q visits the columns
        # X0[q] + dx of its users in parallel and the rows Y0[q] + dy one after another; the
        # SPAN_X partial sums of a group are added by one fixed reduction tree at the end.
        acc_ty = tv_ptr.dtype.element_ty
        BLOCK_L: tl.constexpr = BLOCK_Q * SPAN_X
        lane = tl.arange(0, BLOCK_L)
        q_idx = tl.program_id(0).to(tl.int64) * BLOCK_Q + lane // SPAN_X
        dx = lane % SPAN_X
        qmask = q_idx < nq
        b = q_idx // (h * w)
        r = q_idx - b * (h * w)
        ys = (r // w).to(tl.int32)
        xs = (r - (r // w) * w).to(tl.int32)
        Y0 = tl.load(uy0_ptr + ys, mask=qmask, other=0)
        Y1 = tl.load(uy1_ptr + ys, mask=qmask, other=0)
        X = tl.load(ux0_ptr + xs, mask=qmask, other=0) + dx
        xmask = qmask & (X < tl.load(ux1_ptr + xs, mask=qmask, other=0))
        # the weight of column X on column xs: both taps when they coincide (the last column)
        rx0 = tl.load(ax0_ptr + X, mask=xmask, other=-1)
        if NEAREST:
            wx = tl.where(rx0 == xs, 1.0, 0.0).to(acc_ty)
        else:
            rx1 = tl.load(ax1_ptr + X, mask=xmask, other=-1)
            wx = (tl.where(rx0 == xs, tl.load(wx0_ptr + X, mask=xmask, other=0.0), 0.0)
                  + tl.where(rx1 == xs, tl.load(wx1_ptr + X, mask=xmask, other=0.0), 0.0))
        qo = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        bo = qo // (h * w)
        ro = qo - bo * (h * w)
        goff = bo * gstride_b + (ro // w) * gstride_h + (ro - (ro // w) * w) * gstride_w  # int64
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C
            acc = tl.zeros([BLOCK_L, BLOCK_C], acc_ty)
            for dy in range(0, span_y):
                Y = Y0 + dy
                pmask = xmask & (Y < Y1)
                ry0 = tl.load(ay0_ptr + Y, mask=pmask, other=-1)
                if NEAREST:
                    wy = tl.where(ry0 == ys, 1.0, 0.0).to(acc_ty)
                else:
                    ry1 = tl.load(ay1_ptr + Y, mask=pmask, other=-1)
                    wy = (tl.where(ry0 == ys, tl.load(wy0_ptr + Y, mask=pmask, other=0.0), 0.0)
                          + tl.where(ry1 == ys, tl.load(wy1_ptr + Y, mask=pmask, other=0.0), 0.0))
                n = (b * H + Y) * W + X  # int64: B*H*W can exceed 2**31
                a = tl.load(coef_ptr + n, mask=pmask, other=0.0)  # 0 at ignored and bad pixels
                yl = tl.load(t_ptr + n, mask=pmask, other=0).to(tl.int64)
                y32 = tl.where((yl >= 0) & (yl < C), yl, 0).to(tl.int32)
                o00, o01, o10, o11, wy0, wy1, wx0, wx1 = _pixel_geometry(
                    n, pmask, H * W, W, ay0_ptr, ay1_ptr, wy0_ptr, wy1_ptr, ax0_ptr, ax1_ptr, wx0_ptr,
                    wx1_ptr, stride_b, stride_h, stride_w, acc_ty, NEAREST)
                x, cc, cm = _interp_chunk(x_ptr, o00, o01, o10, o11, wy0, wy1, wx0, wx1, pmask, c0, C,
                                          stride_c, BLOCK_C, acc_ty, NEAREST)
                oh = c[None, :] == y32[:, None]
                if MODE == 0:
                    lse = tl.load(lse_ptr + n, mask=pmask, other=0.0)
                    p = tl.exp(x - lse[:, None])
                    g = a[:, None] * (tl.where(oh, 1.0, 0.0) - p)
                elif MODE == 3:
                    lse = tl.load(lse_ptr + n, mask=pmask, other=0.0)
                    qv = tl.load(q_ptr + n, mask=pmask, other=0.0)
                    tv = tl.load(tv_ptr + y32, mask=pmask, other=0.0).to(acc_ty)
                    p = tl.exp(x - lse[:, None])
                    g = a[:, None] * p * (p - tl.where(oh, tv[:, None], 0.0) - qv[:, None])
                elif MODE == 1:
                    g = a[:, None] * _sigmoid_focal_grad(x, oh, gamma, FOCAL)
                else:
                    tv = tl.load(tv_ptr + y32, mask=pmask, other=0.0).to(acc_ty)
                    g = a[:, None] * (x - tl.where(oh, tv[:, None], 0.0))
                g = tl.where(pmask[:, None] & cmask[None, :], g, 0.0)
                acc += (wy * wx)[:, None] * g
            out = tl.sum(tl.reshape(acc, [BLOCK_Q, SPAN_X, BLOCK_C]), 1)
            gptrs = g_ptr + (goff[:, None] + c.to(tl.int64)[None, :] * gstride_c)
            tl.store(gptrs, out.to(g_ptr.dtype.element_ty), mask=(qo < nq)[:, None] & cmask[None, :])


# --- launchers ---------------------------------------------------------------------------------

def _tables(x, H, W, interp, align_corners):
    acc = _acc_dtype(x)
    h, w = x.shape[2], x.shape[3]
    ay = _axis(h, H, interp, align_corners, acc, x.device)
    ax = _axis(w, W, interp, align_corners, acc, x.device)
    return ay, ax


def _chunking(C, f64):
    bc = _np2(C)
    if bc <= _SINGLE_C:
        block_c, single = bc, True
    else:
        block_c, single = _CHUNK_C, False
    tile = _TILE // 2 if f64 else _TILE
    return block_c, single, tile


def _programs(num_tiles, num_warps, device):
    """(programs, tiles per program): a fixed run of consecutive tiles per program, so the
    per-program rows (and their fixed-order sum) do not depend on timing."""
    if device.type == "cuda":
        cap = torch.cuda.get_device_properties(device).multi_processor_count * max(1, _WARPS_PER_SM // num_warps)
        cap *= _WAVES
    else:
        cap = _INTERPRET_PROGRAMS
    per_prog = _cdiv(num_tiles, max(1, min(num_tiles, cap)))
    return _cdiv(num_tiles, per_prog), per_prog


def _class_sums(target, pl, C):
    N = pl.numel()
    block_k, block_n = min(_np2(C), 64), 128
    nseg = max(1, min(64, N // 4096))
    per_seg = _cdiv(_cdiv(N, nseg), block_n) * block_n
    nseg = _cdiv(N, per_seg)
    part = pl.new_empty((nseg, C))
    wrap(_up_class_sum_kernel)[(_cdiv(C, block_k), nseg)](
        target, pl, part, N, C, per_seg, BLOCK_N=block_n, BLOCK_K=block_k)
    return part.sum(0)


def _check(x, target, interp, loss_mode, gamma):
    if x.dim() != 4 or target.dim() != 3 or target.shape[0] != x.shape[0]:
        raise ValueError(f"upsampled losses take (B, C, h, w) logits and (B, H, W) labels, got "
                         f"{tuple(x.shape)} and {tuple(target.shape)}")
    if interp not in (Interp.NEAREST, Interp.BILINEAR):
        raise ValueError(f"unknown interpolation {interp}")
    if not 0 <= loss_mode <= int(Mode.STATS):
        raise ValueError(f"unknown mode {loss_mode}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"logits must be float16/bfloat16/float32/float64, got {x.dtype}")


def _forward(x, target, interp, align_corners, mode, gamma, tvals, ignore_index, need_pixel_loss, need_tp,
             need_confusion):
    _check(x, target, interp, mode, gamma)
    mode = Mode(mode)
    acc = _acc_dtype(x)
    B, C, h, w = x.shape
    H, W = target.shape[1], target.shape[2]
    N = B * H * W
    t = target.reshape(-1).contiguous()
    count = x.new_zeros(C, dtype=torch.int64)
    tp = x.new_zeros(C, dtype=torch.int64)
    bad = x.new_zeros((), dtype=torch.int64)
    confusion = x.new_zeros((C, C) if need_confusion else (0, 0), dtype=torch.int64)
    if N == 0 or x.numel() == 0:
        return (x.new_zeros(N if need_pixel_loss else 0, dtype=acc), x.new_zeros(C, dtype=acc), count,
                tp if need_tp else tp.new_empty(0), bad, confusion)
    has_loss = mode != Mode.STATS
    block_c, single, tile = _chunking(C, acc == torch.float64)
    block_p = max(8, tile // block_c)
    num_warps = 4
    if _interpret():
        block_p *= _INTERPRET_TILE_SCALE
    block_p = min(block_p, _np2(N))
    num_tiles = _cdiv(N, block_p)
    programs, per_prog = _programs(num_tiles, num_warps, x.device)
    partials = single
    store_pl = need_pixel_loss or (has_loss and not partials)
    (ay0, ay1, wy0, wy1), (ax0, ax1, wx0, wx1) = _tables(x, H, W, interp, align_corners)
    pl = x.new_empty(N if store_pl else 1, dtype=acc)
    part = x.new_empty((programs, C) if partials else (1,), dtype=acc)
    with _on(x):
        wrap(_up_fwd_kernel)[(programs,)](
            x, t, ay0, ay1, wy0, wy1, ax0, ax1, wx0, wx1, tvals if tvals is not None else part, pl, part,
            count, tp, bad, confusion if need_confusion else count,
            N, C, H * W, W, num_tiles, per_prog, x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            ignore_index, gamma,
            MODE=int(mode), FOCAL=gamma != 0 and mode in (Mode.SOFTMAX_FOCAL, Mode.SIGMOID_FOCAL),
            NEAREST=interp == Interp.NEAREST, STORE_PL=store_pl, SINGLE=single, PARTIALS=partials,
            NEED_ARGMAX=need_tp or need_confusion, CONF=need_confusion,
            BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)
        if not has_loss:
            class_loss = x.new_zeros(C, dtype=acc)
        elif partials:
            class_loss = part.sum(0)
        else:
            class_loss = _class_sums(t, pl, C)
    pixel_loss = pl if need_pixel_loss else x.new_zeros(0, dtype=acc)
    return pixel_loss, class_loss, count, tp if need_tp else tp.new_empty(0), bad, confusion


def _backward(x, target, grad_pixel, grad_class, interp, align_corners, mode, gamma, tvals, ignore_index):
    _check(x, target, interp, mode, gamma)
    mode = Mode(mode)
    B, C, h, w = x.shape
    H, W = target.shape[1], target.shape[2]
    N = B * H * W
    if (grad_pixel is None and grad_class is None) or mode == Mode.STATS or x.numel() == 0 or N == 0:
        return torch.zeros_like(x)
    acc = _acc_dtype(x)
    t = target.reshape(-1).contiguous()
    grad = torch.empty_like(x)  # the shape, dtype and memory format of x
    block_c, single, tile = _chunking(C, acc == torch.float64)
    nearest = interp == Interp.NEAREST
    (ay0, ay1, wy0, wy1), (ax0, ax1, wx0, wx1) = _tables(x, H, W, interp, align_corners)
    uy0, uy1 = _users(ay0, ay1, h)
    ux0, ux1 = _users(ax0, ax1, w)
    dummy = tvals if tvals is not None else x.new_empty(1, dtype=acc)  # its dtype sets the arithmetic
    # O(B·H·W) scratch, what the mode needs: a; lse for the softmax modes; q for the softmax MSE
    coef = x.new_empty(N, dtype=acc)
    lse = x.new_empty(N if mode in (Mode.SOFTMAX_FOCAL, Mode.MSE_SOFTMAX) else 1, dtype=acc)
    q = x.new_empty(N if mode == Mode.MSE_SOFTMAX else 1, dtype=acc)
    focal = gamma != 0 and mode in (Mode.SOFTMAX_FOCAL, Mode.SIGMOID_FOCAL)
    block_p = max(8, tile // block_c)
    if _interpret():
        block_p *= _INTERPRET_TILE_SCALE
    block_p = min(block_p, _np2(N))
    # the gather kernel's tile: (element, column offset) lanes, about as many as the forward's pixels
    f64 = acc == torch.float64
    span_x = _np2(_span(w, W, interp, align_corners, f64))
    span_y = _span(h, H, interp, align_corners, f64)
    nq = B * h * w
    block_q = max(1, max(8, tile // block_c) // span_x)
    if _interpret():
        block_q *= _INTERPRET_TILE_SCALE
    block_q = min(_np2(block_q), _np2(nq))
    with _on(x):
        wrap(_up_coef_kernel)[(_cdiv(N, block_p),)](
            x, t, ay0, ay1, wy0, wy1, ax0, ax1, wx0, wx1, dummy,
            grad_pixel if grad_pixel is not None else dummy,
            grad_class if grad_class is not None else dummy, coef, lse, q,
            N, C, H * W, W, x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            grad_pixel.stride(0) if grad_pixel is not None else 0,
            grad_class.stride(0) if grad_class is not None else 0,
            ignore_index, gamma,
            MODE=int(mode), FOCAL=focal, NEAREST=nearest, HAS_GP=grad_pixel is not None,
            HAS_GC=grad_class is not None, SINGLE=single, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
        wrap(_up_gather_kernel)[(_cdiv(nq, block_q),)](
            x, t, ay0, ay1, wy0, wy1, ax0, ax1, wx0, wx1, uy0, uy1, ux0, ux1, dummy, coef, lse, q, grad,
            N, C, H, W, h, w, nq, x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3), ignore_index, gamma, span_y,
            MODE=int(mode), FOCAL=focal, NEAREST=nearest, SPAN_X=span_x, BLOCK_Q=block_q, BLOCK_C=block_c,
            num_warps=4)
    return grad


class _on:
    """``torch.cuda.device(x.device)`` for CUDA logits, nothing otherwise."""

    def __init__(self, x):
        self.ctx = torch.cuda.device(x.device) if x.is_cuda else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)


if triton is not None:

    @torch.library.triton_op("fused_imbalance::triton_upsample_loss_fwd", mutates_args=())
    def upsample_loss_fwd(
        x: torch.Tensor,
        target: torch.Tensor,
        interp: int,
        align_corners: bool,
        loss_mode: int,
        gamma: float,
        tvals: Optional[torch.Tensor],
        ignore_index: int,
        need_pixel_loss: bool,
        need_tp: bool,
        need_confusion: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _forward(x, target, interp, align_corners, loss_mode, gamma, tvals, ignore_index, need_pixel_loss,
                        need_tp, need_confusion)

    @torch.library.triton_op("fused_imbalance::triton_upsample_loss_bwd", mutates_args=())
    def upsample_loss_bwd(
        x: torch.Tensor,
        target: torch.Tensor,
        grad_pixel: Optional[torch.Tensor],
        grad_class: Optional[torch.Tensor],
        interp: int,
        align_corners: bool,
        loss_mode: int,
        gamma: float,
        tvals: Optional[torch.Tensor],
        ignore_index: int,
    ) -> torch.Tensor:
        return _backward(x, target, grad_pixel, grad_class, interp, align_corners, loss_mode, gamma, tvals,
                         ignore_index)

    register("fused_imbalance::triton_upsample_loss_fwd", "fused_imbalance::triton_upsample_loss_bwd",
             upsample_loss_bwd)
else:
    upsample_loss_fwd = None
    upsample_loss_bwd = None
