"""The host path of a GPU step, on this CPU: ``python -m benchmarks.host`` runs every loss through the Triton
backend's compiled-kernel launch path (``JITFunction``, as on a GPU, not the interpreter; each launch's
``run`` a no-op) and through the C++ backend. So the launchers' GPU tiling and the way to each launch run on
every commit, and the launches of a step are counted: the loss kernel, its finalize and the backward (the
recall moving average's one more, the OHEM threshold's passes). The ratios themselves are a benchmark's,
not a test's: only that they were measured is checked."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHES = {"RecallLoss momentum": 4, "ohem_cross_entropy": 11}  # every other loss: 3


def test_host_benchmark_runs_every_loss_on_the_compiled_launch_path(tmp_path):
    pytest.importorskip("triton")
    from fused_imbalance.ops import cpp

    if not cpp.available():
        pytest.skip("the C++ backend could not be built here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.host", "--rounds", "1", "--n", "2", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {}
    for line in (tmp_path / "host.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and re.fullmatch(r"\d+\.\d\d", cells[1]) and cells[0] != "eager F.cross_entropy":
            rows[cells[0]] = cells
    assert len(rows) == 14, rows
    for name, (_, cpp_ratio, cpp_ops, tri_ratio, tri_ops, launches) in rows.items():
        assert float(cpp_ratio) > 0 and float(tri_ratio) > 0 and int(cpp_ops) > 0 and int(tri_ops) > 0
        assert int(launches) == LAUNCHES.get(name, 3), (name, launches)
