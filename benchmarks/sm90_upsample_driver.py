"""sm90_static driver: the Triton upsampled loss ops (docs/DESIGN.md §10) on Cityscapes- and ADE20K-sized heads.

    python sm90_static.py benchmarks/sm90_upsample_driver.py --cache DIR

Low-resolution logits (B, C, h, w) against full-resolution int64 labels (B, H, W), bilinear,
align_corners=False, NCHW. Launches go through the public ops torch.ops.fused_imbalance.
triton_upsample_loss_fwd / _bwd; the trip models (TRIPS) name the kernels' arguments and follow the
loops of fused_imbalance/ops/triton_upsample_kernels.py.

Byte floor (docs/DESIGN.md §10): forward = labels + the low-resolution logits once; backward = labels +
2x the low-resolution logits (read) + 1x (the gradient written). ``mem_bytes`` adds what a backward
with class groups (C > _FUSED_C) really moves beyond it: for the softmax focal losses the gradient
launch reads what the forward kept per pixel (lse, and with γ != 0 the focal weight: 1-2 floats),
which the forward writes; otherwise a coefficient launch reads the labels and the logits once more and
writes a and lse (2 floats per full-resolution pixel); and a forward with a loss and more than 32
classes, whose per-pixel loss is written and read back, with the labels, by the class-sum kernel.
"""

import importlib

import torch

from benchmarks.sm90_driver import _class_sum_trips, _finalize_trips, _reduce_rows_trips  # shared launchers

T = importlib.import_module("fused_imbalance.ops.triton_upsample")
try:
    FWD = torch.ops.fused_imbalance.triton_upsample_loss_fwd
    BWD = torch.ops.fused_imbalance.triton_upsample_loss_bwd
except (AttributeError, RuntimeError) as e:
    raise SystemExit(f"fused_imbalance's Triton upsampled ops are not registered ({e}): is triton installed?")

PROBLEMS = [  # name, low-resolution logits (B, C, h, w), full-resolution (H, W), dtype
    ("city_f32", (8, 19, 128, 256), (512, 1024), torch.float32),
    ("city_bf16", (8, 19, 128, 256), (512, 1024), torch.bfloat16),
    ("ade_f32", (16, 150, 128, 128), (512, 512), torch.float32),
    ("ade_bf16", (16, 150, 128, 128), (512, 512), torch.bfloat16),
]
MODES = [("ce", 0, 0.0), ("focal", 0, 2.0), ("stats", 4, 0.0)]  # name, loss_mode, gamma
IGNORE = -100
BILINEAR = 1
ALIGN_CORNERS = False


