"""Exact k-th smallest value of a vector on the device, without a sort and without a host sync:
``fused_imbalance::triton_select_kth`` (the threshold of the OHEM cross-entropy, docs/DESIGN.md §13).

**What it computes.** ``values`` (N,) float32 or float64. An entry < 0 is *invalid* and never
selected; every other entry (±0, positive, +inf, NaN) is valid. ``k`` is a 0-d integer tensor
on the same device, clamped to [0, n_valid - 1]. The result, a 0-d tensor of ``values``'
dtype, is the k-th smallest valid value (0-based): the value ``torch.sort`` puts at position k
of the valid entries, ties included (NaN last, -0.0 returned as +0.0, its equal); 0.0 when no
entry is valid.

**How.** Non-negative floats order like their bit patterns read as integers, and +inf and NaN
follow them. The key of a valid entry is its bit pattern with the sign bit cleared (31 bits for
float32, 63 for float64), and a radix select walks the key from its most significant digit
down, in digits of at most ``RADIX_BITS`` = 8 bits (:func:`digit_plan`: 8/8/8/7 for float32,
seven of 8 and one of 7 for float64; the first digit is the exponent, a binade). Pass j
histograms digit j of the valid keys whose higher digits equal the prefix found so far; the bin
holding the rank-th key gives digit j, the keys of the lower bins leave the rank, and the next
pass narrows to that bin. After the last digit the prefix is the key itself: the exact value,
ties or not. Every count is an integer (integer atomics are exact in any order), so the result
is deterministic.

The rank and the prefix never leave the device: the programs of pass j each read histogram
j - 1 (256 int64, from L2) and find its bin themselves -- a 256-long prefix sum per program --
instead of a one-program launch between the passes; program 0 also stores that state for pass
j + 1. A last one-program launch finds the last digit and writes the value. Nothing waits for
the host, and the launches do not depend on the data: a CUDA graph can capture them. All the
scratch (histograms and states) is one int64 buffer, zero-filled, and every kernel takes it
whole with compile-time offsets (no two views of one tensor as two arguments).

**The first histogram from elsewhere.** ``first_hist`` may be given: the (``FIRST_BINS`` =
256,) int64 histogram of the first digit of the valid keys, e.g. counted by a loss kernel in the
pass that computes the values (:func:`select_first_digit` gives the digit and the validity
there; ``tl.histogram`` and integer atomics add them up). The first pass is then skipped, and
the scratch buffer is that histogram padded with zeros. A histogram that is not that of
``values`` gives an unspecified result, never an out-of-bounds access.

**Cost model** (N entries of s = 4 or 8 bytes; P = 4 passes for float32, 8 for float64):

* launches: the zero-fill (with ``first_hist``: the zero padding, a fill and a copy), P
  histogram passes (P - 1 with ``first_hist``), one final one-program launch;
* bytes: each histogram pass reads the N values once (s·N), and each program adds at most 256
  int64 counts with integer atomics and reads the previous 256 (2 KB, L2);
* instructions per entry and pass, from the SASS for sm_90 (``benchmarks/sm90_select_driver.py``
  with ``sm90_static``): with triton 3.9, 17-19 (``tl.histogram`` is one
  shared-memory atomic increment per entry); with triton 3.6, 60-66 (its ``tl.histogram``
  counts with one warp ballot per digit bit and a popcount per bin a lane owns, so its cost
  grows with the bins: 11-bit digits, 3 passes instead of 4, cost about 180 per entry and pass
  there, 8-bit ones 60-66 -- hence 8 bits: fewer instructions on triton 3.6, one more pass of
  memory on triton 3.9, where 11 bits would take 3 passes of about 19).

Estimate for an H100 (no GPU measurement yet): N = 8·1024·1024 float32 label probabilities (a
Cityscapes batch of 8 x 1024 x 1024) are 32 MiB, 11.6 µs per pass at 2.9 TB/s. Triton 3.9: 3-6
µs of instructions per pass, memory-bound, about 47 µs for the 4 passes (the static tool's
model, which charges all the memory to one launch and adds the others' instructions, says
60 µs); 35-45 µs with ``first_hist``. Triton 3.6: 17-19 µs of instructions per pass, about
72-99 µs, 55-71 µs with ``first_hist``. Plus about 3 µs of launch latency per launch when
nothing else is queued. Registers: 40 (3.9) / 56 (3.6) per thread, no spill, 32-48 warps per
SM. Against the fused loss the selection serves (19 classes: 76 bytes of float32 logits per
pixel forward, 152 backward) the 12-16 bytes per pixel of 3-4 passes are 5-7 %.

Kernel arguments are commented in the kernels; offsets are int64 (N may exceed 2**31).
"""

