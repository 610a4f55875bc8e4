"""The loss on low-resolution logits (docs/DESIGN.md §10): ``upsample="bilinear" | "nearest"``.

The specification is literal: ``F.interpolate`` of the logits (in the accumulation dtype, see
``reference.upsampled``) followed by the reference loss. Every fused result — value, gradient with
respect to the low-resolution logits, statistics, confusion — is compared with it, through the
raw ops (every output of the op contract) and through the functional API and the modules. Also:
the op never allocates a tensor of B·C·H·W elements (profiler), the backward is bit-identical
across runs and thread counts, gradcheck in float64, opcheck, the Triton kernels' tiling.
torch.compile: test_compile.py; beyond 2**31 pixels: test_robustness.py.
"""

import pytest
import torch
import torch.nn.functional as F

import contract
import fused_imbalance as fi
import fused_imbalance.functional as FI
import fused_imbalance.reference as R
from cases import ALL_LOSSES, FUSED_BACKENDS, loss_and_grad, require_backend
from fused_imbalance.ops import Mode
from tolerances import LOSS_TOL, TOL

from fused_imbalance.ops import Reduction, Weighting
from fused_imbalance.ops import cpp as _cpp

HAVE_CPP = _cpp.available()
needs_cpp = pytest.mark.skipif(not HAVE_CPP, reason="the C++ backend could not be built here")

try:
    from fused_imbalance.ops import triton_backend
    from fused_imbalance.ops import triton_upsample as tup

    HAVE_TRITON = triton_backend.available()
except ImportError:
    tup, HAVE_TRITON = None, False
# This suite's tensors live on the CPU: without a GPU the Triton kernels run on them through
# TRITON_INTERPRET (tests/conftest.py sets it); with one, _triton_on_the_gpu moves each op's inputs
# there and its outputs back.
ON_GPU = HAVE_TRITON and torch.cuda.is_available()
# The fused backends with the upsampled ops.
BACKENDS = FUSED_BACKENDS

MODES = [("bilinear", False), ("bilinear", True), ("nearest", False)]
OP_MODES = [Mode.SOFTMAX_FOCAL, Mode.SIGMOID_FOCAL, Mode.MSE_LOGITS, Mode.MSE_SOFTMAX, Mode.STATS]


def _on_the_gpu(op):
    """``op`` with its tensor arguments on the GPU and its tensor results back on the device of its
    first argument (differentiable moves: autograd's backward crosses them too)."""

    def run(*args, **kwargs):
        home = args[0].device
        out = op(
            *[a.cuda() if isinstance(a, torch.Tensor) else a for a in args],
            **{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()},
        )
        if isinstance(out, tuple) and out and isinstance(out[-1], torch.Tensor):
            return (
                type(out)(*(o.to(home) for o in out))
                if hasattr(out, "_fields")
                else tuple(o.to(home) for o in out)
            )
        return out.to(home)

    run.gpu_op = op
    return run


@pytest.fixture(autouse=True)
def _triton_on_the_gpu(monkeypatch):
    """On a GPU machine: the Triton backend accepts this suite's CPU tensors and runs its upsampled ops
    on CUDA copies of them (the kernels, their tiling and their autograd are the GPU's)."""
    if not ON_GPU:
        return
    from fused_imbalance import _fused, functional

    functional._backend_available("triton")
    be = functional._loaded["triton"]
    moved = be._replace(supports=lambda x: True, up_fwd=_on_the_gpu(be.up_fwd), up_bwd=_on_the_gpu(be.up_bwd))
    monkeypatch.setitem(functional._loaded, "triton", moved)
    monkeypatch.setitem(_fused._BACKENDS, "triton", moved)


class _Ops:
    """A backend's upsampled ops as these tests look at them: the per-pixel and per-class losses (two
    calls of the forward: ``"none"`` and the per-class sums, without weights), and the backward for a
    per-pixel upstream gradient and a per-class factor (the sum of the two calls when both are given).
    ``op=True``: the registered ops rather than the eager functions."""

    def __init__(self, name, op=False):
        self.name = name
        self.op = op

    @property
    def be(self):
        from fused_imbalance import functional

        functional._backend_available(self.name)
        return functional._loaded[self.name]

    def fwd(self):
        return self.be.up_fwd_op if self.op else self.be.up_fwd

    def bwd(self):
        return self.be.up_bwd_op if self.op else self.be.up_bwd

    def upsample_loss_fwd(
        self,
        x,
        y,
        interp,
        ac,
        mode,
        gamma,
        tvals,
        ignore,
        need_pixel_loss,
        need_tp,
        need_confusion,
        need_lse=False,
    ):
        """(pixel_loss or (0,), class_loss, count, tp, bad count, confusion or (0, 0), lse)."""
        C = x.shape[1]
        fwd = self.fwd()
        conf = torch.zeros(C, C, dtype=torch.int64, device=x.device) if need_confusion else None
        pl, _, count, tp, bad, lse = fwd(
            x,
            y,
            interp,
            ac,
            None,
            tvals,
            None,
            int(mode),
            gamma,
            ignore,
            int(Reduction.NONE),
            int(Weighting.NONE),
            need_tp,
            False,
            need_lse,
        )
        cl, _, count2, tp2, bad2, _ = fwd(
            x,
            y,
            interp,
            ac,
            None,
            tvals,
            conf,
            int(mode),
            gamma,
            ignore,
            int(Reduction.CLASS),
            int(Weighting.NONE),
            need_tp,
            False,
            False,
        )
        assert torch.equal(count, count2) and torch.equal(tp, tp2) and torch.equal(bad, bad2)
        return (
            pl if need_pixel_loss else pl.new_empty(0),
            cl,
            count,
            tp,
            bad[0],
            conf if need_confusion else torch.zeros(0, 0, dtype=torch.int64),
            lse,
        )

    def upsample_loss_bwd(self, x, y, gp, gc, interp, ac, mode, gamma, tvals, ignore, lse=None):
        bwd = self.bwd()
        parts = [
            bwd(x, y, interp, ac, g, s, tvals, lse, int(mode), gamma, ignore)
            for g, s in ((gp, None), (None, gc))
            if g is not None or s is not None
        ]
        if not parts:
            return torch.zeros_like(x)
        if len(parts) == 1:
            return parts[0]
        return (parts[0].double() + parts[1].double()).to(x.dtype)


