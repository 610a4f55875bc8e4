"""Fill the compile caches before a benchmark run: ``python -m benchmarks.warmup --plan session``.

A Triton kernel compiles the first time a launch needs it, once per specialisation (classes,
dtype, layout, flags: seconds of one core each), and ``torch.compile`` compiles each graph in
seconds more; a benchmark that meets them one case after another spends minutes of a GPU
machine's time compiling. Here every case of the plan runs once, forward and backward, in a pool
of processes (one per core), through the same public calls the benchmark makes
(``cases.make_provider``, ``upsample.make_provider``) on the same shapes, dtypes, layouts and
devices. The compiled kernels and graphs land in Triton's cache (``TRITON_CACHE_DIR``) and
Inductor's (``TORCHINDUCTOR_CACHE_DIR``: its FX-graph and autograd caches), where the benchmark
then finds them: its ``first_call_s`` column shows whether it did.

Why real calls on the real device rather than compiling for a stand-in target with no GPU, as
``benchmarks/sm90_compile.py`` does: Triton's on-disk key (``triton/runtime/cache.py``,
``get_cache_key``: Triton's own hash, the kernel source with its specialisation, the backend's
ptxas version and architecture, the compile options, the cache-relevant environment) would be the
same for ``GPUTarget("cuda", 90, 32)`` and an H100. But the specialisation comes from the launch's
arguments (integer values divisible by 16, pointer alignment, constexprs), which the launchers
derive from the tensors' device (programs per SM, grids, class groups), and those differ for the
CPU tensors of a stand-in run: nothing guarantees the same keys. Real calls give them by
construction, with Liger-Kernel's and Inductor's kernels as well.

Order: the plan's groups in order (the fused kernels and compiled graphs of each), the upsampled
cases (``--upsample-plan``), then the groups that run as time allows; a time budget that stops
the warm-up cuts what the benchmark needs last. On CUDA the jobs start in that order while their
estimated memory (the inputs, the gradient, the compiled graph's intermediates) fits in 70 % of
the free memory. One CSV row per job as it ends (``--csv``).
"""

import argparse
import concurrent.futures
import csv
import multiprocessing
import os
import signal
import sys
import time

FIELDS = (
    "job",
    "stage",
    "group",
    "provider",
    "loss",
    "shape",
    "dtype",
    "layout",
    "status",
    "seconds",
    "end_s",
)
CONTEXT_BYTES = 600 << 20  # a CUDA context and the allocator's slack, per worker


def jobs(plan, upsample_plan):
    """(stage, group, provider, case) of every compile the plans need, in the order they need them."""
    from .cases import PLANS
    from .upsample import PLANS as UPSAMPLE_PLANS

    first, later, seen = [], [], set()
    for g in PLANS[plan]:
        for provider in ("fused", "liger", "compile"):  # fused first: every case needs it
            if provider not in g.providers:
                continue
            for c in g.cases():
                key = (provider, c.key)
                if key not in seen:
                    seen.add(key)
                    (later if g.as_time_allows else first).append(("bench", g.name, provider, c))
    ups = [
        ("upsample", "upsample", provider, c)
        for provider in ("fused", "compile")
        for c in (UPSAMPLE_PLANS[upsample_plan] if upsample_plan else ())
    ]
    return first + ups + later


def sample(todo):
    """The first job of each (stage, provider): every code path of the warm-up once."""
    seen = set()
    return [j for j in todo if (j[0], j[2]) not in seen and not seen.add((j[0], j[2]))]


def _bench_inputs(case, device):
    """Inputs with the case's shape, dtype, layout and label dtype, drawn on the device: the values do
    not matter to a compile, and drawing 16×150×512×512 normals on one CPU core takes seconds."""
    import torch

    from .cases import CHANNELS_LAST, DTYPES, IGNORE_INDEX

    dims = case.shape.dims
    x = (2.0 * torch.randn(dims, device=device)).to(DTYPES[case.dtype])
    if case.layout == CHANNELS_LAST:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    t = torch.randint(0, dims[1], (dims[0],) + tuple(dims[2:]), device=device)
    t.view(-1)[::20] = IGNORE_INDEX
    return x, t


def estimate_bytes(job):
    """Device memory a job may hold at its peak (a rough upper bound, for the scheduler)."""
    import torch

    from .cases import DTYPES
    from .upsample import DTYPES as UP_DTYPES

    stage, _, provider, case = job
    if stage == "bench":
        n, s = case.shape.numel, torch.empty((), dtype=DTYPES[case.dtype]).element_size()
        # the float32 draw, the logits and the gradient; a compiled reference keeps a few N×C buffers
        return CONTEXT_BYTES + n * (4 + 2 * s) + (6 * n * 4 if provider == "compile" else 0)
    B, C, h, w = case.low
    full = B * C * case.size[0] * case.size[1] * 4
    low = B * C * h * w * torch.empty((), dtype=UP_DTYPES[case.dtype]).element_size()
    return (
        CONTEXT_BYTES
        + 3 * low
        + (4 * full if provider == "compile" else 16 * B * case.size[0] * case.size[1])
    )


