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
# inside the compiled graph the label check stays: a device assertion (Triton, the reference), or the
# C++ op's own ValueError naming the label
y_bad = y.clone(); y_bad[1, 2, 3] = 9
try:
    torch.compile(step, fullgraph=True)(x, y_bad, conf_c)
except (RuntimeError, ValueError) as e:
    assert "outside [0," in str(e), e
else:
    raise AssertionError("a bad label passed the compiled check")
print("OK", fi.functional.resolve_backend(BACKEND, x))
"""


DYNAMIC_GAMMA = r"""
import torch, fused_imbalance as fi
import fused_imbalance.functional as F
torch.manual_seed(0)
x = torch.randn(2, 5, 6, 7, requires_grad=True)
y = torch.randint(0, 5, (2, 6, 7)); y[0, 0] = 255
w = torch.linspace(0.5, 2.0, 5)
kw = dict(ignore_index=255, backend=BACKEND)

def step(x, y, gamma):  # every loss that takes gamma, with gamma a (dynamic) float input
    return (F.focal_loss(x, y, gamma, w, **kw) + F.sigmoid_focal_loss(x, y, gamma, **kw)
            + F.class_balanced_loss(x, y, [5, 4, 3, 2, 1], 0.9, "focal", gamma, **kw)
            + F.weighted_loss(x, y, w, "softmax_focal", gamma, **kw)
            + F.cdb_loss(x, y, [0.1, 0.5, 0.9, 0.3, 0.2], gamma=gamma, **kw))

compiled = torch.compile(step, fullgraph=True, dynamic=True)
for gamma in (2.0, 0.5):
    lc = compiled(x, y, gamma)
    gc, = torch.autograd.grad(lc, x)
    le = step(x, y, gamma)
    ge, = torch.autograd.grad(le, x)
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(gc, ge)
modules = [fi.FocalLoss(1.5, w, **kw), fi.ClassBalancedLoss([5, 4, 3, 2, 1], 0.9, "focal", 0.5, **kw),
           fi.CDBLoss(5, gamma=0.5, **kw)]
for m in modules:
    torch.testing.assert_close(torch.compile(m, fullgraph=True, dynamic=True)(x, y), m(x, y))
print("OK", fi.functional.resolve_backend(BACKEND, x))
"""


def _run(script, backend):
    if backend != "reference":
        from fused_imbalance.functional import resolve_backend
        import torch

        try:
            resolve_backend("cpp", torch.zeros(1, 2))
        except RuntimeError as e:
            pytest.skip(f"cpp backend unavailable: {e}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", f"BACKEND = {backend!r}\n" + script],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"OK {'reference' if backend == 'reference' else 'cpp'}" in out.stdout


@pytest.mark.parametrize("backend", ["cpp", "auto", "reference"])
def test_compile_fullgraph_first_call(backend):
    """Every backend, the reference (the no-compiler fallback) included, with the label check on."""
    _run(SCRIPT, backend)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_compile_dynamic_gamma(backend):
    """torch.compile(fullgraph=True, dynamic=True): gamma is a symbolic float there."""
    _run(DYNAMIC_GAMMA, backend)
