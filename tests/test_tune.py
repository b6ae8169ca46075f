"""aace tune on Optuna for real: what it searches (grids and TPE, seeded per study), what it
chooses (a null search chooses all over the grid), the uncertainty and paired statistics of its
report, and its faults: a worker SIGKILLed while another trains, an error retried, Ctrl-C, a
diverged run, two workers on a journal and on a real PostgreSQL server."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

optuna = pytest.importorskip("optuna", reason="aace[tune] (Optuna) is not installed")

from aace import stats  # noqa: E402
from aace.cli import main  # noqa: E402
from aace.training.config import ConfigError  # noqa: E402
from aace.training.metrics import TIMING_FIELDS  # noqa: E402
from aace.training.tune import report, scoring, storage, worker  # noqa: E402
from aace.training.tune.sampling import make_sampler  # noqa: E402
from aace.training.tune.spec import Space, TuneSpec, grid_points, parse_space  # noqa: E402

FAULTS = str(Path(__file__).with_name("faults.py"))


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    y_train, y_test = np.repeat(np.arange(4), 16), rng.integers(0, 4, 16)

    def images(y):
        return (y[:, None, None, None] * 60 + rng.integers(0, 40, (len(y), 8, 8, 3))).astype(
            np.uint8
        )

    np.savez(path, x_train=images(y_train), y_train=y_train, x_test=images(y_test), y_test=y_test)
    return path


def tune_command(npz_path, out, *options, epochs=2, train=("--lr", "0.05")):
    return [
        sys.executable, FAULTS, "tune", "--out", str(out), "--val-split", "0.25", *options, "--",
        "--dataset", f"npz:{npz_path}", "--model", "wrn10_1", "--epochs", str(epochs),
        "--batch-size", "16", *train,
    ]  # fmt: skip


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "AACE_FAULTS": "", "AACE_LAUNCH": "0", **extra}


def rows_of(run):
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING_FIELDS} for x in lines]


def trainings(run) -> int:
    """How many times a run's first epoch was trained (its train.log keeps every attempt)."""
    return (Path(run) / "train.log").read_text().count("epoch   1 ")


def spec_of(tmp_path, npz_path, **values) -> TuneSpec:
    defaults = dict(
        out=str(tmp_path), optimizers=["sam"], spaces=[Space("rho", 0.01, 1.0, log=True)],
        base={"dataset": f"npz:{npz_path}", "model": "wrn10_1", "epochs": 2, "batch_size": 16},
    )  # fmt: skip
    return TuneSpec(**{**defaults, **values}).validate()


# -- what is searched ---------------------------------------------------------------------------


