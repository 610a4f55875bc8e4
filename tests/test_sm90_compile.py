"""The Triton kernels compile for the H100 (sm_90a) with no register spills; no GPU needed.

``benchmarks/sm90_compile.py`` compiles the kernels through the launcher exactly as it
configures them, with Triton's bundled ptxas behind a stand-in driver, in a subprocess: the test
process runs Triton under TRITON_INTERPRET=1, where ``@triton.jit`` makes interpreted functions
that cannot be compiled. The variant set reaches every kernel and every code path of each
(see ``VARIANTS`` there), not every class count: C is a compile-time constant of the static
kernels and each C is its own kernel. ``python benchmarks/sm90_compile.py --all`` checks more.
Triton's cache (``TRITON_CACHE_DIR``, by default ~/.triton/cache) makes repeated runs fast.

``benchmarks/sm90_dice.py`` does the same for the Dice family's kernels, with the same stand-in driver
and ptxas (its variant set: ``VARIANTS`` there). These checks run with the other compile-only checks
(scripts/setup_and_test.sh: SM90_COMPILE).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "benchmarks")  # the compile-only drivers


def _nvidia_backend():
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:  # pragma: no cover - a triton build without the NVIDIA backend
        return False


def _compile_report(tool):
    """The JSON records of a compile-only driver in benchmarks/ (skipped without ptxas for sm_90)."""
    if not _nvidia_backend():
        pytest.skip("this triton has no NVIDIA backend with ptxas")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(
        [sys.executable, os.path.join(TOOLS, tool)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def report():
    return _compile_report("sm90_compile.py")


def _every_kernel_compiles(report):
    kernels = {r["kernel"] for r in report if not r["kernel"].startswith(("_up_", "_select_", "_ohem_"))}
    assert kernels == {
        "_fwd_static_kernel",
        "_bwd_static_kernel",
        "_fwd_chunked_kernel",
        "_bwd_chunked_kernel",
        "_fwd_rows_kernel",
        "_bwd_rows_kernel",
        "_class_sum_kernel",
        "_finalize_kernel",
        "_reduce_rows_kernel",
        "_recall_ema_kernel",
    }
    # every flag of the static forward is reached with both values
    fwd = [r["constexprs"] for r in report if r["kernel"] == "_fwd_static_kernel"]
    for flag in ("LOOP", "REG_STATS", "STORE_PL", "WEIGH_PL", "NEED_TP", "FOCAL"):
        assert {c[flag] for c in fwd} == {"True", "False"}, flag
    fin = [r["constexprs"] for r in report if r["kernel"] == "_finalize_kernel"]
    assert {c["RED"] for c in fin} >= {"0", "1", "2"} and {c["WEIGHTING"] for c in fin} >= {"0", "1", "3"}
    ema = [r["constexprs"] for r in report if r["kernel"] == "_recall_ema_kernel"]
    assert {c["RED"] for c in ema} == {"0", "1"}
    assert {c["CONF"] for c in fwd} == {"0", "1", "2"}
    assert {c["MODE"] for c in fwd} == {"0", "1", "2", "3", "4"}
    assert {c["VEC"] for c in fwd} == {"1", "2", "4", "8"}  # 8: 16-bit NCHW; 1: float64 NCHW
    chunked = [r["constexprs"] for r in report if r["kernel"] == "_fwd_chunked_kernel"]
    assert {c["ROWSUM"] for c in chunked} == {"True", "False"}
    assert {c["SINGLE"] for c in chunked} == {"True", "False"}


def _no_spills(report):
    spilling = [r for r in report if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, json.dumps(spilling, indent=1)


# --- the upsampled ops (UPSAMPLE_VARIANTS of sm90_compile.py) -----------------------------------


def _upsample_kernels_compile(report):
    """The three upsampled kernels, each class plan (cached rows; groups in a loop with the coefficient
    launch or, cross-entropy, the forward's lse), one- and two-tap axes; no spills (_no_spills)."""
    fwd = [r["constexprs"] for r in report if r["kernel"] == "_up_fwd_kernel"]
    coef = [r["constexprs"] for r in report if r["kernel"] == "_up_coef_kernel"]
    bwd = [r["constexprs"] for r in report if r["kernel"] == "_up_bwd_kernel"]
    assert fwd and coef and bwd
    assert {c["CACHE"] for c in fwd} == {c["CACHE"] for c in coef} == {"True", "False"}
    assert {c["REG_STATS"] for c in fwd} == {"True", "False"}
    assert {c["TAP2_X"] for c in bwd} == {"True", "False"}
    assert {c["PRE"] for c in bwd} == {"0", "1", "2"}  # the softmax in the pass, the coefficients, the lse


# --- the exact selection (SELECT_VARIANTS of sm90_compile.py) -----------------------------------


def _select_kernels_compile(report):
    """Every histogram pass of the float32 and float64 digit plans (the first one, the first after
    it, the later ones) and the final launch; no spills (_no_spills)."""
    hist = [r["constexprs"] for r in report if r["kernel"] == "_select_hist_kernel"]
    assert any(r["kernel"] == "_select_final_kernel" for r in report)
    assert {c["FIRST"] for c in hist} == {"True", "False"}
    assert {c["PREV_BITS"] for c in hist} == {"0", "8"}
    assert {c["BITS"] for c in hist} == {"7", "8"}


# --- the OHEM cross-entropy (OHEM_VARIANTS of sm90_compile.py) ------------------------------------


def _ohem_kernels_compile(report):
    """The O(N) kernels of the OHEM cross-entropy with every flag, and the selection's passes after a first
    histogram counted by its probability kernel; no spills (_no_spills)."""
    kernels = {r["kernel"]: [] for r in report if r["kernel"].startswith("_ohem_")}
    for r in report:
        if r["kernel"] in kernels:
            kernels[r["kernel"]].append(r["constexprs"])
    assert set(kernels) == {
        "_ohem_prob_kernel",
        "_ohem_kept_kernel",
        "_ohem_finalize_kernel",
        "_ohem_factor_kernel",
    }
    assert {c["WEIGHTED"] for c in kernels["_ohem_prob_kernel"]} == {"True", "False"}
    assert {(c["CLEAR"], c["UNIT"]) for c in kernels["_ohem_kept_kernel"]} == {
        ("False", "False"),
        ("False", "True"),
        ("True", "True"),
    }
    assert {(c["MEAN"], c["MEAN_ALL"]) for c in kernels["_ohem_finalize_kernel"]} >= {
        ("True", "True"),
        ("True", "False"),
        ("False", "False"),
    }


def test_sm90_compile(report):
    """The three checks in one test, so that the compile run (the module's fixture) happens once also
    under pytest-xdist, which runs a module fixture in every worker that gets one of its tests."""
    _every_kernel_compiles(report)
    _no_spills(report)
    _upsample_kernels_compile(report)
    _select_kernels_compile(report)
    _ohem_kernels_compile(report)


# --- the Dice family's kernels (benchmarks/sm90_dice.py) ------------------------------------------


def test_sm90_dice_kernels_compile_without_spills():
    report = _compile_report("sm90_dice.py")
    kernels = {r["kernel"] for r in report}
    assert kernels == {"_dice_fwd_kernel", "_dice_bwd_kernel", "_dice_finalize_kernel", "_dice_reduce_kernel"}
    fwd = [r["constexprs"] for r in report if r["kernel"] == "_dice_fwd_kernel"]
    for flag in ("LOOP", "SQUARED", "CE"):
        assert {c[flag] for c in fwd} == {"True", "False"}, flag
    assert {c["CONF"] for c in fwd} == {"0", "1", "2"}
    assert {c["VEC"] for c in fwd} == {"1", "2", "4"}
    bwd = [r["constexprs"] for r in report if r["kernel"] == "_dice_bwd_kernel"]
    assert (
        {c["LOOP"] for c in bwd} == {c["SQUARED"] for c in bwd} == {c["CE"] for c in bwd} == {"True", "False"}
    )
    assert {c["VEC"] for c in bwd} == {"1", "2", "4"}
    fin = [r["constexprs"] for r in report if r["kernel"] == "_dice_finalize_kernel"]
    assert {c["KIND"] for c in fin} == {"0", "1", "2"} and {c["RED"] for c in fin} == {"0", "1", "2"}
    assert {(c["REDUCE"], c["BAD"], c["COMPUTE"]) for c in fin} == {
        ("True", "True", "True"),
        ("False", "False", "True"),
        ("True", "True", "False"),
    }
    spilling = [r for r in report if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, json.dumps(spilling, indent=1)
