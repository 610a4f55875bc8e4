"""The Dice family's executable spec (docs/DESIGN.md §12): MONAI's losses with the options mapped,
segmentation_models_pytorch's formulas, hand-worked values, layouts, edge cases, gradients (autograd,
gradcheck and the closed form the fused backward computes), errors."""

import math
import warnings
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from fused_imbalance import reference as R
from cases import make_data, to_layout
from tolerances import LOSS_TOL, TOL

REDUCTIONS = ("mean", "sum", "none")
F64 = TOL[torch.float64]
FNS = {
    "dice": R.dice_loss,
    "generalized_dice": R.generalized_dice_loss,
    "tversky": R.tversky_loss,
    "dice_ce": R.dice_ce_loss,
}
# One call of each function with options away from the defaults, for the tests that cover all four.
CALLS = {
    "dice": lambda x, y, **k: R.dice_loss(x, y, **k),
    "jaccard_squared": lambda x, y, **k: R.dice_loss(
        x,
        y,
        torch.linspace(0.5, 2, x.shape[1] - 1, dtype=torch.float64).to(x.device),
        include_background=False,
        jaccard=True,
        squared_pred=True,
        **k,
    ),
    "generalized_dice": lambda x, y, **k: R.generalized_dice_loss(x, y, **k),
    "tversky": lambda x, y, **k: R.tversky_loss(x, y, alpha=0.3, beta=0.7, gamma=1.5, **k),
    "dice_ce": lambda x, y, **k: R.dice_ce_loss(
        x, y, 0.6, 1.4, torch.linspace(0.5, 2, x.shape[1], dtype=torch.float64).to(x.device), **k
    ),
}
SCALAR_REDUCTIONS = {"dice_ce": ("mean", "sum")}  # dice_ce_loss has no "none", as MONAI's DiceCELoss


def _reductions(name):
    return SCALAR_REDUCTIONS.get(name, REDUCTIONS)


@pytest.fixture(scope="module")
def monai():
    """MONAI's losses (scripts/setup_and_test.sh installs the pinned version); a failure, not a skip, without it."""
    try:
        import monai.losses
    except ImportError as e:
        pytest.fail(f"MONAI is needed for the comparisons (pip install --no-deps monai==1.6.1): {e}")
    return monai.losses


def _monai(cls, x, y, **kw):
    """MONAI's ``cls`` on our inputs: probabilities from logits, one-hot from labels (B, 1, ...)."""
    if x.dim() == 2:  # (N, C) rows: one image of N pixels
        x, y = x.t()[None], y[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's deprecation notices
        return cls(softmax=True, to_onehot_y=True, **kw)(x, y[:, None].long())


def _data(shape=(2, 4, 5, 6), dtype=torch.float64, seed=0, every=0, absent=True):
    """Random logits and labels; with ``absent`` class 2 is missing from image 1 (C > 2)."""
    x, y = make_data(shape, dtype, seed, every=every)
    if absent and shape[1] > 2 and len(shape) > 2:
        y[1][y[1] == 2] = 1
    return x, y


def _close(actual, expected, dtype=torch.float64):
    torch.testing.assert_close(actual, expected.to(actual.dtype), **LOSS_TOL[dtype])


# --- MONAI ------------------------------------------------------------------------------------

DICE_OPTIONS = [
    {},
    {"include_background": False},
    {"jaccard": True},
    {"batch": True},
    {"weight": [0.5, 1.0, 2.0, 0.25]},
    {"weight": [1.0, 2.0, 0.25], "include_background": False, "jaccard": True, "batch": True},
    {"smooth_nr": 0.0, "smooth_dr": 1e-3},
    {"smooth_nr": 1.0, "smooth_dr": 1.0},
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", DICE_OPTIONS, ids=str)
def test_dice_matches_monai(monai, opts, reduction):
    x, y = _data()
    ours = R.dice_loss(
        x,
        y,
        **{
            **opts,
            "weight": None if "weight" not in opts else torch.tensor(opts["weight"], dtype=torch.float64),
        },
        reduction=reduction,
    )
    theirs = _monai(monai.DiceLoss, x, y, reduction=reduction, **opts)
    _close(ours, theirs.reshape(ours.shape))


@pytest.mark.parametrize("batch", [False, True])
def test_dice_squared_pred_matches_monai(monai, batch):
    # MONAI's one-hot target is float32 and its squared_pred path takes the target's norm, so its G
    # is rounded to float32 through a sqrt; a float64 one-hot target keeps its float64 exact.
    x, y = _data()
    onehot = F.one_hot(y, 4).movedim(-1, 1).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = monai.DiceLoss(softmax=True, squared_pred=True, batch=batch, reduction="none")(x, onehot)
    ours = R.dice_loss(x, y, squared_pred=True, batch=batch, reduction="none")
    _close(ours, theirs.reshape(ours.shape))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", [{}, {"batch": True}, {"include_background": False}], ids=str)
@pytest.mark.parametrize("w_type", ["square", "simple", "uniform"])
def test_generalized_dice_matches_monai(monai, w_type, opts, reduction):
    # float32 on both sides: MONAI computes its class weights in float32 whatever the input.
    x, y = _data(dtype=torch.float32)
    ours = R.generalized_dice_loss(x, y, w_type=w_type, reduction=reduction, **opts)
    theirs = _monai(monai.GeneralizedDiceLoss, x, y, w_type=w_type, reduction=reduction, **opts)
    _close(ours, theirs.reshape(ours.shape), torch.float32)


def test_generalized_dice_every_class_absent_matches_monai(monai):
    # Without background, image 1 (all background) has every weight infinite: MONAI sets them all to
    # 0, so that image's loss is 1 - smooth_nr / smooth_dr.
    x, y = _data(shape=(2, 3, 4, 4), dtype=torch.float32, absent=False)
    y[1] = 0
    ours = R.generalized_dice_loss(x, y, include_background=False, smooth_dr=2e-5, reduction="none")
    theirs = _monai(
        monai.GeneralizedDiceLoss, x, y, include_background=False, smooth_dr=2e-5, reduction="none"
    )
    _close(ours, theirs.reshape(ours.shape), torch.float32)
    assert ours[1].item() == pytest.approx(0.5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"alpha": 0.3, "beta": 0.7},
        {"alpha": 0.9, "beta": 0.2, "batch": True},
        {"alpha": 0.0, "beta": 1.0, "include_background": False},
    ],
    ids=str,
)
def test_tversky_matches_monai(monai, opts, reduction):
    x, y = _data()
    ours = R.tversky_loss(x, y, reduction=reduction, **opts)
    theirs = _monai(monai.TverskyLoss, x, y, reduction=reduction, **opts)
    _close(ours, theirs.reshape(ours.shape))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"weight": [0.5, 1.0, 2.0, 3.0]},
        {"weight": [0.5, 1.0, 2.0, 3.0], "include_background": False},  # Dice takes weight[1:]
        {"lambda_dice": 0.3, "lambda_ce": 1.7, "jaccard": True, "batch": True},
        {
            "weight": [2.0, 1.0, 0.5, 1.0],
            "squared_pred": False,
            "smooth_nr": 0.0,
            "include_background": False,
            "batch": True,
        },
    ],
    ids=str,
)
def test_dice_ce_matches_monai(monai, opts, reduction):
    x, y = _data()
    w = opts.get("weight")
    kw = {**opts, "weight": None if w is None else torch.tensor(w, dtype=torch.float64)}
    ours = R.dice_ce_loss(x, y, reduction=reduction, **kw)
    theirs = _monai(monai.DiceCELoss, x, y, reduction=reduction, **kw)
    _close(ours, theirs)


