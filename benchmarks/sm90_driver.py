"""sm90_static driver: fused_imbalance's Triton loss passes on Cityscapes-, ADE20K- and long-tail-sized logits.

    python sm90_static.py benchmarks/sm90_driver.py [--json OUT] [--only ade_cl]

The project's copy of the tool's example driver, kept in step with the kernels: the forward op's signature
(need_tp / need_confusion flags, the confusion counts returned), the trip models of the static-class and chunked
kernels, and the extra memory traffic of the passes that store per-pixel losses or per-program rows (mem_bytes).
The 72 cases are the example driver's. The
forward of a loss keeps what its backward takes instead of a second pass over the logits (need_lse, as autograd
asks for it in training), and the backward takes it.

Launches go only through the public ops torch.ops.fused_imbalance.triton_loss_fwd / triton_loss_bwd (their contract
is the docstring of fused_imbalance.ops), through FWD / BWD below, whose arguments (those of the sm90_static
and sm90_memory tools'
calibration driver too) name the passes by their flags, so the cases keep working across internal refactors.
The one piece that knows the kernels is the trip model (TRIPS), written against kernel argument names: when a
name or the loop nesting changes, the tool flags the case ("no estimate") instead of estimating it with a stale model.

Byte floor (docs/DESIGN.md §8): a forward reads the logits once, a backward reads them and writes the gradient once;
both read the int64 labels once. Inputs are torch.empty: nothing runs, the kernels are only compiled.
"""

import importlib

import torch

# The ops are registered when the Triton backend module is imported; that needs only `import triton`. Its
# available() (a GPU, or TRITON_INTERPRET=1) gates the high-level API's choice of backend, not the ops themselves.
_TL = importlib.import_module("fused_imbalance.ops.triton_loss")
try:
    _FWD = torch.ops.fused_imbalance.triton_loss_fwd
    _BWD = torch.ops.fused_imbalance.triton_loss_bwd
except (AttributeError, RuntimeError) as e:
    raise SystemExit(f"fused_imbalance's Triton ops are not registered ({e}): is triton installed?")
from fused_imbalance.ops import Reduction, Weighting  # noqa: E402


def FWD(
    x, target, mode, gamma, tvals, ignore_index, need_pixel_loss, need_tp, need_confusion, need_lse=False
):
    """A forward pass through the op, by the flags these cases (and the sm90_static and sm90_memory tools'
    drivers) name it with:
    the per-pixel loss ("none"), the statistics pass (true positives, the confusion counts into a matrix),
    or a mean (the class-loss sums of the programs, reduced by the finalize launch); ``need_lse``: what a
    training step's forward keeps for its backward (fused_imbalance.ops.triton_loss.keeps_lse)."""
    C = x.shape[1]
    conf = torch.zeros((C, C), dtype=torch.int64) if need_confusion else None
    red = Reduction.NONE if need_pixel_loss else (Reduction.SUM if mode == 4 else Reduction.MEAN)
    return _FWD(
        x,
        target,
        None,
        tvals,
        conf,
        mode,
        gamma,
        ignore_index,
        int(red),
        int(Weighting.NONE),
        need_tp,
        False,
        need_lse,
    )


def BWD(x, target, grad_pixel, grad_class, mode, gamma, tvals, ignore_index, lse=None):
    """A backward pass through the op: the upstream gradient of a per-pixel loss (``grad_pixel``), or the
    per-class factor of a weighted mean (``grad_class``: a scalar upstream gradient of 1 is left implicit);
    ``lse``: what the forward kept (None: recomputed from the logits)."""
    return _BWD(x, target, grad_pixel, grad_class, tvals, lse, mode, gamma, ignore_index)


def kept(x, mode, gamma):
    """Floats per pixel a training step's forward keeps for its backward (0: none)."""
    return _TL.keeps_lse(x, mode, gamma)


PROBLEMS = [  # name, shape (B, C, H, W) or (N, C), dtype, memory layout
    ("city_nchw_f32", (8, 19, 512, 1024), torch.float32, "nchw"),
    ("city_nchw_bf16", (8, 19, 512, 1024), torch.bfloat16, "nchw"),
    ("city_cl_f32", (8, 19, 512, 1024), torch.float32, "cl"),
    ("city_cl_bf16", (8, 19, 512, 1024), torch.bfloat16, "cl"),
    ("ade_nchw_f32", (8, 150, 512, 512), torch.float32, "nchw"),
    ("ade_nchw_bf16", (8, 150, 512, 512), torch.bfloat16, "nchw"),
    ("ade_cl_f32", (8, 150, 512, 512), torch.float32, "cl"),
    ("rows8142_f32", (65536, 8142), torch.float32, "rows"),
]
MODES = [  # name, loss_mode (fused_imbalance.ops.Mode), gamma
    ("ce", 0, 0.0),  # softmax focal with gamma 0: cross-entropy
    ("focal", 0, 2.0),
    ("sigfocal", 1, 2.0),  # sigmoid focal
    ("mselogit", 2, 0.0),  # MSE on the logits (outlying labels)
    ("stats_conf", 4, 0.0),  # counts, true positives and the confusion matrix only; no backward
]
IGNORE = -100


