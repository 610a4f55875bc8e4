"""The C++ backend's ops themselves (fused_imbalance.ops.cpp), against the contract computed from the
reference (tests/contract.py, in float64).

test_losses.py and test_robustness.py run every loss through the functional API on this backend;
here the raw ops are checked on what only they see: each mode and γ, every output of the
contract (per-pixel and per-class losses, counts, true positives, bad labels, confusion),
the backward with both incoming gradients, block and chunk boundaries, memory layouts and
strides, numerics at the edges, opcheck, the exact selection's chunks, and the build/fallback
machinery. Their torch.compile is in test_compile.py; bit-identical results across runs, thread
counts and instruction-set copies in test_determinism.py.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import contract
from fused_imbalance.ops import Mode, Reduction, Weighting, acc_dtype
from fused_imbalance.ops import dice as DICE
from fused_imbalance.ops import ohem as OHEM
from fused_imbalance.ops import select as SEL
from test_select import _available, check, histogram_of
from tolerances import LOSS_TOL, TOL

cpp = pytest.importorskip("fused_imbalance.ops.cpp")
if not cpp.available():
    pytest.skip("the C++ backend could not be built here", allow_module_level=True)

BE = cpp.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = [Mode.SOFTMAX_FOCAL, Mode.SIGMOID_FOCAL, Mode.MSE_LOGITS, Mode.MSE_SOFTMAX, Mode.STATS]
MEAN, SUM, NONE, CLASS = (int(r) for r in Reduction)


# --- inputs ---------------------------------------------------------------------------------------


def make(shape, dtype=torch.float32, label_dtype=torch.int64, seed=0, ignore_index=-100, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    C = shape[1]
    lshape = (shape[0],) + tuple(shape[2:])
    y = torch.randint(0, C, lshape, generator=g)
    y.view(-1)[::7] = ignore_index
    tvals = torch.arange(1, C + 1, dtype=torch.float64) * 0.75
    return x, y.to(label_dtype), tvals


def layout(x, name):
    if name == "nchw":
        return x.contiguous()
    if name == "channels_last":
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    if name == "rows_transposed":  # (N, C) with the pixels contiguous per class: class stride N
        return x.t().contiguous().t()
    if name == "channel_slice":  # not dense: classes 1.. of a wider tensor
        wide = torch.cat([x[:, :1], x], 1)
        return wide[:, 1:]
    if name == "not_collapsible":  # spatial dims that no single stride describes
        return x.transpose(2, 3).contiguous().transpose(2, 3)[:, :, :, 1:]
    raise ValueError(name)


def fwd(
    x,
    target,
    mode,
    gamma=0.0,
    tvals=None,
    ignore_index=-100,
    reduction=NONE,
    weighting=0,
    weight=None,
    confusion=None,
    need_tp=True,
    validate=False,
):
    return BE.fwd(
        x,
        target,
        weight,
        tvals,
        confusion,
        int(mode),
        gamma,
        ignore_index,
        reduction,
        int(weighting),
        need_tp,
        validate,
        False,
    )


def check_fwd(x, y, mode, gamma=0.0, tvals=None, ignore_index=-100, confusion=True):
    C = x.shape[1]
    tv = tvals.to(acc_dtype(x)) if mode in (Mode.MSE_LOGITS, Mode.MSE_SOFTMAX) else None
    target = y.reshape(-1)
    pixel, class_loss, count, tp, bad, conf = contract.per_pixel_and_class(
        BE.fwd, x, target, mode, gamma, tv, ignore_index, True, confusion
    )
    want = contract.forward(
        x.double(), target, None, tvals, mode, gamma, ignore_index, Reduction.CLASS, Weighting.NONE
    )
    pl_want = contract.pixel_loss(x.double(), target, mode, gamma, tvals, ignore_index)
    assert pixel.dtype == class_loss.dtype == acc_dtype(x)
    assert pixel.shape == (target.numel(),) and class_loss.shape == (C,)
    tol = LOSS_TOL[x.dtype]
    torch.testing.assert_close(pixel.double(), pl_want, **tol)
    torch.testing.assert_close(
        class_loss.double(), want[0], atol=tol["atol"] * max(1, target.numel()), rtol=tol["rtol"]
    )
    assert torch.equal(count, want[2]) and torch.equal(tp, want[3]) and bad.item() == want[4].item()
    if confusion:
        assert torch.equal(conf, want[5])
    if mode != Mode.STATS:  # the weighted mean, and its backward factor, from the same pass
        w = torch.linspace(0.5, 2.0, C, dtype=acc_dtype(x))
        loss, scale, *_ = fwd(x, target, mode, gamma, tv, ignore_index, MEAN, Weighting.GENERAL, w)
        wl, ws, *_ = contract.forward(
            x.double(),
            target,
            w.double(),
            tvals,
            mode,
            gamma,
            ignore_index,
            Reduction.MEAN,
            Weighting.GENERAL,
        )
        assert loss.shape == () and scale.shape == (C,)
        torch.testing.assert_close(loss.double(), wl, **tol)
        torch.testing.assert_close(scale.double(), ws, **tol)
    return pixel, class_loss


def check_bwd(x, y, mode, gamma=0.0, tvals=None, ignore_index=-100, seed=1):
    """The backward against autograd of the reference, for a per-pixel upstream gradient, a per-class
    factor alone, and a scalar upstream gradient with a factor (a weighted mean)."""
    C = x.shape[1]
    target = y.reshape(-1)
    g = torch.Generator().manual_seed(seed)
    acc = acc_dtype(x)
    gp = torch.randn(target.numel(), generator=g, dtype=torch.float64).to(acc)
    gc = torch.randn(C, generator=g, dtype=torch.float64).to(acc)
    tv = tvals.to(acc) if mode in (Mode.MSE_LOGITS, Mode.MSE_SOFTMAX) else None
    for up, scale in [(gp, None), (None, gc), (torch.tensor(0.75, dtype=acc), gc)]:
        grad = BE.bwd(x, target, up, scale, tv, None, int(mode), gamma, ignore_index)
        assert grad.dtype == x.dtype and grad.shape == x.shape
        if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
            assert grad.stride() == x.stride()
        want = contract.grad(x.double(), target, up, scale, mode, gamma, tvals, ignore_index)
        torch.testing.assert_close(grad.double(), want, **TOL[x.dtype])
    return grad


# --- every mode and γ, every layout, dtype and label dtype ----------------------------------------

CASES = [
    (Mode.SOFTMAX_FOCAL, 0.0),
    (Mode.SOFTMAX_FOCAL, 0.5),
    (Mode.SOFTMAX_FOCAL, 1.0),
    (Mode.SOFTMAX_FOCAL, 2.0),
    (Mode.SOFTMAX_FOCAL, 2.5),
    (Mode.SIGMOID_FOCAL, 0.0),
    (Mode.SIGMOID_FOCAL, 1.0),
    (Mode.SIGMOID_FOCAL, 2.0),
    (Mode.SIGMOID_FOCAL, 1.5),
    (Mode.MSE_LOGITS, 0.0),
    (Mode.MSE_SOFTMAX, 0.0),
    (Mode.STATS, 0.0),
]


@pytest.mark.parametrize("mode, gamma", CASES)
@pytest.mark.parametrize(
    "shape, lay",
    [
        ((2, 5, 7, 13), "nchw"),
        ((2, 5, 7, 13), "channels_last"),
        ((91, 6), "nchw"),
        ((91, 6), "rows_transposed"),
        ((2, 3, 3, 4, 5), "nchw"),
        ((2, 3, 3, 4, 5), "channels_last"),
        ((2, 4, 6, 5), "channel_slice"),
        ((2, 4, 6, 5), "not_collapsible"),
        ((3, 2, 1, 1), "nchw"),
        ((4, 1, 3, 3), "nchw"),
    ],
)
def test_modes_layouts(mode, gamma, shape, lay):
    x, y, tvals = make(shape)
    x = layout(x, lay)
    if lay == "not_collapsible":
        y = y[:, :, 1:]
    check_fwd(x, y, mode, gamma, tvals)
    check_bwd(x, y, mode, gamma, tvals)


@pytest.mark.parametrize(
    "mode, gamma",
    [(Mode.SOFTMAX_FOCAL, 1.5), (Mode.SIGMOID_FOCAL, 2.0), (Mode.MSE_LOGITS, 0.0), (Mode.MSE_SOFTMAX, 0.0)],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
def test_dtypes(mode, gamma, dtype, lay):
    x, y, tvals = make((2, 7, 9, 11), dtype)
    x = layout(x, lay)
    check_fwd(x, y, mode, gamma, tvals)
    check_bwd(x, y, mode, gamma, tvals)


@pytest.mark.parametrize(
    "label_dtype, ignore_index",
    [(torch.uint8, 255), (torch.uint8, -100), (torch.int16, -100), (torch.int32, -1), (torch.int64, 0)],
)
def test_label_dtypes(label_dtype, ignore_index):
    x, y, tvals = make(
        (2, 6, 8, 9),
        label_dtype=label_dtype,
        ignore_index=ignore_index if ignore_index >= 0 or label_dtype != torch.uint8 else 255,
    )
    for mode, gamma in [(Mode.SOFTMAX_FOCAL, 2.0), (Mode.MSE_SOFTMAX, 0.0)]:
        check_fwd(x, y, mode, gamma, tvals, ignore_index)
        check_bwd(x, y, mode, gamma, tvals, ignore_index)


@pytest.mark.parametrize("shape", [(2, 19, 130, 140), (3, 7, 61, 67)])
@pytest.mark.parametrize("lay", ["nchw", "channels_last"])
def test_many_blocks_and_chunks(shape, lay):
    """Images that end inside a block, many blocks per chunk, many chunks over the threads."""
    x, y, tvals = make(shape)
    x = layout(x, lay)
    for mode, gamma in [(Mode.SOFTMAX_FOCAL, 2.0), (Mode.SIGMOID_FOCAL, 0.0), (Mode.MSE_SOFTMAX, 0.0)]:
        check_fwd(x, y, mode, gamma, tvals)
        check_bwd(x, y, mode, gamma, tvals)


@pytest.mark.parametrize("C", [300, 5000])
def test_large_class_count_rows(C):
    """C > 256 counts the confusion matrix with atomics instead of a private table."""
    x, y, tvals = make((37, C))
    for mode, gamma in [(Mode.SOFTMAX_FOCAL, 0.0), (Mode.SOFTMAX_FOCAL, 2.0), (Mode.MSE_SOFTMAX, 0.0)]:
        check_fwd(x, y, mode, gamma, tvals)
        check_bwd(x, y, mode, gamma, tvals)
    check_fwd(x.to(torch.bfloat16), y, Mode.SOFTMAX_FOCAL, 0.0, tvals)


# --- statistics, edges ---------------------------------------------------------------------------


def test_ties_and_nan_argmax_like_torch():
    x, y, _ = make((2, 5, 6, 7))
    x[:, 3] = x[:, 1]  # ties: the first index
    x[0, 2, 1, 1] = float("nan")  # NaN: the first NaN, as torch.argmax
    x[1, 4, 2, 2] = x[1, 0, 2, 2] = float("nan")
    y[0, 1, 1] = 2
    y[1, 2, 2] = 0
    conf = torch.zeros(5, 5, dtype=torch.int64)
    _, _, count, tp, bad, _ = fwd(x, y.reshape(-1), Mode.STATS, reduction=SUM, confusion=conf)
    want = contract.forward(x.double(), y, None, None, Mode.STATS, 0.0, -100, Reduction.SUM, Weighting.NONE)
    assert torch.equal(count, want[2]) and torch.equal(tp, want[3]) and torch.equal(conf, want[5])


def test_bad_labels_are_counted_and_ignored():
    x, y, tvals = make((2, 4, 5, 6))
    y[0, 0, :3] = torch.tensor([4, -3, 100])
    pixel, *_ = check_fwd(x, y, Mode.SOFTMAX_FOCAL, 2.0, tvals)
    assert (pixel.view(2, 5, 6)[0, 0, :3] == 0).all()
    _, _, _, _, bad, _ = fwd(x, y.reshape(-1), 0, reduction=MEAN, need_tp=False)
    assert bad.tolist() == [3, 100]  # how many, and the largest
    grad = check_bwd(x, y, Mode.SOFTMAX_FOCAL, 2.0, tvals)
    assert (grad[0, :, 0, :3] == 0).all()


def test_validate_raises_naming_the_labels_before_touching_the_confusion():
    """validate=True: a ValueError naming the bad labels (the smallest first, as the reference) and
    nothing added into the caller's matrix; validate=False: ignored, the valid pixels counted."""
    x, y, _ = make((2, 4, 5, 6))
    y[0, 0, :3] = torch.tensor([4, -3, 100])
    target = y.reshape(-1)
    conf = torch.ones(4, 4, dtype=torch.int64)
    for confusion in (conf, None):
        with pytest.raises(
            ValueError, match=r"label -3 outside \[0, 4\) \(values: -3, 4, 100; ignore_index=-100\)"
        ):
            fwd(x, target, 0, reduction=MEAN, confusion=confusion, validate=True)
    assert torch.equal(conf, torch.ones_like(conf))
    fwd(x, target, 0, reduction=MEAN, confusion=conf, validate=False)
    valid = torch.where((y >= 0) & (y < 4), y, torch.full_like(y, -100))
    assert torch.equal(
        conf - 1,
        contract.forward(x.double(), valid, None, None, 0, 0.0, -100, Reduction.MEAN, Weighting.NONE)[5],
    )


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 5), (0, 3)])
def test_zero_pixels(shape):
    x, y, tvals = make(shape)
    C = shape[1]
    conf = torch.zeros(C, C, dtype=torch.int64)
    pixel, _, count, tp, bad, _ = fwd(x, y.reshape(-1), 0, 2.0, confusion=conf)
    assert pixel.shape == (0,) and (count == 0).all() and bad[0].item() == 0
    assert tp.shape == (C,) and (tp == 0).all() and (conf == 0).all()
    class_loss = fwd(x, y.reshape(-1), 0, 2.0, reduction=CLASS)[0]
    assert class_loss.shape == (C,) and (class_loss == 0).all()
    loss, scale, *_ = fwd(
        x, y.reshape(-1), 0, 2.0, reduction=MEAN, weighting=Weighting.GENERAL, weight=torch.full((C,), 2.0)
    )
    assert loss.item() == 0 and torch.equal(scale, torch.full((C,), 2.0))  # D = 0 divides by 1
    assert BE.bwd(x, y.reshape(-1), None, torch.ones(C), None, None, 0, 2.0, -100).shape == x.shape


