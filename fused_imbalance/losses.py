"""Loss modules (docs/DESIGN.md §6): thin ``nn.Module`` shells over :mod:`fused_imbalance.functional`.

Each module keeps its class weights (or its running statistics) in buffers, so
``.to(device)`` moves them and ``state_dict()`` saves them, and computes nothing per step
beyond the functional call: static weights are computed once in ``__init__``, CDB weights
once per :meth:`CDBLoss.update`. ``forward(logits, target, confusion=None)`` takes the shapes
of docs/DESIGN.md §2; a (C, C) int64 ``confusion`` receives the batch's argmax confusion counts
from the same pass over the logits.

Activation checkpointing (``torch.utils.checkpoint``) runs a forward inside the checkpointed region
again in the backward: the ``confusion`` counts are then added twice and ``RecallLoss``'s moving
average takes two steps per batch, as batch norm's running statistics do. Call the module outside the
region (checkpoint the network and give the loss its output: a fused loss keeps nothing of the
logits' size for the backward but the logits themselves, so checkpointing it saves little).

``validate`` (keyword, default True) is forwarded to the functional call: True checks the
labels (without a host sync: on the GPU the error comes from a later call, see
:func:`fused_imbalance.check_deferred`), False skips that check.

``upsample=None | "bilinear" | "nearest"`` and ``align_corners=False`` (keywords, docs/DESIGN.md §10):
with ``upsample`` the module takes low-resolution logits (B, C, h, w) and labels (B, H, W) and
computes the loss of the logits interpolated to (H, W), without the interpolated tensor.

Every option can be set after construction: it is checked as the constructor checks it and takes
effect at the next call; an option that a buffer derives from updates the buffer
(``beta``, ``alpha``, ``samples_per_class``, ``CDBLoss.tau``). ``num_classes`` and the
derived buffers cannot be assigned (an ``AttributeError`` says what to do instead); see
:mod:`._options`.
"""

import torch
import torch.distributed as dist

from . import functional
from . import reference as _ref
from . import weights as _weights
from ._options import GAMMA, LOSS_OPTIONS, NUM_CLASSES, CheckedOptions
from ._checks import check_loss_type, check_num_classes, check_options, dist_ready

__all__ = [
    "FocalLoss",
    "ClassBalancedLoss",
    "RecallLoss",
    "CDBLoss",
    "OutlyingMSELoss",
    "OhemCrossEntropyLoss",
    "DiceLoss",
    "GeneralizedDiceLoss",
    "TverskyLoss",
    "DiceCELoss",
]


def _set_options(module, **options):
    """Set the options through their checks (CheckedOptions), in this order."""
    for name, value in options.items():
        setattr(module, name, value)


def _class_weight(module, weight):
    """FocalLoss.weight: None, or a (C,) float tensor of its own (a copy of what was given)."""
    if weight is None:
        return None
    weight = torch.as_tensor(_weights._in_class_order(weight, "weight")).detach().clone()
    if not weight.is_floating_point():
        weight = weight.to(torch.float32)
    if weight.dim() != 1:
        raise ValueError(f"weight must be a (C,) tensor, got shape {tuple(weight.shape)}")
    return weight


def _samples_per_class(derive):
    """The ``samples_per_class`` option of the modules whose buffer ``derive(module, counts)`` derives
    from it and one more option: float64 counts (exact, and out of ``.to()``'s reach: not a buffer);
    once built, the buffer follows them, and the number of classes cannot change."""

    def check(module, value):
        counts = _weights._counts(value)
        built = module.__dict__.get("samples_per_class")
        if built is not None:
            if counts.shape != built.shape:
                raise ValueError(
                    f"samples_per_class has {counts.numel()} classes, the module was built with "
                    f"{built.numel()}: build a new {type(module).__name__}"
                )
            derive(module, counts)
        return counts

    return check


@torch.no_grad()
def _derived_buffer(module, name, value):
    """Register buffer ``name`` (construction) or copy ``value`` into it, in its device and dtype
    (an option of a module that ``.to()`` has moved)."""
    if name in module._buffers:
        module._buffers[name].copy_(value)
    else:
        module.register_buffer(name, value)


