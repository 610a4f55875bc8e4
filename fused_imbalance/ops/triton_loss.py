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
from typing import Optional

import torch

from . import Mode, fwd_fake, pixel_view
from ._args import check_tensor_args
from ._autograd import register_loss_autograd
from ._triton_host import (_FLOATS, _acc_dtype, _cdiv, _focal, _interpret, _np2,  # noqa: F401
                           _on_device, available, supports)

try:
    import triton

    from ._triton_compat import wrap
    from .triton_kernels import (_bwd_chunked_kernel, _bwd_static_kernel, _class_sum_kernel,
                                 _fwd_chunked_kernel, _fwd_static_kernel)
except ImportError:  # the package works without triton; this backend is then unavailable
    triton = None

_STATIC_C = 256  # up to this class count the classes are a compile-time loop (static kernels)
_REG_STATS_C = 32  # up to this class count the class statistics are per-thread registers
_UNROLL_C = 32  # up to this class count every class is unrolled; beyond, a loop over groups
_LOOP_GROUP = 16  # classes per group of that loop (fewer when registers are short)
_GROUP_VALUES = 96  # logits a thread holds per max/exp group (GROUP x VEC x rows per thread)
_WARPS = 4  # warps per program of the static kernels
_CONF_ROWS_BYTES = 1 << 24  # per-program int32 confusion matrices up to this size in all
_TILE = 4096  # logits per tile of the chunked kernels
_ROW_CHUNK = 4096  # classes per chunk when classes are contiguous (chunked kernels)
_STRIDED_TILE = (32, 64)  # (pixels, classes) per chunk when pixels are contiguous and C is large
_RESIDENT_WARPS = 32  # warps per SM the persistent grid fills (latency hiding)
_ROWSUM_PROGRAMS_PER_SM = 2  # persistent programs per SM when each owns a class-loss row of C
_SUM_BLOCK = 256  # threads per program of the class-sum kernel (one program per SM)
_SUM_K = 4  # classes per step of its zeroing and final reduction
_SUM_SCRATCH_BYTES = 1 << 25  # its per-thread columns of class sums, at most (they live in L2)
# The interpreter runs a tile as whole-array numpy operations and programs one after another,
# so its cost is per tile and per unrolled class: larger tiles there, and still several programs.
_INTERPRET_TILE_SCALE = 8
_INTERPRET_PROGRAMS = 3


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


