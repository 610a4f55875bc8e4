"""Loss modules (DESIGN.md §6): thin ``nn.Module`` shells over :mod:`fused_imbalance.functional`.

Each module keeps its class weights (or its running statistics) in buffers, so
``.to(device)`` moves them and ``state_dict()`` saves them, and computes nothing per step
beyond the functional call: static weights are computed once in ``__init__``, CDB weights
once per :meth:`CDBLoss.update`. ``forward(logits, target, confusion=None)`` takes the shapes
of DESIGN.md §2; a (C, C) int64 ``confusion`` receives the batch's argmax confusion counts
from the same pass over the logits.

``validate`` (keyword, default True) is forwarded to the functional call: True checks the
labels once after the pass (one small host sync), False skips that check.

``upsample=None | "bilinear" | "nearest"`` and ``align_corners=False`` (keywords, DESIGN.md §10):
with ``upsample`` the module takes low-resolution logits (B, C, h, w) and labels (B, H, W) and
computes the loss of the logits interpolated to (H, W), without the interpolated tensor.
"""
import torch
import torch.distributed as dist
from torch import nn

from . import functional
from . import weights as _weights
from ._upsample import check_options as check_upsample
from ._checks import check_gamma, check_loss_type, check_num_classes, check_options, dist_ready

__all__ = ["FocalLoss", "ClassBalancedLoss", "RecallLoss", "CDBLoss", "OutlyingMSELoss"]

class FocalLoss(nn.Module):
    """Focal loss −w_y (1 − p_y)^γ log p_y (Lin et al. 2017); γ = 0 is cross-entropy.

    ``weight`` (optional, (C,)) is kept in the buffer ``weight``; ``"mean"`` is
    Σ w_y ℓ / Σ w_y over valid pixels, as ``torch.nn.CrossEntropyLoss``.
    """

    def __init__(self, gamma=2.0, weight=None, ignore_index=-100, reduction="mean", backend=None, *,
                 validate=True, upsample=None,
                 align_corners=False):
        super().__init__()
        check_upsample(upsample, align_corners)
        self.upsample, self.align_corners = upsample, align_corners
        check_options(ignore_index, reduction)
        self.gamma = check_gamma(gamma)
        self.ignore_index, self.reduction, self.backend, self.validate = ignore_index, reduction, backend, validate
        if weight is not None:
            weight = torch.as_tensor(_weights._in_class_order(weight, "weight")).detach().clone()
            if not weight.is_floating_point():
                weight = weight.to(torch.float32)
            if weight.dim() != 1:
                raise ValueError(f"weight must be a (C,) tensor, got shape {tuple(weight.shape)}")
        self.register_buffer("weight", weight)

    def extra_repr(self):
        return f"gamma={self.gamma}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"

    def forward(self, logits, target, confusion=None):
        return functional.focal_loss(logits, target, self.gamma, self.weight, self.ignore_index, self.reduction,
                                     confusion=confusion, backend=self.backend, validate=self.validate,
            upsample=self.upsample, align_corners=self.align_corners)


