"""How the benchmark measures: wall time, peak memory and the device's copy bandwidth.

GPU  time: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, gradients
           set to None outside the timed region), median and 20th/80th percentiles.
     memory: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
           what was allocated before the call (the inputs).
CPU  time: ``time.perf_counter`` around each call after ``warmup`` untimed calls; repeated
           until ``reps`` calls or until ``budget_s`` seconds of timed calls (at least
           ``min_reps``), median and 20th/80th percentiles. Setup (clearing the gradient)
           is outside the timed region.
     memory: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free
           made through PyTorch's CPU allocator on the calling thread; the peak of their
           running sum is the peak beyond the inputs. Not seen: memory a kernel gets from
           ``malloc``/``new`` directly (e.g. ``std::vector`` scratch), allocations made on
           other threads (OpenMP workers), and allocator caching or fragmentation (the
           process RSS can be larger).
Busy time (``kernel_profile``): a step's wall time, steps run back to back (CUDA events around
           them; CPU ``time.perf_counter``), against the time the device is busy in them: on CUDA
           the summed durations of the GPU activities ``torch.profiler`` records (kernels, memsets,
           copies), on the CPU the summed self time of the ops it records. Their difference is
           the time the device waits for the host (Python, dispatch, launches).
"""

import contextlib
import os
import statistics
import time

import torch


class OutOfMemory(Exception):
    pass


def is_oom(err):
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return "out of memory" in text.lower() or "can't allocate memory" in text.lower()


def free_memory(device):
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _quantiles(samples):
    samples = sorted(samples)
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), q[1], q[7]


class CpuTimer:
    """A warm, repeated wall-clock timer; returns milliseconds (median, p20, p80) and reps."""

    def __init__(self, warmup=2, reps=20, min_reps=3, budget_s=0.5):
        self.warmup, self.reps, self.min_reps, self.budget_s = warmup, reps, min_reps, budget_s

    def describe(self):
        return (
            f"time.perf_counter per call, {self.warmup} warm-up calls, then up to {self.reps} "
            f"timed calls (at least {self.min_reps}, stopping after {self.budget_s:g} s); median"
        )

    def __call__(self, fn, setup=None):
        times = []
        for i in range(self.warmup + self.reps):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            out = fn()
            t1 = time.perf_counter()
            del out
            if i >= self.warmup:
                times.append(t1 - t0)
                if len(times) >= self.min_reps and sum(times) >= self.budget_s:
                    break
        med, lo, hi = _quantiles(times)
        return dict(ms=1e3 * med, ms_p20=1e3 * lo, ms_p80=1e3 * hi, reps=len(times))


class CudaTimer:
    """``triton.testing.do_bench``: CUDA-event timing with the L2 cache flushed between calls.

    With a ``setup`` (run before every call, outside the timed region, e.g. the forward pass
    before a timed backward) the same method is applied by hand: do_bench has no setup hook.
    """

    def __init__(self, warmup_ms=25, rep_ms=100):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def describe(self):
        return (
            f"triton.testing.do_bench (warmup={self.warmup_ms} ms, rep={self.rep_ms} ms, L2 flushed, "
            f"gradients set to None between calls); median"
        )

    def __call__(self, fn, setup=None, grad_to_none=None):
        if setup is not None:
            return self._with_setup(fn, setup)
        from triton.testing import do_bench

        med, lo, hi = do_bench(
            fn, warmup=self.warmup_ms, rep=self.rep_ms, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]
        )
        return dict(ms=med, ms_p20=lo, ms_p80=hi, reps=None)

    def _with_setup(self, fn, setup):
        flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")  # larger than any L2

        def once():
            setup()
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            return start, end

        torch.cuda.synchronize()
        first = [once() for _ in range(3)]
        torch.cuda.synchronize()
        est = max(min(s.elapsed_time(e) for s, e in first), 1e-3)
        for _ in range(max(1, int(self.warmup_ms / est))):
            setup()
            fn()
        events = [once() for _ in range(max(5, min(1000, int(self.rep_ms / est))))]
        torch.cuda.synchronize()
        med, lo, hi = _quantiles([s.elapsed_time(e) for s, e in events])
        return dict(ms=med, ms_p20=lo, ms_p80=hi, reps=len(events))


