"""torch.compile and torch.func, for every loss family (the CUDA-only checks: test_compile_cuda.py).

torch.compile(fullgraph=True) through a training step, in a fresh process where no backend has
been loaded yet (loading one cannot be traced: it must not break the graph); the C++ ops, the
upsampled losses, the Dice family, OHEM and the exact selection traced as one graph, equal to eager;
the Triton ops captured without a graph break (run eagerly: under TRITON_INTERPRET AOT tracing would
launch the interpreted kernels on fake tensors). Forward-mode derivatives, torch.func.grad, jvp,
jacrev and jacfwd equal the reference's; what cannot be done (double backward, vmap) is an error
that says so."""

import os
import subprocess
import sys

import pytest
import torch

import fused_imbalance.functional as FI
from cases import ALL_LOSSES, backend_device, make_data
from fused_imbalance.ops import cpp
from fused_imbalance.ops import select as SEL
from test_dice import _data
from test_ohem import IGN, on, run
from test_ohem_reference import data
from test_select import check
from test_upsample import _need, _triton_on_the_gpu, needs_cpp  # noqa: F401 (an autouse fixture)
from tolerances import TOL

if cpp.available():  # the C++ ops' inputs (test_internals_cpp.py skips itself without them)
    from test_internals_cpp import make

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


# --- torch.compile of the C++ ops -----------------------------------------------------------------


def test_compile_training_step():
    import fused_imbalance.functional as FI

    torch._dynamo.reset()
    x0, y, _ = make((2, 5, 6, 7))
    x0 = x0.contiguous(memory_format=torch.channels_last)
    outlying = torch.arange(1.0, 6.0)

    def step(x, y, conf):
        return (
            FI.recall_loss(x, y, confusion=conf, backend="cpp")
            + FI.focal_loss(x, y, gamma=1.5, backend="cpp")
            + FI.mse_outlying_loss(x, y, outlying, input="softmax", backend="cpp")
        )

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        x = x0.clone(memory_format=torch.preserve_format).requires_grad_(True)
        conf = torch.zeros(5, 5, dtype=torch.int64)
        loss = fn(x, y, conf)
        loss.backward()
        results.append((loss.detach(), x.grad, conf))
    (l0, g0, c0), (l1, g1, c1) = results
    torch.testing.assert_close(l1, l0, **TOL[torch.float32])
    torch.testing.assert_close(g1, g0, **TOL[torch.float32])
    assert torch.equal(c1, c0) and c0.sum() > 0


@needs_cpp
def test_compile_recall_momentum_module():
    """RecallLoss with a momentum under torch.compile(fullgraph=True) (the module's torch operations on the
    fused pass's counts) against the eager module (the backend's one-launch moving average): the losses,
    gradients and running recall agree step by step, within the float32 tolerance."""
    from fused_imbalance.losses import RecallLoss

    torch._dynamo.reset()
    eager, compiled = RecallLoss(5, momentum=0.8, backend="cpp"), RecallLoss(5, momentum=0.8, backend="cpp")
    fn = torch.compile(compiled, fullgraph=True)
    for step in range(3):
        x0, y, _ = make((2, 5, 4, 6), seed=step)
        out = []
        for f in (eager, fn):
            x = x0.clone().requires_grad_(True)
            loss = f(x, y)
            loss.backward()
            out.append((loss.detach(), x.grad))
        torch.testing.assert_close(out[1][0], out[0][0], **TOL[torch.float32])
        torch.testing.assert_close(out[1][1], out[0][1], **TOL[torch.float32])
        torch.testing.assert_close(compiled.running_recall, eager.running_recall, **TOL[torch.float32])
        assert torch.equal(compiled.seen, eager.seen)
    assert eager.seen.any() and 0 < eager.running_recall.max() < 1


# --- upsample -------------------------------------------------------------------------------------