@pytest.mark.parametrize("shape", [(2, 4, 5, 6), (2, 3, 3, 4, 5)])
@pytest.mark.parametrize("opts", [{}, {"batch": True, "include_background": False}], ids=str)
def test_ignored_pixels_match_monai_ignore_index(monai, shape, opts):
    # MONAI's Dice and Tversky losses take an ignore_index, whose pixels it masks out of every sum.
    x, y = _data(shape, every=3)
    for ours_fn, cls, kw in [
        (R.dice_loss, monai.DiceLoss, {}),
        (R.tversky_loss, monai.TverskyLoss, {"alpha": 0.2, "beta": 0.8}),
    ]:
        ours = ours_fn(x, y, reduction="none", **opts, **kw)
        theirs = _monai(cls, x, y, reduction="none", ignore_index=-100, **opts, **kw)
        _close(ours, theirs.reshape(ours.shape))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_image_counts_in_the_mean_as_monai(monai, reduction):
    # An image with no valid pixel keeps its C terms 1 - smooth_nr/smooth_dr in the mean, as MONAI's ignore_index.
    x, y = _data(every=5)
    y[1] = -100
    for ours_fn, cls in [(R.dice_loss, monai.DiceLoss), (R.tversky_loss, monai.TverskyLoss)]:
        ours = ours_fn(x, y, smooth_dr=4e-5, reduction=reduction)
        theirs = _monai(cls, x, y, smooth_dr=4e-5, reduction=reduction, ignore_index=-100)
        _close(ours, theirs.reshape(ours.shape))
    assert (R.dice_loss(x, y, smooth_dr=4e-5, reduction="none")[1] == 0.75).all()


@pytest.mark.parametrize("name", CALLS)
def test_ignored_rows_are_removed_rows(name):
    # (N, C) rows are one image: ignoring a row is removing it, for the value and the other rows' gradient.
    fn = CALLS[name]
    x, y = make_data((40, 5), every=0, seed=3)
    y[::4] = -100
    keep = y != -100
    for reduction in _reductions(name):
        xa = x.clone().requires_grad_(True)
        xb = x[keep].clone().requires_grad_(True)
        la, lb = fn(xa, y, reduction=reduction), fn(xb, y[keep], reduction=reduction)
        _close(la, lb)
        la.sum().backward()
        lb.sum().backward()
        _close(xa.grad[keep], xb.grad)
        assert (xa.grad[~keep] == 0).all()


