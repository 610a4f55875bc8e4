"""torch.compile(fullgraph=True) through a training step, in a fresh process where no backend has
been loaded yet (loading one cannot be traced: it must not break the graph)."""
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import torch, fused_imbalance as fi
torch.manual_seed(0)
x = torch.randn(2, 5, 6, 7, requires_grad=True)
y = torch.randint(0, 5, (2, 6, 7)); y[0, 0] = 255
w = torch.linspace(0.5, 2.0, 5)

def step(x, y, conf):
    return (fi.recall_loss(x, y, ignore_index=255, confusion=conf, backend=BACKEND)
            + fi.focal_loss(x, y, 2.0, w, ignore_index=255, backend=BACKEND)
            + fi.mse_outlying_loss(x, y, torch.arange(1.0, 6.0), ignore_index=255, backend=BACKEND))

conf_c, conf_e = torch.zeros(5, 5, dtype=torch.long), torch.zeros(5, 5, dtype=torch.long)
lc = torch.compile(step, fullgraph=True)(x, y, conf_c)
gc, = torch.autograd.grad(lc, x)
le = step(x, y, conf_e)
ge, = torch.autograd.grad(le, x)
torch.testing.assert_close(lc, le)
torch.testing.assert_close(gc, ge)
assert torch.equal(conf_c, conf_e)
# inside the compiled graph the label check is a device assertion
y_bad = y.clone(); y_bad[1, 2, 3] = 9
try:
    torch.compile(step, fullgraph=True)(x, y_bad, conf_c)
except RuntimeError as e:
    assert "outside [0, C)" in str(e), e
else:
    raise AssertionError("a bad label passed the compiled check")
print("OK", fi.functional.resolve_backend(BACKEND, x))
"""


@pytest.mark.parametrize("backend", ["cpp", "auto"])
def test_compile_fullgraph_first_call(backend):
    from fused_imbalance.functional import resolve_backend
    import torch
    try:
        resolve_backend("cpp", torch.zeros(1, 2))
    except RuntimeError as e:
        pytest.skip(f"cpp backend unavailable: {e}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", f"BACKEND = {backend!r}\n" + SCRIPT], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK cpp" in out.stdout
