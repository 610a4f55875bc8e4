"""Same inputs, same bits: every determinism check of the suite. Loss and gradient bit-identical run
to run on every backend and under ``torch.use_deterministic_algorithms(True)``; the C++ kernels also
across thread counts and between their instruction-set copies; the Dice family and OHEM likewise.
Three checks at the ops of one kernel family stay beside that family's other op tests, whose inputs they
share: test_internals_triton.py::test_deterministic (each tiling of the plain Triton kernels) and
test_upsample.py's test_bit_identical_across_runs_and_thread_counts and test_triton_bit_identical."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_imbalance.functional as FI
from cases import ALL_LOSSES, backend_device, loss_and_grad, make_data, to_layout
from fused_imbalance.ops import cpp
from test_dice import CALLS, _data, _kw, _run
from fused_imbalance.ops import Weighting
from test_ohem import IGN, on, run
from test_ohem_reference import data
from tolerances import TOL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cpp = pytest.mark.skipif(not cpp.available(), reason="the C++ backend could not be built here")
if cpp.available():  # the C++ ops' inputs and calls (test_internals_cpp.py skips itself without them)
    from test_internals_cpp import BE, CLASS, MEAN, fwd, make


# --- the plain losses -----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
def test_deterministic(backend, layout):
    x, y = make_data((2, 19, 33, 31), torch.float32)
    x = to_layout(x, layout)
    if layout == "rows":
        y = y.reshape(-1)
    dev = backend_device(backend)
    x, y = x.to(dev), y.to(dev)
    for name in ("recall_loss", "sigmoid_focal_loss"):
        a = loss_and_grad(ALL_LOSSES[name], x, y, backend, "mean")
        b = loss_and_grad(ALL_LOSSES[name], x, y, backend, "mean")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_deterministic_algorithms_mode(backend):
    """Under torch.use_deterministic_algorithms(True) every backend runs (no nondeterministic op is
    taken) and repeated runs are bit-identical."""
    dev = backend_device(backend)
    x, y = make_data((2, 19, 16, 17), torch.float32)
    x, y = x.to(dev), y.to(dev)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for name in ALL_LOSSES:
            runs = [loss_and_grad(ALL_LOSSES[name], x, y, backend) for _ in range(3)]
            for loss, grad in runs[1:]:
                assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1]), name
            conf = [FI.confusion_matrix(x, y, backend=backend) for _ in range(2)]
            assert torch.equal(conf[0], conf[1])
    finally:
        torch.use_deterministic_algorithms(prev)


# --- the C++ kernels: runs, thread counts and instruction-set copies ------------------------------


@needs_cpp
def test_bit_identical_across_runs_and_thread_counts():
    x, y, _ = make((2, 19, 40, 70))
    target = y.reshape(-1)
    prev = torch.get_num_threads()
    outs = []
    try:
        for threads in (prev, 1, prev, 3):
            torch.set_num_threads(threads)
            f = fwd(x, target, 0, 2.0, reduction=MEAN, weighting=Weighting.RECALL)
            c = fwd(x, target, 0, 2.0, reduction=CLASS)
            g = BE.bwd(x, target, None, torch.ones(19), None, None, 0, 2.0, -100)
            outs.append(f[:4] + (c[0], g))
    finally:
        torch.set_num_threads(prev)
    for o in outs[1:]:
        for u, v in zip(o, outs[0]):
            assert torch.equal(u, v)


DET_SCRIPT = textwrap.dedent("""
    import sys, torch
    from fused_imbalance.ops import cpp
    be = cpp.backend()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 19, 45, 71, generator=g, dtype=torch.float64).mul(3).float()
    y = torch.randint(0, 19, (2 * 45 * 71,), generator=g)
    tv = torch.arange(1.0, 20.0)
    gc = torch.linspace(-1, 1, 19)
    out = {"isa": cpp.cpu_isa()}
    for mode, gamma in [(0, 0.0), (0, 1.5), (1, 2.0), (1, 0.7), (2, 0.0), (3, 0.0)]:
        t = tv if mode in (2, 3) else None
        for name, xx in [("nchw", x), ("cl", x.contiguous(memory_format=torch.channels_last)),
                         ("f64", x.double())]:
            tt = t.to(xx.dtype) if t is not None and xx.dtype == torch.float64 else t
            conf = torch.zeros(19, 19, dtype=torch.int64)
            f = be.fwd(xx, y, None, tt, conf, mode, gamma, -100, 2, 0, True, False, False)
            c = be.fwd(xx, y, None, tt, None, mode, gamma, -100, 3, 0, True, False, False)
            b = be.bwd(xx, y, f[0] * 0 + 0.25, gc.to(f[1].dtype), tt, None, mode, gamma, -100)
            out[(mode, gamma, name)] = (f[0], c[0], f[2], f[3], conf, b)
    # the upsampled ops: an upsampling (the shuffled horizontal pass) and a downsampling
    for low, size in [((2, 19, 9, 13), (37, 50)), ((1, 6, 20, 30), (13, 17))]:
        xu = torch.randn(low, generator=g, dtype=torch.float64).mul(3).float()
        yu = torch.randint(0, low[1], (low[0],) + size, generator=g)
        yu[0, 0, :5] = -100
        gp = torch.randn(yu.numel(), generator=g)
        for interp, ac in [(1, False), (1, True), (0, False)]:
            for mode, gamma in [(0, 2.0), (1, 1.5), (3, 0.0)]:
                for name, xx in [("nchw", xu), ("cl", xu.contiguous(memory_format=torch.channels_last)),
                                 ("f64", xu.double())]:
                    t = torch.arange(1.0, low[1] + 1, dtype=xx.dtype) if mode == 3 else None
                    conf = torch.zeros(low[1], low[1], dtype=torch.int64)
                    f = be.up_fwd(xx, yu, interp, ac, None, t, conf, mode, gamma, -100, 2, 0, True, False, True)
                    c = be.up_fwd(xx, yu, interp, ac, None, t, None, mode, gamma, -100, 3, 0, True, False, False)
                    gpu, gcu = gp.to(f[0].dtype), torch.linspace(-1, 1, low[1]).to(f[0].dtype)
                    b = be.up_bwd(xx, yu, interp, ac, gpu, gcu, t, None, mode, gamma, -100)
                    bl = be.up_bwd(xx, yu, interp, ac, gpu, gcu, t, f[5], mode, gamma, -100)  # the forward's lse
                    out[("up", low, interp, ac, mode, gamma, name)] = (f[0], c[0], f[2], f[3], f[5], conf, b, bl)
    torch.save(out, sys.argv[1])