def run_job(job, device, fused_backend, compile_backend):
    """Compile one case by running it once (forward and backward); (seconds, status)."""
    import torch

    from . import measure
    from .bench import compile_settings
    from .cases import Unavailable, has_backward, make_provider
    from .upsample import make_inputs as upsample_inputs
    from .upsample import make_provider as upsample_provider

    stage, _, provider, case = job
    t0 = time.perf_counter()
    compile_settings()
    torch._dynamo.reset()
    try:
        if stage == "bench":
            fn = make_provider(
                provider, case, device, fused_backend=fused_backend, compile_backend=compile_backend
            )
            x, t = _bench_inputs(case, device)
            backward = has_backward(case.loss)
        else:
            fn = upsample_provider(provider, case, device, fused_backend, compile_backend)
            x, t = upsample_inputs(case, device)
            backward = True
        out = fn(x.requires_grad_(backward), t)
        if backward:
            out.backward()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        status = "ok"
    except Unavailable as e:
        status = f"skipped: {e}"
    except Exception as e:  # noqa: BLE001 - a job that fails leaves its compile to the benchmark
        status = f"error: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
    finally:
        fn = x = t = out = None  # noqa: F841 - free before the next job of this process
        measure.free_memory(device)
    return time.perf_counter() - t0, status


def describe(job):
    stage, group, provider, case = job
    if stage == "bench":
        return dict(
            stage=stage,
            group=group,
            provider=provider,
            loss=case.loss,
            shape=case.shape.name,
            dtype=case.dtype,
            layout=case.layout,
        )
    return dict(
        stage=stage,
        group=group,
        provider=provider,
        loss=case.loss,
        shape=case.key,
        dtype=case.dtype,
        layout=case.mode,
    )


def environment(device):
    """One line: versions and the device (the GPU session's env.txt)."""
    import platform

    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    try:
        from importlib.metadata import version

        liger = version("liger-kernel")
    except Exception:  # noqa: BLE001 - not installed
        liger = "not installed"
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        dev = f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, cuda {torch.version.cuda}"
    else:
        from .bench import cpu_name

        dev = f"{cpu_name()} (CPU)"
    return (
        f"python {platform.python_version()} | torch {torch.__version__} | triton {tv} | liger-kernel {liger} | "
        f"{dev} | {os.cpu_count()} cores"
    )


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.warmup", description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", default="session", help="the benchmark plan (cases.PLANS)")
    p.add_argument("--upsample-plan", help="the upsampled losses' plan (upsample.PLANS)")
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--backend", dest="fused_backend", choices=("triton", "cpp"), help="the fused provider's backend"
    )
    p.add_argument(
        "--compile-backend", default="inductor", help="the compile provider's torch.compile backend"
    )
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--csv", help="one row per job as it ends")
    p.add_argument(
        "--sample",
        action="store_true",
        help="the first job of each stage and provider only (a rehearsal: on a CPU the interpreted "
        "kernels and aot_eager leave nothing in the caches)",
    )
    p.add_argument("--list", action="store_true", help="print the jobs and exit")
    args = p.parse_args(argv)
    todo = jobs(args.plan, args.upsample_plan)
    if args.sample:
        todo = sample(todo)
    if args.list:
        for j in todo:
            d = describe(j)
            print(
                " ".join(
                    str(d[k]) for k in ("stage", "group", "provider", "loss", "shape", "dtype", "layout")
                )
            )
        print(f"{len(todo)} jobs")
        return 0
    import torch

    print(environment(args.device), flush=True)
    budget = float("inf")
    if torch.device(args.device).type == "cuda":
        budget = 0.7 * torch.cuda.mem_get_info(args.device)[0]
    # Inductor compiles in the job's process: the pool already has a process per core.
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    # forkserver: the workers fork from a process that imported torch once and never touched CUDA
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["torch", "fused_imbalance", "benchmarks.cases", "benchmarks.bench", "benchmarks.upsample"]
    )
    out = open(args.csv, "w", newline="") if args.csv else None
    writer = csv.DictWriter(out, fieldnames=FIELDS) if out else None
    if writer:
        writer.writeheader()
        out.flush()
    t0 = time.perf_counter()
    pending, running, used, done, failed = list(enumerate(todo)), {}, 0.0, 0, 0
    pool = concurrent.futures.ProcessPoolExecutor(max(1, args.workers), mp_context=ctx)
    try:
        while pending or running:
            # in order, while the next job's memory fits (a job larger than the budget runs alone)
            while (
                pending
                and len(running) < args.workers
                and (not running or used + estimate_bytes(pending[0][1]) <= budget)
            ):
                i, job = pending.pop(0)
                running[pool.submit(run_job, job, args.device, args.fused_backend, args.compile_backend)] = (
                    i,
                    job,
                )
                used += estimate_bytes(job)
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in finished:
                i, job = running.pop(fut)
                used -= estimate_bytes(job)
                try:
                    seconds, status = fut.result()
                except Exception as e:  # noqa: BLE001 - a worker that died
                    seconds, status = float("nan"), f"error: {type(e).__name__}: {e}"
                done += 1
                failed += not (status == "ok" or status.startswith("skipped"))
                row = dict(
                    describe(job),
                    job=i,
                    status=status,
                    seconds=round(seconds, 2),
                    end_s=round(time.perf_counter() - t0, 2),
                )
                print(
                    f"[{done}/{len(todo)}] {row['end_s']:6.1f} s  {seconds:5.1f} s  {row['stage']} {row['provider']} "
                    f"{row['loss']} {row['shape']} {row['dtype']} {row['layout']}: {status}",
                    flush=True,
                )
                if writer:
                    writer.writerow(row)
                    out.flush()
    except KeyboardInterrupt:  # the stage's time budget: the caches keep what was compiled
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"interrupted after {done} of {len(todo)} jobs", flush=True)
        # A worker turns the SIGINT into its job's exception and takes the next queued one: stop them
        # here, or the exit would wait for them and they would share the GPU with the benchmark.
        for proc in multiprocessing.active_children():
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        return 0
    finally:
        if out:
            out.close()
    pool.shutdown()
    print(
        f"warm-up: {done} jobs ({failed} failed) in {time.perf_counter() - t0:.1f} s on {args.workers} processes",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
