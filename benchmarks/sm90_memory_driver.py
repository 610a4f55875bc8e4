"""sm90_memory / sm90_static driver: every pass of benchmarks/sm90_driver.py and benchmarks/sm90_upsample_driver.py,
and the Dice family's ("dice_...").

    python sm90_static.py benchmarks/sm90_memory_driver.py --json /tmp/static.json
    TRITON_INTERPRET=1 python sm90_memory.py benchmarks/sm90_memory_driver.py \\
        --static /tmp/static.json [--sites] [--only SUBSTR]

cases(): the full-size cases of the two drivers (compile only, for sm90_static, with their trip models), the
upsampled ones named "up_..." here, then the Dice passes (trip models here). cases(small=True), for sm90_memory:
the same passes on small real tensors (random logits, labels in [0, C)) that keep the tile structure of the
full-size launch -- the same C, dtype, layout and stride pattern (NCHW keeps two images; channels_last folds the
batch into the pixels as at full size), the same constexprs (ROWS, VEC, GROUP, LOOP, ...: sm90_memory compares
them with the full-size compile given by --static and flags a mismatch with "!") -- and a few tiles per program.
Under the interpreter the launchers take larger tiles to cut its per-step cost; here they take the GPU's
(triton_loss._INTERPRET_TILE_SCALE = 1, the upsampled launchers' GPU tiling), so that the traced accesses are the
H100's.

Every call goes through the public ops with the arguments of the two drivers: a loss's forward keeps what its
backward takes where the backend keeps anything (need_lse, as autograd asks in training), and the backward gets
it (values from torch: what is traced is the addresses). ``bytes`` is the byte floor of the small tensors: the
logits and the int64 labels read once (forward), the logits read and the gradient written once more (backward;
the upsampled backward reads the low-resolution logits twice, see its driver).
"""

import importlib
import os
import pathlib
import sys

import torch

import fused_imbalance

try:
    import benchmarks.sm90_driver as D
    import benchmarks.sm90_upsample_driver as U
except ImportError:  # run from elsewhere: the project's root is the installed package's parent
    sys.path.insert(0, str(pathlib.Path(fused_imbalance.__file__).resolve().parents[1]))
    import benchmarks.sm90_driver as D
    import benchmarks.sm90_upsample_driver as U

TL = importlib.import_module("fused_imbalance.ops.triton_loss")
TU = importlib.import_module("fused_imbalance.ops.triton_upsample")
TD = importlib.import_module("fused_imbalance.ops.triton_dice")
DICE_PARAMS = importlib.import_module("fused_imbalance.ops.dice").params()
forget_plans = importlib.import_module("fused_imbalance.ops._triton_host").forget_plans
FWD = torch.ops.fused_imbalance.triton_loss_fwd
BWD = torch.ops.fused_imbalance.triton_loss_bwd
UP_FWD = torch.ops.fused_imbalance.triton_upsample_loss_fwd
UP_BWD = torch.ops.fused_imbalance.triton_upsample_loss_bwd
DICE_FWD = torch.ops.fused_imbalance.triton_dice_fwd
DICE_BWD = torch.ops.fused_imbalance.triton_dice_bwd

SMALL = {  # sm90_driver's problem -> a small shape with its tiles: NCHW 2 images of 2048 pixels (2-4 tiles of
    # 512 float32 / 1024 16-bit pixels each), channels_last 2048 pixels folded, 64 rows of 8142 classes
    "city_nchw_f32": (2, 19, 32, 64),
    "city_nchw_bf16": (2, 19, 32, 64),
    "city_cl_f32": (2, 19, 32, 32),
    "city_cl_bf16": (2, 19, 32, 32),
    "ade_nchw_f32": (2, 150, 32, 64),
    "ade_nchw_bf16": (2, 150, 32, 64),
    "ade_cl_f32": (2, 150, 32, 32),
    "rows8142_f32": (64, 8142),
}
UP_SMALL = {  # sm90_upsample_driver's problem -> small (B, C, h, w) logits and (H, W) labels: the same scale
    # factor (4) and the full size's lanes: a forward block of 128 output columns, and backward blocks of 32
    # lanes (31 columns and the halo; w = 32 would take 64, as two blocks of 32 waste as many lanes)
    "city_f32": ((2, 19, 8, 31), (32, 124)),
    "city_bf16": ((2, 19, 8, 31), (32, 124)),
    "ade_f32": ((2, 150, 8, 31), (32, 124)),
    "ade_bf16": ((2, 150, 8, 31), (32, 124)),
}


