"""ConfusionMatrix.sync, RecallLoss(distributed=True) and CDB weights over 2 gloo ranks on CPU,
compared with one process that sees the whole batch; also with ``upsample`` (low-resolution
logits, full-resolution labels) on the C++ backend, against F.interpolate + the reference."""

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from cases import REQUIRED
from tolerances import TOL

from fused_imbalance.losses import CDBLoss, RecallLoss
from fused_imbalance.metrics import ConfusionMatrix

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

WORLD = 2
C = 4
IGN = 255
TIMEOUT_S = 120  # the whole 2-process run; a collective waits at most 60 s
TOL64 = TOL[torch.float64]
SHARDS = [slice(0, 2), slice(2, 4)]  # images of each rank in the 4-image global batch


def make_data(seed, ignore):
    """4 images of 5 x 6 pixels, float64 logits; labels follow the argmax half the time, so
    each class has a recall strictly between 0 and 1 that differs between the two halves."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, C, 5, 6, generator=g, dtype=torch.float64)
    random = torch.randint(0, C, (4, 5, 6), generator=g)
    target = torch.where(torch.rand(4, 5, 6, generator=g) < 0.5, logits.argmax(1), random)
    if ignore:
        # rank 0's half gets 3 ignored pixels, rank 1's 9: unequal valid counts
        flat = target.view(4, -1)
        flat[0, :3] = IGN
        flat[2, :5] = IGN
        flat[3, 10:14] = IGN
    return logits, target.to(torch.uint8)


def confusion_data():
    """Uneven shards for the metric: rank 0 sees images 0-2, rank 1 image 3, where class 3
    never occurs — so rank 1 alone would give class 3 no accuracy at all."""
    logits, target = make_data(7, ignore=True)
    target[3][target[3] == 3] = 0
    return logits, target, [slice(0, 3), slice(3, 4)]


def upsample_data(seed, ignore):
    """4 images of low-resolution float64 logits (C × 3 × 4) and 7 × 9 labels that follow the
    argmax of the bilinearly interpolated logits half the time (so the recall is neither 0 nor 1
    and differs between the halves); ``ignore``: unequal numbers of ignored pixels per half."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, C, 3, 4, generator=g, dtype=torch.float64)
    pred = interpolated(logits).argmax(1)
    random = torch.randint(0, C, (4, 7, 9), generator=g)
    target = torch.where(torch.rand(4, 7, 9, generator=g) < 0.5, pred, random)
    if ignore:
        flat = target.view(4, -1)
        flat[0, :4] = IGN
        flat[3, 20:31] = IGN
    return logits, target.to(torch.uint8)


def interpolated(logits):
    """The full-resolution logits the upsampled ops stand for (the spec, computed independently)."""
    return F.interpolate(logits, size=(7, 9), mode="bilinear", align_corners=False)


def cpp_available():
    try:
        from fused_imbalance.ops import cpp
    except ImportError:
        return False
    return cpp.available()