def _static_plan(C, S, ss, itemsize, mode=Mode.SOFTMAX_FOCAL, need_tp=False):
    """(ROWS, VEC, GROUP, LOOP) of the static kernels.

    Contiguous pixels (NCHW): a thread owns VEC consecutive pixels, one vector load per class
    (4 float32 = 16 bytes; 16-bit logits 4 = 8 bytes: 8 would double the registers and spill;
    2 when true positives are counted and 1 for float64, which spilled with more). Otherwise (channels_last) VEC = 1: a thread owns one pixel whose classes it
    gathers, so that its labels and its logits have the same layout (two pixels per thread made
    Triton convert layouts through shared memory on every tile). GROUP: classes per max/exp group, so that a thread keeps at most
    about ``_GROUP_VALUES`` float32 logits live (half as many float64), split evenly (19
    classes in bfloat16: 10 + 9). Up to ``_UNROLL_C`` classes every group is unrolled; beyond,
    LOOP: a loop over groups of at most ``_LOOP_GROUP`` classes, then the last C % GROUP classes
    unrolled (150 unrolled classes take minutes to compile; a loop of 16 seconds).
    """
    if ss == 1:
        # float64 and true positives (a third set of per-class registers) spilled with more
        vec, rows = (1 if itemsize == 8 else 2 if need_tp else 4), 32 * _WARPS
    else:
        vec, rows = 1, 32 * _WARPS
    per_thread = vec * rows // (32 * _WARPS)
    values = _GROUP_VALUES // (2 if itemsize == 8 else 1)  # a float64 takes two registers
    cap = max(1, values // per_thread)
    loop = C > _UNROLL_C
    if loop:  # C // group >= 2 full groups: the loop stays a loop
        # the sigmoid focal terms hold more temporaries per logit, and a float64 takes two registers:
        # groups of 16 spilled there
        group = min(cap, _LOOP_GROUP // 2 if (mode == Mode.SIGMOID_FOCAL or itemsize == 8) else _LOOP_GROUP)
    else:
        group = _cdiv(C, _cdiv(C, cap))
    if _interpret():
        rows *= _INTERPRET_TILE_SCALE
    rows = max(1, min(rows, _np2(_cdiv(S, vec))))
    return rows, vec, group, loop


def _chunked_plan(C, S, ss, f64):
    """(BLOCK_P, BLOCK_C, single chunk, num_warps) of the chunked kernels (C > _STATIC_C).

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
    if _interpret() and block_p > 1:
        block_p *= _INTERPRET_TILE_SCALE
    return min(block_p, _np2(S)), block_c, single, num_warps


def _programs(num_tiles, num_warps, device, per_sm=None):
    """Programs of a persistent grid: program ``pid`` walks tiles pid, pid + P, ... in order.

    A fixed assignment keeps the per-program rows (and so every sum) deterministic; enough
    programs to fill ``_RESIDENT_WARPS`` warps per SM.
    """
    if device.type == "cuda":
        if per_sm is None:
            per_sm = max(1, _RESIDENT_WARPS // num_warps)
        cap = torch.cuda.get_device_properties(device).multi_processor_count * per_sm
    else:
        cap = _INTERPRET_PROGRAMS
    return max(1, min(num_tiles, cap))


def _class_sums(target, pl, C):
    """Σ of ``pl`` over the pixels of each class, in a fixed order (no float atomics): the O(N)
    class-sum kernel, one program of ``_SUM_BLOCK`` threads per SM (fewer when the columns of C
    sums per thread would exceed ``_SUM_SCRATCH_BYTES``), each thread summing its pixels into its
    own column; the programs' rows summed here."""
    N = pl.numel()
    block = _SUM_BLOCK * (_INTERPRET_TILE_SCALE if _interpret() else 1)
    if pl.device.type == "cuda":
        cap = torch.cuda.get_device_properties(pl.device).multi_processor_count
    else:
        cap = _INTERPRET_PROGRAMS
    # the columns, C x P x block sums, stay within _SUM_SCRATCH_BYTES (fewer programs for large C)
    fit = _SUM_SCRATCH_BYTES // (C * block * pl.element_size())
    P = max(1, min(_cdiv(N, block), cap, fit))
    scratch = pl.new_empty((C, P * block))
    part = pl.new_empty((P, C))
    k = min(_np2(C), _SUM_K * (_INTERPRET_TILE_SCALE if _interpret() else 1))
    wrap(_class_sum_kernel)[(P,)](target, pl, scratch, part, N, C, BLOCK=block, K=k,
                                  num_warps=_SUM_BLOCK // 32)
    return part.sum(0)


def _class_loss(has_loss, in_rows, lrow, target, pl, C):
    """The class-loss sums: the programs' rows summed in a fixed order (deterministic), or the
    per-pixel losses summed per class by the class-sum kernel; None without a loss."""
    if not has_loss:
        return None
    return lrow.sum(0) if in_rows else _class_sums(target, pl, C)


def _forward(x, target, mode, gamma, tvals, ignore_index, need_pixel_loss, need_tp, need_confusion):
    """The forward op's launcher (see the contract in :mod:`fused_imbalance.ops`)."""
    check_tensor_args("triton_loss_fwd", x, target, None, mode, tvals)
    mode = Mode(mode)
    acc = _acc_dtype(x)
    B, C, S, (sb, sc, ss), _ = _geometry(x)
    N = B * S
    has_loss = mode != Mode.STATS
    focal = _focal(mode, gamma)
    empty_conf = x.new_zeros((C, C) if need_confusion else (0, 0), dtype=torch.int64)
    if N == 0:
        return (x.new_zeros(0, dtype=acc), x.new_zeros(C, dtype=acc),
                x.new_zeros(C, dtype=torch.int64),
                x.new_zeros(C if need_tp else 0, dtype=torch.int64), x.new_zeros((), dtype=torch.int64),
                empty_conf)
    with _on_device(x):
        if C <= _STATIC_C:
            out = _forward_static(x, target, mode, gamma, tvals, ignore_index, need_pixel_loss,
                                  need_tp, need_confusion, acc, B, C, S, sb, sc, ss, has_loss, focal)
        else:
            out = _forward_chunked(x, target, mode, gamma, tvals, ignore_index, need_pixel_loss,
                                   need_tp, need_confusion, acc, B, C, S, sb, sc, ss, has_loss, focal)
    pixel_loss, class_loss, count, tp, bad, conf = out
    if not need_pixel_loss:
        pixel_loss = x.new_zeros(0, dtype=acc)
    if not has_loss:
        class_loss = x.new_zeros(C, dtype=acc)
    return (pixel_loss, class_loss, count, tp if need_tp else x.new_zeros(0, dtype=torch.int64), bad,
            conf if need_confusion else empty_conf)


def _forward_static(x, target, mode, gamma, tvals, ignore_index, need_pixel_loss, need_tp,
                    need_confusion, acc, B, C, S, sb, sc, ss, has_loss, focal):
    rows, vec, group, loop = _static_plan(C, S, ss, x.element_size(), mode, need_tp)
    tiles_per_b = _cdiv(S, rows * vec)
    num_tiles = B * tiles_per_b
    P = _programs(num_tiles, _WARPS, x.device)
    reg = C <= _REG_STATS_C
    store_pl = need_pixel_loss or (has_loss and not reg)
    pl = x.new_empty(B * S if store_pl else 1, dtype=acc)  # its dtype sets the arithmetic
    alloc = torch.empty if reg else torch.zeros  # rows written once (registers) or added into
    lrow = x.new_empty((P, C) if reg and has_loss else (1,), dtype=acc)
    crow = alloc((P, C), dtype=torch.int32, device=x.device)
    trow = alloc((P, C) if need_tp else (1,), dtype=torch.int32, device=x.device)
    bad = x.new_empty(P, dtype=torch.int32)
    conf_mode = 0
    conf = x.new_empty(1, dtype=torch.int32)
    if need_confusion:
        conf_mode = 1 if P * C * C * 4 <= _CONF_ROWS_BYTES else 2
        conf = x.new_zeros((P, C, C) if conf_mode == 1 else (C, C),
                           dtype=torch.int32 if conf_mode == 1 else torch.int64)
    tv = tvals if tvals is not None else x.new_empty(1, dtype=acc)
    wrap(_fwd_static_kernel)[(P,)](
        x, target, tv, pl, lrow, crow, trow, bad, conf,
        S, tiles_per_b, num_tiles, sb, sc, ss, ignore_index, gamma, gamma,
        C=C, GROUP=group, LOOP=loop, MODE=int(mode), FOCAL=focal, STORE_PL=store_pl, REG_STATS=reg,
        NEED_TP=need_tp, CONF=conf_mode, ROWS=rows, VEC=vec, num_warps=_WARPS)
    class_loss = _class_loss(has_loss, reg, lrow, target, pl, C)
    count = crow.sum(0, dtype=torch.int64)
    tp = trow.sum(0, dtype=torch.int64) if need_tp else None
    if conf_mode == 1:
        conf = conf.sum(0, dtype=torch.int64)
    return pl, class_loss, count, tp, bad.sum(dtype=torch.int64), conf


def _forward_chunked(x, target, mode, gamma, tvals, ignore_index, need_pixel_loss, need_tp,
                     need_confusion, acc, B, C, S, sb, sc, ss, has_loss, focal):
    block_p, block_c, single, num_warps = _chunked_plan(C, S, ss, acc == torch.float64)
    tiles_per_b = _cdiv(S, block_p)
    num_tiles = B * tiles_per_b
    rowsum = has_loss and block_p == 1
    P = _programs(num_tiles, num_warps, x.device, _ROWSUM_PROGRAMS_PER_SM if rowsum else None)
    store_pl = need_pixel_loss or (has_loss and not rowsum)
    pl = x.new_empty(B * S if store_pl else 1, dtype=acc)  # its dtype sets the arithmetic
    lrow = x.new_zeros((P, C) if rowsum else (1,), dtype=acc)
    count = x.new_zeros(C, dtype=torch.int64)
    tp = x.new_zeros(C if need_tp else 1, dtype=torch.int64)
    bad = x.new_empty(P, dtype=torch.int32)
    conf = x.new_zeros((C, C) if need_confusion else (1,), dtype=torch.int64)
    tv = tvals if tvals is not None else x.new_empty(1, dtype=acc)
    wrap(_fwd_chunked_kernel)[(P,)](
        x, target, tv, pl, lrow, count, tp, bad, conf,
        C, S, tiles_per_b, num_tiles, sb, sc, ss, ignore_index, gamma, gamma,
        MODE=int(mode), FOCAL=focal, STORE_PL=store_pl, ROWSUM=rowsum, NEED_TP=need_tp,
        CONF=need_confusion, SINGLE=single, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)
    class_loss = _class_loss(has_loss, rowsum, lrow, target, pl, C)
    return pl, class_loss, count, tp, bad.sum(dtype=torch.int64), conf


def _backward(x, target, grad_pixel, grad_class, mode, gamma, tvals, ignore_index):
    """The backward op's launcher: (grad_pixel[n] + grad_class[y_n]) * dℓ_n/dx, x's layout."""
    check_tensor_args("triton_loss_bwd", x, target, None, mode, tvals, grad_pixel, grad_class)
    mode = Mode(mode)
    if (grad_pixel is None and grad_class is None) or mode == Mode.STATS or x.numel() == 0:
        return torch.zeros_like(x)
    acc = _acc_dtype(x)
    grad = torch.empty_like(x)
    B, C, S, (sb, sc, ss), (gsb, gsc, gss) = _geometry(x, grad)
    dummy = tvals if tvals is not None else x.new_empty(1, dtype=acc)  # its dtype sets the arithmetic
    gp = grad_pixel if grad_pixel is not None else dummy
    gc = grad_class if grad_class is not None else dummy
    gp_stride = grad_pixel.stride(0) if grad_pixel is not None else 0
    gc_stride = grad_class.stride(0) if grad_class is not None else 0
    focal = _focal(mode, gamma)
    with _on_device(x):
        if C <= _STATIC_C:
            rows, vec, group, loop = _static_plan(C, S, ss, x.element_size(), mode)
            tiles_per_b = _cdiv(S, rows * vec)
            num_tiles = B * tiles_per_b
            wrap(_bwd_static_kernel)[(_programs(num_tiles, _WARPS, x.device),)](
                x, target, dummy, gp, gc, grad, S, tiles_per_b, num_tiles, sb, sc, ss, gsb, gsc, gss,
                gp_stride, gc_stride, ignore_index, gamma, gamma,
                C=C, GROUP=group, LOOP=loop, MODE=int(mode), FOCAL=focal, HAS_GP=grad_pixel is not None,
                HAS_GC=grad_class is not None, ROWS=rows, VEC=vec, num_warps=_WARPS)
        else:
            block_p, block_c, single, num_warps = _chunked_plan(C, S, ss, acc == torch.float64)
            tiles_per_b = _cdiv(S, block_p)
            num_tiles = B * tiles_per_b
            wrap(_bwd_chunked_kernel)[(_programs(num_tiles, num_warps, x.device),)](
                x, target, dummy, gp, gc, grad, C, S, tiles_per_b, num_tiles, sb, sc, ss, gsb, gsc,
                gss, gp_stride, gc_stride, ignore_index, gamma, gamma,
                MODE=int(mode), FOCAL=focal, HAS_GP=grad_pixel is not None,
                HAS_GC=grad_class is not None, SINGLE=single, BLOCK_P=block_p, BLOCK_C=block_c,
                num_warps=num_warps)
    return grad


if triton is not None:

    # The argument is named ``loss_mode``, not ``mode``, a keyword torch's dispatch machinery uses itself.
    @torch.library.triton_op("fused_imbalance::triton_loss_fwd", mutates_args=())
    def loss_fwd(
        x: torch.Tensor,
        target: torch.Tensor,
        loss_mode: int,
        gamma: float,
        tvals: Optional[torch.Tensor],
        ignore_index: int,
        need_pixel_loss: bool,
        need_tp: bool,
        need_confusion: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _forward(x, target, loss_mode, gamma, tvals, ignore_index, need_pixel_loss, need_tp,
                        need_confusion)

    @loss_fwd.register_fake
    def _loss_fwd_fake(x, target, loss_mode, gamma, tvals, ignore_index, need_pixel_loss, need_tp,
                       need_confusion):
        return fwd_fake(x, target, need_pixel_loss, need_tp, need_confusion)

    @torch.library.triton_op("fused_imbalance::triton_loss_bwd", mutates_args=())
    def loss_bwd(
        x: torch.Tensor,
        target: torch.Tensor,
        grad_pixel: Optional[torch.Tensor],
        grad_class: Optional[torch.Tensor],
        loss_mode: int,
        gamma: float,
        tvals: Optional[torch.Tensor],
        ignore_index: int,
    ) -> torch.Tensor:
        return _backward(x, target, grad_pixel, grad_class, loss_mode, gamma, tvals, ignore_index)

    @loss_bwd.register_fake
    def _loss_bwd_fake(x, target, grad_pixel, grad_class, loss_mode, gamma, tvals, ignore_index):
        return torch.empty_like(x)

    register_loss_autograd("fused_imbalance::triton_loss_fwd", loss_bwd)
else:
    loss_fwd = None
    loss_bwd = None

# The backend's upsampled ops (DESIGN.md §10), so that this module serves both op pairs.
from .triton_upsample import upsample_loss_bwd, upsample_loss_fwd  # noqa: E402,F401