def test_parse_space():
    assert parse_space("rho", "0.01:2:log") == Space("rho", 0.01, 2.0, True)
    assert parse_space("lr", "0.1:0.5") == Space("lr", 0.1, 0.5, False)
    assert parse_space("rho", "0.05,0.1,0.05") == Space("rho", values=(0.05, 0.1))
    for text, message in (
        ("0:1:log", "LOW > 0 for :log"), ("1:0.5", "LOW < HIGH"), ("a,b", "expected numbers"),
        ("-1,2", "expected numbers in [0, inf]"), ("0.1:1:lin", "expected LOW:HIGH"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            parse_space("rho", text)


def test_a_log_range_becomes_geometric_grid_points():
    points = grid_points(Space("rho", 0.01, 1.0, log=True), 5)
    assert points == [0.01, 0.03162, 0.1, 0.3162, 1.0]  # ratio 10^0.5, 4 significant digits
    assert grid_points(Space("lr", 0.1, 0.5), 3) == [0.1, 0.3, 0.5]
    assert grid_points(Space("rho", values=(0.2, 0.05)), 9) == [0.2, 0.05]


def test_one_range_is_a_grid_of_trials_points_and_two_ranges_are_tpe(tmp_path, npz_path):
    one = spec_of(tmp_path, npz_path, trials=4)
    assert one.is_grid("sam") and one.budget("sam") == 4
    default = spec_of(tmp_path, npz_path)
    assert default.budget("sam") == 7
    assert default.budget("sgd") == 1 and default.configurations("sgd") == [{}]
    two = [Space("rho", 0.01, 1.0, log=True), Space("lr", 0.01, 0.5, log=True)]
    with pytest.raises(ConfigError, match="--trials: not given"):
        spec_of(tmp_path, npz_path, spaces=two)
    tpe = spec_of(tmp_path, npz_path, spaces=two, trials=9)
    assert not tpe.is_grid("sam") and tpe.budget("sam") == 9
    # Final seeds: the same for every rule, none of the search's.
    seeds = spec_of(tmp_path, npz_path, search_seeds=3, final_seeds=2, seed=10)
    assert seeds.search_seed_values == [10, 11, 12] and seeds.final_seed_values == [13, 14]


def _ask(spec, name, storage_, n, workers=1):
    studies = [
        optuna.create_study(storage=storage_, study_name=name, direction="maximize",
                            sampler=make_sampler(spec, name, name), load_if_exists=True)
        for _ in range(workers)
    ]  # fmt: skip
    points = []
    for k in range(n):
        trial = studies[k % workers].ask()
        points.append(
            (trial.suggest_float("rho", 0.01, 1.0, log=True),
             trial.suggest_float("lr", 0.01, 0.5, log=True))
        )  # fmt: skip
    return points


def test_tpe_draws_differ_between_rules_and_not_between_workers(tmp_path, npz_path):
    """Two rules never share a random stream (each rule's trial 0 once landed at the same place
    of its range); workers sharing a study draw what one worker draws, all different."""
    spec = spec_of(
        tmp_path, npz_path, optimizers=["sam", "sam-aace"], trials=9,
        spaces=[Space("rho", 0.01, 1.0, log=True), Space("lr", 0.01, 0.5, log=True)],
    )  # fmt: skip
    sam = _ask(spec, "sam", optuna.storages.InMemoryStorage(), 3)
    aace = _ask(spec, "sam-aace", optuna.storages.InMemoryStorage(), 3)
    assert not set(sam) & set(aace)
    shared = _ask(spec, "sam", optuna.storages.InMemoryStorage(), 3, workers=2)
    assert shared == sam and len(set(sam)) == 3


def _fake_trainer(score_of):
    """A stand-in for training a trial's runs: scores from ``score_of(params, seed)``."""

    def train(spec, name, optimizer, params, seeds, progress):
        results = []
        for seed in seeds:
            score, secondary = score_of(params, seed)
            results.append({"run": f"{name}/{seed}", "seed": seed, "score": score,
                            "secondary": secondary, "epochs": spec.epochs, "val_count": 150,
                            "diverged": False})  # fmt: skip
        return results

    return train


def test_a_null_search_chooses_all_over_the_grid(tmp_path, npz_path, monkeypatch):
    """Every rho equally good (validation accuracies of 150 images drawn from one binomial, as
    equal models would score): over many studies the choice is spread over the grid, not
    trial 0's configuration (which the old pruned search chose in 34 of 40 such studies)."""
    rng = np.random.default_rng(0)
    monkeypatch.setattr(
        worker, "_train_trial",
        _fake_trainer(lambda params, seed: (rng.binomial(150, 0.8) / 150, -rng.random())),
    )  # fmt: skip
    chosen, first = Counter(), 0
    studies = 40
    for k in range(studies):
        spec = spec_of(tmp_path / str(k), npz_path, trials=5, seed=k)
        worker.run_tune(spec, log=lambda line: None)
        entries = json.loads((tmp_path / str(k) / "tune.json").read_text())["optimizers"]["sam"]
        best = entries["best"]["rho"]
        chosen[best] += 1
        first += best == min(entries["configurations"], key=lambda e: e["first"])["params"]["rho"]
        assert [e["state"] for e in entries["configurations"]] == ["full"] * 5
    assert len(chosen) == 5 and max(chosen.values()) <= 16, chosen  # 8 expected each
    assert first <= 16, first


def test_a_trial_that_raises_is_retried_and_not_counted(tmp_path, npz_path, monkeypatch):
    calls = []
    real = _fake_trainer(lambda params, seed: (0.5 + params["rho"], 0.0))

    def flaky(spec, name, optimizer, params, seeds, progress):
        calls.append(params["rho"])
        if len(calls) == 1:
            raise FileNotFoundError("npz file briefly missing")
        return real(spec, name, optimizer, params, seeds, progress)

    monkeypatch.setattr(worker, "_train_trial", flaky)
    spec = spec_of(tmp_path, npz_path, spaces=[Space("rho", values=(0.1, 0.2))], retries=1)
    result = worker.run_tune(spec, log=lambda line: None)["optimizers"]["sam"]
    assert sorted(calls) == sorted([0.1, 0.2, calls[0]])  # the failed one ran again
    assert (result["trials"], result["retries"], result["errors"]) == (3, 1, 1)
    assert [e["state"] for e in result["configurations"]] == ["full", "full"]
    assert result["best"] == {"rho": 0.2}
    text = (tmp_path / "tune.md").read_text()
    assert "2 of 2" in text and "1 of them retries" in text

    # Past the retries: the configuration is shown as failed, with its error.
    monkeypatch.setattr(worker, "_train_trial", lambda *a: (_ for _ in ()).throw(OSError("gone")))
    spec = spec_of(tmp_path / "b", npz_path, spaces=[Space("rho", values=(0.1,))], retries=1)
    entry = worker.run_tune(spec, log=lambda line: None)["optimizers"]["sam"]
    assert entry["trials"] == 2 and entry["configurations"][0]["state"] == "failed"
    assert "gone" in entry["configurations"][0]["error"]


def test_a_diverged_run_is_a_bad_score_not_a_failure(tmp_path, npz_path, monkeypatch):
    from aace.training.step import NonFiniteError
    from aace.training.trainer import Trainer

    fit = Trainer.fit

    def diverging(self, resume=False):
        if self.config.rho > 0.5:
            raise NonFiniteError("non-finite update-pass loss at step 1 of epoch 1")
        return fit(self, resume)

    monkeypatch.setattr(Trainer, "fit", diverging)
    spec = spec_of(tmp_path, npz_path, spaces=[Space("rho", values=(0.1, 1.0))])
    entry = worker.run_tune(spec, log=lambda line: None)["optimizers"]["sam"]
    states = {e["params"]["rho"]: e for e in entry["configurations"]}
    assert states[1.0]["state"] == "full" and states[1.0]["diverged"] == 1
    assert states[1.0]["score"] == scoring.DIVERGED["best-val-acc"]
    assert entry["best"] == {"rho": 0.1}


# -- what the report says -----------------------------------------------------------------------


def test_scores_of_a_run_by_hand():
    rows = [
        {"epoch": 1, "val_acc": 0.5, "val_loss": 1.0, "val_count": 40},
        {"epoch": 2, "val_acc": 0.7, "val_loss": 0.8, "val_count": 40},
        {"epoch": 3, "val_acc": 0.7, "val_loss": 0.6, "val_count": 40},
        {"epoch": 4, "val_acc": 0.6, "val_loss": 0.9, "val_count": 40},
    ]
    best = scoring.run_score(rows, "best-val-acc")
    assert (best.score, best.secondary, best.val_count) == (0.7, -0.8, 40)  # the earliest 0.7
    last = scoring.run_score(rows, "last-val-acc")
    assert last.score == pytest.approx((0.7 + 0.7 + 0.6) / 3)
    assert last.secondary == pytest.approx(-(0.8 + 0.6 + 0.9) / 3)
    loss = scoring.run_score(rows, "best-val-loss")
    assert (loss.score, loss.secondary) == (-0.6, 0.7)
    # Ties broken by the second measure, then by smaller parameters; never by trial number.
    keys = [
        scoring.rank_key(0.7, -0.9, {"rho": 0.1}), scoring.rank_key(0.7, -0.8, {"rho": 0.2}),
        scoring.rank_key(0.7, -0.8, {"rho": 0.05}), scoring.rank_key(0.71, -2.0, {"rho": 1.0}),
    ]  # fmt: skip
    assert sorted(range(4), key=keys.__getitem__) == [3, 2, 1, 0]


def _study_with(spec, scores):
    """A search study whose configurations scored ``scores[rho]`` (per seed)."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    study = optuna.create_study(direction="maximize")
    grid = spec.grid("sam")["rho"]
    for rho, per_seed in scores.items():
        runs = [{"run": f"r{rho}-{s}", "seed": s, "score": v, "secondary": 0.0, "epochs": 2,
                 "val_count": 200, "diverged": False} for s, v in enumerate(per_seed)]  # fmt: skip
        study.add_trial(create_trial(
            params={"rho": rho}, distributions={"rho": CategoricalDistribution(grid)},
            value=float(np.mean(per_seed)), user_attrs={"params": {"rho": rho}, "runs": runs},
        ))  # fmt: skip
    return study


def test_the_uncertainty_by_hand(tmp_path, npz_path):
    spec = spec_of(tmp_path, npz_path, trials=5, search_seeds=2)  # 0.01 ... 1, ratio 10^0.5
    scores = {0.01: [0.80, 0.82], 0.03162: [0.85, 0.87], 0.1: [0.86, 0.88],
              0.3162: [0.84, 0.85], 1.0: [0.70, 0.72]}  # fmt: skip
    entries = report.configurations(spec, "sam", _study_with(spec, scores))
    best = next(e for e in entries if e["rank"] == 1)
    assert best["params"] == {"rho": 0.1} and best["score"] == pytest.approx(0.87)
    # SE: the larger of sd/sqrt(2) = 0.01 and the binomial sqrt(.87 * .13 / 200) = 0.0238.
    se = math.sqrt(0.87 * 0.13 / 200)
    assert best["se"] == pytest.approx(se)
    found = report.uncertainty(spec, "sam", entries)
    # Within 0.87 - 2 * 0.0238 = 0.8224: 0.03162 (0.86), 0.1, 0.3162 (0.845); not 0.01 (0.81).
    assert found["within_2se"] == [{"rho": 0.03162}, {"rho": 0.1}, {"rho": 0.3162}]
    assert found["cannot_choose"] == [0.03162, 0.3162] and found["at_range_end"] is None
    # A best at the end of the range is flagged.
    scores[1.0] = [0.95, 0.95]
    entries = report.configurations(spec, "sam", _study_with(spec, scores))
    found = report.uncertainty(spec, "sam", entries)
    assert found["at_range_end"] == "high" and found["cannot_choose"] is None


# -- real runs, several processes ---------------------------------------------------------------


def test_two_workers_share_a_journal_then_paired_final_seeds(npz_path, tmp_path):
    out = tmp_path / "tune"
    command = tune_command(
        npz_path, out, "--optimizers", "sam,sam-aace", "--rho", "0.02,0.1,0.5",
        "--search-seeds", "2", "--final-seeds", "3", "--baseline", "sam", "--margin", "2",
        "--progress", "0",
    )  # fmt: skip
    first = subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    time.sleep(2)  # the first creates the studies; the second joins them
    second = subprocess.run(command, env=env(), capture_output=True, text=True)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert second.returncode == 0, second.stderr
    result = json.loads((out / "tune.json").read_text())["optimizers"]
    for optimizer in ("sam", "sam-aace"):
        entry = result[optimizer]
        assert [e["state"] for e in entry["configurations"]] == ["full"] * 3
        for e in entry["configurations"]:  # every configuration: both seeds, every epoch, once
            assert sorted(r["seed"] for r in e["runs"]) == [0, 1]
            for r in e["runs"]:
                assert trainings(r["run"]) == 1 and len(rows_of(r["run"])) == 2
                best_val = max(row["val_acc"] for row in rows_of(r["run"]))
                assert r["score"] == pytest.approx(best_val)
        final = entry["final"]
        assert final["seeds"] == [2, 3, 4]  # the same for every rule: paired
        expected = []
        for run in final["runs"]:
            rows = rows_of(run)
            expected.append(max(rows, key=lambda r: r["val_acc"])["test_acc"])  # earliest best
            config = json.loads((Path(run) / "config.json").read_text())["config"]
            assert config["rho"] == entry["best"]["rho"]
        assert final["test_acc_at_selected"] == expected
    versus = result["sam-aace"]["vs_baseline"]
    a, b = result["sam-aace"]["final"], result["sam"]["final"]
    paired = stats.paired_difference(a["test_acc_at_selected"], b["test_acc_at_selected"])
    assert versus["difference"] == pytest.approx(paired.difference)
    if math.isnan(paired.p):  # identical accuracies (16 test images): no p-value
        assert versus["p_holm"] is None
    else:
        assert versus["p_holm"] == pytest.approx(paired.p)  # one rule: Holm's p is the p
    text = (out / "tune.md").read_text()
    assert "Configurations compared at full budget: 3 of 3, 2 seed(s) each" in text
    assert "Validation split: 16 images; one image is 6.25 pp" in text
    assert (out / "tune.png").stat().st_size > 0
    lines = (stdout + second.stdout).splitlines()
    assert len([x for x in lines if "] trial " in x]) == 2 * (3 + 3)
    assert any("ETA" in x and "runs" in x for x in lines)
    assert any(": epoch 1/2" in x for x in lines)  # --progress 0: every epoch
    assert "trial" in stdout and "trial" in second.stdout, "one worker did all the work"
    storage_ = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))
    )
    for summary in optuna.get_all_study_summaries(storage_):
        study = optuna.load_study(study_name=summary.study_name, storage=storage_)
        assert all(t.state.name == "COMPLETE" for t in study.trials), summary.study_name


def _wait_for(predicate, timeout):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.1)
    return math.inf


def test_a_sigkilled_worker_is_requeued_by_a_busy_one_within_two_heartbeats(npz_path, tmp_path):
    """Worker A is SIGKILLed in its first trial while worker B trains another: B's heartbeat
    thread requeues A's trial within about two heartbeats, B later resumes it from A's
    checkpoint to the same rows as an uninterrupted run, and the report counts it once."""
    options = ("--optimizers", "sam", "--rho", "0.02,0.1,0.3,0.5", "--heartbeat", "1")
    train = ("--lr", "0.05", "--checkpoint-every", "2", "--dropout", "0.2")
    out = tmp_path / "killed"
    # 48 training images, batch 16: 3 steps per epoch; A dies in step 5 (epoch 2), after the
    # checkpoint of step 4, in its first trial.
    a = subprocess.Popen(tune_command(npz_path, out, *options, train=train, epochs=4),
                         env=env(AACE_FAULTS="step:5"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(1.5)
    b = subprocess.Popen(tune_command(npz_path, out, *options, train=train, epochs=4),
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)  # fmt: skip
    assert a.wait(timeout=300) == -signal.SIGKILL
    journal = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))
    )

    def requeued():
        study = optuna.load_study(study_name="sam", storage=journal)
        return any(t.user_attrs.get("retry_of") == 0 for t in study.get_trials(deepcopy=False))

    assert b.poll() is None, "B finished before A died: no busy worker to test"
    waited = _wait_for(requeued, 30)
    assert waited < 2 * 1 + 4, waited  # two heartbeats, plus a beat period and some slack
    stdout, stderr = b.communicate(timeout=600)
    assert b.returncode == 0, stderr
    assert "went silent" in stdout
    entry = json.loads((out / "tune.json").read_text())["optimizers"]["sam"]
    assert [e["state"] for e in entry["configurations"]] == ["full"] * 4
    assert (entry["trials"], entry["retries"], entry["errors"]) == (5, 1, 0)
    assert "4 of 4" in (out / "tune.md").read_text()
    (killed,) = [e for e in entry["configurations"] if e["tries"] == 2]
    rho = killed["params"]["rho"]
    (run,) = [Path(r["run"]) for r in killed["runs"]]
    assert "resumed from" in (run / "train.log").read_text()
    reference = tmp_path / "reference"
    result = subprocess.run(
        tune_command(npz_path, reference, "--optimizers", "sam", "--rho", f"{rho:g}",
                     train=train, epochs=4),
        env=env(), capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert rows_of(run) == rows_of(reference / "sam" / run.name)


def test_ctrl_c_stops_at_a_checkpoint_and_requeues_the_trial(npz_path, tmp_path):
    options = ("--optimizers", "sam", "--rho", "0.1")
    train = ("--lr", "0.05", "--checkpoint-every", "2")
    reference = tmp_path / "reference"
    result = subprocess.run(tune_command(npz_path, reference, *options, train=train), env=env(),
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = tmp_path / "stopped"
    stopped = subprocess.run(tune_command(npz_path, out, *options, train=train),
                             env=env(AACE_FAULTS="sigint:5"), capture_output=True,
                             text=True)  # fmt: skip
    assert stopped.returncode == 130, stopped.stderr
    lines = stopped.stderr.strip().splitlines()
    assert len(lines) == 1 and "stopped by SIGINT" in lines[0] and "rerun" in lines[0], lines
    journal = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))
    )
    trials = optuna.load_study(study_name="sam", storage=journal).get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]
    result = subprocess.run(tune_command(npz_path, out, *options, train=train), env=env(),
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    run = out / "sam" / "sam-rho0.1-s0"
    assert rows_of(run) == rows_of(reference / "sam" / "sam-rho0.1-s0")
    assert "resumed from" in (run / "train.log").read_text()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--rho", "0.01:1:log", "--lr", "0.01:1:log"], "--trials: not given"),
        (["--rho", "0.1", "--val-split", "0"], "--val-split: got 0.0; expected a number in (0, 1)"),
        (["--rho", "0.1", "--baseline", "sgd"], "--baseline: got 'sgd'"),
        (["--rho", "x"], "--rho: got 'x'"),
        (["--rho", "0.1", "--pruner", "asha"], "--pruner: pruning was removed"),
        (["--rho", "0.1", "--search-seeds", "0"], "--search-seeds: got 0"),
        (["--rho", "0.1", "--margin", "-1"], "--margin: got -1.0"),
        (["--rho", "0.1", "--storage", "foo://x"], "--storage: cannot open 'foo://x'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(npz_path, tmp_path, capsys, options, message):
    argv = ["tune", "--out", str(tmp_path / "t"), *options, "--", "--dataset", f"npz:{npz_path}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_train_flag_that_tune_owns_is_refused(npz_path, tmp_path, capsys):
    argv = ["tune", "--out", str(tmp_path / "t"), "--rho", "0.1", "--", "--seed", "3"]
    assert main(argv) == 2
    assert "--seed after --" in capsys.readouterr().err


def test_a_joiner_with_other_settings_is_refused(npz_path, tmp_path):
    spec = spec_of(tmp_path, npz_path, trials=3)
    storage.open_studies(spec, storage.open_storage(spec), create=True)
    other = spec_of(tmp_path, npz_path, trials=4)
    with pytest.raises(ConfigError, match="trials: 3 there, 4 now"):
        storage.open_studies(other, storage.open_storage(other), create=False)


# -- PostgreSQL -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A PostgreSQL server of its own on 127.0.0.1 (initdb + pg_ctl in a temporary folder).
    Skipped without one; a failure under CI=true, where .ci/run installs it."""
    required = os.environ.get("CI") == "true"

    def unavailable(reason):
        if required:
            pytest.fail(f"CI=true but no PostgreSQL server: {reason}")
        pytest.skip(reason)

    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb is None or pg_ctl is None:
        for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
            initdb, pg_ctl = str(folder / "initdb"), str(folder / "pg_ctl")
            break
    if initdb is None or not Path(initdb).exists():
        unavailable("no initdb/pg_ctl (Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg2", reason="psycopg2 (aace[tune]) is not installed")
    folder = Path(tempfile.mkdtemp(prefix="aace-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        runuser = shutil.which("runuser")
        if runuser is None:
            unavailable("running as root without runuser to start the server as postgres")
        shutil.chown(folder, "postgres")
        prefix = [runuser, "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()
    try:
        subprocess.run([*prefix, initdb, "-D", str(data), "-U", "postgres", "--auth=trust"],
                       check=True, capture_output=True, text=True)  # fmt: skip
        subprocess.run(
            [*prefix, pg_ctl, "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
             f"-h 127.0.0.1 -p {port} -k {folder}", "start"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
    except (subprocess.CalledProcessError, OSError) as error:
        unavailable(f"could not start PostgreSQL: {getattr(error, 'stderr', error)}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_on_postgresql_one_sigkilled(npz_path, tmp_path, postgres_url):
    """Two "machines" (two commands, one storage, a shared run folder): one is SIGKILLed in its
    first trial; the other requeues and finishes it; no configuration runs twice."""
    out = tmp_path / "shared"
    command = tune_command(npz_path, out, "--optimizers", "sam", "--rho", "0.02,0.1,0.5",
                           "--heartbeat", "1", "--storage", postgres_url,
                           train=("--lr", "0.05", "--checkpoint-every", "2"))  # fmt: skip
    first = subprocess.Popen(command, env=env(AACE_FAULTS="step:5"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(2)
    second = subprocess.run(command, env=env(), capture_output=True, text=True)
    first.communicate(timeout=600)
    assert first.returncode == -signal.SIGKILL
    assert second.returncode == 0, second.stderr
    entry = json.loads((out / "tune.json").read_text())["optimizers"]["sam"]
    assert [e["state"] for e in entry["configurations"]] == ["full"] * 3
    assert (entry["trials"], entry["retries"]) == (4, 1)
    for e in entry["configurations"]:
        (run,) = e["runs"]
        assert len(rows_of(run["run"])) == 2
    study = optuna.load_study(
        study_name="sam", storage=postgres_url.replace("postgresql:", "postgresql+psycopg2:")
    )
    assert len(study.trials) == 4
