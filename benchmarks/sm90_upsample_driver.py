"""sm90_static driver: the Triton upsampled loss ops (DESIGN.md §10) on Cityscapes- and ADE20K-sized heads.

    python ../shared/tools/sm90_static/sm90_static.py benchmarks/sm90_upsample_driver.py --cache DIR

Low-resolution logits (B, C, h, w) against full-resolution int64 labels (B, H, W), bilinear,
align_corners=False, NCHW. Launches go through the public ops torch.ops.fused_imbalance.
triton_upsample_loss_fwd / _bwd; the trip models (TRIPS) name the kernels' arguments.

Byte floor (DESIGN.md §10): forward = labels + the low-resolution logits once; backward = labels +
2x the low-resolution logits (read) + 1x (the gradient written). ``mem_bytes`` adds what the
backward really moves beyond it: the labels read a second time (the coefficient kernel and the
gather kernel both read them) and the per-pixel scratch (a, lse: 2 floats per full-resolution
pixel for the softmax modes) written once and read once.
"""
import importlib

import torch

importlib.import_module("fused_imbalance.ops.triton_upsample")
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


def _cdiv(a, b):
    return -(-a // b)


def _forward(shape, HW, dtype, mode, gamma):
    def run():
        x = torch.empty(shape, dtype=dtype)
        y = torch.empty((shape[0],) + HW, dtype=torch.int64)
        FWD(x, y, BILINEAR, False, mode, gamma, None, IGNORE, False, mode == 4, mode == 4)
    return run


def _backward(shape, HW, dtype, mode, gamma):
    def run():
        x = torch.empty(shape, dtype=dtype)
        y = torch.empty((shape[0],) + HW, dtype=torch.int64)
        # the upstream gradient of class_loss only, as a weighted mean or sum gives it
        BWD(x, y, None, torch.empty(shape[1], dtype=torch.float32), BILINEAR, False, mode, gamma, None, IGNORE)
    return run


def cases():
    for pname, shape, HW, dtype in PROBLEMS:
        B, C, h, w = shape
        N = B * HW[0] * HW[1]
        logit_bytes, label_bytes = B * C * h * w * dtype.itemsize, N * 8
        for mname, mode, gamma in MODES:
            yield {"name": f"{pname}/{mname}/fwd", "run": _forward(shape, HW, dtype, mode, gamma),
                   "elements": N * C, "bytes": logit_bytes + label_bytes}
            if mode != 4:
                floor = 2 * logit_bytes + logit_bytes + label_bytes
                scratch = 2 * N * 4  # a and lse (float32) per full-resolution pixel
                yield {"name": f"{pname}/{mname}/bwd", "run": _backward(shape, HW, dtype, mode, gamma),
                       "elements": N * C, "bytes": floor, "mem_bytes": floor + label_bytes + 2 * scratch}


# ------------------------------------------------------------------ trip models
def _programs(launch):
    p = 1
    for g in launch["grid"]:
        p *= g
    return p


def _h100_programs(num_tiles, num_warps, sms=132):
    """The forward's grid on an H100 (triton_upsample._programs sizes it from the SM count)."""
    cap = sms * max(1, 16 // num_warps) * 8
    per_prog = _cdiv(num_tiles, max(1, min(num_tiles, cap)))
    return _cdiv(num_tiles, per_prog)


def _fwd_trips(launch):
    """_up_fwd_kernel: the tile loop (num_tiles over all programs), in it the class-chunk loop."""
    a, k = launch["ints"], launch["constexprs"]
    return {"programs": _h100_programs(a["num_tiles"], launch["num_warps"]),
            "loops": [a["num_tiles"], _cdiv(a["C"], k["BLOCK_C"])]}


def _coef_trips(launch):
    """_up_coef_kernel: one tile per program; the class-chunk loop for the softmax modes only."""
    a, k = launch["ints"], launch["constexprs"]
    if k["MODE"] in (0, 3):
        return {"loops": [_programs(launch) * _cdiv(a["C"], k["BLOCK_C"])]}
    return {"loops": []}


def _gather_trips(launch):
    """_up_gather_kernel: class chunks per program, in each the rows that read the element (span_y)."""
    a, k = launch["ints"], launch["constexprs"]
    return {"loops": [_programs(launch) * _cdiv(a["C"], k["BLOCK_C"]), a["span_y"]]}


def _class_sum_trips(launch):
    return {"loops": [_programs(launch) * _cdiv(launch["ints"]["per_seg"], launch["constexprs"]["BLOCK_N"])]}


TRIPS = {"_up_fwd_kernel": _fwd_trips, "_up_coef_kernel": _coef_trips, "_up_gather_kernel": _gather_trips,
         "_up_class_sum_kernel": _class_sum_trips}
