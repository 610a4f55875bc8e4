"""The Triton ops of the kernel contract, tested directly against the eager reference.

``test_losses.py`` runs every loss of the functional API on this backend; this file covers the
two ops themselves: each kernel and tiling the launcher picks (static-class kernels with class
statistics in registers or in per-program rows, one or several class groups, 16-byte vectors of
1/2/4/8 pixels or gathered channels_last pixels; chunked kernels with per-program class rows or
the class-sum kernel), argmax and non-finite logits, labels of every dtype and out of range, the
need_tp / need_confusion specialisations, the gradient inputs, non-dense logits, determinism of each
tiling, ``opcheck`` and ``gradcheck``; the launches of the Dice family and of the exact selection (its
programs, tails and first digit). torch.compile on a GPU: test_compile_cuda.py. Without a GPU the
kernels run on CPU tensors through TRITON_INTERPRET=1 (set by conftest).
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

import contract  # noqa: E402
from fused_imbalance.ops import Mode, Reduction, Weighting, acc_dtype, pixel_view  # noqa: E402
from fused_imbalance.ops import _triton_host as H  # noqa: E402
from fused_imbalance.ops import triton_backend  # noqa: E402
from fused_imbalance.ops import triton_loss as T  # noqa: E402
from tolerances import LOSS_TOL, TOL  # noqa: E402

import fused_imbalance.functional as FI  # noqa: E402
import fused_imbalance.reference as R  # noqa: E402
from fused_imbalance.ops import select as SEL  # noqa: E402
from fused_imbalance.ops import triton_select as TS  # noqa: E402
from test_dice import _data  # noqa: E402
from test_select import DTYPES, check, first_digit, histogram_of  # noqa: E402

if not triton_backend.available():
    pytest.skip("the Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

BE = triton_backend.backend()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter evaluates both sides of every tl.where with numpy, which warns about the
# side that is thrown away (log(0), inf - inf at padding and -inf logits).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
MODES = list(Mode)
GAMMA = {Mode.SOFTMAX_FOCAL: 2.0, Mode.SIGMOID_FOCAL: 1.5}


def make(shape, layout="nchw", dtype=torch.float64, seed=0, label_dtype=torch.int64, ignore=-100):
    """Logits of ``shape`` in ``layout``; labels with ignored pixels, two bad labels and a class
    (1) absent. Returns (x, labels shaped like the target, tvals)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    C = shape[1]
    y = torch.randint(0, C, (shape[0],) + tuple(shape[2:]), generator=g)
    if C > 2:
        y[y == 1] = 0
    flat = y.view(-1)
    flat[::5] = ignore
    if flat.numel() > 8:
        flat[3], flat[7] = C + 2, -3  # bad labels: counted, otherwise ignored
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    tvals = torch.linspace(1.0, 3.0, C, dtype=acc_dtype(x))
    return x.to(DEV), y.to(label_dtype).to(DEV), tvals.to(DEV)


def run_fwd(x, y, mode, gamma, tvals, ignore=-100, need_tp=True, need_confusion=True):
    """The forward's per-pixel and per-class losses (two calls): (pixel_loss, class_loss, count, tp, bad
    count, confusion or None)."""
    return contract.per_pixel_and_class(
        BE.fwd,
        x,
        y.reshape(-1),
        mode,
        gamma,
        tvals if mode in (2, 3) else None,
        ignore,
        need_tp,
        need_confusion,
    )


def bwd(x, y, up, scale, mode, gamma, tvals, ignore=-100):
    return BE.bwd(
        x, y.reshape(-1), up, scale, tvals if mode in (2, 3) else None, None, int(mode), gamma, ignore
    )


def check_forward(x, y, mode, gamma, tvals, ignore=-100, need_tp=True, need_confusion=True):
    pl, cl, count, tp, bad, conf = run_fwd(x, y, mode, gamma, tvals, ignore, need_tp, need_confusion)
    rcl, _, rcount, rtp, rbad, rconf = contract.forward(
        x, y, None, tvals, mode, gamma, ignore, Reduction.CLASS, Weighting.NONE
    )
    rpl = contract.pixel_loss(x, y, mode, gamma, tvals, ignore)
    acc = acc_dtype(x)
    assert pl.dtype == cl.dtype == acc and pl.shape == rpl.shape and cl.shape == rcl.shape
    torch.testing.assert_close(pl, rpl, **LOSS_TOL[x.dtype])
    torch.testing.assert_close(cl, rcl, **LOSS_TOL[x.dtype])
    assert torch.equal(count, rcount)
    assert torch.equal(tp, rtp) if need_tp else tp.shape == (0,)
    assert torch.equal(conf, rconf) if need_confusion else conf is None
    assert int(bad) == int(rbad)
    if mode != Mode.STATS:  # the weighted mean from the same pass, and its backward factor
        C = x.shape[1]
        w = torch.linspace(0.5, 2.0, C, dtype=acc, device=x.device)
        loss, scale, *_ = BE.fwd(
            x,
            y.reshape(-1),
            w,
            tvals if mode in (2, 3) else None,
            None,
            int(mode),
            gamma,
            ignore,
            int(Reduction.MEAN),
            int(Weighting.GENERAL),
            False,
            False,
            False,
        )
        wl, ws, *_ = contract.forward(x, y, w, tvals, mode, gamma, ignore, Reduction.MEAN, Weighting.GENERAL)
        torch.testing.assert_close(loss, wl, **LOSS_TOL[x.dtype])
        torch.testing.assert_close(scale, ws, **LOSS_TOL[x.dtype])


