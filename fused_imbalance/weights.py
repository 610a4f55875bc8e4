"""Class-weighting schemes (docs/DESIGN.md §4–§5). Every function returns a float32 (C,) tensor.

A class with count 0 gets the largest weight of the others, never inf or NaN.

Per-class values (counts, accuracies) are a sequence or a tensor in class order, or a mapping
from class index to value whose keys are exactly 0 .. C − 1 (a ``collections.Counter`` of the
labels, say), read in class order. A mapping that lacks a class in between is a ``TypeError``:
whether that class has count 0 or does not exist cannot be told from it (pass
``[counts.get(c, 0) for c in range(num_classes)]``); nor can a mapping tell that its highest
classes are missing, so a Counter of a split where the last class never occurs gives C − 1
weights, which a loss then rejects for C-class logits. A set or a mapping's ``.values()`` has no
class order and is a ``TypeError`` too.

The checks on the values are ``ValueError``s; inside ``torch.compile`` they are device
assertions instead (no data-dependent branch), so the weights can be computed in a compiled step.
"""

import math
import numbers
from collections.abc import Mapping, MappingView, Set

import torch

__all__ = ["effective_number", "inverse_frequency", "median_frequency", "outlying_labels", "cdb"]


def _in_class_order(values, name):
    """``values`` with a mapping {class index: value} replaced by its values in class order (keys
    exactly 0 .. C − 1); anything else is returned as it is. A mapping with other keys, a set or a
    mapping view (no class order) is a TypeError naming ``name`` and saying what to pass."""
    if isinstance(values, Mapping):
        keys = list(values.keys())
        odd = [k for k in keys if isinstance(k, bool) or not isinstance(k, numbers.Integral)]
        if odd:
            hint = (
                " (a Counter of a tensor counts each element apart: use torch.bincount(labels, "
                "minlength=num_classes))"
                if isinstance(odd[0], torch.Tensor)
                else ""
            )
            raise TypeError(
                f"{name} as a mapping must have the class indices 0 .. C-1 as int keys, "
                f"got a key {odd[0]!r} of type {type(odd[0]).__name__}{hint}"
            )
        missing = sorted(set(range(len(keys))) - {int(k) for k in keys})
        if missing:
            raise TypeError(
                f"{name} as a mapping must have every class index 0 .. C-1 as a key, got keys "
                f"{sorted(int(k) for k in keys)[:8]}{'...' if len(keys) > 8 else ''} without class "
                f"{missing[0]}: a missing class may have count 0 or not exist; pass a sequence in class "
                f"order, e.g. [{name}.get(c, 0) for c in range(num_classes)]"
            )
        return [values[c] for c in range(len(keys))]
    if isinstance(values, (Set, MappingView)):
        raise TypeError(
            f"{name} must be in class order: a {type(values).__name__} has none; pass a "
            f"sequence in class order or the mapping itself (keys 0 .. C-1)"
        )
    return values


def _per_class(values, name):
    """Per-class values (a sequence, a tensor or a mapping, see the module's docstring) as a float64
    tensor; a single number is a TypeError naming ``name``."""
    if isinstance(values, torch.Tensor):
        return values.detach().to(torch.float64)
    values = _in_class_order(values, name)
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(
            f"{name} must be a sequence or tensor with one value per class, "
            f"got {type(values).__name__} {values!r}"
        )
    return torch.as_tensor(list(values), dtype=torch.float64)


def _require(ok, message, deferred=False):
    """Raise ``ValueError(message())`` unless the boolean tensor ``ok`` holds (a device assertion
    inside ``torch.compile``). ``deferred`` (a loss computing its weights in a training step): for a
    tensor on a GPU, the check of :mod:`._deferred`, so that the step does not wait for the device."""
    if torch.compiler.is_compiling():
        torch._assert_async(ok, "fused_imbalance.weights: invalid per-class values")
    elif deferred and ok.device.type != "cpu":
        from . import _deferred

        _deferred.flag(ok, message() if callable(message) else message)
    elif not bool(ok):
        raise ValueError(message())


def _counts(samples_per_class, deferred=False):
    """Validate per-class counts and return them as a float64 tensor."""
    counts = _per_class(samples_per_class, "samples_per_class")
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(
            f"samples_per_class must be a non-empty 1-D sequence of counts, got shape {tuple(counts.shape)}"
        )
    _require(torch.isfinite(counts).all(), lambda: "samples_per_class must be finite", deferred)
    _require(
        (counts >= 0).all(),
        (lambda: f"samples_per_class must be non-negative, got {counts[counts < 0][0].item():g}")
        if counts.device.type == "cpu" or not deferred
        else "samples_per_class must be non-negative",
        deferred,
    )
    _require((counts != 0).any(), lambda: "samples_per_class is all zeros: no class has a sample", deferred)
    return counts