from typing import Optional

import torch

from ._triton_host import _cdiv, _interpret, _on_device

try:
    import triton
    import triton.language as tl

    from ._triton_compat import wrap
except ImportError:  # the package works without triton; this backend is then unavailable
    triton = None

RADIX_BITS = 8  # widest digit (why 8 and not 11: the module docstring's cost model)
FIRST_BINS = 1 << RADIX_BITS  # bins of the first digit (``first_hist``), float32 and float64 alike
_BLOCK = 4096  # entries per tile
_WARPS = 8  # warps per program of the histogram passes
_PROGRAMS_PER_SM = 2  # enough loads in flight; more programs would read more prefix sums
_INTERPRET_BLOCK = 512  # the interpreter pays per tile and per program: small tiles, few programs
_INTERPRET_PROGRAMS = 3


def digit_plan(dtype):
    """``[(shift, width), ...]`` of the key's digits, most significant first: the 31 (float32) or
    63 (float64) key bits in passes of at most ``RADIX_BITS``, the wider digits first."""
    key_bits = 63 if dtype == torch.float64 else 31
    passes = _cdiv(key_bits, RADIX_BITS)
    base, extra = divmod(key_bits, passes)
    plan, top = [], key_bits
    for j in range(passes):
        width = base + (j < extra)
        top -= width
        plan.append((top, width))
    return plan


def _programs(num_tiles, device):
    if device.type == "cuda":
        cap = torch.cuda.get_device_properties(device).multi_processor_count * _PROGRAMS_PER_SM
    else:
        cap = _INTERPRET_PROGRAMS
    return max(1, min(num_tiles, cap))


