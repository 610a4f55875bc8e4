"""The Dice family's ``distributed=True`` over 2 gloo ranks on CPU (C++ backend): the loss is the global
batch's on every rank, and after DDP averages the gradients they are those of one process training on
the whole global batch, with uneven shards and ignored pixels."""

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cases import REQUIRED
from tolerances import TOL

import fused_imbalance as fi

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

WORLD = 2
C = 4
IGN = 255
TIMEOUT_S = 120
TOL64 = TOL[torch.float64]
SHARDS = [slice(0, 1), slice(1, 4)]  # uneven: rank 0 one image, rank 1 three
# (module class, keywords); every one with batch=True
MODULES = {
    "dice": (fi.DiceLoss, dict(weight=torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64))),
    "dice_jaccard": (fi.DiceLoss, dict(jaccard=True, squared_pred=True, include_background=False)),
    "generalized_dice": (fi.GeneralizedDiceLoss, dict(w_type="simple")),
    "tversky": (fi.TverskyLoss, dict(alpha=0.3, beta=0.7, gamma=1.5)),
    "tversky_none": (fi.TverskyLoss, dict(alpha=0.3, beta=0.7, reduction="none")),
    "dice_ce": (
        fi.DiceCELoss,
        dict(lambda_dice=0.7, lambda_ce=1.3, weight=torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)),
    ),
    "dice_ce_sum": (fi.DiceCELoss, dict(reduction="sum")),
}


def make_data():
    """4 images of 5 x 6 pixels, float64 logits, labels with ignored pixels (unequal per rank)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, C, 5, 6, generator=g, dtype=torch.float64)
    target = torch.randint(0, C, (4, 5, 6), generator=g)
    flat = target.view(4, -1)
    flat[0, :3] = IGN
    flat[2, 4:9] = IGN
    target[3][target[3] == 2] = 1  # class 2 absent from one image
    return logits, target


def make_model():
    """A 1 x 1 convolution from 3 features to C logits, and features for the 4 images."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, C, 1).double()
    feats = torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    return model, feats


def _module(name, distributed):
    cls, kw = MODULES[name]
    return cls(**kw, batch=True, ignore_index=IGN, distributed=distributed, backend="cpp")


def cpp_available():
    try:
        from fused_imbalance.ops import cpp
    except ImportError:
        return False
    return cpp.available()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        res = {"cpp": cpp_available()}
        if res["cpp"]:
            sl = SHARDS[rank]
            logits, target = make_data()
            for name in MODULES:
                x = logits[sl].clone().requires_grad_()
                loss = _module(name, True)(x, target[sl])
                loss.sum().backward()
                res[name] = (loss.detach(), x.grad)
            # a model under DistributedDataParallel, one step: its averaged parameter gradients
            model, feats = make_model()
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            loss = _module("dice_ce", True)(ddp(feats[sl]), target[sl])
            loss.backward()
            res["ddp"] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("dice_dist"))
    ctx = mp.start_processes(
        _worker, args=(WORLD, _free_port(), out_dir), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD}-rank job did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    res = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    if not all(r["cpp"] for r in res):
        if "cpp" in REQUIRED:
            pytest.fail("backend 'cpp' is required but unavailable in the ranks")
        pytest.skip("the C++ backend could not be built here")
    return res


@pytest.mark.parametrize("name", MODULES)
def test_loss_and_gradient_are_the_global_batch(ranks, name):
    logits, target = make_data()
    x = logits.clone().requires_grad_()
    loss = _module(name, False)(x, target)  # one process, the whole batch
    loss.sum().backward()
    for r in range(WORLD):
        got_loss, got_grad = ranks[r][name]
        torch.testing.assert_close(got_loss, loss.detach(), **TOL64)  # the global loss on every rank
        # DDP divides the sum of the ranks' gradients by the world size
        torch.testing.assert_close(got_grad / WORLD, x.grad[SHARDS[r]], **TOL64)
    # each shard's own loss differs from the global one: the sums really were all-reduced
    sl = SHARDS[1]
    own = _module(name, False)(logits[sl], target[sl])
    assert not torch.allclose(own, loss.detach())


def test_ddp_step_equals_one_process(ranks):
    model, feats = make_model()
    logits, target = make_data()
    loss = _module("dice_ce", False)(model(feats), target)
    loss.backward()
    for r in range(WORLD):
        got_loss, got_grads = ranks[r]["ddp"]
        torch.testing.assert_close(got_loss, loss.detach(), **TOL64)
        for g, p in zip(got_grads, model.parameters()):
            torch.testing.assert_close(g, p.grad, **TOL64)