@needs_cpp
def test_compile_fullgraph():
    script = r"""
import torch, fused_imbalance as fi
torch.manual_seed(0)
x = torch.randn(2, 5, 6, 7).contiguous(memory_format=torch.channels_last).requires_grad_(True)
y = torch.randint(0, 5, (2, 23, 19)); y[0, 0] = 255

def step(x, y, conf):
    return (fi.recall_loss(x, y, ignore_index=255, confusion=conf, backend="cpp", upsample="bilinear")
            + fi.focal_loss(x, y, 2.0, ignore_index=255, backend="cpp", upsample="nearest")
            + fi.mse_outlying_loss(x, y, torch.arange(1.0, 6.0), ignore_index=255, backend="cpp",
                                   upsample="bilinear", align_corners=True))

conf_c, conf_e = torch.zeros(5, 5, dtype=torch.long), torch.zeros(5, 5, dtype=torch.long)
lc = torch.compile(step, fullgraph=True)(x, y, conf_c)
gc, = torch.autograd.grad(lc, x)
le = step(x, y, conf_e)
ge, = torch.autograd.grad(le, x)
torch.testing.assert_close(lc, le)
torch.testing.assert_close(gc, ge)
assert torch.equal(conf_c, conf_e) and conf_c.sum() > 0
print("OK")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


def test_triton_compile_fullgraph():
    """torch.compile(fullgraph=True) captures the Triton upsampled ops (their fake kernels) without a graph
    break, and forward, gradient and confusion match eager. The captured graph runs eagerly
    (``backend="eager"``): under TRITON_INTERPRET, AOT tracing would launch the interpreted kernels on fake
    tensors (see ``_opcheck_utils``)."""
    _need("triton")
    torch.compiler.reset()
    x = torch.randn(2, 5, 6, 7, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = torch.randint(0, 5, (2, 23, 19), generator=torch.Generator().manual_seed(1))
    y[0, 0] = 255

    def step(x, y, conf):
        return FI.recall_loss(
            x, y, ignore_index=255, confusion=conf, backend="triton", upsample="bilinear"
        ) + FI.focal_loss(x, y, 2.0, ignore_index=255, backend="triton", upsample="nearest")

    conf_c, conf_e = torch.zeros(5, 5, dtype=torch.long), torch.zeros(5, 5, dtype=torch.long)
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    lc = compiled(x, y, conf_c)
    (gc,) = torch.autograd.grad(lc, x)
    le = step(x, y, conf_e)
    (ge,) = torch.autograd.grad(le, x)
    torch.testing.assert_close(lc, le, atol=0, rtol=0)
    torch.testing.assert_close(gc, ge, atol=0, rtol=0)
    assert torch.equal(conf_c, conf_e) and conf_c.sum() > 0


# --- the Dice family ------------------------------------------------------------------------------


COMPILE = r"""
import torch, fused_imbalance as fi
torch.manual_seed(0)
x = torch.randn(2, 5, 6, 7, requires_grad=True)
y = torch.randint(0, 5, (2, 6, 7)); y[0, 0] = 255
w = torch.linspace(0.5, 2.0, 5)
kw = dict(ignore_index=255, backend=BACKEND)
dice = fi.DiceLoss(w[1:], include_background=False, jaccard=True, **kw)

def step(x, y, conf):
    return (dice(x, y, confusion=conf) + fi.dice_ce_loss(x, y, 0.7, 1.3, w, batch=True, **kw)
            + fi.generalized_dice_loss(x, y, "simple", **kw) + fi.tversky_loss(x, y, 0.3, 0.7, 1.5, **kw)
            + fi.tversky_loss(x, y, reduction="none", **kw).sum())

conf_c, conf_e = torch.zeros(5, 5, dtype=torch.long), torch.zeros(5, 5, dtype=torch.long)
lc = torch.compile(step, fullgraph=True)(x, y, conf_c)
gc, = torch.autograd.grad(lc, x)
le = step(x, y, conf_e)
ge, = torch.autograd.grad(le, x)
torch.testing.assert_close(lc, le)
torch.testing.assert_close(gc, ge)
assert torch.equal(conf_c, conf_e)
y_bad = y.clone(); y_bad[1, 2, 3] = 9
try:
    torch.compile(step, fullgraph=True)(x, y_bad, conf_c)