def _fill_absent(w, present):
    """Give classes with no sample the largest weight of the present ones."""
    largest = torch.where(present, w, torch.full_like(w, -math.inf)).max()
    return torch.where(present, w, largest)


def _sum_to_c(w):
    return w * (w.numel() / w.sum())


def effective_number(samples_per_class, beta=0.9999, *, deferred=False):
    """Class-balanced weights w_c = (1 − β) / (1 − β^{n_c}), rescaled so Σ_c w_c = C.

    Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019.
    β = 0 gives equal weights, β → 1 inverse frequency. ``deferred``: the checks of counts held on a
    GPU do not wait for it (:func:`fused_imbalance.check_deferred`), as in a loss's training step.
    """
    counts = _counts(samples_per_class, deferred)
    beta = float(beta)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    present = counts > 0
    # 1 − β^n = −expm1(n·log β): exact for β near 1, where 1 − β^n loses digits.
    if beta == 0.0:
        w = torch.ones_like(counts)
    else:
        w = (1.0 - beta) / -torch.expm1(counts * math.log(beta))
    w = _fill_absent(torch.where(present, w, torch.zeros_like(w)), present)
    return _sum_to_c(w).to(torch.float32)


def inverse_frequency(samples_per_class):
    """w_c ∝ 1 / n_c, rescaled so Σ_c w_c = C."""
    counts = _counts(samples_per_class)
    present = counts > 0
    w = _fill_absent(torch.where(present, 1.0 / counts.clamp_min(1e-300), torch.zeros_like(counts)), present)
    return _sum_to_c(w).to(torch.float32)


def median_frequency(samples_per_class):
    """Median-frequency balancing (SegNet): w_c = median(f) / f_c, f_c = n_c / Σ n.

    The median is over the classes that occur (for an even number, the lower middle value,
    as ``torch.median``).
    """
    counts = _counts(samples_per_class)
    present = counts > 0
    f = counts / counts.sum()
    med = f[present].median()
    w = _fill_absent(torch.where(present, med / f.clamp_min(1e-300), torch.zeros_like(f)), present)
    return w.to(torch.float32)


def outlying_labels(samples_per_class, alpha=1.0):
    """Outlying label values (MSE with outlying labels, eq. 4).

    Classes sorted by count, descending, stable on ties; the class at position r
    (0 = most frequent) gets α·(r + 1): the largest class α, the smallest C·α.
    """
    counts = _counts(samples_per_class)
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    order = torch.sort(counts, descending=True, stable=True).indices
    w = torch.empty_like(counts)
    w[order] = alpha * torch.arange(1, counts.numel() + 1, dtype=torch.float64)
    return w.to(torch.float32)


def cdb(class_accuracy, tau="dynamic", *, deferred=False):
    """Class-wise difficulty-balanced weights w_c = (1 − A_c)^τ (Sinha et al., ACCV 2020).

    With ``tau="dynamic"``: b = max A / (min A + 1e-4) − 1 and τ = 2 / (1 + exp(−b)).
    ``deferred``: as in :func:`effective_number`.
    """
    acc = _per_class(class_accuracy, "class_accuracy")
    if acc.dim() != 1 or acc.numel() == 0:
        raise ValueError(f"class_accuracy must be a non-empty 1-D sequence, got shape {tuple(acc.shape)}")
    _require(
        (torch.isfinite(acc) & (acc >= 0) & (acc <= 1)).all(),
        lambda: "class_accuracy must hold accuracies in [0, 1]",
        deferred,
    )
    if isinstance(tau, str):
        if tau != "dynamic":
            raise ValueError(f"tau must be 'dynamic' or a number, got {tau!r}")
        b = acc.max() / (acc.min() + 1e-4) - 1.0
        t = 2.0 / (1.0 + torch.exp(-b))
    else:
        tau = float(tau)
        if not 0 <= tau < math.inf:
            raise ValueError(f"tau must be a non-negative number, got {tau}")
        t = torch.as_tensor(tau, dtype=torch.float64)
    return torch.pow(1.0 - acc, t).to(torch.float32)
