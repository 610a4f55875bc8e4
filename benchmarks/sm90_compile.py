"""Compile the Triton kernels for the H100 (sm_90a) with no GPU and report registers and spills.

    python benchmarks/sm90_compile.py [--all] > report.json

A stand-in CUDA driver reports an sm_90 target, so Triton compiles with the ptxas bundled in
its wheel; every launch the launcher makes is turned into a compile (nothing runs), so the
kernels are built exactly as ``fused_imbalance/ops/triton_loss.py`` configures them, from
full-size ``torch.empty`` CPU tensors (pages never touched cost no memory). ptxas ``-v``, with
Triton's own flags, gives registers and spill bytes. Prints one JSON record per compiled kernel.

``VARIANTS`` (the default set, run by ``tests/test_sm90_compile.py``, with ``UPSAMPLE_VARIANTS``,
``SELECT_VARIANTS``, ``OHEM_VARIANTS`` and ``RECALL_EMA_VARIANTS``) reaches every kernel and
every code path of each: all loss modes, every flag (per-pixel loss, true positives, confusion
in a per-program register histogram and by atomics), statistics in registers and in rows,
unrolled classes and the loop over class groups, every vector width (float64, float32, 16-bit
NCHW; gathered channels_last), single and multi-chunk chunked kernels, the class-sum kernel,
float64. It is a representative set, not every combination (that takes tens of minutes on two
cores): C is a compile-time constant of the static kernels, so each class count is its own
kernel, and modes x dtypes x layouts multiply. ``--all`` adds every mode x dtype x layout for
C = 19, 150 and 8142 rows.
"""

import json
import os
import re
import subprocess
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter would run kernels instead of compiling

import torch  # noqa: E402
import triton  # noqa: E402,F401
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.backends.nvidia.driver import ty_to_cpp  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _StandInSm90(DriverBase):
    """Just enough of a CUDA driver for Triton to compile for sm_90 without a device."""

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty):
        return ty_to_cpp(ty)

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def clear_cache(self, cache):
        pass

    def get_benchmarker(self):
        raise RuntimeError("nothing runs under the stand-in sm_90 driver")

    get_empty_cache_for_benchmark = get_benchmarker


_COMPILED = []


def _install():
    driver.set_active(_StandInSm90())
    compile_only = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = compile_only(self, *args, grid=grid, warmup=True, **kwargs)
        bound = dict(zip(self.arg_names, args))
        bound.update(kwargs)
        constexprs = {p.name: bound.get(p.name, p.default) for p in self.params if p.is_constexpr}
        _COMPILED.append((kernel, {k: str(v) for k, v in constexprs.items()}))
        return kernel

    JITFunction.run = run


