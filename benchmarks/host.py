"""Host cost of a training step's loss: one forward + backward on a tiny input, where the kernels' own
work is negligible, as a multiple of eager ``F.cross_entropy(x, t).backward()``'s in the same process.

    python -m benchmarks.host [--out DIR] [--rounds R] [--n N] [--device cpu|cuda]

Per loss (the class-balanced and CDB losses through their modules, as a training loop uses them):

* ``cpp``: the C++ backend on CPU tensors (the step's whole host path: checks, autograd, the C++ op);
* ``triton``: the Triton path on CPU tensors with the compiled kernels (``JITFunction``, as on a GPU, not
  the interpreter), each launch's ``JITFunction.run`` a no-op: the host work of a GPU step without the
  device (the Python launchers, allocations, autograd, the way to the kernel's launch), less Triton's
  own ``run`` (binding the arguments, its cache lookup, the driver call);
* the aten ops and the package's kernel launches one step makes (counted, not timed).

Each ratio is the median over rounds of (fused step time / eager step time), the two timed in
alternation as the calling thread's CPU time (``time.thread_time``: one intra-op thread, so the step's
whole host work), which other processes on a busy machine inflate less than wall time. With ``--device cuda``:
the real per-step wall
time against the kernels' busy time (torch.profiler) at a Cityscapes size, for each loss.
"""

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import time

# the compiled kernels' launch path, as on a GPU (stubbed below on CPU)
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fused_imbalance as fi  # noqa: E402

C = 19


def losses(device):
    """(name, make(backend) -> loss function of (x, y)) of every loss, as a training loop calls it."""
    w = torch.linspace(0.5, 2.0, C, device=device)
    counts = list(range(100, 100 + C))
    acc = torch.linspace(0.2, 0.9, C, device=device)
    outlying = fi.weights.outlying_labels(counts).to(device)

    def module(m):
        return lambda backend: m(backend=backend).to(device)

    return [
        ("cross_entropy", lambda b: lambda x, y: fi.cross_entropy(x, y, backend=b)),
        ("cross_entropy weight", lambda b: lambda x, y: fi.cross_entropy(x, y, w, backend=b)),
        ("focal_loss", lambda b: lambda x, y: fi.focal_loss(x, y, 2.0, backend=b)),
        ("sigmoid_focal_loss", lambda b: lambda x, y: fi.sigmoid_focal_loss(x, y, 2.0, backend=b)),
        ("ClassBalancedLoss", module(lambda backend: fi.ClassBalancedLoss(counts, 0.999, backend=backend))),
        ("recall_loss", lambda b: lambda x, y: fi.recall_loss(x, y, backend=b)),
        ("RecallLoss momentum", module(lambda backend: fi.RecallLoss(C, momentum=0.9, backend=backend))),
        ("CDBLoss", lambda b: _cdb(b, acc, device)),
        ("mse_outlying_loss", lambda b: lambda x, y: fi.mse_outlying_loss(x, y, outlying, backend=b)),
        ("cross_entropy upsample", lambda b: _upsampled(b)),
        ("dice_loss", lambda b: lambda x, y: fi.dice_loss(x, y, backend=b)),
        ("dice_ce_loss weight", lambda b: lambda x, y: fi.dice_ce_loss(x, y, weight=w, backend=b)),
        (
            "DiceLoss batch",
            module(lambda backend: fi.DiceLoss(include_background=False, batch=True, backend=backend)),
        ),
        ("ohem_cross_entropy", lambda b: lambda x, y: fi.ohem_cross_entropy(x, y, 0.7, 8, backend=b)),
    ]


def _cdb(backend, acc, device):
    m = fi.CDBLoss(C, backend=backend).to(device)
    m.update(acc)
    return m


def _upsampled(backend):
    return lambda x, y: fi.cross_entropy(x, y, backend=backend, upsample="bilinear")


def inputs(name, device):
    torch.manual_seed(0)
    if "upsample" in name:
        x = torch.randn(1, C, 2, 2, device=device, requires_grad=True)
        return x, torch.randint(0, C, (1, 4, 4), device=device)
    return torch.randn(1, C, 4, 4, device=device, requires_grad=True), torch.randint(
        0, C, (1, 4, 4), device=device
    )


@contextlib.contextmanager
def stubbed_launches(counter):
    """The Triton backend on CPU tensors with its compiled kernels, every launch's ``JITFunction.run`` a no-op
    (counted): the host path alone, as a GPU step takes it up to Triton's own launch."""
    from triton.runtime.jit import JITFunction

    from fused_imbalance import _fused, functional
    from fused_imbalance.ops import triton_backend

    # the finalize kernels' outputs (loss, backward factors, counts, bad labels) by argument position
    outputs = {
        "_finalize_kernel": slice(5, 10),
        "_dice_finalize_kernel": slice(5, 9),
        "_recall_ema_kernel": slice(6, 8),
    }

    def run(kernel, *args, **kwargs):
        counter[0] += 1
        out = outputs.get(kernel.fn.__name__)
        if out is not None:  # never written: zeros, so that what reads them goes on (a few CPU fills)
            for t in args[out]:
                t.zero_()

    be = triton_backend.backend()
    cpu_be = be._replace(supports=lambda x: True)  # CPU tensors, which the compiled kernels never touch here
    saved = (JITFunction.run, dict(functional._loaded), dict(functional._resolved))
    JITFunction.run = run
    functional._loaded["triton"] = cpu_be
    functional._resolved.clear()
    _fused.register_backend(cpu_be)
    try:
        yield
    finally:  # as it was: a backend not loaded before is not loaded after (not "unavailable")
        JITFunction.run = saved[0]
        for cache, before in ((functional._loaded, saved[1]), (functional._resolved, saved[2])):
            cache.clear()
            cache.update(before)
        _fused.register_backend(be)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def step(fn, x, y):
    def run():
        x.grad = None
        fn(x, y).sum().backward()

    return run