# SM90_MEMORY_SCALE=k: the plain passes' small shapes with k times the pixels (rows), the same tiles and programs
# (each program walks k times as many): what of a pass's traffic beyond the floor is its fixed part (the
# programs' rows, the finalize, partly used lines at the edges), which shrinks as 1/k, and what is per pixel.
SCALE = int(os.environ.get("SM90_MEMORY_SCALE", "1"))


def _scaled(shape, k):
    """``shape`` with k times the pixels: the height of an image (B, C, H, W), the rows of (N, C)."""
    if len(shape) == 4:
        return (shape[0], shape[1], shape[2] * k, shape[3])
    return (shape[0] * k, shape[1])


def _data(shape, dtype, layout, labels):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, shape[1], labels, generator=g)


def _kept_lse(x, kept, N):
    """What the forward would keep (kept floats per pixel): the lse of each pixel's logits, then zeros."""
    lse = torch.zeros(kept * N, dtype=torch.float32)
    if kept and x.dim() >= 2 and N == x.numel() // x.shape[1]:
        lse[:N] = torch.logsumexp(x.float().movedim(1, -1).reshape(N, x.shape[1]), dim=1)
    return lse


def _small_run(shape, dtype, layout, mode, gamma, backward):
    def run():
        TL._INTERPRET_TILE_SCALE = 1  # the GPU's tiles (see the docstring)
        C = shape[1]
        N = 1
        for d in shape:
            N *= d
        N //= C
        x, y = _data(shape, dtype, layout, (N,))
        tv = torch.linspace(1.0, 2.0, C) if mode == 2 else None
        kept = TL.keeps_lse(x, mode, gamma) if mode != 4 else 0
        if backward:
            BWD(x, y, None, torch.ones(C), tv, _kept_lse(x, kept, N) if kept else None, mode, gamma, D.IGNORE)
        else:
            stats = mode == 4
            conf = torch.zeros((C, C), dtype=torch.int64) if stats else None
            red = D.Reduction.SUM if stats else D.Reduction.MEAN
            FWD(
                x,
                y,
                None,
                tv,
                conf,
                mode,
                gamma,
                D.IGNORE,
                int(red),
                int(D.Weighting.NONE),
                stats,
                False,
                kept > 0,
            )

    return run


def _up_small_run(shape, HW, dtype, mode, gamma, backward):
    def run():
        saved = TU._interpret, TU._INTERPRET_SUM_SCALE
        TU._interpret = lambda: False  # the GPU's tiling (see the docstring)
        TU._INTERPRET_SUM_SCALE = 1  # and the class-sum kernel's blocks (beyond 32 classes) as on the GPU
        forget_plans()  # no plan of the interpreter's tiling, and none of the GPU's kept after
        try:
            x, y = _data(shape, dtype, "nchw", (shape[0],) + HW)
            kept = TU.keeps_lse(x, mode, gamma) if mode != 4 else 0
            if backward:
                UP_BWD(
                    x,
                    y,
                    U.BILINEAR,
                    U.ALIGN_CORNERS,
                    torch.ones(()),
                    torch.ones(shape[1]),
                    None,
                    torch.zeros(kept * y.numel()) if kept else None,
                    mode,
                    gamma,
                    U.IGNORE,
                )
            else:
                conf = torch.zeros((shape[1], shape[1]), dtype=torch.int64) if mode == 4 else None
                UP_FWD(
                    x,
                    y,
                    U.BILINEAR,
                    U.ALIGN_CORNERS,
                    None,
                    None,
                    conf,
                    mode,
                    gamma,
                    U.IGNORE,
                    1 if mode == 4 else 0,
                    0,
                    mode == 4,
                    False,
                    kept > 0,
                )
        finally:
            TU._interpret, TU._INTERPRET_SUM_SCALE = saved
            forget_plans()

    return run


