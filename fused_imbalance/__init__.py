"""fused_imbalance: fused class-imbalance losses for large dense predictions.

Losses (``functional``), their modules, class-weighting schemes (``weights``) and a confusion
matrix metric; fused Triton (CUDA) and C++ (CPU) kernels with an eager reference.
"""

from . import functional, reference, weights
from ._deferred import check_deferred
from .functional import (
    cdb_loss,
    class_balanced_loss,
    confusion_matrix,
    cross_entropy,
    dice_ce_loss,
    dice_loss,
    focal_loss,
    generalized_dice_loss,
    mse_outlying_loss,
    ohem_cross_entropy,
    recall_loss,
    sigmoid_focal_loss,
    tversky_loss,
)
from .losses import (
    CDBLoss,
    ClassBalancedLoss,
    DiceCELoss,
    DiceLoss,
    FocalLoss,
    GeneralizedDiceLoss,
    OhemCrossEntropyLoss,
    OutlyingMSELoss,
    RecallLoss,
    TverskyLoss,
)
from .metrics import ConfusionMatrix

__version__ = "0.1.0"

__all__ = [
    "functional",
    "reference",
    "weights",
    "cross_entropy",
    "focal_loss",
    "sigmoid_focal_loss",
    "class_balanced_loss",
    "recall_loss",
    "cdb_loss",
    "mse_outlying_loss",
    "ohem_cross_entropy",
    "confusion_matrix",
    "FocalLoss",
    "ClassBalancedLoss",
    "RecallLoss",
    "CDBLoss",
    "OutlyingMSELoss",
    "OhemCrossEntropyLoss",
    "ConfusionMatrix",
    "check_deferred",
    "dice_loss",
    "generalized_dice_loss",
    "tversky_loss",
    "dice_ce_loss",
    "DiceLoss",
    "GeneralizedDiceLoss",
    "TverskyLoss",
    "DiceCELoss",
]