if triton is not None:
    _FIRST_BITS = tl.constexpr(RADIX_BITS)

    @triton.jit
    def select_key(v):
        """(key, valid) of values ``v``: valid unless < 0 (NaN is valid); the key is the bit
        pattern with the sign cleared, so -0.0 and +0.0 share a key and keys order like values,
        +inf and NaN last (int32 for float32, int64 for float64)."""
        valid = (v >= 0) | (v != v)
        if v.dtype == tl.float64:
            key = v.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
        else:
            key = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        return key, valid

    @triton.jit
    def select_first_digit(v):
        """(digit, valid) of values ``v``: the first digit of the key (int32 in [0, FIRST_BINS)),
        what ``first_hist`` counts over the valid entries."""
        key, valid = select_key(v)
        if v.dtype == tl.float64:
            digit = (key >> (63 - _FIRST_BITS)).to(tl.int32)
        else:
            digit = key >> (31 - _FIRST_BITS)
        return digit, valid

    @triton.jit
    def _descend(
        k_ptr,
        work_ptr,
        PREV: tl.constexpr,
        STATE_IN: tl.constexpr,
        PREV_BITS: tl.constexpr,
        FIRST: tl.constexpr,
    ):
        """(prefix, rank, n_valid) once the previous digit is known: the bin of its histogram (at
        ``work_ptr + PREV``) that holds the rank-th key is appended to the prefix, and the keys of
        the lower bins leave the rank. The state before it is at ``work_ptr + STATE_IN``, or, when
        the previous digit is the FIRST, (0, k clamped to [0, n_valid - 1], n_valid = the
        histogram's total)."""
        h = tl.load(work_ptr + PREV + tl.arange(0, 1 << PREV_BITS))
        if FIRST:
            n_valid = tl.sum(h, 0)
            rank = tl.minimum(tl.maximum(tl.load(k_ptr).to(tl.int64), 0), tl.maximum(n_valid - 1, 0))
            prefix = n_valid * 0
        else:
            prefix = tl.load(work_ptr + STATE_IN)
            rank = tl.load(work_ptr + STATE_IN + 1)
            n_valid = tl.load(work_ptr + STATE_IN + 2)
        below = tl.cumsum(h, 0) <= rank  # the bins wholly below the rank-th key
        digit = tl.sum(below.to(tl.int64), 0)
        rank = rank - tl.sum(tl.where(below, h, 0), 0)
        # digit == 2**PREV_BITS only when the histogram holds no rank-th key: no valid entry (the
        # result is then 0 whatever the prefix) or a first_hist not of these values
        digit = tl.minimum(digit, (1 << PREV_BITS) - 1)
        return (prefix << PREV_BITS) | digit, rank, n_valid

    @triton.jit
    def _select_hist_kernel(
        v_ptr,  # (N,) values, float32 or float64; an entry < 0 is invalid
        k_ptr,  # () int64 requested rank (read when FIRST)
        work_ptr,  # int64 histograms (zeroed, or the first one given) and states, at the offsets below
        N,  # entries
        PREV: tl.constexpr,  # offset of the previous digit's histogram (unread in the first pass)
        STATE_IN: tl.constexpr,  # offset of (prefix, rank, n_valid) before the previous digit (unless FIRST)
        STATE_OUT: tl.constexpr,  # offset of the same after it, stored by program 0
        HIST: tl.constexpr,  # offset of this pass's histogram, added into
        SHIFT: tl.constexpr,  # lowest key bit of this pass's digit
        BITS: tl.constexpr,  # its width
        PREV_BITS: tl.constexpr,  # the previous digit's width; 0 in the first pass
        FIRST: tl.constexpr,  # the previous digit is the first one
        BLOCK: tl.constexpr,  # entries per tile
    ):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        if PREV_BITS > 0:
            # every program finds the previous digit itself: no launch between the passes
            prefix, rank, n_valid = _descend(k_ptr, work_ptr, PREV, STATE_IN, PREV_BITS, FIRST)
            if pid == 0:
                tl.store(work_ptr + STATE_OUT, prefix)
                tl.store(work_ptr + STATE_OUT + 1, rank)
                tl.store(work_ptr + STATE_OUT + 2, n_valid)
        else:
            prefix = 0  # the key has no bit above the first digit
        counts = tl.zeros([1 << BITS], tl.int32)  # fewer than 2**31 entries per program
        lanes = tl.arange(0, BLOCK)
        # int64 offsets: N can exceed 2**31
        for start in range(pid.to(tl.int64) * BLOCK, N, nprog * BLOCK):
            offs = start + lanes
            inside = offs < N
            v = tl.load(v_ptr + offs, mask=inside, other=-1.0)
            key, valid = select_key(v)
            take = inside & valid & ((key >> (SHIFT + BITS)) == prefix)
            digit = ((key >> SHIFT) & ((1 << BITS) - 1)).to(tl.int32)
            counts += tl.histogram(digit, 1 << BITS, mask=take)
        bins = tl.arange(0, 1 << BITS)
        tl.atomic_add(work_ptr + HIST + bins, counts.to(tl.int64), mask=counts != 0, sem="relaxed")

    @triton.jit
    def _select_final_kernel(
        k_ptr,  # () int64 requested rank (read when FIRST)
        work_ptr,  # int64 histograms and states
        out_ptr,  # () out: the selected value, values' dtype
        PREV: tl.constexpr,  # offset of the last digit's histogram
        STATE_IN: tl.constexpr,  # offset of (prefix, rank, n_valid) before the last digit (unless FIRST)
        PREV_BITS: tl.constexpr,  # the last digit's width
        FIRST: tl.constexpr,  # the last digit is the first one (a single pass)
    ):
        key, rank, n_valid = _descend(k_ptr, work_ptr, PREV, STATE_IN, PREV_BITS, FIRST)
        if out_ptr.dtype.element_ty == tl.float64:
            value = key.to(tl.float64, bitcast=True)
        else:
            value = key.to(tl.int32).to(tl.float32, bitcast=True)
        tl.store(out_ptr, tl.where(n_valid > 0, value, 0.0))