def _cdiv(a, b):
    return -(-a // b)


def _extra_fwd_bytes(layout, N, C, mode, sms=132):
    """Forward traffic beyond the floor, as fused_imbalance/ops/triton_loss.py allocates it on an H100: in NCHW with
    32 < C <= 256 the per-pixel loss is written (4 B), then read back with the labels (4 + 8 B) by the class-sum
    kernel (its per-thread columns of class sums, C x 132 KB, are zeroed by the kernel itself and stay in the
    50 MB L2: not counted); the (N, C) rows path beyond 256 classes zeroes and reads back 2 programs per SM x C
    float32 class-loss rows and int32 count rows; every path writes per-program int32 count rows (and float32
    class-loss rows where the statistics are registers), which the finalize launch reads back. Confusion counts
    go into the caller's matrix (register histograms or atomics: no scratch)."""
    extra = 0
    has_loss = mode != 4
    if 32 < C <= 256 and has_loss and layout == "nchw":
        extra += N * (4 + 4 + 8)
    if C > 256 and layout != "nchw":
        programs = 2 * sms
        extra += 2 * programs * C * (4 if has_loss else 0) + 2 * programs * C * 4
    elif C <= 256:
        programs = sms * 8
        extra += 2 * programs * C * 4 * (2 if mode == 4 else 1)  # count rows (and true positives)
        if layout != "nchw" and has_loss:
            extra += 2 * programs * C * 4  # the class-loss rows
    return extra


def _logits(shape, dtype, layout):
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, memory_format=fmt)


def _forward(shape, dtype, layout, mode, gamma):
    def run():
        x = _logits(shape, dtype, layout)
        C, N = shape[1], x.numel() // shape[1]
        tvals = torch.empty(C, dtype=torch.float32) if mode == 2 else None
        stats = mode == 4  # the statistics pass: true positives and the confusion matrix
        # a loss keeps what its backward takes instead of a second pass, as in training
        FWD(x, torch.empty(N, dtype=torch.int64), mode, gamma, tvals, IGNORE, False, stats, stats, not stats)

    return run


def _backward(shape, dtype, layout, mode, gamma):
    def run():
        x = _logits(shape, dtype, layout)
        C, N = shape[1], x.numel() // shape[1]
        tvals = torch.empty(C, dtype=torch.float32) if mode == 2 else None
        k = kept(x, mode, gamma)
        lse = torch.empty(k * N, dtype=torch.float32) if k else None
        # the upstream gradient of class_loss only, as a weighted mean or sum gives it
        BWD(
            x,
            torch.empty(N, dtype=torch.int64),
            None,
            torch.empty(C, dtype=torch.float32),
            mode,
            gamma,
            tvals,
            IGNORE,
            lse,
        )

    return run


def cases():
    for pname, shape, dtype, layout in PROBLEMS:
        C = shape[1]
        N = 1
        for d in shape:
            N *= d
        N //= C
        logit_bytes, label_bytes = N * C * dtype.itemsize, N * 8
        for mname, mode, gamma in MODES:
            k = kept(_logits(shape, dtype, layout), mode, gamma)  # floats per pixel kept by the forward
            yield {
                "name": f"{pname}/{mname}/fwd",
                "run": _forward(shape, dtype, layout, mode, gamma),
                "elements": N * C,
                "bytes": logit_bytes + label_bytes,
                "mem_bytes": logit_bytes + label_bytes + _extra_fwd_bytes(layout, N, C, mode) + 4 * k * N,
            }
            if mode != 4:  # the statistics mode has no gradient (the op returns zeros without a launch)
                case = {
                    "name": f"{pname}/{mname}/bwd",
                    "run": _backward(shape, dtype, layout, mode, gamma),
                    "elements": N * C,
                    "bytes": 2 * logit_bytes + label_bytes,
                }
                if k:
                    case["mem_bytes"] = 2 * logit_bytes + label_bytes + 4 * k * N  # the forward's lse read
                yield case


