"""torch.compile and CUDA graphs on a GPU (the checks that run on CPUs are in test_compile.py).

A whole training step — a small network's forward, a fused loss, its backward, an optimizer step —
captured in a CUDA graph and replayed gives the eager step's loss and gradients, for every loss and
with ``upsample``; ``torch.compile(mode="reduce-overhead")`` of such a step (Inductor's CUDA graphs)
works too. Possible because no fused call waits for the device: inside a capture the label check is
a device assertion. Also torch.compile(fullgraph=True) of the Triton kernels compiled for the GPU
(the plain losses, the Dice family, the exact selection). These need a GPU (marked ``cuda``); the
deferred check itself is tested on the CPU (tests/test_robustness.py::test_bad_labels)."""

import pytest
import torch

import fused_imbalance as fi
import fused_imbalance.functional as FI
from fused_imbalance.ops import select as SEL
from test_dice import _data
from test_select import check, histogram_of
from tolerances import TOL

try:
    from fused_imbalance.ops import triton_backend

    _HAVE_TRITON = triton_backend.available()
except ImportError:
    _HAVE_TRITON = False
if _HAVE_TRITON:  # the Triton ops' inputs (test_internals_triton.py skips itself without them)
    from test_internals_triton import DEV, make

pytestmark = pytest.mark.cuda

C = 5


def _losses(dev):
    """Every loss as a training loop calls it, its constant tensors made once on the device (a CPU
    tensor copied in at every step would be read from freed host memory by a replayed graph)."""
    w = torch.linspace(0.5, 2.0, C, device=dev)
    acc = torch.linspace(0.2, 0.9, C, device=dev)
    outlying = torch.arange(1.0, C + 1, device=dev)
    kw = dict(backend="triton")
    return {
        "cross_entropy": lambda out, y: fi.cross_entropy(out, y, w, **kw),
        "focal_loss": lambda out, y: fi.focal_loss(out, y, 2.0, **kw),
        "sigmoid_focal_loss": lambda out, y: fi.sigmoid_focal_loss(out, y, 1.5, **kw),
        "class_balanced": fi.ClassBalancedLoss([5, 4, 3, 2, 1], 0.9, "focal", **kw).to(dev),
        "recall_loss": lambda out, y: fi.recall_loss(out, y, **kw),
        "recall_module": fi.RecallLoss(C, momentum=0.9, **kw).to(dev),
        "cdb_loss": lambda out, y: fi.cdb_loss(out, y, acc, gamma=0.5, **kw),
        "cdb_module": fi.CDBLoss(C, gamma=0.5, **kw).to(dev),
        "mse_outlying_loss": lambda out, y: fi.mse_outlying_loss(out, y, outlying, input="softmax", **kw),
        "focal_none": lambda out, y: fi.focal_loss(out, y, 2.0, reduction="none", **kw),
        "focal_upsample": lambda out, y: fi.focal_loss(out, y, 2.0, upsample="bilinear", **kw),
        "dice_ce_loss": lambda out, y: fi.dice_ce_loss(out, y, weight=w, **kw),
        "generalized_dice_loss": lambda out, y: fi.generalized_dice_loss(out, y, **kw),
        "tversky_none": lambda out, y: fi.tversky_loss(out, y, 0.3, 0.7, gamma=0.75, reduction="none", **kw),
        "dice_module": fi.DiceLoss(w[1:], include_background=False, batch=True, **kw).to(dev),
    }


STEPS = list(_losses("cpu"))


def _setup(name, seed=0):
    torch.manual_seed(seed)
    dev = "cuda"
    net = torch.nn.Conv2d(3, C, 3, padding=1).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    up = name == "focal_upsample"
    x = torch.randn(2, 3, 8 if up else 16, 8 if up else 16, device=dev)
    y = torch.randint(0, C, (2, 16, 16), device=dev)
    y[:, 0] = -100
    return net, opt, x, y, _losses(dev)[name]


def _step(net, opt, x, y, loss_fn):
    opt.zero_grad(set_to_none=False)
    loss = loss_fn(net(x), y).sum()
    loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize("name", STEPS)
