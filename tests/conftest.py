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


def pytest_collection_modifyitems(config, items):
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
