"""What users of long training runs rely on: defined behaviour on bad or unusual input, the same
answer on every backend, determinism, and inputs beyond 2**31 elements."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_imbalance.functional as FI
from cases import ALL_LOSSES, backend_device, loss_and_grad, make_data
from tolerances import LOSS_TOL, TOL

# A −inf logit of a class that is not the label is a probability of exactly 0; only the MSE on raw
# logits, (−inf − 0)², is infinite for it.
MINUS_INF_FINITE = [n for n in ALL_LOSSES if n != "mse_outlying_logits"]


def _same_as_reference(fn, x, y, backend, reduction="mean", **kw):
    loss, grad = loss_and_grad(fn, x, y, backend, reduction, **kw)
    ref_loss, ref_grad = loss_and_grad(fn, x, y, "reference", reduction, **kw)
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL[x.dtype], equal_nan=True)
    torch.testing.assert_close(grad, ref_grad, **TOL[x.dtype], equal_nan=True)
    return loss, grad


# --- non-finite logits ---------------------------------------------------------------------


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


# --- class weights: non-finite values and a negative sum, as torch -------------------------

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


# --- confident logits ------------------------------------------------------------------------


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


# --- devices and views -----------------------------------------------------------------------


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


# --- fuzz --------------------------------------------------------------------------------------


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


# --- determinism -----------------------------------------------------------------------------


def test_deterministic_algorithms_mode(backend):
    """Under torch.use_deterministic_algorithms(True) every backend runs (no nondeterministic op is
    taken) and repeated runs are bit-identical."""
    dev = backend_device(backend)
    x, y = make_data((2, 19, 16, 17), torch.float32)
    x, y = x.to(dev), y.to(dev)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for name in ALL_LOSSES:
            runs = [loss_and_grad(ALL_LOSSES[name], x, y, backend) for _ in range(3)]
            for loss, grad in runs[1:]:
                assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1]), name
            conf = [FI.confusion_matrix(x, y, backend=backend) for _ in range(2)]
            assert torch.equal(conf[0], conf[1])
    finally:
        torch.use_deterministic_algorithms(prev)


# --- beyond 2**31 elements -------------------------------------------------------------------


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


# --- what autograd cannot do with a fused op: a clear error, never a wrong number ---------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", ["focal_loss", "sigmoid_focal_loss", "recall_loss", "mse_outlying_loss"])
def test_double_backward_is_an_error(backend, name, reduction):
    """The first derivative with create_graph=True is right; asking for the second raises (the
    fused backward has no derivative) instead of returning one without the second-order term."""
    dev = backend_device(backend)
    x, y = make_data((2, 4, 3, 3), torch.float64)
    x, y = x.to(dev).requires_grad_(True), y.to(dev)
    fn = ALL_LOSSES[name]
    (g,) = torch.autograd.grad(fn(x, y, reduction=reduction, backend=backend).sum(), x, create_graph=True)
    (want,) = torch.autograd.grad(fn(x, y, reduction=reduction, backend="reference").sum(), x)
    torch.testing.assert_close(g.detach(), want, **TOL[torch.float64])
    with pytest.raises(RuntimeError, match="second derivatives of the fused losses are not implemented"):
        torch.autograd.grad((g * g).sum(), x)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ["focal_loss", "recall_loss", "cb_sigmoid", "mse_outlying_loss"])
def test_forward_mode_derivatives(backend, name, reduction):
    """torch.autograd.forward_ad and torch.func.jvp give the loss's tangent ⟨∂L/∂x, t⟩ (per pixel for
    "none") on the fused backends, as on the reference; torch.func.grad gives the gradient."""
    import torch.autograd.forward_ad as fwAD

    dev = backend_device(backend)
    x, y = make_data((2, 4, 3, 3), torch.float64)
    x, y = x.to(dev), y.to(dev)
    t = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dev)
    fn = ALL_LOSSES[name]
    want_out, want_t = torch.func.jvp(
        lambda a: fn(a, y, reduction=reduction, backend="reference"), (x,), (t,)
    )
    out, tangent = torch.func.jvp(lambda a: fn(a, y, reduction=reduction, backend=backend), (x,), (t,))
    torch.testing.assert_close(out, want_out, **TOL[torch.float64])
    torch.testing.assert_close(tangent, want_t, **TOL[torch.float64])
    with fwAD.dual_level():
        dual = fn(fwAD.make_dual(x, t), y, reduction=reduction, backend=backend)
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, want_t, **TOL[torch.float64])
    g = torch.func.grad(lambda a: fn(a, y, reduction=reduction, backend=backend).sum())(x)
    want_g = torch.func.grad(lambda a: fn(a, y, reduction=reduction, backend="reference").sum())(x)
    torch.testing.assert_close(g, want_g, **TOL[torch.float64])


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
def test_jacobians(backend, transform, reduction):
    """torch.func.jacrev and jacfwd of a fused loss: the reference's Jacobian (per pixel for "none")."""
    dev = backend_device(backend)
    x, y = make_data((2, 4, 3, 3), torch.float64)
    x, y = x.to(dev), y.to(dev)
    tf = getattr(torch.func, transform)
    got = tf(lambda t: FI.focal_loss(t, y, reduction=reduction, backend=backend))(x)
    want = tf(lambda t: FI.focal_loss(t, y, reduction=reduction, backend="reference"))(x)
    torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_vmap_says_what_is_unsupported(backend):
    """vmap over the loss would batch the kernels: an error that says so, never a wrong number; the
    reference works under it."""
    dev = backend_device(backend)
    x, y = make_data((2, 4, 3, 3), torch.float64)
    x, y = x.to(dev), y.to(dev)
    batch = x[None].expand(2, *x.shape)
    with pytest.raises(RuntimeError, match=f"torch.func.vmap over a fused loss .* '{backend}' backend"):
        torch.func.vmap(lambda t: FI.focal_loss(t, y, backend=backend))(batch)
    got = torch.func.vmap(lambda t: FI.focal_loss(t, y, backend="reference"))(batch)
    torch.testing.assert_close(got[0], FI.focal_loss(x, y, backend=backend), **TOL[torch.float64])


# --- arguments as torch takes them ---------------------------------------------------------------


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


def test_confusion_update_needs_no_c_by_c_scratch(backend):
    """Adding a few pixels' confusion counts into a large matrix allocates nothing of C x C beyond the
    caller's matrix (the counts go straight into it), on every path."""
    from torch.profiler import ProfilerActivity, profile

    dev = backend_device(backend)
    C = 3000
    x = torch.randn(4, C, device=dev)
    y = torch.tensor([0, 5, C - 1, -100], device=dev)
    out = torch.zeros(C, C, dtype=torch.int64, device=dev)
    FI.confusion_matrix(x, y, out=out, backend=backend)  # first call: loads, compiles
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        FI.confusion_matrix(x, y, out=out, backend=backend)
        FI.cross_entropy(x, y, confusion=out, backend=backend)
    largest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    assert largest < C * C, largest  # well below one int8 C x C matrix (72 MB of int64)
    assert int(out.sum()) == 9 and int(out[C - 1].argmax()) == int(
        x[2].argmax()
    )  # 3 calls x 3 labelled pixels
