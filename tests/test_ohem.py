"""The fused OHEM cross-entropy (``functional.ohem_cross_entropy``, docs/DESIGN.md §13) on every fused backend:
values and gradients against the reference (the sort-based definition) and against HRNet's and
mmsegmentation's code as transcribed in ``test_ohem_reference.py``; the kept set against a sort of the
backend's own label probabilities, ties at the threshold included; edge ranks, empty kept sets, no valid
pixel; upsample; dtypes, layouts and label dtypes; the ops (eager functions and registered ops
bit-identical, opcheck); the module. Determinism: test_determinism.py; torch.compile and torch.func:
test_compile.py; no host sync: test_robustness.py. Without a GPU the Triton kernels run on CPU tensors
through TRITON_INTERPRET=1 (set by conftest): its cases stay small."""

import pytest
import torch

import fused_imbalance as fi
import fused_imbalance.functional as FI
import fused_imbalance.reference as R
from cases import backend_device, to_layout
from fused_imbalance.ops import Reduction
from fused_imbalance.ops import ohem as OHEM
from test_ohem_reference import (
    _away_from_the_threshold,
    data,
    hrnet_ohem,
    label_prob,
    mmseg_ohem,
    sort_rule,
    tied,
)
from tolerances import LOSS_TOL, TOL

CONVENTIONS = ("hrnet", "mmseg")
REDUCTIONS = ("mean", "sum", "none")
IGN = 255
# The interpreter evaluates both sides of every tl.where with numpy, which may warn about the discarded one.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def on(backend, *ts):
    dev = backend_device(backend)
    return tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in ts)


def run(backend, x, y, reduction="mean", **kw):
    """(loss, gradient of loss.sum()) of ohem_cross_entropy on a fresh leaf copy of ``x``."""
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    loss = FI.ohem_cross_entropy(x, y, reduction=reduction, backend=backend, **kw)
    loss.sum().backward()
    return loss.detach(), x.grad


def check(backend, x, y, reduction="mean", upsample=None, align_corners=False, **kw):
    """The backend's loss and gradient against the reference's on the (interpolated) logits."""
    x, y = on(backend, x, y)
    if "weight" in kw and kw["weight"] is not None:
        kw["weight"] = kw["weight"].to(x.device)
    loss, grad = run(backend, x, y, reduction, upsample=upsample, align_corners=align_corners, **kw)
    spec = (
        (lambda t: t)
        if upsample is None
        else (lambda t: R.upsampled(t, y.shape[-2:], upsample, align_corners))
    )
    ref_kw = {k: v for k, v in kw.items()}
    xr = x.detach().cpu().clone(memory_format=torch.preserve_format).requires_grad_(True)
    wr = ref_kw.pop("weight", None)
    ref = R.ohem_cross_entropy(
        spec(xr), y.cpu(), weight=None if wr is None else wr.cpu(), reduction=reduction, **ref_kw
    )
    ref.sum().backward()
    assert loss.dtype == ref.dtype and loss.shape == ref.shape
    assert grad.dtype == x.dtype and grad.shape == x.shape and grad.stride() == x.stride()
    torch.testing.assert_close(loss.cpu(), ref.detach(), **LOSS_TOL[x.dtype])
    torch.testing.assert_close(grad.cpu(), xr.grad, **TOL[x.dtype])
    return loss, grad


def op_outputs(
    backend, x, y, thresh, min_kept, convention="hrnet", reduction="none", weight=None, ignore=IGN
):
    """(loss, pn, aux) of the backend's forward function called as the functional calls it: the fused
    p_n the kept set is decided on."""
    x, y = on(backend, x, y)
    rank = R.ohem_rank(min_kept, x.shape[0], convention)
    out = OHEM.load(backend).fwd(
        x,
        y.reshape(-1),
        -1,
        False,
        weight,
        None,
        thresh,
        rank,
        ignore,
        int(Reduction.of(reduction)),
        convention == "mmseg",
        True,
        False,
    )
    return out[0], out[1], out[2]