cpp = _Ops("cpp")
tup_ops = _Ops("triton")


def _raw(op):
    """The registered op under ``_on_the_gpu`` (opcheck takes the op itself)."""
    return getattr(op, "gpu_op", op)


_need = require_backend  # skips (or fails, where required) a test on a backend that cannot run here


@pytest.fixture(params=FUSED_BACKENDS)
def ops(request):
    """A fused backend's upsampled ops (see _Ops)."""
    _need(request.param)
    return cpp if request.param == "cpp" else tup_ops


def combos(cases, triton):
    """Direct ``backend, ...`` parameters: every case on cpp; on triton the cases ``triton(case)``
    keeps. The interpreter runs a kernel thousands of times slower than a GPU, so the heavy
    parametrised suites give Triton a fixed share that still covers every mode, loss and size."""
    return [("cpp",) + c for c in cases] + [("triton",) + c for c in cases if triton(c)]


def make(
    B=2,
    C=5,
    hw=(7, 9),
    HW=(29, 31),
    dtype=torch.float32,
    label_dtype=torch.int64,
    seed=0,
    ignore_index=-100,
    every=7,
):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((B, C) + tuple(hw), generator=g, dtype=torch.float64) * 2).to(dtype)
    y = torch.randint(0, C, (B,) + tuple(HW), generator=g)
    if every:
        y.view(-1)[::every] = ignore_index
    return x, y.to(label_dtype)


def up(x, size, mode, align_corners):
    return R.upsampled(x, size, mode, align_corners)


def shape_for(backend, cpp_shape, triton_shape):
    """``make`` arguments per backend. The interpreter's cost is per program (one per image) and per
    step (one per low-resolution row and class), not per output pixel: the Triton cases take fewer
    images, low-resolution rows or classes where the test is not about them, with the same kind of
    scale factors (non-integer, both axes two-tap). The C++ kernels keep the larger cases."""
    return cpp_shape if backend == "cpp" else triton_shape


# --- the interpolation itself: torch's source indices and weights -------------------------------


