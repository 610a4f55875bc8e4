"""The OHEM cross-entropy reference (``reference.ohem_cross_entropy``, docs/DESIGN.md §13) against the code
it follows, transcribed below from the published sources, and the sort rule on constructed ties,
edge ranks, empty and all-ignored inputs, reductions, gradients, dtypes and layouts."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fused_imbalance.reference as R
from fused_imbalance.ops import acc_dtype
from cases import to_layout
from tolerances import LOSS_TOL, TOL

REDUCTIONS = ("mean", "sum", "none")
CONVENTIONS = ("hrnet", "mmseg")


# --- the published code, transcribed ---------------------------------------------------------


def hrnet_ohem(score, target, ignore_label=-1, thres=0.7, min_kept=100000, weight=None, align_corners=False):
    """HRNet-Semantic-Segmentation, ``lib/core/criterion.py`` (master), ``OhemCrossEntropy``:
    ``__init__`` and ``_ohem_forward`` transcribed; ``config.MODEL.ALIGN_CORNERS`` is
    ``align_corners``."""
    thresh = thres
    min_kept = max(1, min_kept)
    criterion = nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_label, reduction='none')

    ph, pw = score.size(2), score.size(3)
    h, w = target.size(1), target.size(2)
    if ph != h or pw != w:
        score = F.interpolate(input=score, size=(h, w), mode='bilinear', align_corners=align_corners)
    pred = F.softmax(score, dim=1)
    pixel_losses = criterion(score, target).contiguous().view(-1)
    mask = target.contiguous().view(-1) != ignore_label

    tmp_target = target.clone()
    tmp_target[tmp_target == ignore_label] = 0
    pred = pred.gather(1, tmp_target.unsqueeze(1))
    pred, ind = (
        pred.contiguous()
        .view(
            -1,
        )[mask]
        .contiguous()
        .sort()
    )
    min_value = pred[min(min_kept, pred.numel() - 1)]
    threshold = max(min_value, thresh)

    pixel_losses = pixel_losses[mask][ind]
    pixel_losses = pixel_losses[pred < threshold]
    return pixel_losses.mean()


def mmseg_ohem(
    seg_logit,
    seg_label,
    ignore_index=255,
    thresh=0.7,
    min_kept=100000,
    class_weight=None,
    reduction="mean",
    align_corners=False,
):
    """mmsegmentation as a decode head with ``sampler=dict(type='OHEMPixelSampler', thresh, min_kept)``
    and the default ``CrossEntropyLoss`` computes it:
    ``mmseg/models/decode_heads/decode_head.py`` ``loss_by_feat`` (resize, sample, loss),
    ``mmseg/structures/sampler/ohem_pixel_sampler.py`` ``OHEMPixelSampler.sample`` (the
    ``thresh is not None`` branch), ``mmseg/models/losses/cross_entropy_loss.py`` ``cross_entropy``
    with ``avg_non_ignore=False`` and ``mmseg/models/losses/utils.py`` ``weight_reduce_loss``."""
    seg_label = seg_label.unsqueeze(1)  # (N, 1, H, W), as _stack_batch_gt gives it
    # loss_by_feat: mmseg's resize is F.interpolate
    seg_logit = F.interpolate(
        seg_logit, size=seg_label.shape[2:], mode='bilinear', align_corners=align_corners
    )

    # OHEMPixelSampler.sample
    assert min_kept > 1  # OHEMPixelSampler.__init__
    with torch.no_grad():
        assert seg_logit.shape[2:] == seg_label.shape[2:]
        assert seg_label.shape[1] == 1
        label = seg_label.squeeze(1).long()
        batch_kept = min_kept * label.size(0)
        valid_mask = label != ignore_index
        seg_weight = seg_logit.new_zeros(size=label.size())
        valid_seg_weight = seg_weight[valid_mask]
        seg_prob = F.softmax(seg_logit, dim=1)

        tmp_seg_label = label.clone().unsqueeze(1)
        tmp_seg_label[tmp_seg_label == ignore_index] = 0
        seg_prob = seg_prob.gather(1, tmp_seg_label).squeeze(1)
        sort_prob, sort_indices = seg_prob[valid_mask].sort()

        if sort_prob.numel() > 0:
            min_threshold = sort_prob[min(batch_kept, sort_prob.numel() - 1)]
        else:
            min_threshold = 0.0
        threshold = max(min_threshold, thresh)
        valid_seg_weight[seg_prob[valid_mask] < threshold] = 1.0
        seg_weight[valid_mask] = valid_seg_weight

    seg_label = seg_label.squeeze(1)
    # cross_entropy + weight_reduce_loss (avg_factor None, avg_non_ignore False)
    loss = F.cross_entropy(
        seg_logit, seg_label, weight=class_weight, reduction='none', ignore_index=ignore_index
    )
    loss = loss * seg_weight
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


# --- inputs and the sort rule -----------------------------------------------------------------


def data(shape=(2, 5, 4, 6), dtype=torch.float64, seed=0, ignore=255, every=7, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, shape[1], (shape[0],) + tuple(shape[2:]), generator=g)
    if every:
        y.view(-1)[::every] = ignore
    return x, y


def label_prob(x, y, ignore):
    """(p, valid) per pixel, flattened: the softmax probability of the label, in the accumulation dtype."""
    acc = acc_dtype(x)
    C = x.shape[1]
    rows = x.movedim(1, -1).reshape(-1, C).to(acc)
    yl = y.reshape(-1).long()
    valid = yl != ignore
    return torch.softmax(rows, 1).gather(1, torch.where(valid, yl, 0)[:, None]).squeeze(1), valid


def sort_rule(p, valid, rank, thresh):
    """The kept set by the definition: sort the valid probabilities, take the one at rank
    min(rank, n_valid - 1), keep the valid pixels strictly below max(it, thresh)."""
    ranked = p[valid].sort().values
    if ranked.numel() == 0:
        return torch.zeros_like(valid)
    threshold = max(ranked[min(rank, ranked.numel() - 1)], torch.tensor(thresh, dtype=p.dtype))
    return valid & (p < threshold)


def kept_of(x, y, ignore, **kw):
    """The kept set of the reference, read from reduction="none" (every kept pixel has p < 1, so a
    positive loss, on the inputs used with it)."""
    return R.ohem_cross_entropy(x, y, ignore_index=ignore, reduction="none", **kw).reshape(-1) != 0


# --- against the published code ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "thresh, min_kept", [(0.7, 100000), (0.3, 20), (0.0, 30), (0.9, 1), (1.0, 0), (0.5, 5)]
)
@pytest.mark.parametrize("use_weight", [False, True])
def test_hrnet_equals_published_code(dtype, thresh, min_kept, use_weight):
    x, y = data(dtype=dtype)
    w = torch.linspace(0.5, 2.0, 5, dtype=dtype) if use_weight else None
    want = hrnet_ohem(x, y, ignore_label=255, thres=thresh, min_kept=min_kept, weight=w)
    got = R.ohem_cross_entropy(x, y, thresh, min_kept, w, ignore_index=255)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("align_corners", [False, True])
def test_hrnet_interpolates_first(align_corners):
    """HRNet resizes smaller logits to the labels first: the reference on ``upsampled`` logits."""
    x, _ = data(shape=(2, 5, 3, 4), seed=1)
    _, y = data(shape=(2, 5, 7, 9), seed=2)
    want = hrnet_ohem(x, y, ignore_label=255, thres=0.6, min_kept=40, align_corners=align_corners)
    xu = R.upsampled(x, y.shape[-2:], "bilinear", align_corners)
    torch.testing.assert_close(R.ohem_cross_entropy(xu, y, 0.6, 40, ignore_index=255), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("thresh, min_kept", [(0.7, 100000), (0.3, 8), (0.0, 10), (0.9, 2), (0.5, 3)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mmseg_equals_published_code(dtype, thresh, min_kept, reduction):
    x, y = data(dtype=dtype, shape=(3, 5, 4, 6))
    w = torch.linspace(0.5, 2.0, 5, dtype=dtype)
    want = mmseg_ohem(x, y, 255, thresh, min_kept, w, reduction)
    got = R.ohem_cross_entropy(
        x, y, thresh, min_kept, w, ignore_index=255, reduction=reduction, convention="mmseg"
    )
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_mmseg_resizes_first():
    x, _ = data(shape=(2, 5, 3, 4), seed=3)
    _, y = data(shape=(2, 5, 6, 8), seed=4)
    want = mmseg_ohem(x, y, 255, 0.5, 6, align_corners=True)
    xu = R.upsampled(x, y.shape[-2:], "bilinear", align_corners=True)
    torch.testing.assert_close(
        R.ohem_cross_entropy(xu, y, 0.5, 6, ignore_index=255, convention="mmseg"), want
    )


def test_the_conventions_differ_where_their_code_does():
    """HRNet ranks max(1, min_kept) over the batch and divides by the kept pixels; mmsegmentation
    ranks min_kept·B and divides by every pixel: equal sums at rank 2B vs rank 2 only when
    the ranks agree."""
    x, y = data(shape=(3, 5, 4, 6))
    kw = dict(ignore_index=255)
    s_h = R.ohem_cross_entropy(x, y, 0.0, 6, reduction="sum", **kw)
    s_m = R.ohem_cross_entropy(x, y, 0.0, 2, reduction="sum", convention="mmseg", **kw)
    torch.testing.assert_close(s_h, s_m)  # rank 6 = 2 · B
    n_kept = kept_of(x, y, 255, thresh=0.0, min_kept=6).sum()
    torch.testing.assert_close(R.ohem_cross_entropy(x, y, 0.0, 6, **kw), s_h / n_kept)
    torch.testing.assert_close(R.ohem_cross_entropy(x, y, 0.0, 2, convention="mmseg", **kw), s_m / y.numel())


# --- the kept set: the sort rule, ties, edge ranks ----------------------------------------------


def tied(dtype=torch.float32):
    """Logits with exact ties: every pixel's row is one of four rows, so its label probability is
    one of a few values, each taken by several pixels (equal rows give equal softmax bits)."""
    rows = torch.tensor(
        [[0.0, 1.0, 2.0], [0.5, 0.5, 0.0], [3.0, -1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64
    )
    g = torch.Generator().manual_seed(5)
    pick = torch.randint(0, 4, (2 * 5 * 6,), generator=g)
    y = torch.randint(0, 3, (2 * 5 * 6,), generator=g)
    y[::9] = 255
    x = rows[pick].reshape(2, 5, 6, 3).movedim(-1, 1).to(dtype)
    return x, y.reshape(2, 5, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_kept_set_is_the_sort_rule_with_ties(dtype, convention):
    x, y = tied(dtype)
    p, valid = label_prob(x, y, 255)
    values = p[valid].unique()
    assert values.numel() >= 6 and p[valid].numel() > 2 * values.numel()  # ties everywhere
    ranked = p[valid].sort().values
    n_valid = ranked.numel()
    seen_tie = False
    for min_kept in [0, 1, 2, 3, 7, 15, 20, n_valid - 1, n_valid, 10 * n_valid]:
        rank = R.ohem_rank(min_kept, x.shape[0], convention)
        i = min(rank, n_valid - 1)
        seen_tie |= 0 < i < n_valid - 1 and bool(ranked[i - 1] == ranked[i])
        for thresh in [0.0, 0.2, float(ranked[i]), 1.0]:
            kept = kept_of(x, y, 255, thresh=thresh, min_kept=min_kept, convention=convention)
            want = sort_rule(p, valid, rank, thresh)
            assert torch.equal(kept, want), (min_kept, thresh)
            # nothing tied with the threshold is kept, and the kept set is a prefix of the sort
            assert not (kept & (p == max(ranked[i].item(), thresh))).any()
            assert kept.sum() <= max(i, (ranked < thresh).sum())
    assert seen_tie  # some rank fell inside a run of equal values


def test_thresh_tie_is_not_kept():
    """p = 1/2 exactly (two equal logits) at thresh = 0.5: not below the threshold, not kept."""
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    y = torch.tensor([0, 1, 0, 1])  # p = 1/2, 1/2, small, small
    out = R.ohem_cross_entropy(x, y, 0.5, 1, reduction="none")
    assert (out[:2] == 0).all() and (out[2:] > 0).all()
    # a thresh just above 1/2 keeps them
    assert (R.ohem_cross_entropy(x, y, 0.5000001, 1, reduction="none") > 0).all()


def test_min_kept_at_least_n_valid_keeps_all_below_the_largest():
    x, y = data(shape=(1, 4, 3, 5), seed=6, every=4)
    p, valid = label_prob(x, y, 255)
    n_valid = int(valid.sum())
    for min_kept in (n_valid - 1, n_valid, n_valid + 5):
        kept = kept_of(x, y, 255, thresh=0.0, min_kept=min_kept)
        assert torch.equal(kept, valid & (p < p[valid].max()))
        assert int(kept.sum()) == n_valid - 1
        want = hrnet_ohem(x, y, 255, 0.0, min_kept)
        torch.testing.assert_close(R.ohem_cross_entropy(x, y, 0.0, min_kept, ignore_index=255), want)


def test_min_kept_zero():
    """HRNet takes max(1, min_kept); mmsegmentation ranks min_kept·B = 0 (its sampler asserts
    min_kept > 1; the formula is the same there): the smallest probability sets the threshold."""
    x, y = data(shape=(2, 4, 3, 5), seed=7)
    p, valid = label_prob(x, y, 255)
    assert torch.equal(kept_of(x, y, 255, thresh=0.0, min_kept=0), kept_of(x, y, 255, thresh=0.0, min_kept=1))
    assert int(kept_of(x, y, 255, thresh=0.0, min_kept=0).sum()) == 1
    assert not kept_of(x, y, 255, thresh=0.0, min_kept=0, convention="mmseg").any()
    kept = kept_of(x, y, 255, thresh=0.4, min_kept=0, convention="mmseg")
    assert torch.equal(kept, valid & (p < 0.4)) and kept.any()


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_kept_set_is_zero_with_zero_gradient(convention, reduction):
    """Every valid pixel has the same probability and thresh = 0: nothing lies strictly below the
    threshold. HRNet's code returns the mean of nothing, NaN; here 0 and a zero gradient."""
    x = torch.zeros(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (2, 4, 4))
    loss = R.ohem_cross_entropy(x, y, 0.0, 5, reduction=reduction, convention=convention)
    assert (loss == 0).all()
    loss.sum().backward()
    assert (x.grad == 0).all()
    assert hrnet_ohem(x.detach(), y, thres=0.0, min_kept=5).isnan()


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_is_zero_with_zero_gradient(convention, reduction):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.full((2, 4, 4), 255)
    loss = R.ohem_cross_entropy(x, y, 0.7, 10, ignore_index=255, reduction=reduction, convention=convention)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    loss.sum().backward()
    assert (x.grad == 0).all()
    with pytest.raises(IndexError):  # HRNet's code indexes an empty sort
        hrnet_ohem(x.detach(), y, ignore_label=255)
    assert mmseg_ohem(x.detach(), y, 255, 0.7, 10) == 0