class FocalLoss(CheckedOptions):
    """Focal loss −w_y (1 − p_y)^γ log p_y (Lin et al. 2017); γ = 0 is cross-entropy.

    ``weight`` (optional, (C,)) is kept in the buffer ``weight``; ``"mean"`` is
    Σ w_y ℓ / Σ w_y over valid pixels, as ``torch.nn.CrossEntropyLoss``. Setting ``gamma`` or
    ``weight`` later takes effect at the next call (checked as here; a new ``weight`` is copied).
    """

    OPTIONS = {**LOSS_OPTIONS, **GAMMA, "weight": _class_weight}

    def __init__(
        self,
        gamma=2.0,
        weight=None,
        ignore_index=-100,
        reduction="mean",
        backend=None,
        *,
        validate=True,
        upsample=None,
        align_corners=False,
    ):
        super().__init__()
        self.register_buffer("weight", None)
        _set_options(
            self,
            upsample=upsample,
            align_corners=align_corners,
            ignore_index=ignore_index,
            reduction=reduction,
            gamma=gamma,
            backend=backend,
            validate=validate,
            weight=weight,
        )

    def extra_repr(self):
        return f"gamma={self.gamma}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"

    def forward(self, logits, target, confusion=None):
        return functional.focal_loss(
            logits,
            target,
            self.gamma,
            self.weight,
            self.ignore_index,
            self.reduction,
            confusion=confusion,
            backend=self.backend,
            validate=self.validate,
            upsample=self.upsample,
            align_corners=self.align_corners,
        )


def _loss_type(module, loss_type):
    check_loss_type(loss_type)
    return loss_type


def _beta(module, beta):
    """ClassBalancedLoss.beta: the weights follow it."""
    w = _weights.effective_number(module.samples_per_class, beta)  # checks beta
    _derived_buffer(module, "weight", w)
    return float(beta)


def _cb_weights(module, counts):
    _derived_buffer(module, "weight", _weights.effective_number(counts, module.beta))


class ClassBalancedLoss(CheckedOptions):
    """Class-balanced loss (Cui et al. 2019).

    The effective-number weights ``weights.effective_number(samples_per_class, beta)`` (summing
    to C) are computed once into the buffer ``weight``; each step is
    ``functional.weighted_loss`` with them, equal to ``functional.class_balanced_loss``.
    ``loss_type``: "softmax" (cross-entropy), "sigmoid" (sigmoid BCE summed over classes),
    "focal" (sigmoid focal, the paper's CB Focal), "softmax_focal". ``"mean"`` is over valid
    pixels.

    Setting ``beta`` or ``samples_per_class`` (as many classes) later recomputes ``weight`` (the counts,
    float64, and β are options, not state: ``state_dict()`` holds ``weight`` alone). ``weight`` itself
    cannot be assigned; for weights of your own use ``functional.weighted_loss``.
    """

    OPTIONS = {
        **LOSS_OPTIONS,
        **GAMMA,
        "loss_type": _loss_type,
        "beta": _beta,
        "samples_per_class": _samples_per_class(_cb_weights),
    }
    FIXED = {
        "weight": "it is derived from samples_per_class and beta: set those, or pass weights of your own "
        "to functional.weighted_loss"
    }

    def __init__(
        self,
        samples_per_class,
        beta=0.9999,
        loss_type="softmax",
        gamma=2.0,
        ignore_index=-100,
        reduction="mean",
        backend=None,
        *,
        validate=True,
        upsample=None,
        align_corners=False,
    ):
        super().__init__()
        _set_options(
            self,
            upsample=upsample,
            align_corners=align_corners,
            loss_type=loss_type,
            ignore_index=ignore_index,
            reduction=reduction,
            gamma=gamma,
            backend=backend,
            validate=validate,
        )
        self.samples_per_class = samples_per_class
        self.beta = beta

    def extra_repr(self):
        return (
            f"num_classes={self.weight.numel()}, beta={self.beta}, loss_type={self.loss_type!r}, "
            f"gamma={self.gamma}, reduction={self.reduction!r}"
        )

    def forward(self, logits, target, confusion=None):
        weight = self.weight  # a buffer: one lookup through nn.Module.__getattr__
        if logits.dim() >= 2 and logits.shape[1] != weight.numel():
            raise ValueError(
                f"ClassBalancedLoss was built with samples_per_class of {weight.numel()} classes, "
                f"but the logits have {logits.shape[1]} (dim 1)"
            )
        return functional.weighted_loss(
            logits,
            target,
            weight,
            self.loss_type,
            self.gamma,
            self.ignore_index,
            self.reduction,
            confusion=confusion,
            backend=self.backend,
            validate=self.validate,
            upsample=self.upsample,
            align_corners=self.align_corners,
        )