def check_backward(x, y, mode, gamma, tvals, ignore=-100, gp=True, gc=True, seed=1):
    """The backward against autograd of the reference, for each upstream form asked for: a per-pixel
    gradient (gp), a per-class factor (gc), a scalar gradient with a factor (both), or neither (1)."""
    C, N = x.shape[1], y.numel()
    acc = acc_dtype(x)
    g = torch.Generator().manual_seed(seed)
    grad_pixel = torch.randn(N, generator=g, dtype=acc).to(x.device)
    grad_class = torch.randn(C, generator=g, dtype=acc).to(x.device)
    forms = [(grad_pixel if gp else None, None), (None, grad_class if gc else None)]
    if gp and gc:
        forms.append((torch.tensor(0.75, dtype=acc, device=x.device), grad_class))
    # where the forward keeps each pixel's lse (a backward that would read the logits twice), the forms
    # after the first take it, as autograd passes it; the first recomputes it from the logits
    kept = T.keeps_lse(x, mode, gamma)
    lse = None
    if kept:
        lse = BE.fwd(
            x,
            y.reshape(-1),
            None,
            tvals if mode in (2, 3) else None,
            None,
            int(mode),
            gamma,
            ignore,
            int(Reduction.CLASS),
            int(Weighting.NONE),
            False,
            False,
            True,
        )[5]
        assert lse.shape == (kept * N,) and lse.dtype == acc
    for i, (up, scale) in enumerate(forms):
        grad = BE.bwd(
            x,
            y.reshape(-1),
            up,
            scale,
            tvals if mode in (2, 3) else None,
            lse if i else None,
            int(mode),
            gamma,
            ignore,
        )
        assert (
            grad.dtype == x.dtype and grad.shape == x.shape and grad.stride() == torch.empty_like(x).stride()
        )
        ref = contract.grad(x, y, up, scale, mode, gamma, tvals, ignore)
        torch.testing.assert_close(grad, ref, **TOL[x.dtype])
    return grad


@pytest.fixture
def small_chunks(monkeypatch):
    """Shrink the launcher's limits so that tiny inputs take the chunked large-C kernels."""
    monkeypatch.setattr(T, "_STATIC_C", 4)
    monkeypatch.setattr(T, "_ROW_CHUNK", 8)
    monkeypatch.setattr(T, "_STRIDED_TILE", (4, 4))
    monkeypatch.setattr(T, "_L1_TILE_BYTES", 0)  # every tile of several chunks: the forward keeps the lse


@pytest.fixture
def small_groups(monkeypatch):
    """Shrink the launcher's limits so that tiny inputs take the static kernels' loop over class
    groups (groups of 4 classes and an unrolled tail)."""
    monkeypatch.setattr(T, "_UNROLL_C", 4)
    monkeypatch.setattr(T, "_LOOP_GROUP", 4)
    monkeypatch.setattr(T, "_L1_TILE_BYTES", 0)  # every tile of several groups: the forward keeps the lse


# --- each kernel path, every mode, float64 -------------------------------------------------

PATHS = {  # (shape, layout): the kernel and tiling it exercises
    "nchw": ((2, 19, 7, 13), "nchw"),  # static, 2-pixel float64 vectors, statistics in registers
    "channels_last": ((2, 19, 7, 13), "cl"),  # static, gathered pixels, batch folded into the pixels
    "channels_last_c40": ((2, 40, 3, 5), "cl"),  # static, gathered pixels, class-sum kernel
    "nchw_c40": ((2, 40, 3, 5), "nchw"),  # static, two class groups and a tail of 8
    "rows": ((37, 5), "rows"),
    "rows_c1": ((9, 1), "rows"),  # one class
    "nchw_c2": ((2, 2, 5, 3), "nchw"),
    "volume_channels_last": ((2, 6, 3, 2, 4), "cl"),
    "nchw_c300": ((2, 300, 3, 4), "nchw"),  # chunked: 32 pixels x 64 classes, class-sum kernel
    "channels_last_c300": ((2, 300, 2, 3), "cl"),  # chunked: one pixel per tile, class-loss rows
    "rows_c5000": ((3, 5000), "rows"),  # chunked: two 4096-class chunks, online softmax
}


@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
@pytest.mark.parametrize("path", PATHS)
def test_paths(path, mode):
    shape, layout = PATHS[path]
    x, y, tvals = make(shape, layout)
    gamma = GAMMA.get(mode, 0.0)
    check_forward(x, y, mode, gamma, tvals)
    if mode != Mode.STATS:
        check_backward(x, y, mode, gamma, tvals)


@pytest.mark.parametrize("path", ["nchw", "nchw_c40", "channels_last_c300"])
def test_statistics_flags(path):
    """need_tp / need_confusion: the argmax and its counts only where asked for; the rest unchanged."""
    shape, layout = PATHS[path]
    x, y, tvals = make(shape, layout, dtype=torch.float32)
    check_forward(x, y, Mode.SOFTMAX_FOCAL, 2.0, tvals, need_tp=False, need_confusion=False)
    for need_tp, need_confusion in [(True, False), (False, True)]:
        check_forward(x, y, Mode.STATS, 0.0, tvals, need_tp=need_tp, need_confusion=need_confusion)


def test_150_classes():
    """ADE20K's class count: nine groups of 16 classes and a tail of 6, counts in rows."""
    x, y, tvals = make((2, 150, 3, 5), "nchw")
    check_forward(x, y, Mode.SOFTMAX_FOCAL, 2.0, tvals)
    check_backward(x, y, Mode.SOFTMAX_FOCAL, 2.0, tvals)


def test_class_sums_in_one_program(monkeypatch):
    """The class-sum kernel with fewer programs than it would start (its scratch columns capped):
    one program's threads walk every pixel."""
    monkeypatch.setattr(H, "_SUM_SCRATCH_BYTES", 0)
    shape, layout = PATHS["nchw_c40"]
    x, y, tvals = make(shape, layout, dtype=torch.float32)
    check_forward(x, y, Mode.SOFTMAX_FOCAL, 2.0, tvals, need_tp=False, need_confusion=False)