def _cdiv(a, b):
    return -(-a // b)


def _forward(shape, HW, dtype, mode, gamma):
    def run():
        x = torch.empty(shape, dtype=dtype)
        y = torch.empty((shape[0],) + HW, dtype=torch.int64)
        # as in training: the statistics pass with its counts into a matrix; a loss (its mean) keeps its lse
        # for the backward
        conf = torch.empty((shape[1], shape[1]), dtype=torch.int64) if mode == 4 else None
        FWD(
            x,
            y,
            BILINEAR,
            ALIGN_CORNERS,
            None,
            None,
            conf,
            mode,
            gamma,
            IGNORE,
            1 if mode == 4 else 0,
            0,
            mode == 4,
            False,
            mode != 4,
        )

    return run


def _backward(shape, HW, dtype, mode, gamma):
    def run():
        x = torch.empty(shape, dtype=dtype)
        y = torch.empty((shape[0],) + HW, dtype=torch.int64)
        # the forward's log-sum-exp (and focal weight), which autograd passes where the forward keeps it
        kept = T.keeps_lse(x, mode, gamma)
        lse = torch.empty(kept * y.numel(), dtype=torch.float32) if kept else None
        # a mean's backward: its scalar upstream gradient and the per-class factor w_c / D
        BWD(
            x,
            y,
            BILINEAR,
            ALIGN_CORNERS,
            torch.empty((), dtype=torch.float32),
            torch.empty(shape[1], dtype=torch.float32),
            None,
            lse,
            mode,
            gamma,
            IGNORE,
        )

    return run


def cases():
    for pname, shape, HW, dtype in PROBLEMS:
        B, C, h, w = shape
        N = B * HW[0] * HW[1]
        logit_bytes, label_bytes = B * C * h * w * dtype.itemsize, N * 8
        for mname, mode, gamma in MODES:
            case = {
                "name": f"{pname}/{mname}/fwd",
                "run": _forward(shape, HW, dtype, mode, gamma),
                "elements": N * C,
                "bytes": logit_bytes + label_bytes,
            }
            # floats per pixel kept for the backward
            kept = (
                T.keeps_lse(torch.empty(shape, dtype=dtype, device="meta"), mode, gamma) if mode != 4 else 0
            )
            if C > T._REG_STATS_C and mode != 4:
                # the class sums of more than 32 classes: the per-pixel loss written and read back with the labels
                case["mem_bytes"] = logit_bytes + 2 * label_bytes + 2 * N * 4 + kept * N * 4
            elif kept:
                case["mem_bytes"] = (
                    logit_bytes + label_bytes + kept * N * 4
                )  # lse (and the focal weight) written
            yield case
            if mode != 4:
                floor = 2 * logit_bytes + logit_bytes + label_bytes
                case = {
                    "name": f"{pname}/{mname}/bwd",
                    "run": _backward(shape, HW, dtype, mode, gamma),
                    "elements": N * C,
                    "bytes": floor,
                }
                if kept:
                    # the gradient launch reads the forward's lse (and focal weight), float32 per
                    # full-resolution pixel; no coefficient launch
                    case["mem_bytes"] = floor + kept * N * 4
                elif not T._bwd_fused(C, mode, dtype == torch.float64):
                    scratch = 2 * N * 4  # a and lse (float32) per full-resolution pixel
                    case["mem_bytes"] = floor + logit_bytes + label_bytes + 2 * scratch
                yield case


# ------------------------------------------------------------------ trip models
def _segments(n_in, n_out):
    """Lengths of the output segments of each input index (triton_upsample._segments), on the host."""
    i0 = T._axis(n_in, n_out, T.Interp.BILINEAR, ALIGN_CORNERS, torch.float32, "cpu")[0]
    start, end = T._segments(i0, n_in)
    return (end - start).tolist()


def _programs(launch):
    p = 1
    for g in launch["grid"]:
        p *= g
    return p


def _fwd_trips(launch):
    """_up_fwd_kernel and _up_coef_kernel (the same walk): per program the low-resolution rows of its band
    (depth 0, summed over programs), per row the steps of TY output rows of its segment, and in them the loop
    over class groups (not CACHE)."""
    a, k = launch["ints"], launch["constexprs"]
    h, TY = a["h"], k["TY"]
    seg = _segments(h, a["H"])
    rows = (
        _programs(launch) // a["bands"] * h
    )  # every program of an image's column block walks h / bands rows
    steps = sum(_cdiv(s, TY) for s in seg) / h
    loops = [rows, steps]
    if not k["CACHE"]:
        loops.append(k["C"] // k["GROUP"])
    return {"loops": loops}


def _bwd_trips(launch):
    """_up_bwd_kernel: (the class-group loop when LOOP), the band's low-resolution rows with the halo row
    above, per row the steps of TJ columns over the block's longest column segment, per step the steps of
    TY rows of the row's segment."""
    a, k = launch["ints"], launch["constexprs"]
    h, w, R, TJ, TY, lanes = a["h"], a["w"], k["R"], k["TJ"], k["TY"], k["BLOCK_X"]
    xblocks, bands = a["xblocks"], a["bands"]
    B = _programs(launch) // (xblocks * bands)
    rows_seg = _segments(h, a["H"])
    cols_seg = _segments(w, a["W"])
    halo = 1 if k["TAP2_X"] else 0
    spans = []
    for xb in range(xblocks):
        lo = max(0, xb * (lanes - halo) - halo)
        hi = min(w, xb * (lanes - halo) - halo + lanes)
        spans.append(_cdiv(max(cols_seg[lo:hi]), TJ))
    rows = 0  # low-resolution rows walked per image and column block, halos included
    ysteps = 0
    empty = 0  # of them, rows without output rows (a downsampled axis)
    for band in range(bands):
        ya, yb = band * R, min(band * R + R, h)
        ys = max(ya - 1, 0) if k["TAP2_Y"] else ya
        rows += yb - ys
        ysteps += sum(_cdiv(rows_seg[y], TY) for y in range(ys, yb))
        empty += sum(rows_seg[y] == 0 for y in range(ys, yb))
    programs = B * xblocks * bands
    total_rows = B * xblocks * rows
    jsteps = sum(spans) / xblocks
    loops = [total_rows, jsteps, ysteps / rows]
    if k["LOOP"]:
        # the loop over full groups around the walk, then the walk of the last C % GROUP classes (if any)
        nest = [programs * (k["C"] // k["GROUP"]), rows / bands, jsteps, ysteps / rows]
        if k["C"] % k["GROUP"]:
            # in the last classes' walk the compiler (triton 3.9) unswitches the column steps on an empty row
            # segment: a second, empty column loop after the first, walked only in rows without output rows
            loops = [
                [nest[0], total_rows],
                [nest[1], jsteps, jsteps * empty / rows],
                [nest[2], ysteps / rows],
                [nest[3]],
            ]
        else:
            loops = nest
    return {"loops": loops}


TRIPS = {
    "_up_fwd_kernel": _fwd_trips,
    "_up_coef_kernel": _fwd_trips,
    "_up_bwd_kernel": _bwd_trips,
    "_class_sum_kernel": _class_sum_trips,
    "_finalize_kernel": _finalize_trips,
    "_reduce_rows_kernel": _reduce_rows_trips,
}
