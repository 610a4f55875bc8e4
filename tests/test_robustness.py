"""Defined behaviour on bad or unusual input, everywhere: bad labels (at once on the C++ backend, deferred
without a host sync on the Triton one), non-finite logits, tensors on another device, integer arguments
as torch takes them, ops called with tensors of the wrong size, inputs beyond 2**31 elements, and no host
sync in a training step. Each loss family's own argument errors are tested with the family
(test_dice.py, test_ohem.py, test_upsample.py, test_select.py); determinism is test_determinism.py."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fused_imbalance as fi
import fused_imbalance.functional as FI
import fused_imbalance.reference as R
from cases import ALL_LOSSES, REQUIRED, backend_device, make_data
from fused_imbalance.losses import RecallLoss
from fused_imbalance.ops import Mode
from fused_imbalance.ops import select as SEL
from test_compile_cuda import STEPS, _setup, _step
from test_losses import _same_as_reference
from test_modules import batch
from test_ohem import IGN  # 255, as test_modules' IGN
from test_ohem_reference import data
from test_select import check, histogram_of, on
from test_upsample import HAVE_TRITON, _need, cpp, tup  # cpp: the C++ upsampled ops
from tolerances import LOSS_TOL, TOL


# --- bad labels -----------------------------------------------------------------------------------


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


# --- non-finite logits ----------------------------------------------------------------------------


# A −inf logit of a class that is not the label is a probability of exactly 0; only the MSE on raw
# logits, (−inf − 0)², is infinite for it.
MINUS_INF_FINITE = [n for n in ALL_LOSSES if n != "mse_outlying_logits"]


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_nan_logit_poisons_only_its_pixel(backend, name):
    """A NaN logit in a valid pixel makes that pixel's loss NaN (and so a scalar reduction NaN), as in
    torch; it leaves the loss of every other pixel alone."""
    dev = backend_device(backend)
    x, y = make_data((2, 4, 3, 3), torch.float32, every=0)
    x, y = x.to(dev), y.to(dev)
    x[1, 2, 1, 1] = float("nan")
    fn = ALL_LOSSES[name]
    per_pixel = fn(x, y, reduction="none", backend=backend).cpu()
    ref = fn(x, y, reduction="none", backend="reference").cpu()
    nan = torch.zeros_like(per_pixel, dtype=torch.bool)
    nan[1, 1, 1] = True
    if name == "recall_loss":  # the NaN pixel's argmax feeds the weights; only its own loss is NaN
        assert per_pixel[1, 1, 1].isnan()
    else:
        assert torch.equal(per_pixel.isnan(), nan)
    torch.testing.assert_close(per_pixel[~nan], ref[~nan], **LOSS_TOL[torch.float32])
    assert fn(x, y, backend=backend).isnan()


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_non_finite_logits_in_ignored_pixels_are_ignored(backend, name):
    dev = backend_device(backend)
    x, y = make_data((2, 4, 3, 3), torch.float32, every=0)
    y[0, 0, 0] = y[1, 2, 2] = -100
    x[0, :, 0, 0] = float("nan")
    x[1, :, 2, 2] = float("inf")
    loss, grad = _same_as_reference(ALL_LOSSES[name], x.to(dev), y.to(dev), backend)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[0, :, 0, 0] == 0).all() and (grad[1, :, 2, 2] == 0).all()


@pytest.mark.parametrize("name", MINUS_INF_FINITE)
def test_minus_inf_logit_of_another_class_is_finite(backend, name):
    dev = backend_device(backend)
    x, y = make_data((2, 4, 3, 3), torch.float32, every=0)
    x[:, 3] = -math.inf
    y[y == 3] = 0
    loss, grad = _same_as_reference(ALL_LOSSES[name], x.to(dev), y.to(dev), backend)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


# --- arguments: devices, integers, ranges, tensor sizes at the ops --------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, y: FI.cross_entropy(x, y, torch.ones(5, device="meta")), "weight is on meta"),
        (lambda x, y: FI.cross_entropy(x, y.to("meta")), "target is on meta"),
        (lambda x, y: FI.recall_loss(x, y, recall=torch.ones(5, device="meta")), "recall is on meta"),
        (lambda x, y: FI.mse_outlying_loss(x, y, torch.ones(5, device="meta")), "outlying is on meta"),
        (
            lambda x, y: FI.confusion_matrix(x, y, out=torch.zeros(5, 5, dtype=torch.long, device="meta")),
            "out is on meta",
        ),
    ],
)
def test_tensors_on_another_device_are_errors(call, match):
    x, y = make_data((2, 5, 3, 3), torch.float32)
    with pytest.raises(ValueError, match=match):
        call(x, y)


def _ops_of(backend):
    from fused_imbalance import functional

    functional._backend_available(backend)
    return functional._loaded[backend]


def test_ops_check_tensor_sizes_before_touching_memory(backend):
    """Called directly, every registered loss op (plain and upsampled, forward and backward) rejects a
    target, tvals, weight, confusion matrix, upstream gradient or per-class factor of the wrong size,
    with an error instead of reading out of bounds (the kernels index them with the sizes of x and
    target). The short tensors are allocations of their own, not views of longer ones, so that a read
    past their end is one for scripts/sanitize.sh too."""
    from fused_imbalance.ops import Mode

    be, dev = _ops_of(backend), backend_device(backend)
    C, mse, soft = 5, int(Mode.MSE_LOGITS), int(Mode.SOFTMAX_FOCAL)
    x, y = (t.to(dev) for t in make_data((2, C, 3, 4), torch.float32))
    y = y.reshape(-1).contiguous()
    tv, gp, gc = torch.ones(C, device=dev), torch.ones(y.numel(), device=dev), torch.ones(C, device=dev)
    conf = torch.zeros(C, C, dtype=torch.int64, device=dev)

    def fwd(x, y, mode, tvals, weight=None, confusion=None):
        return be.fwd_op(
            x,
            y,
            weight,
            tvals,
            confusion,
            mode,
            2.0,
            -100,
            0,
            1 if weight is not None else 0,
            True,
            False,
            False,
        )

    def bwd(x, y, g, scale, tvals=None):
        return be.bwd_op(x, y, g, scale, tvals, None, soft if tvals is None else mse, 2.0, -100)

    bad = [
        (lambda: fwd(x, y[:-1].clone(), soft, None), "target"),
        (lambda: fwd(x, torch.cat([y, y]), soft, None), "target"),
        (lambda: fwd(x, y, mse, tv[:-1].clone()), "tvals"),
        (lambda: fwd(x, y, mse, None), "tvals"),
        (lambda: fwd(x, y, soft, None, weight=tv[:-1].clone()), "weight"),
        (lambda: fwd(x, y, soft, None, confusion=conf[:-1].clone()), "confusion"),
        (lambda: fwd(x, y, soft, None, confusion=conf.int()), "confusion"),
        (lambda: bwd(x, y, gp[:-1].clone(), None), "gradient|grad"),
        (lambda: bwd(x, y, torch.cat([gp, gp]), None), "gradient|grad"),
        (lambda: bwd(x, y, None, gc[:-1].clone()), "scale"),
        (lambda: bwd(x, y, gp, torch.ones(2 * C, device=dev)), "scale"),
        (lambda: bwd(x, y[:-1].clone(), gp[:-1].clone(), None), "target"),
        (lambda: bwd(x, y, gp, None, tv[:-1].clone()), "tvals"),
    ]
    # upsampled: (2, C, 3, 4) logits for (2, 5, 7) labels
    yu = make_data((2, C, 5, 7), torch.float32)[1].to(dev)
    gpu = torch.ones(yu.numel(), device=dev)

    def ufwd(mode, tvals, confusion=None):
        return be.up_fwd_op(
            x, yu, 1, False, None, tvals, confusion, mode, 2.0, -100, 2, 0, True, False, False
        )

    def ubwd(g, scale, mode=soft, tvals=None):
        return be.up_bwd_op(x, yu, 1, False, g, scale, tvals, None, mode, 2.0, -100)

    bad += [
        (lambda: ufwd(mse, tv[:-1].clone()), "tvals"),
        (lambda: ufwd(mse, None), "tvals"),
        (lambda: ufwd(soft, None, conf[1:].clone()), "confusion"),
        (lambda: ubwd(gpu[:-1].clone(), None), "gradient|grad"),
        (lambda: ubwd(torch.cat([gpu, gpu]), gc), "gradient|grad"),
        (lambda: ubwd(None, gc[:-1].clone()), "scale"),
        (lambda: ubwd(gpu, torch.ones(C + 1, device=dev)), "scale"),
        (lambda: ubwd(gpu, None, mse, torch.ones(C - 1, device=dev)), "tvals"),
    ]
    for call, match in bad:
        with pytest.raises(RuntimeError, match=match):
            call()
    # and the right sizes pass
    fwd(x, y, mse, tv, weight=gc, confusion=conf)
    bwd(x, y, gp, gc)
    ufwd(soft, None, conf)
    ubwd(gpu, gc)


@pytest.mark.parametrize(
    "ignore",
    [np.int64(255), np.int32(255), torch.tensor(255), torch.tensor(255, dtype=torch.int16)],
    ids=["np.int64", "np.int32", "tensor", "tensor_int16"],
)
def test_integer_arguments_as_torch_takes_them(backend, ignore):
    """ignore_index and num_classes as numpy integers or 0-dim integer tensors, as F.cross_entropy,
    nn.CrossEntropyLoss and F.one_hot take them (configs often come from numpy); booleans stay refused."""
    from fused_imbalance import ConfusionMatrix, FocalLoss, RecallLoss

    dev = backend_device(backend)
    x, y = make_data((2, 5, 3, 4), torch.float32, ignore=255)
    x, y = x.to(dev), y.to(dev)
    want = torch.nn.functional.cross_entropy(x, y, ignore_index=255)
    torch.testing.assert_close(FI.cross_entropy(x, y, ignore_index=ignore, backend=backend), want)
    torch.testing.assert_close(FocalLoss(0.0, ignore_index=ignore, backend=backend)(x, y), want)
    cm = ConfusionMatrix(np.int64(5), ignore_index=ignore, backend=backend).to(dev)
    cm.update(x, y)
    assert cm.num_classes == 5 and type(cm.num_classes) is int
    assert torch.equal(cm.compute(), FI.confusion_matrix(x, y, ignore_index=255, backend="reference"))
    assert RecallLoss(np.int64(5), ignore_index=ignore, backend=backend)(x, y).isfinite()
    with pytest.raises(TypeError, match="ignore_index"):
        FI.cross_entropy(x, y, ignore_index=True, backend=backend)
    with pytest.raises(TypeError, match="ignore_index"):
        FI.cross_entropy(x, y, ignore_index=torch.tensor(255.0), backend=backend)
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(True)


def test_align_corners_none_is_false(backend):
    """align_corners=None means False, as in F.interpolate (where None is the default): in the
    functions, the modules and ConfusionMatrix.update."""
    from fused_imbalance import ConfusionMatrix, FocalLoss

    dev = backend_device(backend)
    x, y = make_data((2, 5, 3, 4), torch.float32)
    y = torch.randint(0, 5, (2, 7, 9))
    x, y = x.to(dev), y.to(dev)
    kw = dict(upsample="bilinear", backend=backend)
    want = FI.focal_loss(x, y, align_corners=False, **kw)
    torch.testing.assert_close(FI.focal_loss(x, y, align_corners=None, **kw), want)
    torch.testing.assert_close(FocalLoss(align_corners=None, **kw)(x, y), want)
    cm = ConfusionMatrix(5, backend=backend).to(dev)
    cm.update(x, y, upsample="bilinear", align_corners=None)
    assert torch.equal(cm.compute(), FI.confusion_matrix(x, y, upsample="bilinear", backend="reference"))
    FI.cross_entropy(
        torch.randn(4, 5, device=dev),
        torch.zeros(4, dtype=torch.int64, device=dev),
        align_corners=None,
        backend=backend,
    )  # None without upsample: nothing to interpolate


@pytest.mark.parametrize(
    "bad",
    [[0.5, 85.0, 0.2, 0.1, 0.9], [0.5, -0.1, 0.2, 0.1, 0.9], [0.5, float("nan"), 0.2, 0.1, 0.9]],
    ids=["percent", "negative", "nan"],
)
def test_recall_out_of_range_is_an_error(backend, bad):
    """A recall outside [0, 1] (a percentage, say) or NaN is a ValueError naming recall, on every
    backend, never a negative or NaN loss; for CPU tensors at once."""
    dev = backend_device(backend)
    x, y = make_data((2, 5, 3, 4), torch.float32)
    x, y = x.to(dev), y.to(dev)
    for b in (backend, "reference"):
        with pytest.raises(ValueError, match="recall must hold recalls in \\[0, 1\\]"):
            FI.recall_loss(x, y, recall=torch.tensor(bad, device=dev), backend=b)
        with pytest.raises(ValueError, match="recall"):
            FI.recall_loss(x, y, recall=lambda count, tp: torch.tensor(bad, device=dev), backend=b)
    FI.recall_loss(x, y, recall=torch.tensor([0.0, 1.0, 0.2, 0.1, 0.9], device=dev), backend=backend)


# --- more than 2^31 elements ----------------------------------------------------------------------


def _huge_case(n_pixels, device, dtype):
    """Logits (1, 2, n) that are the same two values at every pixel (expanded: no memory) and real
    uint8 labels whose classes change along the pixels, so a wrapped 32-bit pixel index reads the
    wrong label and changes the counts."""
    a, b = 0.25, -1.5
    x = torch.tensor([a, b], dtype=dtype, device=device).view(1, 2, 1).expand(1, 2, n_pixels)
    y = torch.zeros(1, n_pixels, dtype=torch.uint8, device=device)
    n1 = n_pixels // 3
    y[0, -n1:] = 1  # the last third, past 2**31, is class 1
    y[0, -7:] = 255  # and the very last pixels are ignored
    lse = math.log(math.exp(a) + math.exp(b))
    n0 = n_pixels - n1
    n1 -= 7
    return x, y, (n0, n1), n0 * (lse - a) + n1 * (lse - b)


@pytest.mark.slow
def test_more_than_2_31_pixels_cpu():
    """Counts, true positives, confusion and loss over 2**31 + 2**10 pixels (2**32 + 2**11 logits) on
    the C++ backend, in one pass of the op (every output of the contract: each pass over 2**31 pixels
    takes tens of seconds on 2 cores)."""
    try:
        FI.resolve_backend("cpp", torch.zeros(1, 2))
    except RuntimeError as e:
        pytest.skip(f"cpp backend unavailable: {e}")
    from fused_imbalance.ops import Mode, Reduction, Weighting, cpp

    n = 2**31 + 2**10
    x, y, (n0, n1), total = _huge_case(n, "cpu", torch.float32)
    conf = torch.zeros(2, 2, dtype=torch.int64)
    class_loss, _, count, tp, bad, _ = cpp.backend().fwd(
        x,
        y,
        None,
        None,
        conf,
        int(Mode.SOFTMAX_FOCAL),
        0.0,
        255,
        int(Reduction.CLASS),
        int(Weighting.NONE),
        True,
        True,
        False,
    )
    assert count.tolist() == [n0, n1] and tp.tolist() == [n0, 0] and int(bad[0]) == 0
    assert conf.tolist() == [[n0, 0], [n1, 0]]  # class 0's logit is the larger one at every pixel
    # what cross_entropy(reduction="sum") returns from these outputs
    assert class_loss.double().sum().item() == pytest.approx(total, rel=1e-5)


@pytest.mark.cuda
def test_more_than_2_31_elements_cuda():
    """A real (not expanded) bfloat16 input of more than 2**31 elements, forward and backward."""
    n = 2**30 + 2**20
    x = torch.randn(1, 2, n, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, 2, (1, n), device="cuda", dtype=torch.uint8)
    y[0, -1000:] = 1
    x.requires_grad_(True)
    loss = FI.cross_entropy(x, y, reduction="sum", backend="triton")
    loss.backward()
    xf = x.detach().float()
    lse = torch.logsumexp(xf, dim=1)
    expected = (lse - xf.gather(1, y.long()[:, None]).squeeze(1)).double().sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    p_tail = torch.softmax(xf[:, :, -1000:], dim=1)
    torch.testing.assert_close(x.grad[0, 1, -1000:].float(), (p_tail[0, 1] - 1), **TOL[torch.bfloat16])


@pytest.mark.slow
def test_more_than_2_31_full_resolution_pixels_cpu():
    """2**31 + 2**20 full-resolution pixels (uint8 labels, C = 2) from 1 × 4 low-resolution logits,
    bilinear, on the C++ backend: one forward pass of the op in the MSE-on-logits mode (the loss
    of mse_outlying_loss; no exp/log per logit keeps the pass to a few seconds on 2 cores) without
    per-pixel loss, so nothing of B·H·W floats (2.5 GB in all, the labels). Every full-resolution
    row is the same interpolated row R (h = 1) and the labels are blocks of rows and columns, so
    the expected sums follow from per-column class counts: n_c(X) pixels of class c at column X
    give Σ_X n_c(X)·½ Σ_k (R[k, X] − t_c·[k = c])². A 32-bit pixel offset reads the labels of the
    wrong rows and changes the counts."""
    _need("cpp")
    H, W = 2**16 + 32, 2**15
    x = torch.tensor([[0.5, -1.0, 2.0, 0.25], [-0.75, 1.5, -0.5, 0.0]]).view(1, 2, 1, 4)
    tvals = torch.tensor([1.0, 3.0])
    y = torch.zeros(1, H, W, dtype=torch.uint8)
    top, bottom = H // 4, H - H // 3
    y[0, bottom:] = 1  # the last third of the rows, past pixel 2**31, is class 1
    y[0, :top, ::3] = 1  # and every third column of the first quarter
    y[0, -1, -7:] = 255  # the very last pixels are ignored
    col = torch.arange(W)
    n1 = (H - bottom) + torch.where(col % 3 == 0, top, 0) - torch.where(col >= W - 7, 1, 0)
    n0 = H - (H - bottom) - torch.where(col % 3 == 0, top, 0)
    row = R.upsampled(x.double(), (1, W), "bilinear")[0, :, 0]  # (2, W): the spec's interpolated row
    l0 = 0.5 * ((row[0] - tvals[0]) ** 2 + row[1] ** 2)  # per-pixel loss of class 0 at each column
    l1 = 0.5 * (row[0] ** 2 + (row[1] - tvals[1]) ** 2)
    want_loss = torch.stack([(n0 * l0).sum(), (n1 * l1).sum()])
    pred = row.argmax(0)
    want_tp = torch.stack([(n0 * (pred == 0)).sum(), (n1 * (pred == 1)).sum()])
    _, class_loss, count, tp, bad, _, _ = cpp.upsample_loss_fwd(
        x, y, 1, False, int(Mode.MSE_LOGITS), 0.0, tvals, 255, False, True, False
    )
    assert count.tolist() == [int(n0.sum()), int(n1.sum())] and sum(count.tolist()) == H * W - 7
    assert tp.tolist() == want_tp.tolist() and 0 < tp.sum() < count.sum()
    assert int(bad) == 0
    torch.testing.assert_close(class_loss.double(), want_loss, rtol=1e-5, atol=0)
    # what reduction="mean" returns from these outputs
    torch.testing.assert_close(
        class_loss.double().sum() / count.sum(), want_loss.sum() / (H * W - 7), rtol=1e-5, atol=0
    )


def _need_cuda_triton():
    """The Triton upsampled kernels on a GPU, on CUDA tensors (this module's other Triton tests give
    them CPU tensors: through the interpreter, or copied to the GPU by _triton_on_the_gpu)."""
    if tup is None or not HAVE_TRITON:
        if "triton" in REQUIRED:
            pytest.fail("backend 'triton' is required but unavailable")
        pytest.skip("the Triton backend is unavailable")


@pytest.mark.cuda
def test_more_than_2_31_full_resolution_pixels_cuda():
    """bfloat16 low-resolution logits against 2**31 + 2**21 full-resolution uint8 labels on the
    Triton backend, forward and backward (reduction "sum"), against a chunked float64 reference:
    the bilinear interpolation is separable, so the vertical pass of the whole image (C × H × w)
    followed by the horizontal pass of a band of rows is the spec's F.interpolate, band by band."""
    _need_cuda_triton()
    B, C, h, w, H, W = 1, 3, 40, 64, 2**15 + 32, 2**16
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (2 * torch.randn(B, C, h, w, device="cuda", generator=g)).to(torch.bfloat16)
    y = torch.randint(0, C, (B, H, W), device="cuda", dtype=torch.uint8, generator=g)
    y[0, -3:, :] = 255
    xr = x.detach().requires_grad_(True)
    loss = FI.cross_entropy(xr, y, ignore_index=255, reduction="sum", upsample="bilinear", backend="triton")
    loss.backward()

    x64 = x.detach().double().requires_grad_(True)
    v = F.interpolate(x64, size=(H, w), mode="bilinear", align_corners=False)  # vertical pass only
    gv = torch.zeros_like(v)
    total = torch.zeros((), dtype=torch.float64, device="cuda")
    band = 2**9
    for y0 in range(0, H, band):
        vb = v.detach()[:, :, y0 : y0 + band].requires_grad_(True)
        xb = F.interpolate(vb, size=(vb.shape[2], W), mode="bilinear", align_corners=False)  # horizontal
        lb = F.cross_entropy(xb, y[:, y0 : y0 + band].long(), ignore_index=255, reduction="sum")
        lb.backward()
        gv[:, :, y0 : y0 + band] = vb.grad
        total += lb.detach()
    v.backward(gv)
    assert loss.item() == pytest.approx(total.item(), rel=1e-4)
    # A low-resolution logit gathers the gradient of about s = (H/h)·(W/w) pixels: compared per
    # pixel (both divided by s) so that the table's bfloat16 atol applies to O(1) values.
    s = (H / h) * (W / w)
    torch.testing.assert_close(xr.grad.double() / s, x64.grad / s, **TOL[torch.bfloat16])


