"""Accuracy statistics: Wilson intervals, Tango's paired score interval and test, Holm's procedure."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq, minimize_scalar
from scipy.stats import norm

from tasks.statistics import (drop_lower_bound, drop_upper_bound, holm_levels, non_inferiority_p, paired_comparison,
                              wilson_interval)


def pairs(n: int, lost: int, gained: int) -> tuple[np.ndarray, np.ndarray]:
    """Correctness vectors of a reference and a candidate with the given discordant counts."""
    reference = np.ones(n, bool)
    reference[lost:lost + gained] = False
    candidate = reference.copy()
    candidate[:lost] = False
    candidate[lost:lost + gained] = True
    return reference, candidate


def reference_score(lost: int, gained: int, n: int, drop: float) -> float:
    """Tango's statistic with the constrained MLE found numerically (not by the closed form under test)."""
    low, high = max(0.0, -drop), (1 - drop) / 2

    def negative_log_likelihood(q: float) -> float:
        cells = ((lost, q + drop), (gained, q), (n - lost - gained, 1 - 2 * q - drop))
        return -sum(k * math.log(p) for k, p in cells if k)

    q = minimize_scalar(negative_log_likelihood, bounds=(low + 1e-15, high - 1e-15), method="bounded",
                        options={"xatol": 1e-14}).x
    return (lost - gained - n * drop) / math.sqrt(n * (2 * q + drop * (1 - drop)))


def reference_upper_bound(lost: int, gained: int, n: int, alpha: float) -> float:
    z = norm.isf(alpha)
    return brentq(lambda d: reference_score(lost, gained, n, d) + z, (lost - gained) / n, 1 - 1e-9, xtol=1e-12)


def reference_lower_bound(lost: int, gained: int, n: int, alpha: float) -> float:
    z = norm.isf(alpha)
    return brentq(lambda d: reference_score(lost, gained, n, d) - z, -1 + 1e-9, (lost - gained) / n, xtol=1e-12)


def test_wilson_interval_matches_known_values():
    low, high = wilson_interval(95, 100)
    assert low == pytest.approx(0.8883, abs=1e-4) and high == pytest.approx(0.9785, abs=1e-4)
    low, high = wilson_interval(100, 100)
    assert high == pytest.approx(1.0) and low == pytest.approx(0.9630, abs=1e-4)


@pytest.mark.parametrize("lost, gained, n", [(14, 2, 450), (12, 2, 450), (5, 0, 450), (6, 3, 450), (40, 20, 160),
                                             (1, 7, 21), (3, 30, 200)])
def test_tango_interval_matches_an_independent_inversion_of_the_score_test(lost, gained, n):
    for alpha in (0.025, 0.05 / 7):
        assert drop_upper_bound(lost, gained, n, alpha) == pytest.approx(reference_upper_bound(lost, gained, n, alpha),
                                                                         abs=1e-7)
        assert drop_lower_bound(lost, gained, n, alpha) == pytest.approx(reference_lower_bound(lost, gained, n, alpha),
                                                                         abs=1e-7)


def test_no_discordant_pairs_gives_the_closed_form_bound():
    # With no disagreements the score equation solves to z^2 / (n + z^2).
    z = norm.isf(0.05)
    assert drop_upper_bound(0, 0, 269, 0.05) == pytest.approx(z**2 / (269 + z**2), rel=1e-9)
    assert paired_comparison(*pairs(100, 0, 0))["p_value"] == 1.0


def test_five_lost_none_gained_interval_and_p_value_agree():
    # The old Wald interval said [-2.08, -0.14] (a real drop) while the exact McNemar p said 0.0625 (noise).
    result = paired_comparison(*pairs(450, 5, 0))
    assert (result["lost"], result["gained"], result["samples"]) == (5, 0, 450)
    assert result["accuracy_change_points"] == pytest.approx(-100 * 5 / 450)
    assert result["p_value"] == pytest.approx(2 * norm.sf(math.sqrt(5)))  # McNemar's (b - c) / sqrt(b + c) = sqrt(5)
    assert result["p_value"] == pytest.approx(0.0253, abs=1e-4)
    assert result["distinguishable"] is True and result["ci95_points"][1] < 0
    low, high = result["ci95_points"]
    assert low == pytest.approx(-100 * reference_upper_bound(5, 0, 450, 0.025), abs=1e-5)
    assert high == pytest.approx(-100 * reference_lower_bound(5, 0, 450, 0.025), abs=1e-5)


def test_paired_comparison_counts_discordant_pairs():
    reference = np.array([True] * 90 + [False] * 10)
    candidate = reference.copy()
    candidate[:12] = False  # loses 12 the reference got right
    candidate[95:] = True  # gains 5 the reference got wrong
    result = paired_comparison(reference, candidate)
    assert (result["lost"], result["gained"]) == (12, 5)
    assert result["accuracy_change_points"] == pytest.approx(-7.0)
    assert result["p_value"] == pytest.approx(2 * norm.sf(7 / math.sqrt(17)))
    assert result["distinguishable"] is False and result["ci95_points"][0] < 0 < result["ci95_points"][1]


def test_interval_and_tests_never_contradict_each_other():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(20, 2000))
        lost, gained = (int(k) for k in rng.multinomial(n, [0.04, 0.02, 0.94])[:2])
        result = paired_comparison(*pairs(n, lost, gained))
        low, high = result["ci95_points"]
        assert result["distinguishable"] == (not low <= 0 <= high)
        margin, alpha = float(rng.uniform(0, 0.1)), float(rng.uniform(0.001, 0.1))
        assert (non_inferiority_p(lost, gained, n, margin) < alpha) == (drop_upper_bound(lost, gained, n, alpha) < margin)


def test_holm_steps_down_and_decides_the_rest_at_the_level_it_stopped():
    levels = holm_levels({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}, alpha=0.05)
    assert levels["d"] == (pytest.approx(0.05 / 4), True)
    assert levels["a"] == (pytest.approx(0.05 / 3), True)
    assert levels["c"] == (pytest.approx(0.05 / 2), False)  # 0.03 >= 0.025: stops here
    assert levels["b"] == (pytest.approx(0.05 / 2), False)  # 0.04 < 0.05 alone, but Holm stopped before it
    assert list(levels) == ["a", "b", "c", "d"]
    assert holm_levels({"only": 0.049}, 0.05) == {"only": (0.05, True)}


def test_macro_f1_interval_brackets_sklearns_macro_f1_and_narrows_with_more_samples():
    from sklearn.metrics import f1_score

    from tasks.statistics import macro_f1_interval

    rng = np.random.default_rng(1)
    widths = []
    for n in (500, 5000):
        truth = rng.choice(5, n, p=[0.5, 0.3, 0.1, 0.07, 0.03])  # imbalanced, as text labels are
        predicted = np.where(rng.random(n) < 0.7, truth, rng.integers(0, 5, n))
        low, high = macro_f1_interval(truth, predicted, 5)
        assert low < f1_score(truth, predicted, average="macro") < high
        widths.append(high - low)
    assert widths[1] < 0.5 * widths[0]
    assert macro_f1_interval(truth, truth, 5) == (1.0, 1.0)