def _momentum(module, momentum):
    """RecallLoss.momentum: None or a number in [0, 1); from one number to another only once built."""
    if momentum is not None:
        momentum = float(momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1) or None, got {momentum}")
    if "momentum" in module.__dict__ and (momentum is None) != (module.momentum is None):
        raise ValueError(
            f"momentum can change from one number to another, not from {module.momentum} to {momentum}: "
            "the moving average's buffers (running_recall, seen) exist only with a momentum; "
            "build a new RecallLoss"
        )
    return momentum


def _distributed(module, value):
    if not isinstance(value, bool):
        raise TypeError(f"distributed must be True or False, got {value!r}")
    return value


class RecallLoss(CheckedOptions):
    """Recall loss (Tian et al. 2021): −(1 − R_y) log p_y with per-class recall R.

    Recall. Without ``momentum``, R is the recall of the current batch (argmax predictions),
    computed in the same pass over the logits as the loss; a class absent from the batch gets
    weight 1 (it does not occur in the loss). With ``momentum`` m, the buffer
    ``running_recall`` keeps R̄_c ← m·R̄_c + (1 − m)·R_c for every class c present in the
    batch and R = R̄ (this batch included) is used. The first time a class appears, R̄_c
    starts from that batch's recall rather than from 0, so an early class is not held at
    weight ≈ 1 for many steps; the buffer ``seen`` records which classes have appeared, and a
    class never seen has R̄_c = 0, weight 1. As with batch norm, R̄ is updated only in
    training mode; in eval mode the stored R̄ is used as it is. Also as with batch norm, a call
    inside a region of activation checkpointing (``torch.utils.checkpoint``) runs again in the
    backward and updates R̄ a second time (and adds ``confusion`` twice): call the loss outside
    the region, on the checkpointed network's output.

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

    ``momentum`` can be set later from one number to another (checked as here; the next training
    step uses it), not to or from None; ``distributed`` to True or False.

    On a fused backend a training step with a momentum (``"mean"`` or ``"sum"``, not ``distributed``)
    updates the buffers in one small launch after the forward (docs/DESIGN.md §14).
    """

    OPTIONS = {**LOSS_OPTIONS, "momentum": _momentum, "distributed": _distributed}
    FIXED = {
        **NUM_CLASSES,
        "running_recall": "it is the moving average: change it in place or with load_state_dict()",
        "seen": "it is part of the moving average: change it in place or with load_state_dict()",
    }

    def __init__(
        self,
        num_classes,
        momentum=None,
        ignore_index=-100,
        reduction="mean",
        distributed=False,
        backend=None,
        *,
        validate=True,
        upsample=None,
        align_corners=False,
    ):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        _set_options(
            self,
            upsample=upsample,
            align_corners=align_corners,
            ignore_index=ignore_index,
            reduction=reduction,
            momentum=momentum,
            backend=backend,
            validate=validate,
            distributed=distributed,
        )
        if momentum is not None:
            self.register_buffer("running_recall", torch.zeros(num_classes, dtype=torch.float32))
            self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, momentum={self.momentum}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, distributed={self.distributed}"
        )

    @torch.no_grad()
    def _recall_from_stats(self, count, tp):
        """The recall to use, from this batch's (count, tp); called by the functional after
        its pass over the logits. Device ops only: no host sync."""
        if self.distributed and dist_ready():
            stats = torch.stack([count, tp])
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            count, tp = stats[0], stats[1]
        present = count > 0
        batch = tp.to(torch.float64) / count.clamp_min(1)  # 0 for an absent class
        if self.momentum is None:
            return batch
        batch = batch.to(self.running_recall.dtype)
        ema = torch.lerp(self.running_recall, batch, 1.0 - self.momentum)  # m·R̄ + (1 − m)·R
        new = torch.where(present, torch.where(self.seen, ema, batch), self.running_recall)
        self.running_recall.copy_(new)
        self.seen.logical_or_(present)
        return new

    def forward(self, logits, target, confusion=None):
        if logits.dim() < 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"RecallLoss({self.num_classes}) got logits of shape {tuple(logits.shape)}: "
                f"expected (N, {self.num_classes}) or (B, {self.num_classes}, ...)"
            )
        if self.momentum is not None and not self.training:
            recall = self.running_recall
        elif self.momentum is None and not self.distributed:
            recall = None  # the functional's batch recall
        elif self.momentum is not None and not self.distributed:
            # a fused eager call updates the average in one launch; every other path calls the callable
            recall = functional.RecallEma(
                self.running_recall, self.seen, 1.0 - self.momentum, self._recall_from_stats
            )
        else:
            recall = self._recall_from_stats
        return functional._recall_loss(
            logits,
            target,
            self.ignore_index,
            self.reduction,
            recall,
            confusion,
            self.backend,
            self.validate,
            self.upsample,
            self.align_corners,
            True,
        )