class ClassBalancedLoss(nn.Module):
    """Class-balanced loss (Cui et al. 2019).

    The effective-number weights ``weights.effective_number(samples_per_class, beta)`` (summing
    to C) are computed once into the buffer ``weight``; each step is
    ``functional.weighted_loss`` with them, equal to ``functional.class_balanced_loss``.
    ``loss_type``: "softmax" (cross-entropy), "sigmoid" (sigmoid BCE summed over classes),
    "focal" (sigmoid focal, the paper's CB Focal), "softmax_focal". ``"mean"`` is over valid
    pixels.
    """

    def __init__(self, samples_per_class, beta=0.9999, loss_type="softmax", gamma=2.0, ignore_index=-100,
                 reduction="mean", backend=None, *, validate=True, upsample=None,
                 align_corners=False):
        super().__init__()
        check_upsample(upsample, align_corners)
        self.upsample, self.align_corners = upsample, align_corners
        check_loss_type(loss_type)
        check_options(ignore_index, reduction)
        self.beta, self.loss_type, self.gamma = float(beta), loss_type, check_gamma(gamma)
        self.ignore_index, self.reduction, self.backend, self.validate = ignore_index, reduction, backend, validate
        self.register_buffer("weight", _weights.effective_number(samples_per_class, beta))

    def extra_repr(self):
        return (f"num_classes={self.weight.numel()}, beta={self.beta}, loss_type={self.loss_type!r}, "
                f"gamma={self.gamma}, reduction={self.reduction!r}")

    def forward(self, logits, target, confusion=None):
        if logits.dim() >= 2 and logits.shape[1] != self.weight.numel():
            raise ValueError(f"ClassBalancedLoss was built with samples_per_class of {self.weight.numel()} classes, "
                             f"but the logits have {logits.shape[1]} (dim 1)")
        return functional.weighted_loss(logits, target, self.weight, self.loss_type, self.gamma, self.ignore_index,
                                        self.reduction, confusion=confusion, backend=self.backend,
                                        validate=self.validate, upsample=self.upsample,
                                        align_corners=self.align_corners)


class RecallLoss(nn.Module):
    """Recall loss (Tian et al. 2021): −(1 − R_y) log p_y with per-class recall R.

    Recall. Without ``momentum``, R is the recall of the current batch (argmax predictions),
    computed in the same pass over the logits as the loss; a class absent from the batch gets
    weight 1 (it does not occur in the loss). With ``momentum`` m, the buffer
    ``running_recall`` keeps R̄_c ← m·R̄_c + (1 − m)·R_c for every class c present in the
    batch and R = R̄ (this batch included) is used. The first time a class appears, R̄_c
    starts from that batch's recall rather than from 0, so an early class is not held at
    weight ≈ 1 for many steps; the buffer ``seen`` records which classes have appeared, and a
    class never seen has R̄_c = 0, weight 1. As with batch norm, R̄ is updated only in
    training mode; in eval mode the stored R̄ is used as it is.

    Distributed training (``distributed=True`` with ``torch.distributed`` initialised): the
    batch's per-class counts n_c and true positives TP_c are all-reduced (summed) over the
    ranks before the recall is derived, so every rank uses the weights — and the moving
    average — of the global batch, identical on all ranks. ``forward`` is then a collective:
    every rank must call it, in the same order, whenever it uses the batch statistics
    (always without momentum; in training mode with it). Only the 2·C statistics travel,
    never the logits.

    What the loss value then means under ``DistributedDataParallel``: rank r returns
    L_r = Σ_{n ∈ r} w_{y_n} ℓ_n / D_r with the global weights w, D_r its own number of valid
    pixels (``"mean"``). DDP averages gradients over the R ranks, so training follows
    (1/R) Σ_r L_r. That equals the loss of one process on the concatenated batch,
    Σ_n w_{y_n} ℓ_n / Σ_r D_r, exactly when every rank has the same number of valid pixels
    (same batch shape and no ignored pixels, say); otherwise pixels on ranks with fewer valid
    pixels weigh more. For the exact global-batch loss with uneven valid counts use
    ``reduction="sum"`` and scale by R / (all-reduced valid count). With ``"sum"``,
    Σ_r L_r is the single-process sum exactly.

    Keep the module outside the DDP-wrapped model, or let it be: its buffers are the same on
    every rank when ``distributed=True``, so DDP's buffer broadcast changes nothing.
    """

    def __init__(self, num_classes, momentum=None, ignore_index=-100, reduction="mean", distributed=False,
                 backend=None, *, validate=True, upsample=None,
                 align_corners=False):
        super().__init__()
        check_upsample(upsample, align_corners)
        self.upsample, self.align_corners = upsample, align_corners
        self.num_classes = check_num_classes(num_classes)
        check_options(ignore_index, reduction)
        if momentum is not None:
            momentum = float(momentum)
            if not 0.0 <= momentum < 1.0:
                raise ValueError(f"momentum must be in [0, 1) or None, got {momentum}")
            self.register_buffer("running_recall", torch.zeros(num_classes, dtype=torch.float32))
            self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))
        self.momentum = momentum
        self.ignore_index, self.reduction, self.backend, self.validate = ignore_index, reduction, backend, validate
        self.distributed = bool(distributed)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, momentum={self.momentum}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, distributed={self.distributed}")

    @torch.no_grad()
    def _recall_from_stats(self, count, tp):
        """The recall to use, from this batch's (count, tp); called by the functional after
        its pass over the logits. Device ops only: no host sync."""
        if self.distributed and dist_ready():
            stats = torch.stack([count, tp])
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            count, tp = stats[0], stats[1]
        present = count > 0
        batch = tp.to(torch.float64) / count.clamp_min(1).to(torch.float64)  # 0 for an absent class
        if self.momentum is None:
            return batch
        batch = batch.to(self.running_recall.dtype)
        m = self.momentum
        ema = m * self.running_recall + (1.0 - m) * batch
        new = torch.where(present, torch.where(self.seen, ema, batch), self.running_recall)
        self.running_recall.copy_(new)
        self.seen.logical_or_(present)
        return new

    def forward(self, logits, target, confusion=None):
        if logits.dim() < 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"RecallLoss({self.num_classes}) got logits of shape {tuple(logits.shape)}: "
                             f"expected (N, {self.num_classes}) or (B, {self.num_classes}, ...)")
        if self.momentum is not None and not self.training:
            recall = self.running_recall
        elif self.momentum is None and not self.distributed:
            recall = None  # the functional's batch recall
        else:
            recall = self._recall_from_stats
        return functional.recall_loss(logits, target, self.ignore_index, self.reduction, recall,
                                      confusion=confusion, backend=self.backend, validate=self.validate,
            upsample=self.upsample, align_corners=self.align_corners)