def test_launch_plans_follow_every_key():
    """A launch's cached plan is keyed on everything it derives from: calls that differ in one of layout,
    dtype, confusion matrix, flags or γ = 0 after one another each make their own plan, and give the
    bits of the same call made with no plan cached."""
    C = 5
    base = make((1, C, 4, 4), dtype=torch.float32)
    cl = make((1, C, 4, 4), "cl", dtype=torch.float32)
    half = make((1, C, 4, 4), dtype=torch.bfloat16)
    F, S, M = int(Mode.SOFTMAX_FOCAL), int(Mode.SIGMOID_FOCAL), int(Reduction.MEAN)
    N_, CL = int(Reduction.NONE), int(Reduction.CLASS)
    # (inputs, mode, gamma, reduction, weighting, need_tp, need_lse, confusion)
    calls = [
        (base, F, 0.0, M, 0, False, False, False),
        (cl, F, 0.0, M, 0, False, False, False),  # the layout
        (half, F, 0.0, M, 0, False, False, False),  # the dtype
        (base, F, 0.0, M, 0, False, False, True),  # a confusion matrix
        (base, F, 2.0, M, 0, False, False, False),  # γ ≠ 0: the focal terms
        (base, S, 0.0, M, 0, False, False, False),  # the mode
        (base, F, 0.0, N_, 0, False, False, False),  # the reduction
        (base, F, 0.0, CL, 0, True, False, False),  # true positives
        (base, F, 0.0, M, int(Weighting.GENERAL), False, False, False),  # the weighting
        (base, F, 0.0, M, 0, False, True, False),  # the kept lse asked for
    ]
    w = torch.linspace(0.5, 2.0, C, device=DEV)

    def step(args):
        (x, y, _), mode, gamma, red, wtg, tp, lse, conf = args
        confusion = torch.zeros(C, C, dtype=torch.int64, device=DEV) if conf else None
        out = BE.fwd(
            x, y.reshape(-1), w if wtg else None, None, confusion, mode, gamma, -100, red, wtg, tp, False, lse
        )
        grad = BE.bwd(x, y.reshape(-1), None, out[1], None, out[5], mode, gamma, -100)
        return [t.clone() for t in out] + [grad] + ([confusion] if conf else [])

    warm = [step(c) for c in calls]
    assert len(T._fwd_plans) == len(calls)
    # the backward's key: layout, dtype, mode and γ = 0 (the kept lse's presence and the factor too)
    assert len(T._bwd_plans) == 5
    for args, got in zip(calls, warm):
        T._fwd_plans.clear()
        T._bwd_plans.clear()
        for a, b in zip(got, step(args)):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("path", ["nchw", "channels_last_c40"])
def test_confusion_by_atomics(monkeypatch, path):
    """Confusion counts added straight into the caller's (C, C) matrix by integer atomics (the
    per-program register histogram off), and with the histogram (19 classes)."""
    monkeypatch.setattr(T, "_CONF_HIST_CELLS", 0)
    shape, layout = PATHS[path]
    x, y, tvals = make(shape, layout, dtype=torch.float32)
    check_forward(x, y, Mode.STATS, 0.0, tvals)


def test_finalize_after_a_row_reduction(monkeypatch):
    """Many rows x classes: the rows are summed by a launch of their own before the finalize."""
    monkeypatch.setattr(H, "_FINALIZE_ELEMS", 8)
    for path in ("nchw", "nchw_c40", "channels_last_c300"):
        shape, layout = PATHS[path]
        x, y, tvals = make(shape, layout, dtype=torch.float32)
        check_forward(x, y, Mode.SOFTMAX_FOCAL, 2.0, tvals)
        loss = BE.fwd(
            x,
            y.reshape(-1),
            None,
            None,
            None,
            0,
            0.0,
            -100,
            int(Reduction.MEAN),
            int(Weighting.RECALL),
            False,
            False,
            False,
        )[0]
        want = contract.forward(x, y, None, None, 0, 0.0, -100, Reduction.MEAN, Weighting.RECALL)[0]
        torch.testing.assert_close(loss, want, **LOSS_TOL[x.dtype])


@pytest.mark.parametrize("mode", [Mode.SOFTMAX_FOCAL, Mode.MSE_SOFTMAX])
@pytest.mark.parametrize(
    "shape, layout",
    [((2, 11, 3, 4), "nchw"), ((2, 11, 3, 4), "cl"), ((7, 12), "rows")],
    ids=["nchw", "channels_last", "rows"],
)
def test_small_groups(small_groups, shape, layout, mode):
    """The static kernels' loop over groups of 4 classes, with an unrolled tail of 3 (none for 12)."""
    x, y, tvals = make(shape, layout)
    check_forward(x, y, mode, GAMMA.get(mode, 0.0), tvals)
    check_backward(x, y, mode, GAMMA.get(mode, 0.0), tvals)


@pytest.mark.parametrize("mode", [Mode.SOFTMAX_FOCAL, Mode.SIGMOID_FOCAL, Mode.MSE_SOFTMAX])
@pytest.mark.parametrize("shape", [(6, 11), (2, 11, 2, 3)], ids=["rows", "nchw"])
def test_small_chunks(small_chunks, shape, mode):
    """The chunked kernels on an 11-class input: chunks of 8 (rows) and 4 (NCHW) classes with tails.
    Two images of 6 pixels (bad labels and ignored pixels among them): channels_last walks one
    pixel per tile, which the interpreter pays per pixel."""
    for layout in ("nchw", "cl") if len(shape) == 4 else ("rows",):
        x, y, tvals = make(shape, layout)
        check_forward(x, y, mode, GAMMA.get(mode, 0.0), tvals)
        check_backward(x, y, mode, GAMMA.get(mode, 0.0), tvals)


def test_kept_lse():
    """Floats per pixel the forward keeps for its backward: where a softmax backward would read a pixel's
    logits twice from memory (ADE20K's 150 classes in NCHW: several class groups over a tile beyond L1),
    the lse, and the focal weight (γ != 0) or the softmax MSE's Σ p (p - t); nothing where one read
    suffices (one class group, a tile that stays in L1, the rows kernels, the per-class modes)."""

    def k(shape, dtype=torch.float32, layout="nchw", mode=Mode.SOFTMAX_FOCAL, gamma=0.0):
        x = torch.empty(shape, dtype=dtype, device="meta")
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
        return T.keeps_lse(x, mode, gamma)

    ade, city = (2, 150, 64, 64), (2, 19, 64, 64)
    assert (k(ade), k(ade, gamma=2.0), k(ade, mode=Mode.MSE_SOFTMAX), k(ade, dtype=torch.bfloat16)) == (
        1,
        2,
        2,
        1,
    )
    assert (k((2, 1000, 64, 64)), k((2, 300, 64, 64))) == (1, 0)  # chunked: 32 x 1000 classes; 32 x 300 in L1
    assert (k(ade, mode=Mode.SIGMOID_FOCAL), k(ade, mode=Mode.MSE_LOGITS), k(ade, layout="cl")) == (0, 0, 0)
    assert (k(city), k(city, dtype=torch.bfloat16), k((4096, 150)), k((4096, 8142))) == (0, 0, 0, 0)


