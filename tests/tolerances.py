"""The one tolerance table of the test suite, per logits dtype.

A fused result is compared against the reference run on the same input. float16/bfloat16
inputs are computed in float32 by every backend, so the differences are summation order and
the rounding of the stored gradient (one ulp of the dtype), not the input precision.
"""

import torch

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),  # gradient stored in float16: 2^-10 relative
    torch.bfloat16: dict(atol=1e-2, rtol=8e-3),  # gradient stored in bfloat16: 2^-7 relative
}

# Losses and statistics are float32 for 16-bit inputs: compare them with float32 tolerances.
LOSS_TOL = {**TOL, torch.float16: TOL[torch.float32], torch.bfloat16: TOL[torch.float32]}
