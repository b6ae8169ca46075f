"""The verdict study's arithmetic (benchmarks/studies/verdict.py): pairing by seed, the verdict
classes, Holm and TOST against scipy, a report made from part files alone, and the wall clock
of sittings that were killed."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from benchmarks.studies import verdict
from scipy import stats as scipy_stats

SEEDS = list(range(100, 108))


def _entry(rule: str, tests: list[float], seeds: list[int] = SEEDS, grid=None) -> dict:
    return {
        "rule": rule, "chosen": {"rho": 0.1}, "score": 0.5, "se": 0.02,
        "within_2se": [{"rho": 0.1}], "cannot_choose": False, "at_range_end": None,
        "val_count": 400, "seeds": seeds, "tests": tests, "radius": 0.1, "cosine": 0.0,
        "grid": grid or [], "epochs": 10, "wall_seconds": 36.0, "train_seconds": 5400.0,
        "final_epoch_seconds": 1.0,
        "commands": [f"aace tune --optimizers {rule}"],
    }  # fmt: skip


def _tost_scipy(differences: np.ndarray, margin: float) -> float:
    lower = scipy_stats.ttest_1samp(differences + margin, 0.0, alternative="greater").pvalue
    upper = scipy_stats.ttest_1samp(differences - margin, 0.0, alternative="less").pvalue
    return float(max(lower, upper))


def test_compare_pairs_by_seed_and_classifies_against_scipy():
    rng = np.random.default_rng(0)
    sam = 0.80 + 0.01 * rng.standard_normal(len(SEEDS))
    close = sam + 0.002 * rng.standard_normal(len(SEEDS))
    worse = sam - 0.05 + 0.004 * rng.standard_normal(len(SEEDS))
    unclear = sam + 0.03 * rng.standard_normal(len(SEEDS))
    entries = {
        "sam": _entry("sam", sam.tolist()),
        # listed in another seed order: the comparison must pair by seed, not by position
        "close": _entry("close", close[::-1].tolist(), SEEDS[::-1]),
        "worse": _entry("worse", worse.tolist()),
        "unclear": _entry("unclear", unclear.tolist()),
    }
    result = verdict._compare(entries, margin=1.0)
    assert set(result) == {"close", "worse", "unclear"}

    raw = {}
    for rule, values in (("close", close), ("worse", worse), ("unclear", unclear)):
        d = values - sam
        r = result[rule]
        assert r["n"] == len(SEEDS)
        assert r["difference"] == pytest.approx(d.mean(), abs=1e-12)
        half = scipy_stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        assert r["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], abs=1e-9)
        raw[rule] = scipy_stats.ttest_rel(values, sam).pvalue
        assert r["p"] == pytest.approx(raw[rule], rel=1e-6)
        assert r["tost_p"] == pytest.approx(_tost_scipy(d, 0.01), rel=1e-6)

    # Holm by hand: the k-th smallest p times (m - k + 1), made monotone, capped at 1.
    order = sorted(raw, key=raw.get)
    adjusted, running = {}, 0.0
    for k, rule in enumerate(order):
        running = max(running, min(1.0, (len(order) - k) * raw[rule]))
        adjusted[rule] = running
    for rule in raw:
        assert result[rule]["p_holm"] == pytest.approx(adjusted[rule], rel=1e-6)

    assert result["close"]["verdict"] == "within ±1 pp of SAM"
    assert result["worse"]["verdict"] == "worse than SAM"
    assert result["unclear"]["verdict"] == "these runs cannot tell"
    assert result["unclear"]["detectable"] > result["close"]["detectable"]


def test_compare_needs_two_shared_seeds():
    entries = {
        "sam": _entry("sam", [0.8, 0.81, 0.79]),
        "other": _entry("other", [0.7, 0.71, 0.69], seeds=[SEEDS[0], 1, 2]),
    }
    assert verdict._compare(entries, margin=1.0) == {}


def test_report_from_part_files_alone(tmp_path):
    grid = [
        {"rho": rho, "val": 0.5, "test": test, "radius": rho, "val_clean": None}
        for rho, test in ((0.01, 0.70), (0.1, 0.80), (1.0, 0.795), (2.0, 0.40))
    ]
    args = argparse.Namespace(
        setting="digits-noise40", report_rules=["sgd", "sam", "sam-aace"], report_splits=[0],
        points=4, search_seeds=1, epochs=10, val_split=0.2, final_seeds=len(SEEDS),
        margin=1.0, runs_dir=tmp_path / "runs", out_dir=tmp_path / "results",
    )  # fmt: skip
    rng = np.random.default_rng(1)
    sam = (0.8 + 0.01 * rng.standard_normal(len(SEEDS))).tolist()
    for rule, tests in (("sam", sam), ("sam-aace", [t + 0.001 for t in sam])):
        part = verdict.part_file(args, 0, rule)
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_text(json.dumps(_entry(rule, tests, grid=grid)))

    text = verdict.report(args)

    assert "Validation split seed 0 (Holm over the 1 comparison with SAM run on it)" in text
    assert "- not yet run on this split: sgd" in text
    assert "sam-aace: +0.10 pp against SAM" in text
    assert "**within ±1 pp of SAM**" in text
    # a constant paired difference: a zero-width interval, kept on one line by a no-break space
    assert "| +0.10 | [+0.10,\u00a0+0.10] |" in text
    # sensitivity: best 80.00, median of (80, 79.5, 70, 40) = 74.75 -> loses 5.25, worst 40.00
    row = next(line for line in text.splitlines() if line.startswith("| sam | 80.00"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:6] == ["80.00", "80.00", "5.25", "40.00", "0.1, 1"]
    # compute: 5400 s of epochs per rule -> 1.50 core-h each, 3.0 h in the protocol line
    assert "| sam | 10 | 1.50 | 0.01 | 1.00 |" in text
    assert "20 epochs trained in all, 3.0 h of training on one core each." in text
    saved = json.loads((args.out_dir / "verdict-digits-noise40.json").read_text())
    assert saved["split0"]["vs_sam"]["sam-aace"]["n"] == len(SEEDS)
    assert (args.out_dir / "verdict.png").is_file()
    assert (args.out_dir / "verdict-digits-noise40-radius.png").is_file()


def test_sit_keeps_a_heartbeat_and_sums_each_sitting_once(tmp_path):
    sessions = tmp_path / "rule" / verdict.SESSIONS
    sleep = [sys.executable, "-c", "import time; time.sleep(0.5)"]
    verdict.sit(sleep, "sleep", sessions, heartbeat=0.1)
    lines = [json.loads(x) for x in sessions.read_text().splitlines()]
    assert len(lines) >= 3 and {x["sitting"] for x in lines} == {lines[0]["sitting"]}
    assert 0.5 <= verdict.wall_seconds(lines) < 60.0  # loose: a loaded CI machine
    # A failing sitting raises as subprocess.run(check=True) would, and still counts.
    with pytest.raises(subprocess.CalledProcessError) as raised:
        verdict.sit([sys.executable, "-c", "raise SystemExit(3)"], "fail", sessions, heartbeat=5)
    assert raised.value.returncode == 3
    assert sessions.read_text().splitlines()[-1].count('"fail"') == 1


def test_wall_seconds_takes_each_sittings_last_heartbeat():
    lines = [
        {"seconds": 5.0},  # written before heartbeats: one sitting per line
        {"seconds": 7.0},
        {"sitting": 1, "seconds": 1.0},
        {"sitting": 1, "seconds": 2.0},
        {"sitting": 2, "seconds": 4.0},
    ]
    assert verdict.wall_seconds(lines) == 5.0 + 7.0 + 2.0 + 4.0
    assert verdict.wall_seconds([]) is None


def test_report_without_sams_study_writes_nothing(tmp_path):
    args = argparse.Namespace(
        setting="digits-noise40", report_rules=["sgd", "sam"], report_splits=[0],
        points=4, search_seeds=1, epochs=10, val_split=0.2, final_seeds=len(SEEDS),
        margin=1.0, runs_dir=tmp_path / "runs", out_dir=tmp_path / "results",
    )  # fmt: skip
    part = verdict.part_file(args, 0, "sgd")
    part.parent.mkdir(parents=True)
    part.write_text(json.dumps(_entry("sgd", [0.8] * len(SEEDS))))
    assert "no report written" in verdict.report(args)
    assert not (args.out_dir / "verdict-digits-noise40.md").exists()


def test_unknown_rule_is_one_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["verdict", "--setting", "digits-noise40", "--rules", "sam,x"])
    with pytest.raises(SystemExit) as raised:
        verdict.main()
    assert raised.value.code == 2
    assert "--rules: unknown rule(s) x; allowed: sgd, sam," in capsys.readouterr().err
