"""The Dice family's Triton kernels compile for the H100 (sm_90a) with no register spills; no GPU needed.

``sm90_dice.py`` (beside this file) compiles them through their launchers, as ``sm90_compile.py`` does
for the other kernels (its stand-in driver and ptxas), in a subprocess: this process runs Triton under
TRITON_INTERPRET=1. Its variant set reaches every kernel and every path of each (see ``VARIANTS`` there).
It runs with the other compile-only checks (scripts/setup_and_test.sh: SM90_COMPILE).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _nvidia_backend():
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:  # pragma: no cover - a triton build without the NVIDIA backend
        return False


def test_sm90_dice_kernels_compile_without_spills():
    if not _nvidia_backend():
        pytest.skip("this triton has no NVIDIA backend with ptxas")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "sm90_dice.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    report = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
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