@pytest.mark.parametrize("mode, align_corners", MODES)
@pytest.mark.parametrize(
    "hw, HW",
    [
        ((4, 5), (4, 5)),
        ((4, 5), (8, 10)),
        ((4, 5), (16, 20)),
        ((4, 5), (32, 40)),
        ((33, 47), (129, 190)),
        ((7, 9), (29, 31)),
        ((16, 12), (7, 5)),
        ((1, 1), (3, 4)),
        ((5, 3), (1, 1)),
        ((3, 7), (10, 7)),
    ],
)
def test_interpolation_exact(ops, mode, align_corners, hw, HW):
    """MSE on the logits with target 0 everywhere is ½ Σ_k x̃_k²: with a one-hot input x̃ is the
    interpolation weights themselves, compared in float64 with F.interpolate's."""
    C = hw[0] * hw[1]
    x = torch.eye(C, dtype=torch.float64).view(1, C, *hw)  # class k is the unit image at pixel k
    y = torch.zeros((1,) + HW, dtype=torch.int64)
    tvals = torch.zeros(C, dtype=torch.float64)
    if ops is tup_ops and (C * HW[0] * HW[1] > 20000 or C > 40):
        # the interpreter, whose cost is per class: the same kind of ratio on fewer classes
        # (an odd, non-integer upsampling; a downsampling on 36 classes, past one class group)
        hw, HW = ((3, 4), (11, 13)) if HW[0] > hw[0] else ((6, 6), (4, 5))
        C = hw[0] * hw[1]
        x = torch.eye(C, dtype=torch.float64).view(1, C, *hw)
        y = torch.zeros((1,) + HW, dtype=torch.int64)
        tvals = torch.zeros(C, dtype=torch.float64)
    pixel = ops.upsample_loss_fwd(
        x,
        y,
        0 if mode == "nearest" else 1,
        align_corners,
        int(Mode.MSE_LOGITS),
        0.0,
        tvals,
        -100,
        True,
        False,
        False,
    )[0]
    ref = 0.5 * up(x, HW, mode, align_corners).pow(2).sum(1).reshape(-1)
    torch.testing.assert_close(pixel, ref, atol=1e-15, rtol=1e-14)
    # the gradient of Σ x̃[k, Y, X] at one output pixel is the weight map of that pixel, transposed
    gp = torch.zeros(y.numel(), dtype=torch.float64)
    gp[y.numel() // 3] = 1.0
    g = ops.upsample_loss_bwd(
        x, y, gp, None, 0 if mode == "nearest" else 1, align_corners, int(Mode.MSE_LOGITS), 0.0, tvals, -100
    )
    xr = x.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad((0.5 * up(xr, HW, mode, align_corners).pow(2).sum(1)).reshape(-1), xr, gp)
    torch.testing.assert_close(g, gr, atol=1e-15, rtol=1e-14)


# --- the raw ops against the contract on the interpolated logits ----------------------------------


def _per_pixel_and_class(x, y, op_mode, gamma, tvals, ignore_index):
    """The reference's (pixel_loss, class_loss, count, tp, bad count, confusion) of logits ``x``."""
    cl, _, count, tp, bad, conf = contract.forward(
        x, y, None, tvals, op_mode, gamma, ignore_index, Reduction.CLASS, Weighting.NONE
    )
    return contract.pixel_loss(x, y, op_mode, gamma, tvals, ignore_index), cl, count, tp, bad, conf


def _op_expected(x, y, mode, align_corners, op_mode, gamma, tvals, ignore_index, gp, gc):
    xi = up(x.double(), y.shape[1:], mode, align_corners)
    want = _per_pixel_and_class(xi, y, op_mode, gamma, tvals, ignore_index)
    xr = x.double().detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    pl = contract.pixel_loss(up(xr, y.shape[1:], mode, align_corners), y, op_mode, gamma, tvals, ignore_index)
    C = x.shape[1]
    yl = y.reshape(-1).long().clamp(0, C - 1)
    upstream = gp.double() + gc.double()[yl]
    (g,) = torch.autograd.grad(pl, xr, upstream, allow_unused=True)
    return want, torch.zeros_like(xr) if g is None else g


@pytest.mark.parametrize("mode, align_corners", MODES)
@pytest.mark.parametrize(
    "op_mode, gamma",
    [(m, 0.0) for m in OP_MODES]
    + [(m, g) for m in (Mode.SOFTMAX_FOCAL, Mode.SIGMOID_FOCAL) for g in (2.0, 0.7)],
)
def test_op_contract(ops, mode, align_corners, op_mode, gamma):
    # float64: the contract itself, free of float32's interpolation weights (their rounding is
    # torch's too, and the float32 results are checked against the float32 reference below)
    hw, HW = ((7, 9), (29, 31)) if ops is cpp else ((3, 5), (11, 17))  # Triton: see shape_for
    x, y = make(B=2, C=6, hw=hw, HW=HW, dtype=torch.float64)
    y[0, 3, 4] = 6  # a bad label: counted, ignored everywhere else
    tvals = torch.arange(1, 7, dtype=torch.float64) * 0.75
    tv = tvals if op_mode in (Mode.MSE_LOGITS, Mode.MSE_SOFTMAX) else None
    interp = 0 if mode == "nearest" else 1
    pixel, class_loss, count, tp, bad, conf, lse = ops.upsample_loss_fwd(
        x, y, interp, align_corners, int(op_mode), gamma, tv, -100, True, True, True, True
    )
    gp = torch.randn(y.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gc = torch.linspace(-1, 2, 6, dtype=torch.float64)
    want, want_grad = _op_expected(x, y, mode, align_corners, op_mode, gamma, tvals, -100, gp, gc)
    tol = LOSS_TOL[torch.float64]
    assert pixel.dtype == class_loss.dtype == torch.float64 and pixel.shape == (y.numel(),)
    torch.testing.assert_close(pixel.double(), want[0], **tol)
    torch.testing.assert_close(class_loss.double(), want[1], atol=tol["atol"] * y.numel(), rtol=tol["rtol"])
    assert torch.equal(count, want[2]) and torch.equal(tp, want[3]) and bad.item() == want[4].item() == 1
    assert torch.equal(conf, want[5])
    grad = ops.upsample_loss_bwd(x, y, gp, gc, interp, align_corners, int(op_mode), gamma, tv, -100)
    assert grad.shape == x.shape and grad.dtype == x.dtype
    torch.testing.assert_close(grad, want_grad, **TOL[torch.float64])
    # each pixel's log-sum-exp: kept by the C++ forward of the softmax losses, for the backward
    if ops is cpp and op_mode == Mode.SOFTMAX_FOCAL:
        want_lse = torch.logsumexp(up(x, y.shape[1:], mode, align_corners), dim=1).reshape(-1)
        torch.testing.assert_close(lse, want_lse, **TOL[torch.float64])
        grad = ops.upsample_loss_bwd(x, y, gp, gc, interp, align_corners, int(op_mode), gamma, tv, -100, lse)
        torch.testing.assert_close(grad, want_grad, **TOL[torch.float64])
    else:
        assert lse.shape == (0,)


def test_op_optional_outputs(ops):
    x, y = make()
    out = ops.upsample_loss_fwd(x, y, 1, False, 0, 2.0, None, -100, False, False, False)
    assert out[0].shape == (0,) and out[3].shape == (0,) and out[5].shape == (0, 0) and out[6].shape == (0,)
    full = ops.upsample_loss_fwd(x, y, 1, False, 0, 2.0, None, -100, True, True, True, True)
    assert torch.equal(out[1], full[1]) and torch.equal(out[2], full[2])
    assert full[6].shape == ((y.numel(),) if ops is cpp else (0,))
    assert ops.upsample_loss_fwd(x, y, 1, False, 1, 2.0, None, -100, False, False, False, True)[6].shape == (
        0,
    )


def test_lse_from_the_forward(ops, monkeypatch):
    """Autograd hands the backward the forward's log-sum-exp: the C++ backward then takes one pass
    over the classes, the Triton one (beyond 12 classes, where it works in class groups) skips the
    launch with a pass over every class that computes its per-pixel weights (the Triton forward of a
    focal loss keeps each pixel's focal weight ∂ℓ/∂log p_y after lse). What is kept is lse (and that
    weight) of the interpolated logits; the gradient is that of the backward op given it (bit for
    bit), which matches the reference and the one that recomputes it, and uses what it is given; a
    wrong lse is an error."""
    C = 6 if ops is cpp else 14
    backend = "cpp" if ops is cpp else "triton"
    if ops is tup_ops:  # the coefficient launches: none in autograd's backward
        launches = []
        launch = tup._launch_coef
        monkeypatch.setattr(tup, "_launch_coef", lambda *a, **k: launches.append(a) or launch(*a, **k))
    x, y = make(B=2, C=C, **shape_for(backend, dict(hw=(7, 9), HW=(29, 31)), dict(hw=(3, 5), HW=(11, 17))))
    for mode, ac in [("bilinear", False), ("nearest", False)]:
        interp = 1 if mode == "bilinear" else 0
        for gamma in (0.0, 2.0):
            xr = x.clone().requires_grad_(True)
            loss = FI.focal_loss(
                xr, y, gamma=gamma, upsample=mode, align_corners=ac, backend=backend, reduction="sum"
            )
            if ops is tup_ops:
                launches.clear()
            loss.backward()
            if ops is tup_ops:
                assert launches == []
            _, ref_grad = loss_and_grad(
                lambda t, yy, **k: FI.focal_loss(t, yy, gamma=gamma, **k),
                x,
                y,
                "reference",
                "sum",
                upsample=mode,
                align_corners=ac,
            )
            torch.testing.assert_close(xr.grad, ref_grad, **TOL[torch.float32])
            gc = torch.ones(C)
            lse = ops.upsample_loss_fwd(x, y, interp, ac, 0, gamma, None, -100, False, False, False, True)[6]
            kept = 2 if ops is tup_ops and gamma != 0 else 1
            assert lse.shape == (kept * y.numel(),)
            xi = up(x.double(), y.shape[1:], mode, ac)
            want = torch.logsumexp(xi, 1).reshape(-1)
            torch.testing.assert_close(lse[: y.numel()].double(), want, **TOL[torch.float32])
            if kept == 2:  # the focal weight of the labelled pixels
                valid = y.reshape(-1) >= 0
                logp = xi.gather(1, y.clamp(min=0).unsqueeze(1)).reshape(-1) - want
                p = logp.exp()
                weight = -((1 - p) ** gamma) + gamma * p * logp * (1 - p) ** (gamma - 1)
                torch.testing.assert_close(
                    lse[y.numel() :].double()[valid], weight[valid], **TOL[torch.float32]
                )
            with_lse = ops.upsample_loss_bwd(x, y, None, gc, interp, ac, 0, gamma, None, -100, lse)
            without = ops.upsample_loss_bwd(x, y, None, gc, interp, ac, 0, gamma, None, -100)
            assert torch.equal(xr.grad, with_lse)
            shifted = lse.clone()
            shifted[: y.numel()] += 1.0  # the backward uses the lse it is given
            assert not torch.equal(
                ops.upsample_loss_bwd(x, y, None, gc, interp, ac, 0, gamma, None, -100, shifted), with_lse
            )
            if kept == 2:  # and the focal weight: a is the upstream weight times it, exactly
                doubled = lse.clone()
                doubled[y.numel() :] *= 2
                assert torch.equal(
                    ops.upsample_loss_bwd(x, y, None, gc, interp, ac, 0, gamma, None, -100, doubled),
                    2 * with_lse,
                )
            torch.testing.assert_close(with_lse, without, **TOL[torch.float32])
    with pytest.raises(RuntimeError, match="lse must be"):
        ops.upsample_loss_bwd(x, y, None, gc, 1, False, 0, 2.0, None, -100, lse[:-1])
    with pytest.raises(RuntimeError, match="lse must be"):
        ops.upsample_loss_bwd(x, y, None, gc, 1, False, 0, 2.0, None, -100, lse.double())


def _opcheck_utils(ops):
    # Under TRITON_INTERPRET, wrap_triton hands an interpreted kernel back untraced: AOT tracing
    # would launch it on fake tensors (tests/test_internals_triton.py), so that check needs a GPU there.
    utils = ["test_schema", "test_faketensor"]
    return utils + (["test_aot_dispatch_dynamic"] if ops is cpp or torch.cuda.is_available() else [])


@pytest.mark.parametrize(
    "reduction, need_tp, need_confusion", [(2, True, True), (0, False, False), (3, True, False)]
)
def test_opcheck(ops, reduction, need_tp, need_confusion):
    dev = "cuda" if ops is tup_ops and ON_GPU else "cpu"
    x, y = (t.to(dev) for t in make(B=2, C=4, hw=(3, 5), HW=(7, 9), dtype=torch.float64))
    tvals = torch.arange(1.0, 5.0, dtype=torch.float64, device=dev)
    w = torch.linspace(0.5, 2.0, 4, dtype=torch.float64, device=dev)
    fwd, bwd = _raw(ops.be.up_fwd_op), _raw(ops.be.up_bwd_op)
    conf = torch.zeros(4, 4, dtype=torch.int64, device=dev) if need_confusion else None
    for args in [
        (1, False, w, None, conf, 0, 1.5, -100, reduction, 1),
        (1, True, None, tvals, conf, 3, 0.0, -100, reduction, 0),
        (0, False, None, None, conf, 1, 2.0, -100, reduction, 3),
    ]:
        torch.library.opcheck(
            fwd, (x, y) + args + (need_tp, False, reduction == 2), test_utils=_opcheck_utils(ops)
        )
    gp = torch.randn(y.numel(), dtype=torch.float64, device=dev)
    torch.library.opcheck(
        bwd, (x, y, 1, False, gp, None, None, None, 1, 2.0, -100), test_utils=_opcheck_utils(ops)
    )
    lse = fwd(x, y, 1, False, None, None, None, 0, 1.5, -100, 0, 0, False, False, True)[5]
    torch.library.opcheck(
        bwd, (x, y, 1, False, gp, None, None, lse, 0, 1.5, -100), test_utils=_opcheck_utils(ops)
    )
    torch.library.opcheck(
        bwd,
        (x, y, 0, False, torch.tensor(0.5, dtype=torch.float64, device=dev), w, tvals, None, 2, 0.0, -100),
        test_utils=_opcheck_utils(ops),
    )


# --- the functional API against interpolate + the reference --------------------------------------


def check(fn, x, y, backend, mode, align_corners, reduction="mean", **kw):
    size = tuple(y.shape[1:])
    loss, grad = loss_and_grad(fn, x, y, backend, reduction, upsample=mode, align_corners=align_corners, **kw)
    ref_loss, ref_grad = loss_and_grad(
        lambda t, yy, **k: fn(up(t, size, mode, align_corners), yy, **k), x, y, "reference", reduction, **kw
    )
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    assert grad.dtype == x.dtype and grad.shape == x.shape and grad.stride() == x.stride()
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL[x.dtype])
    torch.testing.assert_close(grad, ref_grad, **TOL[x.dtype])
    # the reference backend with upsample is the same specification
    ref2, _ = loss_and_grad(
        fn, x, y, "reference", reduction, upsample=mode, align_corners=align_corners, **kw
    )
    torch.testing.assert_close(ref2, ref_loss, atol=0, rtol=0)
    return loss, grad


@pytest.mark.parametrize(
    "backend, name, mode, align_corners, reduction",
    combos(
        [(n, m, a, r) for n in ALL_LOSSES for m, a in MODES for r in ("mean", "sum", "none")],
        lambda c: c[3] == "mean"
        or (c[1:3] == MODES[0] and c[3] == "none")
        or (c[0] == "focal_loss" and c[3] == "sum"),
    ),
)
def test_losses(backend, name, mode, align_corners, reduction):
    _need(backend)
    x, y = make(
        **shape_for(backend, dict(B=2, C=5, hw=(7, 9), HW=(29, 31)), dict(B=1, C=5, hw=(3, 5), HW=(11, 19)))
    )
    check(ALL_LOSSES[name], x, y, backend, mode, align_corners, reduction)


SIZES = [
    ((6, 5), (6, 5)),
    ((6, 5), (12, 10)),
    ((6, 5), (24, 20)),
    ((6, 5), (48, 40)),
    ((33, 47), (129, 190)),
    ((10, 11), (23, 37)),
    ((16, 12), (7, 5)),
    ((1, 1), (5, 3)),
    ((9, 4), (9, 13)),
]


@pytest.mark.parametrize(
    "backend, mode, align_corners, hw, HW",
    combos(
        [(m, a, hw, HW) for m, a in MODES for hw, HW in SIZES],
        lambda c: c[:2] == MODES[0] or c[2] in ((16, 12), (1, 1)),
    ),
)
def test_sizes(backend, mode, align_corners, hw, HW):
    """Scale factors 1, 2, 4, 8, odd and non-integer ratios, downsampling (H < h), 1×1 inputs."""
    _need(backend)
    # Triton: the size is what is tested; the largest one on one image of two classes
    x, y = make(
        **shape_for(
            backend,
            dict(B=2, C=4, hw=hw, HW=HW),
            dict(B=1, C=2, hw=hw, HW=HW) if hw[0] > 16 else dict(B=2, C=3, hw=hw, HW=HW),
        )
    )
    for name in ("focal_loss", "recall_loss"):
        check(ALL_LOSSES[name], x, y, backend, mode, align_corners, "mean")


@pytest.mark.parametrize(
    "backend, mode, align_corners, dtype, layout",
    combos(
        [
            (m, a, d, lay)
            for m, a in MODES
            for d in (torch.float64, torch.float16, torch.bfloat16)
            for lay in ("nchw", "channels_last")
        ],
        lambda c: c[:2] == MODES[0] or c[2] == torch.bfloat16,
    ),
)
def test_dtypes_and_layouts(backend, mode, align_corners, dtype, layout):
    _need(backend)
    x, y = make(
        **shape_for(backend, dict(B=2, C=6, hw=(5, 7), HW=(17, 22)), dict(B=2, C=4, hw=(3, 7), HW=(11, 22))),
        dtype=dtype,
    )
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    # losses whose arguments do not depend on the logits' dtype (cross_entropy's weight of
    # cases.ALL_LOSSES is rounded to it, which the interpolated float32 logits would not see)
    for name in ("focal_loss", "sigmoid_focal_loss", "mse_outlying_loss"):
        check(ALL_LOSSES[name], x, y, backend, mode, align_corners, "sum")


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_label_dtypes(backend, label_dtype):
    ignore = 255 if label_dtype == torch.uint8 else -100
    x, y = make(
        **shape_for(backend, dict(C=5, hw=(6, 5), HW=(13, 11)), dict(C=5, hw=(3, 5), HW=(7, 11))),
        ignore_index=ignore,
        label_dtype=label_dtype,
    )
    for name in ("focal_loss", "recall_loss"):
        check(ALL_LOSSES[name], x, y, backend, "bilinear", False, "mean", ignore_index=ignore)


def test_strided_views_and_empty_batch(backend):
    """Views with any strides are read in place (a channel slice, every other column, a transposed
    image); the gradient reaches the tensor they view. An empty batch gives 0 and an empty gradient."""
    wide0, y = make(B=2, C=6, hw=(6, 10), HW=(13, 11))
    y5 = torch.where(y == 5, torch.zeros_like(y), y)  # labels of the 5-class slice
    for view, labels in (
        (lambda t: t[:, 1:], y5),
        (lambda t: t[..., ::2], y),
        (lambda t: t.transpose(2, 3), y),
    ):
        results = []
        for be, mode in ((backend, "bilinear"), ("reference", "bilinear")):
            wide = wide0.clone().requires_grad_(True)
            x = view(wide)
            assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
            loss = FI.focal_loss(x, labels, upsample=mode, backend=be)
            loss.backward()
            results.append((loss.detach(), wide.grad))
        torch.testing.assert_close(results[0][0], results[1][0], **LOSS_TOL[torch.float32])
        torch.testing.assert_close(results[0][1], results[1][1], **TOL[torch.float32])
    x, y = make(B=0, C=3, hw=(4, 4), HW=(7, 7), every=0)
    loss, grad = check(ALL_LOSSES["recall_loss"], x, y, backend, "bilinear", False)
    assert loss.item() == 0 and grad.shape == x.shape


@pytest.mark.parametrize("C", [1, 2, 19, 150])
def test_class_counts(backend, C):
    if backend == "triton" and C == 150:
        C = 40  # the interpreter, whose cost is per class: the same paths (class groups, class sums past 32)
    x, y = make(B=1, C=C, hw=(5, 6) if backend == "cpp" else (3, 6), HW=(11, 21))
    check(
        ALL_LOSSES["focal_loss"],
        x.contiguous(memory_format=torch.channels_last),
        y,
        backend,
        "bilinear",
        False,
    )
    check(ALL_LOSSES["recall_loss"], x, y, backend, "nearest", False)


@pytest.mark.parametrize("mode, align_corners", MODES)
def test_statistics_and_confusion(backend, mode, align_corners):
    x, y = make(
        B=2,
        C=7,
        hw=(9, 8) if backend == "cpp" else (4, 8),
        HW=(31, 27) if backend == "cpp" else (15, 27),
        every=5,
    )
    x[:, 0] = x[:, 1]  # ties: the first index wins, as torch.argmax on the interpolated logits
    size = tuple(y.shape[1:])
    xi = up(x, size, mode, align_corners)
    kw = dict(upsample=mode, align_corners=align_corners)
    expected = FI.confusion_matrix(xi, y, backend="reference")
    assert expected.sum() > 0
    assert torch.equal(FI.confusion_matrix(x, y, backend=backend, **kw), expected)
    out = torch.full((7, 7), 3, dtype=torch.int64)
    assert FI.confusion_matrix(x, y, out=out, backend=backend, **kw) is out
    assert torch.equal(out, expected + 3)
    conf = torch.zeros(7, 7, dtype=torch.int64)
    FI.recall_loss(x, y, confusion=conf, backend=backend, **kw)
    assert torch.equal(conf, expected)
    for got, want in zip(
        FI.class_stats(x, y, backend=backend, **kw), FI.class_stats(xi, y, backend="reference")
    ):
        assert torch.equal(got, want)
    assert torch.equal(FI.confusion_matrix(x, y, backend="reference", **kw), expected)


def test_bad_labels(backend):
    """As the plain losses (tests/test_robustness.py): at once on the C++ backend, deferred on Triton."""
    x, y = make(C=5, hw=(4, 4), HW=(9, 9))
    y_bad = y.clone()
    y_bad[1, 2, 3] = 5
    y_bad[0, 0, 1] = -7
    kw = dict(upsample="bilinear", backend=backend)
    conf = torch.ones(5, 5, dtype=torch.int64)
    y_ign = torch.where((y_bad < 0) | (y_bad >= 5), torch.full_like(y, -100), y_bad)
    if backend == "triton":
        got = FI.focal_loss(x, y_bad, **kw)
        torch.testing.assert_close(got, FI.focal_loss(x, y_ign, upsample="bilinear", backend="reference"))
        with pytest.raises(ValueError, match="label 5"):
            fi.check_deferred()
        FI.recall_loss(x, y_bad, confusion=conf, **kw)
        with pytest.raises(ValueError, match="label 5"):
            fi.check_deferred()
        assert torch.equal(conf - 1, FI.confusion_matrix(x, y_ign, upsample="bilinear", backend="reference"))
    else:
        with pytest.raises(ValueError, match="5"):
            FI.focal_loss(x, y_bad, **kw)
        with pytest.raises(ValueError, match="-7"):
            FI.confusion_matrix(x, y_bad, **kw)
        with pytest.raises(ValueError):
            FI.recall_loss(x, y_bad, confusion=conf, **kw)
        assert torch.equal(conf, torch.ones_like(conf))
    got = FI.focal_loss(x, y_bad, validate=False, **kw)
    torch.testing.assert_close(got, FI.focal_loss(x, y_ign, upsample="bilinear", backend="reference"))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_all_ignored(backend, reduction):
    x, y = make(B=2 if backend == "cpp" else 1, C=4, hw=(3, 3), HW=(7, 8))
    y.fill_(-100)
    for name in ALL_LOSSES:
        loss, grad = check(ALL_LOSSES[name], x, y, backend, "bilinear", False, reduction)
        assert (loss == 0).all() and (grad == 0).all()


def test_argument_errors():
    x, y = make(C=3, hw=(4, 4), HW=(8, 8))
    with pytest.raises(ValueError, match="upsample"):
        FI.focal_loss(x, y)  # spatial mismatch without upsample: the message names the option
    with pytest.raises(ValueError, match="upsample must be"):
        FI.focal_loss(x, y, upsample="bicubic")
    with pytest.raises(ValueError, match="align_corners"):
        FI.focal_loss(x, y, upsample="nearest", align_corners=True)
    with pytest.raises(ValueError, match="align_corners"):
        FI.focal_loss(x, y, align_corners=True)
    with pytest.raises(ValueError, match="2-D"):
        FI.focal_loss(
            torch.randn(2, 3, 4, 4, 4), torch.zeros(2, 8, 8, 8, dtype=torch.long), upsample="bilinear"
        )
    with pytest.raises(ValueError, match="2-D"):
        FI.cross_entropy(torch.randn(6, 3), torch.zeros(6, dtype=torch.long), upsample="nearest")
    with pytest.raises(ValueError, match="target"):
        FI.focal_loss(x, y[:1], upsample="bilinear")
    with pytest.raises(ValueError, match="2-D"):
        FI.confusion_matrix(
            torch.randn(2, 3, 4, 4, 4), torch.zeros(2, 8, 8, 8, dtype=torch.long), upsample="bilinear"
        )


def test_fused_backends_run_upsample():
    """Both fused backends implement the upsampled ops: "auto" keeps the fused one for CPU tensors (the
    C++ backend), and an explicit request runs it, without materialising the interpolated logits."""
    x, y = make(C=5, hw=(4, 4), HW=(9, 9))
    assert FI.resolve_backend("auto", x) == "cpp"
    for name in BACKENDS:
        _need(name)
        got = FI.cross_entropy(x, y, upsample="bilinear", backend=name)
        torch.testing.assert_close(
            got, FI.cross_entropy(x, y, upsample="bilinear", backend="reference"), **LOSS_TOL[torch.float32]
        )


def test_triton_nan_argmax_and_ties():
    """The interpolated argmax of the Triton kernels is torch.argmax's: NaN wins, first index on
    ties (a NaN low-resolution logit spreads to every pixel that reads it)."""
    _need("triton")
    x, y = make(B=1, C=4, hw=(3, 4), HW=(7, 9), every=0)
    x[0, 2, 1, 1] = float("nan")
    x[0, 1] = x[0, 0]
    for mode, ac in MODES:
        xi = up(x, (7, 9), mode, ac)
        want = torch.zeros(4, 4, dtype=torch.int64)
        want.index_put_(
            (y.reshape(-1), xi.argmax(1).reshape(-1)),
            torch.ones(y.numel(), dtype=torch.int64),
            accumulate=True,
        )
        conf = tup_ops.upsample_loss_fwd(
            x, y, 0 if mode == "nearest" else 1, ac, int(Mode.STATS), 0.0, None, -100, False, True, True
        )[5]
        assert torch.equal(conf, want) and want[:, 2].sum() > 0


@pytest.mark.parametrize(
    "mode, align_corners, C, op_mode",
    [
        ("bilinear", False, 5, Mode.SOFTMAX_FOCAL),
        ("bilinear", True, 14, Mode.MSE_SOFTMAX),
        ("nearest", False, 26, Mode.SIGMOID_FOCAL),
        ("bilinear", False, 26, Mode.SOFTMAX_FOCAL),
    ],
)
def test_triton_gpu_tiling(monkeypatch, mode, align_corners, C, op_mode):
    """The interpreter runs one band of all columns per image; a GPU runs bands of R low-resolution rows
    x blocks of columns, one output row (and column) per step, the backward with a halo row above each
    band and a halo lane left of each column block. That plan, with small bands and blocks, against
    the contract (C = 14: the backward's coefficient launch and class groups; C = 26: the forward's
    class groups too, bilinear in steps of several output rows of a segment)."""
    _need("triton")
    monkeypatch.setattr(
        tup, "_fwd_tile", lambda geo, C, mode, f64: (32, 2, tup._fwd_step(geo, C, mode, f64), 1)
    )
    monkeypatch.setattr(tup, "_bwd_tile", lambda geo: (32, 2, 1, 1, 1))
    # several bands and column blocks (two of backward lanes, with the halo) either way
    hw, HW = ((5, 40), (11, 70)) if C < 26 else ((4, 40), (9, 83))
    x, y = make(B=1, C=C, hw=hw, HW=HW, dtype=torch.float64)
    tvals = torch.arange(1, C + 1, dtype=torch.float64) * 0.75
    tv = tvals if op_mode == Mode.MSE_SOFTMAX else None
    interp = 0 if mode == "nearest" else 1
    gamma = 0.0 if op_mode == Mode.MSE_SOFTMAX else 2.0
    out = tup_ops.upsample_loss_fwd(
        x, y, interp, align_corners, int(op_mode), gamma, tv, -100, True, True, True
    )
    gp = torch.randn(y.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gc = torch.linspace(-1, 2, C, dtype=torch.float64)
    want, want_grad = _op_expected(x, y, mode, align_corners, op_mode, gamma, tvals, -100, gp, gc)
    tol = LOSS_TOL[torch.float64]
    torch.testing.assert_close(out[0], want[0], **tol)
    torch.testing.assert_close(out[1], want[1], atol=tol["atol"] * y.numel(), rtol=tol["rtol"])
    assert torch.equal(out[2], want[2]) and torch.equal(out[3], want[3]) and torch.equal(out[5], want[5])
    grad = tup_ops.upsample_loss_bwd(x, y, gp, gc, interp, align_corners, int(op_mode), gamma, tv, -100)
    torch.testing.assert_close(grad, want_grad, **TOL[torch.float64])


@pytest.mark.parametrize("H", [63, 68])
def test_triton_counts_per_thread(monkeypatch, H):
    """The forward's per-thread class counts are float32, with the true positives packed into them below
    H = _TP_PACK rows (count + _TP_PACK x true positives), here 64: right at the largest packed value (a
    thread whose every pixel of a column, H rows, is a true positive) and in the unpacked form above."""
    _need("triton")
    monkeypatch.setattr(tup, "_TP_PACK", 64)
    monkeypatch.setattr(tup, "_fwd_tile", lambda geo, C, mode, f64: (32, 4, 1, 1))  # a GPU's step: 1 row
    x = torch.tensor([3.0, 1.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()  # argmax 0 everywhere
    y = torch.zeros(1, H, 3, dtype=torch.int64)
    y[0, -1, 0] = 1  # column 0: H - 1 true positives, column 1: H, column 2: one ignored pixel
    y[0, 0, 2] = -100
    out = tup_ops.upsample_loss_fwd(
        x, y, 1, False, int(Mode.SOFTMAX_FOCAL), 0.0, None, -100, False, True, False
    )
    assert out[2].tolist() == [3 * H - 2, 1, 0] and out[3].tolist() == [3 * H - 2, 0, 0]


@pytest.mark.parametrize("need_tp", [False, True])
def test_triton_counts_of_tall_labels(monkeypatch, need_tp):
    """From _BIG_H output rows (2**24; here 8) a program could count 2**31 pixels: its class counts are
    int64 atomics, not per-thread registers, its bad-label count int64 and the confusion the one int64
    matrix. Counts, true positives, bad labels, confusion and class losses as the reference."""
    _need("triton")
    monkeypatch.setattr(tup, "_BIG_H", 8)
    launches = []
    launch = tup._launch_fwd
    monkeypatch.setattr(
        tup, "_launch_fwd", lambda *a, **k: launches.append((a[0], launch(*a, **k))) or launches[-1][1]
    )
    x, y = make(B=2, C=5, hw=(3, 4), HW=(9, 7), every=4)
    y[1, 2, 3] = 7  # a bad label
    out = tup_ops.upsample_loss_fwd(
        x, y, 1, False, int(Mode.SOFTMAX_FOCAL), 2.0, None, -100, False, need_tp, True
    )
    assert len(launches) == 2  # the "none" and the per-class calls
    for plan, (_, _, crow, trow, _) in launches:
        assert not plan.reg and crow.dtype == trow.dtype == torch.int64
    want = _per_pixel_and_class(
        up(x.double(), y.shape[1:], "bilinear", False), y, Mode.SOFTMAX_FOCAL, 2.0, None, -100
    )
    assert out[4].item() == want[4].item() == 1
    assert torch.equal(out[5], want[5]) and want[5].sum() > 0
    assert torch.equal(out[2], want[2])
    assert torch.equal(out[3], want[3] if need_tp else torch.zeros(0, dtype=torch.int64))
    torch.testing.assert_close(out[1], want[1].float(), **LOSS_TOL[torch.float32])


def test_triton_bit_identical():
    """The Triton forward and backward are bit-identical run to run (no float atomics)."""
    _need("triton")
    x, y = make(B=2, C=5, hw=(9, 7), HW=(31, 26))
    x = x.contiguous(memory_format=torch.channels_last)
    gp = torch.randn(y.numel(), generator=torch.Generator().manual_seed(0))
    outs = []
    for _ in range(2):
        fwd = tup_ops.upsample_loss_fwd(x, y, 1, False, 0, 2.0, None, -100, True, True, False)
        g = tup_ops.upsample_loss_bwd(x, y, gp, torch.linspace(0, 1, 5), 1, False, 0, 2.0, None, -100)
        outs.append(fwd[:4] + (g,))
    for u, v in zip(*outs):
        assert torch.equal(u, v)


# --- modules ----------------------------------------------------------------------------------------


def test_modules(backend):
    x, y = make(C=5, hw=(5, 6), HW=(15, 17))
    kw = dict(upsample="bilinear", align_corners=True, backend=backend)
    counts = [50, 30, 10, 5, 1]
    size = tuple(y.shape[1:])
    xi = up(x, size, "bilinear", True)
    pairs = [
        (fi.FocalLoss(gamma=2.0, **kw), fi.FocalLoss(gamma=2.0, backend="reference")),
        (
            fi.ClassBalancedLoss(counts, beta=0.99, **kw),
            fi.ClassBalancedLoss(counts, beta=0.99, backend="reference"),
        ),
        (fi.RecallLoss(5, **kw), fi.RecallLoss(5, backend="reference")),
        (fi.CDBLoss(5, **kw), fi.CDBLoss(5, backend="reference")),
        (fi.OutlyingMSELoss(counts, **kw), fi.OutlyingMSELoss(counts, backend="reference")),
    ]
    for fused, ref in pairs:
        torch.testing.assert_close(fused(x, y), ref(xi, y), **LOSS_TOL[torch.float32])
    m = fi.ConfusionMatrix(5)
    m.update(x, y, upsample="nearest")
    assert torch.equal(m.matrix, FI.confusion_matrix(up(x, size, "nearest", False), y, backend="reference"))


@pytest.mark.parametrize("distributed", [True, False])
def test_recall_statistics_callable(backend, distributed):
    """RecallLoss with a momentum gets the batch's counts and true positives of the interpolated argmax:
    the DDP path through the functional's recall callable (the same torch operations as the reference: the
    same running recall, bit for bit), the single-process one through the backend's moving-average launch."""
    fused = fi.RecallLoss(5, momentum=0.5, distributed=distributed, upsample="bilinear", backend=backend)
    ref = fi.RecallLoss(5, momentum=0.5, distributed=distributed, backend="reference")
    tol = dict(atol=0, rtol=0) if distributed else TOL[torch.float32]
    for step in range(3):  # different batches: the running recall moves
        x, y = make(C=5, hw=(5, 6), HW=(15, 17), seed=step)
        torch.testing.assert_close(
            fused(x, y), ref(up(x, tuple(y.shape[1:]), "bilinear", False), y), **LOSS_TOL[torch.float32]
        )
        torch.testing.assert_close(fused.running_recall, ref.running_recall, **tol)
    assert fused.seen.all() and 0 < fused.running_recall.min() < fused.running_recall.max() < 1


# --- gradients, determinism, memory -------------------------------------------------------------


@pytest.mark.parametrize(
    "backend, name, mode, align_corners",
    combos(
        [(n, m, a) for n in ALL_LOSSES for m, a in MODES], lambda c: c[1:] == MODES[0] or c[0] == "focal_loss"
    ),
)
def test_gradcheck_float64(backend, name, mode, align_corners):
    _need(backend)
    x, y = make(B=2 if backend == "cpp" else 1, C=3, hw=(3, 4), HW=(5, 7), dtype=torch.float64)
    x.requires_grad_(True)
    fn = ALL_LOSSES[name]
    # the interpreter: gradcheck's fast mode (a random projection of the Jacobian, both sides)
    assert torch.autograd.gradcheck(
        lambda t: fn(t, y, reduction="none", backend=backend, upsample=mode, align_corners=align_corners),
        (x,),
        fast_mode=backend == "triton",
    )


@needs_cpp
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bit_identical_across_runs_and_thread_counts(mode, layout):
    x, y = make(B=2, C=19, hw=(40, 33), HW=(157, 131))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    prev = torch.get_num_threads()
    outs = []
    try:
        for threads in (prev, 1, prev, 3):
            torch.set_num_threads(threads)
            loss, grad = loss_and_grad(ALL_LOSSES["recall_loss"], x, y, "cpp", "mean", upsample=mode)
            g2 = cpp.upsample_loss_bwd(
                x,
                y,
                torch.randn(y.numel(), generator=torch.Generator().manual_seed(0)),
                torch.ones(19),
                1 if mode == "bilinear" else 0,
                False,
                1,
                2.0,
                None,
                -100,
            )
            outs.append((loss, grad, g2))
    finally:
        torch.set_num_threads(prev)
    for o in outs[1:]:
        for u, v in zip(o, outs[0]):
            assert torch.equal(u, v)


def _allocations(fn):
    """The sizes (bytes) of every CPU tensor allocation while ``fn`` runs, from the profiler's memory
    events (the kernels' own scratch is O(C·W) per thread and not a tensor)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [
        e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0
    ]


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_full_resolution_logits(backend, mode, reduction):
    """Forward and backward allocate nothing of B·C·H·W elements: the largest tensors are the
    low-resolution gradient and per-pixel vectors (the int64 labels of "none"'s weighting; the
    Triton backward's per-pixel scalars)."""
    B, C, H, W = (2, 32, 96, 80) if backend == "cpp" else (2, 16, 24, 20)  # the interpreter is slow
    x, y = make(B=B, C=C, hw=(H // 4, W // 4), HW=(H, W))

    def step(backend):
        def run():
            xx = x.clone().requires_grad_(True)
            loss = FI.recall_loss(xx, y, reduction=reduction, upsample=mode, backend=backend)
            loss.sum().backward()

        return run

    fused = _allocations(step(backend))
    assert fused and max(fused) <= max(x.numel() * 4, B * H * W * 8) < B * C * H * W
    # the measurement sees the full-resolution logits of interpolate + loss
    assert max(_allocations(step("reference"))) >= B * C * H * W * 4


def test_interpolate_is_the_spec_in_float32():
    """For float32 logits ``reference.upsampled`` is F.interpolate itself."""
    x, _ = make(C=3, hw=(5, 7))
    for mode, ac in MODES:
        kw = {} if mode == "nearest" else {"align_corners": ac}
        assert torch.equal(up(x, (11, 13), mode, ac), F.interpolate(x, size=(11, 13), mode=mode, **kw))
