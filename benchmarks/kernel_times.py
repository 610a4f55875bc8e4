"""Device time of each kernel of one fused forward + backward (CUDA): where a pass's time goes.

    python -m benchmarks.kernel_times [--shape 8x19x512x1024] [--loss cross_entropy] [--dtype float32]
                                      [--layout contiguous] [--reps 10]

Prints the torch profiler's table of CUDA kernels (device time per step, averaged over ``--reps``
steps after a warm-up) beside the step's wall time between CUDA events: their difference is time
the GPU waited for the host (launch and dispatch overhead). ``measure.kernel_profile`` measures
both; the benchmark records the same for its cases (``python -m benchmarks.bench --busy fused``)."""

import argparse

from . import measure
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
        fn(x, t).backward()

    res = measure.kernel_profile(
        step, "cuda", reps=args.reps, warmup=3, setup=lambda: setattr(x, "grad", None)
    )
    wall, busy = res["wall_ms"], res["busy_ms"]
    print(
        f"{args.provider} {args.loss} {args.shape} {args.dtype} {args.layout}: fwd+bwd {wall:.3f} ms between "
        f"events, kernels {busy:.3f} ms ({100 * busy / wall:.0f} % busy)"
    )
    for name, ms, calls in res["top"][:8]:
        print(f"  {ms:8.3f} ms  {calls:3g}x  {name[:90]}")


if __name__ == "__main__":
    main()
