"""aace tune on Optuna for real: journal storage shared by two worker processes, a worker
SIGKILLed mid-trial and restarted, pruning, the final seeds' table, and a real PostgreSQL server
shared by two workers as two machines would share it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

optuna = pytest.importorskip("optuna", reason="aace[tune] (Optuna) is not installed")

from aace.cli import main  # noqa: E402
from aace.report import welch_test  # noqa: E402
from aace.training.config import ConfigError  # noqa: E402
from aace.training.metrics import TIMING_FIELDS  # noqa: E402
from aace.training.tune import Space, TuneSpec, _sampler, parse_space  # noqa: E402

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


def check_study(out, optimizer, expected_points):
    """Every grid point ran exactly once, as one completed trial with one training."""
    report = json.loads((Path(out) / "tune.json").read_text())["optimizers"][optimizer]
    trials = [t for t in report["trials"] if t["state"] == "complete"]
    assert sorted(t["params"]["rho"] for t in trials) == sorted(expected_points)
    for t in trials:
        assert trainings(t["run"]) == 1, t["run"]
        assert len(rows_of(t["run"])) == 2
    return report


def test_workers_sharing_a_study_draw_different_points():
    """Two workers (two samplers on one storage, as two processes have) ask for trials before
    any finishes: trial k's random-phase rho depends on (seed, k) only, so it is the point a
    single worker draws for trial k and no two workers draw the same point. (One TPESampler
    seeded alike in every worker gave trials 0 and 1 the same rho.)"""
    spec = TuneSpec(out="unused", optimizers=["sam"], spaces=[Space("rho", 0.01, 2.0, True)],
                    base={}, trials=9)  # fmt: skip

    def rhos(workers: int) -> list[float]:
        storage = optuna.storages.InMemoryStorage()
        studies = [
            optuna.create_study(storage=storage, study_name="sam", direction="maximize",
                                sampler=_sampler(spec, "sam", "sam"), load_if_exists=True)
            for _ in range(workers)
        ]  # fmt: skip
        asked = []
        for k in range(3):  # the random phase: max(2, 9 // 3) trials
            study = studies[k % workers]
            trial = study.ask()
            asked.append((study, trial, trial.suggest_float("rho", 0.01, 2.0, log=True)))
            if workers == 1:
                study.tell(trial, 0.5)
        assert [trial.number for _, trial, _ in asked] == [0, 1, 2]
        return [rho for _, _, rho in asked]

    single, shared = rhos(1), rhos(2)
    assert shared == single
    assert len(set(shared)) == 3 and all(0.01 <= rho <= 2.0 for rho in shared)


def test_two_workers_share_a_journal_then_final_seeds(npz_path, tmp_path):
    out = tmp_path / "tune"
    command = tune_command(
        npz_path, out, "--optimizer", "sam,sam-aace", "--rho", "0.02,0.1,0.5",
        "--final-seeds", "2", "--baseline", "sam", "--pruner", "none",
    )  # fmt: skip
    first = subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    time.sleep(2)  # the first creates the studies; the second joins them
    second = subprocess.run(command, env=env(), capture_output=True, text=True)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert second.returncode == 0, second.stderr
    for optimizer in ("sam", "sam-aace"):
        report = check_study(out, optimizer, [0.02, 0.1, 0.5])
        # Both workers trained trials (the work was shared), none twice (checked above).
        final = report["final"]
        assert final["n"] == 2 and sorted(final["seeds"]) == [1, 2]
        expected = []
        for run in final["runs"]:
            rows = rows_of(run)
            expected.append(max(rows, key=lambda r: r["val_acc"])["test_acc"])
            assert (
                json.loads((Path(run) / "config.json").read_text())["config"]["rho"]
                == (report["best"]["params"]["rho"])
            )
        assert sorted(final["test_acc_at_selected"]) == sorted(expected)
        assert final["mean"] == pytest.approx(statistics.fmean(expected))
    finals = {o: json.loads((out / "tune.json").read_text())["optimizers"][o]["final"]
              for o in ("sam", "sam-aace")}  # fmt: skip
    difference, p = welch_test(finals["sam-aace"]["test_acc_at_selected"],
                               finals["sam"]["test_acc_at_selected"])  # fmt: skip
    assert finals["sam-aace"]["difference_vs_baseline"] == pytest.approx(difference)
    assert "p (Welch)" in (out / "tune.md").read_text()
    assert (out / "tune.png").stat().st_size > 0
    trial_lines = [line for line in (stdout + second.stdout).splitlines() if "] trial " in line]
    assert len(trial_lines) == 2 * (3 + 2)  # one line per finished trial, searches and finals
    assert "trial" in stdout and "trial" in second.stdout, "one worker did all the work"


def test_sigkilled_worker_restarted_finishes_its_trial_from_the_checkpoint(npz_path, tmp_path):
    options = ("--optimizer", "sam", "--rho", "0.1", "--pruner", "none", "--heartbeat", "1")
    train = ("--lr", "0.05", "--checkpoint-every", "2", "--dropout", "0.2")
    reference = tmp_path / "reference"
    result = subprocess.run(tune_command(npz_path, reference, *options, train=train), env=env(),
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = tmp_path / "killed"
    # 48 training images, batch 16: 3 steps per epoch; killed in step 5 (epoch 2), after the
    # checkpoint of step 4.
    faulty = env(AACE_FAULTS="step:5")
    killed = subprocess.run(tune_command(npz_path, out, *options, train=train), env=faulty,
                            capture_output=True, text=True)  # fmt: skip
    assert killed.returncode == -9
    time.sleep(3)  # longer than the grace period (2 heartbeats): the trial is stale
    result = subprocess.run(tune_command(npz_path, out, *options, train=train), env=env(),
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    run = out / "sam" / "sam-rho0.1"
    assert rows_of(run) == rows_of(reference / "sam" / "sam-rho0.1")
    assert "resumed from" in (run / "train.log").read_text()
    trials = json.loads((out / "tune.json").read_text())["optimizers"]["sam"]["trials"]
    assert [(t["state"], t["retry_of"]) for t in trials] == [("fail", None), ("complete", 0)]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_stopped_worker_puts_its_own_trial_back_in_the_queue(npz_path, tmp_path, monkeypatch):
    """Two workers stopped by one SIGTERM each put their own trial back in the queue. aace once
    queued the study's *last* failed trial: a worker whose trial had the lower number queued the
    other worker's, which then ran twice, and its own was lost (a final seed missing, another
    counted twice). Here the other worker's trial, started later, fails first."""
    from optuna.trial import TrialState

    from aace.training import preemption, trainer, tune

    spec = TuneSpec(
        out=str(tmp_path), optimizers=["sam"], spaces=[Space("rho", 0.01, 1.0, log=True)],
        base={"dataset": f"npz:{npz_path}", "model": "wrn10_1", "epochs": 2, "batch_size": 16},
        trials=4, pruner="none",
    ).validate()  # fmt: skip
    storage = tune.open_storage(spec)
    tune.open_studies(spec, storage, create=True)
    other_worker = optuna.load_study(study_name="sam", storage=storage)

    class StoppedTrainer:
        def __init__(self, config, log, on_epoch):
            pass

        def fit(self, resume):
            other = other_worker.ask()
            other.suggest_float("rho", 0.01, 1.0, log=True)
            other_worker.tell(other, state=TrialState.FAIL)
            raise preemption.Preempted("stopped by SIGTERM")

    monkeypatch.setattr(trainer, "Trainer", StoppedTrainer)
    monkeypatch.setattr(preemption, "defer_sigterm", lambda: None)  # not in pytest's process
    with pytest.raises(preemption.Preempted):
        tune.work(spec, log=lambda line: None)
    trials = other_worker.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.WAITING]
    assert trials[2].system_attrs["failed_trial"] == 0
    assert trials[2].params == trials[0].params != trials[1].params