def cases(small=False):
    if not small:
        yield from D.cases()
        for case in U.cases():
            yield dict(case, name="up_" + case["name"])
        yield from _dice_cases(False)
        return
    for pname, _, dtype, layout in D.PROBLEMS:
        shape = _scaled(SMALL[pname], SCALE)
        C = shape[1]
        N = shape[0] * (shape[2] * shape[3] if len(shape) == 4 else 1)
        logit_bytes, label_bytes = N * C * dtype.itemsize, N * 8
        for mname, mode, gamma in D.MODES:
            yield {
                "name": f"{pname}/{mname}/fwd",
                "run": _small_run(shape, dtype, layout, mode, gamma, False),
                "bytes": logit_bytes + label_bytes,
            }
            if mode != 4:
                yield {
                    "name": f"{pname}/{mname}/bwd",
                    "run": _small_run(shape, dtype, layout, mode, gamma, True),
                    "bytes": 2 * logit_bytes + label_bytes,
                }
    for pname, _, _, dtype in U.PROBLEMS:
        shape, HW = UP_SMALL[pname]
        B, C, h, w = shape
        logit_bytes, label_bytes = B * C * h * w * dtype.itemsize, B * HW[0] * HW[1] * 8
        for mname, mode, gamma in U.MODES:
            yield {
                "name": f"up_{pname}/{mname}/fwd",
                "run": _up_small_run(shape, HW, dtype, mode, gamma, False),
                "bytes": logit_bytes + label_bytes,
            }
            if mode != 4:
                yield {
                    "name": f"up_{pname}/{mname}/bwd",
                    "run": _up_small_run(shape, HW, dtype, mode, gamma, True),
                    "bytes": 3 * logit_bytes + label_bytes,
                }
    yield from _dice_cases(True)


# ---------------------------------------------------------------- the Dice family (fused_imbalance.ops.triton_dice)
# The Dice loss and Dice + cross-entropy (DiceFlags: 1 the background class a term, 16 the cross-entropy), per
# image (8 groups of sums), the mean: a training step's forward (the statistics pass, the reduce launch of its
# programs' rows, the finalize) and backward (one pass), on the plain drivers' problems but the (N, 8142) rows.
DICE_MODES = [("dice", 1), ("dicece", 1 | 16)]
DICE_PROBLEMS = [p for p in D.PROBLEMS if p[3] != "rows"]


