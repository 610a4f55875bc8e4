"""The loss on low-resolution logits (``upsample``, docs/DESIGN.md §10): ``python -m benchmarks.upsample``.

Providers, per case (loss × low-resolution logits → label size × dtype × mode):

- `eager`: `functional.<loss>(x, y, upsample=..., backend="reference")`: `F.interpolate` to the label
  size, then the eager reference loss (the full-resolution logits and their gradient are
  materialised); for `ohem_cross_entropy` HRNet's eager code (`cases.hrnet_ohem_cross_entropy`:
  interpolate, softmax, gather, sort, masked mean).
- `compile`: `torch.compile` of `reference.upsampled` + the reference loss (`dynamic=False`,
  `validate=False`): Inductor may fuse the resize into the loss; for `ohem_cross_entropy` of HRNet's code.
- `fused`: `functional.<loss>(x, y, upsample=..., backend=...)`: `cpp` on CPU, `triton` on CUDA.

Each provider's loss and gradient are checked against eager first (the tolerance table of
tests/tolerances.py); then forward and forward+backward are timed and the peak memory beyond
the inputs is measured (benchmarks/measure.py says how). Byte floor: the labels plus the
low-resolution logits once (forward) or three times (forward+backward: read twice, gradient
written once). Results: Markdown on stdout and ``--out`` (default
``benchmarks/results/upsample-<device>-<threads>t-<date>/``: results.csv, results.md); the CSV
(``--csv`` to put it elsewhere) is written provider by provider, so a run stopped by a SIGINT (a
time budget) keeps what it measured. ``--plan session`` runs the GPU session's cases in its order.
"""

import argparse
import csv
import dataclasses
import datetime
import functools
import os
import shlex
import sys
import time

import torch

from . import measure
from .bench import cpu_name, load_tolerances, _compare, _step
from .cases import fused_backend_name, hrnet_ohem_cross_entropy, loss_kwargs

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LOSSES = ("cross_entropy", "focal_loss", "recall_loss", "ohem_cross_entropy")
PROVIDERS = ("eager", "compile", "fused")
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    low: tuple  # (B, C, h, w)
    size: tuple  # (H, W)
    dtype: str = "float32"
    mode: str = "bilinear"
    loss: str = "cross_entropy"

    @property
    def key(self):
        B, C, h, w = self.low
        return f"{B}x{C}x{h}x{w}→{self.size[0]}x{self.size[1]}"


# Cityscapes at 1/4 (DeepLabV3+-style heads) and ADE20K at 1/4 (SegFormer/UPerNet-style heads);
# on the CPU the same scale factor 4 at smaller images.
SHAPES = {
    "cuda": [("cityscapes", (8, 19, 128, 256), (512, 1024)), ("ade", (16, 150, 128, 128), (512, 512))],
    "cpu": [("cityscapes", (2, 19, 64, 128), (256, 512)), ("ade", (2, 150, 32, 32), (128, 128))],
}


def grid(device_type, losses, dtypes, modes):
    return [
        Case(name, low, size, dtype, mode, loss)
        for name, low, size in SHAPES[device_type]
        for dtype in dtypes
        for mode in modes
        for loss in losses
    ]


# The GPU session's cases (scripts/gpu_session.sh), loss by loss, so that a time budget cuts whole
# losses: cross-entropy on both shapes and dtypes first. ``session-dry`` is its rehearsal on a CPU:
# two tiny cases, the second with classes in groups (more than 12) in bfloat16, the Triton kernels
# interpreted (a few classes: the interpreter takes seconds per class and pixel block).
PLANS = {
    "session": [
        Case(name, low, size, dtype, "bilinear", loss)
        for loss in LOSSES
        for name, low, size in SHAPES["cuda"]
        for dtype in ("float32", "bfloat16")
    ],
    "session-dry": [
        Case("cityscapes", (1, 4, 4, 8), (16, 32), "float32", "bilinear", "cross_entropy"),
        Case("ade", (1, 13, 2, 4), (8, 16), "bfloat16", "bilinear", "cross_entropy"),
    ],
}


