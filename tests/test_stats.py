"""aace.stats against values computed another way: SciPy's own tests, hand-worked examples, and
the noncentral t distribution for the detectable difference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from aace import stats

A = [0.912, 0.905, 0.921, 0.899, 0.915, 0.908]
B = [0.903, 0.901, 0.910, 0.897, 0.904, 0.906]


def test_paired_difference_is_scipys_paired_t_test():
    comparison = stats.paired_difference(A, B)
    differences = np.subtract(A, B)
    assert comparison.difference == pytest.approx(differences.mean())
    assert comparison.p == pytest.approx(scipy_stats.ttest_rel(A, B).pvalue)
    half = scipy_stats.t.ppf(0.975, 5) * differences.std(ddof=1) / math.sqrt(6)
    assert (comparison.low, comparison.high) == pytest.approx(
        (differences.mean() - half, differences.mean() + half)
    )
    assert comparison.n == 6


def test_paired_difference_of_a_constant_shift_is_a_zero_width_interval():
    base = [0.5, 0.25, 0.75, 0.125]  # dyadic: every sum and difference below is exact
    comparison = stats.paired_difference([x + 0.25 for x in base], base)
    assert (comparison.difference, comparison.low, comparison.high) == (0.25, 0.25, 0.25)
    assert comparison.p == 0.0 and comparison.sd == 0.0
    assert math.isnan(stats.paired_difference(list(B), list(B)).p)  # no difference at all
    assert math.isnan(stats.paired_difference([0.5], [0.25]).low)  # one seed: no interval


def test_paired_difference_refuses_unequal_lists():
    with pytest.raises(ValueError, match="got 2 and 3 values"):
        stats.paired_difference([0.1, 0.2], [0.1, 0.2, 0.3])


def test_holm_by_hand():
    # Sorted: 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> running max 0.06).
    assert stats.holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    adjusted = stats.holm([math.nan, 0.02])
    assert math.isnan(adjusted[0]) and adjusted[1] == pytest.approx(0.02)


def test_tost_is_two_one_sided_scipy_tests():
    margin = 0.01
    differences = np.subtract(A, B)
    lower = scipy_stats.ttest_1samp(differences, -margin, alternative="greater").pvalue
    upper = scipy_stats.ttest_1samp(differences, margin, alternative="less").pvalue
    assert stats.tost_paired(A, B, margin) == pytest.approx(max(lower, upper))
    # Identical results are equivalent at any margin; a 5 pp gap is not within 1 pp.
    assert stats.tost_paired(A, A, margin) == 0.0
    assert stats.tost_paired([a + 0.05 for a in B], B, margin) > 0.5
    with pytest.raises(ValueError, match="margin: got 0"):
        stats.tost_paired(A, B, 0)


def test_detectable_difference_has_the_stated_power():
    """At the returned difference, the paired t-test's power (noncentral t) is about 0.8."""
    sd, n = 0.01, 8
    d = stats.detectable_difference(sd, n)
    critical = scipy_stats.t.ppf(0.975, n - 1)
    noncentrality = d / (sd / math.sqrt(n))
    power = scipy_stats.nct.sf(critical, n - 1, noncentrality) + scipy_stats.nct.cdf(
        -critical, n - 1, noncentrality
    )
    assert power == pytest.approx(0.8, abs=0.03)
    assert math.isnan(stats.detectable_difference(sd, 1))


def test_confidence_interval_and_welch():
    low, high = stats.confidence_interval([1.0, 2.0, 3.0])
    half = scipy_stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
    assert (low, high) == pytest.approx((2 - half, 2 + half))
    difference, p = stats.welch_test(A, B)
    assert p == pytest.approx(scipy_stats.ttest_ind(A, B, equal_var=False).pvalue)
    assert difference == pytest.approx(np.mean(A) - np.mean(B))


def test_mean_sd_text_never_claims_zero_spread_for_one_value():
    assert stats.mean_sd_text([0.5]) == "50.00 (n = 1)"
    assert stats.mean_sd_text([0.5, 0.7]) == f"60.00 ± {100 * np.std([0.5, 0.7], ddof=1):.2f}"
    assert stats.mean_sd_text([]) == "–"