except (RuntimeError, ValueError) as e:
    assert "outside [0," in str(e), e
else:
    raise AssertionError("a bad label passed the compiled check")
print("OK", fi.functional.resolve_backend(BACKEND, x))
"""


@pytest.mark.parametrize("backend_name", ["cpp", "reference"])
def test_dice_compile_fullgraph_first_call(backend_name):
    """A training step of all four losses under torch.compile(fullgraph=True), in a fresh process where no
    backend has been loaded yet, equals the eager step (value, gradient, confusion counts)."""
    if backend_name == "cpp":
        try:
            FI.resolve_backend("cpp", torch.zeros(1, 2))
        except RuntimeError as e:
            pytest.skip(f"cpp backend unavailable: {e}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", f"BACKEND = {backend_name!r}\n" + COMPILE],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"OK {backend_name}" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="test_compile_fullgraph_cuda compiles the kernels")
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_graph_capture_without_a_break(backend):
    # the interpreter cannot run under AOT tracing: capture the graph with the "eager" backend, which runs
    # the registered ops (on a GPU, test_compile_fullgraph_cuda below compiles them with Inductor)
    x, y = _data((2, 4, 3, 4), dtype=torch.float32)
    step = (
        lambda t: FI.dice_ce_loss(t, y, weight=torch.linspace(0.5, 2, 4), backend="triton")
        + FI.dice_loss(t, y, batch=True, reduction="none", backend="triton").sum()
    )
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    la = torch.compile(step, fullgraph=True, backend="eager")(xa)
    lb = step(xb)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb) and torch.equal(xa.grad, xb.grad)


# --- OHEM and the exact selection -----------------------------------------------------------------


def test_compile_fullgraph_cpp():
    pytest.importorskip("fused_imbalance._C")
    script = r"""
import torch, fused_imbalance as fi
torch.manual_seed(0)
x = torch.randn(2, 5, 6, 7).contiguous(memory_format=torch.channels_last).requires_grad_(True)
y = torch.randint(0, 5, (2, 6, 7)); y[0, 0] = 255
yu = torch.randint(0, 5, (2, 23, 19)); yu[0, 0] = 255

def step(x, y, yu, conf):
    return (fi.ohem_cross_entropy(x, y, 0.6, 20, ignore_index=255, confusion=conf, backend="cpp")
            + fi.ohem_cross_entropy(x, yu, 0.5, 4, ignore_index=255, backend="cpp", convention="mmseg",
                                    upsample="bilinear", align_corners=True)
            + fi.ohem_cross_entropy(x, y, 0.7, 3, ignore_index=255, backend="cpp", reduction="none").sum())

conf_c, conf_e = torch.zeros(5, 5, dtype=torch.long), torch.zeros(5, 5, dtype=torch.long)
lc = torch.compile(step, fullgraph=True)(x, y, yu, conf_c)
gc, = torch.autograd.grad(lc, x)
le = step(x, y, yu, conf_e)
ge, = torch.autograd.grad(le, x)
torch.testing.assert_close(lc, le, atol=0, rtol=0)
torch.testing.assert_close(gc, ge, atol=0, rtol=0)
assert torch.equal(conf_c, conf_e) and conf_c.sum() > 0 and lc > 0
print("OK")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


