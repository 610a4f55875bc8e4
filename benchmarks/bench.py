"""Benchmark every loss with every provider: ``python -m benchmarks.bench [options]``.

For each case (loss × logits shape × dtype × memory format) and provider (eager reference,
``torch.compile`` of the reference, the fused backend) the harness checks the provider's loss
and gradient against the eager reference, then times forward, backward and forward+backward,
measures peak memory beyond the inputs, and reports GB/s against the byte floor of
docs/DESIGN.md §8. Results go to the terminal (Markdown) and to ``benchmarks/results/<tag>-<date>/``
(results.csv, results.md, bandwidth.png, speedup.png). See README.md for the columns.
"""

import argparse
import datetime
import importlib.util
import os
import platform
import re
import shlex
import sys
import time
from typing import NamedTuple

import torch

from . import measure, report
from .cases import (
    CHANNELS_LAST,
    CONTIGUOUS,
    DTYPES,
    LABEL_DTYPES,
    LOSSES,
    PLANS,
    PRESETS,
    PROVIDERS,
    Case,
    Unavailable,
    applies,
    floor_bytes,
    fused_backend_name,
    grid,
    has_backward,
    make_inputs,
    make_provider,
    parse_shape,
)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --------------------------------------------------------------------------- environment


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def environment(device, args):
    dev = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    return dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        device=name,
        torch=torch.__version__,
        triton=triton_version,
        threads=torch.get_num_threads(),
        load=f"{os.getloadavg()[0]:.2f} at start",
        cores=os.cpu_count(),
        labels=args.labels,
        validate="on" if args.validate else "off (validate=False)",
        compile_backend=args.compile_backend,
        fused_backend=args.fused_backend or fused_backend_name(device),
        command="python -m benchmarks.bench " + " ".join(shlex.quote(a) for a in args.argv),
    )


def device_tag(env, device):
    kind = torch.device(device).type
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    slug = re.sub(r"-?(r|tm|cpu|processor)-", "-", f"-{slug}-").strip("-")[:40].strip("-")
    threads = f"-{env['threads']}t" if kind == "cpu" else ""
    return f"{kind}-{slug}{threads}" if slug else f"{kind}{threads}"