@pytest.mark.parametrize(
    "name, cls", [("generalized_dice", "GeneralizedDiceLoss"), ("dice_ce", "DiceCELoss")]
)
def test_ignored_rows_match_monai_on_the_rest(monai, name, cls):
    # MONAI's generalized Dice and Dice+CE have no ignore_index: compare with the valid rows alone.
    x, y = make_data((40, 5), every=0, seed=4)
    y[1::3] = -100
    keep = y != -100
    ours = FNS[name](x, y)
    theirs = _monai(getattr(monai, cls), x[keep], y[keep])
    _close(ours, theirs.reshape(ours.shape))


# --- segmentation_models_pytorch ------------------------------------------------------------------
# Its package pulls torchvision and timm, so its formulas are transcribed here from
# segmentation_models_pytorch/losses/dice.py (DiceLoss.forward, mode="multiclass"),
# losses/tversky.py (TverskyLoss.aggregate_loss) and losses/_functional.py (soft_dice_score,
# soft_tversky_score).


def _smp_multiclass(x, y, score, ignore_index=None, classes_mean=lambda loss: loss.mean()):
    """smp's multiclass DiceLoss.forward with from_logits=True and log_loss=False."""
    bs, C = y.shape[0], x.shape[1]
    y_pred = x.log_softmax(dim=1).exp().view(bs, C, -1)
    y_true = y.view(bs, -1)
    dims = (0, 2)
    if ignore_index is not None:
        mask = y_true != ignore_index
        y_pred = y_pred * mask.unsqueeze(1)
        y_true = F.one_hot((y_true * mask).to(torch.long), C).permute(0, 2, 1) * mask.unsqueeze(1)
    else:
        y_true = F.one_hot(y_true, C).permute(0, 2, 1)
    scores = score(y_pred, y_true.type_as(y_pred), dims)
    loss = 1.0 - scores
    loss = loss * (y_true.sum(dims) > 0).to(loss.dtype)  # smp zeroes classes absent from the batch
    return classes_mean(loss)


def _smp_soft_dice_score(smooth, eps=1e-7):
    def score(output, target, dims):
        intersection = torch.sum(output * target, dim=dims)
        cardinality = torch.sum(output + target, dim=dims)
        return (2.0 * intersection + smooth) / (cardinality + smooth).clamp_min(eps)

    return score


def _smp_soft_tversky_score(alpha, beta, smooth, eps=1e-7):
    def score(output, target, dims):
        intersection = torch.sum(output * target, dim=dims)
        fp = torch.sum(output * (1.0 - target), dim=dims)
        fn = torch.sum((1 - output) * target, dim=dims)
        return (intersection + smooth) / (intersection + alpha * fp + beta * fn + smooth).clamp_min(eps)

    return score


@pytest.mark.parametrize("smooth", [0.0, 1.0])
@pytest.mark.parametrize("ignore", [False, True])
def test_dice_matches_smp_formula(smooth, ignore):
    # smp sums over the batch (dims 0 and 2): batch=True, smooth_nr = smooth_dr = smooth.
    x, y = _data(every=5 if ignore else 0, absent=False)
    theirs = _smp_multiclass(x, y, _smp_soft_dice_score(smooth), -100 if ignore else None)
    _close(R.dice_loss(x, y, batch=True, smooth_nr=smooth, smooth_dr=smooth), theirs)


def test_dice_absent_class_differs_from_smp_as_documented():
    # A class absent from the batch: smp zeroes its term, here it is 1 - smooth_nr / (P + smooth_dr).
    x, y = _data(absent=False)
    y[y == 3] = 0
    theirs = _smp_multiclass(x, y, _smp_soft_dice_score(0.0))
    ours = R.dice_loss(x, y, batch=True, smooth_nr=0.0, smooth_dr=0.0, reduction="none")
    assert ours[3].item() == 1.0
    _close(ours[:3].sum() / 4, theirs)


@pytest.mark.parametrize("alpha, beta", [(0.5, 0.5), (0.3, 0.7)])
def test_tversky_matches_smp_formula_at_gamma_one_only(alpha, beta):
    x, y = _data(every=4, absent=False)
    smp = lambda gamma: _smp_multiclass(
        x, y, _smp_soft_tversky_score(alpha, beta, 0.0), -100, lambda loss: loss.mean() ** gamma
    )
    kw = dict(alpha=alpha, beta=beta, batch=True, smooth_nr=0.0, smooth_dr=0.0)
    _close(R.tversky_loss(x, y, **kw), smp(1.0))
    # γ != 1: smp raises the mean over classes to γ, here each class's term is raised to γ.
    per_class = R.tversky_loss(x, y, reduction="none", **kw)
    ours = R.tversky_loss(x, y, gamma=2.0, **kw)
    _close(ours, (per_class**2).mean())
    _close(smp(2.0), per_class.mean() ** 2)
    assert abs(ours.item() - smp(2.0).item()) > 1e-3