def test_training_keeps_lse(small_groups, monkeypatch):
    """An eager call that autograd records asks the forward for the lse and hands it to the backward (a
    call without autograd asks for nothing); the gradient is the reference's."""
    from fused_imbalance import _fused

    _fused.register_backend(BE)
    seen = []

    def fwd(*a):
        seen.append(("fwd", a[-1]))
        return BE.fwd(*a)

    def bwd_spy(*a):
        seen.append(("bwd", a[5] is not None and a[5].numel() > 0))
        return BE.bwd(*a)

    monkeypatch.setitem(_fused._BACKENDS, BE.name, BE._replace(fwd=fwd, bwd=bwd_spy))
    x, y, tvals = make((1, 9, 2, 3), "nchw")
    x.requires_grad_(True)
    args = (
        y.reshape(-1),
        (),
        None,
        None,
        None,
        Mode.SOFTMAX_FOCAL,
        2.0,
        -100,
        Reduction.SUM,
        Weighting.NONE,
        False,
        False,
    )
    with torch.no_grad():
        _fused.forward(BE.name, x, *args)
    loss = _fused.forward(BE.name, x, *args)[0]
    loss.backward()
    assert seen == [("fwd", False), ("fwd", True), ("bwd", True)]
    torch.testing.assert_close(x.grad, contract.grad(x, y, None, None, 0, 2.0, None), **TOL[x.dtype])


def test_gamma_zero_is_cross_entropy():
    x, y, tvals = make((2, 5, 4, 3), dtype=torch.float32)
    pl, cl, *_ = run_fwd(x, y, Mode.SOFTMAX_FOCAL, 0.0, None)
    ce = torch.nn.functional.cross_entropy(
        x, torch.where((y >= 0) & (y < 5), y, -100).long(), reduction="none"
    ).reshape(-1)
    torch.testing.assert_close(pl, ce, **LOSS_TOL[torch.float32])
    for mode in (Mode.SOFTMAX_FOCAL, Mode.SIGMOID_FOCAL):
        check_forward(x, y, mode, 0.0, tvals)
        check_backward(x, y, mode, 0.0, tvals)


def test_gamma_is_float64_for_float64_kernels():
    """A Python float kernel argument is float32 in a compiled launch (γ = 0.999 then moved a float64
    focal loss by 2e-9 relatively on an H100) and float64 in an Inductor-compiled graph. Every kernel
    that takes γ also takes it as gamma64, annotated float64, for its float64 variant."""
    import inspect

    import triton.language as tl

    from fused_imbalance.ops import triton_kernels, triton_upsample_kernels

    # triton.jit's kernels (interpreted or not): the parameters are those of their Python function
    kernels = [
        k.fn
        for mod in (triton_kernels, triton_upsample_kernels)
        for name, k in vars(mod).items()
        if name.endswith("_kernel") and hasattr(k, "fn")
    ]
    kernels = [f for f in kernels if "gamma" in inspect.signature(f).parameters]
    assert len(kernels) == 7
    for f in kernels:
        names = list(inspect.signature(f).parameters)
        gamma64 = inspect.signature(f).parameters[names[names.index("gamma") + 1]]
        assert gamma64.name == "gamma64" and gamma64.annotation == tl.float64, f.__name__


def test_multiple_programs_and_tiles(monkeypatch):
    """Enough pixels for several tiles per program and several programs (per-program partial rows).
    The compiled tile size (the interpreter's are 8 times larger) keeps the input small; at most 2
    programs (a GPU would give each tile its own)."""
    monkeypatch.setattr(T, "_INTERPRET_TILE_SCALE", 1)
    programs = T._programs
    monkeypatch.setattr(T, "_programs", lambda *a, **k: min(programs(*a, **k), 2))
    x, y, tvals = make((1, 5, 41, 43), "nchw", dtype=torch.float32)
    B, C, S, *_ = pixel_view(x)
    rows, vec, _, _ = T._static_plan(C, S, 1, x.element_size())
    num_tiles = T._cdiv(S, rows * vec)
    assert num_tiles > T._programs(num_tiles, T._WARPS, x.device) > 1
    for mode in (Mode.SIGMOID_FOCAL, Mode.STATS):
        check_forward(x, y, mode, GAMMA.get(mode, 0.0), tvals)


# --- dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["nchw", "channels_last", "nchw_c40", "rows_chunks"])
def test_dtypes(request, path, dtype):
    """rows_chunks: the chunked rows kernel over two chunks with a tail, as rows_c5000 takes it, on
    11 classes in chunks of 8 (the interpreter pays for every one of 4096 lanes)."""
    if path == "rows_chunks":
        request.getfixturevalue("small_chunks")
        shape, layout = (6, 11), "rows"
    else:
        shape, layout = PATHS[path]
    x, y, tvals = make(shape, layout, dtype=dtype)
    for mode in (Mode.SOFTMAX_FOCAL, Mode.SIGMOID_FOCAL):
        check_forward(x, y, mode, GAMMA[mode], tvals)
        check_backward(x, y, mode, GAMMA[mode], tvals)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_label_dtypes(label_dtype):
    ignore = 255 if label_dtype == torch.uint8 else -100
    x, y, tvals = make((2, 7, 5, 3), "nchw", label_dtype=label_dtype, ignore=ignore)
    check_forward(x, y, Mode.SOFTMAX_FOCAL, 2.0, tvals, ignore)
    check_backward(x, y, Mode.SOFTMAX_FOCAL, 2.0, tvals, ignore)