def test_compile_fullgraph_triton():
    """The Triton ops are captured without a graph break (their fake kernels) and match eager; the graph
    runs eagerly (backend="eager": under TRITON_INTERPRET AOT tracing would launch the interpreted
    kernels on fake tensors)."""
    from conftest import REQUIRED

    try:
        FI.resolve_backend("triton", torch.zeros(1, 2, device=backend_device("triton")))
    except RuntimeError as e:
        if "triton" in REQUIRED:
            pytest.fail(str(e))
        pytest.skip(str(e))
    torch.compiler.reset()
    x, y = on("triton", *data(shape=(2, 5, 4, 6), seed=70, dtype=torch.float32))
    yu = on("triton", torch.randint(0, 5, (2, 9, 7), generator=torch.Generator().manual_seed(71)))[0]
    x.requires_grad_(True)

    def step(x, y, yu, conf):
        return FI.ohem_cross_entropy(
            x, y, 0.6, 9, ignore_index=IGN, confusion=conf, backend="triton"
        ) + FI.ohem_cross_entropy(x, yu, 0.5, 3, backend="triton", upsample="bilinear", convention="mmseg")

    conf_c, conf_e = (torch.zeros(5, 5, dtype=torch.long, device=x.device) for _ in range(2))
    lc = torch.compile(step, fullgraph=True, backend="eager")(x, y, yu, conf_c)
    (gc,) = torch.autograd.grad(lc, x)
    le = step(x, y, yu, conf_e)
    (ge,) = torch.autograd.grad(le, x)
    assert torch.equal(lc, le) and torch.equal(gc, ge) and torch.equal(conf_c, conf_e) and conf_c.sum() > 0


@pytest.mark.parametrize("backend", [None, "reference"])
def test_compile_fullgraph_cpu(backend):
    """The default CPU backend (the C++ op) and the reference, traced as one graph; k a tensor
    computed in the graph from the data (what the OHEM loss does: no value leaves the device)."""
    v = torch.rand(1000)
    v[::3] = -1.0

    def f(v, rank):
        k = torch.clamp((v >= 0).sum() - 1, max=rank)  # a device value
        return SEL.select_kth(v, k, backend=backend)

    got = torch.compile(f, fullgraph=True)(v, 400)
    check(got, v, min(int((v >= 0).sum()) - 1, 400))


# --- torch.func and forward-mode derivatives ------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ["focal_loss", "recall_loss", "cb_sigmoid", "mse_outlying_loss"])
def test_forward_mode_derivatives(backend, name, reduction):
    """torch.autograd.forward_ad and torch.func.jvp give the loss's tangent ⟨∂L/∂x, t⟩ (per pixel for
    "none") on the fused backends, as on the reference; torch.func.grad gives the gradient."""
    import torch.autograd.forward_ad as fwAD

    dev = backend_device(backend)
    x, y = make_data((2, 4, 3, 3), torch.float64)
    x, y = x.to(dev), y.to(dev)
    t = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dev)
    fn = ALL_LOSSES[name]
    want_out, want_t = torch.func.jvp(
        lambda a: fn(a, y, reduction=reduction, backend="reference"), (x,), (t,)
    )
    out, tangent = torch.func.jvp(lambda a: fn(a, y, reduction=reduction, backend=backend), (x,), (t,))
    torch.testing.assert_close(out, want_out, **TOL[torch.float64])
    torch.testing.assert_close(tangent, want_t, **TOL[torch.float64])
    with fwAD.dual_level():
        dual = fn(fwAD.make_dual(x, t), y, reduction=reduction, backend=backend)
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, want_t, **TOL[torch.float64])
    g = torch.func.grad(lambda a: fn(a, y, reduction=reduction, backend=backend).sum())(x)
    want_g = torch.func.grad(lambda a: fn(a, y, reduction=reduction, backend="reference").sum())(x)
    torch.testing.assert_close(g, want_g, **TOL[torch.float64])


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
def test_jacobians(backend, transform, reduction):
    """torch.func.jacrev and jacfwd of a fused loss: the reference's Jacobian (per pixel for "none")."""
    dev = backend_device(backend)
    x, y = make_data((2, 4, 3, 3), torch.float64)
    x, y = x.to(dev), y.to(dev)
    tf = getattr(torch.func, transform)
    got = tf(lambda t: FI.focal_loss(t, y, reduction=reduction, backend=backend))(x)
    want = tf(lambda t: FI.focal_loss(t, y, reduction=reduction, backend="reference"))(x)
    torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", ["focal_loss", "sigmoid_focal_loss", "recall_loss", "mse_outlying_loss"])