class CDBLoss(nn.Module):
    """Class-wise difficulty-balanced loss (Sinha et al. 2020): −w_y (1 − p_y)^γ log p_y.

    The weights w_c = (1 − A_c)^τ live in the buffer ``weight``. They are all ones (plain
    cross-entropy / focal loss) until the first :meth:`update` or
    :meth:`update_from_confusion`, which refresh them from the per-class accuracy A measured
    on validation data — typically once an epoch. ``tau="dynamic"`` derives τ from A
    (DESIGN.md §4); a number fixes it. ``"mean"`` is over valid pixels.
    """

    def __init__(self, num_classes, tau="dynamic", gamma=0.0, ignore_index=-100, reduction="mean", backend=None,
                 *, validate=True, upsample=None,
                 align_corners=False):
        super().__init__()
        check_upsample(upsample, align_corners)
        self.upsample, self.align_corners = upsample, align_corners
        self.num_classes = check_num_classes(num_classes)
        check_options(ignore_index, reduction)
        _weights.cdb([0.5], tau)  # rejects a bad tau now rather than at the first update
        self.tau, self.gamma = tau, check_gamma(gamma)
        self.ignore_index, self.reduction, self.backend, self.validate = ignore_index, reduction, backend, validate
        self.register_buffer("weight", torch.ones(num_classes, dtype=torch.float32))

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, tau={self.tau!r}, gamma={self.gamma}, "
                f"reduction={self.reduction!r}")

    @torch.no_grad()
    def update(self, class_accuracy):
        """Set w = (1 − A)^τ from a (C,) accuracy in [0, 1], taken at face value: a class
        given accuracy 0 gets weight 1 and, with ``tau="dynamic"``, pushes τ towards 2.
        Returns the new weights: a copy, which a later update leaves as it is (the live weights
        are the buffer ``weight``)."""
        acc = torch.as_tensor(_weights._in_class_order(class_accuracy, "class_accuracy"))
        if acc.shape != (self.num_classes,):
            raise ValueError(f"class_accuracy must have shape ({self.num_classes},), got {tuple(acc.shape)}")
        w = _weights.cdb(acc, self.tau)
        self.weight.copy_(w.to(self.weight.device, self.weight.dtype))
        return self.weight.clone()

    @torch.no_grad()
    def update_from_confusion(self, confusion):
        """Set the weights from a (C, C) confusion matrix (row = true class) or a
        :class:`~fused_imbalance.metrics.ConfusionMatrix` (after its ``sync()`` in
        distributed training, so every rank gets the same weights).

        A_c = M_cc / Σ_j M_cj is the recall of class c. A class with no sample in the matrix
        has no measured accuracy: it is left out of τ (its made-up value would move the
        weights of every other class) and gets the largest weight of the measured classes,
        as a class with count 0 in :mod:`fused_imbalance.weights`. A matrix with no sample
        at all is a ``ValueError``. Returns the new weights, a copy, as :meth:`update` does.
        """
        m = confusion.compute() if hasattr(confusion, "compute") else torch.as_tensor(confusion)
        C = self.num_classes
        if m.shape != (C, C):
            raise ValueError(f"confusion must have shape ({C}, {C}), got {tuple(m.shape)}")
        if m.is_floating_point() or m.is_complex():
            raise TypeError(f"confusion must hold integer counts, got {m.dtype}")
        n = m.sum(dim=1).to(torch.float64)
        present = n > 0
        if not bool(present.any()):
            raise ValueError("confusion matrix holds no sample: cannot measure class accuracy")
        acc = m.diagonal().to(torch.float64) / n.clamp_min(1)
        w_present = _weights.cdb(acc[present], self.tau)
        w = torch.full((C,), 0.0, dtype=w_present.dtype, device=w_present.device)
        w[present] = w_present
        w[~present] = w_present.max()
        self.weight.copy_(w.to(self.weight.device, self.weight.dtype))
        return self.weight.clone()

    def forward(self, logits, target, confusion=None):
        return functional.weighted_loss(logits, target, self.weight, "softmax_focal", self.gamma, self.ignore_index,
                                        self.reduction, confusion=confusion, backend=self.backend,
                                        validate=self.validate,
            upsample=self.upsample, align_corners=self.align_corners)