def test_the_report_counts_a_final_run_once(npz_path, tmp_path):
    """Two complete final trials of one seed (one run directory, as the bug above left them)
    are one sample in the mean, sd and n, not two."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import create_trial

    from aace.training import tune

    spec = TuneSpec(
        out=str(tmp_path), optimizers=["sam"], spaces=[Space("rho", 0.01, 1.0, log=True)],
        base={"dataset": f"npz:{npz_path}", "model": "wrn10_1", "epochs": 2, "batch_size": 16},
        trials=1, final_seeds=2, pruner="none",
    ).validate()  # fmt: skip
    studies = tune.open_studies(spec, tune.open_storage(spec), create=True)
    rho = {"rho": FloatDistribution(0.01, 1.0, log=True)}
    studies["sam"].add_trial(create_trial(params={"rho": 0.1}, distributions=rho, value=0.5,
                                          user_attrs={"params": {"rho": 0.1}}))  # fmt: skip
    seed = {"seed": CategoricalDistribution([1, 2])}
    for value, test in [(1, 0.4), (1, 0.4), (2, 0.6)]:
        run = str(tmp_path / "final" / f"sam-rho0.1-s{value}")
        studies["sam-final"].add_trial(
            create_trial(params={"seed": value}, distributions=seed, value=0.5,
                         user_attrs={"run": run, "test_acc_at_selected": test})
        )  # fmt: skip
    final = tune.write_report(spec, studies)["optimizers"]["sam"]["final"]
    assert final["n"] == 2 and final["seeds"] == [1, 2]
    assert final["test_acc_at_selected"] == [0.4, 0.6]
    assert final["mean"] == pytest.approx(0.5) and final["sd"] == pytest.approx(0.2 / 2**0.5)


def test_pruned_trial_keeps_its_run(npz_path, tmp_path):
    # A learning rate that learns nothing in 3 epochs against one that learns: ASHA (first rung
    # after 1 epoch) promotes the first trial, the second only if it is as good at epoch 1.
    out = tmp_path / "tune"
    # --seed 1: the grid sampler's order is then 0.2 first (checked with Optuna 5.0).
    options = ("--optimizer", "sam", "--lr", "0.2,0.0000001", "--pruner", "asha",
               "--min-epochs", "1", "--seed", "1")  # fmt: skip
    command = tune_command(npz_path, out, *options, epochs=3, train=())
    result = subprocess.run(command, env=env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    trials = json.loads((out / "tune.json").read_text())["optimizers"]["sam"]["trials"]
    pruned = [t for t in trials if t["state"] == "pruned"]
    assert len(pruned) == 1, trials
    assert pruned[0]["params"]["lr"] == 1e-7 and 1 <= pruned[0]["epochs"] < 3
    assert len(rows_of(pruned[0]["run"])) == pruned[0]["epochs"]
    assert (Path(pruned[0]["run"]) / "checkpoint.pt").is_file()
    assert main(["compare", pruned[0]["run"]]) == 0  # an ordinary run directory


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--rho", "0.01:1:log"], "--trials: got None"),
        (["--rho", "0.1", "--val-split", "0"], "--val-split: got 0.0"),
        (["--rho", "0.1", "--baseline", "sgd"], "--baseline: got 'sgd'"),
        (["--rho", "x"], "--rho: got 'x'"),
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


def test_two_workers_on_postgresql(npz_path, tmp_path, postgres_url):
    # Two "machines": two commands with their own --out folders for logs, one storage and a
    # shared run folder (as a shared filesystem would give them).
    out = tmp_path / "shared"
    command = tune_command(npz_path, out, "--optimizer", "sam", "--rho", "0.02,0.1,0.5",
                           "--pruner", "none", "--storage", postgres_url)  # fmt: skip
    first = subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    time.sleep(2)
    second = subprocess.run(command, env=env(), capture_output=True, text=True)
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert second.returncode == 0, second.stderr
    check_study(out, "sam", [0.02, 0.1, 0.5])
    study = optuna.load_study(
        study_name="sam", storage=postgres_url.replace("postgresql:", "postgresql+psycopg2:")
    )
    assert len(study.trials) == 3
