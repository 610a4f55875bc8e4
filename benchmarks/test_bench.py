"""The benchmark cases under pytest-benchmark, for tracking regressions run to run.

    pytest benchmarks --benchmark-only                     # run and print the table
    pytest benchmarks --benchmark-only --benchmark-autosave  # keep the run in .benchmarks/
    pytest benchmarks --benchmark-only --benchmark-compare   # compare with the last saved run

Small shapes, the same calls as ``python -m benchmarks.bench``. Each provider's loss and
gradient are first checked against the eager reference; no test asserts a time. The main
test suite (``pytest tests``) does not collect this file.
"""

import functools

import pytest
import torch

from .bench import _compare, _step, load_tolerances
from .cases import (
    CONTIGUOUS,
    DTYPES,
    LOSSES,
    OWN_PROVIDERS,
    PASSES,
    Case,
    Shape,
    Unavailable,
    has_backward,
    make_inputs,
    make_provider,
)

pytest.importorskip("pytest_benchmark")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = Shape("seg", (1, 19, 64, 64))
CASES = [Case(loss, SHAPE, "float32", CONTIGUOUS) for loss in LOSSES]
TOL, LOSS_TOL = load_tolerances()


@functools.lru_cache(maxsize=None)
def provider_fn(provider, case):
    """One provider per case for the whole session, so torch.compile compiles once."""
    return make_provider(provider, case, DEVICE)


@functools.lru_cache(maxsize=None)
def reference_result(case):
    x, t = make_inputs(case, DEVICE)
    return _step(
        provider_fn("eager", case), x.requires_grad_(has_backward(case.loss)), t, has_backward(case.loss)
    )


def _sync(fn):
    if DEVICE != "cuda":
        return fn

    def synced(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return synced


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("provider", OWN_PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.loss)
def test_loss(benchmark, case, provider, pass_):
    backward = has_backward(case.loss)
    if pass_ not in case.passes:
        pytest.skip(f"{case.loss} has no backward")
    try:
        fn = provider_fn(provider, case)
    except Unavailable as e:
        pytest.skip(str(e))
    x, t = make_inputs(case, DEVICE)
    x.requires_grad_(backward)

    out, grad = _step(fn, x, t, backward)  # the first call also compiles (torch.compile)
    want_out, want_grad = reference_result(case)
    dtype = DTYPES[case.dtype]
    why = _compare(out, want_out, LOSS_TOL[dtype], "loss")
    if why is None and backward:
        why = _compare(grad, want_grad, TOL[dtype], "grad")
    assert why is None, why

    benchmark.group = f"{case.loss} {SHAPE.name} {case.dtype} {pass_}"
    benchmark.extra_info.update(provider=provider, shape=SHAPE.name, dtype=case.dtype, device=DEVICE)
    if pass_ == "fwd":
        benchmark(_sync(lambda: fn(x, t)))
    elif pass_ == "fwd+bwd":

        def fwd_bwd():
            x.grad = None
            fn(x, t).backward()

        benchmark(_sync(fwd_bwd))
    else:

        def forward_untimed():
            x.grad = None
            return (fn(x, t),), {}

        benchmark.pedantic(
            _sync(lambda out: out.backward()), setup=forward_untimed, rounds=20, warmup_rounds=2
        )