# --- hand-worked values -----------------------------------------------------------------------
# Two classes, three pixels: logits (0, 0), (ln 3, 0), (0, ln 3) give p = (1/2, 1/2), (3/4, 1/4),
# (1/4, 3/4); labels 0, 0, 1. Class 0: I = 5/4, P = 3/2, G = 2, ΣP² = 7/8; class 1: I = 3/4, P = 3/2,
# G = 1, ΣP² = 7/8.

L3 = math.log(3.0)
HAND_X = torch.tensor([[0.0, 0.0], [L3, 0.0], [0.0, L3]], dtype=torch.float64)
HAND_Y = torch.tensor([0, 0, 1])
I_, P_, G_, Q_ = (
    (Fraction(5, 4), Fraction(3, 4)),
    (Fraction(3, 2), Fraction(3, 2)),
    (2, 1),
    (Fraction(7, 8), Fraction(7, 8)),
)


def _hand(fn, **kw):
    return fn(HAND_X, HAND_Y, smooth_nr=0.0, smooth_dr=0.0, **kw)


def test_dice_by_hand():
    # 1 - 2I / (P + G): 1 - (5/2)/(7/2) = 2/7 and 1 - (3/2)/(5/2) = 2/5
    torch.testing.assert_close(
        _hand(R.dice_loss, reduction="none"),
        torch.tensor([2 / 7, 2 / 5], dtype=torch.float64),
        rtol=1e-14,
        atol=0,
    )
    assert _hand(R.dice_loss).item() == pytest.approx(12 / 35, rel=1e-14)
    # jaccard 1 - 2I / (2(P + G - I)): 1 - (5/2)/(9/2) = 4/9, 1 - (3/2)/(7/2) = 4/7
    assert _hand(R.dice_loss, jaccard=True, reduction="sum").item() == pytest.approx(4 / 9 + 4 / 7, rel=1e-14)
    # squared: P = Σp² = 7/8: 1 - (5/2)/(23/8) = 3/23, 1 - (3/2)/(15/8) = 1/5
    assert _hand(R.dice_loss, squared_pred=True, reduction="sum").item() == pytest.approx(
        3 / 23 + 1 / 5, rel=1e-14
    )
    # weight on the second class only, no background: 2/5 * 3
    assert _hand(
        R.dice_loss,
        weight=torch.tensor([3.0], dtype=torch.float64),
        include_background=False,
    ).item() == pytest.approx(6 / 5, rel=1e-14)
    # the default smoothing 1e-5 in both terms
    want = [1 - (2 * float(i) + 1e-5) / (float(p) + g + 1e-5) for i, p, g in zip(I_, P_, G_)]
    torch.testing.assert_close(
        R.dice_loss(HAND_X, HAND_Y, reduction="none"),
        torch.tensor(want, dtype=torch.float64),
        rtol=1e-14,
        atol=0,
    )


def test_generalized_dice_by_hand():
    # square: w = (1/4, 1); 1 - 2(5/16 + 3/4) / ((1/4)(7/2) + 5/2) = 1 - (17/8)/(27/8) = 10/27
    assert _hand(R.generalized_dice_loss).item() == pytest.approx(10 / 27, rel=1e-14)
    # simple: w = (1/2, 1); 1 - 2(5/8 + 3/4) / (7/4 + 5/2) = 1 - (11/4)/(17/4) = 6/17
    assert _hand(R.generalized_dice_loss, w_type="simple").item() == pytest.approx(6 / 17, rel=1e-14)
    # uniform: 1 - 2(2) / (7/2 + 5/2) = 1/3
    assert _hand(R.generalized_dice_loss, w_type="uniform").item() == pytest.approx(1 / 3, rel=1e-14)


def test_generalized_dice_absent_class_weight_by_hand():
    # Three classes, class 2 absent: its weight is the largest finite one, 1/G_1² = 1 (G = (2, 1, 0)).
    x = torch.cat([HAND_X, torch.zeros(3, 1, dtype=torch.float64)], 1)  # p_2 = 1/(e^x0 + e^x1 + 1)
    p = torch.softmax(x, 1)
    w = torch.tensor([0.25, 1.0, 1.0], dtype=torch.float64)
    I = torch.stack([p[[0, 1], 0].sum(), p[2, 1], torch.zeros((), dtype=torch.float64)])
    P = p.sum(0)
    G = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    want = 1 - 2 * (w * I).sum() / (w * (P + G)).sum()
    torch.testing.assert_close(R.generalized_dice_loss(x, HAND_Y, smooth_nr=0.0, smooth_dr=0.0), want, **F64)


def test_tversky_by_hand():
    # α = 0.3 (FP), β = 0.7 (FN); class 0: FP = 1/4, FN = 3/4; class 1: FP = 3/4, FN = 1/4
    t0 = 1.25 / (1.25 + 0.3 * 0.25 + 0.7 * 0.75)
    t1 = 0.75 / (0.75 + 0.3 * 0.75 + 0.7 * 0.25)
    kw = dict(alpha=0.3, beta=0.7)
    assert _hand(R.tversky_loss, **kw).item() == pytest.approx(((1 - t0) + (1 - t1)) / 2, rel=1e-14)
    assert _hand(R.tversky_loss, gamma=2.0, **kw).item() == pytest.approx(
        ((1 - t0) ** 2 + (1 - t1) ** 2) / 2, rel=1e-14
    )
    # α = β = 1/2 is the Dice loss with the smoothing halved
    torch.testing.assert_close(
        R.tversky_loss(HAND_X, HAND_Y, smooth_nr=1e-3, smooth_dr=2e-3),
        R.dice_loss(HAND_X, HAND_Y, smooth_nr=2e-3, smooth_dr=4e-3),
        **F64,
    )


