"""Confusion-matrix metric for dense predictions (docs/DESIGN.md §6).

:class:`ConfusionMatrix` accumulates (C, C) int64 counts — row = true class, column =
predicted class — over any number of batches, and derives recall, precision, IoU, mIoU and
pixel accuracy from them. Counts are exact integers, so the result does not depend on how
the data was split into batches or ranks.

Every ratio returns 0 where its denominator is 0 (a class with no sample, nothing
predicted, an empty matrix): never NaN. Ratios are float64 on the matrix's device: float32
cannot represent counts above 2^24 exactly.

Distributed use: each rank calls :meth:`~ConfusionMatrix.update` on its own data, then
:meth:`~ConfusionMatrix.sync` once at the end of the window (all ranks, the same number of
times, as any collective), after which every rank holds the counts of the whole dataset.
Keep the metric outside a ``DistributedDataParallel`` module: DDP broadcasts the buffers of
the module it wraps from rank 0, which would overwrite the other ranks' counts.
"""

import torch
import torch.distributed as dist

from . import _deferred, functional
from ._checks import check_num_classes, dist_ready
from ._options import METRIC_OPTIONS, NUM_CLASSES, CheckedOptions

__all__ = ["ConfusionMatrix"]


def _bad_pair(bad, values):
    """(count, largest) of the flagged values: what a deferred label check names."""
    low = torch.full_like(values, torch.iinfo(torch.int64).min)
    return torch.stack([bad.sum(), torch.where(bad, values, low).max()])


def _ratio(num, den):
    """num / den elementwise in float64, 0 where den == 0."""
    num, den = num.to(torch.float64), den.to(torch.float64)
    return torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))


