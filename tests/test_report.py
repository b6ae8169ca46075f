"""aace compare's statistics, checked against independent computations: the Student-t
quantile from tables, and Welch's p-value from its formula and a numerical integral of the t
density written out here."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from scipy import integrate

from aace.cli import main
from aace.report import compare_table, confidence_interval, percent_interval, welch_test


def _t_density(x: float, df: float) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def test_confidence_interval_uses_the_t_quantile_of_the_tables():
    values = [0.50, 0.53, 0.47]
    low, high = confidence_interval(values)
    # t_{0.975, 2} = 4.302652729911275 (tables); s = 0.03, n = 3.
    half = 4.302652729911275 * 0.03 / math.sqrt(3)
    assert low == pytest.approx(0.50 - half, rel=1e-9)
    assert high == pytest.approx(0.50 + half, rel=1e-9)
    assert all(math.isnan(v) for v in confidence_interval([0.5]))


@pytest.mark.parametrize(
    ("a", "b"),
    [([0.61, 0.64, 0.60], [0.55, 0.58, 0.54, 0.57]), ([0.9, 0.7, 0.8], [0.79, 0.81, 0.8])],
)
def test_welch_p_value_against_its_formula(a, b):
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch-Satterthwaite
    tail, _ = integrate.quad(_t_density, abs(t), math.inf, args=(df,))
    difference, p = welch_test(a, b)
    assert difference == pytest.approx(statistics.fmean(a) - statistics.fmean(b), rel=1e-12)
    assert p == pytest.approx(2 * tail, rel=1e-6)


def test_welch_is_undefined_without_spread_or_with_one_value():
    assert math.isnan(welch_test([0.5, 0.5], [0.4, 0.4])[1])
    assert math.isnan(welch_test([0.5], [0.4, 0.45])[1])


def _fake_run(path, optimizer, seed, accuracies, noise=0.0):
    path.mkdir(parents=True)
    config = {
        "dataset": "digits", "model": "wrn16_1", "epochs": len(accuracies), "optimizer": optimizer,
        "rho": None, "seed": seed, "label_noise": noise, "sam_every": 1, "sam_start": 0.0,
        "sam_adaptive": None,
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps({"config": config}))
    rows = [
        {"epoch": i + 1, "test_acc": acc, "train_acc": 0.9, "train_acc_clean": 0.6}
        for i, acc in enumerate(accuracies)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_accuracy_intervals_stay_within_0_and_100_and_need_n_3():
    # n = 2: the t-interval is mean ± 12.7 sd (t_0.975,1 = 12.706): not printed.
    assert percent_interval([0.97, 0.99]) == "n < 3"
    # Near 100 %: mean 0.99, sd 0.01, n = 3: 0.99 ± 4.303 * 0.01 / sqrt(3) = [0.9652, 1.0148].
    assert percent_interval([0.98, 0.99, 1.0]) == "[96.52, 100.00]*"
    assert percent_interval([0.5, 0.6, 0.7]) == "[35.16, 84.84]"  # 0.6 ± 4.303 * 0.1 / sqrt(3)


def test_compare_with_a_baseline_reports_differences_and_p_values(tmp_path, capsys):
    finals = {"sgd": [0.55, 0.58, 0.54], "sam": [0.61, 0.64, 0.60]}
    runs = [
        str(_fake_run(tmp_path / f"{name}-{seed}", name, seed, [0.3, acc], noise=0.4))
        for name, values in finals.items()
        for seed, acc in enumerate(values)
    ]
    assert main(["compare", *runs, "--baseline", "sgd"]) == 0
    table = capsys.readouterr().out
    header, _, sgd, sam = table.split("\n\n")[0].strip().splitlines()
    assert "Δ final vs sgd (pp) | p (Welch) |" in header and "true labels" in header
    assert "40 % label noise" in sgd
    low, high = confidence_interval(finals["sam"])
    _, p = welch_test(finals["sam"], finals["sgd"])
    assert f"| [{100 * low:.2f}, {100 * high:.2f}] |" in sam
    assert f"| +{100 * (0.61 - 0.55 + 0.64 - 0.58 + 0.60 - 0.54) / 3:.2f} | {p:.3g} |" in sam
    assert "| – | – |" in sgd  # the baseline itself
    assert "| 90.00 ± 0.00 | 60.00 ± 0.00 |" in sam  # train accuracy, noisy / true labels
    # Without --baseline: no such columns; a label that no row has is one line.
    assert "Welch" not in compare_table(runs)
    assert main(["compare", *runs, "--baseline", "adam"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--baseline: got 'adam'; expected a row's optimizer: 'sam rho=0.05', 'sgd'" in err