def _ptxas_usage(kernel):
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` with Triton's flags."""
    import tempfile

    md = kernel.metadata
    flags = ["-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(90)}"]
    if not getattr(md, "enable_fp_fusion", True):
        flags.append("--fmad=false")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(kernel.asm["ptx"])
        log = subprocess.run(
            [get_ptxas(90).path, *flags, src, "-o", os.path.join(tmp, "k.o")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, int(m.group(1)), int(m.group(2))


_DTYPES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_MODES = {
    "ce": (0, 0.0),
    "focal": (0, 2.0),
    "sigfocal": (1, 2.0),
    "mselogit": (2, 0.0),
    "msesoftmax": (3, 0.0),
    "stats": (4, 0.0),
}

# (C, layout, dtype, mode, need_pixel_loss, need_tp, need_confusion); each forward's backward too.
# need_pixel_loss: a weighted "none"; need_tp: the recall weights; need_confusion "global": integer atomics
# into the caller's matrix instead of the per-program register histogram, and the finalize's rows reduced
# by a launch of their own first.
VARIANTS = [
    # static kernels, every class unrolled, statistics in registers
    (19, "nchw", "bf16", "ce", False, False, False),  # 16-bit vectors of 4
    (19, "nchw", "f32", "focal", True, True, True),  # every flag, per-program confusion
    (19, "cl", "f32", "msesoftmax", True, False, False),  # gathered channels_last pixels
    (19, "nchw", "bf16", "sigfocal", False, False, False),
    (19, "nchw", "bf16", "focal", True, False, False),  # 16-bit softmax terms: backward groups of 4
    (40, "nchw", "bf16", "msesoftmax", True, False, False),  # and their forward's loop groups of 8
    (19, "cl", "bf16", "mselogit", False, False, False),
    (
        19,
        "nchw",
        "bf16",
        "mselogit",
        False,
        False,
        False,
    ),  # the static kernels' MODE 2 (cl takes the rows kernels)
    (19, "nchw", "f32", "stats", False, True, True),
    (19, "nchw", "f64", "sigfocal", True, True, True),  # float64: vectors of 2, the most registers
    # static kernels, a loop over class groups, statistics in rows, the class-sum kernel
    (150, "nchw", "f32", "focal", False, True, True),
    (150, "cl", "bf16", "sigfocal", False, False, False),
    (150, "nchw", "f32", "sigfocal", False, False, False),  # spilled before its exponentials were ex2
    (150, "nchw", "f64", "msesoftmax", False, False, False),
    (40, "cl", "f32", "stats", False, True, "global"),
    # chunked kernels: NCHW chunks with the class-sum kernel; rows/channels_last with class rows
    (300, "nchw", "f32", "focal", True, True, True),
    (300, "nchw", "f64", "sigfocal", False, False, False),  # its backward spilled with 64 x 64 chunks
    (300, "cl", "f64", "ce", False, False, False),
    (8142, "rows", "f32", "sigfocal", False, True, True),
]


def _all_variants():
    seen = set(VARIANTS)
    for C, layout in [(19, "nchw"), (19, "cl"), (150, "nchw"), (150, "cl"), (8142, "rows")]:
        for dt in _DTYPES:
            for m in _MODES:
                v = (C, layout, dt, m, False, m == "stats", m == "stats")
                if v not in seen:
                    seen.add(v)
                    yield v


def _logits(C, layout, dtype):
    if layout == "rows":
        return torch.empty((4096, C), dtype=dtype)
    x = torch.empty((2, C, 128, 256), dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "cl" else x


def _call(need_pl, need_tp, need_conf, mode, C, acc):
    """(weight, confusion, reduction, weighting) of a forward call with these flags: the per-pixel loss
    is a weighted "none" (its in-kernel weighting), true positives come with the recall weights."""
    from fused_imbalance.ops import Reduction, Weighting

    conf = torch.empty((C, C), dtype=torch.int64) if need_conf else None
    if mode == 4:
        return None, conf, int(Reduction.SUM), int(Weighting.NONE)
    if need_pl:
        return torch.empty(C, dtype=acc), conf, int(Reduction.NONE), int(Weighting.GENERAL)
    return None, conf, int(Reduction.MEAN), int(Weighting.RECALL if need_tp else Weighting.NONE)


def compile_variant(C, layout, dt, mode_name, need_pl, need_tp, need_conf):
    from fused_imbalance.ops import triton_loss as T

    dtype = _DTYPES[dt]
    mode, gamma = _MODES[mode_name]
    x = _logits(C, layout, dtype)
    N = x.numel() // C
    y = torch.empty(N, dtype=torch.int64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tv = torch.empty(C, dtype=acc) if mode in (2, 3) else None
    from fused_imbalance.ops import _triton_host as H

    start = len(_COMPILED)
    saved = T._CONF_HIST_CELLS, H._FINALIZE_ELEMS
    if need_conf == "global":  # and the row reduction ahead of the finalize (rows x classes too many)
        T._CONF_HIST_CELLS, H._FINALIZE_ELEMS = 0, 0
    try:
        weight, conf, red, wt = _call(need_pl, need_tp, need_conf, mode, C, acc)
        T._forward(x, y, weight, tv, conf, mode, gamma, -100, red, wt, need_tp, False, False)
    finally:
        T._CONF_HIST_CELLS, H._FINALIZE_ELEMS = saved
    if mode != 4:
        T._backward(x, y, torch.empty(N, dtype=acc), torch.empty(C, dtype=acc), tv, None, mode, gamma, -100)
    return _COMPILED[start:]


# --- the upsampled ops (fused_imbalance/ops/triton_upsample.py) ---------------------------------
# (C, interp, align_corners, dtype, mode, need_pixel_loss, need_tp, need_confusion); each forward's
# backward too. Low-resolution (2, C, 32, 64) logits against (2, 128, 256) labels.
UPSAMPLE_VARIANTS = [
    (
        19,
        "bilinear",
        False,
        "f32",
        "focal",
        True,
        True,
        True,
    ),  # cached rows, statistics in registers, coefficients
    (
        8,
        "nearest",
        False,
        "bf16",
        "ce",
        False,
        False,
        False,
    ),  # one-tap axes, the softmax in the gradient pass
    (19, "bilinear", True, "f64", "msesoftmax", False, False, False),  # float64: the most registers
    (
        150,
        "bilinear",
        False,
        "bf16",
        "focal",
        False,
        True,
        True,
    ),  # class groups in a loop, coefficient launch
    # (and, for the softmax focal class groups, the forward that keeps lse and the launch of the
    # coefficients from it)
    (40, "bilinear", False, "f64", "focal", True, True, True),  # float64 class groups, steps of 4 rows
    (40, "bilinear", False, "f32", "sigfocal", False, True, True),  # sigmoid focal class groups
    # cross-entropy backward from the forward's lse (no coefficient launch): the largest unrolled group, a loop
    (19, "bilinear", False, "f32", "ce", False, False, False),
    (40, "bilinear", True, "bf16", "ce", False, False, False),
    # the forward's cached rows at their class limits (_fwd_cached) with the argmax, and one class past them
    # (the loop over groups, one row per step, statistics in registers)
    (32, "bilinear", False, "f32", "sigfocal", True, True, True),
    (32, "bilinear", False, "f32", "msesoftmax", True, True, True),
    (19, "bilinear", False, "f64", "focal", True, True, True),
    (20, "bilinear", False, "f64", "msesoftmax", True, True, True),
    (12, "bilinear", False, "f64", "sigfocal", True, True, True),
    (13, "bilinear", False, "f64", "sigfocal", True, True, True),
    # a training step's mean without counts at 150 classes: the forward's class groups with the cross-entropy,
    # focal and softmax MSE terms (the most registers without the argmax), a per-pixel loss for the class sums
    (150, "bilinear", False, "f32", "ce", False, False, False),
    (150, "bilinear", False, "f32", "focal", False, False, False),
    (150, "bilinear", False, "bf16", "msesoftmax", False, False, False),
]


def compile_upsample_variant(C, interp, align_corners, dt, mode_name, need_pl, need_tp, need_conf):
    from fused_imbalance.ops import triton_upsample as U

    dtype = _DTYPES[dt]
    mode, gamma = _MODES[mode_name]
    x = torch.empty((2, C, 32, 64), dtype=dtype)
    y = torch.empty((2, 128, 256), dtype=torch.int64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tv = torch.empty(C, dtype=acc) if mode in (2, 3) else None
    ip = 0 if interp == "nearest" else 1
    start = len(_COMPILED)
    weight, conf, red, wt = _call(need_pl, need_tp, need_conf, mode, C, acc)
    U._forward(x, y, ip, align_corners, weight, tv, conf, mode, gamma, -100, red, wt, need_tp, False, False)
    if mode != 4:
        U._backward(
            x,
            y,
            ip,
            align_corners,
            torch.empty(y.numel(), dtype=acc),
            torch.empty(C, dtype=acc),
            tv,
            None,
            mode,
            gamma,
            -100,
        )
    if U.keeps_lse(x, mode, gamma):
        lse = U._forward(
            x, y, ip, align_corners, weight, tv, conf, mode, gamma, -100, red, wt, need_tp, False, True
        )[5]
        U._backward(
            x,
            y,
            ip,
            align_corners,
            torch.empty(y.numel(), dtype=acc),
            torch.empty(C, dtype=acc),
            tv,
            lse,
            mode,
            gamma,
            -100,
        )
    return _COMPILED[start:]


# --- the exact selection (fused_imbalance/ops/triton_select.py) ---------------------------------
# (dtype, first_hist given): every pass of both digit plans, with and without the first pass.
SELECT_VARIANTS = [("f32", False), ("f32", True), ("f64", False)]


def compile_select_variant(dt, first):
    from fused_imbalance.ops import triton_select as S

    v = torch.empty(1 << 20, dtype=_DTYPES[dt])
    first_hist = torch.zeros(S.FIRST_BINS, dtype=torch.int64) if first else None
    start = len(_COMPILED)
    S._select(v, torch.zeros((), dtype=torch.int64), first_hist)
    return _COMPILED[start:]


# --- the OHEM cross-entropy (fused_imbalance/ops/triton_ohem.py) ---------------------------------
# (dtype, reduction, weighted, upsampled, mean over every pixel): its O(N) kernels in every flag combination,
# the selection's passes after a first histogram counted elsewhere (float32 and float64 plans), and the
# loss launchers' passes.
OHEM_VARIANTS = [
    ("f32", 0, True, False, False),
    ("f32", 2, False, False, False),
    ("f64", 1, False, False, False),
    ("bf16", 0, False, True, True),
]


def compile_ohem_variant(dt, reduction, weighted, upsampled, mean_over_all):
    from fused_imbalance.ops import triton_ohem as O

    dtype = _DTYPES[dt]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.empty((2, 19, 32, 64) if upsampled else (2, 19, 128, 256), dtype=dtype)
    y = torch.empty((2, 128, 256) if upsampled else (2 * 128 * 256,), dtype=torch.int64)
    interp = 1 if upsampled else -1
    w = torch.empty(19, dtype=acc) if weighted else None
    start = len(_COMPILED)
    loss, pn, aux, bad, lse = O._forward(
        x, y, interp, False, w, None, 0.7, 100000, -100, reduction, mean_over_all, False, False
    )
    grad = torch.empty(y.numel() if reduction == 2 else (), dtype=acc)
    O._backward(x, y, interp, False, grad, w, pn, aux, lse, -100)
    return _COMPILED[start:]


# RecallLoss's moving average (_triton_host.recall_ema): (buffer dtype, accumulation dtype, reduction)
RECALL_EMA_VARIANTS = [("f32", "f32", 0), ("f64", "f64", 1)]


def compile_recall_ema_variant(run_dt, acc_dt, reduction):
    from fused_imbalance.ops import _triton_host as H

    C = 150
    start = len(_COMPILED)
    H.recall_ema(
        torch.empty(C, dtype=_DTYPES[acc_dt]),
        torch.empty(C, dtype=torch.int64),
        torch.empty(C, dtype=torch.int64),
        torch.empty(C, dtype=_DTYPES[run_dt]),
        torch.empty(C, dtype=torch.bool),
        0.1,
        reduction,
    )
    return _COMPILED[start:]


def main(argv):
    _install()
    variants = list(VARIANTS) + (list(_all_variants()) if "--all" in argv else [])
    report(
        [(compile_variant, v) for v in variants]
        + [(compile_upsample_variant, v) for v in UPSAMPLE_VARIANTS]
        + [(compile_select_variant, v) for v in SELECT_VARIANTS]
        + [(compile_ohem_variant, v) for v in OHEM_VARIANTS]
        + [(compile_recall_ema_variant, v) for v in RECALL_EMA_VARIANTS]
    )


def report(jobs):
    """Compile each (compile function, variant) job and print one JSON record per distinct kernel
    (the stand-in driver installed first: :func:`_install`)."""
    seen = {}
    for compile_fn, v in jobs:
        for kernel, constexprs in compile_fn(*v):
            h = kernel.metadata.hash
            if h in seen:
                continue
            regs, st, ld = _ptxas_usage(kernel)
            seen[h] = dict(
                variant=list(v),
                kernel=kernel.metadata.name,
                num_warps=kernel.metadata.num_warps,
                constexprs=constexprs,
                registers=regs,
                spill_stores=st,
                spill_loads=ld,
            )
            print(json.dumps(seen[h]), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1:])
