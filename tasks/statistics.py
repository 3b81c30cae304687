"""Statistics of accuracy on a test set: single proportions and paired differences.

A candidate and its reference are judged on the same test examples, so their accuracy
difference depends only on the discordant pairs: `lost` (reference right, candidate
wrong) and `gained` (the opposite). Intervals and tests for that difference come from
one score statistic (Tango 1998, "Equivalence test and confidence interval for the
difference in proportions for the paired-sample design", Stat Med 17:891-908): the
interval is the set of differences the score test does not reject, so an interval and
the p-value printed beside it can never disagree. At a difference of 0 the statistic
is McNemar's (b - c) / sqrt(b + c).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm

Z95 = float(norm.isf(0.025))


def wilson_interval(correct: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion."""
    p = correct / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return centre - half, centre + half


def macro_f1_interval(truth: np.ndarray, predicted: np.ndarray, n_classes: int, resamples: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the macro-F1 (test samples resampled with replacement). Each
    resample averages F1 over the classes it has in its truth or its predictions, as sklearn's macro-F1
    does; macro-F1 has no closed-form interval, and rare classes make it far noisier than accuracy."""
    n = len(truth)
    rows = np.random.default_rng(seed).integers(0, n, (resamples, n))
    offsets = (np.arange(resamples) * n_classes)[:, None]
    t, p = truth[rows] + offsets, predicted[rows] + offsets
    size = resamples * n_classes
    true_positives = np.bincount(t.ravel(), weights=(t == p).ravel(), minlength=size).reshape(resamples, -1)
    # 2 TP + FP + FN = (samples of the class) + (predictions of the class)
    denominator = (np.bincount(t.ravel(), minlength=size) + np.bincount(p.ravel(), minlength=size)
                   ).reshape(resamples, -1)
    present = denominator > 0
    f1 = np.where(present, 2 * true_positives / np.maximum(denominator, 1), 0.0)
    low, high = np.percentile(f1.sum(axis=1) / present.sum(axis=1), [2.5, 97.5])
    return float(low), float(high)


def drop_score(lost: int, gained: int, n: int, drop: float) -> float:
    """Tango's score statistic for H0: accuracy drop (reference minus candidate, a fraction) = `drop`.

    The variance is evaluated at the maximum-likelihood discordant probabilities under H0
    (closed form: the positive root of 2n q^2 + B q + C = 0, q the probability of a gain).
    Decreasing in `drop`: negative when the observed drop is smaller than `drop`.
    """
    a = 2 * n
    b = -lost - gained + (2 * n - lost + gained) * drop
    c = -gained * drop * (1 - drop)
    root = math.sqrt(max(b * b - 4 * a * c, 0.0))
    # The two algebraically equal forms of the positive root; each avoids cancellation on its side.
    q_gain = (root - b) / (2 * a) if b <= 0 else -2 * c / (b + root)
    variance = n * (2 * q_gain + drop * (1 - drop))
    numerator = lost - gained - n * drop
    if variance <= 0:  # a boundary (no discordant pairs, or drop = ±1): the data either match H0 or refute it
        return 0.0 if numerator == 0 else math.copysign(math.inf, numerator)
    return numerator / math.sqrt(variance)


def _solve(lost: int, gained: int, n: int, target: float, low: float, high: float) -> float:
    """The drop in [low, high] where the (decreasing) score equals `target`, by bisection."""
    if drop_score(lost, gained, n, high) >= target:
        return high
    if drop_score(lost, gained, n, low) <= target:
        return low
    for _ in range(200):
        middle = (low + high) / 2
        if drop_score(lost, gained, n, middle) > target:
            low = middle
        else:
            high = middle
        if high - low < 1e-13:
            break
    return (low + high) / 2


def drop_upper_bound(lost: int, gained: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) upper confidence bound of the accuracy drop (a fraction), Tango score."""
    return _solve(lost, gained, n, -float(norm.isf(alpha)), (lost - gained) / n, 1.0)


def drop_lower_bound(lost: int, gained: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) lower confidence bound of the accuracy drop (a fraction), Tango score."""
    return _solve(lost, gained, n, float(norm.isf(alpha)), -1.0, (lost - gained) / n)


def non_inferiority_p(lost: int, gained: int, n: int, margin: float) -> float:
    """One-sided score-test p-value of H0: drop >= margin (a fraction) against H1: drop < margin.

    p < alpha exactly when drop_upper_bound(..., alpha) < margin.
    """
    return float(norm.cdf(drop_score(lost, gained, n, margin)))


def paired_comparison(reference_correct: np.ndarray, candidate_correct: np.ndarray) -> dict:
    """Candidate minus reference on the same examples: change in points, its 95 % Tango score interval,
    the discordant counts and the two-sided score-test p-value at no change (McNemar without continuity
    correction). `distinguishable` is True exactly when the interval excludes 0."""
    reference_correct = np.asarray(reference_correct, bool)
    candidate_correct = np.asarray(candidate_correct, bool)
    n = len(reference_correct)
    lost = int(np.sum(reference_correct & ~candidate_correct))
    gained = int(np.sum(~reference_correct & candidate_correct))
    p_value = float(2 * norm.sf(abs(drop_score(lost, gained, n, 0.0))))
    return {
        "accuracy_change_points": 100 * (gained - lost) / n,
        # The change is minus the drop, so its bounds are the drop's bounds negated and swapped.
        "ci95_points": [-100 * drop_upper_bound(lost, gained, n, 0.025),
                        -100 * drop_lower_bound(lost, gained, n, 0.025)],
        "lost": lost,
        "gained": gained,
        "samples": n,
        "p_value": p_value,
        "distinguishable": bool(p_value < 0.05),
    }


def holm_levels(p_values: dict[str, float], alpha: float) -> dict[str, tuple[float, bool]]:
    """Holm's step-down procedure: per hypothesis, the level it is decided at and whether it is rejected.

    Sorted by p-value, the k-th of m is rejected at alpha / (m - k + 1) if every one before it was;
    the first one not rejected stops the procedure, and every later one is decided (not rejected) at
    that same level — so "rejected" is always "p-value < its level", and a confidence bound at the
    returned level agrees with the decision.
    """
    order = sorted(p_values, key=lambda name: p_values[name])
    m, decided, stopped_at = len(order), {}, None
    for k, name in enumerate(order):
        if stopped_at is None:
            level = alpha / (m - k)
            if p_values[name] >= level:
                stopped_at = level
            decided[name] = (level, p_values[name] < level)
        else:
            decided[name] = (stopped_at, False)
    return {name: decided[name] for name in p_values}