def test_dice_ce_by_hand():
    # CE = (ln 2 + 2 ln(4/3)) / 3; Dice 12/35; λ_ce = 2, λ_dice = 0.5
    ce = (math.log(2) + 2 * math.log(4 / 3)) / 3
    assert _hand(R.dice_ce_loss, lambda_dice=0.5, lambda_ce=2.0).item() == pytest.approx(
        2 * ce + 6 / 35, rel=1e-14
    )
    # weight (1, 3): CE mean Σ w ℓ / Σ w = (ln 2 + ln(4/3) + 3 ln(4/3)) / 5; Dice (2/7 + 3 * 2/5) / 2
    w = torch.tensor([1.0, 3.0], dtype=torch.float64)
    want = (math.log(2) + 4 * math.log(4 / 3)) / 5 + (2 / 7 + 6 / 5) / 2
    assert _hand(R.dice_ce_loss, weight=w).item() == pytest.approx(want, rel=1e-14)


# --- layouts, shapes, dtypes ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 4, 5, 6), (2, 4, 3, 4, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("name", CALLS)
def test_layouts(name, shape):
    fn = CALLS[name]
    x, y = _data(shape, every=7)
    for reduction in _reductions(name):
        ref = fn(x, y, reduction=reduction)
        _close(fn(to_layout(x, "channels_last"), y, reduction=reduction), ref)
        # (N, C) rows are one image: the batch=True loss of the image form
        _close(
            fn(to_layout(x, "rows"), y.reshape(-1), reduction=reduction),
            fn(x, y, batch=True, reduction=reduction),
        )
        _close(
            fn(to_layout(x, "rows"), y.reshape(-1), batch=True, reduction=reduction),
            fn(x, y, batch=True, reduction=reduction),
        )


@pytest.mark.parametrize("name", CALLS)
def test_channels_last_gradient_keeps_the_layout(name):
    fn = CALLS[name]
    x, y = _data((2, 4, 3, 4, 5), every=7)
    a = x.clone().requires_grad_(True)
    b = to_layout(x, "channels_last").requires_grad_(True)
    fn(a, y).backward()
    fn(b, y).backward()
    _close(b.grad, a.grad)
    assert b.grad.is_contiguous(memory_format=torch.channels_last_3d)


def test_batch_false_is_per_image():
    # batch=False: image b's losses are those of image b alone
    x, y = _data(every=7)
    for name in ("dice", "generalized_dice", "tversky", "jaccard_squared"):
        none = CALLS[name](x, y, reduction="none")
        for b in range(2):
            _close(none[b], CALLS[name](x[b : b + 1], y[b : b + 1], reduction="none")[0])


@pytest.mark.parametrize("name", ["dice", "jaccard_squared", "generalized_dice", "tversky"])
def test_reduction_none_shapes(name):
    fn = CALLS[name]
    kept = 3 if name == "jaccard_squared" else 4
    per_class = name != "generalized_dice"
    x, y = _data((3, 4, 2, 5))
    assert fn(x, y, reduction="none").shape == ((3, kept) if per_class else (3,))
    assert fn(x, y, reduction="none", batch=True).shape == ((kept,) if per_class else ())
    rows = to_layout(x, "rows")
    assert fn(rows, y.reshape(-1), reduction="none").shape == ((kept,) if per_class else ())
    none = fn(x, y, reduction="none")
    _close(fn(x, y, reduction="sum"), none.sum())
    _close(fn(x, y, reduction="mean"), none.mean())


