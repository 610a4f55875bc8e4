"""The exact k-th selection (``fused_imbalance.ops.select``): every backend returns exactly the value at
position k of ``torch.sort`` of the valid entries -- random values, ties, equal values, 0 and 1,
subnormals, inf and NaN, invalid entries, every rank and beyond, float32 and float64, several
programs and tails -- with the first histogram given or not, under ``torch.compile``, and without
a host sync. Without a GPU the Triton kernels run on CPU tensors through TRITON_INTERPRET=1 (set
by conftest); the interpreted calls are kept to a few thousand entries."""

import pytest
import torch

from cases import backend_device
from fused_imbalance.ops import select as SEL
from fused_imbalance.ops import triton_select as TS

DTYPES = (torch.float32, torch.float64)
# The interpreter evaluates both sides of every tl.where with numpy, which may warn about the discarded one.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def oracle(v, k):
    """The definition: sort the valid entries (those not < 0) and index at k clamped to
    [0, n_valid - 1]; 0 when there is none. abs() makes -0.0 the +0.0 the selection returns."""
    valid = v[~(v < 0)].abs()
    if valid.numel() == 0:
        return torch.zeros((), dtype=v.dtype)
    return valid.sort().values[min(max(int(k), 0), valid.numel() - 1)]


def check(got, v, k):
    want = oracle(v.cpu(), k)
    got = got.cpu()
    assert got.shape == () and got.dtype == v.dtype
    if want.isnan():
        assert got.isnan(), (k, got, want)
    else:  # the same bits: the same value, and +0.0 for a zero
        ity = torch.int64 if v.dtype == torch.float64 else torch.int32
        assert got.view(ity) == want.view(ity), (k, got.item(), want.item())


def first_digit(v):
    """The first digit of each entry's key and its validity, computed here from the definition
    (key = bits with the sign cleared; the first digit is its top RADIX_BITS bits)."""
    bits = 63 if v.dtype == torch.float64 else 31
    ity = torch.int64 if v.dtype == torch.float64 else torch.int32
    key = v.view(ity).long() & ((1 << bits) - 1)
    return key >> (bits - TS.RADIX_BITS), ~(v < 0)


def histogram_of(v):
    digit, valid = first_digit(v)
    return torch.bincount(digit[valid], minlength=SEL.FIRST_BINS).to(torch.int64)