def test_labels_are_widened_before_comparing():
    """int64 labels 2**32 + 1 and -2**32 are bad, not class 1 and 0 after a 32-bit truncation;
    an ignore_index inside [0, C) ignores that class."""
    x, y, tvals = make((2, 4, 3, 3), "nchw")
    y.view(-1)[:2] = torch.tensor([2**32 + 1, -(2**32)])
    for ignore in (-100, 2):
        pl, cl, count, tp, bad, conf = run_fwd(x, y, Mode.SOFTMAX_FOCAL, 0.0, None, ignore)
        rcl, _, rcount, rtp, rbad, rconf = contract.forward(
            x, y, None, None, Mode.SOFTMAX_FOCAL, 0.0, ignore, Reduction.CLASS, Weighting.NONE
        )
        assert int(bad) == int(rbad) and pl[:2].eq(0).all()
        assert torch.equal(count, rcount) and torch.equal(conf, rconf)
        torch.testing.assert_close(cl, rcl, **LOSS_TOL[x.dtype])
    assert int(count[2]) == 0


# --- argmax, ties and non-finite logits -----------------------------------------------------


@pytest.mark.parametrize("tiling", ["unrolled", "groups", "chunks"])
def test_argmax_ties_nan_and_infinities(request, tiling):
    """First index on ties and NaN as the maximum (torch.argmax), also across class groups and
    chunk boundaries; rows of -inf and a first group/chunk of -inf leave the others exact."""
    if tiling != "unrolled":
        request.getfixturevalue({"groups": "small_groups", "chunks": "small_chunks"}[tiling])
    C = 11
    x = torch.randn(8, C, dtype=torch.float64)
    x[0, 2] = x[0, 9] = 50.0  # tie across chunks: 2 wins
    x[1, 9] = 50.0
    x[1, 3] = float("nan")  # NaN before the max
    x[2, 1] = 50.0
    x[2, 10] = float("nan")  # NaN after the max, in the last chunk
    x[3] = float("-inf")  # every logit -inf: argmax 0, NaN loss (as torch)
    x[4, :8] = float("-inf")  # the first chunk all -inf, the online softmax starts at -inf
    x[5, 8] = float("inf")
    x[6] = 7.0  # all tied
    y = torch.tensor([2, 9, 1, 0, 9, 8, 6, 10])
    x, y = x.to(DEV), y.to(DEV)
    pl, _, count, tp, _, conf = run_fwd(x, y, Mode.SOFTMAX_FOCAL, 0.0, None)
    am = x.argmax(1)
    assert am.tolist()[:4] == [2, 3, 10, 0]
    expect = torch.zeros(C, C, dtype=torch.int64, device=DEV).index_put_(
        (y, am), torch.ones_like(y), accumulate=True
    )
    assert torch.equal(conf, expect)
    assert torch.equal(tp, torch.bincount(y[am == y], minlength=C))
    ref = torch.nn.functional.cross_entropy(x, y, reduction="none")
    torch.testing.assert_close(pl, ref, equal_nan=True, **LOSS_TOL[x.dtype])
    assert pl[[1, 2, 3]].isnan().all() and pl[[0, 4, 6, 7]].isfinite().all()


@pytest.mark.parametrize("gamma", [0.25, 1.0, 2.0])
def test_focal_at_certainty(gamma):
    """p_y = 1 in float32: loss 0 and gradient 0, the limit, with no 0 * inf from the
    (1 - p)^(γ - 1) of the derivative (autograd of the eager formula gives NaN there for γ < 1)."""
    x = torch.zeros(4, 3, dtype=torch.float32)
    x[:, 1] = 200.0
    x[2, 1] = 20.0  # 1 - p_y ~ 4e-9: float32 log p_y rounds to 0, 1 - p_y does not
    y = torch.ones(4, dtype=torch.int64)
    x, y = x.to(DEV), y.to(DEV)
    pl, *_ = run_fwd(x, y, Mode.SOFTMAX_FOCAL, gamma, None)
    grad = bwd(x, y, torch.ones(4, device=DEV), None, 0, gamma, None)
    assert torch.isfinite(pl).all() and torch.isfinite(grad).all()
    assert pl[0] == 0 and (grad[0] == 0).all()
    check_backward(x[2:3].double(), y[2:3], Mode.SOFTMAX_FOCAL, gamma, None)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_sigmoid_focal_float32_tails(gamma):
    """float32 sigmoid focal over logits from -100 to 100: exp(-|x|) from 1 down to below float32's
    normal range, so log(1 + e) (a polynomial in float32) and the focal factor are checked where
    a relative error would show: e tiny (softplus = e), e near 1 (x near 0)."""
    C = 3
    v = torch.cat([torch.linspace(-100.0, 100.0, 61), torch.tensor([-1e-6, 1e-6, -0.5, 0.5, 17.0, -17.0])])
    x = v.repeat_interleave(C).reshape(-1, C)
    x[:, 1] = x[:, 1].flip(0)
    x[:, 2] = 0.25 * x[:, 0]
    y = torch.arange(x.shape[0]) % C
    x, y = x.to(DEV), y.to(DEV)
    check_forward(x, y, Mode.SIGMOID_FOCAL, gamma, None)
    check_backward(x, y, Mode.SIGMOID_FOCAL, gamma, None)


def test_softmax_float32_far_from_zero():
    """float32 logits of magnitude 1e9-1e30 with spreads of a few units: exp(x_k - max) must be
    taken of the difference (a fused x log2(e) - max log2(e) leaves max's rounding error in every
    exponent, far beyond ex2's range). Compared as per-pixel losses and gradients."""
    base = torch.tensor([1e9, -3e12, 1e20, -1e30, 7.5e29]).repeat_interleave(4)
    spread = torch.tensor([[0.0, 1.5, -2.0], [3.0, 0.0, 0.25]]).repeat(10, 1)
    x = (base[:, None] + spread.to(torch.float64) * base.abs()[:, None] * 2.0**-20).float()
    y = torch.arange(x.shape[0]) % 3
    x, y = x.to(DEV), y.to(DEV)
    for mode in (Mode.SOFTMAX_FOCAL, Mode.MSE_SOFTMAX):
        tv = torch.tensor([0.5, 1.0, 2.0], device=DEV) if mode == Mode.MSE_SOFTMAX else None
        check_forward(x, y, mode, 2.0 if mode == Mode.SOFTMAX_FOCAL else 0.0, tv)
        check_backward(x, y, mode, 2.0 if mode == Mode.SOFTMAX_FOCAL else 0.0, tv)