@pytest.mark.parametrize("C", [1, 2, 19, 150])
def test_class_counts(monai, C):
    x, y = make_data((2, C, 3, 5), every=0, seed=C)
    if C == 1:
        # a softmax over one class is the constant 1: I = P = G, the loss 0 and its gradient 0 (MONAI
        # skips the softmax for one channel, so there is nothing to compare with)
        for name in ("dice", "generalized_dice", "tversky", "dice_ce"):
            xg = x.clone().requires_grad_(True)
            loss = CALLS[name](xg, y) if name != "dice_ce" else R.dice_ce_loss(xg, y)
            loss.backward()
            assert loss.item() == 0.0 and (xg.grad == 0).all()
        return
    _close(R.dice_loss(x, y, reduction="none"), _monai(monai.DiceLoss, x, y, reduction="none").reshape(2, C))
    _close(R.tversky_loss(x, y, alpha=0.4, beta=0.6), _monai(monai.TverskyLoss, x, y, alpha=0.4, beta=0.6))
    _close(
        R.generalized_dice_loss(x.float(), y), _monai(monai.GeneralizedDiceLoss, x.float(), y), torch.float32
    )
    _close(
        R.dice_ce_loss(x, y, include_background=False),
        _monai(monai.DiceCELoss, x, y, include_background=False),
    )


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("name", CALLS)
def test_label_dtypes(name, label_dtype):
    ii = 255 if label_dtype == torch.uint8 else -100
    x, y = _data(every=5)
    y[y == -100] = ii
    want = CALLS[name](x, y, ignore_index=ii)
    torch.testing.assert_close(CALLS[name](x, y.to(label_dtype), ignore_index=ii), want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", CALLS)
def test_half_inputs_compute_in_float32(name, dtype):
    x, y = _data(dtype=dtype, every=7)
    loss = CALLS[name](x, y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, CALLS[name](x.float(), y), rtol=0, atol=0)
    xg = x.clone().requires_grad_(True)
    CALLS[name](xg, y).backward()
    assert xg.grad.dtype == dtype


# --- edge cases -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CALLS)
def test_all_ignored(name):
    # I = P = G = 0: every term is 1 - smooth_nr / smooth_dr (0 with the defaults), gradient 0
    fn = CALLS[name]
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    y = torch.full((2, 3, 3), -100)
    for reduction in _reductions(name):
        loss = fn(x, y, reduction=reduction)
        assert (loss == 0).all()
        loss.sum().backward()
        assert (x.grad == 0).all()
    # unequal smoothing: Dice 1 - 1e-5/4e-5 = 3/4 per class (MONAI's value for an empty image)
    assert R.dice_loss(x, y, smooth_dr=4e-5).item() == pytest.approx(0.75)
    assert R.generalized_dice_loss(x, y, smooth_dr=4e-5).item() == pytest.approx(0.75)
    assert R.tversky_loss(x, y, smooth_dr=4e-5, gamma=2.0).item() == pytest.approx(0.75**2)
    # smooth_nr > smooth_dr: 1 - T < 0, as it is at γ = 1 (MONAI), 0 for γ != 1
    assert R.tversky_loss(x, y, smooth_nr=2e-5).item() == pytest.approx(-1.0)
    assert R.tversky_loss(x, y, smooth_nr=2e-5, gamma=0.5).item() == 0.0
    # no smoothing at all: 0/0 is the ratio 1, loss 0 and gradient 0, not NaN
    for name2 in CALLS:
        xg = x.detach().clone().requires_grad_(True)
        loss = CALLS[name2](xg, y, smooth_nr=0.0, smooth_dr=0.0)
        loss.backward()
        assert loss.item() == 0.0 and (xg.grad == 0).all()


def test_zero_denominator_from_an_underflowed_class():
    # Class 2 absent and its probability exp(-1000) = 0: P = G = I = 0 with smooth_dr = 0. Its term is
    # 0 (ratio 1) and the gradient finite; with smoothing the term is 1 - smooth_nr/smooth_dr = 0 too.
    x, y = _data((2, 3, 4, 4), absent=False)
    y[y == 2] = 1
    x[:, 2] = -1000.0
    for name, fn in CALLS.items():
        xg = x.clone().requires_grad_(True)
        loss = fn(xg, y, smooth_nr=0.0, smooth_dr=0.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(xg.grad).all(), name
    none = R.dice_loss(x, y, smooth_nr=0.0, smooth_dr=0.0, reduction="none")
    assert (none[:, 2] == 0).all()


@pytest.mark.parametrize("name", ["dice", "tversky"])
def test_absent_class_still_pushes_its_probability_down(name):
    # G = 0, P > 0: the term is 1 - smooth_nr/(P + smooth_dr), about 1, and its gradient lowers p_c
    x, y = _data((1, 3, 4, 4), absent=False)
    y[y == 2] = 0
    xg = x.clone().requires_grad_(True)
    none = CALLS[name](xg, y, reduction="none")
    assert none[0, 2].item() == pytest.approx(1.0, abs=1e-4)
    none[0, 2].backward()
    assert (xg.grad[0, 2] > 0).all()  # gradient descent lowers the logit of the absent class


# --- gradients --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CALLS)
def test_gradcheck(name):
    # "none" (the per-class losses; "sum" for dice_ce) holds the whole Jacobian that "mean" and "sum" reduce.
    x, y = _data((2, 3, 3, 2), every=4)
    y[1][y[1] == 2] = 0  # an absent class
    x.requires_grad_(True)
    reduction = _reductions(name)[-1]
    assert torch.autograd.gradcheck(lambda t: CALLS[name](t, y, reduction=reduction, validate=False), (x,))


@pytest.mark.parametrize(
    "fn, kw",
    [
        (R.dice_loss, dict(jaccard=True, batch=True)),
        (R.dice_loss, dict(squared_pred=True)),
        (R.generalized_dice_loss, dict(w_type="simple", batch=True, include_background=False)),
        (R.tversky_loss, dict(alpha=0.8, beta=0.1, gamma=0.75, include_background=False)),
        (R.dice_ce_loss, dict(jaccard=True, include_background=False, batch=True)),
    ],
    ids=["jaccard_batch", "squared", "gdl_simple", "focal_tversky", "dice_ce_jaccard"],
)
def test_gradcheck_options(fn, kw):
    x, y = _data((2, 3, 3, 2), every=4)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fn(t, y, validate=False, **kw), (x,))


CLOSED_FORM = [
    (R.dice_loss, {}),
    (R.dice_loss, dict(jaccard=True, include_background=False)),
    (R.dice_loss, dict(squared_pred=True, batch=True, smooth_nr=1e-2, smooth_dr=3e-2)),
    (
        R.dice_loss,
        dict(weight=torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64), squared_pred=True, jaccard=True),
    ),
    (R.generalized_dice_loss, {}),
    (R.generalized_dice_loss, dict(w_type="simple", batch=True, include_background=False)),
    (R.generalized_dice_loss, dict(w_type="uniform", smooth_nr=0.1)),
    (R.tversky_loss, dict(alpha=0.3, beta=0.7)),
    (R.tversky_loss, dict(alpha=0.7, beta=0.6, gamma=2.0, batch=True)),
    (R.tversky_loss, dict(alpha=0.2, beta=0.3, gamma=0.6, include_background=False)),
    (
        R.dice_ce_loss,
        dict(
            weight=torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64),
            include_background=False,
            lambda_dice=0.7,
            lambda_ce=1.3,
        ),
    ),
    (R.dice_ce_loss, dict(jaccard=True, squared_pred=True, batch=True)),
]