def ranks(n_valid):
    return sorted({0, 1, n_valid // 2, n_valid - 1, n_valid, 10**12, -5})


@pytest.fixture(params=["triton", "cpp", "reference"])
def sel_backend(request):
    """A backend that can run here: skipped when it cannot, unless FUSED_IMBALANCE_REQUIRE_BACKENDS
    names it (as the losses' ``backend`` fixture)."""
    return "reference" if request.param == "reference" else _available(request.param)


def _available(name):
    from conftest import REQUIRED

    v = torch.zeros(1, device=backend_device(name))
    try:
        SEL.select_kth(v, 0, backend=name)
    except RuntimeError as e:
        if name in REQUIRED:
            pytest.fail(f"backend {name!r} is required but unavailable: {e}")
        pytest.skip(f"backend {name!r} unavailable: {e}")
    return name


def on(backend, t):
    return t.to(backend_device(backend))


# --- values -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_values_with_invalid_entries(sel_backend, dtype):
    g = torch.Generator().manual_seed(0)
    v = torch.rand(2001, generator=g, dtype=torch.float64).to(dtype)
    v[::7] = -1.0
    v[3::11] = -float("inf")
    v[5::13] = -1e-30
    n_valid = int((v >= 0).sum())
    for i, k in enumerate(ranks(n_valid)):
        kk = torch.tensor(k) if i % 2 else k  # a device tensor or an int
        check(
            SEL.select_kth(on(sel_backend, v), on(sel_backend, kk) if i % 2 else kk, backend=sel_backend),
            v,
            k,
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_ties(sel_backend, dtype):
    """Six distinct values repeated: the ranks at the edges of each run of equal values."""
    g = torch.Generator().manual_seed(1)
    pool = torch.tensor([0.0, 0.25, 0.5, 0.7, 1.0, 3.0], dtype=dtype)
    v = pool[torch.randint(0, 6, (1200,), generator=g)]
    v[::5] = -1.0
    counts = torch.bincount(torch.searchsorted(pool, v[v >= 0]), minlength=6)
    edges = counts.cumsum(0)
    ks = sorted({int(e) + d for e in edges[:-1] for d in (-1, 0)})
    for k in ks:
        check(SEL.select_kth(on(sel_backend, v), k, backend=sel_backend), v, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_equal(sel_backend, dtype):
    v = torch.full((700,), 0.7, dtype=dtype)
    v[::3] = -2.0
    for k in (0, 200, 466, 10**6):
        got = SEL.select_kth(on(sel_backend, v), k, backend=sel_backend)
        check(got, v, k)
        assert got.item() == torch.tensor(0.7, dtype=dtype).item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_one_subnormals_inf_nan(sel_backend, dtype):
    """Every rank of 0 and -0 (equal), the smallest and largest subnormals, the smallest normal,
    1 and the float just below it, the largest finite value, +inf and NaN (sorted last)."""
    fi = torch.finfo(dtype)
    sub_min = fi.smallest_normal * fi.eps  # 2**-149 for float32
    specials = [
        1.0,
        0.0,
        float("nan"),
        -0.0,
        sub_min,
        fi.smallest_normal - sub_min,
        fi.smallest_normal,
        float("inf"),
        fi.max,
        1.0 - fi.eps / 2,
        0.5,
        sub_min,
    ]
    v = torch.tensor(specials + [-1.0, -float("inf")], dtype=dtype)
    assert (v[4] > 0) and (v[5] < fi.smallest_normal) and (v[9] < 1.0)  # really subnormal, really below 1
    for k in range(len(specials)):
        check(SEL.select_kth(on(sel_backend, v), k, backend=sel_backend), v, k)


@pytest.mark.parametrize("n", [0, 1, 500])
def test_no_valid_entry_gives_zero(sel_backend, n):
    for dtype in DTYPES:
        v = torch.full((n,), -1.0, dtype=dtype)
        got = SEL.select_kth(on(sel_backend, v), 3, backend=sel_backend)
        assert got.shape == () and got.dtype == dtype and got.item() == 0.0


def test_one_valid_entry(sel_backend):
    v = torch.full((600,), -1.0)
    v[437] = 0.3
    for k in (0, 5, -1):
        check(SEL.select_kth(on(sel_backend, v), k, backend=sel_backend), v, k)


def test_shape_is_read_flattened(sel_backend):
    g = torch.Generator().manual_seed(2)
    v = torch.rand(4, 5, 30, generator=g)
    check(SEL.select_kth(on(sel_backend, v), 123, backend=sel_backend), v.reshape(-1), 123)
    vt = v.transpose(0, 2)  # not contiguous: read as flattened in its own order, same set
    check(SEL.select_kth(on(sel_backend, vt), 123, backend=sel_backend), v.reshape(-1), 123)


# --- the first histogram given ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_first_hist_given(sel_backend, dtype):
    if sel_backend == "reference":
        pytest.skip("the reference sorts: it takes no histogram")
    g = torch.Generator().manual_seed(3)
    v = (torch.rand(2500, generator=g, dtype=torch.float64) ** 4).to(dtype)
    v[::9] = -1.0
    fh = histogram_of(v)
    assert int(fh.sum()) == int((v >= 0).sum())
    for k in (0, 700, 2221, 5000):
        check(SEL.select_kth(on(sel_backend, v), k, on(sel_backend, fh), backend=sel_backend), v, k)


def test_first_hist_is_used(sel_backend):
    """A histogram counted before the smallest entry was invalidated: the selection trusts it (it
    never reads the first digit itself), so it answers for the stale counts -- the entry that is
    now the k-th's predecessor -- where a fresh count would give the next one."""
    if sel_backend == "reference":
        pytest.skip("the reference sorts: it takes no histogram")
    v = torch.tensor([1e-6] + [0.3 + 0.001 * i for i in range(400)])  # 1e-6 in a binade of its own
    stale = histogram_of(v)
    v[0] = -1.0
    got = SEL.select_kth(on(sel_backend, v), 10, on(sel_backend, stale), backend=sel_backend).cpu()
    assert got == v[10] and got != oracle(v, 10) == v[11]


@pytest.mark.skipif(not TS.available(), reason="the Triton kernels need a CUDA device or TRITON_INTERPRET=1")
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


def test_wrong_first_hist_does_not_crash(sel_backend):
    """A histogram not of the values gives an unspecified value, but no error and no bad access."""
    if sel_backend == "reference":
        pytest.skip("the reference sorts: it takes no histogram")
    v = torch.rand(900)
    for fh in (
        torch.zeros(SEL.FIRST_BINS, dtype=torch.int64),
        torch.full((SEL.FIRST_BINS,), 10**6, dtype=torch.int64),
        torch.arange(SEL.FIRST_BINS, dtype=torch.int64),
    ):
        out = SEL.select_kth(on(sel_backend, v), 450, on(sel_backend, fh), backend=sel_backend)
        assert out.shape == ()


@pytest.mark.skipif(not TS.available(), reason="the Triton kernels need a CUDA device or TRITON_INTERPRET=1")
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


# --- sizes: several programs, tiles, chunks -----------------------------------------------------


@pytest.mark.skipif(not TS.available(), reason="the Triton kernels need a CUDA device or TRITON_INTERPRET=1")
def test_triton_several_programs_and_tails(monkeypatch):
    """Tiles of 128 entries: 4003 entries are 32 tiles (the last one partial) over several programs
    (3 interpreted, on a GPU one per tile up to 2 per SM), each walking several tiles."""
    monkeypatch.setattr(TS, "_INTERPRET_BLOCK", 128)
    monkeypatch.setattr(TS, "_BLOCK", 128)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tiles = TS._cdiv(4003, 128)
    assert tiles > TS._programs(tiles, torch.device(dev)) > 1 and 4003 % 128
    g = torch.Generator().manual_seed(4)
    for dtype in DTYPES:
        v = torch.randn(4003, generator=g, dtype=torch.float64).to(dtype)  # about half invalid
        n_valid = int((v >= 0).sum())
        for k in (0, n_valid // 2, n_valid - 1):
            check(SEL.select_kth(v.to(dev), k, backend="triton"), v, k)


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


# --- torch.library, torch.compile, host syncs ---------------------------------------------------


def test_default_backend_by_device():
    v = torch.rand(100)
    want = oracle(v, 10)
    assert SEL.select_kth(v, 10) == want  # CPU: the C++ op (or the reference without the extension)


def test_opcheck_cpp():
    _available("cpp")
    v = torch.rand(300, dtype=torch.float64)
    v[::4] = -1
    fh = histogram_of(v)
    for args in [
        (v, torch.tensor(17)),
        (v.float(), torch.tensor(0), histogram_of(v.float())),
        (v, torch.tensor(10**5), fh),
    ]:
        torch.library.opcheck(torch.ops.fused_imbalance.cpp_select_kth.default, args)


@pytest.mark.skipif(not TS.available(), reason="the Triton kernels need a CUDA device or TRITON_INTERPRET=1")
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


@pytest.mark.parametrize("backend", [None, "reference"])
def test_compile_fullgraph_cpu(backend):
    """The default CPU backend (the C++ op) and the reference, traced as one graph; k a tensor
    computed in the graph from the data (what the OHEM loss does: no value leaves the device)."""
    v = torch.rand(1000)
    v[::3] = -1.0

    def f(v, rank):
        k = torch.clamp((v >= 0).sum() - 1, max=rank)  # a device value
        return SEL.select_kth(v, k, backend=backend)

    got = torch.compile(f, fullgraph=True)(v, 400)
    check(got, v, min(int((v >= 0).sum()) - 1, 400))


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


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kw, exc, match",
    [
        ((torch.arange(5), 1), {}, TypeError, "values must be a float32 or float64"),
        ((torch.rand(5).half(), 1), {}, TypeError, "values must be a float32 or float64"),
        ((torch.rand(5), 1.0), {}, TypeError, "k must be an int"),
        ((torch.rand(5), True), {}, TypeError, "k must be an int"),
        ((torch.rand(5), torch.tensor(1.0)), {}, TypeError, "k must be an int"),
        ((torch.rand(5), torch.tensor([1, 2])), {}, TypeError, "k must be an int"),
        ((torch.rand(5), 1, torch.zeros(SEL.FIRST_BINS)), {}, TypeError, "first_hist must be an int64"),
        (
            (torch.rand(5), 1, torch.zeros(7, dtype=torch.int64)),
            {},
            ValueError,
            r"first_hist must have shape",
        ),
        ((torch.rand(5), 1), {"backend": "cuda"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        SEL.select_kth(*args, **kw)