def _cdb_weights(accuracy, present, tau):
    """w = (1 − A)^τ over the classes present (τ from them alone); the others get the largest."""
    w_present = _weights.cdb(accuracy[present], tau)
    w = torch.empty(accuracy.shape, dtype=w_present.dtype, device=w_present.device)
    w[present] = w_present
    w[~present] = w_present.max()
    return w


def _tau(module, tau):
    """CDBLoss.tau: the weights of the last update follow it."""
    _weights.cdb([0.5], tau)  # checks tau
    last = module.__dict__.get("_accuracy")
    if last is not None:
        _derived_buffer(module, "weight", _cdb_weights(*last, tau))
    return tau


class CDBLoss(CheckedOptions):
    """Class-wise difficulty-balanced loss (Sinha et al. 2020): −w_y (1 − p_y)^γ log p_y.

    The weights w_c = (1 − A_c)^τ live in the buffer ``weight``. They are all ones (plain
    cross-entropy / focal loss) until the first :meth:`update` or
    :meth:`update_from_confusion`, which refresh them from the per-class accuracy A measured
    on validation data — typically once an epoch. ``tau="dynamic"`` derives τ from A
    (docs/DESIGN.md §4); a number fixes it. ``"mean"`` is over valid pixels.

    Setting ``tau`` later recomputes the weights from the accuracy of this module's last update
    (ones before any update stay ones). The accuracy is not in ``state_dict()``: after
    ``load_state_dict()`` the loaded weights stay as they are and a new ``tau`` applies from the
    next update. ``weight`` itself cannot be assigned.
    """

    OPTIONS = {**LOSS_OPTIONS, **GAMMA, "tau": _tau}
    FIXED = {
        **NUM_CLASSES,
        "weight": "it is derived from the class accuracy: use update() or "
        "update_from_confusion(), or load_state_dict()",
    }

    def __init__(
        self,
        num_classes,
        tau="dynamic",
        gamma=0.0,
        ignore_index=-100,
        reduction="mean",
        backend=None,
        *,
        validate=True,
        upsample=None,
        align_corners=False,
    ):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        _set_options(
            self,
            upsample=upsample,
            align_corners=align_corners,
            ignore_index=ignore_index,
            reduction=reduction,
            tau=tau,
            gamma=gamma,
            backend=backend,
            validate=validate,
        )
        self.register_buffer("weight", torch.ones(num_classes, dtype=torch.float32))
        # (accuracy, present) of the last update, for a later tau; not state: a load forgets it
        self._accuracy = None
        self.register_load_state_dict_post_hook(CDBLoss._forget_accuracy)

    @staticmethod
    def _forget_accuracy(module, incompatible_keys):
        module._accuracy = None

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, tau={self.tau!r}, gamma={self.gamma}, "
            f"reduction={self.reduction!r}"
        )

    @torch.no_grad()
    def update(self, class_accuracy):
        """Set w = (1 − A)^τ from a (C,) accuracy in [0, 1], taken at face value: a class
        given accuracy 0 gets weight 1 and, with ``tau="dynamic"``, pushes τ towards 2.
        Returns the new weights: a copy, which a later update leaves as it is (the live weights
        are the buffer ``weight``)."""
        acc = torch.as_tensor(_weights._in_class_order(class_accuracy, "class_accuracy"))
        if acc.shape != (self.num_classes,):
            raise ValueError(f"class_accuracy must have shape ({self.num_classes},), got {tuple(acc.shape)}")
        return self._set_weights(
            acc.detach().to(torch.float64), torch.ones(acc.shape, dtype=torch.bool, device=acc.device)
        )

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
        return self._set_weights(acc, present)

    def _set_weights(self, accuracy, present):
        w = _cdb_weights(accuracy, present, self.tau)  # checks the accuracy before anything changes
        self.weight.copy_(w.to(self.weight.device, self.weight.dtype))
        self._accuracy = (accuracy, present)
        return self.weight.clone()

    def forward(self, logits, target, confusion=None):
        return functional.weighted_loss(
            logits,
            target,
            self.weight,
            "softmax_focal",
            self.gamma,
            self.ignore_index,
            self.reduction,
            confusion=confusion,
            backend=self.backend,
            validate=self.validate,
            upsample=self.upsample,
            align_corners=self.align_corners,
        )


