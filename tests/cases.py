"""Inputs and loss calls shared by the test files, and the backends every test file runs on."""

import os

import pytest
import torch

import fused_imbalance.functional as FI

# The fused backends: every test that runs on each of them takes them from here (the ``backend``
# fixture of conftest.py, or these names with ``require_backend``).
FUSED_BACKENDS = ("cpp", "triton")
# Backends whose absence fails a test instead of skipping it (CI names both).
REQUIRED = set(filter(None, os.environ.get("FUSED_IMBALANCE_REQUIRE_BACKENDS", "").split(",")))


def backend_device(name):
    """The device a backend's test tensors live on: CPU for cpp, CUDA for triton when there is a GPU."""
    return "cuda" if (name == "triton" and torch.cuda.is_available()) else "cpu"


def require_backend(name):
    """``name`` when that backend can run here (the reference always can). Otherwise the calling test
    is skipped, or fails where FUSED_IMBALANCE_REQUIRE_BACKENDS names the backend."""
    if name == "reference":
        return name
    from fused_imbalance.functional import resolve_backend

    try:
        resolve_backend(name, torch.zeros(1, 2, device=backend_device(name)))
    except RuntimeError as e:
        if name in REQUIRED:
            pytest.fail(f"backend {name!r} is required but unavailable: {e}")
        pytest.skip(f"backend {name!r} unavailable: {e}")
    return name


def loss_and_grad(fn, x, y, backend, reduction="mean", **kw):
    """(loss, gradient of loss.sum()) of ``fn`` on a fresh leaf copy of ``x``."""
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    loss = fn(x, y, reduction=reduction, backend=backend, **kw)
    loss.sum().backward()
    return loss.detach(), x.grad


def make_data(shape=(2, 5, 3, 4), dtype=torch.float64, seed=0, ignore=-100, label_dtype=torch.int64, every=7):
    """Random logits of ``shape`` and labels with every ``every``-th pixel set to ``ignore``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).mul_(2).to(dtype)
    C = shape[1]
    y = torch.randint(0, C, (shape[0],) + tuple(shape[2:]), generator=g)
    if every:
        y.view(-1)[::every] = ignore
    return x, y.to(label_dtype)


ALL_LOSSES = {
    "cross_entropy": lambda x, y, **k: FI.cross_entropy(
        x, y, torch.linspace(0.5, 2, x.shape[1], dtype=torch.float64).to(x), **k
    ),
    "focal_loss": lambda x, y, **k: FI.focal_loss(x, y, gamma=2.0, **k),
    "sigmoid_focal_loss": lambda x, y, **k: FI.sigmoid_focal_loss(x, y, gamma=1.5, **k),
    "class_balanced_loss": lambda x, y, **k: FI.class_balanced_loss(
        x, y, list(range(1, x.shape[1] + 1)), beta=0.9, loss_type="focal", **k
    ),
    "recall_loss": lambda x, y, **k: FI.recall_loss(x, y, **k),
    "cdb_loss": lambda x, y, **k: FI.cdb_loss(
        x, y, torch.linspace(0.2, 0.9, x.shape[1], device=x.device), gamma=0.5, **k
    ),
    "mse_outlying_loss": lambda x, y, **k: FI.mse_outlying_loss(
        x, y, torch.arange(1, x.shape[1] + 1, dtype=torch.float64).to(x), input="softmax", **k
    ),
    "mse_outlying_logits": lambda x, y, **k: FI.mse_outlying_loss(
        x, y, torch.arange(1, x.shape[1] + 1, dtype=torch.float64).to(x), **k
    ),
    "cb_sigmoid": lambda x, y, **k: FI.class_balanced_loss(
        x, y, [3] * x.shape[1], beta=0.5, loss_type="sigmoid", **k
    ),
}


def to_layout(x, layout):
    """``x`` (B, C, ...) in one of the layouts the kernels read without a copy."""
    if layout == "nchw":
        return x.contiguous()
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    if layout == "rows":
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    raise ValueError(layout)
