"""Compile the Dice family's Triton kernels for the H100 (sm_90a) with no GPU and report registers and
spills, as ``sm90_compile.py`` (beside this file) does for the other kernels, with its stand-in driver
(run by ``tests/test_sm90_compile.py``).

    python benchmarks/sm90_dice.py > report.json

``VARIANTS`` reaches every kernel of ``fused_imbalance/ops/triton_dice.py`` and every path of each:
the sums in registers (every class unrolled) and in vectors of C (a loop over class groups), squared,
with the cross-entropy, confusion counts in a register histogram and by integer atomics, NCHW vectors
of 4 (16-bit and float32), gathered channels_last pixels, float64; the finalize with and without its
row reduction, the reduce launch of a large table, the finalize op alone; the backward of each.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter would run kernels instead of compiling

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sm90_compile as S  # noqa: E402

# (C, layout, dtype, kind, flags, reduction, confusion): kind 0 Dice, 1 Tversky, 2 generalized;
# flags of DiceFlags (1 background, 2 squared, 4 Jaccard, 8 batch, 16 CE); confusion None, "hist", "global".
VARIANTS = [
    (19, "nchw", "f32", 0, 1 | 16, 0, "hist"),  # Cityscapes: registers, CE, register histogram
    (19, "nchw", "bf16", 0, 1 | 2 | 4, 2, None),  # squared, Jaccard, per-term output
    (19, "cl", "f32", 1, 1 | 8, 0, None),  # gathered channels_last pixels, the batch folded, Tversky γ != 1
    (14, "nchw", "f32", 2, 1, 1, None),  # the volume's class count, generalized Dice
    (24, "nchw", "f32", 0, 1 | 16, 0, None),  # the most classes in registers
    (20, "nchw", "f32", 0, 1 | 2, 0, None),  # the most with backward vectors of 4
    (25, "nchw", "f32", 0, 1 | 16, 0, None),  # the fewest in a loop over class groups
    (8, "nchw", "bf16", 0, 1 | 16, 0, "hist"),  # the most classes with vectors of 4 in the forward
    (19, "nchw", "f64", 0, 1 | 2 | 16, 0, None),  # float64: one pixel per thread
    (150, "nchw", "f32", 0, 1 | 16, 0, "global"),  # a loop over class groups, vectors of C sums, atomics
    (150, "cl", "bf16", 2, 8, 2, None),
    (40, "nchw", "f64", 0, 2 | 16, 1, None),
]
_DTYPES = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16}


def compile_variant(C, layout, dt, kind, flags, reduction, confusion):
    from fused_imbalance.ops import triton_dice as T
    from fused_imbalance.ops.dice import params

    dtype = _DTYPES[dt]
    x = S._logits(C, layout, dtype)
    N = x.numel() // C
    y = torch.empty(N, dtype=torch.int64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    conf = torch.empty((C, C), dtype=torch.int64) if confusion else None
    saved = T._FINALIZE_ELEMS
    start = len(S._COMPILED)
    prm = params(alpha=0.3, beta=0.7, gamma=1.5 if kind == 1 else 1.0, lambda_dice=0.6, lambda_ce=1.4)
    w = torch.empty(C, dtype=acc)
    try:
        if confusion == "global":
            # C * C beyond the register histogram's cells: integer atomics
            assert C * C > 1024
        for big in (False, True):  # the finalize's own row reduction, then the reduce launch first
            T._FINALIZE_ELEMS = 0 if big else 1 << 40
            T._forward(x, y, w, w, conf, kind, 0, flags, prm, -100, reduction, False, True)
        T._FINALIZE_ELEMS = 1 << 40
        _, sums, _, _, _ = T._forward(x, y, w, w, conf, kind, 0, flags, prm, -100, reduction, False, False)
    finally:
        T._FINALIZE_ELEMS = saved
    loss, coef, ce_scale = T._finalize_op(torch.empty_like(sums), w, w, kind, 0, flags, prm, reduction, 2.0)
    grad = torch.empty(loss.shape if reduction == 2 else (), dtype=acc)
    T._backward(x, y, torch.empty_like(coef), torch.empty_like(ce_scale), grad, kind, flags, -100, reduction)
    return S._COMPILED[start:]


def main():
    S._install()
    S.report([(compile_variant, v) for v in VARIANTS])


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