def _input(module, input):
    if input not in ("logits", "softmax"):
        raise ValueError(f"input must be 'logits' or 'softmax', got {input!r}")
    return input


def _alpha(module, alpha):
    """OutlyingMSELoss.alpha: the label values follow it."""
    _derived_buffer(
        module, "outlying", _weights.outlying_labels(module.samples_per_class, alpha)
    )  # checks alpha
    return float(alpha)


def _outlying_values(module, counts):
    _derived_buffer(module, "outlying", _weights.outlying_labels(counts, module.alpha))


class OutlyingMSELoss(CheckedOptions):
    """MSE with outlying labels: ½ Σ_k (a_k − t_k)², t_k = v_y·[k = y].

    The outlying label values v = ``weights.outlying_labels(samples_per_class, alpha)`` (the
    most frequent class α, the rarest C·α) live in the buffer ``outlying``. a = the logits
    (``input="logits"``, the paper) or their softmax (``input="softmax"``). ``"mean"`` is
    over valid pixels. Setting ``alpha`` or ``samples_per_class`` (as many classes) later recomputes
    ``outlying``, as in :class:`ClassBalancedLoss`; ``outlying`` itself cannot be assigned
    (``functional.mse_outlying_loss`` takes any values).
    """

    OPTIONS = {
        **LOSS_OPTIONS,
        "input": _input,
        "alpha": _alpha,
        "samples_per_class": _samples_per_class(_outlying_values),
    }
    FIXED = {
        "outlying": "it is derived from samples_per_class and alpha: set those, or pass values of your own "
        "to functional.mse_outlying_loss"
    }

    def __init__(
        self,
        samples_per_class,
        alpha=1.0,
        input="logits",
        ignore_index=-100,
        reduction="mean",
        backend=None,
        *,
        validate=True,
        upsample=None,
        align_corners=False,
    ):
        super().__init__()
        _set_options(
            self,
            upsample=upsample,
            align_corners=align_corners,
            input=input,
            ignore_index=ignore_index,
            reduction=reduction,
            backend=backend,
            validate=validate,
        )
        self.samples_per_class = samples_per_class
        self.alpha = alpha

    def extra_repr(self):
        return (
            f"num_classes={self.outlying.numel()}, alpha={self.alpha}, input={self.input!r}, "
            f"reduction={self.reduction!r}"
        )

    def forward(self, logits, target, confusion=None):
        return functional.mse_outlying_loss(
            logits,
            target,
            self.outlying,
            self.ignore_index,
            self.reduction,
            self.input,
            confusion=confusion,
            backend=self.backend,
            validate=self.validate,
            upsample=self.upsample,
            align_corners=self.align_corners,
        )


def _thresh(module, thresh):
    return _ref._check_ohem(thresh, 0, "hrnet")[0]


def _min_kept(module, min_kept):
    return _ref._check_ohem(0.0, min_kept, "hrnet")[1]


def _convention(module, convention):
    _ref._check_ohem(0.0, 0, convention)
    return convention