@pytest.mark.parametrize("shape", [(2, 4, 5, 6), (2, 4, 2, 3, 4), (37, 4)], ids=["2d", "3d", "rows"])
@pytest.mark.parametrize("i", range(len(CLOSED_FORM)))
def test_closed_form_gradient_equals_autograd(i, shape):
    fn, kw = CLOSED_FORM[i]
    x, y = _data(shape, every=7)
    g = torch.Generator().manual_seed(i)
    for reduction in ("mean", "sum") if fn is R.dice_ce_loss else REDUCTIONS:
        xg = x.clone().requires_grad_(True)
        loss = fn(xg, y, reduction=reduction, **kw)
        upstream = torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5
        (loss * upstream).sum().backward()
        closed = R._dice_family_grad(fn, x, y, upstream, reduction=reduction, **kw)
        torch.testing.assert_close(closed, xg.grad, **F64)


def test_closed_form_all_ignored_and_zero_denominators():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    y = torch.full((2, 4), -100)
    for fn in FNS.values():
        assert (R._dice_family_grad(fn, x, y, smooth_nr=0.0, smooth_dr=0.0) == 0).all()


@pytest.mark.parametrize(
    "loss, kw",
    [
        ("dice", {}),
        ("dice", dict(jaccard=True, include_background=False)),
        ("dice", dict(weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), reduction="sum")),
        ("tversky", dict(alpha=0.2, beta=0.9, gamma=1.7)),
        ("tversky", dict(gamma=0.5, reduction="sum")),
        ("generalized_dice", {}),
        ("generalized_dice", dict(w_type="simple", include_background=False)),
    ],
)
def test_grad_coefficients_are_the_derivatives_of_the_sums(loss, kw):
    # ∂L/∂I and ∂L/∂P from the sums alone equal autograd through the loss's formula of the sums.
    x, y = _data((3, 3, 4, 4), every=5)
    y[2] = 0  # image 2: classes 1 and 2 absent
    px = R._Pixels(x, y, -100)
    sums = R._dice_sums(px, 3, False)
    I = sums.intersection.clone().requires_grad_(True)
    P = sums.prediction.clone().requires_grad_(True)
    s = R.DiceSums(I, P, sums.ground)
    ib = kw.get("include_background", True)
    kept = R._drop_background(s, ib)
    reduction = kw.get("reduction", "mean")
    if loss == "dice":
        terms = R._dice_terms(kept, kw.get("jaccard", False), 1e-5, 1e-5)
        if "weight" in kw:
            terms = terms * kw["weight"]
    elif loss == "tversky":
        terms = R._tversky_terms(kept, kw.get("alpha", 0.5), kw.get("beta", 0.5), kw["gamma"], 1e-5, 1e-5)
    else:
        terms = R._gdl_terms(kept, kw.get("w_type", "square"), 1e-5, 1e-5)
    (terms.sum() if reduction == "sum" else terms.mean()).backward()
    coef = R._dice_grad_coefficients(sums, loss, **kw)
    torch.testing.assert_close(coef.d_intersection, I.grad, **F64)
    torch.testing.assert_close(coef.d_prediction, P.grad, **F64)
    if not ib:
        assert (coef.d_intersection[:, 0] == 0).all() and (coef.d_prediction[:, 0] == 0).all()


# --- arguments ------------------------------------------------------------------------------------


def test_confusion_argument():
    x, y = _data(every=7)
    want = R.confusion_matrix(x, y)
    for name, fn in CALLS.items():
        conf = torch.zeros(4, 4, dtype=torch.int64)
        fn(x, y, confusion=conf)
        assert torch.equal(conf, want), name