def timed(run, n):
    """Seconds of this thread's CPU time per call (the host work, which other processes on a busy machine
    do not inflate as they do wall time; one intra-op thread, so no work runs elsewhere)."""
    t = time.thread_time()
    for _ in range(n):
        run()
    return (time.thread_time() - t) / n


def ratio(run, eager, rounds, n):
    """Median over rounds of fused/eager time, alternating; and the median eager time (s)."""
    for _ in range(max(20, n // 10)):  # warm-up (caches, first-call paths)
        run()
        eager()
    ratios, eager_times = [], []
    for _ in range(rounds):
        e = timed(eager, n)
        f = timed(run, n)
        ratios.append(f / e)
        eager_times.append(e)
    return statistics.median(ratios), statistics.median(eager_times)


def count_step(run, launches):
    before = launches[0]
    with _CountOps() as c:
        run()
    return c.ops, launches[0] - before


def cpu_table(rounds, n):
    x0, y0 = inputs("cross_entropy", "cpu")
    eager = step(lambda x, y: F.cross_entropy(x, y), x0, y0)
    with _CountOps() as c:
        eager()
    rows = [("eager F.cross_entropy", 1.0, c.ops, 0, "-", "-", "-")]
    launches = [0]
    for name, make in losses("cpu"):
        x, y = inputs(name, "cpu")
        r_cpp, _ = ratio(step(make("cpp"), x, y), eager, rounds, n)
        ops_cpp, _ = count_step(step(make("cpp"), x, y), launches)
        with stubbed_launches(launches):
            run_t = step(make("triton"), x, y)
            r_tri, e = ratio(run_t, eager, rounds, n)
            ops_tri, k_tri = count_step(run_t, launches)
        rows.append((name, r_cpp, ops_cpp, 0, r_tri, ops_tri, k_tri))
        print(
            f"{name:24s} cpp {r_cpp:5.2f}x ({ops_cpp} aten ops)  triton {r_tri:5.2f}x ({ops_tri} aten ops, "
            f"{k_tri} launches)",
            flush=True,
        )
    return rows, e


def cuda_table(rounds):
    """Per-step wall time against the kernels' busy time at 8x19x512x1024 (float32)."""
    from torch.profiler import ProfilerActivity, profile

    dev = "cuda"
    out = []
    for name, make in losses(dev):
        torch.manual_seed(0)
        if "upsample" in name:
            x = torch.randn(8, C, 128, 256, device=dev, requires_grad=True)
        else:
            x = torch.randn(8, C, 512, 1024, device=dev, requires_grad=True)
        y = torch.randint(0, C, (8, 512, 1024), device=dev)
        run = step(make("triton"), x, y)
        for _ in range(5):
            run()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(rounds):
            run()
        end.record()
        torch.cuda.synchronize()
        wall = start.elapsed_time(end) / rounds
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1000.0
        out.append((name, wall, busy, len(kernels)))
        print(
            f"{name:24s} wall {wall:.3f} ms  kernels {busy:.3f} ms ({len(kernels)} launches)  "
            f"wall/busy {wall / busy:.2f}",
            flush=True,
        )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="folder for host.md")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=400, help="steps per timed block")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (
        f"device: {a.device} ({platform.processor() or platform.machine()}, 1 intra-op thread), torch "
        f"{torch.__version__}, python {sys.version.split()[0]}, {when}\n"
        f"command: python -m benchmarks.host {' '.join(argv if argv is not None else sys.argv[1:])}\n"
    )
    if a.device == "cuda":
        rows = cuda_table(a.rounds)
        md = (
            head
            + "\n| loss | step wall (ms) | kernels busy (ms) | launches | wall / busy |\n|---|---|---|---|---|\n"
        )
        md += "".join(f"| {n} | {w:.3f} | {b:.3f} | {k} | {w / b:.2f} |\n" for n, w, b, k in rows)
    else:
        rows, e = cpu_table(a.rounds, a.n)
        md = (
            head
            + f"eager F.cross_entropy forward+backward: {e * 1e6:.1f} us per step on a 1x19x4x4 input\n\n"
            "| loss | cpp: host time / eager CE | cpp: aten ops per step | triton (compiled kernels, launches "
            "stubbed): host time / "
            "eager CE | triton: aten ops per step | triton: kernel launches per step |\n|---|---|---|---|---|---|\n"
        )
        md += "".join(
            f"| {r[0]} | {r[1]:.2f} | {r[2]} | "
            + (f"{r[4]:.2f} | {r[5]} | {r[6]} |\n" if r[4] != "-" else "- | - | - |\n")
            for r in rows
        )
    print(md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "host.md"), "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