class OhemCrossEntropyLoss(CheckedOptions):
    """OHEM cross-entropy (online hard example mining): the cross-entropy of the pixels whose label
    probability lies strictly below max(the ``min_kept``-th smallest of the batch, ``thresh``), as HRNet's
    ``OhemCrossEntropy`` (``convention="hrnet"``) or mmsegmentation's ``OHEMPixelSampler`` with its
    cross-entropy (``convention="mmseg"``): see :func:`functional.ohem_cross_entropy`.

    ``weight`` (optional, (C,)) is kept in the buffer ``weight``. ``thresh``, ``min_kept``, ``convention``
    and the other options can be set later (checked as here; taking effect at the next call).
    """

    OPTIONS = {
        **LOSS_OPTIONS,
        "thresh": _thresh,
        "min_kept": _min_kept,
        "convention": _convention,
        "weight": _class_weight,
    }

    def __init__(
        self,
        thresh=0.7,
        min_kept=100000,
        weight=None,
        ignore_index=-100,
        reduction="mean",
        backend=None,
        *,
        convention="hrnet",
        validate=True,
        upsample=None,
        align_corners=False,
    ):
        super().__init__()
        self.register_buffer("weight", None)
        _set_options(
            self,
            upsample=upsample,
            align_corners=align_corners,
            thresh=thresh,
            min_kept=min_kept,
            convention=convention,
            ignore_index=ignore_index,
            reduction=reduction,
            backend=backend,
            validate=validate,
            weight=weight,
        )

    def extra_repr(self):
        return (
            f"thresh={self.thresh}, min_kept={self.min_kept}, convention={self.convention!r}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
        )

    def forward(self, logits, target, confusion=None):
        return functional.ohem_cross_entropy(
            logits,
            target,
            self.thresh,
            self.min_kept,
            self.weight,
            self.ignore_index,
            self.reduction,
            convention=self.convention,
            confusion=confusion,
            backend=self.backend,
            validate=self.validate,
            upsample=self.upsample,
            align_corners=self.align_corners,
        )


# --- the Dice family (docs/DESIGN.md §12) ---------------------------------------------------------------


def _flag(name):
    def check(module, value):
        return _ref._check_flag(value, name)

    return check


def _number(name, positive=False):
    def check(module, value):
        return _ref._check_number(value, name, positive)

    return check


def _dice_batch(module, value):
    value = _ref._check_flag(value, "batch")
    if not value and module.__dict__.get("distributed"):
        raise ValueError(
            "batch=False with distributed=True: the sums of the global batch need batch=True "
            "(set distributed=False first)"
        )
    return value


def _dice_distributed(module, value):
    if not isinstance(value, bool):
        raise TypeError(f"distributed must be True or False, got {value!r}")
    if value and not module.__dict__.get("batch"):
        raise ValueError(
            "distributed=True needs batch=True: it all-reduces the sums of the whole batch; with "
            "batch=False each image's loss is its own, and DDP's gradient averaging equals one process "
            "on the global batch when every rank has as many images"
        )
    return value


def _w_type(module, value):
    if value not in _ref.W_TYPES:
        raise ValueError(f"w_type must be one of {_ref.W_TYPES}, got {value!r}")
    return value


def _dice_class_weight(module, weight):
    """DiceLoss.weight / DiceCELoss.weight: None, or a (C',) float tensor of its own, finite and >= 0."""
    weight = _class_weight(module, weight)
    if weight is not None and not bool((torch.isfinite(weight) & (weight >= 0)).all()):
        raise ValueError(f"weight must be finite and >= 0 (as MONAI's Dice losses), got {weight.tolist()}")
    return weight


@torch.no_grad()
def _all_reduce_sums(sums):
    """The ``sync`` of the Dice family's distributed modules: the batch's (1, 4, C) sums summed over the
    ranks (on the device: no host sync), and the world size that scales the backward (DDP averages the
    gradients over the ranks; the global batch's gradient is their sum)."""
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return sums, dist.get_world_size()


class _DiceModule(CheckedOptions):
    """What the Dice family's modules share: the options of every loss of the family, and
    ``distributed``'s all-reduce of the sums (see :class:`DiceLoss`)."""

    def _call(self, loss, logits, target, confusion, **options):
        sync = _all_reduce_sums if self.distributed and dist_ready() else None
        return functional._dice_family(
            loss,
            logits,
            target,
            self.ignore_index,
            self.reduction,
            confusion,
            self.backend,
            self.validate,
            self.upsample,
            self.align_corners,
            sync,
            include_background=self.include_background,
            smooth_nr=self.smooth_nr,
            smooth_dr=self.smooth_dr,
            batch=self.batch,
            **options,
        )


