"""The fused Dice family (docs/DESIGN.md §12) on every fused backend: values and gradients against the
reference (the executable spec, itself tested against MONAI in test_dice_reference.py), against MONAI
and segmentation_models_pytorch's formula directly, gradcheck in float64, 2-D and 3-D, both layouts and
(N, C) rows, every dtype and label dtype, ignored pixels, absent classes, all-ignored input,
C = 1 ... 150, upsample, the confusion counts, bad labels, the ops (opcheck, eager == registered op),
the modules and their options. Determinism: test_determinism.py; torch.compile and torch.func:
test_compile.py (and test_compile_cuda.py); the Triton launches: test_internals_triton.py.

The Triton kernels run through the interpreter on CPU tensors: their inputs stay a few hundred pixels."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_imbalance as fi
import fused_imbalance.functional as FI
from fused_imbalance import reference as R
from cases import backend_device, make_data, to_layout
from tolerances import LOSS_TOL, TOL

F64 = TOL[torch.float64]
W4 = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)

# Each loss with options away from the defaults: (functional, reference, keywords). "w" in the keywords
# stands for a weight of C classes (C' for the Dice term without background), built for the input.
CALLS = {
    "dice": (FI.dice_loss, R.dice_loss, {}),
    "dice_jaccard_squared_weighted": (
        FI.dice_loss,
        R.dice_loss,
        dict(weight="w'", include_background=False, jaccard=True, squared_pred=True),
    ),
    "dice_batch_smooth": (FI.dice_loss, R.dice_loss, dict(batch=True, smooth_nr=1e-2, smooth_dr=3e-2)),
    "generalized_dice": (FI.generalized_dice_loss, R.generalized_dice_loss, {}),
    "generalized_dice_simple": (
        FI.generalized_dice_loss,
        R.generalized_dice_loss,
        dict(w_type="simple", batch=True, include_background=False),
    ),
    "generalized_dice_uniform": (FI.generalized_dice_loss, R.generalized_dice_loss, dict(w_type="uniform")),
    "tversky": (FI.tversky_loss, R.tversky_loss, dict(alpha=0.3, beta=0.7)),
    "focal_tversky": (
        FI.tversky_loss,
        R.tversky_loss,
        dict(alpha=0.7, beta=0.6, gamma=0.75, include_background=False, batch=True),
    ),
    "dice_ce": (FI.dice_ce_loss, R.dice_ce_loss, dict(lambda_dice=0.6, lambda_ce=1.4, weight="w")),
    "dice_ce_jaccard": (
        FI.dice_ce_loss,
        R.dice_ce_loss,
        dict(jaccard=True, squared_pred=True, batch=True, include_background=False, weight="w"),
    ),
}
FUSED_OF = {
    R.dice_loss: FI.dice_loss,
    R.generalized_dice_loss: FI.generalized_dice_loss,
    R.tversky_loss: FI.tversky_loss,
    R.dice_ce_loss: FI.dice_ce_loss,
}


def _reductions(name):
    return ("mean", "sum") if name.startswith("dice_ce") else ("mean", "sum", "none")


def _kw(name, C, device):
    kw = dict(CALLS[name][2])
    if kw.get("weight") == "w":
        kw["weight"] = torch.linspace(0.5, 2.0, C, dtype=torch.float64).to(device)
    elif kw.get("weight") == "w'":
        kw["weight"] = torch.linspace(0.5, 2.0, C - 1, dtype=torch.float64).to(device)
    return kw


def _data(shape, dtype=torch.float64, seed=0, every=7, device="cpu"):
    """Random logits and labels; class 2 is absent from image 1 (C > 2, images)."""
    x, y = make_data(shape, dtype, seed, every=every)
    if shape[1] > 2 and len(shape) > 2:
        y[1][y[1] == 2] = 1
    return x.to(device), y.to(device)


def _run(fn, x, y, reduction, seed=0, **kw):
    """(loss, gradient) of ``fn`` with a random upstream gradient (every output weighted differently)."""
    xg = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    loss = fn(xg, y, reduction=reduction, **kw)
    g = torch.Generator().manual_seed(seed)
    up = (torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(loss.device, loss.dtype)
    (loss * up).sum().backward()
    return loss.detach(), xg.grad


def _compare(name, x, y, backend, reductions=None, dtype_tol=torch.float64):
    fused, ref, _ = CALLS[name]
    kw = _kw(name, x.shape[1], x.device)
    for reduction in reductions or _reductions(name):
        lf, gf = _run(fused, x, y, reduction, backend=backend, **kw)
        lr, gr = _run(ref, x.double() if x.dtype != torch.float64 else x, y, reduction, **kw)
        assert lf.shape == lr.shape, (name, reduction)
        assert gf.dtype == x.dtype and gf.stride() == x.stride()
        torch.testing.assert_close(lf, lr.to(lf.dtype), **LOSS_TOL[dtype_tol])
        torch.testing.assert_close(gf, gr.to(gf.dtype), **TOL[dtype_tol])


# --- against the reference ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize("name", CALLS)
def test_matches_reference_2d(backend, name, layout):
    x, y = _data((2, 4, 4, 5), device=backend_device(backend))
    if layout == "rows":
        x, y = to_layout(x, "rows"), y.reshape(-1)
    else:
        x = to_layout(x, layout)
    _compare(name, x, y, backend)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", ["dice", "generalized_dice", "focal_tversky", "dice_ce_jaccard"])
def test_matches_reference_3d(backend, name, layout):
    x, y = _data((2, 4, 3, 4, 5), every=5, device=backend_device(backend))
    _compare(name, to_layout(x, layout), y, backend)


@pytest.mark.parametrize("C", [1, 2, 19, 40, 150])
def test_class_counts(backend, C):
    # C = 1: the softmax is the constant 1; 19: every class unrolled; 40 and 150: the loop over class groups
    shape = (2, C, 3, 5) if backend == "triton" else (2, C, 17, 23)
    x, y = _data(shape, seed=C, device=backend_device(backend))
    # the interpreter's cost grows with C (every class is unrolled code): two losses there beyond 32 classes
    names = (
        ("generalized_dice", "dice_ce")
        if backend == "triton" and C > 32
        else ("dice", "generalized_dice", "focal_tversky", "dice_ce")
    )
    for name in names:
        if C == 1 and CALLS[name][2].get("include_background") is False:
            continue
        _compare(name, x, y, backend, ("mean",) if name != "dice" else None)


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
def test_larger_shapes_cpp(backend):
    # several blocks and chunks per image (the C++ plan), NCHW, channels_last and rows
    x, y = _data((3, 19, 61, 67), every=11)
    for layout in ("nchw", "channels_last"):
        _compare("dice_ce", to_layout(x, layout), y, backend)
        _compare("dice_jaccard_squared_weighted", to_layout(x, layout), y, backend)
    _compare("generalized_dice", to_layout(x, "rows"), y.reshape(-1), backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(backend, dtype):
    x, y = _data((2, 5, 4, 5), dtype=dtype, device=backend_device(backend))
    for name in ("dice", "generalized_dice", "tversky", "dice_ce"):
        for layout in ("nchw", "channels_last"):
            fused, ref, _ = CALLS[name]
            kw = _kw(name, 5, x.device)
            xl = to_layout(x, layout)
            lf, gf = _run(fused, xl, y, "mean", backend=backend, **kw)
            lr, gr = _run(ref, xl, y, "mean", **kw)  # the reference in the same dtype (float32 arithmetic)
            assert lf.dtype == torch.float32 and gf.dtype == dtype and gf.stride() == xl.stride()
            torch.testing.assert_close(lf, lr, **LOSS_TOL[dtype])
            torch.testing.assert_close(gf, gr, **TOL[dtype])


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_label_dtypes(backend, label_dtype):
    ii = 255 if label_dtype == torch.uint8 else -100
    x, y = _data((2, 4, 4, 5), every=5, device=backend_device(backend))
    y[y == -100] = ii
    for name in ("dice", "dice_ce"):
        fused, ref, _ = CALLS[name]
        kw = _kw(name, 4, x.device)
        lf, gf = _run(fused, x, y.to(label_dtype), "mean", backend=backend, ignore_index=ii, **kw)
        lr, gr = _run(ref, x, y, "mean", ignore_index=ii, **kw)
        torch.testing.assert_close(lf, lr, **F64)
        torch.testing.assert_close(gf, gr, **F64)


@pytest.mark.parametrize(
    "name", ["dice", "dice_jaccard_squared_weighted", "generalized_dice", "focal_tversky", "dice_ce_jaccard"]
)
def test_gradcheck_float64(backend, name):
    fused, _, _ = CALLS[name]
    x, y = _data((2, 3, 2, 3), every=4, device=backend_device(backend))
    kw = _kw(name, 3, x.device)
    x.requires_grad_(True)
    reduction = _reductions(name)[-1]  # "none" holds the whole Jacobian that "mean" and "sum" reduce
    assert torch.autograd.gradcheck(
        lambda t: fused(t, y, reduction=reduction, backend=backend, **kw), (x,), fast_mode=backend == "triton"
    )


def test_per_term_losses_summed_equal_the_sum(backend):
    # the upstream gradient of "none" summed is autograd's expansion of one value (strides 0)
    x, y = _data((2, 4, 3, 4), device=backend_device(backend))
    for fn in (FI.dice_loss, FI.generalized_dice_loss):
        a = x.clone().requires_grad_(True)
        b = x.clone().requires_grad_(True)
        fn(a, y, reduction="none", backend=backend).sum().backward()
        fn(b, y, reduction="sum", backend=backend).backward()
        torch.testing.assert_close(a.grad, b.grad, **F64)


# --- edge cases ------------------------------------------------------------------------------------


def test_all_ignored(backend):
    # I = P = G = 0: every term is 1 − smooth_nr/smooth_dr (0 with equal smoothing), the gradient 0
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, device=backend_device(backend))
    y = torch.full((2, 3, 3), -100, device=x.device)
    for name in CALLS:
        fused, ref, _ = CALLS[name]
        kw = _kw(name, 4, x.device)
        for reduction in _reductions(name):
            lf, gf = _run(fused, x, y, reduction, backend=backend, **kw)
            torch.testing.assert_close(lf, ref(x, y, reduction=reduction, **kw), **F64)
            assert (gf == 0).all(), (name, reduction)
            if "smooth_nr" not in kw:
                assert (lf == 0).all(), (name, reduction)
    for smooth in (dict(smooth_dr=4e-5), dict(smooth_nr=0.0, smooth_dr=0.0)):
        for fn in (FI.dice_loss, FI.tversky_loss, FI.generalized_dice_loss):
            ref = {
                FI.dice_loss: R.dice_loss,
                FI.tversky_loss: R.tversky_loss,
                FI.generalized_dice_loss: R.generalized_dice_loss,
            }[fn]
            torch.testing.assert_close(fn(x, y, backend=backend, **smooth), ref(x, y, **smooth), **F64)
    assert FI.dice_loss(x, y, smooth_dr=4e-5, backend=backend).item() == pytest.approx(0.75)


def test_nonfinite_logits_of_ignored_pixels_are_ignored(backend):
    x, y = _data((2, 4, 4, 5), every=3, device=backend_device(backend))
    xb = x.clone()
    ign = (y == -100).unsqueeze(1).expand_as(x)
    xb[ign] = float("nan")
    xb[:, 1][y == -100] = float("inf")
    for name in ("dice", "dice_ce"):
        fused, _, _ = CALLS[name]
        kw = _kw(name, 4, x.device)
        la, ga = _run(fused, x, y, "mean", backend=backend, **kw)
        lb, gb = _run(fused, xb, y, "mean", backend=backend, **kw)
        torch.testing.assert_close(lb, la, rtol=0, atol=0)
        assert torch.isfinite(gb).all() and (gb[ign] == 0).all()
        torch.testing.assert_close(gb[~ign], ga[~ign], rtol=0, atol=0)


def test_zero_denominators_and_absent_classes(backend):
    # class 2 absent and its probability exp(−1000) = 0: P = G = I = 0 with smooth_dr = 0, ratio 1, loss 0
    x, y = _data((2, 3, 4, 4), device=backend_device(backend))
    y[y == 2] = 1
    x[:, 2] = -1000.0
    for name in CALLS:
        fused, ref, _ = CALLS[name]
        kw = {**_kw(name, 3, x.device), "smooth_nr": 0.0, "smooth_dr": 0.0}
        lf, gf = _run(fused, x, y, "sum", backend=backend, **kw)
        lr, gr = _run(ref, x, y, "sum", **kw)
        assert torch.isfinite(lf) and torch.isfinite(gf).all()
        torch.testing.assert_close(lf, lr, **F64)
        torch.testing.assert_close(gf, gr, **F64)


def test_empty_batch_and_empty_images(backend):
    dev = backend_device(backend)
    for shape in [(0, 3, 4, 4), (2, 3, 0, 4)]:
        x = torch.randn(shape, dtype=torch.float64, device=dev, requires_grad=True)
        y = torch.zeros((shape[0],) + shape[2:], dtype=torch.int64, device=dev)
        for fn in (FI.dice_loss, FI.generalized_dice_loss, FI.dice_ce_loss):
            loss = fn(x, y, backend=backend)
            ref = {
                FI.dice_loss: R.dice_loss,
                FI.generalized_dice_loss: R.generalized_dice_loss,
                FI.dice_ce_loss: R.dice_ce_loss,
            }[fn](x.detach(), y)
            torch.testing.assert_close(loss.detach(), ref, **F64)
            loss.backward()
            assert x.grad.shape == x.shape and (x.grad == 0).all()
            x.grad = None


# --- against MONAI and segmentation_models_pytorch --------------------------------------------------


@pytest.fixture(scope="module")
def monai():
    try:
        import monai.losses
    except ImportError as e:
        pytest.fail(f"MONAI is needed for the comparisons (pip install --no-deps monai==1.6.1): {e}")
    return monai.losses


def _monai(cls, x, y, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(softmax=True, to_onehot_y=True, **kw)(x, y[:, None].long())


@pytest.mark.parametrize("dims", [(2, 4, 5, 6), (2, 3, 3, 4, 5)], ids=["2d", "3d"])
def test_matches_monai(backend, monai, dims):
    x, y = _data(dims, every=0, device=backend_device(backend))
    xc, yc = x.cpu(), y.cpu()
    w = torch.tensor([0.5, 1.0, 2.0, 0.25][: dims[1]], dtype=torch.float64)
    cases = [
        (FI.dice_loss, monai.DiceLoss, dict(reduction="none")),
        (FI.dice_loss, monai.DiceLoss, dict(jaccard=True, batch=True, include_background=False)),
        (FI.dice_loss, monai.DiceLoss, dict(weight=w, squared_pred=False, smooth_nr=0.0, smooth_dr=1e-3)),
        (FI.tversky_loss, monai.TverskyLoss, dict(alpha=0.3, beta=0.7, reduction="sum")),
        (FI.dice_ce_loss, monai.DiceCELoss, dict(weight=w, lambda_dice=0.3, lambda_ce=1.7, batch=True)),
    ]
    for ours, cls, kw in cases:
        got = ours(
            x, y, backend=backend, **{k: v.to(x.device) if torch.is_tensor(v) else v for k, v in kw.items()}
        )
        want = _monai(cls, xc, yc, **kw)
        torch.testing.assert_close(got.cpu(), want.reshape(got.shape), **F64)
    # MONAI computes the generalized Dice weights in float32 whatever the input
    got = FI.generalized_dice_loss(x.float(), y, w_type="simple", reduction="none", backend=backend)
    want = _monai(monai.GeneralizedDiceLoss, xc.float(), yc, w_type="simple", reduction="none")
    torch.testing.assert_close(got.cpu(), want.reshape(got.shape), **LOSS_TOL[torch.float32])


def test_ignored_pixels_match_monai_ignore_index(backend, monai):
    x, y = _data((2, 4, 5, 6), every=3, device=backend_device(backend))
    got = FI.dice_loss(x, y, reduction="none", batch=True, backend=backend)
    want = _monai(monai.DiceLoss, x.cpu(), y.cpu(), reduction="none", batch=True, ignore_index=-100)
    torch.testing.assert_close(got.cpu(), want.reshape(got.shape), **F64)


def test_dice_matches_smp_formula(backend):
    # segmentation_models_pytorch's multiclass DiceLoss (from_logits, smooth, no log) sums over the batch and
    # zeroes the classes absent from it; with every class present it is batch=True, smooth_nr = smooth_dr
    # (its formula written out in test_dice_reference.py: 1 − (2I + s)/(P + G + s), mean over classes)
    x, y = _data((2, 4, 5, 6), every=0, device=backend_device(backend))
    p = torch.softmax(x.cpu(), 1)
    onehot = F.one_hot(y.cpu(), 4).movedim(-1, 1).double()
    inter, card = (p * onehot).sum((0, 2, 3)), (p + onehot).sum((0, 2, 3))
    want = (1 - (2 * inter + 1.0) / (card + 1.0).clamp_min(1e-7)).mean()
    got = FI.dice_loss(x, y, batch=True, smooth_nr=1.0, smooth_dr=1.0, backend=backend)
    torch.testing.assert_close(got.cpu(), want, **F64)


# --- statistics, labels, determinism --------------------------------------------------------------


@pytest.mark.parametrize("C", [4, 40])
def test_confusion_counts(backend, C):
    # C = 4: a per-program register histogram (Triton); 40: integer atomics into the matrix
    x, y = _data((2, C, 4, 5), device=backend_device(backend))
    want = R.confusion_matrix(x.cpu(), y.cpu())
    for name in ("dice", "generalized_dice", "tversky", "dice_ce"):
        conf = torch.zeros(C, C, dtype=torch.int64, device=x.device)
        CALLS[name][0](x, y, backend=backend, confusion=conf, **_kw(name, C, x.device))
        assert torch.equal(conf.cpu(), want), name


def test_bad_labels(backend):
    x, y = _data((2, 4, 4, 5), device=backend_device(backend))
    y[1, 2, 3] = 9
    conf = torch.zeros(4, 4, dtype=torch.int64, device=x.device)
    if backend == "cpp":
        with pytest.raises(ValueError, match="label 9"):
            FI.dice_ce_loss(x, y, backend=backend, confusion=conf)
        assert (conf == 0).all()  # nothing added from labels that raise
    else:  # the Triton backend defers the check: the step treats the label as ignored
        FI.dice_ce_loss(x, y, backend=backend)
        with pytest.raises(ValueError, match="label 9"):
            fi.check_deferred()
    # validate=False: the bad label is ignored
    yi = y.clone()
    yi[1, 2, 3] = -100
    torch.testing.assert_close(FI.dice_loss(x, y, backend=backend, validate=False), R.dice_loss(x, yi), **F64)


def test_weight_checks(backend):
    x, y = _data((2, 4, 4, 5), device=backend_device(backend))
    bad = torch.tensor([1.0, -0.5, 1.0, 1.0], dtype=torch.float64, device=x.device)
    if x.device.type == "cpu":
        with pytest.raises(ValueError, match="weight must be finite and >= 0"):
            FI.dice_loss(x, y, bad, backend=backend)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        FI.dice_loss(x, y, bad, include_background=False, backend=backend)
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        FI.dice_ce_loss(x, y, reduction="none", backend=backend)
    with pytest.raises(ValueError, match="at least 2 classes"):
        FI.tversky_loss(x[:, :1], y.clamp(max=0), include_background=False, backend=backend)
    with pytest.raises(ValueError, match="w_type"):
        FI.generalized_dice_loss(x, y, w_type="cube", backend=backend)
    with pytest.raises(ValueError, match="gamma"):
        FI.tversky_loss(x, y, gamma=0.0, backend=backend)
    # validate=False: the weight as it is, as the reference
    torch.testing.assert_close(
        FI.dice_loss(x, y, bad, backend=backend, validate=False),
        R.dice_loss(x, y, bad, validate=False),
        **F64,
    )


def test_weight_checked_once_per_version(backend):
    # a training loop's one weight tensor: checked and converted at the first call, then no tensor
    # operation for it (on a GPU each would be a launch); an in-place change is seen at the next call
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    x, y = _data((2, 4, 3, 4), device=backend_device(backend))
    w = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float32, device=x.device)  # converted to float64
    for call in range(2):
        names = []
        with Ops():
            loss = FI.dice_ce_loss(x, y, weight=w, backend=backend)
        checks = {"_to_copy.default", "ge.Scalar", "all.default"} & set(names)  # conversion, w >= 0, all
        assert len(checks) == (3 if call == 0 else 0), names
        torch.testing.assert_close(loss, R.dice_ce_loss(x, y, weight=w.double()), **LOSS_TOL[torch.float64])
    w.mul_(2)
    torch.testing.assert_close(
        FI.dice_ce_loss(x, y, weight=w, backend=backend),
        R.dice_ce_loss(x, y, weight=w.double()),
        **LOSS_TOL[torch.float64],
    )
    w[1] = -1.0
    if x.device.type == "cpu":
        with pytest.raises(ValueError, match="weight must be finite and >= 0"):
            FI.dice_ce_loss(x, y, weight=w, backend=backend)


def test_options_remembered_per_call_signature(backend, monkeypatch):
    # a training loop's repeated options are checked once; a value equal to an accepted one but of
    # another type (1 for True, 1 for 1.0) is still checked, and refused where the check refuses it
    from fused_imbalance import _dice

    x, y = _data((2, 4, 3, 4), device=backend_device(backend))
    built = []
    cls = _dice.DiceOptions
    monkeypatch.setattr(_dice, "DiceOptions", lambda *a, **k: built.append(k) or cls(*a, **k))
    monkeypatch.setattr(_dice, "_options", {})
    kw = dict(include_background=False, jaccard=True, smooth_nr=0.5)
    first = FI.dice_loss(x, y, backend=backend, **kw)
    assert torch.equal(FI.dice_loss(x, y, backend=backend, **kw), first) and len(built) == 1
    torch.testing.assert_close(first, R.dice_loss(x, y, **kw), **LOSS_TOL[torch.float64])
    with pytest.raises(TypeError, match="include_background must be a bool"):
        FI.dice_loss(x, y, backend=backend, **dict(kw, include_background=0))
    assert torch.equal(
        FI.dice_loss(x, y, backend=backend, **dict(kw, smooth_nr=1)),
        FI.dice_loss(x, y, backend=backend, **dict(kw, smooth_nr=1.0)),
    )
    assert len(built) == 4
    other = FI.dice_loss(x, y, backend=backend, **dict(kw, jaccard=False))  # another option: its own entry
    torch.testing.assert_close(other, R.dice_loss(x, y, **dict(kw, jaccard=False)), **LOSS_TOL[torch.float64])


def test_strided_labels(backend):
    # labels that are a view (every other column of a larger map): the ops read labels flat, so the call
    # hands them a contiguous copy
    x, y = _data((2, 4, 5, 6), device=backend_device(backend))
    wide = torch.zeros((2, 5, 12), dtype=y.dtype, device=y.device)
    wide[..., ::2] = y
    view = wide[..., ::2]
    assert not view.is_contiguous()
    _compare("dice_ce", x, view, backend)
    _compare("dice", x, view, backend, ("none",))


def test_registered_ops_equal_the_eager_functions(backend):
    # what torch.compile calls (the registered ops) and what an eager call runs: bit-identical
    from fused_imbalance.ops.dice import DiceFlags, DiceKind, dice_backend, params

    FI.resolve_backend(backend, torch.zeros(1, 2, device=backend_device(backend)))
    be = dice_backend(backend)
    x, y = _data((2, 5, 4, 5), dtype=torch.float32, device=backend_device(backend))
    t = y.reshape(-1)
    w = torch.linspace(0.5, 2.0, 5, device=x.device)
    flags = int(DiceFlags.INCLUDE_BACKGROUND | DiceFlags.CE | DiceFlags.SQUARED)
    prm = params(lambda_dice=0.7, lambda_ce=1.3)
    args = (x, t, w, w, None, int(DiceKind.DICE), 0, flags, prm, -100, 0, True)
    eager, op = be.fwd(*args, True), be.fwd_op(*args, True)
    for a, b in zip(eager, op):
        assert torch.equal(a, b)
    g = torch.tensor(0.75, device=x.device)
    assert torch.equal(
        be.bwd(x, t, eager[2], eager[3], g, int(DiceKind.DICE), flags, -100, 0),
        be.bwd_op(x, t, op[2], op[3], g, int(DiceKind.DICE), flags, -100, 0),
    )
    # the forward without its finalize, then the finalize op on its sums: the same loss and coefficients
    _, sums, _, _, _ = be.fwd_op(*args, False)
    torch.library.opcheck(be.fwd_op, args + (False,), test_utils=("test_schema", "test_faketensor"))
    fin = be.finalize_op(sums, w, w, int(DiceKind.DICE), 0, flags, prm, 0, 1.0)
    for a, b in zip(fin, (eager[0], eager[2], eager[3])):
        assert torch.equal(a, b)
    fin2 = be.finalize(sums, w, w, int(DiceKind.DICE), 0, flags, prm, 0, 2.0)
    torch.testing.assert_close(fin2[1], 2 * eager[2], rtol=0, atol=0)


def test_opcheck(backend):
    from fused_imbalance.ops.dice import DiceFlags, params

    FI.resolve_backend(backend, torch.zeros(1, 2, device=backend_device(backend)))
    FI.dice_loss(
        torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, dtype=torch.int64), backend=backend
    )  # loads the ops
    ops = torch.ops.fused_imbalance
    fwd = getattr(ops, f"{backend}_dice_fwd")
    fin = getattr(ops, f"{backend}_dice_finalize")
    bwd = getattr(ops, f"{backend}_dice_bwd")
    x, y = _data((2, 3, 2, 3), dtype=torch.float32, device=backend_device(backend))
    t = y.reshape(-1)
    tests = ("test_schema", "test_faketensor")
    for flags, red in ((int(DiceFlags.INCLUDE_BACKGROUND), 2), (int(DiceFlags.CE | DiceFlags.BATCH), 0)):
        conf = torch.zeros(3, 3, dtype=torch.int64, device=x.device)
        for kind in (0, 1, 2):
            if kind and flags & DiceFlags.CE:
                continue
            args = (x, t, None, None, conf, kind, 0, flags, params(), -100, red, True, True)
            torch.library.opcheck(fwd, args, test_utils=tests)
            loss, sums, coef, ce_scale, _ = fwd(*args)
            torch.library.opcheck(
                fin, (sums, None, None, kind, 0, flags, params(), red, 2.0), test_utils=tests
            )
            torch.library.opcheck(
                bwd,
                (
                    x,
                    t,
                    coef,
                    ce_scale if ce_scale.numel() else None,
                    torch.ones_like(loss),
                    kind,
                    flags,
                    -100,
                    red,
                ),
                test_utils=tests,
            )


# --- upsample -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, align", [("bilinear", False), ("bilinear", True), ("nearest", False)])
def test_upsample_equals_interpolate_then_reference(backend, mode, align):
    x, _ = _data((2, 4, 3, 4), device=backend_device(backend))
    _, y = _data((2, 4, 7, 9), every=5, seed=1, device=x.device)
    kw = {} if mode == "nearest" else {"align_corners": align}
    for name in ("dice", "dice_ce", "generalized_dice"):
        fused, ref, _ = CALLS[name]
        o = _kw(name, 4, x.device)
        lf, gf = _run(fused, x, y, "mean", backend=backend, upsample=mode, **kw, **o)
        lr, gr = _run(
            lambda t, yy, **k: ref(F.interpolate(t, size=(7, 9), mode=mode, **kw), yy, **k), x, y, "mean", **o
        )
        torch.testing.assert_close(lf, lr, **F64)
        torch.testing.assert_close(gf, gr, **F64)
    with pytest.raises(ValueError, match="2-D"):
        FI.dice_loss(
            torch.zeros(1, 2, 2, 2, 2, device=x.device),
            torch.zeros(1, 4, 4, dtype=torch.int64),
            upsample="bilinear",
            backend=backend,
        )


# --- modules --------------------------------------------------------------------------------------------


def test_modules_equal_the_functions(backend):
    x, y = _data((2, 4, 4, 5), dtype=torch.float32, device=backend_device(backend))
    w = torch.linspace(0.5, 2.0, 4)
    cases = [
        (
            fi.DiceLoss(w[1:], include_background=False, jaccard=True, backend=backend),
            lambda: FI.dice_loss(
                x, y, w[1:].to(x.device), include_background=False, jaccard=True, backend=backend
            ),
        ),
        (
            fi.GeneralizedDiceLoss("simple", batch=True, reduction="none", backend=backend),
            lambda: FI.generalized_dice_loss(x, y, "simple", batch=True, reduction="none", backend=backend),
        ),
        (
            fi.TverskyLoss(0.2, 0.8, 1.5, smooth_nr=0.0, backend=backend),
            lambda: FI.tversky_loss(x, y, 0.2, 0.8, 1.5, smooth_nr=0.0, backend=backend),
        ),
        (
            fi.DiceCELoss(0.4, 1.6, w, squared_pred=True, reduction="sum", backend=backend),
            lambda: FI.dice_ce_loss(
                x, y, 0.4, 1.6, w.to(x.device), squared_pred=True, reduction="sum", backend=backend
            ),
        ),
    ]
    for module, call in cases:
        assert torch.equal(module.to(x.device)(x, y), call())
    dl = cases[0][0]
    assert torch.equal(dl.state_dict()["weight"], w[1:])


def test_module_options_set_later(backend):
    x, y = _data((2, 4, 4, 5), dtype=torch.float32, device=backend_device(backend))
    m = fi.TverskyLoss(backend=backend)
    m.alpha, m.beta, m.gamma, m.batch = 0.1, 0.9, 2.0, True
    assert torch.equal(m(x, y), FI.tversky_loss(x, y, 0.1, 0.9, 2.0, batch=True, backend=backend))
    with pytest.raises(ValueError, match="gamma"):
        m.gamma = 0.0
    assert m.gamma == 2.0
    with pytest.raises(ValueError, match="distributed=True needs batch=True"):
        fi.DiceLoss(distributed=True)
    d = fi.DiceCELoss(batch=True, distributed=True)
    with pytest.raises(ValueError, match="batch=False with distributed=True"):
        d.batch = False
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        d.reduction = "none"
    with pytest.raises(ValueError, match="weight must be finite"):
        fi.DiceLoss(weight=[1.0, float("nan"), 1.0, 1.0])
    g = fi.GeneralizedDiceLoss()
    with pytest.raises(ValueError, match="w_type"):
        g.w_type = "cube"
    with pytest.raises(TypeError, match="include_background must be a bool"):
        g.include_background = 1


def test_distributed_needs_a_fused_backend():
    # the reference computes the loss without its sums: a distributed module says so instead of a wrong number
    from fused_imbalance import functional

    with pytest.raises(RuntimeError, match="distributed=True needs a fused backend"):
        functional._dice_family(
            "dice",
            torch.zeros(1, 2, 2, 2),
            torch.zeros(1, 2, 2, dtype=torch.int64),
            -100,
            "mean",
            None,
            "reference",
            True,
            None,
            False,
            sync=lambda s: (s, 1),
            batch=True,
        )


# --- memory on a GPU ---------------------------------------------------------------------------------


@pytest.mark.cuda
def test_fused_memory_is_the_gradient_cuda():
    x, y = _data((2, 19, 256, 256), dtype=torch.float32, device="cuda", every=0)
    x.requires_grad_(True)
    FI.dice_ce_loss(x, y).backward()  # compiles
    x.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    FI.dice_ce_loss(x, y).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < x.numel() * 4 + (1 << 20), extra  # the gradient and less than 1 MiB more