# --- the gradient inputs and layouts of the backward ---------------------------------------


@pytest.mark.parametrize("gp, gc", [(True, False), (False, True), (False, False)])
def test_backward_inputs(gp, gc):
    """A per-pixel upstream gradient, a per-class factor, or neither (each 1: the gradient of Σ ℓ_n)."""
    x, y, tvals = make((2, 6, 4, 3), "cl")
    check_backward(x, y, Mode.MSE_SOFTMAX, 0.0, tvals, gp=gp, gc=gc)


def test_backward_expanded_and_scalar_upstream():
    """autograd hands ``sum()``'s gradient over as a stride-0 expansion, a mean's as a scalar: both are
    one value for every pixel; a strided per-class factor is read with its stride."""
    x, y, _ = make((2, 6, 4, 3), "nchw")
    N = y.numel()
    ones = torch.full((), 1.5, dtype=torch.float64, device=DEV)
    scale = torch.arange(12.0, dtype=torch.float64, device=DEV)[::2]  # stride 2
    expect = bwd(x, y, ones.expand(N).contiguous(), scale.contiguous(), 1, 1.5, None)
    assert torch.equal(bwd(x, y, ones.expand(N), scale.contiguous(), 1, 1.5, None), expect)
    assert torch.equal(bwd(x, y, ones, scale.contiguous(), 1, 1.5, None), expect)


def test_non_dense_logits():
    """Every other channel of a bigger tensor: x and its gradient (made contiguous by empty_like)
    have different strides; (N, C) rows with a class stride of 2."""
    big, y, tvals = make((2, 12, 5, 3), "nchw")
    x = big[:, ::2]
    assert torch.empty_like(x).stride() != x.stride()
    for mode in (Mode.SOFTMAX_FOCAL, Mode.MSE_LOGITS):
        check_forward(x, y, mode, 2.0, tvals[::2].contiguous())
        check_backward(x, y, mode, 2.0, tvals[::2].contiguous())
    rows = big.movedim(1, -1).reshape(-1, 12)[:, ::2]
    check_forward(rows, y.reshape(-1), Mode.SIGMOID_FOCAL, 1.5, None)
    check_backward(rows, y.reshape(-1), Mode.SIGMOID_FOCAL, 1.5, None)


# --- degenerate inputs --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3), (0, 4)])
def test_empty(shape):
    x = torch.zeros(shape, device=DEV)
    y = torch.zeros((shape[0],) + shape[2:], dtype=torch.int64, device=DEV)
    pl, cl, count, tp, bad, conf = run_fwd(x, y, Mode.SOFTMAX_FOCAL, 2.0, None)
    assert pl.shape == (0,) and (cl == 0).all() and (count == 0).all() and (conf == 0).all() and bad == 0
    loss = BE.fwd(x, y.reshape(-1), None, None, None, 0, 2.0, -100, 0, 3, False, True, False)[0]
    assert loss.item() == 0
    grad = bwd(x, y, torch.zeros(0, device=DEV), torch.ones(4, device=DEV), 0, 2.0, None)
    assert grad.shape == x.shape


def test_all_ignored():
    x, y, tvals = make((2, 5, 4, 3), "nchw")
    y.fill_(-100)
    for mode in MODES:
        pl, cl, count, tp, bad, conf = run_fwd(x, y, mode, 2.0, tvals)
        assert (pl == 0).all() and (cl == 0).all() and (count == 0).all() and (conf == 0).all()
        grad = bwd(
            x,
            y,
            torch.ones(y.numel(), dtype=torch.float64, device=DEV),
            torch.ones(5, dtype=torch.float64, device=DEV),
            int(mode),
            2.0,
            tvals,
        )
        assert (grad == 0).all()


def test_bad_label_output():
    """The forward returns how many labels were bad and the largest (the deferred check names it)."""
    x, y, _ = make((2, 5, 4, 3), "nchw")  # labels C + 2 and -3 among them
    bad = BE.fwd(x, y.reshape(-1), None, None, None, 0, 0.0, -100, 0, 0, False, True, False)[4]
    assert bad.tolist() == [2, 7]


@pytest.mark.parametrize("path", ["nchw", "channels_last_c300"])
def test_deterministic(path):
    shape, layout = PATHS[path]
    x, y, _ = make(shape, layout, dtype=torch.float32)
    a = run_fwd(x, y, Mode.SIGMOID_FOCAL, 1.5, None)
    b = run_fwd(x, y, Mode.SIGMOID_FOCAL, 1.5, None)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    gp = torch.randn(y.numel(), device=DEV)
    g1 = bwd(x, y, gp, None, 1, 1.5, None)
    g2 = bwd(x, y, gp, None, 1, 1.5, None)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("mode", [m for m in MODES if m != Mode.STATS], ids=lambda m: m.name)
@pytest.mark.parametrize("chunked", [False, True])
def test_gradcheck(request, mode, chunked):
    """The per-pixel and per-class outputs through the autograd formula (functional.py's path), in
    float64."""
    from fused_imbalance import _fused

    _fused.register_backend(BE)
    if chunked:
        request.getfixturevalue("small_chunks")
    # chunked: 5 classes in chunks of 4 and a tail of 1, NCHW tiles and the class-sum kernel; three
    # pixels (one ignored) keep the finite differences few (the interpreter runs each one)
    x, y, tvals = make((1, 5, 3, 1) if chunked else (1, 3, 2, 2), "nchw")
    x = x.requires_grad_(True)
    C, N = x.shape[1], y.numel()
    wp = torch.linspace(0.5, 1.5, N, dtype=torch.float64, device=DEV)
    wc = torch.linspace(-1.0, 2.0, C, dtype=torch.float64, device=DEV)
    tv = tvals if mode in (2, 3) else None

    def f(t):
        args = (tv, None, mode, GAMMA.get(mode, 0.0), -100)
        pl = _fused.forward(
            "triton", t, y.reshape(-1), (), None, *args, Reduction.NONE, Weighting.NONE, False, False
        )[0]
        cl = _fused.forward(
            "triton", t, y.reshape(-1), (), None, *args, Reduction.CLASS, Weighting.NONE, False, False
        )[0]
        return (pl * wp).sum() + (cl * wc).sum()

    assert torch.autograd.gradcheck(f, (x,))