_DICE_OPTIONS = {
    **LOSS_OPTIONS,
    "include_background": _flag("include_background"),
    "smooth_nr": _number("smooth_nr"),
    "smooth_dr": _number("smooth_dr"),
    "batch": _dice_batch,
    "distributed": _dice_distributed,
}


class DiceLoss(_DiceModule):
    """Soft Dice loss on softmax probabilities, as MONAI's ``DiceLoss(softmax=True, to_onehot_y=True, ...)``
    (:func:`fused_imbalance.functional.dice_loss`, the same options, MONAI's keyword names).

    ``weight`` ((C',) with C' = C, or C − 1 without background) is kept in the buffer ``weight``.

    ``distributed=True`` (with ``batch=True`` and ``torch.distributed`` initialised) all-reduces the
    per-class sums of the batch (3·C numbers, never the logits) between the pass over the logits and the
    loss: every rank returns the Dice loss of the whole global batch, and its backward is scaled by the
    world size, so that after DDP averages the gradients over the ranks they are those of one process
    training on the global batch, whatever the ranks' batch sizes. ``forward`` is then a collective:
    every rank must call it. With ``batch=False`` each image's loss needs nothing from the other ranks
    (``distributed=True`` is then a ValueError): DDP's averaging equals one process on the global batch
    when every rank has as many images.
    """

    OPTIONS = {
        **_DICE_OPTIONS,
        "squared_pred": _flag("squared_pred"),
        "jaccard": _flag("jaccard"),
        "weight": _dice_class_weight,
    }

    def __init__(
        self,
        weight=None,
        include_background=True,
        squared_pred=False,
        jaccard=False,
        smooth_nr=1e-5,
        smooth_dr=1e-5,
        batch=False,
        ignore_index=-100,
        reduction="mean",
        distributed=False,
        backend=None,
        *,
        validate=True,
        upsample=None,
        align_corners=False,
    ):
        super().__init__()
        self.register_buffer("weight", None)
        _set_options(
            self,
            upsample=upsample,
            align_corners=align_corners,
            ignore_index=ignore_index,
            reduction=reduction,
            include_background=include_background,
            squared_pred=squared_pred,
            jaccard=jaccard,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            distributed=distributed,
            backend=backend,
            validate=validate,
            weight=weight,
        )

    def extra_repr(self):
        return (
            f"include_background={self.include_background}, squared_pred={self.squared_pred}, "
            f"jaccard={self.jaccard}, batch={self.batch}, reduction={self.reduction!r}, "
            f"distributed={self.distributed}"
        )

    def forward(self, logits, target, confusion=None):
        return self._call(
            "dice",
            logits,
            target,
            confusion,
            weight=self.weight,
            squared_pred=self.squared_pred,
            jaccard=self.jaccard,
        )


class GeneralizedDiceLoss(_DiceModule):
    """Generalized Dice loss, as MONAI's ``GeneralizedDiceLoss(softmax=True, to_onehot_y=True, ...)``
    (:func:`fused_imbalance.functional.generalized_dice_loss`); ``distributed`` as in :class:`DiceLoss`."""

    OPTIONS = {**_DICE_OPTIONS, "w_type": _w_type}

    def __init__(
        self,
        w_type="square",
        include_background=True,
        smooth_nr=1e-5,
        smooth_dr=1e-5,
        batch=False,
        ignore_index=-100,
        reduction="mean",
        distributed=False,
        backend=None,
        *,
        validate=True,
        upsample=None,
        align_corners=False,
    ):
        super().__init__()
        _set_options(
            self,
            upsample=upsample,
            align_corners=align_corners,
            ignore_index=ignore_index,
            reduction=reduction,
            w_type=w_type,
            include_background=include_background,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            distributed=distributed,
            backend=backend,
            validate=validate,
        )

    def extra_repr(self):
        return (
            f"w_type={self.w_type!r}, include_background={self.include_background}, batch={self.batch}, "
            f"reduction={self.reduction!r}, distributed={self.distributed}"
        )

    def forward(self, logits, target, confusion=None):
        return self._call("generalized_dice", logits, target, confusion, w_type=self.w_type)


