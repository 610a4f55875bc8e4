"""ConfusionMatrix against counts and ratios worked by hand, and the confusion counts a loss adds."""

from fractions import Fraction

import pytest
import torch

import fused_imbalance.functional as FI
from cases import backend_device

from fused_imbalance.metrics import ConfusionMatrix

IGN = 255

# A hand-made batch of 10 pixels, 3 classes, one ignored pixel (whose prediction, 1, must
# not be counted):
#   label      0 0 0 1 1 2 2 2 2 ign
#   prediction 0 1 0 1 2 2 2 0 0  1
TARGET = [0, 0, 0, 1, 1, 2, 2, 2, 2, IGN]
PREDS = [0, 1, 0, 1, 2, 2, 2, 0, 0, 1]
# rows = label, columns = prediction
MATRIX = [[2, 1, 0], [0, 1, 1], [2, 0, 2]]
# row sums (labels) [3, 2, 4], column sums (predictions) [4, 2, 3], diagonal [2, 1, 2]
RECALL = [Fraction(2, 3), Fraction(1, 2), Fraction(2, 4)]
PRECISION = [Fraction(2, 4), Fraction(1, 2), Fraction(2, 3)]
IOU = [Fraction(2, 3 + 4 - 2), Fraction(1, 2 + 2 - 1), Fraction(2, 4 + 3 - 2)]  # 2/5, 1/3, 2/5
MIOU = sum(IOU) / 3  # 17/45
ACCURACY = Fraction(5, 9)


def f64(values):
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def one_hot_logits(preds, C, shape_bc_last=False, seed=0):
    """Float logits (N, C) whose argmax is ``preds``: random values below the chosen one."""
    g = torch.Generator().manual_seed(seed)
    p = torch.as_tensor(preds)
    x = torch.rand(p.numel(), C, generator=g)
    x[torch.arange(p.numel()), p.reshape(-1)] = 2.0
    return x


def batch(dtype=torch.uint8):
    return torch.tensor(TARGET, dtype=dtype), torch.tensor(PREDS)


def assert_ratios(cm, recall, precision, iou, miou, accuracy):
    torch.testing.assert_close(cm.recall(), f64(recall), atol=0, rtol=1e-15)
    torch.testing.assert_close(cm.precision(), f64(precision), atol=0, rtol=1e-15)
    torch.testing.assert_close(cm.iou(), f64(iou), atol=0, rtol=1e-15)
    torch.testing.assert_close(cm.miou(), torch.tensor(float(miou), dtype=torch.float64), atol=0, rtol=1e-15)
    torch.testing.assert_close(
        cm.accuracy(), torch.tensor(float(accuracy), dtype=torch.float64), atol=0, rtol=1e-15
    )


def test_counts_and_ratios_from_predictions():
    target, preds = batch()
    cm = ConfusionMatrix(3, ignore_index=IGN)
    cm.update(preds, target)
    assert cm.compute().dtype == torch.int64
    assert cm.compute().tolist() == MATRIX
    assert_ratios(cm, RECALL, PRECISION, IOU, MIOU, ACCURACY)


@pytest.mark.parametrize("backend", ["reference"])
def test_logits_equal_predictions(backend):
    target, preds = batch(torch.int64)
    cm = ConfusionMatrix(3, ignore_index=IGN, backend=backend)
    cm.update(one_hot_logits(preds, 3), target)
    assert cm.compute().tolist() == MATRIX
    assert_ratios(cm, RECALL, PRECISION, IOU, MIOU, ACCURACY)


@pytest.mark.parametrize("backend", ["reference"])
def test_dense_logits_and_ties(backend):
    # (B, C, H, W) logits and (B, H, W) labels: the same 10 pixels as 2 images of 1 x 5;
    # pixel 0 has all logits equal: the first index (0) wins, as torch.argmax.
    target, preds = batch(torch.int32)
    x = one_hot_logits(preds, 3)
    x[0] = 0.5
    logits = x.reshape(2, 1, 5, 3).permute(0, 3, 1, 2)  # channels_last (B, C, 1, 5)
    cm = ConfusionMatrix(3, ignore_index=IGN, backend=backend)
    cm.update(logits, target.reshape(2, 1, 5))
    assert cm.compute().tolist() == MATRIX
    # the same pixels given as predictions shaped like the target
    cm2 = ConfusionMatrix(3, ignore_index=IGN)
    cm2.update(preds.reshape(2, 1, 5).to(torch.uint8), target.reshape(2, 1, 5))
    assert torch.equal(cm.compute(), cm2.compute())


def test_logits_on_fused_backend(backend):
    dev = backend_device(backend)
    target, preds = batch(torch.int64)
    x = one_hot_logits(preds, 3)
    x[0] = 0.5  # a tie: the first index
    cm = ConfusionMatrix(3, ignore_index=IGN, backend=backend).to(dev)
    cm.update(x.to(dev), target.to(dev))
    cm.update(x.to(dev).half(), target.to(dev).to(torch.uint8))
    assert cm.compute().cpu().tolist() == [[2 * v for v in row] for row in MATRIX]


def test_accumulates_over_batches_and_resets():
    target, preds = batch(torch.int16)
    cm = ConfusionMatrix(3, ignore_index=IGN)
    cm.update(preds[:4], target[:4])
    cm.update(preds[4:], target[4:])
    assert cm.compute().tolist() == MATRIX
    cm.update(preds, target)
    assert cm.compute().tolist() == [[2 * v for v in row] for row in MATRIX]
    # ratios are unchanged by doubling every count
    assert_ratios(cm, RECALL, PRECISION, IOU, MIOU, ACCURACY)
    cm.reset()
    assert cm.compute().tolist() == [[0] * 3] * 3