def _opcheck_utils():
    # Under TRITON_INTERPRET, @triton.jit gives an InterpretedFunction, which wrap_triton hands
    # back untraced (torch does not trace interpreted kernels): AOT tracing would launch it on
    # fake tensors. That check runs where there is a GPU.
    utils = ["test_schema", "test_faketensor"]
    return utils + (["test_aot_dispatch_dynamic"] if torch.cuda.is_available() else [])


def test_opcheck():
    x, y, tvals = make((2, 5, 3, 2), "nchw")
    y = y.reshape(-1)
    w = torch.linspace(0.5, 2.0, 5, dtype=torch.float64, device=DEV)
    conf = torch.zeros(5, 5, dtype=torch.int64, device=DEV)
    for args in [
        (x, y, w, None, conf, 0, 2.0, -100, 0, 1, True, True, False),
        (x, y, None, tvals, None, 3, 0.0, -100, 2, 0, False, False, False),
        (x, y, None, None, conf, 4, 0.0, -100, 1, 0, True, True, False),
        (x, y, None, None, None, 0, 0.0, -100, 3, 3, False, True, False),
    ]:
        torch.library.opcheck(T.loss_fwd, args, test_utils=_opcheck_utils())
    gp = torch.randn(y.numel(), dtype=torch.float64, device=DEV)
    gc = torch.randn(5, dtype=torch.float64, device=DEV)
    for args in [(x, y, gp, gc, None, None, 1, 1.5, -100), (x, y, None, gc, tvals, None, 2, 0.0, -100)]:
        torch.library.opcheck(T.loss_bwd, args, test_utils=_opcheck_utils())


def test_eager_launchers_are_the_ops():
    """The eager path's launchers and the registered ops run the same code: bit-identical outputs."""
    x, y, _ = make((2, 19, 7, 13), "nchw", dtype=torch.float32)
    t = y.reshape(-1)
    w = torch.linspace(0.5, 2.0, 19, device=DEV)
    c1, c2 = (torch.zeros(19, 19, dtype=torch.int64, device=DEV) for _ in range(2))
    a = BE.fwd(x, t, w, None, c1, 0, 2.0, -100, 0, 1, True, True, False)
    b = BE.fwd_op(x, t, w, None, c2, 0, 2.0, -100, 0, 1, True, True, False)
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and torch.equal(c1, c2)
    g = torch.tensor(1.0, device=DEV)
    assert torch.equal(
        BE.bwd(x, t, g, a[1], None, None, 0, 2.0, -100), BE.bwd_op(x, t, g, a[1], None, None, 0, 2.0, -100)
    )


_COMPILED_LAUNCHES = r"""
import os

os.environ.pop("TRITON_INTERPRET", None)  # the compiled kernels (JITFunction), as on a GPU
import torch
from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper, kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.jit import JITFunction

launched = []
JITFunction.run = lambda self, *a, **kw: launched.append(self.fn.__name__)  # no GPU here: each launch a no-op
from fused_imbalance import _fused
from fused_imbalance.ops import Mode, Reduction, Weighting, triton_backend
from fused_imbalance.ops._triton_compat import wrap
from fused_imbalance.ops.triton_kernels import _finalize_kernel

_fused.register_backend(triton_backend.backend())
x = torch.randn(2, 19, 4, 4, requires_grad=True)
y = torch.randint(0, 19, (32,))
table = len(kernel_side_table.constant_args)
args = (None, None, None, Mode.SOFTMAX_FOCAL, 0.0, -100, Reduction.MEAN, Weighting.NONE, False, False)
for _ in range(3):
    _fused.forward("triton", x, y, (), *args)[0].backward()
assert launched == ["_fwd_static_kernel", "_finalize_kernel", "_bwd_static_kernel"] * 3, launched
assert len(kernel_side_table.constant_args) == table, "an eager launch went through the higher-order op"
assert wrap(_finalize_kernel) is _finalize_kernel


class Counting(TorchDispatchMode):  # a user's mode (no rule for the higher-order op): direct launches
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


launched.clear()
with Counting():
    _fused.forward("triton", x, y, (), *args)[0].backward()
assert launched == ["_fwd_static_kernel", "_finalize_kernel", "_bwd_static_kernel"], launched
assert len(kernel_side_table.constant_args) == table
with FakeTensorMode():  # a trace (fake tensors, functionalization, make_fx): the launch is the op it records
    assert isinstance(wrap(_finalize_kernel), TraceableTritonKernelWrapper)
print("ok")
"""


def test_eager_launches_are_direct():
    """An eager step launches the compiled kernels directly, not through ``wrap_triton``'s higher-order op
    (about 55 µs of host time per launch, and an entry in torch's kernel side table that is never freed:
    a training loop's memory would grow), also under a user's dispatch mode (which has no rule for the
    op); a trace's mode (fake tensors) gets the op. Run in a subprocess without the interpreter, every
    launch a no-op (no GPU here)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", _COMPILED_LAUNCHES], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_a_traces_placeholders_are_not_kept(monkeypatch):
    """A kernel's placeholder argument made while a graph is traced is the trace's own: a fake or
    functional tensor kept for later calls would reach an eager launch after a compiled step (on a GPU, a
    launch on a tensor without storage), and a kept real one would enter the trace."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    monkeypatch.setattr(H, "_dummies", {})
    cpu = torch.device("cpu")
    with FakeTensorMode():
        assert isinstance(H._dummy(cpu, torch.float32), FakeTensor)
    assert not H._dummies
    real = H._dummy(cpu, torch.float32)
    assert type(real) is torch.Tensor and H._dummy(cpu, torch.float32) is real
    with FakeTensorMode():
        assert H._dummy(cpu, torch.float32) is not real