def test_cuda_graph_training_step(name):
    """Two replays of the captured step equal two eager steps from the same start: losses, the
    updated parameters (so the gradients) and, for the recall module, its moving average."""
    net, opt, x, y, loss_fn = _setup(name)
    eager_net, eager_opt, _, _, eager_fn = _setup(name)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as CUDA-graph capture requires
        for _ in range(3):
            _step(net, opt, x, y, loss_fn)
            _step(eager_net, eager_opt, x, y, eager_fn)
    torch.cuda.current_stream().wait_stream(side)
    fi.check_deferred()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _step(net, opt, x, y, loss_fn)
    # capture records without running: the graph's parameters are those after the warm-up, as eager's
    eager_net.load_state_dict(net.state_dict())
    if name == "recall_module":
        eager_fn.load_state_dict(loss_fn.state_dict())
    for _ in range(2):
        graph.replay()
        want = _step(eager_net, eager_opt, x, y, eager_fn)
        torch.testing.assert_close(static_loss, want, **TOL[torch.float32])
        for p, q in zip(net.parameters(), eager_net.parameters()):
            torch.testing.assert_close(p, q, **TOL[torch.float32])
    if name == "recall_module":
        torch.testing.assert_close(loss_fn.running_recall, eager_fn.running_recall, **TOL[torch.float32])


def test_cuda_graph_bad_label_is_a_device_assertion():
    """Inside a capture no Python runs at replay: the label check is a device assertion, captured too."""
    net, opt, x, y, loss_fn = _setup("focal_loss")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _step(net, opt, x, y, loss_fn)
    torch.cuda.current_stream().wait_stream(side)
    fi.check_deferred()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _step(net, opt, x, y, loss_fn)
    graph.replay()
    torch.cuda.synchronize()  # a good batch replays cleanly


@pytest.mark.parametrize("name", ["cross_entropy", "recall_loss", "focal_upsample", "dice_ce_loss"])
def test_compile_reduce_overhead(name):
    """torch.compile(mode="reduce-overhead") of the forward and loss (Inductor's CUDA graphs): the same
    losses and gradients as eager over several steps."""
    net, opt, x, y, loss_fn = _setup(name)
    eager_net, eager_opt, _, _, eager_fn = _setup(name)

    def forward(x, y):
        return loss_fn(net(x), y).sum()

    compiled = torch.compile(forward, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):
        opt.zero_grad(set_to_none=False)
        loss = compiled(x, y)
        loss.backward()
        opt.step()
        want = _step(eager_net, eager_opt, x, y, eager_fn)
        torch.testing.assert_close(loss, want, **TOL[torch.float32])
        for p, q in zip(net.parameters(), eager_net.parameters()):
            torch.testing.assert_close(p, q, **TOL[torch.float32])
    fi.check_deferred()


# --- torch.compile(fullgraph=True) on CUDA --------------------------------------------------------


@pytest.mark.cuda  # under TRITON_INTERPRET the kernels cannot be traced (see _opcheck_utils)
def test_compile_fullgraph():
    import fused_imbalance.functional as FI

    x, y, _ = make((2, 5, 6, 4), "cl", dtype=torch.float32)
    y = torch.where((y >= 0) & (y < 5), y, torch.full_like(y, -100))

    def f(x, conf):
        return FI.focal_loss(x, y, 2.0, confusion=conf, backend="triton") + FI.recall_loss(
            x, y, backend="triton"
        )

    xe = x.clone().requires_grad_(True)
    xc = x.clone().requires_grad_(True)
    ce, cc = (torch.zeros(5, 5, dtype=torch.int64, device=DEV) for _ in range(2))
    le = f(xe, ce)
    lc = torch.compile(f, fullgraph=True)(xc, cc)
    le.backward()
    lc.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(xc.grad, xe.grad)
    assert torch.equal(cc, ce)


@pytest.mark.cuda
def test_compile_fullgraph_cuda():
    x, y = _data((2, 19, 32, 48), dtype=torch.float32, device="cuda")
    step = lambda t: FI.dice_ce_loss(t, y, batch=True) + FI.generalized_dice_loss(t, y)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    la = torch.compile(step, fullgraph=True)(xa)
    lb = step(xb)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(xa.grad, xb.grad)


@pytest.mark.cuda  # under TRITON_INTERPRET the Triton kernels cannot be traced
def test_compile_fullgraph_triton():
    v = torch.rand(100_000, device="cuda")
    v[::3] = -1.0

    def f(v, fh):
        k = torch.clamp((v >= 0).sum() - 1, max=40_000)  # a device value
        return SEL.select_kth(v, k), SEL.select_kth(v, k, fh)

    a, b = torch.compile(f, fullgraph=True)(v, histogram_of(v.cpu()).cuda())
    check(a, v.cpu(), 40_000)
    check(b, v.cpu(), 40_000)