""")


def _det_outputs(tmp_path, name, **env):
    path = tmp_path / f"{name}.pt"
    subprocess.run(
        [sys.executable, "-c", DET_SCRIPT, str(path)],
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, **env},
    )
    return torch.load(path)


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "isa":
            continue
        for u, v in zip(a[k], b[k]):
            assert torch.equal(u, v), k


@needs_cpp
def test_instruction_sets(tmp_path):
    """The AVX2 and AVX-512 copies of the kernels, which both use fused multiply-adds, compute the
    same bits (checked where this CPU has AVX-512: FUSED_IMBALANCE_CPU_ISA only lowers the choice);
    the portable copy rounds each multiply-add twice and agrees with them within the tolerance
    table, with the same integer outputs (counts, true positives, confusion)."""
    best = _det_outputs(tmp_path, "best")
    assert best["isa"] == cpp.cpu_isa()
    if best["isa"] == "avx512":
        avx2 = _det_outputs(tmp_path, "avx2", FUSED_IMBALANCE_CPU_ISA="avx2")
        assert avx2["isa"] == "avx2"
        _assert_identical(avx2, best)
    base = _det_outputs(tmp_path, "base", FUSED_IMBALANCE_CPU_ISA="base")
    assert base["isa"] == "base"
    assert base.keys() == best.keys()
    differ = 0
    for k in best:
        if k == "isa":
            continue
        for u, v in zip(base[k], best[k]):
            if u.is_floating_point():
                torch.testing.assert_close(u, v, **TOL[u.dtype], msg=lambda m: f"{k}: {m}")
                differ += not torch.equal(u, v)
            else:
                assert torch.equal(u, v), k
    if best["isa"] != "base":  # the comparison sees two different copies
        assert differ > 0


# --- the Dice family ------------------------------------------------------------------------------


def test_dice_deterministic(backend):
    C = 5 if backend == "triton" else 19
    x, y = _data((2, C, 6, 7), dtype=torch.float32, device=backend_device(backend))
    for name in ("dice_ce", "generalized_dice"):
        first = _run(CALLS[name][0], x, y, "mean", backend=backend, **_kw(name, C, x.device))
        for _ in range(2):
            again = _run(CALLS[name][0], x, y, "mean", backend=backend, **_kw(name, C, x.device))
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
def test_dice_cpp_bit_identical_across_thread_counts(backend):
    x, y = _data((2, 19, 97, 131), dtype=torch.float32, every=13)
    threads = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out.append(
                [
                    _run(CALLS[name][0], x, y, "mean", backend=backend, **_kw(name, 19, "cpu"))
                    for name in ("dice_ce", "dice_batch_smooth")
                ]
            )
    finally:
        torch.set_num_threads(threads)
    for other in out[1:]:
        for (la, ga), (lb, gb) in zip(out[0], other):
            assert torch.equal(la, lb) and torch.equal(ga, gb)


# --- OHEM -----------------------------------------------------------------------------------------


def test_ohem_deterministic(backend):
    x, y = data(
        shape=(2, 19, 24, 20) if backend == "triton" else (2, 19, 240, 200), seed=66, dtype=torch.float32
    )
    x, y = on(backend, x, y)
    for reduction in ("mean", "none"):
        a = run(backend, x, y, reduction, thresh=0.7, min_kept=1000, ignore_index=IGN)
        b = run(backend, x, y, reduction, thresh=0.7, min_kept=1000, ignore_index=IGN)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_ohem_cpp_bit_identical_across_thread_counts():
    """The O(N) passes work in chunks that depend only on N (here several), summed in chunk order."""
    pytest.importorskip("fused_imbalance._C")
    x, y = data(shape=(2, 7, 160, 150), seed=67, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = run("cpp", x, y, thresh=0.7, min_kept=20000, ignore_index=IGN)
        torch.set_num_threads(max(2, threads))
        b = run("cpp", x, y, thresh=0.7, min_kept=20000, ignore_index=IGN)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
