"""The executable spec itself: hand-worked values, equality with torch, layouts, gradcheck, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import fused_imbalance.functional as FI
from fused_imbalance import weights
from fused_imbalance.losses import CDBLoss, FocalLoss
from cases import ALL_LOSSES, make_data
from tolerances import TOL

REDUCTIONS = ("mean", "sum", "none")
B = dict(backend="reference")


def _data(shape=(2, 5, 3, 4), dtype=torch.float64, seed=0, ignore=-100):
    return make_data(shape, dtype, seed, ignore)


# --- hand-worked values -------------------------------------------------------------------


def test_focal_value_gamma2_by_hand():
    # One pixel, 3 classes, logits (0, ln 2, ln 5) -> softmax (1/8, 2/8, 5/8); label 2:
    # p_y = 5/8, FL = -(1 - 5/8)^2 * ln(5/8) = -(9/64) * ln(0.625).
    x = torch.tensor([[0.0, math.log(2.0), math.log(5.0)]], dtype=torch.float64)
    y = torch.tensor([2])
    expected = -(9 / 64) * math.log(0.625)
    assert FI.focal_loss(x, y, gamma=2.0, **B).item() == pytest.approx(expected, rel=1e-12)


def test_recall_loss_two_class_toy_batch_by_hand():
    # 4 pixels; labels 0,0,1,1; argmax 0,1,1,1 -> TP = (1, 2), n = (2, 2), recall = (1/2, 1),
    # weights w = 1 - recall = (1/2, 0): only the pixels of class 0 count, each with weight 1/2.
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [-1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    ce = F.cross_entropy(x, y, reduction="none")
    expected = 0.5 * (ce[0] + ce[1]) / 4  # mean over the 4 valid pixels
    assert FI.recall_loss(x, y, **B).item() == pytest.approx(expected.item(), rel=1e-12)
    # every pixel right -> weights 0 -> loss 0
    assert FI.recall_loss(x, x.argmax(1), **B).item() == 0.0


def test_recall_loss_uses_given_recall_and_callable():
    x, y = _data()
    r = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64)
    ce = FI.cross_entropy(x, y, reduction="none", **B)
    valid = (y != -100).sum()
    expected = ((1 - r)[y.clamp(min=0)] * ce).sum() / valid
    torch.testing.assert_close(FI.recall_loss(x, y, recall=r, **B), expected)
    seen = {}

    def hook(count, tp):
        seen["count"], seen["tp"] = count, tp
        return r

    torch.testing.assert_close(FI.recall_loss(x, y, recall=hook, **B), expected)
    assert int(seen["count"].sum()) == int(valid)


def test_cdb_loss_by_hand():
    x, y = _data()
    acc = torch.tensor([0.9, 0.5, 0.2, 0.7, 0.6])
    b = 0.9 / (0.2 + 1e-4) - 1
    tau = 2 / (1 + math.exp(-b))
    w = (1 - acc.double()) ** tau
    ce = F.cross_entropy(x, y, reduction="none")
    fl = ce * (1 - torch.exp(-ce)) ** 1.0
    valid = y != -100
    expected = (w[y.clamp(min=0)] * fl)[valid].sum() / valid.sum()
    torch.testing.assert_close(FI.cdb_loss(x, y, acc, gamma=1.0, **B), expected, **TOL[torch.float32])


def test_mse_outlying_by_hand():
    # One pixel, 3 classes, label 1, outlying values (1, 2, 3): target (0, 2, 0).
    x = torch.tensor([[0.5, 1.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([1])
    out = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert FI.mse_outlying_loss(x, y, out, **B).item() == pytest.approx(0.5 * (0.25 + 1.0 + 1.0))
    p = torch.softmax(x, 1)[0]
    expected = 0.5 * (p[0] ** 2 + (p[1] - 2) ** 2 + p[2] ** 2)
    assert FI.mse_outlying_loss(x, y, out, input="softmax", **B).item() == pytest.approx(expected.item())


def test_class_balanced_matches_official_formula():
    # official code: sum over pixels of w_y * loss / N, weights summing to C
    x, y = _data()
    counts = [100, 50, 10, 5, 1]
    w = weights.effective_number(counts, 0.99).double()
    valid = y != -100
    ysafe = y.clamp(min=0)
    ce = F.cross_entropy(x, y, reduction="none")
    torch.testing.assert_close(
        FI.class_balanced_loss(x, y, counts, beta=0.99, loss_type="softmax", **B),
        (w[ysafe] * ce)[valid].sum() / valid.sum(),
    )
    onehot = F.one_hot(ysafe, 5).movedim(-1, 1).double()
    bce = F.binary_cross_entropy_with_logits(x, onehot, reduction="none").sum(1)
    torch.testing.assert_close(
        FI.class_balanced_loss(x, y, counts, beta=0.99, loss_type="sigmoid", **B),
        (w[ysafe] * bce)[valid].sum() / valid.sum(),
    )


# --- equality with torch ----------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_equals_torch(reduction, use_weight, dtype):
    x, y = _data(dtype=dtype)
    w = torch.rand(5, dtype=dtype) + 0.1 if use_weight else None
    torch.testing.assert_close(
        FI.cross_entropy(x, y, w, reduction=reduction, **B),
        F.cross_entropy(x, y, w, reduction=reduction),
        **TOL[dtype],
    )


def test_cross_entropy_ignore_index_255_uint8():
    x, y = _data(ignore=255)
    yu = y.to(torch.uint8)
    torch.testing.assert_close(
        FI.cross_entropy(x, yu, ignore_index=255, **B), F.cross_entropy(x, y, ignore_index=255)
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_gamma0_equals_cross_entropy(reduction):
    x, y = _data()
    w = torch.rand(5, dtype=torch.float64)
    torch.testing.assert_close(
        FI.focal_loss(x, y, gamma=0.0, weight=w, reduction=reduction, **B),
        FI.cross_entropy(x, y, w, reduction=reduction, **B),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sigmoid_focal_gamma0_equals_bce_summed(reduction):
    x, y = _data()
    valid = y != -100
    onehot = F.one_hot(y.clamp(min=0), 5).movedim(-1, 1).double()
    bce = F.binary_cross_entropy_with_logits(x, onehot, reduction="none").sum(1) * valid
    expected = {"none": bce, "sum": bce.sum(), "mean": bce.sum() / valid.sum()}[reduction]
    torch.testing.assert_close(FI.sigmoid_focal_loss(x, y, gamma=0.0, reduction=reduction, **B), expected)


# --- layouts ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_channels_last_and_flattened_equal_contiguous(name):
    fn = ALL_LOSSES[name]
    x, y = _data()
    ref = fn(x, y, reduction="sum", **B)
    torch.testing.assert_close(fn(x.to(memory_format=torch.channels_last), y, reduction="sum", **B), ref)
    flat_x = x.movedim(1, -1).reshape(-1, x.shape[1])
    torch.testing.assert_close(fn(flat_x, y.reshape(-1), reduction="sum", **B), ref)
    none = fn(x, y, reduction="none", **B)
    assert none.shape == y.shape
    assert (none[y == -100] == 0).all()


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_volumes(name):
    fn = ALL_LOSSES[name]
    x, y = _data(shape=(2, 4, 3, 2, 5))
    ref = fn(x, y, reduction="sum", **B)
    torch.testing.assert_close(fn(x.to(memory_format=torch.channels_last_3d), y, reduction="sum", **B), ref)
    torch.testing.assert_close(fn(x.movedim(1, -1).reshape(-1, 4), y.reshape(-1), reduction="sum", **B), ref)


# --- gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_gradcheck(name, reduction):
    fn = ALL_LOSSES[name]
    x, y = _data(shape=(2, 4, 3, 2))
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fn(t, y, reduction=reduction, **B), (x,))


# --- conventions --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_is_zero_with_zero_grad(name, reduction):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.full((2, 4, 4), -100)
    loss = ALL_LOSSES[name](x, y, reduction=reduction, **B)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    loss.sum().backward()
    assert (x.grad == 0).all()


def test_zero_weights_give_zero_not_nan():
    x, y = _data()
    x.requires_grad_(True)
    loss = FI.cross_entropy(x, y, torch.zeros(5, dtype=torch.float64), **B)
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()


def test_means_follow_their_rule():
    # general losses divide by Σ w_y, paper losses by N_valid
    x, y = _data()
    w = torch.linspace(0.1, 3.0, 5, dtype=torch.float64)
    s = FI.cross_entropy(x, y, w, reduction="sum", **B)
    valid = y != -100
    torch.testing.assert_close(FI.cross_entropy(x, y, w, **B), s / w[y[valid]].sum())
    cb_w = weights.effective_number([5, 4, 3, 2, 1], 0.9).double()
    s_cb = FI.class_balanced_loss(x, y, [5, 4, 3, 2, 1], beta=0.9, reduction="sum", **B)
    torch.testing.assert_close(s_cb, FI.cross_entropy(x, y, cb_w, reduction="sum", **B))
    torch.testing.assert_close(
        FI.class_balanced_loss(x, y, [5, 4, 3, 2, 1], beta=0.9, **B), s_cb / valid.sum()
    )


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_label_dtypes(label_dtype):
    x, y = _data(ignore=255 if label_dtype == torch.uint8 else -100)
    ii = 255 if label_dtype == torch.uint8 else -100
    torch.testing.assert_close(
        FI.focal_loss(x, y.to(label_dtype), ignore_index=ii, **B), FI.focal_loss(x, y, ignore_index=ii, **B)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    x, y = _data(dtype=dtype)
    loss = FI.focal_loss(x, y, **B)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, FI.focal_loss(x.float(), y, **B))
    x.requires_grad_(True)
    FI.focal_loss(x, y, **B).backward()
    assert x.grad.dtype == dtype


def test_confusion_matrix_and_confusion_argument():
    x = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 5.0, 0.0], [9.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 1, 1, -100])
    # argmax 0, 2, 0 (tie -> first), 1; the last pixel is ignored
    expected = torch.tensor([[1, 0, 0], [1, 1, 1], [0, 0, 0]])
    assert torch.equal(FI.confusion_matrix(x, y, **B), expected)
    out = torch.ones(3, 3, dtype=torch.int64)
    assert FI.confusion_matrix(x, y, out=out, **B) is out
    assert torch.equal(out, expected + 1)
    conf = torch.zeros(3, 3, dtype=torch.int64)
    FI.recall_loss(x, y, confusion=conf, **B)
    assert torch.equal(conf, expected)
    count, tp = FI.class_stats(x, y, **B)
    assert count.tolist() == [1, 3, 0] and tp.tolist() == [1, 1, 0]


# --- errors -------------------------------------------------------------------------------


def test_label_out_of_range_names_the_value():
    x, y = _data()
    y[0, 1, 1] = 17
    with pytest.raises(ValueError, match="17"):
        FI.cross_entropy(x, y, **B)
    y[0, 1, 1] = -3
    with pytest.raises(ValueError, match="-3"):
        FI.recall_loss(x, y, **B)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda x, y: FI.cross_entropy(x, y[:, :2]), ValueError, "does not match"),
        (lambda x, y: FI.cross_entropy(x.long(), y), TypeError, "logits must be"),
        (lambda x, y: FI.cross_entropy(x, y.float()), TypeError, "target must be"),
        (lambda x, y: FI.cross_entropy(x, y, torch.ones(4)), ValueError, r"shape \(5,\)"),
        (lambda x, y: FI.cross_entropy(x, y, reduction="avg"), ValueError, "reduction"),
        (lambda x, y: FI.cross_entropy(x, y, backend="cuda-magic"), ValueError, "backend"),
        (
            lambda x, y: FI.class_balanced_loss(x, y, [1, 2, 3, 4, 5], loss_type="hinge"),
            ValueError,
            "loss_type",
        ),
        (lambda x, y: FI.class_balanced_loss(x, y, [1, -2, 3, 4, 5]), ValueError, "non-negative"),
        (lambda x, y: FI.class_balanced_loss(x, y, []), ValueError, "non-empty"),
        (lambda x, y: FI.class_balanced_loss(x, y, [1, 2, 3]), ValueError, r"\(5,\)"),
        (lambda x, y: FI.focal_loss(x, y, gamma=-1.0), ValueError, "gamma"),
        (lambda x, y: FI.cdb_loss(x, y, [0.5] * 5, tau="fast"), ValueError, "tau"),
        (lambda x, y: FI.mse_outlying_loss(x, y, torch.ones(5), input="probs"), ValueError, "input"),
        (lambda x, y: FI.confusion_matrix(x, y, out=torch.zeros(5, 5)), TypeError, "int64"),
        # argument mix-ups: the message names the argument the user got wrong
        (
            lambda x, y: FI.class_balanced_loss(x, y, [10, 5]),
            ValueError,
            r"samples_per_class must have shape \(5,\)",
        ),
        (lambda x, y: FI.class_balanced_loss(x, y, 10), TypeError, "samples_per_class must be a sequence"),
        (lambda x, y: weights.effective_number(10), TypeError, "samples_per_class must be a sequence"),
        (lambda x, y: weights.outlying_labels(3.0), TypeError, "samples_per_class must be a sequence"),
        (lambda x, y: weights.cdb(0.5), TypeError, "class_accuracy must be a sequence"),
        (lambda x, y: FI.focal_loss(x, y, torch.ones(5)), TypeError, r"gamma must be a number.*weight="),
        (lambda x, y: FI.sigmoid_focal_loss(x, y, [1.0, 2.0]), TypeError, "gamma must be a number"),
        (lambda x, y: FI.focal_loss(x, y, float("nan")), ValueError, "gamma"),
        (lambda x, y: FocalLoss(torch.ones(5)), TypeError, r"gamma must be a number.*weight="),
        (lambda x, y: CDBLoss(5, gamma=torch.ones(5)), TypeError, "gamma must be a number"),
    ],
)
def test_bad_input_errors(call, exc, match):
    x, y = _data()
    with pytest.raises(exc, match=match):
        call(x, y)


@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0, 2.0])
def test_focal_gradient_is_finite_when_p_is_one(gamma):
    # p_y rounds to 1: the loss and its gradient are 0 for every γ > 0 (the limit), never NaN
    x = torch.tensor([[0.0, 200.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = FI.focal_loss(x, torch.tensor([1]), gamma=gamma, **B)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_gamma_accepts_numbers_and_one_element_tensors():
    x, y = _data()
    want = FI.focal_loss(x, y, 2.0, **B)
    for g in (2, torch.tensor(2.0), torch.tensor([2.0])):
        torch.testing.assert_close(FI.focal_loss(x, y, g, **B), want)


def test_backend_from_the_environment_names_the_variable(monkeypatch):
    x, y = _data()
    monkeypatch.setenv("FUSED_IMBALANCE_BACKEND", "cpu")
    with pytest.raises(ValueError, match=r"FUSED_IMBALANCE_BACKEND must be one of .*'cpu'"):
        FI.cross_entropy(x, y)
    monkeypatch.setenv("FUSED_IMBALANCE_BACKEND", "reference")
    torch.testing.assert_close(FI.cross_entropy(x, y), F.cross_entropy(x, y))