def test_compute_returns_counts_a_later_update_or_reset_leaves_alone():
    """history.append(cm.compute()); cm.reset() keeps the window's counts, as in torchmetrics."""
    target, preds = batch()
    cm = ConfusionMatrix(3, ignore_index=IGN)
    cm.update(preds, target)
    history = [cm.compute()]
    cm.reset()
    cm.update(preds[:1], target[:1])
    history.append(cm.compute())
    cm.update(preds, target)
    cm.sync()
    assert history[0].tolist() == MATRIX
    assert history[1].tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    history[1] += 5  # nor does a change to the result reach the metric
    assert cm.compute().tolist() == [[3, 1, 0], [0, 1, 1], [2, 0, 2]]


def test_ignore_index_default_and_negative_labels():
    # the default ignore_index is -100; -100 pixels are skipped whatever their prediction
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([1, 0, 1, 1]), torch.tensor([1, -100, 0, -100]))
    assert cm.compute().tolist() == [[0, 1], [0, 1]]


def test_absent_and_predicted_only_classes():
    # C = 5: class 3 neither labelled nor predicted (left out of the mIoU, 0 elsewhere);
    # class 4 predicted once (for a pixel of class 0) but never labelled.
    target = torch.tensor(TARGET + [0])
    preds = torch.tensor(PREDS + [4])
    cm = ConfusionMatrix(5, ignore_index=IGN)
    cm.update(preds, target)
    assert cm.compute().tolist() == [
        [2, 1, 0, 0, 1],
        [0, 1, 1, 0, 0],
        [2, 0, 2, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ]
    # class 0 now has 4 labels, 2 right; class 4: recall 0/0 -> 0, precision 0/1, IoU 0/1
    recall = [Fraction(2, 4), Fraction(1, 2), Fraction(2, 4), 0, 0]
    precision = [Fraction(2, 4), Fraction(1, 2), Fraction(2, 3), 0, 0]
    iou = [Fraction(2, 4 + 4 - 2), Fraction(1, 3), Fraction(2, 5), 0, 0]
    miou = (iou[0] + iou[1] + iou[2] + iou[4]) / 4  # class 3 does not occur
    assert_ratios(cm, recall, precision, iou, miou, Fraction(5, 10))


def test_empty_matrix_is_zero_not_nan():
    cm = ConfusionMatrix(3)
    assert_ratios(cm, [0, 0, 0], [0, 0, 0], [0, 0, 0], 0, 0)
    cm.update(torch.tensor([1, 2]), torch.tensor([-100, -100]))  # every pixel ignored
    assert_ratios(cm, [0, 0, 0], [0, 0, 0], [0, 0, 0], 0, 0)


def test_bad_labels_and_predictions():
    cm = ConfusionMatrix(3, ignore_index=IGN)
    with pytest.raises(ValueError, match="label 7"):
        cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match="label -1"):
        cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="class 5"):
        cm.update(torch.tensor([0, 5, 2]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="shaped like target"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="label 3"):
        cm.update(one_hot_logits([0, 1], 3), torch.tensor([3, 1]))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        cm.update(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(TypeError):
        cm.update(torch.tensor([True, False]), torch.tensor([0, 1]))
    # nothing was counted by the failed calls
    assert cm.compute().sum().item() == 0
    # an out-of-range prediction at an ignored pixel is not an error: the pixel is skipped
    cm.update(torch.tensor([0, 9]), torch.tensor([0, IGN]))
    assert cm.compute().tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_sync_without_distributed_is_a_noop_once():
    target, preds = batch()
    cm = ConfusionMatrix(3, ignore_index=IGN)
    cm.update(preds, target)
    cm.sync()
    assert cm.compute().tolist() == MATRIX
    with pytest.raises(RuntimeError, match="reset"):
        cm.sync()
    with pytest.raises(RuntimeError, match="reset"):
        cm.update(preds, target)
    cm.reset()
    cm.update(preds, target)
    assert cm.compute().tolist() == MATRIX


def test_buffer_state_dict_and_to():
    target, preds = batch()
    cm = ConfusionMatrix(3, ignore_index=IGN)
    cm.update(preds, target)
    sd = cm.state_dict()
    assert list(sd) == ["matrix"] and sd["matrix"].tolist() == MATRIX
    cm2 = ConfusionMatrix(3, ignore_index=IGN)
    cm2.load_state_dict(sd)
    assert cm2.compute().tolist() == MATRIX
    cm2.to(torch.float64).to("cpu")  # counts stay int64
    assert cm2.compute().dtype == torch.int64 and cm2.compute().tolist() == MATRIX


def test_options_set_later_take_effect_or_raise():
    target, preds = batch()
    cm = ConfusionMatrix(3)
    cm.ignore_index = IGN  # as if built with it
    cm.update(preds, target)
    assert cm.compute().tolist() == MATRIX
    for name, value, error in [
        ("ignore_index", None, TypeError),
        ("ignore_index", 1.5, TypeError),
        ("backend", "cuda", ValueError),
    ]:
        with pytest.raises(error, match=name):
            setattr(cm, name, value)
        with pytest.raises(error, match=name):
            ConfusionMatrix(3, **{name: value})
    assert (cm.ignore_index, cm.backend) == (IGN, None)
    cm.backend = "reference"
    cm.reset()
    cm.update(one_hot_logits(PREDS, 3), target)
    assert cm.compute().tolist() == MATRIX


def test_constructor_checks():
    with pytest.raises(ValueError):
        ConfusionMatrix(0)
    with pytest.raises(TypeError):
        ConfusionMatrix(3, ignore_index=1.5)


# --- confusion updates ----------------------------------------------------------------------------


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
