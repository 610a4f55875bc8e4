"""Device time of each kernel of one fused forward + backward (CUDA): where a pass's time goes.

    python -m benchmarks.kernel_times [--shape 8x19x512x1024] [--loss cross_entropy] [--dtype float32]
                                      [--layout contiguous] [--reps 10]

Prints the torch profiler's table of CUDA kernels (device time per call, summed over ``--reps``
steps after a warm-up) beside the step's wall time between CUDA events: their difference is time
the GPU waited for the host (launch and dispatch overhead)."""
import argparse

import torch

from .cases import CHANNELS_LAST, CONTIGUOUS, DTYPES, Case, make_inputs, make_provider, parse_shape


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_times")
    p.add_argument("--shape", default="8x19x512x1024")
    p.add_argument("--loss", default="cross_entropy")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--layout", default=CONTIGUOUS, choices=(CONTIGUOUS, CHANNELS_LAST))
    p.add_argument("--provider", default="fused")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    case = Case(args.loss, parse_shape(args.shape), args.dtype, args.layout)
    x, t = make_inputs(case, "cuda")
    x.requires_grad_(True)
    fn = make_provider(args.provider, case, "cuda")

    def step():
        x.grad = None
        fn(x, t).backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.reps):
        step()
    end.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(end) / args.reps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.reps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    busy = sum(e.device_time_total for e in events) / args.reps / 1e3
    print(f"{args.provider} {args.loss} {args.shape} {args.dtype} {args.layout}: fwd+bwd {wall:.3f} ms between "
          f"events, kernels {busy:.3f} ms ({100 * busy / wall:.0f} % busy)")
    for e in events[:8]:
        print(f"  {e.device_time_total / args.reps / 1e3:8.3f} ms  {e.count // args.reps:3d}x  {e.key[:90]}")


if __name__ == "__main__":
    main()
