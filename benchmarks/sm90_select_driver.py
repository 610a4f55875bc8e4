"""sm90_static driver: the exact k-th selection of fused_imbalance/ops/triton_select.py on Cityscapes- and
ADE20K-sized label-probability vectors.

    python sm90_static.py benchmarks/sm90_select_driver.py --cache DIR

Launches go through the public op torch.ops.fused_imbalance.triton_select_kth. A case is one whole
selection: the zero-fill, the histogram passes (all of them, or all but the first with ``first_hist``)
and the final one-program launch. Byte floor: the values read once per histogram pass.
"""

import importlib

import torch

S = importlib.import_module("fused_imbalance.ops.triton_select")
try:
    SELECT = torch.ops.fused_imbalance.triton_select_kth
except (AttributeError, RuntimeError) as e:
    raise SystemExit(f"fused_imbalance's Triton select op is not registered ({e}): is triton installed?")

PROBLEMS = [  # name, entries (pixels of the batch), dtype
    ("city_f32", 8 * 1024 * 1024, torch.float32),
    ("ade_f32", 16 * 512 * 512, torch.float32),
    ("city_f64", 8 * 1024 * 1024, torch.float64),
]
SMS = 132


def _cdiv(a, b):
    return -(-a // b)


def _hist_trips(launch):
    """_select_hist_kernel: one loop at depth 0, the tiles of BLOCK entries (summed over programs), on
    _PROGRAMS_PER_SM programs per SM (from CPU tensors the launcher starts 3)."""
    tiles = _cdiv(launch["ints"]["N"], launch["constexprs"]["BLOCK"])
    return {"programs": min(tiles, SMS * S._PROGRAMS_PER_SM), "loops": [tiles]}


TRIPS = {"_select_hist_kernel": _hist_trips}


def cases():
    for name, n, dtype in PROBLEMS:
        passes = len(S.digit_plan(dtype))
        for first in (False, True):

            def run(n=n, dtype=dtype, first=first):
                v = torch.empty(n, dtype=dtype)
                fh = torch.empty(S.FIRST_BINS, dtype=torch.int64) if first else None
                SELECT(v, torch.zeros((), dtype=torch.int64), fh)

            p = passes - first
            yield {
                "name": f"{name}/{'first_hist' if first else 'all'}",
                "run": run,
                "elements": n,
                "bytes": p * n * torch.empty((), dtype=dtype).element_size(),
            }