class TverskyLoss(_DiceModule):
    """Tversky loss (focal Tversky with ``gamma`` != 1), as MONAI's ``TverskyLoss(softmax=True,
    to_onehot_y=True, ...)`` at γ = 1 (:func:`fused_imbalance.functional.tversky_loss`); ``distributed``
    as in :class:`DiceLoss`."""

    OPTIONS = {
        **_DICE_OPTIONS,
        "alpha": _number("alpha"),
        "beta": _number("beta"),
        "gamma": _number("gamma", positive=True),
    }

    def __init__(
        self,
        alpha=0.5,
        beta=0.5,
        gamma=1.0,
        include_background=True,
        smooth_nr=1e-5,
        smooth_dr=1e-5,
        batch=False,
        ignore_index=-100,
        reduction="mean",
        distributed=False,
        backend=None,
        *,
        validate=True,
        upsample=None,
        align_corners=False,
    ):
        super().__init__()
        _set_options(
            self,
            upsample=upsample,
            align_corners=align_corners,
            ignore_index=ignore_index,
            reduction=reduction,
            alpha=alpha,
            beta=beta,
            gamma=gamma,
            include_background=include_background,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            distributed=distributed,
            backend=backend,
            validate=validate,
        )

    def extra_repr(self):
        return (
            f"alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, batch={self.batch}, "
            f"reduction={self.reduction!r}, distributed={self.distributed}"
        )

    def forward(self, logits, target, confusion=None):
        return self._call(
            "tversky", logits, target, confusion, alpha=self.alpha, beta=self.beta, gamma=self.gamma
        )


def _dice_ce_reduction(module, value):
    if value == "none":
        raise ValueError("DiceCELoss takes reduction 'mean' or 'sum' (as MONAI's DiceCELoss)")
    check_options(reduction=value)
    return value


class DiceCELoss(_DiceModule):
    """λ_ce · cross-entropy + λ_dice · Dice from one pass, as MONAI's ``DiceCELoss(softmax=True,
    to_onehot_y=True, ...)`` (:func:`fused_imbalance.functional.dice_ce_loss`). ``weight`` (C,) weighs
    both terms (the Dice term ``weight[1:]`` without background), kept in the buffer ``weight``.
    ``distributed`` as in :class:`DiceLoss`: the cross-entropy's sums are all-reduced with the Dice
    sums, so the loss and, after DDP's averaging, the gradient are the global batch's."""

    OPTIONS = {
        **_DICE_OPTIONS,
        "squared_pred": _flag("squared_pred"),
        "jaccard": _flag("jaccard"),
        "lambda_dice": _number("lambda_dice"),
        "lambda_ce": _number("lambda_ce"),
        "weight": _dice_class_weight,
        "reduction": _dice_ce_reduction,
    }

    def __init__(
        self,
        lambda_dice=1.0,
        lambda_ce=1.0,
        weight=None,
        include_background=True,
        squared_pred=False,
        jaccard=False,
        smooth_nr=1e-5,
        smooth_dr=1e-5,
        batch=False,
        ignore_index=-100,
        reduction="mean",
        distributed=False,
        backend=None,
        *,
        validate=True,
        upsample=None,
        align_corners=False,
    ):
        super().__init__()
        self.register_buffer("weight", None)
        _set_options(
            self,
            upsample=upsample,
            align_corners=align_corners,
            ignore_index=ignore_index,
            reduction=reduction,
            lambda_dice=lambda_dice,
            lambda_ce=lambda_ce,
            include_background=include_background,
            squared_pred=squared_pred,
            jaccard=jaccard,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            distributed=distributed,
            backend=backend,
            validate=validate,
            weight=weight,
        )

    def extra_repr(self):
        return (
            f"lambda_dice={self.lambda_dice}, lambda_ce={self.lambda_ce}, include_background="
            f"{self.include_background}, batch={self.batch}, reduction={self.reduction!r}, "
            f"distributed={self.distributed}"
        )

    def forward(self, logits, target, confusion=None):
        return self._call(
            "dice_ce",
            logits,
            target,
            confusion,
            weight=self.weight,
            lambda_dice=self.lambda_dice,
            lambda_ce=self.lambda_ce,
            squared_pred=self.squared_pred,
            jaccard=self.jaccard,
        )