def make_inputs(case, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, C, h, w = case.low
    x = (2.0 * torch.randn(case.low, generator=g)).to(DTYPES[case.dtype])
    y = torch.randint(0, C, (B,) + case.size, generator=g)
    y[torch.rand(y.shape, generator=g) < 0.05] = IGNORE_INDEX
    return x.to(device), y.to(device)


def make_provider(provider, case, device, fused_backend=None, compile_backend="inductor"):
    from fused_imbalance import functional, reference

    kwargs = dict(loss_kwargs(case.loss, case.low[1], device), ignore_index=IGNORE_INDEX)
    if case.loss == "ohem_cross_entropy" and provider in ("eager", "compile"):
        # HRNet's eager code (interpolate, softmax, gather, sort, masked mean), and torch.compile of it
        fn = functools.partial(hrnet_ohem_cross_entropy, upsample=case.mode, **kwargs)
        return fn if provider == "eager" else torch.compile(fn, dynamic=False, backend=compile_backend)
    if provider == "compile":
        loss = getattr(reference, case.loss)

        def interpolate_then_loss(x, y):
            return loss(reference.upsampled(x, case.size, case.mode), y, validate=False, **kwargs)

        return torch.compile(interpolate_then_loss, dynamic=False, backend=compile_backend)
    backend = "reference" if provider == "eager" else (fused_backend or fused_backend_name(device))
    return functools.partial(getattr(functional, case.loss), upsample=case.mode, backend=backend, **kwargs)


def floor_bytes(case, pass_):
    low = 1
    for d in case.low:
        low *= d
    low *= torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    labels = case.low[0] * case.size[0] * case.size[1] * 8  # int64 labels
    return labels + (1 if pass_ == "fwd" else 3) * low


FIELDS = (
    "date",
    "device",
    "torch",
    "triton",
    "threads",
    "case",
    "shape",
    "dtype",
    "mode",
    "loss",
    "provider",
    "pass",
    "status",
    "ms",
    "ms_p20",
    "ms_p80",
    "reps",
    "gbps",
    "peak_mb",
    "peak_bytes",
    "low_grad_bytes",
    "pixels",
    "first_call_s",
)


def run_case(
    case,
    device,
    timer,
    peak,
    tol,
    loss_tol,
    passes=("fwd", "fwd+bwd"),
    fused_backend=None,
    tags=None,
    compile_backend="inductor",
):
    """The rows of one case, yielded provider by provider as each finishes (one row per pass)."""
    x0, y = make_inputs(case, device)
    x = x0.requires_grad_(True)
    B, H, W = y.shape
    ref = None
    for provider in PROVIDERS:
        base = dict(
            tags or {},
            case=case.name,
            shape=case.key,
            dtype=case.dtype,
            mode=case.mode,
            loss=case.loss,
            provider=provider,
            low_grad_bytes=x.numel() * x.element_size(),
            pixels=B * H * W,
        )
        try:
            fn = make_provider(provider, case, device, fused_backend, compile_backend)
            t0 = time.perf_counter()
            out, grad = _step(fn, x, y, True)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            base["first_call_s"] = round(time.perf_counter() - t0, 3)
        except Exception as e:  # noqa: BLE001 - one provider's failure is reported, not fatal
            yield [
                dict(base, **{"pass": p, "status": f"error: {type(e).__name__}: {str(e)[:120]}"})
                for p in passes
            ]
            measure.free_memory(device)
            continue
        if ref is None:
            ref, status = (out, grad), "reference"
        else:
            why = _compare(out, ref[0], loss_tol[x.dtype], "loss") or _compare(
                grad, ref[1], tol[x.dtype], "grad"
            )
            status = "ok" if why is None else f"FAIL ({why})"
        del out, grad
        rows = []
        for pass_ in passes:
            row = dict(base, **{"pass": pass_, "status": status})
            if not status.startswith("FAIL"):
                call = (lambda fn=fn: fn(x, y)) if pass_ == "fwd" else (lambda fn=fn: fn(x, y).backward())
                clear = lambda: setattr(x, "grad", None)  # noqa: E731
                row.update(timer(call, setup=clear))
                row["peak_bytes"] = peak(call, clear)
                row["peak_mb"] = (row["peak_bytes"] or 0) / 2**20
                row["gbps"] = floor_bytes(case, pass_) / (row["ms"] * 1e-3) / 1e9
            rows.append(row)
        yield rows
        del fn
        x.grad = None
        measure.free_memory(device)


def markdown(rows):
    by = {}
    for r in rows:
        by.setdefault((r["shape"], r["dtype"], r["mode"], r["loss"], r["pass"]), {})[r["provider"]] = r
    lines = [
        "| logits → labels | dtype | mode | loss | pass | eager ms | compile ms | fused ms | fused vs eager | "
        "fused vs compile | peak MB eager / compile / fused | fused GB/s (floor) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (shape, dtype, mode, loss, pass_), p in by.items():

        def ms(name):
            r = p.get(name, {})
            return r.get("ms")

        def fmt(v, spec=".1f"):
            return "—" if v is None else format(v, spec)

        e, c, f = ms("eager"), ms("compile"), ms("fused")
        peaks = " / ".join(fmt(p.get(n, {}).get("peak_mb")) for n in PROVIDERS)
        bad = [f"{n}: {r['status']}" for n, r in p.items() if r["status"] not in ("ok", "reference")]
        lines.append(
            f"| {shape} | {dtype} | {mode} | {loss} | {pass_} | {fmt(e)} | {fmt(c)} | {fmt(f)} | "
            f"{fmt(e / f if e and f else None, '.1f')}× | {fmt(c / f if c and f else None, '.1f')}× | "
            f"{peaks} | {fmt(p.get('fused', {}).get('gbps'), '.2f')} |"
            + (" " + "; ".join(bad) if bad else "")
        )
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--loss", default=",".join(LOSSES))
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, float32,bfloat16 on CUDA")
    p.add_argument("--mode", default="bilinear")
    p.add_argument("--shape", default=None, help="cityscapes, ade (default both)")
    p.add_argument(
        "--plan",
        choices=tuple(PLANS),
        help="the cases of a plan instead (`session`: the GPU session's, loss by loss; `session-dry`: "
        "its CPU rehearsal); --loss and --shape filter it",
    )
    p.add_argument("--passes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both (default both)")
    p.add_argument(
        "--backend",
        dest="fused_backend",
        choices=("triton", "cpp"),
        help="the fused provider's backend (default: triton on CUDA, cpp on CPU)",
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile's backend (default inductor)")
    p.add_argument("--reps", type=int, default=10, help="CPU: most timed calls")
    p.add_argument("--warmup", type=int, default=1, help="CPU: untimed warm-up calls")
    p.add_argument("--budget", type=float, default=1.0, help="CPU: stop timing after this many seconds")
    p.add_argument("--warmup-ms", type=float, default=25, help="GPU: do_bench warm-up, milliseconds")
    p.add_argument("--rep-ms", type=float, default=100, help="GPU: do_bench repetitions, milliseconds")
    p.add_argument("--out", default=None)
    p.add_argument("--csv", default=None, help="the results CSV (default <out>/results.csv)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cuda = torch.device(device).type == "cuda"
    if args.plan:
        cases = [c for c in PLANS[args.plan] if c.loss in args.loss.split(",")]
    else:
        dtypes = (args.dtype or ("float32,bfloat16" if cuda else "float32")).split(",")
        cases = grid("cuda" if cuda else "cpu", args.loss.split(","), dtypes, args.mode.split(","))
    if args.shape:
        cases = [c for c in cases if c.name in args.shape.split(",")]
    passes = tuple(q for q in ("fwd", "fwd+bwd") if q in args.passes.split(","))
    timer = (
        measure.CudaTimer(args.warmup_ms, args.rep_ms)
        if cuda
        else measure.CpuTimer(args.warmup, args.reps, min(3, args.reps), args.budget)
    )
    peak = measure.cuda_peak_bytes if cuda else measure.cpu_peak_bytes
    tol, loss_tol = load_tolerances()
    name = torch.cuda.get_device_name(device) if cuda else cpu_name()
    date = datetime.datetime.now().astimezone()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    tags = dict(
        date=date.isoformat(timespec="seconds"),
        device=name,
        torch=torch.__version__,
        triton=triton_version,
        threads=torch.get_num_threads(),
    )
    header = (
        f"{name} · torch {torch.__version__} · triton {triton_version} · {torch.get_num_threads()} threads of "
        f"{os.cpu_count()} cores · load average {os.getloadavg()[0]:.2f} at start · {date:%Y-%m-%d %H:%M %Z}\n"
        f"command: python -m benchmarks.upsample {' '.join(shlex.quote(a) for a in argv)}\n"
        f"timer: {timer.describe()}\ntorch.compile backend: {args.compile_backend}\nmemory: "
        f"{measure.CUDA_MEMORY_METHOD if cuda else measure.CPU_MEMORY_METHOD}\n"
    )
    print(header, file=sys.stderr)
    tag = f"upsample-{'cuda' if cuda else 'cpu'}-{torch.get_num_threads()}t-{date:%Y%m%d}"
    out = args.out or os.path.join(RESULTS, tag)
    os.makedirs(out, exist_ok=True)
    rows, stopped, i = [], None, 0
    # Rows are written as each provider finishes, so a run that is stopped (a time budget's SIGINT)
    # keeps what it measured.
    with open(args.csv or os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        try:
            for i, case in enumerate(cases):
                print(
                    f"[{i + 1}/{len(cases)}] {case.loss} {case.key} {case.dtype} {case.mode}", file=sys.stderr
                )
                for provider_rows in run_case(
                    case,
                    device,
                    timer,
                    peak,
                    tol,
                    loss_tol,
                    passes,
                    args.fused_backend,
                    tags,
                    args.compile_backend,
                ):
                    w.writerows(provider_rows)
                    f.flush()
                    rows += provider_rows
        except KeyboardInterrupt:
            stopped = f"interrupted after {i} of {len(cases)} cases"
            print(stopped, file=sys.stderr)
    table = markdown(rows)
    print(table)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(
            "# Loss on low-resolution logits (upsample)\n\n```\n"
            + header
            + (f"stopped: {stopped}\n" if stopped else "")
            + "```\n\n"
            + table
            + "\n"
        )
    print(f"\nwritten to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