# --- no host sync in a training step --------------------------------------------------------------


@pytest.mark.cuda
def test_recall_forward_has_no_host_sync(backend):
    # the moving average and the weights stay on the device: with validate=False a training
    # step of RecallLoss never waits for the GPU
    if backend_device(backend) != "cuda":
        pytest.skip("host syncs are a CUDA matter")
    logits, target = batch()
    logits, target = logits.cuda().requires_grad_(), target.cuda()
    m = RecallLoss(5, momentum=0.9, ignore_index=IGN, backend=backend, validate=False).cuda()
    m(logits, target)  # warm-up: kernel compilation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m(logits, target).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_training_step_has_no_host_sync():
    x, y = data(shape=(2, 19, 64, 64), dtype=torch.float32, seed=73)
    x, y = x.cuda().requires_grad_(True), y.cuda()
    FI.ohem_cross_entropy(x, y, ignore_index=IGN, backend="triton", validate=False).backward()  # compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        FI.ohem_cross_entropy(x, y, ignore_index=IGN, backend="triton").backward()
        FI.ohem_cross_entropy(
            x[:, :, ::4, ::4].contiguous(), y, ignore_index=IGN, backend="triton", upsample="bilinear"
        ).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_no_host_sync_cuda():
    v = torch.rand(200_000, device="cuda")
    v[::3] = -1.0
    fh = histogram_of(v.cpu()).cuda()
    k = torch.tensor(1234, device="cuda")
    SEL.select_kth(v, k)  # compile and load outside the check
    SEL.select_kth(v, 5, fh)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = SEL.select_kth(v, k)
        b = SEL.select_kth(v, 5, fh)
        c = SEL.select_kth(v, k, backend="reference")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    check(a, v.cpu(), 1234)
    check(b, v.cpu(), 5)
    check(c, v.cpu(), 1234)


def test_no_host_sync_cpu(sel_backend, monkeypatch):
    """No tensor value reaches Python on the way: every conversion that would wait for a device
    raises while the selection runs (k a tensor, as the loss passes it)."""
    v = torch.rand(1500)
    v[::4] = -1.0
    k = torch.tensor(321)
    fh = histogram_of(v) if sel_backend != "reference" else None
    SEL.select_kth(on(sel_backend, v), on(sel_backend, k), fh, backend=sel_backend)  # load the backend first

    def sync(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    got = SEL.select_kth(on(sel_backend, v), on(sel_backend, k), fh, backend=sel_backend)
    monkeypatch.undo()
    check(got, v, 321)


@pytest.mark.cuda
def test_no_host_sync_in_a_step():
    """torch.cuda.set_sync_debug_mode("error"): a step of each loss never synchronises the host with the
    device (labels checked without one, loss finished on the device)."""
    for name in STEPS:
        net, opt, x, y, loss_fn = _setup(name)
        _step(net, opt, x, y, loss_fn)  # first call: loads, compiles, caches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _step(net, opt, x, y, loss_fn)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    fi.check_deferred()
