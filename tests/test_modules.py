"""Loss modules: equal to the functional calls, buffers, and the dynamic weights worked by hand."""

import collections
import math
import os

import pytest
import torch
from cases import backend_device
from tolerances import LOSS_TOL, TOL

from fused_imbalance import _fused, functional, weights
from fused_imbalance.losses import CDBLoss, ClassBalancedLoss, FocalLoss, OutlyingMSELoss, RecallLoss
from fused_imbalance.metrics import ConfusionMatrix
from fused_imbalance.ops import Reduction

IGN = 255
COUNTS = [500, 20, 3, 0, 77]


def batch(C=5, shape=(2, 3, 7), dtype=torch.float32, seed=0):
    """(B, C, H, W) logits and (B, H, W) uint8 labels with ignored pixels and class 3 absent."""
    g = torch.Generator().manual_seed(seed)
    B, H, W = shape
    logits = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    target = torch.randint(0, C, (B, H, W), generator=g)
    target[target == 3] = 0
    target[torch.rand(B, H, W, generator=g) < 0.2] = IGN
    return logits, target.to(torch.uint8)


def assert_same_loss_and_grad(module, fn, logits, target):
    """module(logits, target) == fn(logits, target), values and gradients."""
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    a, b = module(x1, target), fn(x2, target)
    torch.testing.assert_close(a, b, **LOSS_TOL[logits.dtype])
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **TOL[logits.dtype])


# ---------------------------------------------------------------- module == functional


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weight", [None, [1.0, 2.0, 0.5, 3.0, 0.25]])
def test_focal_loss_module(reduction, weight):
    logits, target = batch()
    m = FocalLoss(gamma=1.5, weight=weight, ignore_index=IGN, reduction=reduction, backend="reference")
    w = None if weight is None else torch.tensor(weight)
    assert_same_loss_and_grad(
        m,
        lambda x, y: functional.focal_loss(x, y, 1.5, w, IGN, reduction, backend="reference"),
        logits,
        target,
    )


def test_focal_loss_gamma_zero_is_torch_cross_entropy():
    # an independent check of the whole chain module -> functional -> reference
    logits, target = batch(dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 0.5, 3.0, 0.25], dtype=torch.float64)
    m = FocalLoss(gamma=0.0, weight=w, ignore_index=IGN, backend="reference")
    expected = torch.nn.functional.cross_entropy(logits, target.long(), weight=w, ignore_index=IGN)
    torch.testing.assert_close(m(logits, target), expected, **TOL[torch.float64])