def test_no_pixel_at_all():
    x = torch.zeros(0, 3, 4, 4, requires_grad=True)
    y = torch.zeros(0, 4, 4, dtype=torch.long)
    for convention in CONVENTIONS:
        for reduction in ("mean", "sum"):
            assert R.ohem_cross_entropy(x, y, convention=convention, reduction=reduction) == 0
        assert R.ohem_cross_entropy(x, y, convention=convention, reduction="none").shape == (0, 4, 4)


def test_nan_probability_at_the_rank_keeps_nothing():
    """A NaN logit gives NaN probabilities; sorted last, as by HRNet's sort. Reached by the rank it
    makes the threshold NaN and nothing is kept, as in HRNet's code (max(NaN, thresh) is NaN)."""
    x = torch.tensor([[0.0, 1.0], [2.0, 0.0], [float("nan"), 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0])
    assert R.ohem_cross_entropy(x, y, 0.9, 1, reduction="sum") > 0  # rank 1: the finite 0.88
    assert R.ohem_cross_entropy(x, y, 0.9, 2, reduction="sum") == 0  # rank 2: NaN
    x4, y4 = x.t()[None, :, :, None], y[None, :, None]  # (1, C, 3, 1) for HRNet's 4-D code
    assert hrnet_ohem(x4, y4, -1, 0.9, 1) > 0
    assert hrnet_ohem(x4, y4, -1, 0.9, 2).isnan()  # the mean of nothing


# --- reductions, weights ----------------------------------------------------------------------


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_reductions_agree(convention):
    x, y = data(seed=8)
    w = torch.linspace(0.2, 3.0, 5, dtype=torch.float64)
    kw = dict(thresh=0.5, min_kept=12, weight=w, ignore_index=255, convention=convention)
    none = R.ohem_cross_entropy(x, y, reduction="none", **kw)
    p, valid = label_prob(x, y, 255)
    kept = sort_rule(p, valid, R.ohem_rank(12, 2, convention), 0.5).reshape(y.shape)
    ce = F.cross_entropy(x, y, w, ignore_index=255, reduction="none")  # w_y (-log p_y)
    torch.testing.assert_close(none, torch.where(kept, ce, 0.0))
    total = R.ohem_cross_entropy(x, y, reduction="sum", **kw)
    torch.testing.assert_close(total, none.sum())
    denom = kept.sum() if convention == "hrnet" else y.numel()
    torch.testing.assert_close(R.ohem_cross_entropy(x, y, **kw), total / denom)


def test_mean_divides_by_kept_pixels_not_weights():
    x, y = data(seed=9)
    w = torch.full((5,), 3.0, dtype=torch.float64)
    torch.testing.assert_close(
        R.ohem_cross_entropy(x, y, 0.6, 4, w, 255), 3 * R.ohem_cross_entropy(x, y, 0.6, 4, None, 255)
    )


# --- gradients --------------------------------------------------------------------------------


def _away_from_the_threshold(x, y, rank, ignore=255):
    """A thresh in the widest gap of the sorted probabilities above the rank's, so that a small
    perturbation of the logits changes no pixel's side of the threshold."""
    p, valid = label_prob(x, y, ignore)
    ranked = p[valid].sort().values
    gaps = ranked[1:] - ranked[:-1]
    assert gaps.min() > 1e-4  # the rank's value itself is separated from its neighbours
    j = rank + int(gaps[rank:].argmax())
    return float((ranked[j] + ranked[j + 1]) / 2)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("use_thresh", [False, True])
def test_gradcheck(convention, reduction, use_thresh):
    x, y = data(shape=(2, 4, 3, 4), seed=10, every=5)
    w = torch.linspace(0.5, 2.0, 4, dtype=torch.float64)
    min_kept = 3 if convention == "mmseg" else 6
    thresh = _away_from_the_threshold(x, y, R.ohem_rank(min_kept, 2, convention)) if use_thresh else 0.0
    x.requires_grad_(True)
    fn = lambda t: R.ohem_cross_entropy(t, y, thresh, min_kept, w, 255, reduction, convention=convention)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=reduction == "none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_equals_published_code(dtype):
    x, y = data(seed=11, dtype=dtype)
    w = torch.linspace(0.5, 2.0, 5, dtype=dtype)
    xh = x.clone().requires_grad_(True)
    hrnet_ohem(xh, y, 255, 0.6, 9, w).backward()
    xr = x.clone().requires_grad_(True)
    R.ohem_cross_entropy(xr, y, 0.6, 9, w, 255).backward()
    torch.testing.assert_close(xr.grad, xh.grad, **TOL[dtype])
    xm = x.clone().requires_grad_(True)
    mmseg_ohem(xm, y, 255, 0.6, 4, w).backward()
    xr.grad = None
    R.ohem_cross_entropy(xr, y, 0.6, 4, w, 255, convention="mmseg").backward()
    torch.testing.assert_close(xr.grad, xm.grad, **TOL[dtype])


def test_no_gradient_through_the_selection_at_p_zero():
    """A pixel left out with p_y = 0 has an infinite loss: it gets a zero gradient, not NaN."""
    x = torch.tensor([[0.0, 800.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 0])  # p = 0, 1/2, 0.73
    loss = R.ohem_cross_entropy(x, y, 0.0, 0, convention="mmseg")  # threshold = p_min = 0: nothing kept
    loss.backward()
    assert loss == 0 and (x.grad == 0).all()


# --- dtypes, layouts, labels, confusion ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    x, y = data(dtype=dtype)
    loss = R.ohem_cross_entropy(x, y, 0.6, 10, ignore_index=255)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(
        loss, R.ohem_cross_entropy(x.float(), y, 0.6, 10, ignore_index=255), rtol=0, atol=0
    )
    x.requires_grad_(True)
    R.ohem_cross_entropy(x, y, 0.6, 10, ignore_index=255).backward()
    assert x.grad.dtype == dtype


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("shape", [(2, 5, 4, 6), (2, 4, 3, 2, 5)])
def test_layouts_equal_contiguous(convention, shape):
    x, y = data(shape=shape, seed=12)
    kw = dict(thresh=0.5, min_kept=7, ignore_index=255, convention=convention)
    ref = R.ohem_cross_entropy(x, y, reduction="none", **kw)
    torch.testing.assert_close(
        R.ohem_cross_entropy(to_layout(x, "channels_last"), y, reduction="none", **kw), ref
    )
    if convention == "hrnet":  # as (N, C) rows every row is an image: mmseg's rank would change
        rows = R.ohem_cross_entropy(to_layout(x, "rows"), y.reshape(-1), reduction="none", **kw)
        torch.testing.assert_close(rows, ref.reshape(-1))


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_label_dtypes(label_dtype):
    x, y = data(seed=13)
    want = R.ohem_cross_entropy(x, y, 0.5, 9, ignore_index=255)
    torch.testing.assert_close(R.ohem_cross_entropy(x, y.to(label_dtype), 0.5, 9, ignore_index=255), want)


def test_confusion_counts_every_valid_pixel():
    x, y = data(seed=14)
    conf = torch.zeros(5, 5, dtype=torch.int64)
    R.ohem_cross_entropy(x, y, 0.0, 3, ignore_index=255, confusion=conf)
    assert torch.equal(conf, R.confusion_matrix(x, y, ignore_index=255))


def test_bad_label_names_the_value():
    x, y = data(seed=15)
    y[0, 1, 1] = 17
    with pytest.raises(ValueError, match="17"):
        R.ohem_cross_entropy(x, y, ignore_index=255)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(thresh=None), TypeError, "thresh=None"),
        (dict(thresh="0.7"), TypeError, "thresh must be a number"),
        (dict(thresh=True), TypeError, "thresh must be a number"),
        (dict(thresh=1.5), ValueError, r"thresh must be in \[0, 1\]"),
        (dict(thresh=-0.1), ValueError, r"thresh must be in \[0, 1\]"),
        (dict(thresh=float("nan")), ValueError, r"thresh must be in \[0, 1\]"),
        (dict(min_kept=-1), ValueError, "min_kept must be an int >= 0"),
        (dict(min_kept=1e5), TypeError, "min_kept must be an int"),
        (dict(min_kept=True), TypeError, "min_kept must be an int"),
        (dict(convention="torch"), ValueError, "convention must be one of"),
        (dict(weight=torch.ones(4)), ValueError, r"weight must have shape \(5,\)"),
        (dict(reduction="avg"), ValueError, "reduction"),
    ],
)
def test_bad_options(kw, exc, match):
    x, y = data()
    with pytest.raises(exc, match=match):
        R.ohem_cross_entropy(x, y, ignore_index=255, **kw)


def test_compiles_as_one_graph():
    """No data-dependent shape: the reference compiles with fullgraph=True and gives the same value."""
    x, y = data(seed=16, dtype=torch.float32)
    for convention in CONVENTIONS:

        def f(x, y):
            return R.ohem_cross_entropy(x, y, 0.6, 8, ignore_index=255, convention=convention)

        torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, y), f(x, y), **LOSS_TOL[torch.float32])
