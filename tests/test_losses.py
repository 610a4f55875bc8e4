"""Every fused backend against the reference: values, gradients, statistics, layouts, dtypes; class
weights as torch takes them, numerics at the edges, non-contiguous views, random inputs (hypothesis).

The backends run on CPU tensors here: ``cpp`` natively, ``triton`` through TRITON_INTERPRET=1
(set by conftest when there is no GPU). With a GPU the Triton cases run on CUDA tensors.
A backend that cannot run is skipped, unless it is named in FUSED_IMBALANCE_REQUIRE_BACKENDS
(CI names both), where that is a failure.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_imbalance.functional as FI
from cases import ALL_LOSSES, backend_device, loss_and_grad, make_data, to_layout
from tolerances import LOSS_TOL, TOL


def check(fn, x, y, backend, reduction="mean", **kw):
    dev = backend_device(backend)
    x, y = x.to(dev), y.to(dev)
    loss, grad = loss_and_grad(fn, x, y, backend, reduction, **kw)
    ref_loss, ref_grad = loss_and_grad(fn, x, y, "reference", reduction, **kw)
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    assert grad.dtype == x.dtype and grad.shape == x.shape and grad.stride() == x.stride()
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL[x.dtype])
    torch.testing.assert_close(grad, ref_grad, **TOL[x.dtype])
    return loss, grad


# --- every loss × reduction × layout, float32 ----------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows", "volume", "volume_cl"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_losses(backend, name, reduction, layout):
    shape = (2, 5, 3, 2, 4) if layout.startswith("volume") else (2, 5, 3, 4)
    x, y = make_data(shape, torch.float32)
    x = to_layout(x, {"volume": "nchw", "volume_cl": "channels_last"}.get(layout, layout))
    if layout == "rows":
        y = y.reshape(-1)
    check(ALL_LOSSES[name], x, y, backend, reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_dtypes(backend, name, dtype, layout):
    x, y = make_data((2, 6, 5, 3), dtype)
    check(ALL_LOSSES[name], to_layout(x, layout), y, backend, "sum")


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("name", ["focal_loss", "recall_loss", "mse_outlying_loss"])
def test_label_dtypes(backend, name, label_dtype):
    ignore = 255 if label_dtype == torch.uint8 else -100
    x, y = make_data((2, 5, 4, 3), torch.float32, ignore=ignore, label_dtype=label_dtype)
    check(ALL_LOSSES[name], x, y, backend, "mean", ignore_index=ignore)


# --- odd sizes and tails ---------------------------------------------------------------------


@pytest.mark.parametrize("C", [1, 2, 19, 150])
@pytest.mark.parametrize("hw", [(1, 1), (7, 13)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_odd_sizes(backend, C, hw, layout):
    x, y = make_data((2, C) + hw, torch.float32)
    for name in ("focal_loss", "recall_loss", "sigmoid_focal_loss", "mse_outlying_loss"):
        check(ALL_LOSSES[name], to_layout(x, layout), y, backend, "mean")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_image(backend, layout):
    x, y = make_data((1, 19, 97, 131), torch.float32)
    check(ALL_LOSSES["recall_loss"], to_layout(x, layout), y, backend, "mean")


@pytest.mark.parametrize("C", [1000, 4097, 8142])
def test_many_classes_rows(backend, C):
    x, y = make_data((5, C), torch.float32, every=4)
    for name in ("cross_entropy", "focal_loss", "recall_loss", "mse_outlying_loss"):
        check(ALL_LOSSES[name], x, y, backend, "mean")
    check(ALL_LOSSES["focal_loss"], x.to(torch.bfloat16), y, backend, "sum")


@pytest.mark.parametrize(
    "name", ["focal_loss", "sigmoid_focal_loss", "mse_outlying_loss", "mse_outlying_logits"]
)
def test_many_classes_float32_is_accurate(backend, name):
    """A float32 per-pixel loss over tens of thousands of classes stays within the float32
    tolerance of the float64 loss: the sum over classes must not lose digits as C grows."""
    dev = backend_device(backend)
    # Every row is an independent sum; the interpreter runs Triton at ~1 s per row here, so it gets 2.
    rows = 2 if (backend == "triton" and dev == "cpu") else 8
    x, y = make_data((rows, 40000), torch.float32, every=0)
    x, y = x.to(dev), y.to(dev)
    loss, grad = loss_and_grad(ALL_LOSSES[name], x, y, backend, "none")
    exact, exact_grad = loss_and_grad(ALL_LOSSES[name], x.double(), y, "reference", "none")
    torch.testing.assert_close(loss.double(), exact, **LOSS_TOL[torch.float32])
    torch.testing.assert_close(grad.double(), exact_grad, **TOL[torch.float32])


# --- statistics ------------------------------------------------------------------------------


@pytest.mark.parametrize("C, layout", [(3, "nchw"), (19, "channels_last"), (150, "nchw"), (150, "rows")])
def test_confusion_and_stats_exact(backend, C, layout):
    x, y = make_data((2, C, 9, 7), torch.float32, every=5)
    x[:, 0] = x[:, 1]  # ties: the first index wins, as torch.argmax
    x = to_layout(x, layout)
    if layout == "rows":
        y = y.reshape(-1)
    dev = backend_device(backend)
    x, y = x.to(dev), y.to(dev)
    expected = FI.confusion_matrix(x, y, backend="reference")
    assert torch.equal(FI.confusion_matrix(x, y, backend=backend), expected)
    out = torch.full((C, C), 3, dtype=torch.int64, device=dev)
    assert FI.confusion_matrix(x, y, out=out, backend=backend) is out
    assert torch.equal(out, expected + 3)
    conf = torch.zeros(C, C, dtype=torch.int64, device=dev)
    FI.recall_loss(x, y, confusion=conf, backend=backend)
    assert torch.equal(conf, expected)
    for got, want in zip(FI.class_stats(x, y, backend=backend), FI.class_stats(x, y, backend="reference")):
        assert torch.equal(got, want)


def test_absent_class(backend):
    x, y = make_data((2, 6, 4, 5), torch.float32)
    y[y == 3] = 0  # class 3 absent: recall weight 1, never NaN
    for name in ALL_LOSSES:
        loss, grad = check(ALL_LOSSES[name], x, y, backend, "mean")
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(backend, reduction):
    x, y = make_data((2, 4, 3, 3), torch.float32)
    y.fill_(-100)
    for name in ALL_LOSSES:
        loss, grad = check(ALL_LOSSES[name], x, y, backend, reduction)
        assert (loss == 0).all() and (grad == 0).all()


def test_empty(backend):
    for shape in [(0, 4, 3, 3), (2, 4, 0, 3), (0, 4)]:
        x, y = make_data(shape, torch.float32, every=0)
        for name in ("cross_entropy", "recall_loss", "mse_outlying_loss"):
            loss, grad = check(ALL_LOSSES[name], x, y, backend, "mean")
            assert loss.item() == 0 and grad.shape == x.shape


# --- gradients and determinism ---------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_gradcheck_float64(backend, name, reduction):
    x, y = make_data((2, 4, 3, 2), torch.float64)
    dev = backend_device(backend)
    x = x.to(dev).requires_grad_(True)
    y = y.to(dev)
    fn = ALL_LOSSES[name]
    # Under the interpreter every launch costs ~40 ms: check the Jacobian through random projections
    # (fast_mode) there, which still fails on any wrong gradient; element by element elsewhere.
    fast = backend == "triton" and dev == "cpu"
    assert torch.autograd.gradcheck(
        lambda t: fn(t, y, reduction=reduction, backend=backend), (x,), fast_mode=fast
    )


@pytest.mark.parametrize("gamma", [0.25, 2.0])
def test_focal_where_p_is_one(backend, gamma):
    """p_y rounds to 1 in some pixels: loss and gradient there are 0 (the limit), never NaN."""
    x, y = make_data((2, 3, 4, 4), torch.float32, every=0)
    x[0, :, 1, 2] = torch.tensor([0.0, 200.0, 0.0])
    y[0, 1, 2] = 1
    fn = lambda t, yy, **k: FI.focal_loss(t, yy, gamma=gamma, **k)  # noqa: E731
    loss, grad = check(fn, x, y, backend, "sum")
    assert torch.isfinite(grad).all() and (grad[0, :, 1, 2] == 0).all()


# --- class weights, numerics at the edges, views and random inputs --------------------------------


def _same_as_reference(fn, x, y, backend, reduction="mean", **kw):
    loss, grad = loss_and_grad(fn, x, y, backend, reduction, **kw)
    ref_loss, ref_grad = loss_and_grad(fn, x, y, "reference", reduction, **kw)
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL[x.dtype], equal_nan=True)
    torch.testing.assert_close(grad, ref_grad, **TOL[x.dtype], equal_nan=True)
    return loss, grad


# Classes 0 and 3 are absent from the batch below; some pixels are ignored.
WEIGHTS = {
    "inf_absent": [1.0, 2.0, 0.5, math.inf],
    "nan_absent": [1.0, 2.0, 0.5, math.nan],
    "inf_class0_ignored": [math.inf, 1.0, 2.0, 1.0],  # ignored labels must not meet class 0's weight
    "negative_sum": [1.0, -3.0, -0.5, 2.0],
    "all_negative": [-1.0, -2.0, -0.5, -1.0],
    "inf_present": [1.0, math.inf, 0.5, 1.0],  # a present class: inf/NaN where torch has them
}


def _weight_data(dev):
    x, y = make_data((2, 4, 3, 3), torch.float64, every=0)
    y = 1 + y.remainder(2)  # classes 1 and 2 only
    y.view(-1)[::4] = -100
    return x.to(dev), y.to(dev)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", WEIGHTS)
def test_class_weights_behave_as_torch(backend, case, reduction):
    """A weight enters only through the pixels of its class, as in torch.nn.functional.cross_entropy:
    an inf/NaN weight of an absent class, or of the class an ignored label would index, changes
    nothing, and "mean" divides by a negative Σ w_y as it is. Every backend gives torch's answer."""
    dev = backend_device(backend)
    x, y = _weight_data(dev)
    w = torch.tensor(WEIGHTS[case], dtype=torch.float64, device=dev)
    want = torch.nn.functional.cross_entropy(x, y, weight=w, reduction=reduction)
    x_leaf = x.clone().requires_grad_(True)
    (want_grad,) = torch.autograd.grad(
        torch.nn.functional.cross_entropy(x_leaf, y, weight=w, reduction=reduction).sum(), x_leaf
    )
    finite = case != "inf_present"
    for b in (backend, "reference"):
        for fn in (
            lambda t, yy, **k: FI.cross_entropy(t, yy, w, **k),
            lambda t, yy, **k: FI.focal_loss(t, yy, 0.0, w, **k),
        ):
            loss, grad = loss_and_grad(fn, x, y, b, reduction)
            torch.testing.assert_close(loss, want, **LOSS_TOL[torch.float64], equal_nan=True)
            if finite:
                assert torch.isfinite(loss).all()
                torch.testing.assert_close(grad, want_grad, **TOL[torch.float64])