@pytest.mark.parametrize("loss_type", ["softmax", "sigmoid", "focal", "softmax_focal"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_class_balanced_module(loss_type, reduction):
    logits, target = batch()
    m = ClassBalancedLoss(
        COUNTS,
        beta=0.99,
        loss_type=loss_type,
        gamma=0.5,
        ignore_index=IGN,
        reduction=reduction,
        backend="reference",
    )
    torch.testing.assert_close(m.weight, weights.effective_number(COUNTS, 0.99), atol=0, rtol=0)
    assert_same_loss_and_grad(
        m,
        lambda x, y: functional.class_balanced_loss(
            x, y, COUNTS, 0.99, loss_type, 0.5, IGN, reduction, backend="reference"
        ),
        logits,
        target,
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_recall_module_without_momentum(reduction):
    logits, target = batch()
    for distributed in (False, True):  # without torch.distributed initialised: the same loss
        m = RecallLoss(5, ignore_index=IGN, reduction=reduction, distributed=distributed, backend="reference")
        assert_same_loss_and_grad(
            m, lambda x, y: functional.recall_loss(x, y, IGN, reduction, backend="reference"), logits, target
        )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_recall_module_fused(backend, reduction):
    # the fused backends are compared with the reference elsewhere; here the module's recall
    # callback must see their statistics: momentum 0 is the batch recall once a class is seen
    dev = backend_device(backend)
    logits, target = batch()
    expected = functional.recall_loss(logits, target, IGN, reduction, backend="reference")
    for momentum in (None, 0.0):
        m = RecallLoss(
            5, momentum=momentum, ignore_index=IGN, reduction=reduction, distributed=True, backend=backend
        ).to(dev)
        torch.testing.assert_close(
            m(logits.to(dev), target.to(dev)).cpu(), expected, **LOSS_TOL[torch.float32]
        )


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_cdb_module(gamma):
    logits, target = batch()
    acc = [0.9, 0.5, 0.2, 0.0, 0.7]
    m = CDBLoss(5, gamma=gamma, ignore_index=IGN, backend="reference")
    # before any update the weights are ones: the plain (focal) loss averaged over valid pixels
    assert_same_loss_and_grad(
        m, lambda x, y: functional.focal_loss(x, y, gamma, None, IGN, backend="reference"), logits, target
    )
    m.update(acc)
    assert_same_loss_and_grad(
        m,
        lambda x, y: functional.cdb_loss(x, y, torch.tensor(acc), "dynamic", gamma, IGN, backend="reference"),
        logits,
        target,
    )
    m = CDBLoss(5, tau=1.5, gamma=gamma, ignore_index=IGN, reduction="sum", backend="reference")
    m.update(torch.tensor(acc))
    assert_same_loss_and_grad(
        m,
        lambda x, y: functional.cdb_loss(x, y, acc, 1.5, gamma, IGN, "sum", backend="reference"),
        logits,
        target,
    )


@pytest.mark.parametrize("input", ["logits", "softmax"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_outlying_mse_module(input, reduction):
    logits, target = batch()
    m = OutlyingMSELoss(
        COUNTS, alpha=0.5, input=input, ignore_index=IGN, reduction=reduction, backend="reference"
    )
    out = weights.outlying_labels(COUNTS, 0.5)
    torch.testing.assert_close(m.outlying, torch.tensor([0.5, 1.5, 2.0, 2.5, 1.0]), atol=0, rtol=0)
    assert_same_loss_and_grad(
        m,
        lambda x, y: functional.mse_outlying_loss(x, y, out, IGN, reduction, input, backend="reference"),
        logits,
        target,
    )


def test_modules_forward_confusion():
    logits, target = batch()
    expected = ConfusionMatrix(5, ignore_index=IGN)
    expected.update(logits, target)
    cdb = CDBLoss(5, ignore_index=IGN, backend="reference")
    cdb.update([0.5] * 5)
    modules = [
        FocalLoss(ignore_index=IGN, backend="reference"),
        ClassBalancedLoss(COUNTS, ignore_index=IGN, backend="reference"),
        RecallLoss(5, ignore_index=IGN, backend="reference"),
        RecallLoss(5, momentum=0.5, ignore_index=IGN, backend="reference"),
        cdb,
        OutlyingMSELoss(COUNTS, ignore_index=IGN, backend="reference"),
    ]
    for m in modules:
        confusion = torch.zeros(5, 5, dtype=torch.int64)
        m(logits, target, confusion=confusion)
        assert torch.equal(confusion, expected.compute()), type(m).__name__


def test_per_class_values_as_a_mapping_are_read_in_class_order():
    """A Counter of the labels (keys in the order the classes were first seen) or any {class: value}
    mapping gives what the values in class order give: to every module and loss that takes
    per-class counts, class weights or accuracies."""
    counts = collections.Counter([2] * 3 + [4] * 77 + [0] * 500 + [1] * 20)
    counts[3] = 0
    assert list(counts) != list(range(5))  # not in class order
    logits, target = batch()
    for make in (
        lambda c: ClassBalancedLoss(c, beta=0.999, ignore_index=IGN, backend="reference"),
        lambda c: OutlyingMSELoss(c, ignore_index=IGN, backend="reference"),
    ):
        torch.testing.assert_close(make(counts)(logits, target), make(COUNTS)(logits, target), rtol=0, atol=0)
    for backend in ("reference", None):  # None: the fused backend of the CPU where there is one
        torch.testing.assert_close(
            functional.class_balanced_loss(logits, target, counts, 0.999, ignore_index=IGN, backend=backend),
            functional.class_balanced_loss(logits, target, COUNTS, 0.999, ignore_index=IGN, backend=backend),
            rtol=0,
            atol=0,
        )
    accuracy = {4: 0.7, 0: 0.9, 1: 0.5, 2: 0.2, 3: 0.1}
    m = CDBLoss(5, ignore_index=IGN, backend="reference")
    m.update(accuracy)
    in_order = CDBLoss(5)
    in_order.update([0.9, 0.5, 0.2, 0.1, 0.7])
    torch.testing.assert_close(m.weight, in_order.weight, rtol=0, atol=0)
    torch.testing.assert_close(
        functional.cdb_loss(logits, target, accuracy, ignore_index=IGN, backend="reference"),
        functional.cdb_loss(logits, target, [0.9, 0.5, 0.2, 0.1, 0.7], ignore_index=IGN, backend="reference"),
        rtol=0,
        atol=0,
    )
    w = {1: 2.0, 0: 1.0, 2: 0.5, 3: 3.0, 4: 0.25}
    assert torch.equal(FocalLoss(weight=w).weight, torch.tensor([1.0, 2.0, 0.5, 3.0, 0.25]))
    with pytest.raises(TypeError, match="samples_per_class.*without class 3"):
        ClassBalancedLoss({0: 500, 1: 20, 2: 3, 4: 77})
    with pytest.raises(TypeError, match="class_accuracy.*class order"):
        m.update({0.9, 0.5, 0.2, 0.1, 0.7})


# ---------------------------------------------------------------- buffers


def test_buffers_state_dict_and_to():
    modules = {
        "focal": (
            FocalLoss(weight=[1.0, 2.0, 0.5, 3.0, 0.25], ignore_index=IGN, backend="reference"),
            ["weight"],
        ),
        "cb": (ClassBalancedLoss(COUNTS, ignore_index=IGN, backend="reference"), ["weight"]),
        "recall": (
            RecallLoss(5, momentum=0.9, ignore_index=IGN, backend="reference"),
            ["running_recall", "seen"],
        ),
        "cdb": (CDBLoss(5, ignore_index=IGN, backend="reference"), ["weight"]),
        "mse": (OutlyingMSELoss(COUNTS, ignore_index=IGN, backend="reference"), ["outlying"]),
    }
    logits, target = batch()
    for name, (m, buffers) in modules.items():
        assert sorted(m.state_dict()) == sorted(buffers), name
        float_buffers = [b for b in buffers if getattr(m, b).is_floating_point()]
        m.to(torch.float64).to("cpu")
        for b in float_buffers:
            assert getattr(m, b).dtype == torch.float64, (name, b)
        # float64 buffers serve float32 and float64 logits alike
        assert m(logits, target).dtype == torch.float32
        assert m(logits.double(), target).dtype == torch.float64
    assert modules["recall"][0].seen.dtype == torch.bool
    # no weight: no buffer in the state dict
    assert list(FocalLoss().state_dict()) == []
    assert list(RecallLoss(3).state_dict()) == []


def test_state_dict_round_trip():
    logits, target = batch()
    a = RecallLoss(5, momentum=0.8, ignore_index=IGN, backend="reference")
    a(logits, target)
    b = RecallLoss(5, momentum=0.8, ignore_index=IGN, backend="reference")
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.running_recall, b.running_recall) and torch.equal(a.seen, b.seen)
    c = CDBLoss(5, backend="reference")
    c.update([0.9, 0.5, 0.2, 0.1, 0.7])
    d = CDBLoss(5, backend="reference")
    d.load_state_dict(c.state_dict())
    assert torch.equal(c.weight, d.weight)


# ---------------------------------------------------------------- options set after construction

ACC = [0.9, 0.5, 0.2, 0.1, 0.7]


def _factory(cls, *args, **defaults):
    return lambda **k: cls(*args, **{"ignore_index": IGN, "backend": "reference", **defaults, **k})


def _cdb(**k):
    m = CDBLoss(5, **{"ignore_index": IGN, "backend": "reference", **k})
    m.update(ACC)
    return m


FOCAL = _factory(FocalLoss)
CB = _factory(ClassBalancedLoss, samples_per_class=COUNTS)
MSE = _factory(OutlyingMSELoss, samples_per_class=COUNTS)
RECALL = _factory(RecallLoss, 5, momentum=0.5)
# (module factory taking the option as a keyword, option, a new valid value, invalid values and their error)
OPTION_CASES = [
    (FOCAL, "gamma", 0.5, [(-1.0, ValueError), ("2", TypeError)]),
    (
        FOCAL,
        "weight",
        [1.0, 2.0, 0.5, 3.0, 0.25],
        [(torch.ones(5, 1), ValueError), ({0: 1.0, 2: 1.0}, TypeError)],
    ),
    (FOCAL, "reduction", "sum", [("avg", ValueError)]),
    (_factory(FocalLoss, ignore_index=-100), "ignore_index", IGN, [(None, TypeError), (1.5, TypeError)]),
    (_factory(FocalLoss, backend="cpp"), "backend", "reference", [("cuda", ValueError)]),
    (FOCAL, "validate", False, [("no", TypeError), (0, TypeError)]),
    (FOCAL, "upsample", "bilinear", [("bicubic", ValueError)]),
    (_factory(FocalLoss, upsample="bilinear"), "align_corners", True, [(1, TypeError)]),
    (CB, "beta", 0.9, [(1.0, ValueError), (-0.5, ValueError)]),
    (
        CB,
        "samples_per_class",
        [10, 20, 30, 40, 50],
        [([1, -2, 3, 4, 5], ValueError), ({0: 1, 2: 3}, TypeError)],
    ),
    (MSE, "samples_per_class", [10, 20, 30, 40, 50], [([0, 0, 0, 0, 0], ValueError), (7, TypeError)]),
    (CB, "loss_type", "focal", [("logistic", ValueError)]),
    (CB, "gamma", 1.0, [(-1.0, ValueError)]),
    (MSE, "alpha", 2.0, [(0.0, ValueError), (float("nan"), ValueError)]),
    (MSE, "input", "softmax", [("probs", ValueError)]),
    (MSE, "reduction", "none", [("avg", ValueError)]),
    (RECALL, "momentum", 0.9, [(1.0, ValueError), (-0.1, ValueError)]),
    (RECALL, "distributed", True, [("yes", TypeError)]),
    (_factory(RecallLoss, 5, ignore_index=-100), "ignore_index", IGN, [(None, TypeError)]),
    (_cdb, "tau", 2.0, [("fixed", ValueError), (-1.0, ValueError)]),
    (_cdb, "gamma", 2.0, [(-1.0, ValueError)]),
]


@pytest.mark.parametrize(
    "make, name, value, bad", OPTION_CASES, ids=[f"{i}-{c[1]}" for i, c in enumerate(OPTION_CASES)]
)
def test_an_option_set_later_takes_effect_or_raises(make, name, value, bad):
    """Setting an option of a built module gives the module built with it (value, weights, repr);
    a value the constructor rejects is rejected when set, with the same error, and changes
    nothing."""
    logits, target = batch()
    if name in ("upsample", "align_corners"):  # low-resolution logits for labels of twice the size
        target = target.repeat_interleave(2, 1).repeat_interleave(2, 2)
    if name == "validate":
        target = target.clone()
        target[0, 0, 0] = 7  # counted as ignored with validate=False, an error with True
    m = make()
    setattr(m, name, value)
    built = make(**{name: value})
    assert repr(m) == repr(built)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), built.state_dict().values()))
    torch.testing.assert_close(m(logits, target), built(logits, target), rtol=0, atol=0)
    before = {**m.state_dict(), name: getattr(m, name)}
    for v, error in bad:
        with pytest.raises(error, match=name):
            setattr(m, name, v)
        with pytest.raises(error, match=name):
            make(**{name: v})
        after = {**m.state_dict(), name: getattr(m, name)}
        for key, was in before.items():
            assert torch.equal(after[key], was) if isinstance(was, torch.Tensor) else after[key] == was, key


def test_counts_set_later_keep_the_number_of_classes():
    for m in (ClassBalancedLoss(COUNTS), OutlyingMSELoss(COUNTS)):
        with pytest.raises(ValueError, match="samples_per_class has 4 classes, the module was built with 5"):
            m.samples_per_class = COUNTS[:4]
        assert m.samples_per_class.tolist() == COUNTS


def test_momentum_changes_between_numbers_only():
    """running_recall and seen exist only with a momentum: None <-> a number would need a new module."""
    for m, value in [(RecallLoss(5, momentum=0.5), None), (RecallLoss(5), 0.9)]:
        with pytest.raises(ValueError, match="momentum can change from one number to another"):
            m.momentum = value
        assert m.momentum != value


def test_a_weight_set_later_is_the_modules_own_copy():
    w = torch.tensor([1, 2, 0, 3, 1])
    m = FocalLoss()
    m.weight = w
    w[0] = 100
    assert m.weight.dtype == torch.float32 and m.weight.tolist() == [1.0, 2.0, 0.0, 3.0, 1.0]
    m.weight = None
    assert m.weight is None and list(m.state_dict()) == []


def test_the_upsample_pair_is_checked_together():
    m = FocalLoss(upsample="bilinear", align_corners=True)
    with pytest.raises(ValueError, match="align_corners"):
        m.upsample = "nearest"  # not with align_corners=True, as at construction
    m.align_corners = False
    m.upsample = "nearest"
    assert (m.upsample, m.align_corners) == ("nearest", False)


def test_derived_buffers_and_num_classes_cannot_be_assigned():
    cm = ConfusionMatrix(5)
    for m, name in [
        (RecallLoss(5), "num_classes"),
        (CDBLoss(5), "num_classes"),
        (cm, "num_classes"),
        (ClassBalancedLoss(COUNTS), "weight"),
        (OutlyingMSELoss(COUNTS), "outlying"),
        (CDBLoss(5), "weight"),
        (RecallLoss(5, momentum=0.5), "running_recall"),
        (RecallLoss(5, momentum=0.5), "seen"),
        (cm, "matrix"),
    ]:
        with pytest.raises(AttributeError, match=f"{type(m).__name__}.{name} cannot be set"):
            setattr(m, name, getattr(m, name).clone() if name != "num_classes" else 4)
    cm.matrix += 1  # in place, as update() does: allowed
    assert cm.compute().sum() == 25


def test_derived_buffers_follow_their_option_through_to_and_state_dict():
    """beta, alpha and tau recompute their buffer in the buffer's current device and dtype; the
    buffers still save, load and move."""
    cb = ClassBalancedLoss(COUNTS, beta=0.99).to(torch.float64)
    cb.beta = 0.9
    assert cb.weight.dtype == torch.float64
    torch.testing.assert_close(cb.weight, weights.effective_number(COUNTS, 0.9).double(), rtol=0, atol=0)
    loaded = ClassBalancedLoss(COUNTS)
    loaded.load_state_dict(cb.state_dict())
    assert list(cb.state_dict()) == ["weight"] and torch.equal(loaded.weight, cb.weight.float())
    mse = OutlyingMSELoss(COUNTS).to(torch.float64)
    mse.alpha = 0.5
    torch.testing.assert_close(
        mse.outlying, torch.tensor([0.5, 1.5, 2.0, 2.5, 1.0], dtype=torch.float64), rtol=0, atol=0
    )
    cdb = CDBLoss(5)
    cdb.tau = 2.0  # before any update: still ones
    assert torch.equal(cdb.weight, torch.ones(5))
    confusion = torch.diag(torch.tensor([8, 4, 0, 2, 1])) + 2
    cdb.update_from_confusion(confusion)
    acc = confusion.diagonal().double() / confusion.sum(1).double()  # 10/18, 6/14, 2/10, 4/12, 3/11
    torch.testing.assert_close(cdb.weight, ((1 - acc) ** 2).float(), **TOL[torch.float32])
    cdb.tau = 1.0
    torch.testing.assert_close(cdb.weight, (1 - acc).float(), **TOL[torch.float32])
    restored = CDBLoss(5)
    restored.update([0.5] * 5)
    restored.load_state_dict(cdb.state_dict())
    restored.tau = 3.0  # the loaded weights' accuracy is not known: they stay until the next update
    assert torch.equal(restored.weight, cdb.weight)


def test_activation_checkpointing_repeats_the_side_effects_as_documented():
    """torch.utils.checkpoint reruns a checkpointed forward in the backward: confusion= counts are
    added twice and RecallLoss's moving average takes two steps, as batch norm's statistics do. The
    docs say so and say to call the loss outside the region; this pins both, so that a change of
    either is noticed."""
    import fused_imbalance
    from fused_imbalance import losses
    from torch.utils.checkpoint import checkpoint

    logits, target = batch()
    once = ConfusionMatrix(5, ignore_index=IGN)
    once.update(logits, target)
    m = RecallLoss(5, momentum=0.5, ignore_index=IGN, backend="reference")
    m.running_recall.fill_(0.2)
    m.seen.fill_(True)
    count, tp = functional.class_stats(logits, target, IGN, backend="reference")
    present = count > 0
    r = torch.where(present, tp / count.clamp(min=1), torch.zeros(5, dtype=torch.float64)).float()
    for reentrant in (False, True):
        for fn, kwargs in [
            (functional.focal_loss, {}),
            (FocalLoss(ignore_index=IGN, backend="reference"), {}),
        ]:
            confusion = torch.zeros(5, 5, dtype=torch.int64)
            x = logits.clone().requires_grad_()
            call = (
                lambda t: fn(t, target, ignore_index=IGN, confusion=confusion, backend="reference")
                if fn is functional.focal_loss
                else fn(t, target, confusion=confusion)
            )
            checkpoint(call, x, use_reentrant=reentrant).backward()
            assert torch.equal(confusion, 2 * once.compute()), (fn, reentrant)
        running = m.running_recall.clone()
        checkpoint(
            lambda t: m(t, target), logits.clone().requires_grad_(), use_reentrant=reentrant
        ).backward()
        twice = 0.5 * (0.5 * running + 0.5 * r) + 0.5 * r
        torch.testing.assert_close(
            m.running_recall, torch.where(present, twice, running), **TOL[torch.float32]
        )
    readme = open(
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    ).read()
    for where, text in [
        ("functional", fused_imbalance.functional.__doc__),
        ("losses", losses.__doc__),
        ("RecallLoss", RecallLoss.__doc__),
        ("README", readme),
    ]:
        text = " ".join(text.split())
        assert "torch.utils.checkpoint" in text and "outside the region" in text, where


# ---------------------------------------------------------------- recall weights by hand

# Two classes; logits [1, 0] predict class 0 and [0, 1] class 1, so every pixel's
# cross-entropy is either A (argmax right) or B (argmax wrong):
A = math.log(1 + math.exp(-1))  # -log softmax([1, 0])[0]
B = math.log(1 + math.exp(1))  # -log softmax([1, 0])[1]


def toy(labels, preds, dev="cpu"):
    logits = torch.tensor([[1.0, 0.0] if p == 0 else [0.0, 1.0] for p in preds], dtype=torch.float64)
    return logits.to(dev), torch.tensor(labels, device=dev)


def test_recall_weights_by_hand():
    # labels 0 0 0 1 ign, argmax 0 0 1 1 0: R_0 = 2/3 -> w_0 = 1/3; R_1 = 1/1 -> w_1 = 0
    logits, target = toy([0, 0, 0, 1, IGN], [0, 0, 1, 1, 0])
    pixel = [A / 3, A / 3, B / 3, 0.0, 0.0]
    for reduction, expected in [("none", pixel), ("sum", sum(pixel)), ("mean", sum(pixel) / 4)]:
        m = RecallLoss(2, ignore_index=IGN, reduction=reduction, backend="reference")
        torch.testing.assert_close(
            m(logits, target), torch.tensor(expected, dtype=torch.float64), **TOL[torch.float64]
        )


def test_recall_momentum_by_hand():
    momentum_by_hand("reference", "cpu")


def test_recall_momentum_by_hand_fused(backend):
    momentum_by_hand(backend, backend_device(backend))


def momentum_by_hand(backend, dev):
    m = RecallLoss(2, momentum=0.9, ignore_index=IGN, backend=backend).to(dev)
    tol = TOL[torch.float32]  # the running recall is a float32 buffer

    # step 1: labels 0 0, argmax 0 1. R_0 = 1/2; class 0 appears for the first time, so
    # R̄_0 = 1/2 (not 0.9·0 + 0.1·1/2); class 1 absent: R̄_1 stays 0 -> weights [1/2, 1]
    logits, target = toy([0, 0], [0, 1], dev)
    loss = m(logits, target).cpu()
    torch.testing.assert_close(m.running_recall.cpu(), torch.tensor([0.5, 0.0]), **tol)
    assert m.seen.cpu().tolist() == [True, False]
    torch.testing.assert_close(loss, torch.tensor((A + B) / 2 / 2, dtype=torch.float64), **tol)

    # step 2: labels 0 1 1 1, argmax 0 1 0 1. R_0 = 1, R_1 = 2/3 (first time).
    # R̄_0 = 0.9·0.5 + 0.1·1 = 0.55, R̄_1 = 2/3 -> weights [0.45, 1/3]
    logits, target = toy([0, 1, 1, 1], [0, 1, 0, 1], dev)
    loss = m(logits, target).cpu()
    torch.testing.assert_close(m.running_recall.cpu(), torch.tensor([0.55, 2 / 3]), **tol)
    assert m.seen.cpu().tolist() == [True, True]
    torch.testing.assert_close(
        loss, torch.tensor((0.45 * A + (2 * A + B) / 3) / 4, dtype=torch.float64), **tol
    )

    # step 3: labels 1 ign, argmax 1 0. R_1 = 1: R̄_1 = 0.9·2/3 + 0.1·1 = 0.7; class 0
    # absent: R̄_0 stays 0.55 -> weights [0.45, 0.3]
    logits, target = toy([1, IGN], [1, 0], dev)
    loss = m(logits, target).cpu()
    torch.testing.assert_close(m.running_recall.cpu(), torch.tensor([0.55, 0.7]), **tol)
    torch.testing.assert_close(loss, torch.tensor(0.3 * A, dtype=torch.float64), **tol)

    # eval mode: the stored R̄ is used and left unchanged. labels 0 1, argmax 1 1:
    # weights [0.45, 0.3], mean (0.45·B + 0.3·A) / 2
    m.eval()
    logits, target = toy([0, 1], [1, 1], dev)
    loss = m(logits, target).cpu()
    torch.testing.assert_close(m.running_recall.cpu(), torch.tensor([0.55, 0.7]), **tol)
    torch.testing.assert_close(loss, torch.tensor((0.45 * B + 0.3 * A) / 2, dtype=torch.float64), **tol)


def ema_by_torch(sums, count, tp, running, seen, weight, reduction):
    """What ``Backend.recall_ema`` computes, by RecallLoss's torch operations: (running, seen, loss, scale)."""
    present = count > 0
    batch = (tp.to(torch.float64) / count.clamp_min(1)).to(running.dtype)
    new = torch.where(present, torch.where(seen, torch.lerp(running, batch, weight), batch), running)
    w = (1.0 - new).to(sums.dtype)
    d = count.sum().clamp(min=1).to(sums.dtype) if reduction == Reduction.MEAN else 1.0
    return new, seen | present, torch.dot(w, sums) / d, w / d


@pytest.mark.parametrize("C", [6, 2500])  # 2500: three steps of the Triton kernel's 1024 classes
@pytest.mark.parametrize("reduction", [Reduction.MEAN, Reduction.SUM])
def test_recall_ema_op(backend, C, reduction):
    """The backends' moving average against RecallLoss's torch operations: absent classes keep their
    average, a class seen for the first time takes the batch recall, both buffer dtypes."""
    be = _fused._BACKENDS[backend]
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(C)
    for run_dtype, acc in [
        (torch.float32, torch.float32),
        (torch.float64, torch.float32),
        (torch.float64,) * 2,
    ]:
        count = torch.randint(0, 4, (C,), generator=g) * torch.randint(0, 50, (C,), generator=g)
        tp = (count * torch.rand(C, generator=g, dtype=torch.float64)).long()
        sums = (torch.rand(C, generator=g, dtype=torch.float64) * count).to(acc)
        running = torch.rand(C, generator=g, dtype=torch.float64).to(run_dtype)
        seen = torch.rand(C, generator=g) < 0.5
        assert (count == 0).any() and (seen & (count > 0)).any() and (~seen & (count > 0)).any()
        want = ema_by_torch(sums, count, tp, running, seen, 0.3, reduction)
        r, s = running.to(dev), seen.to(dev)
        loss, scale = be.recall_ema(sums.to(dev), count.to(dev), tp.to(dev), r, s, 0.3, reduction)
        assert loss.shape == () and loss.dtype == acc and scale.shape == (C,) and scale.dtype == acc
        torch.testing.assert_close(r.cpu(), want[0], **TOL[run_dtype])
        assert torch.equal(s.cpu(), want[1])
        torch.testing.assert_close(loss.cpu(), want[2], **LOSS_TOL[acc])
        torch.testing.assert_close(scale.cpu(), want[3], **TOL[acc])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_recall_momentum_fused_path(backend, reduction, monkeypatch):
    """A training step of RecallLoss with a momentum runs the forward, then one ``recall_ema`` (the
    fused eager path; inside the C++ backend's autograd node there), and equals the reference module
    step by step: loss, gradient, buffers; in float64 also with its buffers in float64. Eval mode and
    ``"none"`` do not take that path."""
    dev = backend_device(backend)
    be = _fused._BACKENDS[backend]
    calls = []

    def autograd(*a):  # the backend's own autograd node, with the moving average (ema_reduction >= 0)
        if a[-1] >= 0:
            calls.append(1)
        return be.autograd(*a)

    monkeypatch.setitem(
        _fused._BACKENDS,
        backend,
        be._replace(
            recall_ema=lambda *a: calls.append(1) or be.recall_ema(*a),
            autograd=autograd if be.autograd is not None else None,
        ),
    )
    for dtype in (torch.float32, torch.float64):
        fused = RecallLoss(5, momentum=0.8, ignore_index=IGN, reduction=reduction, backend=backend).to(dev)
        ref = RecallLoss(5, momentum=0.8, ignore_index=IGN, reduction=reduction, backend="reference")
        if dtype == torch.float64:
            fused.double(), ref.double()
        for step in range(3):
            logits, target = batch(dtype=dtype, seed=10 + step)
            x = logits.to(dev, copy=True).requires_grad_()
            xr = logits.clone().requires_grad_()
            a, b = fused(x, target.to(dev)), ref(xr, target)
            torch.testing.assert_close(a.cpu(), b, **LOSS_TOL[dtype])
            a.backward(), b.backward()
            torch.testing.assert_close(x.grad.cpu(), xr.grad, **TOL[dtype])
            torch.testing.assert_close(fused.running_recall.cpu(), ref.running_recall, **TOL[dtype])
            assert torch.equal(fused.seen.cpu(), ref.seen)
    assert len(calls) == 6
    fused.eval()
    fused(x.detach(), target.to(dev))
    RecallLoss(5, momentum=0.8, ignore_index=IGN, reduction="none", backend=backend).to(dev)(
        x, target.to(dev)
    )
    assert len(calls) == 6


def test_recall_momentum_fused_forward_ad(backend):
    """The forward-mode derivative of the fused moving-average path: ⟨∂L/∂x, t⟩ of the reference."""
    import torch.autograd.forward_ad as fwAD

    dev = backend_device(backend)
    logits, target = batch(dtype=torch.float64, seed=3)
    tangent = torch.randn(logits.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = []
    for name, d in ((backend, dev), ("reference", "cpu")):
        m = RecallLoss(5, momentum=0.8, ignore_index=IGN, backend=name).to(d).double()
        with fwAD.dual_level():
            loss = m(fwAD.make_dual(logits.to(d), tangent.to(d)), target.to(d))
            out.append((fwAD.unpack_dual(loss).primal.cpu(), fwAD.unpack_dual(loss).tangent.cpu()))
    torch.testing.assert_close(out[0][0], out[1][0], **LOSS_TOL[torch.float64])
    torch.testing.assert_close(out[0][1], out[1][1], **TOL[torch.float64])


def test_recall_momentum_zero_is_batch_recall_once_seen():
    logits, target = batch(seed=1)
    m = RecallLoss(5, momentum=0.0, ignore_index=IGN, backend="reference")
    torch.testing.assert_close(
        m(logits, target),
        functional.recall_loss(logits, target, IGN, backend="reference"),
        **LOSS_TOL[torch.float32],
    )


def test_recall_loss_checks():
    with pytest.raises(ValueError, match="momentum"):
        RecallLoss(3, momentum=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        RecallLoss(0)
    with pytest.raises(ValueError, match="reduction"):
        RecallLoss(3, reduction="avg")
    logits, target = batch()
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        RecallLoss(4, ignore_index=IGN, backend="reference")(logits, target)


# ---------------------------------------------------------------- CDB weights by hand


def test_cdb_update_from_confusion_by_hand():
    # rows = true class: class 0 has 8/10 right, class 1 4/10, class 2 no sample.
    confusion = torch.tensor([[8, 2, 0], [1, 4, 5], [0, 0, 0]])
    # A = [0.8, 0.4] over the measured classes: b = 0.8 / (0.4 + 1e-4) - 1,
    # tau = 2 / (1 + e^-b), w = [0.2^tau, 0.6^tau]; class 2 gets the largest, 0.6^tau
    b = 0.8 / 0.4001 - 1
    tau = 2 / (1 + math.exp(-b))
    expected = torch.tensor([0.2**tau, 0.6**tau, 0.6**tau])
    m = CDBLoss(3, backend="reference")
    torch.testing.assert_close(m.weight, torch.ones(3), atol=0, rtol=0)  # before any update
    w = m.update_from_confusion(confusion)
    torch.testing.assert_close(w, expected, **TOL[torch.float32])
    assert torch.equal(w, m.weight)

    # the same from a ConfusionMatrix metric fed the corresponding predictions
    cm = ConfusionMatrix(3)
    labels = [0] * 10 + [1] * 10
    preds = [0] * 8 + [1] * 2 + [0] + [1] * 4 + [2] * 5
    cm.update(torch.tensor(preds), torch.tensor(labels))
    assert torch.equal(cm.compute(), confusion)
    m2 = CDBLoss(3, backend="reference")
    m2.update_from_confusion(cm)
    torch.testing.assert_close(m2.weight, expected, **TOL[torch.float32])

    # fixed tau = 2: [0.04, 0.36, 0.36]
    m3 = CDBLoss(3, tau=2.0, backend="reference")
    m3.update_from_confusion(confusion)
    torch.testing.assert_close(m3.weight, torch.tensor([0.04, 0.36, 0.36]), **TOL[torch.float32])


def test_cdb_update_from_full_confusion_matches_update():
    confusion = torch.tensor([[5, 5, 0], [0, 9, 1], [3, 3, 4]])
    m1, m2 = CDBLoss(3), CDBLoss(3)
    m1.update_from_confusion(confusion)
    m2.update([0.5, 0.9, 0.4])
    torch.testing.assert_close(m1.weight, m2.weight, **TOL[torch.float32])


def test_cdb_update_returns_weights_a_later_update_leaves_alone():
    """history.append(cdb.update(acc)) keeps each epoch's weights: what update() and
    update_from_confusion() return is not the buffer that the next update overwrites."""
    m = CDBLoss(3, tau=2.0)
    history = [m.update([0.9, 0.5, 0.2])]
    history.append(m.update_from_confusion(torch.tensor([[1, 1, 0], [0, 4, 0], [0, 0, 4]])))
    m.update([0.0, 0.0, 0.0])
    torch.testing.assert_close(history[0], torch.tensor([0.01, 0.25, 0.64]), **TOL[torch.float32])
    torch.testing.assert_close(history[1], torch.tensor([0.25, 0.0, 0.0]), **TOL[torch.float32])
    assert torch.equal(m.weight, torch.ones(3))


def test_cdb_checks():
    m = CDBLoss(3)
    with pytest.raises(ValueError, match="no sample"):
        m.update_from_confusion(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        m.update_from_confusion(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(TypeError):
        m.update_from_confusion(torch.eye(3))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        m.update([0.5, 0.5])
    with pytest.raises(ValueError, match="class_accuracy"):
        m.update([0.5, 0.5, 1.5])
    with pytest.raises(ValueError, match="tau"):
        CDBLoss(3, tau="fixed")
    torch.testing.assert_close(m.weight, torch.ones(3), atol=0, rtol=0)  # failed updates changed nothing


def test_constructor_checks():
    with pytest.raises(ValueError, match="loss_type"):
        ClassBalancedLoss(COUNTS, loss_type="logistic")
    with pytest.raises(ValueError, match="samples_per_class"):
        ClassBalancedLoss([1, -2])
    x, y = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    for backend in ("reference", None):  # counts of two classes for logits of three: named, on every path
        with pytest.raises(ValueError, match="samples_per_class of 2 classes"):
            ClassBalancedLoss([10, 5], backend=backend)(x, y)
    with pytest.raises(ValueError, match="input"):
        OutlyingMSELoss(COUNTS, input="probs")
    with pytest.raises(ValueError, match="alpha"):
        OutlyingMSELoss(COUNTS, alpha=0)
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1)
    with pytest.raises(ValueError, match="weight"):
        FocalLoss(weight=torch.ones(2, 2))
    with pytest.raises(TypeError, match="ignore_index"):
        FocalLoss(ignore_index=None)