# --- values and gradients against the reference --------------------------------------------------


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_the_reference(backend, convention, reduction, weighted):
    x, y = data(seed=20)
    w = torch.linspace(0.5, 2.0, 5, dtype=torch.float64) if weighted else None
    for thresh, min_kept in ((0.6, 9), (0.2, 3), (1.0, 100000)):
        check(
            backend,
            x,
            y,
            reduction,
            thresh=thresh,
            min_kept=min_kept,
            weight=w,
            ignore_index=IGN,
            convention=convention,
        )


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("align_corners", [False, True])
def test_published_code_on_low_resolution_logits(backend, convention, align_corners):
    """HRNet's and mmsegmentation's code resize the logits to the labels, then mine the hard pixels:
    the fused loss with upsample="bilinear" gives their value and their gradient with respect to the
    low-resolution logits."""
    x, _ = data(shape=(2, 5, 3, 4), seed=21)
    _, y = data(shape=(2, 5, 7, 9), seed=22)
    w = torch.linspace(0.5, 2.0, 5, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    if convention == "hrnet":
        want = hrnet_ohem(
            xr, y, ignore_label=IGN, thres=0.6, min_kept=40, weight=w, align_corners=align_corners
        )
    else:
        want = mmseg_ohem(xr, y, IGN, 0.6, 8, w, align_corners=align_corners)
    want.backward()
    xd, yd, wd = on(backend, x, y, w)
    loss, grad = run(
        backend,
        xd,
        yd,
        thresh=0.6,
        min_kept=40 if convention == "hrnet" else 8,
        weight=wd,
        ignore_index=IGN,
        convention=convention,
        upsample="bilinear",
        align_corners=align_corners,
    )
    torch.testing.assert_close(loss.cpu(), want.detach(), **TOL[torch.float64])
    torch.testing.assert_close(grad.cpu(), xr.grad, **TOL[torch.float64])


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_published_code_at_label_resolution(backend, convention):
    x, y = data(shape=(3, 5, 4, 6), seed=23, dtype=torch.float32)
    w = torch.linspace(0.5, 2.0, 5)
    xr = x.clone().requires_grad_(True)
    if convention == "hrnet":
        want = hrnet_ohem(xr, y, ignore_label=IGN, thres=0.5, min_kept=11, weight=w)
    else:
        want = mmseg_ohem(xr, y, IGN, 0.5, 4, w)
    want.backward()
    xd, yd, wd = on(backend, x, y, w)
    loss, grad = run(
        backend,
        xd,
        yd,
        thresh=0.5,
        min_kept=11 if convention == "hrnet" else 4,
        weight=wd,
        ignore_index=IGN,
        convention=convention,
    )
    torch.testing.assert_close(loss.cpu(), want.detach(), **TOL[torch.float32])
    torch.testing.assert_close(grad.cpu(), xr.grad, **TOL[torch.float32])


# --- the kept set: the sort of the fused probabilities ------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_kept_set_is_the_sort_of_the_fused_probabilities(backend, dtype, convention):
    """Exact ties everywhere (every pixel's logits are one of four rows): the kept set, read from the
    per-pixel output and from the gradient, is the sort rule applied to the backend's own p_n, for ranks
    inside runs of equal values, at the ends and beyond, and thresh equal to a fused p_n (not kept)."""
    x, y = tied(dtype)
    p_ref, valid = label_prob(x, y, IGN)
    n_valid = int(valid.sum())
    seen_tie = False
    # the interpreter's share: an end, two ranks inside runs of ties, beyond the end
    min_kepts = (
        [0, 7, 20, 10 * n_valid]
        if backend == "triton"
        else [0, 1, 2, 3, 7, 15, 20, n_valid - 1, n_valid, 10 * n_valid]
    )
    for min_kept in min_kepts:
        rank = R.ohem_rank(min_kept, x.shape[0], convention)
        _, pn, _ = op_outputs(backend, x, y, 0.0, min_kept, convention)
        pn = pn.cpu()
        assert torch.equal(pn >= 0, valid) and (pn[~valid] == -1).all()
        torch.testing.assert_close(pn[valid], p_ref[valid], **LOSS_TOL[dtype])  # p_n within rounding
        ranked = pn[valid].sort().values
        i = min(rank, n_valid - 1)
        seen_tie |= 0 < i < n_valid - 1 and bool(ranked[i - 1] == ranked[i])
        for thresh in (0.0, 0.2, float(ranked[i]), 1.0):
            want = sort_rule(pn, valid, rank, thresh)
            xd, yd = on(backend, x, y)
            loss, grad = run(
                backend,
                xd,
                yd,
                "none",
                thresh=thresh,
                min_kept=min_kept,
                ignore_index=IGN,
                convention=convention,
            )
            assert torch.equal(loss.cpu().reshape(-1) != 0, want), (min_kept, thresh)
            assert torch.equal((grad.cpu() != 0).any(1).reshape(-1), want), (min_kept, thresh)
            assert not (
                want & (pn == max(float(ranked[i]), thresh))
            ).any()  # ties with the threshold left out
    assert seen_tie


def test_thresh_equal_to_a_fused_probability_is_not_kept(backend):
    """p = 1/2 (two equal logits) and thresh = that fused value exactly: not kept; a thresh one float
    above it keeps it."""
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    y = torch.tensor([0, 1, 0, 1])
    _, pn, _ = op_outputs(backend, x, y, 0.0, 1)
    half = float(pn.cpu()[0])
    assert pn.cpu()[1] == half and abs(half - 0.5) < 1e-6
    xd, yd = on(backend, x, y)
    out = FI.ohem_cross_entropy(xd, yd, half, 1, reduction="none", backend=backend).cpu()
    assert (out[:2] == 0).all() and (out[2:] > 0).all()
    above = float(torch.nextafter(torch.tensor(half), torch.tensor(1.0)))
    assert (FI.ohem_cross_entropy(xd, yd, above, 1, reduction="none", backend=backend).cpu() > 0).all()


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_min_kept_at_least_n_valid(backend, convention):
    """A rank at or beyond the valid pixels takes the largest p_n: every valid pixel but those equal to
    it is kept (thresh 0)."""
    x, y = data(shape=(1, 4, 3, 5), seed=6, every=4)
    _, pn, _ = op_outputs(backend, x, y, 0.0, 10**9, convention)
    pn = pn.cpu()
    valid = pn >= 0
    n_valid = int(valid.sum())
    for min_kept in (n_valid, n_valid + 5, 10**15):
        kept_want = valid & (pn < pn[valid].max())
        xd, yd = on(backend, x, y)
        loss, grad = run(
            backend, xd, yd, "none", thresh=0.0, min_kept=min_kept, ignore_index=IGN, convention=convention
        )
        assert torch.equal(loss.cpu().reshape(-1) != 0, kept_want) and int(kept_want.sum()) == n_valid - 1
    check(backend, x, y, "mean", thresh=0.0, min_kept=n_valid + 5, ignore_index=IGN, convention=convention)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_kept_set_and_no_valid_pixel(backend, convention, reduction):
    """Nothing strictly below the threshold (equal probabilities, thresh 0), every pixel ignored, no pixel
    at all: loss 0 and gradient 0, never NaN."""
    cases = [
        (torch.zeros(2, 3, 4, 4, dtype=torch.float64), torch.randint(0, 3, (2, 4, 4)), 0.0),
        (torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.full((2, 4, 4), IGN), 0.7),
        (torch.zeros(0, 3, 4, 4), torch.zeros(0, 4, 4, dtype=torch.long), 0.7),
    ]
    for x, y, thresh in cases:
        xd, yd = on(backend, x, y)
        loss, grad = run(
            backend, xd, yd, reduction, thresh=thresh, min_kept=5, ignore_index=IGN, convention=convention
        )
        assert loss.shape == (() if reduction != "none" else y.shape)
        assert (loss == 0).all() and (grad == 0).all()


def test_nan_probability_at_the_rank_keeps_nothing(backend):
    """NaN probabilities sort last (as the reference's sort); a rank that reaches one makes the threshold
    NaN and nothing is kept, as in HRNet's code."""
    x = torch.tensor([[0.0, 1.0], [2.0, 0.0], [float("nan"), 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0])
    xd, yd = on(backend, x, y)
    kept = FI.ohem_cross_entropy(xd, yd, 0.9, 1, reduction="none", backend=backend).cpu()
    torch.testing.assert_close(
        kept, R.ohem_cross_entropy(x, y, 0.9, 1, reduction="none"), **LOSS_TOL[x.dtype]
    )
    assert (kept[:2] > 0).all()
    assert FI.ohem_cross_entropy(xd, yd, 0.9, 2, reduction="sum", backend=backend) == 0
    assert (op_outputs(backend, x, y, 0.9, 2)[2].cpu()[0]).isnan()  # the threshold


def test_pixels_left_out_take_no_part(backend):
    """A pixel left out with p = 0 (an infinite loss in float32, 800 in float64) gets a zero gradient; one
    left out with p = 1 and an infinite class weight (w·ℓ = inf·0 = NaN) does not reach the loss (its
    gradient is the reference's, as torch's cross_entropy's with that weight: 0·inf = NaN)."""
    x = torch.tensor([[0.0, 800.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0])  # p = 0, 1/2, 0.73
    xd, yd = on(backend, x, y)
    loss, grad = run(backend, xd, yd, thresh=0.0, min_kept=0, convention="mmseg")  # nothing below p_min = 0
    assert loss == 0 and (grad == 0).all()
    x = torch.tensor([[0.0, 800.0], [0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([1, 0])  # p = 1 (class 1, weight inf), 1/2
    w = torch.tensor([1.0, float("inf")], dtype=torch.float64)
    xd, yd, wd = on(backend, x, y, w)
    for reduction in REDUCTIONS:
        loss, grad = run(backend, xd, yd, reduction, thresh=0.7, min_kept=1, weight=wd)
        want = R.ohem_cross_entropy(x, y, 0.7, 1, w, reduction=reduction)
        assert torch.isfinite(loss).all() and torch.isfinite(grad[1]).all()
        torch.testing.assert_close(loss.cpu(), want, **LOSS_TOL[torch.float64])
        xr = x.clone().requires_grad_(True)
        R.ohem_cross_entropy(xr, y, 0.7, 1, w, reduction=reduction).sum().backward()
        torch.testing.assert_close(grad.cpu(), xr.grad, equal_nan=True, **TOL[torch.float64])


# --- gradcheck ----------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(backend, convention, reduction):
    """Away from the threshold (a thresh in the widest gap of the sorted probabilities, or the rank's own
    value separated from its neighbours) the loss is smooth and its gradient exact."""
    x, y = data(shape=(2, 4, 3, 4), seed=10, every=5)
    w = torch.linspace(0.5, 2.0, 4, dtype=torch.float64)
    min_kept = 3 if convention == "mmseg" else 6
    rank = R.ohem_rank(min_kept, 2, convention)
    thresh = _away_from_the_threshold(x, y, rank) if reduction != "sum" else 0.0
    xd, yd, wd = on(backend, x, y, w)
    xd.requires_grad_(True)

    def fn(t):
        return FI.ohem_cross_entropy(
            t, yd, thresh, min_kept, wd, IGN, reduction, convention=convention, backend=backend
        )

    # the interpreter runs each of the Jacobian's forwards: random projections there
    assert torch.autograd.gradcheck(fn, (xd,), fast_mode=backend == "triton" or reduction == "none")


# --- upsample -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, align_corners", [("bilinear", False), ("bilinear", True), ("nearest", False)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_upsample(backend, mode, align_corners, reduction):
    """The loss of the interpolated logits (reference.upsampled) without the interpolated tensor: value
    and gradient with respect to the low-resolution logits, non-integer scale factors, H < h."""
    shapes = [((2, 5, 3, 4), (2, 11, 13)), ((1, 5, 6, 5), (1, 4, 9))]
    for i, (xs, ys) in enumerate(shapes[:1] if backend == "triton" else shapes):  # the interpreter's share
        x, _ = data(shape=xs, seed=30 + i)
        _, y = data(shape=(ys[0], 5) + ys[1:], seed=40 + i)
        check(
            backend,
            x,
            y,
            reduction,
            upsample=mode,
            align_corners=align_corners,
            thresh=0.5,
            min_kept=20,
            weight=torch.linspace(0.5, 2.0, 5, dtype=torch.float64),
            ignore_index=IGN,
        )
        check(
            backend,
            x,
            y,
            reduction,
            upsample=mode,
            align_corners=align_corners,
            thresh=0.3,
            min_kept=1,
            ignore_index=IGN,
            convention="mmseg",
        )


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_upsample_allocates_nothing_of_full_resolution_logits(backend, mode):
    """Forward and backward allocate nothing of B·C·H·W elements: the low-resolution gradient and
    per-pixel vectors (p_n, the per-pixel loss and upstream factors) are the largest (with the selection's
    scratch, 7 KB)."""
    from test_upsample import _allocations

    B, C, H, W = (2, 32, 96, 80) if backend == "cpp" else (1, 16, 32, 40)
    x, _ = data(shape=(B, C, H // 4, W // 4), dtype=torch.float32, seed=50)
    _, y = data(shape=(B, C, H, W), seed=51)

    def step(backend):
        def go():
            xx = x.clone().requires_grad_(True)
            FI.ohem_cross_entropy(
                xx, y, 0.7, 100, ignore_index=IGN, upsample=mode, backend=backend
            ).backward()

        return go

    fused = _allocations(step(backend))
    assert fused and max(fused) <= max(x.numel() * 4, B * H * W * 8) < B * C * H * W
    assert max(_allocations(step("reference"))) >= B * C * H * W * 4


# --- dtypes, layouts, labels ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows", "3d"])
def test_dtypes_and_layouts(backend, dtype, layout):
    if layout == "3d":
        x, y = data(shape=(2, 4, 3, 2, 5), seed=60, dtype=dtype)
        x = to_layout(x, "channels_last")
    else:
        x, y = data(shape=(2, 5, 4, 6), seed=61, dtype=dtype)
        x = to_layout(x, layout)
        y = y.reshape(-1) if layout == "rows" else y
    convention = "hrnet" if layout == "rows" else "mmseg"
    for reduction in ("mean", "none"):
        check(
            backend,
            x,
            y,
            reduction,
            thresh=0.5,
            min_kept=7,
            ignore_index=IGN,
            convention=convention,
            weight=torch.linspace(0.5, 2.0, x.shape[1], dtype=torch.float64),
        )


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int16, torch.int32])
def test_label_dtypes(backend, label_dtype):
    x, y = data(seed=62)
    check(backend, x, y.to(label_dtype), thresh=0.5, min_kept=9, ignore_index=IGN)


def test_many_classes(backend):
    """Beyond the static kernels' class counts (Triton: 256) the chunked ones compute the same p_n."""
    C = 300 if backend == "triton" else 1000
    x, y = data(shape=(2, C, 2, 3), seed=63)
    check(backend, x, y, "none", thresh=0.9, min_kept=5, ignore_index=IGN)


# --- the rest of the contract -----------------------------------------------------------------------


def test_confusion_counts_every_valid_pixel(backend):
    x, y = data(seed=64)
    xd, yd = on(backend, x, y)
    conf = torch.zeros(5, 5, dtype=torch.int64, device=xd.device)
    FI.ohem_cross_entropy(xd, yd, 0.0, 3, ignore_index=IGN, confusion=conf, backend=backend)
    assert torch.equal(conf.cpu(), R.confusion_matrix(x, y, ignore_index=IGN))


def test_bad_labels(backend):
    x, y = data(seed=65)
    y[0, 1, 1] = 17
    xd, yd = on(backend, x, y)
    conf = torch.zeros(5, 5, dtype=torch.int64, device=xd.device)
    if backend == "cpp":  # at once, and nothing added into the matrix
        with pytest.raises(ValueError, match="17"):
            FI.ohem_cross_entropy(xd, yd, ignore_index=IGN, confusion=conf, backend=backend)
        assert conf.sum() == 0
    else:  # deferred: the step treats the label as ignored
        loss = FI.ohem_cross_entropy(xd, yd, ignore_index=IGN, backend=backend)
        with pytest.raises(ValueError, match="17"):
            fi.check_deferred()
        y[0, 1, 1] = IGN
        torch.testing.assert_close(loss.cpu(), R.ohem_cross_entropy(x, y, ignore_index=IGN))
    # validate=False: ignored, no error
    y[0, 1, 1] = 17
    torch.testing.assert_close(
        FI.ohem_cross_entropy(*on(backend, x, y), ignore_index=IGN, backend=backend, validate=False).cpu(),
        R.ohem_cross_entropy(x, y, ignore_index=IGN, validate=False),
    )


def test_eager_functions_and_registered_ops_are_bit_identical(backend):
    """An eager call runs the backend's functions, torch.compile the registered ops: the same launchers."""
    x, y = data(seed=68, dtype=torch.float32)
    x, y = on(backend, x, y)
    be = OHEM.load(backend)
    w = torch.linspace(0.5, 2.0, 5, device=x.device)
    for interp, t in ((-1, y.reshape(-1)), (1, torch.randint(0, 5, (2, 9, 11), device=x.device))):
        args = (x, t, interp, False, w, None, 0.6, 7, IGN, int(Reduction.MEAN), False, True, False)
        a, b = be.fwd(*args), be.fwd_op(*args)
        assert all(torch.equal(u, v) for u, v in zip(a, b))
        g = torch.tensor(0.75, device=x.device)
        bwd = (x, t, interp, False, g, w, a[1], a[2], a[4], IGN)
        assert torch.equal(be.bwd(*bwd), be.bwd_op(*bwd))


def test_opcheck(backend):
    x, y = data(shape=(2, 4, 3, 5), seed=69)
    x, y = on(backend, x, y)
    be = OHEM.load(backend)
    w = torch.linspace(0.5, 2.0, 4, dtype=torch.float64, device=x.device)
    conf = torch.zeros(4, 4, dtype=torch.int64, device=x.device)
    # under TRITON_INTERPRET, AOT tracing would launch the interpreted kernels on fake tensors
    utils = ["test_schema", "test_faketensor"] + (
        ["test_aot_dispatch_dynamic"] if backend == "cpp" or x.is_cuda else []
    )
    t_up = torch.randint(0, 4, (2, 7, 9), device=x.device)
    calls = ((-1, y.reshape(-1), 0), (-1, y.reshape(-1), 2), (1, t_up, 1), (0, t_up, 2))
    for interp, t, red in calls if backend == "cpp" else calls[1:3]:  # the interpreter's share
        args = (
            x,
            t,
            interp,
            False,
            w if red != 1 else None,
            conf,
            0.6,
            5,
            IGN,
            red,
            red == 0,
            True,
            interp > 0,
        )
        torch.library.opcheck(be.fwd_op, args, test_utils=utils)
        _, pn, aux, _, lse = be.fwd_op(*args)
        g = (
            torch.randn(t.numel(), dtype=torch.float64, device=x.device)
            if red == 2
            else torch.tensor(0.5, dtype=torch.float64, device=x.device)
        )
        torch.library.opcheck(be.bwd_op, (x, t, interp, False, g, w, pn, aux, lse, IGN), test_utils=utils)


def test_argument_errors():
    x, y = data()
    for kw, exc, match in [
        (dict(thresh=1.5), ValueError, r"thresh must be in \[0, 1\]"),
        (dict(thresh=None), TypeError, "thresh=None"),
        (dict(min_kept=-1), ValueError, "min_kept must be an int >= 0"),
        (dict(min_kept=2.0), TypeError, "min_kept must be an int"),
        (dict(convention="torch"), ValueError, "convention must be one of"),
        (dict(weight=torch.ones(3)), ValueError, r"weight must have shape \(5,\)"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(upsample="bicubic"), ValueError, "upsample"),
    ]:
        for backend in ("cpp", "reference"):
            with pytest.raises(exc, match=match):
                FI.ohem_cross_entropy(x, y, ignore_index=IGN, backend=backend, **kw)


# --- the module -------------------------------------------------------------------------------------


def test_module(backend):
    x, y = on(backend, *data(seed=74, dtype=torch.float32))
    w = torch.linspace(0.5, 2.0, 5)
    m = fi.OhemCrossEntropyLoss(0.6, 9, weight=w, ignore_index=IGN, backend=backend, convention="mmseg").to(
        x.device
    )
    assert torch.equal(
        m(x, y), FI.ohem_cross_entropy(x, y, 0.6, 9, w.to(x.device), IGN, convention="mmseg", backend=backend)
    )
    assert "weight" in m.state_dict()
    m.thresh, m.min_kept, m.convention, m.reduction = 0.3, 2, "hrnet", "sum"
    assert torch.equal(
        m(x, y), FI.ohem_cross_entropy(x, y, 0.3, 2, w.to(x.device), IGN, "sum", backend=backend)
    )
    for name, value, exc in [
        ("thresh", 2.0, ValueError),
        ("min_kept", -3, ValueError),
        ("convention", "hr", ValueError),
        ("thresh", None, TypeError),
    ]:
        with pytest.raises(exc):
            setattr(m, name, value)
    assert m.thresh == 0.3 and m.min_kept == 2 and m.convention == "hrnet"
    mu = fi.OhemCrossEntropyLoss(ignore_index=IGN, backend=backend, upsample="bilinear")
    yu = on(backend, torch.randint(0, 5, (2, 9, 13)))[0]
    assert torch.equal(
        mu(x, yu), FI.ohem_cross_entropy(x, yu, ignore_index=IGN, backend=backend, upsample="bilinear")
    )