def test_all_ignored_and_absent_class():
    x, y, tvals = make((2, 5, 4, 4))
    y.fill_(-100)
    for mode in MODES:
        pixel, class_loss = check_fwd(x, y, mode, 1.5, tvals)
        assert (pixel == 0).all() and (class_loss == 0).all()
        assert (check_bwd(x, y, mode, 1.5, tvals) == 0).all()
    x, y, tvals = make((2, 5, 4, 4))
    y[y == 2] = 1
    _, class_loss = check_fwd(x, y, Mode.SOFTMAX_FOCAL, 0.0, tvals)
    assert class_loss[2] == 0


def test_need_tp_false_and_strided_grads():
    x, y, tvals = make((2, 5, 6, 6))
    target = y.reshape(-1)
    class_loss, _, count, tp, _, _ = fwd(x, target, 0, 2.0, reduction=CLASS, need_tp=False)
    assert tp.shape == (0,)
    full = fwd(x, target, 0, 2.0, reduction=CLASS)
    assert torch.equal(class_loss, full[0]) and torch.equal(count, full[2])
    gp = torch.tensor(0.5).expand(target.numel())  # a stride-0 gradient, as from .sum()
    grad = BE.bwd(x, target, gp, None, None, None, 0, 2.0, -100)
    torch.testing.assert_close(
        grad.double(), contract.grad(x.double(), target, gp, None, 0, 2.0, None, -100), **TOL[torch.float32]
    )


