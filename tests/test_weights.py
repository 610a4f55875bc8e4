"""Class-weighting schemes of ``fused_imbalance.weights`` against values worked by hand."""

import collections
import math

import pytest
import torch
from tolerances import TOL

from fused_imbalance import weights

F32 = TOL[torch.float32]


def close(actual, expected):
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), **F32)


# ---------------------------------------------------------------- effective number


def test_effective_number_by_hand():
    # counts [1, 10, 100], beta = 0.9, raw w_c = (1 - beta) / (1 - beta^n_c):
    #   n = 1:   0.1 / (1 - 0.9)                  = 1
    #   n = 10:  0.1 / (1 - 0.3486784401)         = 0.1 / 0.6513215599      = 0.15353399327876294
    #   n = 100: 0.1 / (1 - 2.6561398887587e-5)  = 0.1 / 0.99997343860111 = 0.10000265621044142
    # sum = 1.2535366494892044, rescaled by 3 / sum:
    close(
        weights.effective_number([1, 10, 100], beta=0.9),
        [2.393228790895305, 0.3674419730958617, 0.23932923600883357],
    )


def test_effective_number_sums_to_c_and_accepts_tensors():
    counts = torch.tensor([3, 1000, 7, 0, 42])
    w = weights.effective_number(counts, beta=0.999)
    assert w.shape == (5,)
    torch.testing.assert_close(w.sum(), torch.tensor(5.0), **F32)
    # the fewer samples, the larger the weight
    assert w[1] < w[4] < w[2] < w[0]


def test_effective_number_beta_zero_is_ones():
    close(weights.effective_number([1, 10, 100, 0], beta=0.0), [1.0, 1.0, 1.0, 1.0])


def test_effective_number_zero_count_gets_largest_other_weight():
    # counts [0, 10, 100], beta = 0.9: raw [w10, w10, w100] with the absent class given the
    # largest present weight w10 = 0.15353399327876294; w100 = 0.10000265621044142;
    # sum = 0.40707064276796734, rescaled by 3 / sum:
    close(
        weights.effective_number([0, 10, 100], beta=0.9),
        [1.1315038016603784, 1.1315038016603784, 0.7369923966792432],
    )


def test_effective_number_beta_near_one_is_finite():
    # 1 - beta^n loses every digit in float32 here; the weights must still be finite and
    # close to inverse frequency (beta -> 1).
    w = weights.effective_number([1, 2, 4], beta=1 - 1e-9)
    assert torch.isfinite(w).all()
    close(w, [12 / 7, 6 / 7, 3 / 7])


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5])
def test_effective_number_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        weights.effective_number([1, 2], beta=beta)


# ---------------------------------------------------------------- inverse / median frequency


def test_inverse_frequency_by_hand():
    # 1/2, 1/4, 1/8 sum to 7/8; rescaled by 3 / (7/8) = 24/7: [12/7, 6/7, 3/7]
    close(weights.inverse_frequency([2, 4, 8]), [12 / 7, 6 / 7, 3 / 7])


def test_inverse_frequency_zero_count():
    # raw 1/2, 1/2 (absent: the largest other), 1/8; sum 9/8, scale 3 / (9/8) = 8/3
    close(weights.inverse_frequency([2, 0, 8]), [4 / 3, 4 / 3, 1 / 3])


def test_median_frequency_by_hand():
    # f = [0.1, 0.3, 0.6], median 0.3: [3, 1, 0.5]
    close(weights.median_frequency([10, 30, 60]), [3.0, 1.0, 0.5])
    # even number of classes: the lower middle value (torch.median); f = [.1, .2, .3, .4],
    # median 0.2: [2, 1, 2/3, 1/2]
    close(weights.median_frequency([10, 20, 30, 40]), [2.0, 1.0, 2 / 3, 0.5])


def test_median_frequency_zero_count():
    # the median is over the classes that occur: f = [0.1, -, 0.3, 0.6], median 0.3;
    # the absent class gets the largest other weight, 3
    close(weights.median_frequency([10, 0, 30, 60]), [3.0, 3.0, 1.0, 0.5])


# ---------------------------------------------------------------- outlying labels


def test_outlying_labels_ties_are_stable():
    # descending by count, stable: class 1 (9) -> rank 0, class 0 (5) -> 1, class 2 (5) -> 2,
    # class 3 (1) -> 3; alpha * (rank + 1) with alpha = 0.5
    close(weights.outlying_labels([5, 9, 5, 1], alpha=0.5), [1.0, 0.5, 1.5, 2.0])


def test_outlying_labels_default_alpha():
    close(weights.outlying_labels([100, 1, 10]), [1.0, 3.0, 2.0])


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_outlying_labels_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        weights.outlying_labels([1, 2], alpha=alpha)


# ---------------------------------------------------------------- CDB


