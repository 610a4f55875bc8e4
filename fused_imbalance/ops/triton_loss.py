"""The Triton backend: ``fused_imbalance::triton_loss_fwd`` / ``triton_loss_bwd``.

Implements the kernel contract of :mod:`fused_imbalance.ops` with the kernels of
:mod:`.triton_kernels`. Both ops are ``torch.library.triton_op``s launching through
``wrap_triton`` (:func:`._triton_compat.wrap`), so ``torch.compile`` sees the kernels;
autograd is the shared formula of :mod:`._autograd`.

Tiling, chosen here from C and the strides (the kernels take any strides):

* C <= 256 (segmentation): a tile is BLOCK_P pixels x all classes (padded to a power of two).
  NCHW with C <= 32 uses one-warp programs of 1024 logits, so that every reduction over the
  classes stays inside the warp; otherwise ~4096 logits over 4-8 warps. The per-class loss
  sums, counts and true positives of all the program's tiles are reduced in registers; the
  sums are stored as one row per program (summed here in a fixed order: deterministic),
  counts and confusion histograms added with one integer atomic per class.
* larger C: the class dim is read in chunks with an online softmax, per-pixel losses go to an
  (N,) buffer, and a second small kernel sums them per class deterministically; counts,
  true positives and confusion use one integer atomic per pixel (also deterministic).
  Rows / channels_last read few pixels x long contiguous chunks (one chunk up to 4096
  classes); NCHW reads 64 contiguous pixels x 64 classes per chunk.

Each program owns a run of consecutive tiles (several waves of programs for the device), so
its partial row covers many pixels and the rows stay few. The backward recomputes the
softmax from the logits (with many classes its second pass over a pixel's chunks hits the
cache) and writes the gradient once.
"""
import os
from typing import Optional

import torch

from . import Mode, fwd_fake, pixel_view
from ._autograd import register_loss_autograd

try:
    import triton

    from ._triton_compat import wrap
    from .triton_kernels import _class_sum_kernel, _loss_bwd_kernel, _loss_fwd_kernel
except ImportError:  # the package works without triton; this backend is then unavailable
    triton = None

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_TILE = 4096  # logits per tile: 16-32 float32 registers per thread at 4-8 warps
_SMALL_C = 256  # up to this (padded) class count, class statistics are reduced in registers
_ROW_CHUNK = 4096  # classes per chunk when classes are contiguous; online softmax beyond
_STRIDED_TILE = (64, 64)  # (pixels, classes) per chunk when pixels are contiguous and C is large
_ONE_WARP_C = 32  # NCHW up to this (padded) class count: one-warp programs ...
_ONE_WARP_TILE = 1024  # ... of this many float32 logits
_WARPS_PER_SM = 16  # resident warps per SM at ~128 registers a thread
_WAVES = 8  # programs per resident slot: the scheduler balances, partial rows stay few
# The interpreter runs a tile as whole-array numpy operations and programs one after another,
# so its cost is per tile: larger tiles there, and still several programs.
_INTERPRET_TILE_SCALE = 8
_INTERPRET_PROGRAMS = 3


def _interpret():
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available():
    """Whether the Triton kernels can run here (a GPU, or the interpreter on CPU tensors)."""
    return triton is not None and (torch.cuda.is_available() or _interpret())