def test_reductions_and_weightings():
    """Every reduction x weighting of the forward against the contract (float64), the recall weights
    included, and the backward of each with its own factor."""
    x, y, _ = make((2, 5, 6, 7), torch.float64)
    y[y == 3] = 0  # an absent class, whose weight is inf: it must change nothing
    target = y.reshape(-1)
    w = torch.tensor([0.5, 1.0, 2.0, float("inf"), 1.5], dtype=torch.float64)
    for red in (Reduction.MEAN, Reduction.SUM, Reduction.NONE):
        for wt in Weighting:
            weight = w if wt in (Weighting.GENERAL, Weighting.PAPER) else None
            loss, scale, count, tp, _, _ = fwd(
                x, target, 0, 1.5, reduction=int(red), weighting=wt, weight=weight, need_tp=False
            )
            want = contract.forward(x, target, weight, None, 0, 1.5, -100, red, wt)
            torch.testing.assert_close(loss, want[0], **TOL[torch.float64])
            assert tp.shape == ((5,) if wt == Weighting.RECALL else (0,))
            present = count > 0
            torch.testing.assert_close(scale[present], want[1][present], **TOL[torch.float64])
            up = (
                torch.tensor(1.25, dtype=torch.float64)
                if red != Reduction.NONE
                else torch.rand(target.numel(), dtype=torch.float64)
            )
            grad = BE.bwd(x, target, up, scale, None, None, 0, 1.5, -100)
            torch.testing.assert_close(
                grad, contract.grad(x, target, up, want[1], 0, 1.5, None), **TOL[torch.float64]
            )