def test_double_backward_is_an_error(backend, name, reduction):
    """The first derivative with create_graph=True is right; asking for the second raises (the
    fused backward has no derivative) instead of returning one without the second-order term."""
    dev = backend_device(backend)
    x, y = make_data((2, 4, 3, 3), torch.float64)
    x, y = x.to(dev).requires_grad_(True), y.to(dev)
    fn = ALL_LOSSES[name]
    (g,) = torch.autograd.grad(fn(x, y, reduction=reduction, backend=backend).sum(), x, create_graph=True)
    (want,) = torch.autograd.grad(fn(x, y, reduction=reduction, backend="reference").sum(), x)
    torch.testing.assert_close(g.detach(), want, **TOL[torch.float64])
    with pytest.raises(RuntimeError, match="second derivatives of the fused losses are not implemented"):
        torch.autograd.grad((g * g).sum(), x)


def test_vmap_says_what_is_unsupported(backend):
    """vmap over the loss would batch the kernels: an error that says so, never a wrong number; the
    reference works under it."""
    dev = backend_device(backend)
    x, y = make_data((2, 4, 3, 3), torch.float64)
    x, y = x.to(dev), y.to(dev)
    batch = x[None].expand(2, *x.shape)
    with pytest.raises(RuntimeError, match=f"torch.func.vmap over a fused loss .* '{backend}' backend"):
        torch.func.vmap(lambda t: FI.focal_loss(t, y, backend=backend))(batch)
    got = torch.func.vmap(lambda t: FI.focal_loss(t, y, backend="reference"))(batch)
    torch.testing.assert_close(got[0], FI.focal_loss(x, y, backend=backend), **TOL[torch.float64])


def test_double_backward_and_torch_func_are_errors(backend):
    x, y = _data((2, 3, 2, 3), device=backend_device(backend))
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(FI.dice_loss(xg, y, backend=backend), xg, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        g.sum().backward()
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(lambda t: FI.dice_loss(t, y, backend=backend))(x)


def test_torch_func(backend):
    """torch.func.grad and jvp equal the eager gradient and its dot with the tangent; vmap and second
    derivatives are errors that say so."""
    x, y = on(backend, *data(seed=72))
    kw = dict(thresh=0.5, min_kept=9, ignore_index=IGN, backend=backend)
    rkw = {k: v for k, v in kw.items() if k != "backend"}
    loss, grad = run(backend, x, y, **rkw)
    g = torch.func.grad(lambda t: FI.ohem_cross_entropy(t, y, **kw))(x)
    torch.testing.assert_close(g, grad, atol=0, rtol=0)
    t = torch.randn_like(x)
    _, tangent = torch.func.jvp(lambda u: FI.ohem_cross_entropy(u, y, **kw), (x,), (t,))
    torch.testing.assert_close(tangent, (grad * t).sum(), **TOL[torch.float64])
    with torch.autograd.forward_ad.dual_level():
        out = FI.ohem_cross_entropy(torch.autograd.forward_ad.make_dual(x, t), y, reduction="none", **kw)
        per_pixel = torch.autograd.forward_ad.unpack_dual(out).tangent
    _, gn = run(backend, x, y, "none", **rkw)  # per pixel: each pixel's own logits only
    torch.testing.assert_close(per_pixel.reshape(-1), (gn * t).sum(1).reshape(-1), **TOL[torch.float64])
    with pytest.raises(RuntimeError, match="vmap"):
        torch.func.vmap(lambda u: FI.ohem_cross_entropy(u, y, **kw))(x[None])
    xx = x.clone().requires_grad_(True)
    (gg,) = torch.autograd.grad(FI.ohem_cross_entropy(xx, y, **kw), xx, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        gg.sum().backward()
