"""Host-side helpers shared by the Triton launchers of both kernel families (:mod:`.triton_loss`,
:mod:`.triton_upsample`): the persistent grid, the class-sum launch, the finalize launch that turns
the programs' rows into the op's outputs, and the small buffers a launch passes for arguments it
does not use. Neither launcher module imports the other.
"""

import contextlib
import os

import torch

from . import FLOAT_DTYPES, Mode, Reduction, Weighting, acc_dtype

try:
    import triton

    from ._triton_compat import traced, wrap
    from .triton_kernels import (
        _class_sum_kernel,
        _finalize_kernel,
        _recall_ema_kernel,
        _reduce_rows_kernel,
        _weigh_kernel,
    )
except ImportError:  # the package works without triton; the Triton backend is then unavailable
    triton = None

_RESIDENT_WARPS = 32  # warps per SM the persistent grid fills (latency hiding)
_SUM_BLOCK = 256  # threads per program of the class-sum kernel (one program per SM)
_SUM_K = 4  # classes per step of its zeroing and final reduction
_SUM_SCRATCH_BYTES = 1 << 25  # its per-thread columns of class sums, at most (they live in L2)
_FINALIZE_ELEMS = 1 << 16  # rows x classes the one-program finalize reduces itself; beyond, a launch first
_FINALIZE_BLOCK = 4096  # elements per step of the finalize (rows x classes)
_WEIGH_BLOCK = 1024  # pixels per program of the per-pixel weighting
# The interpreter runs programs one after another: a few of them (its tiles are scaled up by the
# launchers, _INTERPRET_TILE_SCALE in .triton_loss).
_INTERPRET_PROGRAMS = 3


# Whether the kernels run under Triton's interpreter: ``@triton.jit`` decides it from TRITON_INTERPRET when
# the kernels' modules are imported (above), so it is read once, with them, not on every launch.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _interpret():
    return _INTERPRETED


def available():
    """Whether the Triton kernels can run here (a GPU, or the interpreter on CPU tensors)."""
    return triton is not None and (torch.cuda.is_available() or _interpret())


def supports(x):
    """Whether the Triton backend handles logits ``x`` (its device and dtype)."""
    if triton is None or x.dtype not in FLOAT_DTYPES:
        return False
    return x.is_cuda or (x.device.type == "cpu" and _interpret())


def _focal(mode, gamma):
    """Whether a launch computes focal terms (the FOCAL constexpr): a focal mode with γ ≠ 0."""
    return gamma != 0 and mode in (Mode.SOFTMAX_FOCAL, Mode.SIGMOID_FOCAL)