def supports(x):
    """Whether this backend handles logits ``x`` (its device and dtype)."""
    if triton is None or x.dtype not in _FLOATS:
        return False
    return x.is_cuda or (x.device.type == "cpu" and _interpret())


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _np2(n):
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a, b):
    return -(-a // b)


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


def _plan(C, S, ss, f64):
    """(BLOCK_P, BLOCK_C, single chunk, class statistics in registers, num_warps).

    Triton spreads a tile's lanes over its unit-stride axis first and puts the warps on the
    other axis once that one is covered. Reductions over classes (max, sums, argmax) stay inside
    a warp when classes are contiguous (channels_last, rows: lanes along classes, warps along
    pixels); with contiguous pixels (NCHW) only a one-warp tile keeps them there (lanes own
    16-byte vectors of a few pixels x all classes); otherwise each of the per-pixel reductions
    of a tile is a round trip through shared memory with barriers.
    """
    bc = _np2(C)
    tile = _TILE // 4 if f64 else _TILE  # float64 takes two registers a value
    if bc <= _SMALL_C:
        block_c, single, partials = bc, True, True
        if ss == 1 and bc <= _ONE_WARP_C:
            block_p, num_warps = _ONE_WARP_TILE // (2 * bc if f64 else bc), 1
        else:
            block_p = min(max(tile // bc, 8), 1024)
            num_warps = 8 if block_p * bc >= 4096 else 4
    elif ss == 1:
        (block_p, block_c), single, partials = _STRIDED_TILE, False, False
        num_warps = 8
    else:
        block_c = min(bc, _ROW_CHUNK)
        single, partials = bc <= _ROW_CHUNK, False
        block_p = max(1, tile // block_c)
        num_warps = 8 if block_p * block_c >= 4096 else 4
    if _interpret():
        block_p *= _INTERPRET_TILE_SCALE
    return min(block_p, _np2(S)), block_c, single, partials, num_warps


def _programs(num_tiles, num_warps, device):
    """(programs, tiles per program): each program owns a fixed run of consecutive tiles.

    A fixed assignment keeps the per-program partial sums deterministic; several waves of
    programs let the hardware scheduler even out the load without a persistent-kernel tail.
    """
    if device.type == "cuda":
        per_sm = max(1, _WARPS_PER_SM // num_warps)
        cap = torch.cuda.get_device_properties(device).multi_processor_count * per_sm * _WAVES
    else:
        cap = _INTERPRET_PROGRAMS
    per_prog = _cdiv(num_tiles, max(1, min(num_tiles, cap)))
    return _cdiv(num_tiles, per_prog), per_prog


def _class_sums(target, pl, C):
    """Σ of ``pl`` over the pixels of each class, in a fixed order (no float atomics)."""
    N = pl.numel()
    block_k, block_n = min(_np2(C), 64), 128
    nseg = max(1, min(64, N // 4096))
    per_seg = _cdiv(_cdiv(N, nseg), block_n) * block_n
    nseg = _cdiv(N, per_seg)
    part = pl.new_empty((nseg, C))
    wrap(_class_sum_kernel)[(_cdiv(C, block_k), nseg)](
        target, pl, part, N, C, per_seg, BLOCK_N=block_n, BLOCK_K=block_k)
    return part.sum(0)


def _forward(x, target, mode, gamma, tvals, ignore_index, need_pixel_loss, need_tp, need_confusion):
    """The forward op's launcher (see the contract in :mod:`fused_imbalance.ops`)."""
    mode = Mode(mode)
    acc = _acc_dtype(x)
    B, C, S, (sb, sc, ss), _ = _geometry(x)
    N = B * S
    has_loss = mode != Mode.STATS
    count = x.new_zeros(C, dtype=torch.int64)
    tp = x.new_zeros(C, dtype=torch.int64)
    bad = x.new_zeros((), dtype=torch.int64)
    confusion = x.new_zeros((C, C) if need_confusion else (0, 0), dtype=torch.int64)
    if N == 0:
        pixel_loss = x.new_zeros(0, dtype=acc)
        return pixel_loss, x.new_zeros(C, dtype=acc), count, tp if need_tp else tp.new_empty(0), bad, confusion

    block_p, block_c, single, partials, num_warps = _plan(C, S, ss, acc == torch.float64)
    tiles_per_b = _cdiv(S, block_p)
    num_tiles = B * tiles_per_b
    programs, per_prog = _programs(num_tiles, num_warps, x.device)
    store_pl = need_pixel_loss or (has_loss and not partials)
    pl = x.new_empty(N if store_pl else 1, dtype=acc)  # its dtype sets the arithmetic
    part = x.new_empty((programs, C) if partials else (1,), dtype=acc)
    conf = 0 if not need_confusion else (2 if partials and block_c <= 32 else 1)
    wrap(_loss_fwd_kernel)[(programs,)](
        x, target, tvals if tvals is not None else part, pl, part, count, tp, bad,
        confusion if need_confusion else count,
        C, S, tiles_per_b, num_tiles, per_prog, sb, sc, ss, ignore_index, gamma,
        MODE=int(mode), FOCAL=gamma != 0 and mode in (Mode.SOFTMAX_FOCAL, Mode.SIGMOID_FOCAL),
        STORE_PL=store_pl, SINGLE=single, PARTIALS=partials, CONF=conf,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)

    pixel_loss = pl if need_pixel_loss else x.new_zeros(0, dtype=acc)
    if not has_loss:
        class_loss = x.new_zeros(C, dtype=acc)
    elif partials:
        class_loss = part.sum(0)
    else:
        class_loss = _class_sums(target, pl, C)
    return pixel_loss, class_loss, count, tp if need_tp else tp.new_empty(0), bad, confusion


def _backward(x, target, grad_pixel, grad_class, mode, gamma, tvals, ignore_index):
    """The backward op's launcher: (grad_pixel[n] + grad_class[y_n]) * dℓ_n/dx, x's layout."""
    mode = Mode(mode)
    if (grad_pixel is None and grad_class is None) or mode == Mode.STATS or x.numel() == 0:
        return torch.zeros_like(x)
    acc = _acc_dtype(x)
    grad = torch.empty_like(x)
    B, C, S, (sb, sc, ss), (gsb, gsc, gss) = _geometry(x, grad)
    block_p, block_c, single, _, num_warps = _plan(C, S, ss, acc == torch.float64)
    tiles_per_b = _cdiv(S, block_p)
    num_tiles = B * tiles_per_b
    programs, per_prog = _programs(num_tiles, num_warps, x.device)
    dummy = tvals if tvals is not None else x.new_empty(1, dtype=acc)  # its dtype sets the arithmetic
    wrap(_loss_bwd_kernel)[(programs,)](
        x, target, dummy,
        grad_pixel if grad_pixel is not None else dummy,
        grad_class if grad_class is not None else dummy,
        grad, C, S, tiles_per_b, num_tiles, per_prog, sb, sc, ss, gsb, gsc, gss,
        grad_pixel.stride(0) if grad_pixel is not None else 0,
        grad_class.stride(0) if grad_class is not None else 0,
        ignore_index, gamma,
        MODE=int(mode), FOCAL=gamma != 0 and mode in (Mode.SOFTMAX_FOCAL, Mode.SIGMOID_FOCAL),
        HAS_GP=grad_pixel is not None, HAS_GC=grad_class is not None, SINGLE=single,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)
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
        return _forward(x, target, loss_mode, gamma, tvals, ignore_index, need_pixel_loss, need_tp, need_confusion)

    @loss_fwd.register_fake
    def _loss_fwd_fake(x, target, loss_mode, gamma, tvals, ignore_index, need_pixel_loss, need_tp, need_confusion):
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