def load_tolerances():
    """The test suite's one tolerance table (tests/tolerances.py: the benchmarks live in the same tree)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "tolerances.py")
    spec = importlib.util.spec_from_file_location("_fused_imbalance_tolerances", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.TOL, mod.LOSS_TOL


# --------------------------------------------------------------------------- one case


def _step(fn, x, t, backward):
    """One call (and backward): (output detached, gradient or None)."""
    x.grad = None
    out = fn(x, t)
    if backward:
        out.backward()
    grad = None if x.grad is None else x.grad.detach().clone()
    x.grad = None
    return out.detach(), grad


def _compare(got, want, tol, what):
    """None when close, else a short reason (the largest error)."""
    if want.dtype == torch.int64:
        if torch.equal(got, want):
            return None
        return f"{what}: {int((got != want).sum())} counts differ"
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{what}: {tuple(got.shape)} {got.dtype} != {tuple(want.shape)} {want.dtype}"
    g, w = got.double(), want.double()
    ok = torch.isclose(g, w, **tol) | (torch.isnan(g) & torch.isnan(w))
    if bool(ok.all()):
        return None
    err = (g - w).abs().nan_to_num(float("inf"))
    i = int(err.reshape(-1).argmax())
    return (
        f"{what}: max |Δ| {float(err.reshape(-1)[i]):.3g} (got {float(g.reshape(-1)[i]):.6g}, "
        f"want {float(w.reshape(-1)[i]):.6g}; atol {tol['atol']:g} rtol {tol['rtol']:g})"
    )


class Runner:
    def __init__(self, args, device, env):
        self.args, self.device, self.env = args, device, env
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            self.timer = measure.CudaTimer(args.warmup_ms, args.rep_ms)
            self.peak = measure.cuda_peak_bytes
            env["memory"] = measure.CUDA_MEMORY_METHOD
        else:
            self.timer = measure.CpuTimer(args.warmup, args.reps, min(3, args.reps), args.budget)
            self.peak = measure.cpu_peak_bytes
            env["memory"] = measure.CPU_MEMORY_METHOD
        env["timer"] = self.timer.describe()
        env["busy"] = measure.BUSY_METHOD + f", {args.busy_reps} steps"
        self.tol, self.loss_tol = load_tolerances()

    def time(self, fn, setup, x):
        if self.cuda and setup is None:
            return self.timer(fn, grad_to_none=[x])  # do_bench sets x.grad = None between calls
        return self.timer(fn, setup=setup or (lambda: setattr(x, "grad", None)))

    def run(self, case, progress, providers=None, timed=None, busy=()):
        """The rows of one case (one per provider and pass), yielded provider by provider as each
        finishes, so that the caller can write them before the next one runs.

        ``providers`` run in this order (default ``--provider``; the first result is the reference
        the others are checked against); ``timed``: those whose passes are timed and written
        (default all; the others run once, untimed, for the check); ``busy``: those whose
        training step is also profiled (``measure.kernel_profile``)."""
        args = self.args
        providers = args.providers if providers is None else providers
        timed = providers if timed is None else timed
        x0, t = make_inputs(case, self.device, args.labels)
        backward = has_backward(case.loss)
        x = x0.requires_grad_(backward)
        base = dict(
            self.env_fields(),
            loss=case.loss,
            family=case.shape.family,
            shape=case.shape.name,
            pixels=case.shape.pixels,
            classes=case.shape.num_classes,
            dtype=case.dtype,
            layout=case.layout,
            labels=args.labels,
            grad_bytes=case.shape.numel * x.element_size() if backward else None,
        )
        ref, ref_name = None, None
        for provider in providers:
            if not applies(provider, case):
                continue
            if provider in timed:
                progress(case, provider)
            prow = dict(base, provider=provider)
            try:
                fn = make_provider(
                    provider,
                    case,
                    self.device,
                    args.validate,
                    args.labels,
                    args.fused_backend,
                    args.compile_backend,
                )
                t0 = time.perf_counter()
                out, grad = _step(fn, x, t, backward)
                if self.cuda:
                    torch.cuda.synchronize()
                prow["first_call_s"] = round(time.perf_counter() - t0, 3)
            except Unavailable as e:
                if provider in timed:
                    yield [dict(prow, **{"pass": p, "status": f"skipped: {e}"}) for p in case.passes]
                continue
            except Exception as e:  # noqa: BLE001 - any failure of one provider is reported, not fatal
                status = "OOM" if measure.is_oom(e) else f"error: {type(e).__name__}: {_oneline(e)}"
                if provider in timed:
                    yield [dict(prow, **{"pass": p, "status": status}) for p in case.passes]
                measure.free_memory(self.device)
                continue
            if ref is None:
                ref, ref_name = (out, grad), provider
                status = (
                    "reference" if provider == "eager" else f"ok (unchecked: {provider} is the first result)"
                )
            else:
                why = _compare(out, ref[0], self.loss_tol[x.dtype], "loss")
                if why is None and backward:
                    why = _compare(grad, ref[1], self.tol[x.dtype], "grad")
                status = "ok" if ref_name == "eager" else f"ok (vs {ref_name})"
                if why is not None:
                    status = f"FAIL vs {ref_name} ({why})"
            del out, grad
            if provider in timed and status.startswith("FAIL"):  # a wrong kernel is not timed
                yield [dict(prow, **{"pass": p, "status": status}) for p in case.passes]
            elif provider in timed:
                yield self.measure_passes(
                    case, provider, fn, x, t, dict(prow, status=status), provider in busy
                )
            del fn
            measure.free_memory(self.device)

    def measure_passes(self, case, provider, fn, x, t, prow, busy=False):
        """Time and peak memory of each pass. Backward alone: the forward runs before every
        call, outside the timed region (no retained graph: torch.compile's backward donates
        its buffers and cannot be run twice). ``busy``: the training step's (fwd+bwd, or fwd
        without a backward) wall and kernels' busy time too."""
        graph = {}

        def fwd():
            return fn(x, t)

        def fwd_bwd():
            fn(x, t).backward()

        def forward_untimed():
            x.grad = None
            graph["out"] = fn(x, t)

        def bwd():
            graph.pop("out").backward()

        # setup None: only the gradient is cleared between calls
        calls = {"fwd": (fwd, None), "bwd": (bwd, forward_untimed), "fwd+bwd": (fwd_bwd, None)}
        step = "fwd+bwd" if has_backward(case.loss) else "fwd"
        rows = []
        for pass_ in case.passes:
            row = dict(prow, **{"pass": pass_})
            call, setup = calls[pass_]
            try:
                row.update(self.time(call, setup, x))
                row["peak_bytes"] = self.peak(call, setup or (lambda: setattr(x, "grad", None)))
                if busy and pass_ == step:
                    prof = measure.kernel_profile(
                        call,
                        self.device,
                        self.args.busy_reps,
                        2 if self.cuda else self.args.warmup,
                        setup=lambda: setattr(x, "grad", None),
                    )
                    row.update(
                        wall_ms=prof["wall_ms"],
                        busy_ms=prof["busy_ms"],
                        kernels=prof["kernels"],
                        kernel_top=measure.top_names(prof["top"]),
                    )
            except Exception as e:  # noqa: BLE001
                row["status"] = "OOM" if measure.is_oom(e) else f"error: {type(e).__name__}: {_oneline(e)}"
                measure.free_memory(self.device)
            graph.clear()
            x.grad = None
            if row.get("ms"):
                row["floor_bytes"] = floor_bytes(case, pass_, self.args.labels)
                row["gbps"] = row["floor_bytes"] / (row["ms"] * 1e-3) / 1e9
                row["copy_gbps"] = round(self.env["copy_gbps"], 2)
                row["pct_copy"] = 100.0 * row["gbps"] / self.env["copy_gbps"]
                if row.get("busy_ms"):
                    row["busy_pct_copy"] = (
                        100.0 * row["floor_bytes"] / (row["busy_ms"] * 1e-3) / 1e9 / self.env["copy_gbps"]
                    )
            rows.append(row)
        return rows

    def env_fields(self):
        e = self.env
        return dict(
            date=e["date"], device=e["device"], torch=e["torch"], triton=e["triton"], threads=e["threads"]
        )