# ------------------------------------------------------------------ trip model (see sm90_static's docstring, 4)
def _h100_programs(num_tiles, num_warps, per_sm=None, sms=132):
    """Programs the launcher starts on an H100: a persistent grid of 32 resident warps per SM (2 programs per SM
    for the chunked kernel's class-loss rows), fused_imbalance/ops/triton_loss.py, _programs. From CPU tensors it
    picks another grid; only the code outside the tile loop (set-up, the per-program rows) scales with it."""
    per_sm = per_sm or max(1, 32 // num_warps)
    return max(1, min(num_tiles, sms * per_sm))


def _static_trips(launch):
    """_fwd_static_kernel / _bwd_static_kernel: program pid walks tiles pid, pid + P, ...: the depth-0 loop runs
    num_tiles times over all programs. Small C: the classes are unrolled (no inner loop). LOOP: each tile walks
    C // GROUP groups of classes at depth 1 (the softmax backward twice: two loops, same count), the last C % GROUP
    classes unrolled after it."""
    a, k = launch["ints"], launch["constexprs"]
    loops = [a["num_tiles"], k["C"] // k["GROUP"]] if k["LOOP"] else [a["num_tiles"]]
    return {"programs": _h100_programs(a["num_tiles"], launch["num_warps"]), "loops": loops}


def _rows_trips(launch):
    """_fwd_rows_kernel / _bwd_rows_kernel: the tile loop as above, over the num_full tiles of P pixels when the
    batch is folded into the pixels (FOLD; a last, shorter tile after the loop), else over every tile; the
    classes of a tile are in registers (no inner loop)."""
    a, k = launch["ints"], launch["constexprs"]
    return {
        "programs": _h100_programs(a["num_tiles"], launch["num_warps"]),
        "loops": [a["num_full"] if k["FOLD"] else a["num_tiles"]],
    }


def _chunked_trips(launch):
    """_fwd_chunked_kernel / _bwd_chunked_kernel: the tile loop as above; when the classes do not fit one chunk
    (SINGLE false) each tile walks cdiv(C, BLOCK_C) chunks, at depth 1 (the softmax backward walks them twice: two
    loops, same count)."""
    a, k = launch["ints"], launch["constexprs"]
    loops = [a["num_tiles"]] if k["SINGLE"] else [a["num_tiles"], _cdiv(a["C"], k["BLOCK_C"])]
    per_sm = 2 if k.get("ROWSUM") else None
    return {"programs": _h100_programs(a["num_tiles"], launch["num_warps"], per_sm), "loops": loops}


def _class_sum_trips(launch):
    """_class_sum_kernel: one program of BLOCK threads per SM on an H100 (fused_imbalance/ops/triton_loss.py,
    _class_sums; from CPU tensors it starts 3). Three sibling loops at depth 0: each program zeroes its C columns,
    K classes a step; its threads walk the pixels BLOCK x programs apart (cdiv(N, BLOCK) steps over all programs);
    each program sums its C columns, K classes a step."""
    a, k = launch["ints"], launch["constexprs"]
    steps = _cdiv(a["N"], k["BLOCK"])
    programs = min(steps, 132)
    per_class = programs * _cdiv(a["C"], k["K"])
    return {"programs": programs, "loops": [[per_class, steps, per_class]]}


def _finalize_trips(launch):
    """_finalize_kernel: one program. Depth 0, in address order: the loop over blocks of classes, for a mean
    a second loop over them (the factors divided by the denominator), the loop over the rows of the bad-label
    table; depth 1, inside the first: the loops over the rows of the count table (at least one step) and,
    with class-loss sums, of the class-loss table. A table of one row (after the row reduction) has no loop:
    Triton makes an integer argument equal to 1 a constant, and a loop of one step is straight-line code."""
    a, k = launch["ints"], launch["constexprs"]
    blocks = _cdiv(a["C"], k["BC"])
    rows = [a["RB"]] if a["RB"] != 1 else []
    top = [blocks] + ([blocks] if k["RED"] == 0 else []) + [_cdiv(r, k["BR"]) for r in rows]
    tables = [a["RC"]] + ([a["RL"]] if k["SUMS"] else [])
    inner = [_cdiv(max(r, 1), k["BR"]) for r in tables if r != 1]
    return {"programs": 1, "loops": [top, inner] if inner else [top]}


def _reduce_rows_trips(launch):
    """_reduce_rows_kernel: a program per block of classes, each a loop over the rows."""
    a, k = launch["ints"], launch["constexprs"]
    programs = _cdiv(a["C"], k["BC"])
    return {"programs": programs, "loops": [programs * _cdiv(max(a["RC"], a["RL"], 1), k["BR"])]}


TRIPS = {
    "_fwd_static_kernel": _static_trips,
    "_bwd_static_kernel": _static_trips,
    "_fwd_rows_kernel": _rows_trips,
    "_bwd_rows_kernel": _rows_trips,
    "_fwd_chunked_kernel": _chunked_trips,
    "_bwd_chunked_kernel": _chunked_trips,
    "_class_sum_kernel": _class_sum_trips,
    "_finalize_kernel": _finalize_trips,
    "_reduce_rows_kernel": _reduce_rows_trips,
}