def test_validate_false_skips_the_weight_check():
    x, y = _data()
    w = torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    want = (R.dice_loss(x, y, reduction="none") * w).mean()
    torch.testing.assert_close(R.dice_loss(x, y, w, validate=False), want, **F64)


W4 = torch.ones(4, dtype=torch.float64)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda x, y: R.dice_loss(x, y, reduction="avg"), ValueError, "reduction"),
        (lambda x, y: R.generalized_dice_loss(x, y, reduction="batchmean"), ValueError, "reduction"),
        (lambda x, y: R.tversky_loss(x, y, reduction=None), ValueError, "reduction"),
        (lambda x, y: R.dice_ce_loss(x, y, reduction="none"), ValueError, "'mean' or 'sum'"),
        (lambda x, y: R.dice_ce_loss(x, y, reduction="avg"), ValueError, "reduction"),
        (lambda x, y: R.dice_loss(x, y, torch.ones(3)), ValueError, r"weight must have shape \(4,\)"),
        (
            lambda x, y: R.dice_loss(x, y, W4, include_background=False),
            ValueError,
            r"weight must have shape \(3,\) for 4 classes \(include_background=False",
        ),
        (
            lambda x, y: R.dice_ce_loss(x, y, weight=torch.ones(3), include_background=False),
            ValueError,
            r"weight must have shape \(4,\)",
        ),
        (
            lambda x, y: R.dice_loss(x, y, torch.tensor([1.0, -0.5, 1.0, 1.0])),
            ValueError,
            "weight must be finite and >= 0",
        ),
        (
            lambda x, y: R.dice_ce_loss(x, y, weight=torch.tensor([1.0, float("nan"), 1.0, 1.0])),
            ValueError,
            "weight must be finite",
        ),
        (lambda x, y: R.dice_loss(x, y, torch.ones(4, dtype=torch.int64)), TypeError, "floating-point"),
        (lambda x, y: R.generalized_dice_loss(x, y, w_type="cube"), ValueError, "w_type"),
        (lambda x, y: R.tversky_loss(x, y, alpha=-0.1), ValueError, "alpha"),
        (lambda x, y: R.tversky_loss(x, y, beta=float("nan")), ValueError, "beta"),
        (lambda x, y: R.tversky_loss(x, y, gamma=0.0), ValueError, "gamma must be a finite number > 0"),
        (lambda x, y: R.tversky_loss(x, y, gamma=-1.0), ValueError, "gamma"),
        (lambda x, y: R.tversky_loss(x, y, gamma=float("inf")), ValueError, "gamma"),
        (lambda x, y: R.tversky_loss(x, y, alpha="0.5"), TypeError, "alpha must be a number"),
        (lambda x, y: R.dice_loss(x, y, smooth_nr=-1e-5), ValueError, "smooth_nr"),
        (lambda x, y: R.tversky_loss(x, y, smooth_dr=-1.0), ValueError, "smooth_dr"),
        (lambda x, y: R.generalized_dice_loss(x, y, smooth_dr=float("nan")), ValueError, "smooth_dr"),
        (lambda x, y: R.dice_ce_loss(x, y, smooth_nr=float("inf")), ValueError, "smooth_nr"),
        (lambda x, y: R.dice_ce_loss(x, y, lambda_dice=-1.0), ValueError, "lambda_dice"),
        (lambda x, y: R.dice_ce_loss(x, y, lambda_ce=float("nan")), ValueError, "lambda_ce"),
        (
            lambda x, y: R.dice_loss(x, y, include_background=None),
            TypeError,
            "include_background must be a bool",
        ),
        (lambda x, y: R.dice_loss(x, y, batch=1), TypeError, "batch must be a bool"),
        (lambda x, y: R.dice_loss(x, y, jaccard="yes"), TypeError, "jaccard"),
        (lambda x, y: R.dice_ce_loss(x, y, squared_pred=1), TypeError, "squared_pred"),
        (
            lambda x, y: R.dice_loss(x[:, :1], y.clamp(max=0), include_background=False),
            ValueError,
            "at least 2 classes",
        ),
        (
            lambda x, y: R.generalized_dice_loss(x[:, :1], y.clamp(max=0), include_background=False),
            ValueError,
            "at least 2 classes",
        ),
        (
            lambda x, y: R.tversky_loss(x[:, :1], y.clamp(max=0), include_background=False),
            ValueError,
            "at least 2 classes",
        ),
        (
            lambda x, y: R.dice_ce_loss(x[:, :1], y.clamp(max=0), include_background=False),
            ValueError,
            "at least 2 classes",
        ),
        (lambda x, y: R.dice_loss(x, y.masked_fill(y == 3, 9)), ValueError, "label 9"),
        (lambda x, y: R.dice_ce_loss(x, y[:, :2]), ValueError, "does not match"),
        (
            lambda x, y: R.tversky_loss(x, y, confusion=torch.zeros(3, 3, dtype=torch.int64)),
            ValueError,
            "confusion",
        ),
    ],
)
def test_bad_input_errors(call, exc, match):
    x, y = _data()
    with pytest.raises(exc, match=match):
        call(x, y)
