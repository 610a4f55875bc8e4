import os
import sys

# The Triton kernels run on CPU tensors through the interpreter when there is no GPU; the
# flag must be set before triton (and so the package) is imported.
try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _old_interpreter_with_new_numpy():
    """triton < 3.8's interpreter calls int() on one-element arrays, which numpy >= 2.4 rejects."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None

    def version(mod):
        return tuple(int(p) for p in mod.__version__.split("+")[0].split(".")[:2])

    if version(triton) < (3, 8) and version(numpy) >= (2, 4):
        return (
            f"triton {triton.__version__}'s interpreter needs numpy < 2.4 (numpy {numpy.__version__} is "
            "installed): pip install 'numpy<2.4'"
        )
    return None


sys.path.insert(0, os.path.dirname(__file__))  # `from tolerances import TOL`

import pytest  # noqa: E402


def pytest_configure(config):
    problem = _old_interpreter_with_new_numpy()
    if problem:
        raise pytest.UsageError(problem)
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    config.addinivalue_line("markers", "slow: long-running, still part of the suite")
    config.addinivalue_line("markers", VERSIONS_MARKER)


# --- what runs again on the oldest supported versions ---------------------------------------------
# CI runs the whole suite on the newest versions, then the tests marked `versions` on the oldest ones
# pyproject.toml declares (torch 2.11, triton 3.6: the GPU machines'), `-m "versions and not slow"`.
# Marked: what depends on torch's, Triton's or the build's version -- the C++ extension built against
# that torch, torch.library ops and their checks (opcheck), torch.compile and torch.func, torch.distributed,
# the deterministic-algorithms switch; on that Triton's interpreter the plain losses' kernel paths
# (test_internals_triton) and the upsampled, Dice, OHEM and selection ops against the reference; every
# kernel compiled for sm_90 with it (test_sm90_compile); the GPU session script on the GPU machines'
# torch. Not marked: the parity grids and the references, whose arithmetic is the kernels' (run above)
# or torch's eager ops, and the upsampled kernels' GPU tiling under the interpreter (compiled above).
VERSIONS_MARKER = "versions: also run on the oldest supported versions (CI's second stage)"
VERSIONS = {  # test file -> the test functions marked (None: all of the file's)
    "test_compile.py": None,  # torch.compile, torch.func, the ops under Inductor
    "test_compile_cuda.py": None,
    "test_internals_cpp.py": None,  # the C++ extension against this torch: build, ops' contract
    "test_internals_triton.py": None,  # every path of the plain losses' Triton kernels
    "test_host_path.py": None,
    "test_gpu_session.py": None,  # the GPU machines' torch
    "test_sm90_compile.py": None,  # the GPU machines' Triton, compiling for sm_90
    "test_robustness.py": None,
    "test_determinism.py": None,
    "test_distributed.py": None,
    "test_dice_distributed.py": None,
    "test_select.py": None,  # the exact k-th selection's Triton kernels
    "test_kernel_constants.py": None,
    "test_upsample.py": {"test_op_contract", "test_opcheck", "test_lse_from_the_forward"},
    "test_dice.py": {
        "test_matches_reference_2d",
        "test_registered_ops_equal_the_eager_functions",
        "test_opcheck",
        "test_upsample_equals_interpolate_then_reference",
    },
    "test_ohem.py": {
        "test_matches_the_reference",
        "test_eager_functions_and_registered_ops_are_bit_identical",
        "test_opcheck",
        "test_upsample",
    },
}


def _mark_versions(items):
    """Mark the items of VERSIONS; a named function that no longer exists in a collected file is an error,
    so that a rename cannot drop it from the second stage unnoticed."""
    for item in items:
        file = os.path.basename(str(item.fspath))
        if file not in VERSIONS:
            continue
        names = VERSIONS[file]
        missing = sorted(n for n in names or () if not hasattr(item.module, n))
        if missing:
            raise pytest.UsageError(f"conftest.VERSIONS names tests that {file} lacks: {missing}")
        if names is None or item.originalname in names:
            item.add_marker(pytest.mark.versions)


def pytest_collection_modifyitems(config, items):
    _mark_versions(items)
    if _cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# --- the backends: every test file takes them from here and cases.py -----------------------------

from cases import FUSED_BACKENDS, REQUIRED, require_backend  # noqa: E402,F401 (REQUIRED: for the tests)


@pytest.fixture(params=FUSED_BACKENDS)
def backend(request):
    """A fused backend that can run here; skipped when it cannot, unless FUSED_IMBALANCE_REQUIRE_BACKENDS
    names it (CI names both), where that is a failure."""
    return require_backend(request.param)


@pytest.fixture(params=["triton", "cpp", "reference"])
def sel_backend(request):
    """A fused backend that can run here, or the reference (the exact selection's tests, which check
    all three against one oracle); skipped or failed as ``backend``."""
    return require_backend(request.param)


@pytest.fixture(autouse=True)
def _fresh_launch_plans():
    """The Triton launchers cache each launch's plan, derived from the module's tiling limits, which
    some tests shrink (monkeypatch): every test starts and ends with no plan made under other limits."""
    from fused_imbalance.ops import triton_backend

    if not triton_backend.available():
        yield
        return
    from fused_imbalance.ops import _triton_host

    _triton_host.forget_plans()
    yield
    _triton_host.forget_plans()


@pytest.fixture(autouse=True)
def _no_deferred_checks_left():
    """A test that makes the Triton backend defer a failing label check consumes it
    (``check_deferred``); one left behind would make the next test's first fused call raise, so the
    remaining checks are made here and a failing one fails the test that left it."""
    from fused_imbalance import _deferred

    yield
    try:
        _deferred.check_deferred()
    except ValueError as e:
        _deferred._queue.clear()
        pytest.fail(f"a failing deferred check was left unconsumed: {e}")
