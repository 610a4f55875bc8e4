"""Every fused backend against the reference: values, gradients, statistics, layouts, dtypes.

The backends run on CPU tensors here: ``cpp`` natively, ``triton`` through TRITON_INTERPRET=1
(set by conftest when there is no GPU). With a GPU the Triton cases run on CUDA tensors.
A backend that cannot run is skipped, unless it is named in FUSED_IMBALANCE_REQUIRE_BACKENDS
(CI names both), where that is a failure.
"""

import pytest
import torch

import fused_imbalance as fi
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


def test_bad_labels(backend):
    """A label outside [0, C) is a ValueError naming it: at once on the C++ backend (nothing added into
    the caller's matrix), deferred on the Triton one (its call treats those labels as ignored and adds
    the valid pixels' counts; the next fused call raises, or at once fused_imbalance.check_deferred)."""
    dev = backend_device(backend)
    x, y = make_data((2, 5, 4, 4), torch.float32)
    x, y = x.to(dev), y.to(dev)
    y_bad = y.clone()
    y_bad[1, 2, 3] = 5
    y_bad[0, 0, 1] = -7
    y_ign = torch.where((y_bad < 0) | (y_bad >= 5), torch.full_like(y, -100), y_bad)
    conf = torch.ones(5, 5, dtype=torch.int64, device=dev)
    if backend == "triton":
        got = FI.focal_loss(x, y_bad, backend=backend)  # no error yet: the check is deferred
        torch.testing.assert_close(got, FI.focal_loss(x, y_ign, backend="reference"))
        with pytest.raises(ValueError, match=r"label 5 outside \[0, 5\) \(2 such labels"):
            fi.check_deferred()
        FI.confusion_matrix(x, y_bad, out=conf, backend=backend)
        with pytest.raises(ValueError, match="label 5"):  # the next fused call raises
            FI.cross_entropy(x, y, backend=backend)
        assert torch.equal(conf - 1, FI.confusion_matrix(x, y_ign, backend="reference"))
        FI.recall_loss(x, y_bad, backend=backend, validate=False)  # nothing to check later
        fi.check_deferred()  # nothing was left to check: no error
    else:
        with pytest.raises(ValueError, match="5"):
            FI.focal_loss(x, y_bad, backend=backend)
        with pytest.raises(ValueError, match="-7"):
            FI.confusion_matrix(x, y_bad, backend=backend)
        # an update that raises leaves the caller's counts as they were
        with pytest.raises(ValueError):
            FI.confusion_matrix(x, y_bad, out=conf, backend=backend)
        with pytest.raises(ValueError):
            FI.recall_loss(x, y_bad, confusion=conf, backend=backend)
        assert torch.equal(conf, torch.ones_like(conf))
    # validate=False: out-of-range labels are ignored, as the reference does with validate=False
    for name in ("focal_loss", "recall_loss"):
        got = ALL_LOSSES[name](x, y_bad, backend=backend, validate=False)
        torch.testing.assert_close(got, ALL_LOSSES[name](x, y_ign, backend="reference"))


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


@pytest.mark.parametrize("gamma", [0.25, 2.0])
def test_focal_where_p_is_one(backend, gamma):
    """p_y rounds to 1 in some pixels: loss and gradient there are 0 (the limit), never NaN."""
    x, y = make_data((2, 3, 4, 4), torch.float32, every=0)
    x[0, :, 1, 2] = torch.tensor([0.0, 200.0, 0.0])
    y[0, 1, 2] = 1
    fn = lambda t, yy, **k: FI.focal_loss(t, yy, gamma=gamma, **k)  # noqa: E731
    loss, grad = check(fn, x, y, backend, "sum")
    assert torch.isfinite(grad).all() and (grad[0, :, 1, 2] == 0).all()
