"""The exact k-th selection (``fused_imbalance.ops.select``): every backend returns exactly the value at
position k of ``torch.sort`` of the valid entries -- random values, ties, equal values, 0 and 1,
subnormals, inf and NaN, invalid entries, every rank and beyond, float32 and float64, several
programs and tails -- with the first histogram given or not. Its launches, tiling and opcheck are in
test_internals_triton.py and test_internals_cpp.py, ``torch.compile`` in test_compile.py and
test_compile_cuda.py, no host sync in test_robustness.py. Without a GPU the Triton kernels run on CPU
tensors through TRITON_INTERPRET=1 (set by conftest); the interpreted calls are kept to a few thousand
entries."""

import pytest
import torch

from cases import backend_device, require_backend
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


_available = require_backend  # the backend fixtures (``sel_backend``: conftest.py) and cases.py


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


# --- the default backend ------------------------------------------------------------------------


def test_default_backend_by_device():
    v = torch.rand(100)
    want = oracle(v, 10)
    assert SEL.select_kth(v, 10) == want  # CPU: the C++ op (or the reference without the extension)


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