@pytest.mark.parametrize("case", [c for c in WEIGHTS if c != "inf_present"])
@pytest.mark.parametrize("name", ["sigmoid_focal_loss", "weighted_focal"])
def test_class_weights_same_on_every_backend(backend, case, name):
    """The losses torch has no twin of follow the same rule on every backend: finite where the
    non-finite weights belong to no valid pixel."""
    dev = backend_device(backend)
    x, y = _weight_data(dev)
    w = torch.tensor(WEIGHTS[case], dtype=torch.float64, device=dev)
    fn = {
        "sigmoid_focal_loss": lambda t, yy, **k: FI.sigmoid_focal_loss(t, yy, 1.5, w, **k),
        "weighted_focal": lambda t, yy, **k: FI.weighted_loss(t, yy, w, "softmax_focal", 2.0, **k),
    }[name]
    for reduction in ("mean", "sum", "none"):
        loss, grad = _same_as_reference(fn, x, y, backend, reduction)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize(
    "dtype, label_logit",
    [
        (torch.float32, 89.0),
        (torch.float32, 1e4),
        (torch.float32, math.inf),
        (torch.float64, 750.0),
        (torch.float64, math.inf),
    ],
)
@pytest.mark.parametrize("gamma", [0.25, 0.5, 0.999, 1.5])
def test_focal_gradient_at_a_certain_label_is_finite(backend, dtype, label_logit, gamma):
    """A label logit so large (or +inf) that 1 − q_y rounds to 0: the focal factor (1 − q_y)^γ has
    an infinite derivative there for γ < 1, the loss term is 0, and the gradient is its limit,
    never 0 · inf = NaN, on every backend and the reference."""
    dev = backend_device(backend)
    x, y = make_data((2, 4, 3, 3), dtype, every=0)
    for b, i, j in ((0, 1, 1), (1, 2, 0)):
        x[b, y[b, i, j], i, j] = label_logit
    x, y = x.to(dev), y.to(dev)
    fns = [lambda t, yy, **k: FI.sigmoid_focal_loss(t, yy, gamma, **k)]
    if math.isfinite(label_logit):  # softmax of a +inf logit is NaN (inf − inf), as torch.log_softmax
        fns.append(lambda t, yy, **k: FI.focal_loss(t, yy, gamma, **k))
    for fn in fns:
        for reduction in ("sum", "none"):
            loss, grad = _same_as_reference(fn, x, y, backend, reduction)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