def _oneline(e, limit=160):
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- progress


class Progress:
    """tqdm when it is installed, else one stderr line rewritten in place."""

    def __init__(self, total):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self.bar = None
        self.tty = sys.stderr.isatty()

    def __call__(self, case, provider):
        text = f"{case.loss} {case.shape.name} {case.dtype} {case.layout} · {provider}"
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=True)
            return
        elapsed = time.perf_counter() - self.t0
        eta = f", ~{elapsed / self.done * (self.total - self.done):.0f} s left" if self.done else ""
        line = f"[{self.done + 1}/{self.total}] {elapsed:.0f} s{eta} · {text}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def step(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(f"{self.done} cases in {time.perf_counter() - self.t0:.0f} s\n")


# --------------------------------------------------------------------------- command line


def _csv_list(choices=None):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        if choices is not None:
            bad = [s for s in items if s not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return items

    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    level = p.add_mutually_exclusive_group()
    level.add_argument(
        "--quick",
        dest="level",
        action="store_const",
        const="quick",
        default="default",
        help="a small smoke-test grid",
    )
    level.add_argument(
        "--full",
        dest="level",
        action="store_const",
        const="full",
        help="every loss on every shape, dtype and layout (long)",
    )
    p.add_argument("--loss", type=_csv_list(LOSSES), help="comma-separated losses (default: all)")
    p.add_argument(
        "--shape",
        type=_csv_list(),
        help="comma-separated families of the preset (seg, ade, volume, cls) and/or explicit "
        "logits shapes such as 4x19x256x512",
    )
    p.add_argument("--dtype", type=_csv_list(tuple(DTYPES)), help="comma-separated logits dtypes")
    p.add_argument("--layout", type=_csv_list((CONTIGUOUS, CHANNELS_LAST)), help="memory formats")
    p.add_argument(
        "--provider",
        type=_csv_list(PROVIDERS),
        default=list(PROVIDERS),
        help="comma-separated providers (default: eager,compile,fused,liger,monai,monai_compile; liger: "
        "cross_entropy only; monai, monai_compile: dice_loss and dice_ce_loss)",
    )
    p.add_argument(
        "--labels", default="int64", choices=tuple(LABEL_DTYPES), help="label dtype (default int64)"
    )
    p.add_argument(
        "--validate",
        dest="validate",
        action="store_true",
        help="time the eager and fused providers with validate=True: the label-range check, a "
        "device-to-host sync after the forward, inside the timed region (default: "
        "validate=False, the kernels alone)",
    )
    p.add_argument(
        "--no-validate",
        dest="validate",
        action="store_false",
        help="validate=False for the eager and fused providers (the default)",
    )
    p.add_argument(
        "--plan",
        choices=tuple(PLANS),
        help="run a plan instead of a grid: its groups of cases in order, each with its own providers "
        "(cases.PLANS; `session` is the GPU session's, `session-dry` its CPU rehearsal). --loss, "
        "--provider and --group filter it",
    )
    p.add_argument("--group", type=_csv_list(), help="with --plan: only these groups")
    p.add_argument(
        "--backend",
        dest="fused_backend",
        choices=("triton", "cpp"),
        help="the fused provider's backend (default: triton on CUDA, cpp on CPU; triton on CPU "
        "tensors needs TRITON_INTERPRET=1)",
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="the compile provider's torch.compile backend (default inductor)",
    )
    p.add_argument(
        "--busy",
        type=_csv_list(PROVIDERS),
        default=[],
        help="providers whose training step is also profiled: wall time between CUDA events of steps "
        "run back to back against the kernels' busy time (a plan names its own)",
    )
    p.add_argument("--busy-reps", type=int, default=10, help="steps per busy-time measurement (default 10)")
    p.add_argument(
        "--warmup-ms", type=float, default=25, help="GPU: do_bench warm-up, milliseconds (default 25)"
    )
    p.add_argument(
        "--rep-ms", type=float, default=100, help="GPU: do_bench repetitions, milliseconds (default 100)"
    )
    p.add_argument("--warmup", type=int, default=1, help="CPU: untimed warm-up calls per measurement")
    p.add_argument("--reps", type=int, default=10, help="CPU: most timed calls per measurement")
    p.add_argument(
        "--budget",
        type=float,
        default=0.25,
        help="CPU: stop timing after this many seconds of timed calls (at least 3 calls)",
    )
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", help="output folder (default benchmarks/results/<device-tag>-<date>)")
    p.add_argument("--csv", help="the results CSV (default <out>/results.csv)")
    p.add_argument(
        "--append",
        action="store_true",
        help="add to an existing results.csv in --out (re-measured cases replace old rows)",
    )
    p.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.providers = [q for q in PROVIDERS if q in args.provider]  # eager first: it is the reference
    if args.plan and (args.shape or args.dtype or args.layout or args.level != "default"):
        p.error(
            "--plan names its own shapes, dtypes and layouts: --shape, --dtype, --layout, --quick and "
            "--full do not apply"
        )
    if args.group and not args.plan:
        p.error("--group needs --plan")
    return args


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: only cpu and cuda are supported")
    return name


def select_cases(args, device):
    preset = PRESETS[(torch.device(device).type, args.level)]
    shapes = list(preset)
    if args.shape:
        families = {s.family for s in preset} | {"seg", "ade", "volume", "cls"}
        shapes = [s for s in preset if s.family in args.shape]
        for text in args.shape:
            if text not in families:
                shapes.append(parse_shape(text, tuple(args.dtype or ("float32", "bfloat16"))))
    return grid(shapes, losses=args.loss or LOSSES, dtypes=args.dtype, layouts=args.layout)


class Work(NamedTuple):
    """One case of a run and how it runs (``Runner.run``'s arguments); ``group``: its plan group."""

    case: Case
    providers: tuple
    timed: tuple = None
    busy: tuple = ()
    group: str = ""


def select_work(args, device):
    """The cases of a run, in order: the grid's (``--shape`` etc.) or the plan's (``--plan``)."""
    if not args.plan:
        return [Work(c, args.providers, busy=args.busy) for c in select_cases(args, device)]
    groups = PLANS[args.plan]
    unknown = set(args.group or ()) - {g.name for g in groups}
    if unknown:
        raise SystemExit(
            f"--group {','.join(sorted(unknown))}: plan {args.plan} has "
            f"{', '.join(g.name for g in groups)}"
        )
    work = []
    for g in groups:
        if args.group and g.name not in args.group:
            continue
        timed = [q for q in g.providers if q in args.providers]
        if not timed:
            continue
        run = [q for q in PROVIDERS if q in timed or q == "eager"]  # eager first: the reference
        for c in g.cases(args.loss or LOSSES):
            work.append(Work(c, run, timed, g.busy, g.name))
    return work


def compile_settings():
    """torch.compile's settings of a benchmark process (the GPU session's warm-up uses the same, so
    that its compiled graphs are found in the cache). Every case compiles anew (static shapes);
    keep dynamo from falling back to eager when a function has been compiled for many (shape,
    dtype, layout) variants."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    work = select_work(args, device)
    if args.list:
        for w in work:
            c = w.case
            print(
                f"{w.group:14s} {c.loss:20s} {c.shape.name:22s} {c.dtype:9s} {c.layout:14s} {','.join(c.passes):12s} "
                f"{','.join(w.timed or w.providers)}"
            )
        print(f"{len(work)} cases")
        return 0
    if not work:
        raise SystemExit("no case matches the filters (see --list)")
    compile_settings()

    env = environment(device, args)
    runner = Runner(args, device, env)
    env["copy_gbps"] = measure.copy_bandwidth(device, runner.timer)
    out_dir = args.out or os.path.join(RESULTS, f"{device_tag(env, device)}-{datetime.date.today():%Y%m%d}")
    os.makedirs(out_dir, exist_ok=True)
    csv_path = args.csv or os.path.join(out_dir, "results.csv")
    log = report.CsvLog(csv_path, append=args.append)
    print(
        f"{env['device']} · torch {env['torch']} · triton {env['triton']} · {env['threads']} threads · "
        f"copy {env['copy_gbps']:.1f} GB/s · {len(work)} cases → {out_dir}",
        file=sys.stderr,
    )

    progress = Progress(len(work))
    try:
        for w in work:
            torch._dynamo.reset()
            for rows in runner.run(w.case, progress, w.providers, w.timed, w.busy):
                log.write([dict(r, group=w.group) for r in rows])  # each provider's rows as it finishes
            progress.step()
    except KeyboardInterrupt:  # a time budget (timeout -s INT): keep what was measured, write the table
        env["stopped"] = f"interrupted after {progress.done} of {len(work)} cases"
        print(f"\n{env['stopped']}", file=sys.stderr)
    finally:
        progress.close()
        log.close()

    env["load"] += (
        f", {os.getloadavg()[0]:.2f} at end ({env['cores']} cores; a load above the thread count "
        "means other processes shared the CPU and the CPU times are unreliable)"
    )
    rows = report.read_rows(csv_path)
    text = report.write_markdown(os.path.join(out_dir, "results.md"), env, rows)
    plot_notes = report.write_plots(out_dir, env, rows) if args.plots else ["plots skipped (--no-plots)"]
    print(text)
    for n in plot_notes:
        print(f"- {n}")
    print(f"\nresults: {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