def momentum_steps():
    return [make_data(10 + s, ignore=(s == 1)) for s in range(3)]


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        res = {}
        # metric: rank 0 passes logits, rank 1 integer predictions; then sync
        logits, target, shards = confusion_data()
        sl = shards[rank]
        cm = ConfusionMatrix(C, ignore_index=IGN, backend="reference")
        if rank == 0:
            cm.update(logits[sl], target[sl])
        else:
            cm.update(logits[sl].argmax(1), target[sl])
        res["local_confusion"] = cm.compute().clone()
        cm.sync()
        res["confusion"] = cm.compute().clone()
        cdb = CDBLoss(C, ignore_index=IGN, backend="reference")
        cdb.update_from_confusion(cm)
        res["cdb_weight"] = cdb.weight.clone()

        # recall loss with the global batch's weights
        sl = SHARDS[rank]
        for ignore in (False, True):
            logits, target = make_data(1, ignore)
            for reduction in ("none", "sum", "mean"):
                x = logits[sl].clone().requires_grad_()
                loss = RecallLoss(
                    C, ignore_index=IGN, reduction=reduction, distributed=True, backend="reference"
                )(x, target[sl])
                loss.sum().backward()
                res[("recall", ignore, reduction)] = (loss.detach(), x.grad)

        # moving average of the global recall
        m = RecallLoss(C, momentum=0.7, ignore_index=IGN, distributed=True, backend="reference")
        for logits, target in momentum_steps():
            m(logits[sl], target[sl])
        res["running_recall"] = m.running_recall.clone()
        res["seen"] = m.seen.clone()

        # the same with upsampling fused into the C++ ops: low-resolution logits, full-resolution labels
        res["cpp"] = cpp_available()
        if res["cpp"]:
            logits, target = upsample_data(3, ignore=True)
            cm = ConfusionMatrix(C, ignore_index=IGN, backend="cpp")
            cm.update(logits[sl], target[sl], upsample="bilinear")
            res["up_local_confusion"] = cm.compute().clone()
            cm.sync()
            res["up_confusion"] = cm.compute().clone()
            for ignore in (False, True):
                logits, target = upsample_data(2, ignore)
                for reduction in ("none", "sum"):
                    x = logits[sl].clone().requires_grad_()
                    loss = RecallLoss(
                        C,
                        ignore_index=IGN,
                        reduction=reduction,
                        distributed=True,
                        backend="cpp",
                        upsample="bilinear",
                    )(x, target[sl])
                    loss.sum().backward()
                    res[("up_recall", ignore, reduction)] = (loss.detach(), x.grad)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the 2-rank job once; the results of each rank, as saved by ``_worker``."""
    out_dir = str(tmp_path_factory.mktemp("dist"))
    ctx = mp.start_processes(
        _worker, args=(WORLD, _free_port(), out_dir), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):  # raises if a rank failed
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD}-rank job did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def single(reduction, ignore, distributed=False):
    """One process on the whole batch: (loss, grad)."""
    logits, target = make_data(1, ignore)
    x = logits.clone().requires_grad_()
    loss = RecallLoss(C, ignore_index=IGN, reduction=reduction, distributed=distributed, backend="reference")(
        x, target
    )
    loss.sum().backward()
    return loss.detach(), x.grad


# ---------------------------------------------------------------- metric and CDB


def test_confusion_sync_equals_one_process(ranks):
    logits, target, _ = confusion_data()
    cm = ConfusionMatrix(C, ignore_index=IGN)
    cm.update(logits, target)
    for r in range(WORLD):
        assert torch.equal(ranks[r]["confusion"], cm.compute())
    # the shards really were different
    assert not torch.equal(ranks[0]["local_confusion"], ranks[1]["local_confusion"])
    assert torch.equal(ranks[0]["local_confusion"] + ranks[1]["local_confusion"], cm.compute())


def test_cdb_weights_after_sync_are_global(ranks):
    logits, target, _ = confusion_data()
    cm = ConfusionMatrix(C, ignore_index=IGN)
    cm.update(logits, target)
    expected = CDBLoss(C).update_from_confusion(cm)
    for r in range(WORLD):
        assert torch.equal(ranks[r]["cdb_weight"], expected)  # bit-identical on every rank
    # rank 1's own data would have given other weights (class 3 unmeasured there)
    local = CDBLoss(C).update_from_confusion(ranks[1]["local_confusion"])
    assert not torch.allclose(local, expected)


# ---------------------------------------------------------------- recall loss


@pytest.mark.parametrize("ignore", [False, True])
def test_recall_weights_are_those_of_the_global_batch(ranks, ignore):
    # "none" is w_y * ce per pixel: each rank's slice equals the one-process result, so every
    # rank used the weights of the whole batch ...
    loss, _ = single("none", ignore)
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r][("recall", ignore, "none")][0], loss[SHARDS[r]], **TOL64)
    # ... which differ from each half's own weights
    logits, target = make_data(1, ignore)
    sl = SHARDS[1]
    own = RecallLoss(C, ignore_index=IGN, reduction="none", backend="reference")(logits[sl], target[sl])
    assert not torch.allclose(own, loss[sl])


@pytest.mark.parametrize("ignore", [False, True])
def test_recall_sum_over_ranks_is_the_global_sum(ranks, ignore):
    loss, grad = single("sum", ignore)
    total = sum(ranks[r][("recall", ignore, "sum")][0] for r in range(WORLD))
    torch.testing.assert_close(total, loss, **TOL64)
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r][("recall", ignore, "sum")][1], grad[SHARDS[r]], **TOL64)


def test_recall_mean_with_equal_valid_counts(ranks):
    # no ignored pixel: each rank has 2*5*6 valid pixels. The mean over ranks of the per-rank
    # means (what DDP's gradient averaging optimises) is the one-process mean, and each
    # rank's gradient divided by the number of ranks is the one-process gradient.
    loss, grad = single("mean", ignore=False)
    torch.testing.assert_close(
        sum(ranks[r][("recall", False, "mean")][0] for r in range(WORLD)) / WORLD, loss, **TOL64
    )
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r][("recall", False, "mean")][1] / WORLD, grad[SHARDS[r]], **TOL64)


def test_recall_mean_with_unequal_valid_counts(ranks):
    # 57 and 51 valid pixels: each rank divides its own weighted sum by its own valid count,
    # so the mean of the ranks' means is not the one-process mean (documented in RecallLoss).
    pixel, _ = single("none", ignore=True)
    loss, _ = single("mean", ignore=True)
    _, target = make_data(1, ignore=True)
    means = []
    for r in range(WORLD):
        valid = int((target[SHARDS[r]] != IGN).sum())
        assert valid == (57, 51)[r]
        expected = pixel[SHARDS[r]].sum() / valid
        torch.testing.assert_close(ranks[r][("recall", True, "mean")][0], expected, **TOL64)
        means.append(expected)
    assert not torch.allclose(sum(means) / WORLD, loss)
    # rescaling the per-rank sums by R / (global valid count) recovers it exactly
    sums = [ranks[r][("recall", True, "sum")][0] for r in range(WORLD)]
    n_valid = int((target != IGN).sum())
    torch.testing.assert_close(sum(s * WORLD / n_valid for s in sums) / WORLD, loss, **TOL64)


def test_recall_momentum_is_the_same_on_every_rank(ranks):
    m = RecallLoss(C, momentum=0.7, ignore_index=IGN, backend="reference")
    for logits, target in momentum_steps():
        m(logits, target)
    for r in range(WORLD):
        assert torch.equal(ranks[r]["running_recall"], ranks[0]["running_recall"])
        torch.testing.assert_close(ranks[r]["running_recall"], m.running_recall, **TOL[torch.float32])
        assert torch.equal(ranks[r]["seen"], m.seen)


# ---------------------------------------------------------------- with upsample, C++ backend


@pytest.fixture
def up_ranks(ranks):
    if not all(r["cpp"] for r in ranks):
        if "cpp" in REQUIRED:
            pytest.fail("backend 'cpp' is required but unavailable in the ranks")
        pytest.skip("the C++ backend could not be built here")
    return ranks


def test_upsampled_confusion_sync_equals_one_process(up_ranks):
    # argmax of the interpolated logits over the whole batch, counted here without any fused op
    logits, target = upsample_data(3, ignore=True)
    pred = interpolated(logits).argmax(1)
    valid = target != IGN
    expected = torch.zeros(C, C, dtype=torch.int64)
    expected.index_put_(
        (target[valid].long(), pred[valid]), torch.ones(int(valid.sum()), dtype=torch.int64), accumulate=True
    )
    for r in range(WORLD):
        assert torch.equal(up_ranks[r]["up_confusion"], expected)
    assert not torch.equal(up_ranks[0]["up_local_confusion"], up_ranks[1]["up_local_confusion"])
    assert torch.equal(up_ranks[0]["up_local_confusion"] + up_ranks[1]["up_local_confusion"], expected)


@pytest.mark.parametrize("ignore", [False, True])
def test_upsampled_recall_uses_the_global_batch(up_ranks, ignore):
    # one process, reference backend on the interpolated logits of the whole batch
    logits, target = upsample_data(2, ignore)
    for reduction in ("none", "sum"):
        x = logits.clone().requires_grad_()
        loss = RecallLoss(C, ignore_index=IGN, reduction=reduction, backend="reference")(
            interpolated(x), target
        )
        loss.sum().backward()
        if reduction == "none":  # each rank's per-pixel losses are the global batch's
            for r in range(WORLD):
                torch.testing.assert_close(
                    up_ranks[r][("up_recall", ignore, "none")][0], loss.detach()[SHARDS[r]], **TOL64
                )
        else:  # the per-rank sums add up to the global sum; each rank's gradient is its slice
            total = sum(up_ranks[r][("up_recall", ignore, "sum")][0] for r in range(WORLD))
            torch.testing.assert_close(total, loss.detach(), **TOL64)
            for r in range(WORLD):
                torch.testing.assert_close(
                    up_ranks[r][("up_recall", ignore, "sum")][1], x.grad[SHARDS[r]], **TOL64
                )
    # the halves' own weights would differ from the global ones
    sl = SHARDS[1]
    own = RecallLoss(C, ignore_index=IGN, reduction="none", backend="reference")(
        interpolated(logits[sl]), target[sl]
    )
    assert not torch.allclose(own, up_ranks[1][("up_recall", ignore, "none")][0])