@pytest.mark.cuda
def test_launches_on_the_logits_device():
    """Logits on cuda:1 while cuda:0 is current: every launch runs on the logits' device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    x, y, tvals = make((2, 19, 7, 13), "nchw", dtype=torch.float32)
    x1, y1 = x.to("cuda:1"), y.to("cuda:1")
    with torch.cuda.device(0):
        out = run_fwd(x1, y1, Mode.SOFTMAX_FOCAL, 2.0, None)
        grad = bwd(x1, y1, torch.ones(y1.numel(), device="cuda:1"), None, 0, 2.0, None)
    ref = run_fwd(x, y, Mode.SOFTMAX_FOCAL, 2.0, None)
    for a, b in zip(out, ref):
        assert a.device == x1.device
        torch.testing.assert_close(a.cpu(), b.cpu())
    assert grad.device == x1.device


# --- the Dice kernels' launches -------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_step_launches(monkeypatch, backend):
    """A step is the pass and the finalize (a reduce launch between them for a large table of program
    rows), then one backward launch: nothing else runs a kernel."""
    from fused_imbalance.ops import triton_dice as TD

    launched = []
    wrap = TD.wrap
    monkeypatch.setattr(TD, "wrap", lambda kernel: launched.append(kernel) or wrap(kernel))
    x, y = _data((2, 4, 3, 4), dtype=torch.float32)
    xr = x.double().requires_grad_(True)
    R.dice_ce_loss(xr, y, weight=torch.linspace(0.5, 2.0, 4, dtype=torch.float64)).backward()
    for elems, forward in (
        (TD._FINALIZE_ELEMS, [TD._dice_fwd_kernel, TD._dice_finalize_kernel]),
        (0, [TD._dice_fwd_kernel, TD._dice_reduce_kernel, TD._dice_finalize_kernel]),
    ):
        monkeypatch.setattr(TD, "_FINALIZE_ELEMS", elems)
        xg = x.clone().requires_grad_(True)
        launched.clear()
        loss = FI.dice_ce_loss(xg, y, weight=torch.linspace(0.5, 2.0, 4), backend="triton")
        assert launched == forward
        launched.clear()
        loss.backward()
        assert launched == [TD._dice_bwd_kernel]
        torch.testing.assert_close(xg.grad, xr.grad.float(), **TOL[torch.float32])


# --- the exact selection's kernels ----------------------------------------------------------------


_select_kernels = pytest.mark.skipif(
    not triton_backend.available(), reason="the Triton kernels need a CUDA device or TRITON_INTERPRET=1"
)


@_select_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_launches(monkeypatch, dtype):
    """One histogram pass per digit, one fewer with first_hist, and one final launch, whatever the data."""
    launched = []
    wrap = TS.wrap

    def counting(kernel):
        launched.append(kernel)
        return wrap(kernel)

    monkeypatch.setattr(TS, "wrap", counting)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    v = torch.rand(300, dtype=dtype, device=dev)
    passes = len(TS.digit_plan(dtype))
    assert passes == (4 if dtype == torch.float32 else 8)
    for fh, hist_passes in ((None, passes), (histogram_of(v.cpu()).to(dev), passes - 1)):
        launched.clear()
        SEL.select_kth(v, 7, fh, backend="triton")
        assert launched.count(TS._select_hist_kernel) == hist_passes
        assert launched.count(TS._select_final_kernel) == 1 and len(launched) == hist_passes + 1


@_select_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_first_digit_is_the_histograms_digit(dtype):
    """The jit helper a loss kernel calls to count first_hist gives the digit and validity defined
    here (so the histogram it counts is the one the selection expects)."""
    import triton
    import triton.language as tl

    @triton.jit
    def digits_kernel(v_ptr, d_ptr, ok_ptr, N, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        m = offs < N
        d, ok = TS.select_first_digit(tl.load(v_ptr + offs, mask=m, other=-1.0))
        tl.store(d_ptr + offs, d, mask=m)
        tl.store(ok_ptr + offs, ok.to(tl.int32), mask=m)

    fi = torch.finfo(dtype)
    v = torch.tensor(
        [
            0.0,
            -0.0,
            1.0,
            0.7,
            fi.smallest_normal * fi.eps,
            float("inf"),
            float("nan"),
            -1.0,
            -float("inf"),
            fi.max,
            3.5e-5,
            0.5,
        ],
        dtype=dtype,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    d = torch.empty(v.numel(), dtype=torch.int32, device=v.device)
    ok = torch.empty(v.numel(), dtype=torch.int32, device=v.device)
    digits_kernel[(1,)](v, d, ok, v.numel(), BLOCK=16)
    want_d, want_ok = first_digit(v.cpu())
    assert torch.equal(ok.cpu().bool(), want_ok)
    assert torch.equal(d.cpu()[want_ok].long(), want_d[want_ok])
    assert (d.cpu() >= 0).all() and (d.cpu() < SEL.FIRST_BINS).all()


@_select_kernels
def test_triton_several_programs_and_tails(monkeypatch):
    """Tiles of 128 entries: 4003 entries are 32 tiles (the last one partial) over several programs
    (3 interpreted, on a GPU one per tile up to 2 per SM), each walking several tiles."""
    monkeypatch.setattr(TS, "_INTERPRET_BLOCK", 128)
    monkeypatch.setattr(TS, "_BLOCK", 128)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tiles = H._cdiv(4003, 128)
    assert tiles > TS._programs(tiles, torch.device(dev)) > 1 and 4003 % 128
    g = torch.Generator().manual_seed(4)
    for dtype in DTYPES:
        v = torch.randn(4003, generator=g, dtype=torch.float64).to(dtype)  # about half invalid
        n_valid = int((v >= 0).sum())
        for k in (0, n_valid // 2, n_valid - 1):
            check(SEL.select_kth(v.to(dev), k, backend="triton"), v, k)


@_select_kernels
def test_opcheck_triton():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    v = torch.rand(300, device=dev)
    v[::4] = -1
    # under TRITON_INTERPRET the kernels cannot be traced (torch does not trace interpreted kernels)
    utils = ["test_schema", "test_autograd_registration", "test_faketensor"]
    utils += ["test_aot_dispatch_dynamic"] if torch.cuda.is_available() else []
    for args in [
        (v, torch.tensor(17, device=dev), None),
        (v, torch.tensor(5, device=dev), histogram_of(v).to(dev)),
    ]:
        torch.library.opcheck(TS.select_kth, args, test_utils=utils)