class ConfusionMatrix(CheckedOptions):
    """Accumulated (C, C) int64 confusion counts, row = true class, column = prediction.

    Args:
        num_classes: C.
        ignore_index: pixels with this label are not counted.
        backend: backend of :func:`fused_imbalance.functional.confusion_matrix`, used when
            :meth:`update` receives logits.

    The counts live in the buffer ``matrix``, so ``.to(device)`` moves them and
    ``state_dict()`` saves them (``.to(dtype)`` leaves them int64). ``ignore_index`` and
    ``backend`` can be set later (checked as here; the next :meth:`update` uses them);
    ``num_classes`` and ``matrix`` cannot be assigned.
    """

    OPTIONS = METRIC_OPTIONS
    FIXED = {**NUM_CLASSES, "matrix": "it holds the counts: use reset(), update() or load_state_dict()"}

    def __init__(self, num_classes, ignore_index=-100, backend=None):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.ignore_index = ignore_index
        self.backend = backend
        self.register_buffer("matrix", torch.zeros(num_classes, num_classes, dtype=torch.int64))
        # sync() adds the other ranks' counts into `matrix`: a second sync(), or an update()
        # after it, would count data twice or mix global and local counts.
        self._synced = False

    def extra_repr(self):
        return f"num_classes={self.num_classes}, ignore_index={self.ignore_index}"

    @torch.no_grad()
    def update(self, logits_or_preds, target, *, upsample=None, align_corners=False):
        """Add one batch.

        ``logits_or_preds`` is either float logits, (N, C) or (B, C, d1, ..., dk), whose
        argmax is the prediction (first index on ties), or integer predictions shaped like
        ``target``. A label (other than ``ignore_index``) or a prediction outside [0, C) is
        a ``ValueError``: at once for CPU tensors; for GPU tensors without waiting for the device,
        deferred to a later call as the losses' label check (``fused_imbalance.check_deferred``).

        ``upsample="bilinear" | "nearest"`` (and ``align_corners``): the logits are (B, C, h, w) at a
        lower resolution than the (B, H, W) labels, and the prediction is the argmax of
        ``F.interpolate(logits, size=(H, W), ...)``, computed without that tensor (docs/DESIGN.md §10).
        """
        if self._synced:
            raise RuntimeError(
                "ConfusionMatrix.update() after sync(): call reset() first "
                "(the matrix already holds the counts of every rank)"
            )
        x = logits_or_preds
        if not isinstance(x, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError("logits_or_preds and target must be torch.Tensor")
        if x.is_floating_point():
            if x.dim() < 2 or x.shape[1] != self.num_classes:
                raise ValueError(
                    f"logits must be (N, {self.num_classes}) or (B, {self.num_classes}, ...), "
                    f"got shape {tuple(x.shape)}"
                )
            functional.confusion_matrix(
                x,
                target,
                ignore_index=self.ignore_index,
                out=self.matrix,
                backend=self.backend,
                upsample=upsample,
                align_corners=align_corners,
            )
        elif x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
            if upsample is not None:
                raise ValueError("upsample applies to float logits, not to integer predictions")
            self._add_predictions(x, target)
        else:
            raise TypeError(f"logits_or_preds must be float logits or integer predictions, got {x.dtype}")

    def _add_predictions(self, preds, target):
        C = self.num_classes
        if preds.shape != target.shape:
            raise ValueError(
                f"integer predictions must be shaped like target: got {tuple(preds.shape)} "
                f"and {tuple(target.shape)}"
            )
        if target.is_floating_point() or target.dtype == torch.bool:
            raise TypeError(f"target must hold integer labels, got {target.dtype}")
        for name, t in (("predictions", preds), ("target", target)):
            if t.device != self.matrix.device:
                raise ValueError(
                    f"{name} are on {t.device} but the matrix is on {self.matrix.device}: "
                    f"move the metric with .to(device)"
                )
        y = target.reshape(-1).long()
        p = preds.reshape(-1).long()
        valid = y != self.ignore_index
        bad_y = valid & ((y < 0) | (y >= C))
        bad_p = valid & ((p < 0) | (p >= C))
        if y.device.type == "cpu":  # checked at once, before anything is counted: free on the CPU
            if bool((bad_y | bad_p).any()):
                if bool(bad_y.any()):
                    v = y[bad_y].unique().tolist()
                    raise ValueError(
                        f"target contains label {v[0]} outside [0, {C}) "
                        f"(values: {v[:5]}; ignore_index={self.ignore_index})"
                    )
                v = p[bad_p].unique().tolist()
                raise ValueError(f"predictions contain class {v[0]} outside [0, {C}) (values: {v[:5]})")
        else:  # on a GPU without a host sync: deferred, as the losses' label check (those pixels are not counted)
            _deferred.labels(_bad_pair(bad_y, y), C, self.ignore_index)
            _deferred.flag(~bad_p.any(), f"predictions contain a class outside [0, {C})")
        # scatter-add, not bincount (whose size depends on the largest value: a host sync on a GPU)
        keep = valid & ~bad_y & ~bad_p
        idx = torch.where(keep, y * C + p, torch.full_like(y, C * C))
        counts = torch.zeros(C * C + 1, dtype=torch.int64, device=y.device).scatter_add_(
            0, idx, torch.ones_like(idx)
        )
        self.matrix += counts[:-1].view(C, C)

    def compute(self):
        """The (C, C) int64 counts of the window so far: a copy, which a later ``update()``,
        ``reset()`` or ``sync()`` leaves as it is (as ``torchmetrics`` does). The live counts are
        the buffer ``matrix``."""
        return self.matrix.clone()

    def reset(self):
        """Zero the counts (start a new window)."""
        self.matrix.zero_()
        self._synced = False

    @torch.no_grad()
    def sync(self):
        """All-reduce (sum) the counts over ``torch.distributed`` ranks; a no-op when it is
        not initialised. Call it once per window, on every rank; :meth:`reset` before the
        next window."""
        if self._synced:
            raise RuntimeError("ConfusionMatrix.sync() called twice: call reset() first")
        if dist_ready():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)
        self._synced = True

    # ---- derived metrics: float64, 0 where a denominator is 0

    def _parts(self):
        m = self.matrix
        tp = m.diagonal()
        return tp, m.sum(dim=1), m.sum(dim=0)  # true positives, labels, predictions per class

    def recall(self):
        """(C,) TP_c / #label c: the per-class accuracy (0 for a class with no label)."""
        tp, labels, _ = self._parts()
        return _ratio(tp, labels)

    def precision(self):
        """(C,) TP_c / #predicted c (0 for a class never predicted)."""
        tp, _, preds = self._parts()
        return _ratio(tp, preds)

    def iou(self):
        """(C,) TP_c / (#label c + #predicted c − TP_c) (0 for a class neither present nor
        predicted)."""
        tp, labels, preds = self._parts()
        return _ratio(tp, labels + preds - tp)

    def miou(self):
        """Mean IoU over the classes that occur — as a label or as a prediction; a class that
        is neither is left out rather than counted as 0 (or 1). 0 for an empty matrix."""
        tp, labels, preds = self._parts()
        union = labels + preds - tp
        occurs = union > 0
        return _ratio((_ratio(tp, union) * occurs).sum(), occurs.sum())

    def accuracy(self):
        """Overall pixel accuracy, Σ TP_c / Σ counts (0 for an empty matrix)."""
        tp, labels, _ = self._parts()
        return _ratio(tp.sum(), labels.sum())