def _dice_programs(tiles, G, device):
    """An H100's persistent programs per group (triton_dice._programs_per_group on a GPU) whatever the device:
    the rows table, and so whether a reduce launch comes before the finalize, are the GPU's."""
    return max(1, min(tiles, D._cdiv(132 * max(1, TL._RESIDENT_WARPS // TD._WARPS), max(G, 1))))


def _dice_inputs(shape, dtype, layout, small):
    """Logits and labels: random small tensors (sm90_memory traces them), or full-size empty ones (sm90_static
    only compiles)."""
    if not small:
        x = D._logits(shape, dtype, layout)
        return x, torch.empty(x.numel() // shape[1], dtype=torch.int64)
    x = _data(shape, dtype, layout, (1,))[0]
    g = torch.Generator().manual_seed(1)
    return x, torch.randint(0, shape[1], (x.numel() // shape[1],), generator=g)


def _dice_run(shape, dtype, layout, small, flags, backward):
    def run():
        saved = TD._programs_per_group, TD._INTERPRET_TILE_SCALE, TD._FINALIZE_ELEMS
        TD._programs_per_group, TD._INTERPRET_TILE_SCALE = _dice_programs, 1  # the GPU's grid and tiles
        TD._FINALIZE_ELEMS = 0  # the rows reduced by their own launch before the finalize, as at full size
        forget_plans()
        try:
            x, y = _dice_inputs(shape, dtype, layout, small)
            C = x.shape[1]
            if backward:
                G = x.shape[0]
                coef = torch.ones((G, 2, C), dtype=torch.float32)
                DICE_BWD(
                    x, y, coef, torch.ones(C) if flags & 16 else None, torch.ones(()), 0, flags, D.IGNORE, 0
                )
            else:
                DICE_FWD(x, y, None, None, None, 0, 0, flags, DICE_PARAMS, D.IGNORE, 0, True, True)
        finally:
            TD._programs_per_group, TD._INTERPRET_TILE_SCALE, TD._FINALIZE_ELEMS = saved
            forget_plans()

    return run


def _dice_cases(small):
    for pname, full, dtype, layout in DICE_PROBLEMS:
        shape = _scaled(SMALL[pname], SCALE) if small else full
        C = shape[1]
        N = shape[0] * shape[2] * shape[3]
        logit_bytes, label_bytes = N * C * dtype.itemsize, N * 8
        for mname, flags in DICE_MODES:
            for backward in (False, True):
                case = {
                    "name": f"dice_{pname}/{mname}/{'bwd' if backward else 'fwd'}",
                    "run": _dice_run(shape, dtype, layout, small, flags, backward),
                    "bytes": (2 if backward else 1) * logit_bytes + label_bytes,
                }
                if not small:
                    case["elements"] = N * C
                yield case


def _dice_fwd_trips(launch):
    """_dice_fwd_kernel: a (P, G) grid, each group's programs walk its tiles (the depth-0 loop: the tiles of
    every group over all programs); LOOP (beyond 24 classes): per tile, the softmax's loop over class
    groups, then the sums' loop over SUM_GROUP classes (two loops at depth 1)."""
    a, k = launch["ints"], launch["constexprs"]
    G = launch["grid"][1]
    loops = [a["tiles_per_g"] * G]
    if k["LOOP"]:
        loops.append([k["C"] // k["GROUP"], k["C"] // k["SUM_GROUP"]])
    return {"programs": launch["grid"][0] * G, "loops": loops}


def _dice_bwd_trips(launch):
    """_dice_bwd_kernel: the tile loop as the forward's; LOOP: per tile, the max/exp loop over class groups,
    then the gradient's (two loops at depth 1, the same count)."""
    a, k = launch["ints"], launch["constexprs"]
    G = launch["grid"][1]
    loops = [a["tiles_per_g"] * G]
    if k["LOOP"]:
        loops.append([k["C"] // k["GROUP"]] * 2)
    return {"programs": launch["grid"][0] * G, "loops": loops}


def _dice_reduce_trips(launch):
    """_dice_reduce_kernel: a (G, class blocks) grid; each program sums its rows for I, P, G, CE (four loops
    over R rows, BR a step); program (0, 0) then the bad-label rows (a fifth loop, RB rows)."""
    a, k = launch["ints"], launch["constexprs"]
    programs = launch["grid"][0] * launch["grid"][1]
    per = programs * D._cdiv(a["R"], k["BR"])
    return {"programs": programs, "loops": [[per, per, per, per, D._cdiv(a["RB"], k["BR"])]]}


def _dice_finalize_trips(launch):
    """_dice_finalize_kernel after a reduce launch (REDUCE and BAD off), the Dice or Tversky terms: the loop
    over the G groups, each over the class blocks. With the cross-entropy, then a loop over the class blocks
    with the groups' loop inside, which ptxas unrolls by 4 where a block of classes is a warp's 32 (a loop of
    G // 4, then one of the G % 4 left), a loop of 3 instructions (one trip counted), and the loop over the
    class blocks that stores the factors. One program: a few microseconds whatever the counts."""
    a, k = launch["ints"], launch["constexprs"]
    assert not k["REDUCE"] and not k["BAD"] and k["KIND"] != 2, "a finalize these cases do not make"
    G, blocks = a["G"], D._cdiv(a["C"], k["BC"])
    if k["CE"]:
        inner = [G // 4, G % 4] if k["BC"] <= 32 else [G]
        return {"programs": 1, "loops": [[G, blocks, 1, blocks], [blocks] + inner]}
    return {"programs": 1, "loops": [[G], [blocks]]}


TRIPS = {
    **D.TRIPS,
    **U.TRIPS,
    "_dice_fwd_kernel": _dice_fwd_trips,
    "_dice_bwd_kernel": _dice_bwd_trips,
    "_dice_reduce_kernel": _dice_reduce_trips,
    "_dice_finalize_kernel": _dice_finalize_trips,
}  # sm90_static's trip models: the two drivers', the Dice kernels'


def _persistent(launch):
    """Programs per SM of the persistent grids on an H100 (_triton_host._programs): _RESIDENT_WARPS warps per SM,
    _ROWSUM_PROGRAMS_PER_SM when each program owns a class-loss row."""
    if launch["constexprs"].get("ROWSUM"):
        return TL._ROWSUM_PROGRAMS_PER_SM
    return max(1, TL._RESIDENT_WARPS // launch["num_warps"])


RESIDENT = {
    "_fwd_static_kernel": _persistent,
    "_bwd_static_kernel": _persistent,
    "_fwd_rows_kernel": _persistent,
    "_bwd_rows_kernel": _persistent,
    "_fwd_chunked_kernel": _persistent,
    "_bwd_chunked_kernel": _persistent,
    "_class_sum_kernel": lambda launch: 1,
    "_dice_fwd_kernel": _persistent,  # 8 programs of 4 warps per SM over all the groups (_dice_programs)
    "_dice_bwd_kernel": _persistent,
}  # one program per SM (_triton_host._class_sums)