def work_layout(dtype):
    """(hist_at, state_at, size) of the selection's one int64 scratch buffer for values of ``dtype``: the
    offset of each digit's histogram (the first at 0, ``FIRST_BINS`` long), of the state after each digit
    but the last, and the buffer's length. A caller that counts the first histogram in its own pass
    (:mod:`.triton_ohem`) adds it into a zeroed buffer of this size and runs :func:`launch_passes`."""
    widths = [w for _, w in digit_plan(dtype)]
    hist_at = [0]
    for w in widths:
        hist_at.append(hist_at[-1] + (1 << w))
    state_at = [hist_at[-1] + 3 * j for j in range(len(widths) - 1)]
    return hist_at, state_at, hist_at[-1] + 3 * (len(widths) - 1)


def launch_passes(v, k, work, out, first_given):
    """The histogram passes and the final launch over values ``v`` (N,), rank ``k`` (a 0-d int64 tensor),
    into ``out`` (0-d, the values' dtype). ``work``: the zeroed buffer of :func:`work_layout`, holding the
    first histogram when ``first_given`` (its pass is then skipped)."""
    N = v.numel()
    plan = digit_plan(v.dtype)
    widths = [w for _, w in plan]
    hist_at, state_at, _ = work_layout(v.dtype)
    interp = _interpret() and not v.is_cuda
    block = _INTERPRET_BLOCK if interp else _BLOCK
    grid = (_programs(_cdiv(N, block), v.device),)
    with _on_device(v):
        for j in range(1 if first_given else 0, len(plan)):
            shift, width = plan[j]
            prev = max(j - 1, 0)
            wrap(_select_hist_kernel)[grid](
                v,
                k,
                work,
                N,
                PREV=hist_at[prev],
                STATE_IN=state_at[max(j - 2, 0)],
                STATE_OUT=state_at[prev],
                HIST=hist_at[j],
                SHIFT=shift,
                BITS=width,
                PREV_BITS=widths[j - 1] if j else 0,
                FIRST=j == 1,
                BLOCK=block,
                num_warps=_WARPS,
            )
        last = len(plan) - 1
        wrap(_select_final_kernel)[(1,)](
            k,
            work,
            out,
            PREV=hist_at[last],
            STATE_IN=state_at[max(last - 1, 0)],
            PREV_BITS=widths[last],
            FIRST=last == 0,
            num_warps=4,
        )
    return out


def _select(values, k, first_hist):
    """The launcher: the histogram passes and the final launch (see the module docstring)."""
    v = values.reshape(-1)
    # One int64 buffer, every kernel's only scratch argument (no views of one tensor passed as
    # several arguments): the histogram of each digit, then a state after each digit but the last.
    size = work_layout(v.dtype)[2]
    if first_hist is None:
        work = torch.zeros(size, dtype=torch.int64, device=v.device)
    else:  # the given first histogram, the rest zeroed
        work = torch.nn.functional.pad(first_hist, (0, size - FIRST_BINS))
    return launch_passes(v, k.reshape(()).to(torch.int64), work, v.new_empty(()), first_hist is not None)


if triton is not None:

    @torch.library.triton_op("fused_imbalance::triton_select_kth", mutates_args=())
    def select_kth(
        values: torch.Tensor, k: torch.Tensor, first_hist: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return _select(values, k, first_hist)

    @select_kth.register_fake
    def _select_kth_fake(values, k, first_hist=None):
        return values.new_empty(())
else:
    select_kth = None