# --------------------------------------------------------------------------- memory

CPU_MEMORY_METHOD = (
    "torch.profiler(profile_memory=True): peak of the running sum of PyTorch CPU-allocator "
    "allocations/frees on the calling thread during the call (not seen: direct malloc "
    "in kernels, other threads, allocator caching)"
)
CUDA_MEMORY_METHOD = (
    "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the memory "
    "allocated before the call"
)


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop lines on fd 2; keep the progress line readable."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(fn, setup=None):
    """Peak bytes allocated through the PyTorch CPU allocator during ``fn()`` (None if unknown)."""
    from torch.profiler import ProfilerActivity, profile

    if setup is not None:
        setup()
    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
    try:
        events = [
            e
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
        ]
    except AttributeError:
        events = None
    if events is None:
        return None
    return _running_peak((e.start_ns(), e.nbytes()) for e in events)


def _running_peak(stamped_deltas):
    total = peak = 0
    for _, delta in sorted(stamped_deltas, key=lambda e: e[0]):
        total += delta
        peak = max(peak, total)
    return peak


def cuda_peak_bytes(fn, setup=None):
    if setup is not None:
        setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


# --------------------------------------------------------------------------- busy time

BUSY_METHOD = (
    "wall: CUDA events around steps run back to back (CPU: time.perf_counter); busy: torch.profiler, "
    "summed durations of the GPU activities (kernels, memsets, copies) per step (CPU: summed self "
    "time of the profiled ops)"
)


def kernel_profile(step, device, reps=10, warmup=2, setup=None):
    """One step's wall time against its device busy time (see the module docstring).

    Returns ``wall_ms`` and ``busy_ms`` per step, ``kernels`` (GPU activities per step; CPU: ops
    per step) and ``top``: [(name, ms per step, calls per step)], the busiest first.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"

    def steps(n):
        for _ in range(n):
            if setup is not None:
                setup()
            step()

    steps(warmup)
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        steps(reps)
        end.record()
        torch.cuda.synchronize()
        wall = start.elapsed_time(end) / reps
    else:
        t0 = time.perf_counter()
        steps(reps)
        wall = 1e3 * (time.perf_counter() - t0) / reps
    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            steps(reps)
            if cuda:
                torch.cuda.synchronize()
    per_name = {}
    for e in prof.events():
        if e.device_type != (DeviceType.CUDA if cuda else DeviceType.CPU):
            continue
        us = e.time_range.elapsed_us() if cuda else e.self_cpu_time_total
        t, n = per_name.get(e.name, (0.0, 0))
        per_name[e.name] = (t + us, n + 1)
    top = sorted(((name, t / reps / 1e3, n / reps) for name, (t, n) in per_name.items()), key=lambda r: -r[1])
    return dict(wall_ms=wall, busy_ms=sum(r[1] for r in top), kernels=sum(r[2] for r in top), top=top)


def top_names(top, k=3):
    """The ``k`` busiest of ``kernel_profile``'s ``top`` as one CSV cell: "name ms×calls; ..."."""
    return "; ".join(f"{' '.join(name.split())[:48]} {ms:.3g}ms×{n:g}" for name, ms, n in top[:k])


# --------------------------------------------------------------------------- copy bandwidth


def copy_bandwidth(device, timer, nbytes=None):
    """Measured copy bandwidth in GB/s (bytes read + bytes written per second).

    CUDA: ``clone`` of a 1 GiB tensor timed with do_bench. CPU: ``copy_`` into a preallocated
    256 MiB tensor (a fresh CPU allocation of that size would time the kernel's page faults).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        nbytes = nbytes or 1 << 30
        a = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).fill_(1.0)
        ms = timer(lambda: a.clone())["ms"]
    else:
        nbytes = nbytes or 1 << 28
        a = torch.ones(nbytes // 4, dtype=torch.float32)
        b = torch.empty_like(a)
        b.copy_(a)
        ms = timer(lambda: b.copy_(a))["ms"]
    return 2 * nbytes / (ms * 1e-3) / 1e9
