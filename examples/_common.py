"""What both examples share: the device to run on and how it is named in the results."""

import os
import platform
import tempfile

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def pick_device(name=None):
    """``name`` if given, else CUDA when there is a GPU, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe_device(device):
    """The GPU's name, or the CPU's with the number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_name()}), {torch.get_num_threads()} thread(s)"


def add_run_options(parser):
    """The options both examples take: threads, device, output folder, no plot."""
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--out",
        default=None,
        help="where the table, the numbers and the plot go (default: examples/results/, "
        "with --smoke a new temporary folder)",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the plot (matplotlib not needed)")


def start(args):
    """Apply ``--threads`` and return the device to run on."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return pick_device(args.device)


def output_folder(args, name):
    """``--out``; without it examples/results/, or with ``--smoke`` a new temporary folder, so that a
    smoke run's tiny-budget numbers never replace the committed results. Created; set as ``args.out``."""
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix=f"{name}_smoke_") if args.smoke else RESULTS
        if args.smoke:
            print(f"--smoke without --out: writing to {args.out}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    return args.out
