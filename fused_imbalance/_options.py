"""The options of the loss modules and of the metric, checked whenever they are set.

A module reads its options (``gamma``, ``reduction``, ``ignore_index``, ``backend``, ...) at every
call, so one set after construction takes effect at the next call. Each is checked by the same
function when the constructor sets it and when it is set later, so a bad value is an error where
it is set, never a wrong number or a late error in a training step. An option that a buffer is
derived from updates that buffer (``ClassBalancedLoss.beta`` recomputes ``weight``). What cannot
change without rebuilding the module's state raises an ``AttributeError`` that says what to do
instead: ``num_classes`` (the size of the buffers) and the buffers that the module derives itself
(``ClassBalancedLoss.weight``, ``CDBLoss.weight``, ``ConfusionMatrix.matrix``, ...). Those buffers
still move with ``.to()`` and load with ``load_state_dict()``, which do not assign attributes.
"""

from torch import nn

from . import functional
from ._checks import check_gamma, check_options
from ._upsample import check_options as check_upsample


class CheckedOptions(nn.Module):
    """An ``nn.Module`` whose attributes named in ``OPTIONS`` go through their check whenever they
    are set (``OPTIONS[name](module, value)`` returns the value to store or raises), and whose
    attributes named in ``FIXED`` cannot be set once they exist (``FIXED[name]``: what to do
    instead)."""

    OPTIONS = {}
    FIXED = {}

    def __setattr__(self, name, value):
        check = self.OPTIONS.get(name)
        if check is not None:
            value = check(self, value)
        elif (
            name in self.FIXED and self._holds(name) and value is not getattr(self, name)
        ):  # `+=` is in place
            raise AttributeError(
                f"{type(self).__name__}.{name} cannot be set after construction: {self.FIXED[name]}"
            )
        super().__setattr__(name, value)

    def _holds(self, name):
        return name in self.__dict__ or name in self.__dict__.get("_buffers", ())


def _gamma(module, value):
    return check_gamma(value)


def _ignore_index(module, value):
    return check_options(ignore_index=value)  # a Python int, from a numpy integer too


def _reduction(module, value):
    check_options(reduction=value)
    return value


def _backend(module, value):
    if value is not None and value not in functional.BACKENDS:
        raise ValueError(
            f"backend must be None (the environment variable FUSED_IMBALANCE_BACKEND, else 'auto') "
            f"or one of {functional.BACKENDS}, got {value!r}"
        )
    return value


def _validate(module, value):
    if not isinstance(value, bool):
        raise TypeError(f"validate must be True or False, got {value!r}")
    return value


# The pair is checked together: set align_corners=False before upsample=None or "nearest".
def _upsample(module, value):
    check_upsample(value, module.__dict__.get("align_corners", False))
    return value


def _align_corners(module, value):
    check_upsample(module.__dict__.get("upsample"), value)
    return value


# The options every loss module has, and those of upsample=.
LOSS_OPTIONS = {
    "ignore_index": _ignore_index,
    "reduction": _reduction,
    "backend": _backend,
    "validate": _validate,
    "upsample": _upsample,
    "align_corners": _align_corners,
}
GAMMA = {"gamma": _gamma}
METRIC_OPTIONS = {"ignore_index": _ignore_index, "backend": _backend}
NUM_CLASSES = {"num_classes": "the buffers are sized by it; build a new module"}