def test_focal_numerics_at_certainty():
    """p_y = 1 exactly (1 − p_y = −expm1(0) = 0): loss 0, and the (1 − p)^(γ−1) factor of the
    gradient for γ < 1 takes its limit 0 instead of 0 · inf. Sigmoid at ±100: finite."""
    x = torch.tensor([[200.0, 0.0, -50.0], [0.0, 300.0, 1.0], [-100.0, 100.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    for gamma in (0.0, 0.25, 0.5, 1.0, 2.0, 3.5):
        pixel = fwd(x, y, 0, gamma)[0]
        assert (pixel == 0).all()
        grad = BE.bwd(x, y, torch.ones(3), None, None, None, 0, gamma, -100)
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(
            grad.double(),
            contract.grad(x.double(), y, torch.ones(3), None, 0, gamma, None, -100),
            **TOL[torch.float32],
        )
    for gamma in (0.0, 0.5, 2.0):
        pixel = fwd(x, y, 1, gamma)[0]
        grad = BE.bwd(x, y, torch.ones(3), None, None, None, 1, gamma, -100)
        assert torch.isfinite(pixel).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(
            pixel.double(), contract.pixel_loss(x.double(), y, 1, gamma, None, -100), **TOL[torch.float32]
        )


def test_tiny_probability_focal():
    """log p_y far below float32's exp range: the loss is −log p_y·(1 − p)^γ ≈ −log p_y."""
    x = torch.tensor([[-80.0, 80.0, 0.0], [-200.0, 0.0, 0.0]])
    y = torch.tensor([0, 0])
    for gamma in (0.5, 2.0):
        pixel = fwd(x, y, 0, gamma)[0]
        torch.testing.assert_close(
            pixel.double(), contract.pixel_loss(x.double(), y, 0, gamma, None, -100), **TOL[torch.float32]
        )


@pytest.mark.parametrize("mode, gamma", CASES[:-1])
def test_gradcheck_float64(mode, gamma):
    """Through the autograd formula (functional.py's path), every reduction."""
    from fused_imbalance import _fused

    _fused.register_backend(BE)
    x, y, tvals = make((2, 4, 3, 2), torch.float64, scale=1.0)
    target = y.reshape(-1)
    tv = tvals if mode in (Mode.MSE_LOGITS, Mode.MSE_SOFTMAX) else None
    x.requires_grad_(True)
    w = torch.linspace(0.5, 2.0, 4, dtype=torch.float64)
    for red, wt in [
        (Reduction.MEAN, Weighting.GENERAL),
        (Reduction.SUM, Weighting.NONE),
        (Reduction.NONE, Weighting.PAPER),
        (Reduction.CLASS, Weighting.NONE),
    ]:
        weight = w if wt != Weighting.NONE else None
        assert torch.autograd.gradcheck(
            lambda t: _fused.forward(
                "cpp", t, target, (), weight, tv, None, mode, gamma, -100, red, wt, False, False
            )[0],
            (x,),
        )


# --- torch.library and torch.compile -------------------------------------------------------------


@pytest.mark.parametrize(
    "reduction, need_tp, with_confusion", [(NONE, True, True), (MEAN, False, False), (CLASS, True, False)]
)
def test_opcheck(reduction, need_tp, with_confusion):
    x, y, tvals = make((2, 4, 3, 5), torch.float64)
    target = y.reshape(-1)
    conf = torch.zeros(4, 4, dtype=torch.int64) if with_confusion else None
    w = torch.linspace(0.5, 2.0, 4, dtype=torch.float64)
    torch.library.opcheck(
        BE.fwd_op, (x, target, w, None, conf, 0, 1.5, -100, reduction, 1, need_tp, False, False)
    )
    torch.library.opcheck(
        BE.fwd_op, (x, target, None, tvals, conf, 3, 0.0, -100, reduction, 3, need_tp, True, False)
    )
    gp = torch.randn(target.numel(), dtype=torch.float64)
    torch.library.opcheck(BE.bwd_op, (x, target, gp, None, None, None, 1, 2.0, -100))
    torch.library.opcheck(
        BE.bwd_op, (x, target, torch.tensor(0.5, dtype=torch.float64), w, tvals, None, 2, 0.0, -100)
    )


def test_eager_functions_are_the_ops():
    """The eager entry points and the registered ops run the same code: bit-identical outputs."""
    x, y, _ = make((2, 19, 11, 13))
    target = y.reshape(-1)
    w = torch.linspace(0.5, 2.0, 19)
    c1, c2 = torch.zeros(19, 19, dtype=torch.int64), torch.zeros(19, 19, dtype=torch.int64)
    a = BE.fwd(x, target, w, None, c1, 0, 2.0, -100, MEAN, 1, True, True, False)
    b = BE.fwd_op(x, target, w, None, c2, 0, 2.0, -100, MEAN, 1, True, True, False)
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and torch.equal(c1, c2)
    g = torch.tensor(1.0)
    assert torch.equal(
        BE.bwd(x, target, g, a[1], None, None, 0, 2.0, -100),
        BE.bwd_op(x, target, g, a[1], None, None, 0, 2.0, -100),
    )


def _batch_recall(count, tp):
    return tp / count.clamp(min=1)


def _autograd_cases():
    """(name, make(backend) -> loss of (x, y)) of the calls through the plain and upsampled ops, every mode,
    reduction and weighting, and RecallLoss's moving average."""
    import fused_imbalance as fi

    C = 5
    w = torch.linspace(0.5, 2.0, C, dtype=torch.float64)
    outlying = fi.weights.outlying_labels(list(range(10, 10 + C))).double()
    return [
        ("ce mean", lambda b: lambda x, y: fi.cross_entropy(x, y, backend=b)),
        ("ce weight sum", lambda b: lambda x, y: fi.cross_entropy(x, y, w, reduction="sum", backend=b)),
        ("ce weight none", lambda b: lambda x, y: fi.cross_entropy(x, y, w, reduction="none", backend=b)),
        ("focal none", lambda b: lambda x, y: fi.focal_loss(x, y, 2.0, reduction="none", backend=b)),
        ("sigmoid focal", lambda b: lambda x, y: fi.sigmoid_focal_loss(x, y, 1.5, backend=b)),
        ("recall", lambda b: lambda x, y: fi.recall_loss(x, y, backend=b)),
        ("recall callable", lambda b: lambda x, y: fi.recall_loss(x, y, recall=_batch_recall, backend=b)),
        ("mse softmax", lambda b: lambda x, y: fi.mse_outlying_loss(x, y, outlying, backend=b)),
        ("upsample focal", lambda b: lambda x, y: fi.focal_loss(x, y, 2.0, backend=b, upsample="bilinear")),
        (
            "upsample nearest none",
            lambda b: lambda x, y: fi.cross_entropy(x, y, reduction="none", backend=b, upsample="nearest"),
        ),
        ("RecallLoss momentum", lambda b: fi.RecallLoss(C, momentum=0.7, backend=b).double()),
        ("dice", lambda b: lambda x, y: fi.dice_loss(x, y, backend=b)),
        (
            "dice_ce weight sum",
            lambda b: lambda x, y: fi.dice_ce_loss(x, y, weight=w, reduction="sum", backend=b),
        ),
        ("dice none", lambda b: lambda x, y: fi.dice_loss(x, y, reduction="none", backend=b)),
        ("tversky batch", lambda b: lambda x, y: fi.tversky_loss(x, y, 0.3, 0.7, batch=True, backend=b)),
        ("ohem", lambda b: lambda x, y: fi.ohem_cross_entropy(x, y, 0.7, 20, backend=b)),
        (
            "ohem weight none",
            lambda b: lambda x, y: fi.ohem_cross_entropy(x, y, 0.7, 9, w, reduction="none", backend=b),
        ),
        (
            "upsample ohem",
            lambda b: lambda x, y: fi.ohem_cross_entropy(x, y, 0.6, 30, backend=b, upsample="bilinear"),
        ),
    ]


def _graph_names(fn):
    """The names of the autograd nodes behind ``fn``."""
    names, todo = [], [fn]
    while todo:
        f = todo.pop()
        if f is not None:
            names.append(f.name())
            todo += [n for n, _ in f.next_functions]
    return names


@pytest.mark.parametrize("case", _autograd_cases(), ids=lambda c: c[0])
def test_autograd_node_is_the_python_formula(case, monkeypatch):
    """An eager call runs the C++ backend's own autograd node (no Python in its backward), and it gives
    bit-identical losses, gradients and module buffers to the Python formulas of ``_fused``, ``_dice``
    and ``_ohem`` that the other paths use; a second backward through a retained graph gives the same
    gradient again."""
    from fused_imbalance import _fused

    name, make_fn = case
    up = name.startswith("upsample")
    DICE.dice_backend("cpp"), OHEM.load("cpp")  # loaded, so that the Python formula's run can replace them
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn((2, 5, 3, 4) if up else (2, 5, 6, 7), generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 6, 7), generator=g)
    y.view(-1)[::5] = -100
    outs = []
    for node in (True, False):
        if not node:  # the Python formula: the same backends without their own node
            monkeypatch.setitem(_fused._BACKENDS, "cpp", BE._replace(autograd=None))
            for ops in (DICE, OHEM):
                monkeypatch.setitem(ops._loaded, "cpp", ops._loaded["cpp"]._replace(autograd=None))
        fn = make_fn("cpp")
        x = x0.clone().requires_grad_()
        got = []
        for _ in range(2):  # RecallLoss: the second step reads the first one's buffers
            loss = fn(x, y)
            names = _graph_names(loss.grad_fn)
            assert any("CppNode<fused_imbalance::cpu::FusedLoss>" in n for n in names) == node, names
            up_grad = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
            (gx,) = torch.autograd.grad(loss, x, up_grad, retain_graph=True)
            (again,) = torch.autograd.grad(loss, x, up_grad)
            assert torch.equal(gx, again)
            got += [loss.detach(), gx] + [b.clone() for b in getattr(fn, "buffers", lambda: [])()]
        outs.append(got)
    assert len(outs[0]) == len(outs[1])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_autograd_node_checks_like_the_python_formula():
    """The C++ node saves the logits as save_for_backward does: an in-place change before the backward is
    autograd's error, and saved-tensor hooks see the logits; a call without grad builds no node."""
    import fused_imbalance as fi

    x, y, _ = make((2, 4, 3, 3), torch.float64)
    x.requires_grad_()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        loss = fi.focal_loss(x, y, 2.0, backend="cpp")
    assert len(packed) == 1 and packed[0] is x
    loss = fi.focal_loss(x, y, 2.0, backend="cpp")
    with torch.no_grad():
        x.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with torch.no_grad():
        assert fi.focal_loss(x, y, 2.0, backend="cpp").grad_fn is None
    assert fi.focal_loss(x.detach(), y, 2.0, backend="cpp").grad_fn is None


# --- loading ------------------------------------------------------------------------------------


def test_recall_ema_checks_its_arguments():
    """The moving average's C++ function refuses what it cannot read, naming the argument, before it
    writes a buffer (its values: test_modules.py::test_recall_ema_op)."""
    C = 4
    sums, count = torch.ones(C), torch.ones(C, dtype=torch.int64)
    running, seen = torch.zeros(C), torch.zeros(C, dtype=torch.bool)
    cases = [
        ((sums, count, count, running, seen, 0.1, NONE), "reduction"),
        ((sums.half(), count, count, running, seen, 0.1, MEAN), "sums"),
        ((sums, count[:3], count, running, seen, 0.1, MEAN), "count and tp"),
        ((sums, count, count.int(), running, seen, 0.1, MEAN), "count and tp"),
        ((sums, count, count, running.half(), seen, 0.1, MEAN), "running"),
        ((sums, count, count, running, seen.long(), 0.1, SUM), "seen"),
    ]
    for args, what in cases:
        with pytest.raises(RuntimeError, match=what):
            BE.recall_ema(*args)
        assert torch.equal(running, torch.zeros(C)) and not seen.any()
    loss, scale = BE.recall_ema(sums, count, count, running, seen, 0.1, MEAN)  # all recalls 1: weights 0
    assert loss.item() == 0.0 and torch.equal(scale, torch.zeros(C))
    assert torch.equal(running, torch.ones(C)) and seen.all()


def test_supports():
    assert cpp.supports(torch.zeros(2, 3))
    assert cpp.supports(torch.zeros(2, 3, dtype=torch.bfloat16))
    assert not cpp.supports(torch.zeros(2, 3, dtype=torch.int64))
    assert not cpp.supports(torch.zeros(2, 3, device="meta"))


@pytest.mark.parametrize("first", ["cpp", "triton"])
def test_import_order_with_python_ops_in_the_namespace(first):
    """The C++ TORCH_LIBRARY and the Triton ops registered from Python share the namespace."""
    script = textwrap.dedent(f"""
        import torch
        import fused_imbalance.ops.cpp as cpp
        if "{first}" == "cpp":
            assert cpp.available()
        import fused_imbalance.ops.triton_loss, fused_imbalance.ops.triton_upsample
        @torch.library.custom_op("fused_imbalance::_test_py_op", mutates_args=())
        def _op(x: torch.Tensor) -> torch.Tensor:
            return x + 1
        assert cpp.available()
        x = torch.randn(3, 4)
        out = torch.ops.fused_imbalance.cpp_loss_fwd(x, torch.tensor([0, 1, 3]), None, None, None, 0, 0.0, -100, 2,
                                                     0, False, True, False)
        assert torch.allclose(out[0], torch.nn.functional.cross_entropy(x, torch.tensor([0, 1, 3]),
                                                                        reduction="none"))
        assert torch.equal(torch.ops.fused_imbalance._test_py_op(x), x + 1)
    """)
    env = {**os.environ, "PYTHONPATH": ROOT, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, env=env)


def test_failed_build_warns_once_and_falls_back(tmp_path):
    """No prebuilt module and a compiler that fails: available() is False with one warning, and
    backend="auto" runs the reference."""
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["fused_imbalance._C"] = None  # as if it had not been built
        import torch
        import fused_imbalance.functional as FI
        from fused_imbalance.ops import cpp
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert cpp.available() is False and cpp.available() is False
            x = torch.randn(4, 3, requires_grad=True)
            loss = FI.cross_entropy(x, torch.tensor([0, 1, 2, 1]))
            loss.backward()
        msgs = [str(m.message) for m in w if "C++ backend" in str(m.message)]
        assert len(msgs) == 1, msgs
        assert FI.resolve_backend("auto", x) == "reference"
        # asking for the backend says why it is missing: the build's first error line and its log
        try:
            FI.cross_entropy(x, torch.tensor([0, 1, 2, 1]), backend="cpp")
        except RuntimeError as e:
            msg = str(e)
        else:
            raise AssertionError("backend='cpp' ran without the C++ backend")
        assert "not available on this machine: fused_imbalance._C is not built" in msg, msg
        assert "compiling csrc/ failed" in msg and "full log: " in msg, msg
        first_line = msg.split("compiling csrc/ failed: ")[1].split(" (full log: ")[0]
        log = msg.split("full log: ")[1].rstrip(")")
        assert first_line in open(log).read() and "C++ extension" in open(log).read()
    """)
    env = {**os.environ, "PYTHONPATH": ROOT, "TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": "false"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, env=env)


def test_no_compiler_is_named(tmp_path):
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["fused_imbalance._C"] = None
        import torch
        import fused_imbalance.functional as FI
        warnings.simplefilter("ignore")
        try:
            FI.cross_entropy(torch.randn(2, 3), torch.tensor([0, 2]), backend="cpp")
        except RuntimeError as e:
            assert "no C++ compiler" in str(e) and "/nonexistent/c++" in str(e), e
        else:
            raise AssertionError("backend='cpp' ran without the C++ backend")
    """)
    env = {**os.environ, "PYTHONPATH": ROOT, "TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": "/nonexistent/c++"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, env=env)


def test_unknown_cpu_isa_is_an_error():
    """A value of FUSED_IMBALANCE_CPU_ISA that names no copy of the kernels is an error, from
    Python and from the op itself, never a silent choice of another copy."""
    script = textwrap.dedent("""
        import torch
        import fused_imbalance.functional as FI
        try:
            FI.cross_entropy(torch.randn(2, 3), torch.tensor([0, 2]))
        except ValueError as e:
            assert "FUSED_IMBALANCE_CPU_ISA" in str(e) and "'sse4'" in str(e), e
        else:
            raise AssertionError("FUSED_IMBALANCE_CPU_ISA=sse4 was accepted")
        from fused_imbalance import _C  # noqa: F401  (the op reads the variable itself too)
        try:
            torch.ops.fused_imbalance.cpp_cpu_isa()
        except ValueError as e:
            assert "FUSED_IMBALANCE_CPU_ISA" in str(e), e
        else:
            raise AssertionError("the op accepted FUSED_IMBALANCE_CPU_ISA=sse4")
    """)
    env = {**os.environ, "PYTHONPATH": ROOT, "FUSED_IMBALANCE_CPU_ISA": "sse4"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, env=env)


def test_sanitizer_build_flags(monkeypatch):
    """FUSED_IMBALANCE_SANITIZE (scripts/sanitize.sh) adds the sanitizers to the compile and link flags,
    aborting at the first report; unset, the build has none; a name it does not know is an error, so
    that a typo never builds without them."""
    cfg = cpp._build_config()
    monkeypatch.delenv("FUSED_IMBALANCE_SANITIZE", raising=False)
    assert not any("sanitize" in f for f in cfg.cxx_flags() + cfg.link_flags())
    monkeypatch.setenv("FUSED_IMBALANCE_SANITIZE", "address,undefined")
    flags = cfg.cxx_flags()
    assert "-fsanitize=address,undefined" in flags and "-fno-sanitize-recover=all" in flags
    assert flags.index("-O1") > flags.index("-O3") and flags.index("-g1") > flags.index(
        "-g0"
    )  # the later flag wins
    assert "-fsanitize=address,undefined" in cfg.link_flags()
    monkeypatch.setenv("FUSED_IMBALANCE_SANITIZE", "adress")
    with pytest.raises(ValueError, match="FUSED_IMBALANCE_SANITIZE.*adress"):
        cfg.cxx_flags()


def test_cpp_many_chunks_and_a_large_bin():
    """300 000 entries: several parallel chunks; most of them in one binade, so the keys copied
    after the first digit exceed one chunk and the later digits run as parallel passes too."""
    _available("cpp")
    g = torch.Generator().manual_seed(5)
    v = 0.5 + torch.rand(300_000, generator=g) / 2  # [0.5, 1): one first digit
    v[::10] = torch.rand(30_000, generator=g) / 4
    v[::17] = -1.0
    threads = torch.get_num_threads()
    try:
        for k in (0, 25_000, 150_000, 10**9):
            want = SEL.select_kth(v, k, backend="cpp")
            check(want, v, k)
            torch.set_num_threads(1)
            assert torch.equal(SEL.select_kth(v, k, backend="cpp"), want)  # the same for any thread count
            torch.set_num_threads(threads)
        check(SEL.select_kth(v.double(), 150_000, backend="cpp"), v.double(), 150_000)
    finally:
        torch.set_num_threads(threads)


def test_opcheck_cpp():
    _available("cpp")
    assert SEL._cpp_ready()  # registers the op's fake kernel, as select_kth's first call does
    v = torch.rand(300, dtype=torch.float64)
    v[::4] = -1
    fh = histogram_of(v)
    for args in [
        (v, torch.tensor(17)),
        (v.float(), torch.tensor(0), histogram_of(v.float())),
        (v, torch.tensor(10**5), fh),
    ]:
        torch.library.opcheck(torch.ops.fused_imbalance.cpp_select_kth.default, args)