class OutlyingMSELoss(nn.Module):
    """MSE with outlying labels: ½ Σ_k (a_k − t_k)², t_k = v_y·[k = y].

    The outlying label values v = ``weights.outlying_labels(samples_per_class, alpha)`` (the
    most frequent class α, the rarest C·α) live in the buffer ``outlying``. a = the logits
    (``input="logits"``, the paper) or their softmax (``input="softmax"``). ``"mean"`` is
    over valid pixels.
    """

    def __init__(self, samples_per_class, alpha=1.0, input="logits", ignore_index=-100, reduction="mean",
                 backend=None, *, validate=True, upsample=None,
                 align_corners=False):
        super().__init__()
        check_upsample(upsample, align_corners)
        self.upsample, self.align_corners = upsample, align_corners
        if input not in ("logits", "softmax"):
            raise ValueError(f"input must be 'logits' or 'softmax', got {input!r}")
        check_options(ignore_index, reduction)
        self.alpha, self.input = float(alpha), input
        self.ignore_index, self.reduction, self.backend, self.validate = ignore_index, reduction, backend, validate
        self.register_buffer("outlying", _weights.outlying_labels(samples_per_class, alpha))

    def extra_repr(self):
        return (f"num_classes={self.outlying.numel()}, alpha={self.alpha}, input={self.input!r}, "
                f"reduction={self.reduction!r}")

    def forward(self, logits, target, confusion=None):
        return functional.mse_outlying_loss(logits, target, self.outlying, self.ignore_index, self.reduction,
                                            self.input, confusion=confusion, backend=self.backend,
                                            validate=self.validate,
            upsample=self.upsample, align_corners=self.align_corners)
