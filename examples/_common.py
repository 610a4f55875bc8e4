"""What both examples share: the device to run on and how it is named in the results."""
import platform

import torch


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
