"""fused_imbalance: fused class-imbalance losses for large dense predictions.

Losses (``functional``), their modules, class-weighting schemes (``weights``) and a confusion
matrix metric; fused Triton (CUDA) and C++ (CPU) kernels with an eager reference.
"""
from . import functional, reference, weights
from .functional import (cdb_loss, class_balanced_loss, confusion_matrix, cross_entropy, focal_loss,
                         mse_outlying_loss, recall_loss, sigmoid_focal_loss)

__version__ = "0.1.0"

__all__ = ["functional", "reference", "weights", "cross_entropy", "focal_loss", "sigmoid_focal_loss",
           "class_balanced_loss", "recall_loss", "cdb_loss", "mse_outlying_loss", "confusion_matrix"]

try:  # the modules and the metric are thin shells over functional
    from .losses import CDBLoss, ClassBalancedLoss, FocalLoss, OutlyingMSELoss, RecallLoss  # noqa: F401
    from .metrics import ConfusionMatrix  # noqa: F401
    __all__ += ["FocalLoss", "ClassBalancedLoss", "RecallLoss", "CDBLoss", "OutlyingMSELoss", "ConfusionMatrix"]
except ImportError:  # pragma: no cover
    pass