def _np2(n):
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a, b):
    return -(-a // b)


_SAME_DEVICE = contextlib.nullcontext()


def _on_device(x):
    """Launch on the logits' device, whatever device is current (nothing to switch when it is current)."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return _SAME_DEVICE


_sm_counts = {}


def _sms(device):
    """Streaming multiprocessors of a CUDA device (looked up once per device)."""
    n = _sm_counts.get(device.index)
    if n is None:
        n = _sm_counts[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return n


def _programs(num_tiles, num_warps, device, per_sm=None):
    """Programs of a persistent grid: program ``pid`` walks tiles pid, pid + P, ... in order.

    A fixed assignment keeps the per-program rows (and so every sum) deterministic; enough
    programs to fill ``_RESIDENT_WARPS`` warps per SM.
    """
    if device.type == "cuda":
        if per_sm is None:
            per_sm = max(1, _RESIDENT_WARPS // num_warps)
        cap = _sms(device) * per_sm
    else:
        cap = _INTERPRET_PROGRAMS
    return max(1, min(num_tiles, cap))


# Launch plans: everything a launch derives from its tensors' shapes, strides, dtypes and devices and
# the op's flags (geometry, tiling, grid, constexprs, what to allocate), cached so that a training step's
# repeated call costs one dict lookup, its allocations and its launches. Each cache is bounded: cleared
# when full (a loop over many shapes recomputes them, as without the cache).
_PLANS_MAX = 256
_plan_caches = []


def plan_cache():
    """A new cache of launch plans (a dict), which :func:`forget_plans` clears."""
    plans = {}
    _plan_caches.append(plans)
    return plans


def forget_plans():
    """Clear every launch plan (tests that change the tiling limits start from none)."""
    for plans in _plan_caches:
        plans.clear()


def cacheable(x):
    """Whether a plan for ``x`` may be cached: not under tracing with symbolic sizes (their plan is
    recomputed each time, as the sizes it depends on are not known)."""
    return type(sum(x.shape)) is int  # a symbolic size makes the sum symbolic


def remember(plans, key, plan):
    if len(plans) >= _PLANS_MAX:
        plans.clear()
    plans[key] = plan


_dummies = {}


def _dummy(device, dtype):
    """A one-element tensor for a kernel argument the launch does not read (its dtype may set the
    kernel's arithmetic), allocated once per device and dtype. While a graph is traced, the trace's own
    (uninitialised) one: a fake or functional tensor kept here would reach a later eager launch, and a
    kept real one would enter the trace."""
    if traced():
        return torch.empty(1, dtype=dtype, device=device)
    key = (device, dtype)
    t = _dummies.get(key)
    if t is None:
        t = _dummies[key] = torch.zeros(1, dtype=dtype, device=device)
    return t


def _class_sums(target, pl, C, interpret_scale):
    """The per-class sums of ``pl`` as rows (P, C), one per program, each summed in a fixed order (no
    float atomics): the O(N) class-sum kernel, one program of ``_SUM_BLOCK`` threads per SM (fewer
    when the columns of C sums per thread would exceed ``_SUM_SCRATCH_BYTES``), each thread summing
    its pixels into its own column. The finalize launch adds the rows. ``interpret_scale``: how much
    larger the interpreter's blocks are (its cost is per block)."""
    N = pl.numel()
    block = _SUM_BLOCK * (interpret_scale if _interpret() else 1)
    cap = _sms(pl.device) if pl.device.type == "cuda" else _INTERPRET_PROGRAMS
    # the columns, C x P x block sums, stay within _SUM_SCRATCH_BYTES (fewer programs for large C)
    fit = _SUM_SCRATCH_BYTES // (C * block * pl.element_size())
    P = max(1, min(_cdiv(N, block), cap, fit))
    scratch = pl.new_empty((C, P * block))
    part = pl.new_empty((P, C))
    k = min(_np2(C), _SUM_K * (interpret_scale if _interpret() else 1))
    wrap(_class_sum_kernel)[(P,)](
        target, pl, scratch, part, N, C, BLOCK=block, K=k, num_warps=_SUM_BLOCK // 32
    )
    return part


_nothings = {}


def nothing(x, dtype):
    """A tensor of no elements on ``x``'s device (an output a call does not ask for: the true positives
    without ``need_tp``, the log-sum-exp that is not kept): for a plain tensor ``x`` one allocated once per
    device and dtype (nothing can be written into it); for a tracer's tensor (torch.compile's fake and
    functional tensors) a new one of its kind."""
    if type(x) is not torch.Tensor:
        return x.new_empty(0, dtype=dtype)
    key = (x.device, dtype)
    t = _nothings.get(key)
    if t is None:
        t = _nothings[key] = torch.empty(0, dtype=dtype, device=x.device)
    return t


def outputs(x, C, N, reduction, need_tp):
    """The forward op's outputs (loss, scale, count, tp, bad), uninitialised: every element is written
    by the finalize launch (the loss of ``"none"`` by the loss kernel)."""
    acc = acc_dtype(x)
    if reduction == Reduction.NONE:
        loss = x.new_empty(N, dtype=acc)
    elif reduction == Reduction.CLASS:
        loss = x.new_empty(C, dtype=acc)
    else:
        loss = x.new_empty((), dtype=acc)
    i64 = torch.int64
    return (
        loss,
        x.new_empty(C, dtype=acc),
        x.new_empty(C, dtype=i64),
        x.new_empty(C, dtype=i64) if need_tp else nothing(x, i64),
        x.new_empty(2, dtype=i64),
    )


def finalize(
    lrow, crow, trow, brow, weight, out, C, reduction, weighting, sums, need_tp, ignore_index, target
):
    """The finalize launch (``_finalize_kernel``; a row reduction first when the rows are many) writing
    ``out`` = (loss, scale, count, tp, bad); then, for the recall loss's per-pixel output, the weighting
    launch. ``lrow`` (RL, C) or None, ``crow``/``trow`` (RC, C), ``brow`` (RB, 2)."""
    loss, scale, count, tp, bad = out
    acc = scale.dtype
    dev = scale.device
    RC = crow.shape[0]
    RL = lrow.shape[0] if sums else 0
    if max(RC, RL) * C > _FINALIZE_ELEMS:
        bc = min(_np2(C), 128)
        br = max(1, min(_FINALIZE_BLOCK // bc, _np2(max(RC, RL))))
        lsum = lrow.new_empty((1, C)) if sums else _dummy(dev, acc)
        csum = crow.new_empty((1, C), dtype=torch.int64)
        tsum = crow.new_empty((1, C), dtype=torch.int64) if need_tp else csum
        wrap(_reduce_rows_kernel)[(_cdiv(C, bc),)](
            lrow if sums else lsum,
            crow,
            trow if need_tp else crow,
            lsum,
            csum,
            tsum,
            RL,
            RC,
            C,
            SUMS=sums,
            NEED_TP=need_tp,
            BR=br,
            BC=bc,
        )
        lrow, crow, trow = lsum, csum, tsum
        RC, RL = 1, (1 if sums else 0)
    bc = min(_np2(C), 128)
    br = max(1, min(_FINALIZE_BLOCK // bc, _np2(max(RC, RL, brow.shape[0], 1))))
    wrap(_finalize_kernel)[(1,)](
        lrow if sums else _dummy(dev, acc),
        crow,
        trow if need_tp else crow,
        brow,
        weight if weight is not None else _dummy(dev, acc),
        loss,
        scale,
        count,
        tp if need_tp else count,
        bad,
        RL,
        RC,
        brow.shape[0],
        C,
        RED=int(reduction),
        WEIGHTING=int(weighting),
        SUMS=sums,
        NEED_TP=need_tp,
        BR=br,
        BC=bc,
    )
    if reduction == Reduction.NONE and weighting == Weighting.RECALL:
        N = loss.numel()
        if N:
            wrap(_weigh_kernel)[(_cdiv(N, _WEIGH_BLOCK),)](
                loss, target, scale, N, C, ignore_index, BLOCK=_WEIGH_BLOCK
            )


_EMA_BLOCK = 1024  # classes per step of the moving average's one program
_ema_weights = {}  # (1 - momentum, device) -> its () float64 tensor


def recall_ema(sums, count, tp, running, seen, weight, reduction):
    """RecallLoss's moving average and loss (the contract of :mod:`fused_imbalance.ops`): one launch of
    ``_recall_ema_kernel``, writing ``running`` and ``seen`` in place; (loss, scale). ``weight`` is the
    average's 1 - momentum (a float64 device scalar, made once per value and device)."""
    C = sums.numel()
    key = (weight, sums.device)
    wt = _ema_weights.get(key)
    if wt is None:
        # a fill on the device (no copy from the host: nothing waits, capture included); one made while a
        # CUDA graph is captured is filled only on replay, so it is not kept
        wt = torch.full((), weight, dtype=torch.float64, device=sums.device)
        if not (sums.is_cuda and torch.cuda.is_current_stream_capturing()):
            if len(_ema_weights) >= _PLANS_MAX:
                _ema_weights.clear()
            _ema_weights[key] = wt
    loss = sums.new_empty(())
    scale = sums.new_empty(C)
    with _on_device(sums):
        wrap(_recall_ema_kernel)[(1,)](
            sums,
            count,
            tp,
            running,
            seen,
            wt,
            loss,
            scale,
            C,
            RED=int(reduction),
            BC=min(_np2(C), _EMA_BLOCK),
        )
    return loss, scale


def grad_arg(grad, N, device, acc):
    """(tensor, stride, present) of the backward's upstream gradient: the scalar one of a mean or sum
    (stride 0: one value for every pixel, read on the device), a per-pixel one of ``"none"`` (N,),
    or none (the gradient of per-class sums goes in ``scale``)."""
    if grad is None:
        return _dummy(device, acc), 0, False
    if grad.numel() == 1 or all(st == 0 for st in grad.stride()):
        return grad, 0, True  # a scalar, or autograd's expansion of one: its one element
    g = grad.reshape(-1)
    if g.stride(0) != 1:
        g = g.contiguous()
    if g.numel() != N:
        raise RuntimeError(f"fused_imbalance: the upstream gradient has {g.numel()} elements for {N} pixels")
    return g, 1, True