VIEWS = {
    "channel_slice": lambda x, y: (x[:, 1:4], y.remainder(3)),
    "spatial_step": lambda x, y: (x[:, :, ::2, 1:], y[:, ::2, 1:]),
    "expanded_batch": lambda x, y: (x[:1].expand(3, *x.shape[1:]), y[:1].expand(3, *y.shape[1:])),
    "transposed_rows": lambda x, y: (
        x.movedim(1, -1).reshape(-1, x.shape[1]).t().contiguous().t(),
        y.reshape(-1),
    ),
    "sliced_rows": lambda x, y: (x.movedim(1, -1).reshape(-1, x.shape[1])[::3], y.reshape(-1)[::3]),
}


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("name", ["focal_loss", "recall_loss", "sigmoid_focal_loss", "mse_outlying_loss"])
def test_non_contiguous_views(backend, view, name):
    dev = backend_device(backend)
    x, y = make_data((2, 5, 6, 7), torch.float32)
    xv, yv = VIEWS[view](x.to(dev), y.to(dev))
    _same_as_reference(ALL_LOSSES[name], xv, yv, backend)


@st.composite
def _inputs(draw):
    B = draw(st.integers(0, 3))
    C = draw(st.integers(1, 12))
    spatial = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=3)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    label_dtype = draw(st.sampled_from([torch.uint8, torch.int16, torch.int32, torch.int64]))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "permuted"]))
    seed = draw(st.integers(0, 2**16))
    ignore_p = draw(st.sampled_from([0.0, 0.3, 1.0]))
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((B, C) + spatial, generator=g, dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(0, C, (B,) + spatial, generator=g)
    y[torch.rand(y.shape, generator=g) < ignore_p] = 255
    if layout == "channels_last" and len(spatial) in (2, 3):
        x = x.contiguous(memory_format=torch.channels_last if len(spatial) == 2 else torch.channels_last_3d)
    elif layout == "permuted" and len(spatial) >= 1:  # classes last in memory, any rank
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    return (
        x,
        y.to(label_dtype),
        draw(st.sampled_from(sorted(ALL_LOSSES))),
        draw(st.sampled_from(["mean", "sum", "none"])),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_inputs())
def test_fuzz(backend, data):
    x, y, name, reduction = data
    dev = backend_device(backend)
    _same_as_reference(ALL_LOSSES[name], x.to(dev), y.to(dev), backend, reduction, ignore_index=255)