def test_cdb_dynamic_tau_by_hand():
    # A = [0.9, 0.5, 0.2]: b = 0.9 / (0.2 + 1e-4) - 1 = 3.497751124437781,
    # tau = 2 / (1 + e^-b) = 1.9412474283241785, w = (1 - A)^tau:
    #   0.1^tau = 0.011448605002210895, 0.5^tau = 0.2603911952268825, 0.8^tau = 0.6484458071777144
    b = 0.9 / 0.2001 - 1
    tau = 2 / (1 + math.exp(-b))
    assert abs(tau - 1.9412474283241785) < 1e-12
    close(weights.cdb([0.9, 0.5, 0.2]), [0.011448605002210895, 0.2603911952268825, 0.6484458071777144])


def test_cdb_fixed_tau():
    # tau = 2: (1 - A)^2 = [0.01, 0.25, 0.64]; tau = 0: all ones (0^0 = 1)
    close(weights.cdb(torch.tensor([0.9, 0.5, 0.2]), tau=2.0), [0.01, 0.25, 0.64])
    close(weights.cdb([1.0, 0.5, 0.0], tau=0), [1.0, 1.0, 1.0])


def test_cdb_perfect_and_zero_accuracy():
    # A = [1, 0]: b = 1 / 1e-4 - 1 = 9999, tau = 2 (to double precision): w = [0, 1]
    close(weights.cdb([1.0, 0.0]), [0.0, 1.0])
    # every class at 0: b = -1, tau = 2 / (1 + e) and w = 1^tau = 1
    close(weights.cdb([0.0, 0.0, 0.0]), [1.0, 1.0, 1.0])


@pytest.mark.parametrize("acc", [[0.5, 1.5], [-0.1, 0.5], [0.5, float("nan")], [], [[0.5]]])
def test_cdb_bad_accuracy(acc):
    with pytest.raises(ValueError, match="class_accuracy"):
        weights.cdb(torch.tensor(acc))


@pytest.mark.parametrize("tau", ["fixed", -1.0, float("nan")])
def test_cdb_bad_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        weights.cdb([0.5, 0.2], tau=tau)


# ---------------------------------------------------------------- count validation

SCHEMES = [
    lambda c: weights.effective_number(c, 0.99),
    weights.inverse_frequency,
    weights.median_frequency,
    lambda c: weights.outlying_labels(c, 1.0),
]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(
    "counts, match",
    [
        ([3, -1, 2], "non-negative"),
        ([], "non-empty"),
        (torch.zeros(2, 2), "non-empty"),
        ([1.0, float("nan")], "finite"),
        ([1.0, float("inf")], "finite"),
        ([0, 0, 0], "all zeros"),
    ],
)
def test_bad_counts(scheme, counts, match):
    with pytest.raises(ValueError, match=match):
        scheme(counts)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_output_is_float32_c_and_finite(scheme):
    w = scheme(torch.tensor([0, 5, 1, 0, 1000], dtype=torch.int64))
    assert w.dtype == torch.float32 and w.shape == (5,)
    assert torch.isfinite(w).all() and (w > 0).all()


# ---------------------------------------------------------------- per-class values as a mapping

MAPPED = [  # every function of the module that takes per-class values
    lambda c: weights.effective_number(c, 0.99),
    weights.inverse_frequency,
    weights.median_frequency,
    lambda c: weights.outlying_labels(c, 1.0),
    lambda c: weights.cdb(
        {k: v / 1000 for k, v in c.items()} if isinstance(c, dict) else [v / 1000 for v in c]
    ),
]


@pytest.mark.parametrize("scheme", MAPPED)
def test_a_mapping_is_read_in_class_order(scheme):
    """{class: count}, e.g. a Counter of the labels, gives the weights of the counts in class order,
    whatever the order of its keys: never those of its keys."""
    labels = [2] * 3 + [0] * 500 + [1] * 20  # first seen: class 2, then 0, then 1
    expected = scheme([500, 20, 3])
    torch.testing.assert_close(scheme({0: 500, 1: 20, 2: 3}), expected, rtol=0, atol=0)
    torch.testing.assert_close(scheme(dict(collections.Counter(labels))), expected, rtol=0, atol=0)


def test_a_counter_gives_the_rarest_class_the_largest_weight():
    w = weights.effective_number(collections.Counter([0] * 500 + [1] * 20 + [2] * 3), beta=0.999)
    assert w[2] > w[1] > w[0]
    close(
        weights.outlying_labels(collections.Counter([0] * 5 + [1] * 9 + [2] * 5 + [3])), [2.0, 1.0, 3.0, 4.0]
    )


@pytest.mark.parametrize(
    "counts, match",
    [
        ({0: 5, 2: 7}, "without class 1.*range\\(num_classes\\)"),  # a class in between is missing
        ({1: 5, 2: 7}, "without class 0"),
        ({0: 5, "1": 7}, "int keys"),
        ({0: 5, True: 7}, "int keys"),
        ({0: 5, 1: 7}.values(), "class order"),
        ({5, 7}, "class order"),
        (collections.Counter(torch.tensor([0, 1, 1])), "bincount"),  # 0-d tensors as keys
    ],
)
@pytest.mark.parametrize("scheme", MAPPED[:4])
def test_a_mapping_without_class_order_is_a_type_error(scheme, counts, match):
    with pytest.raises(TypeError, match="samples_per_class.*" + match):
        scheme(counts)
