"""Statistics of results over seeds: intervals, paired and unpaired tests, Holm's adjustment,
equivalence (TOST), the smallest detectable difference, and their text.

Everything takes plain lists of floats (accuracies in [0, 1], one per seed) and returns floats;
NaN where a quantity is undefined (fewer than two values, zero variance). The tests are
Student's t-tests from SciPy: with n = 5 to 10 seeds a normal approximation would be too
optimistic.

* :func:`confidence_interval`: mean ± t_{(1+level)/2, n-1} s / √n.
* :func:`welch_test`: unpaired difference of means with Welch's t-test (Welch 1947).
* :func:`paired_difference`: the mean of per-seed differences ``a_i - b_i`` with its t-interval
  and the two-sided paired t-test (runs that share a seed share data order and
  initialization, so the pairs remove that variance).
* :func:`holm`: Holm's step-down adjustment of m p-values (Holm 1979), which controls the
  family-wise error rate without assuming independence.
* :func:`tost_paired`: two one-sided paired t-tests of ``|mean(a - b)| < margin`` (Schuirmann
  1987): a small p says the two are equivalent within the margin; a large p says these runs
  cannot tell, not that they differ.
* :func:`detectable_difference`: the smallest true mean difference a two-sided paired t-test
  at level alpha detects with the given power, for the observed sd of the differences.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "PairedComparison",
    "confidence_interval",
    "detectable_difference",
    "holm",
    "mean_sd",
    "mean_sd_text",
    "paired_difference",
    "tost_paired",
    "welch_test",
]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); sd NaN below two values, NaN both when
    empty."""
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def mean_sd_text(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    """``"92.70 ± 1.10"`` (values times ``scale``); the mean alone for one value (no "± 0.00",
    which would claim a spread of zero); ``"–"`` for none."""
    if not values:
        return "–"
    mean, sd = mean_sd(values)
    if len(values) == 1:
        return f"{scale * mean:.{digits}f} (n = 1)"
    return f"{scale * mean:.{digits}f} ± {scale * sd:.{digits}f}"


def _t_quantile(q: float, df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(q, df))


def confidence_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean: mean ± t_{(1+level)/2, n-1} s / sqrt(n).
    NaN bounds for fewer than two values."""
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean, sd = mean_sd(values)
    half = _t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def welch_test(values: Sequence[float], baseline: Sequence[float]) -> tuple[float, float]:
    """Difference of means (values - baseline) and the two-sided p-value of Welch's t-test
    (unequal variances; Welch 1947). NaN p-value when either group has fewer than two values or
    both have zero variance."""
    from scipy import stats

    difference = statistics.fmean(values) - statistics.fmean(baseline)
    if len(values) < 2 or len(baseline) < 2:
        return difference, math.nan
    if statistics.stdev(values) == 0 and statistics.stdev(baseline) == 0:
        return difference, math.nan
    with warnings.catch_warnings():  # near-identical values: scipy warns, the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        return difference, float(stats.ttest_ind(values, baseline, equal_var=False).pvalue)


@dataclass(frozen=True)
class PairedComparison:
    """``a - b`` over pairs (one per seed): mean difference, its t-interval, the two-sided
    paired t-test's p-value, the sd of the differences and the number of pairs."""

    difference: float
    low: float
    high: float
    p: float
    sd: float
    n: int


def paired_difference(
    a: Sequence[float], b: Sequence[float], level: float = 0.95
) -> PairedComparison:
    """The paired comparison of ``a`` and ``b`` (``a[i]`` and ``b[i]`` from the same seed):
    the mean difference, its Student-t interval and the paired t-test's two-sided p. One seed
    gives NaN for the interval and p; differences that are all equal give a zero-width interval
    and p = 0 (NaN when they are all zero).

    Raises:
        ValueError: ``a`` and ``b`` differ in length or are empty.
    """
    if len(a) != len(b) or not a:
        raise ValueError(
            f"paired_difference: got {len(a)} and {len(b)} values; expected two equally long, "
            "non-empty lists (one value per seed in each)"
        )
    differences = [x - y for x, y in zip(a, b)]
    n = len(differences)
    mean, sd = mean_sd(differences)
    if n < 2:
        return PairedComparison(mean, math.nan, math.nan, math.nan, sd, n)
    if sd == 0:  # every seed differs by the same amount: a zero-width interval
        return PairedComparison(mean, mean, mean, math.nan if mean == 0 else 0.0, sd, n)
    low, high = confidence_interval(differences, level)
    from scipy import stats

    t = mean / (sd / math.sqrt(n))
    p = float(2 * stats.t.sf(abs(t), n - 1))
    return PairedComparison(mean, low, high, p, sd, n)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the k-th smallest of m is
    multiplied by (m - k + 1), running maxima keep the order, capped at 1. NaN values are left
    out of m and stay NaN."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(order)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for k, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - k) * p))
        adjusted[i] = running
    return adjusted


def tost_paired(a: Sequence[float], b: Sequence[float], margin: float) -> float:
    """p-value of the paired two one-sided tests (TOST) of equivalence within ``±margin``:
    the larger of the p-values of H0: mean(a - b) <= -margin and H0: mean(a - b) >= margin.
    ``p < alpha`` says ``a`` and ``b`` are equivalent within the margin (the 1 - 2 alpha
    interval of the difference lies inside it). NaN below two pairs.

    Raises:
        ValueError: ``margin`` is not positive, or the lists differ in length.
    """
    if not margin > 0:
        raise ValueError(f"margin: got {margin!r}; expected a number > 0")
    comparison = paired_difference(a, b)
    n, mean, sd = comparison.n, comparison.difference, comparison.sd
    if n < 2:
        return math.nan
    if sd == 0:
        return 0.0 if abs(mean) < margin else 1.0
    from scipy import stats

    se = sd / math.sqrt(n)
    p_lower = float(stats.t.sf((mean + margin) / se, n - 1))  # H0: mean <= -margin
    p_upper = float(stats.t.cdf((mean - margin) / se, n - 1))  # H0: mean >= +margin
    return max(p_lower, p_upper)


def detectable_difference(
    sd: float, n: int, alpha: float = 0.05, power: float = 0.8, tests: int = 1
) -> float:
    """The smallest true mean difference that a two-sided paired t-test at ``alpha /
    tests`` (Bonferroni's bound on Holm's first step) finds with probability ``power``:
    (t_{1-alpha/2, n-1} + t_{power, n-1}) · sd / √n (the usual approximation of the noncentral
    t). NaN below two pairs or for an undefined sd."""
    if n < 2 or math.isnan(sd):
        return math.nan
    level = alpha / tests
    return (_t_quantile(1 - level / 2, n - 1) + _t_quantile(power, n - 1)) * sd / math.sqrt(n)
