"""aace sweep: the grid, its names and configurations, parallel jobs, resume, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from aace.cli import main
from aace.training import sweep
from aace.training.config import ConfigError

FAULTS = str(Path(__file__).with_name("faults.py"))


@pytest.fixture
def tiny_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(
        path, x_train=rng.integers(0, 256, (24, 8, 8), dtype=np.uint8), y_train=np.arange(24) % 3,
        x_test=rng.integers(0, 256, (9, 8, 8), dtype=np.uint8), y_test=np.arange(9) % 3,
    )  # fmt: skip
    return path


def _train_args(data: Path) -> list[str]:
    return ["--dataset", f"npz:{data}", "--model", "wrn10_1", "--epochs", "2", "--batch-size", "4"]


def test_plan_names_order_and_configurations():
    optimizers = sweep.parse_optimizers("sgd,sam:0.05,sam-aace")
    assert optimizers == [("sgd", None), ("sam", 0.05), ("sam-aace", None)]
    base = {"dataset": "digits", "epochs": 3, "sam_every": 5}
    runs = sweep.plan(base, "out", optimizers, rhos=[0.1, 0.2], seeds=2, label_noise=[0, 0.4])
    names = [run.name for run in runs]
    cells = ["sgd", "sam-rho0.05", "sam-aace-rho0.1", "sam-aace-rho0.2"]
    expected = [
        f"{cell}-noise{noise}-s{seed}"
        for seed in (0, 1)
        for noise in ("0", "0.4")
        for cell in cells
    ]
    assert names == expected
    by_name = {run.name: run.config for run in runs}
    assert by_name["sam-aace-rho0.2-noise0.4-s1"].rho == 0.2
    assert by_name["sam-aace-rho0.2-noise0.4-s1"].label_noise == 0.4
    assert by_name["sam-aace-rho0.2-noise0.4-s1"].seed == 1
    assert by_name["sam-rho0.05-noise0-s0"].sam_every == 5
    assert by_name["sgd-noise0-s0"].sam_every == 1  # SGD has no SAM steps to schedule
    assert by_name["sgd-noise0-s0"].out == str(Path("out") / "sgd-noise0-s0")
    assert all(config.epochs == 3 for config in by_name.values())
    # Without --rho and --label-noise: default rho, names without either.
    plain = sweep.plan({}, "o", sweep.parse_optimizers("sgd,sam-aace"), seeds=1)
    assert [run.name for run in plain] == ["sgd-s0", "sam-aace-s0"]
    assert plain[1].config.rho is None and plain[1].config.resolved_rho == 0.2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: sweep.parse_optimizers("sgd,adam"), "--optimizers: got 'adam' in 'sgd,adam'"),
        (lambda: sweep.parse_optimizers("sgd:0.1"), "--optimizers: got 'sgd:0.1'; sgd has no rho"),
        (lambda: sweep.parse_optimizers("sam:x"), "--optimizers: got 'x' in 'sam:x'"),
        (lambda: sweep.parse_optimizers("adam"), "--optimizers: got 'adam'; expected"),
        (lambda: sweep.parse_numbers("label-noise", "0,2", 0, 1), "--label-noise: got 2 in '0,2'"),
        (lambda: sweep.plan({}, "o", [("sgd", None)], seeds=0), "--seeds: got 0; expected"),
        (lambda: sweep.plan({}, "o", [("sgd", None)], seed=-1), "--seed: got -1; expected"),
        (lambda: sweep.plan({"lr": -1}, "o", [("sgd", None)]), "--lr: got -1; expected"),
    ],
)
def test_bad_grid_is_named(call, message):
    with pytest.raises(ConfigError) as error:
        call()
    assert message in str(error.value)


def test_seed_is_the_first_seed_and_seeds_count_from_it(tiny_npz, tmp_path, monkeypatch):
    planned = []

    def record(runs, jobs, log):
        planned.extend(runs)
        return []

    monkeypatch.setattr(sweep, "run_sweep", record)
    monkeypatch.setattr(sweep, "write_comparison", lambda runs, out, baseline: "")
    argv = ["sweep", "--out", str(tmp_path / "s"), "--optimizers", "sgd", "--seed", "5"]
    assert main([*argv, "--seeds", "2", "--", *_train_args(tiny_npz)]) == 0
    assert [(run.name, run.config.seed) for run in planned] == [("sgd-s5", 5), ("sgd-s6", 6)]
    planned.clear()  # without --seed: 0 ... N-1, as before
    assert main([*argv[:-2], "--seeds", "2", "--", *_train_args(tiny_npz)]) == 0
    assert [run.name for run in planned] == ["sgd-s0", "sgd-s1"]


def test_sweep_trains_the_grid_in_parallel_and_rerunning_trains_nothing(
    tiny_npz, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(sweep, "available_cpus", lambda: 2)
    out = tmp_path / "sweep"
    argv = ["sweep", "--out", str(out), "--optimizers", "sgd,sam-aace", "--rhos", "0.1,0.2"]
    argv += ["--seeds", "2", "--label-noise", "0,0.5", "--jobs", "2", "--baseline", "sgd", "--"]
    argv += _train_args(tiny_npz)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "sweep: 12 runs, 0 finished, 0 to resume, 12 to start; 2 job(s) x 1 thread(s)" in printed
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(names) == 12 and "sam-aace-rho0.2-noise0.5-s1" in names
    table = (out / "compare.md").read_text()
    assert table.strip() in printed and "Δ final vs sgd (pp)" in table
    rows = table.split("\n\n")[0].strip().splitlines()  # the table, without the note under it
    assert len(rows) == 2 + 6  # header, rule, 3 optimizers x 2 noise rates
    log = (out / "sgd-noise0-s0" / "train.log").read_text()
    assert "1 torch thread(s)" in log and "final test accuracy" not in printed.split("|")[0]

    # A sweep run is the run 'aace train' makes with the same settings (and, for the same
    # float reduction order, the same one torch thread).
    direct = tmp_path / "direct"
    flags = ["--optimizer", "sam-aace", "--rho", "0.2", "--seed", "1", "--label-noise", "0.5"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *_train_args(tiny_npz), *flags, "--out", str(direct)]) == 0
    finally:
        torch.set_num_threads(threads)
    swept = (out / "sam-aace-rho0.2-noise0.5-s1" / "metrics.jsonl").read_text().splitlines()
    mine = (direct / "metrics.jsonl").read_text().splitlines()
    drop = ("seconds", "images_per_second")
    assert [{k: v for k, v in json.loads(r).items() if k not in drop} for r in swept] == [
        {k: v for k, v in json.loads(r).items() if k not in drop} for r in mine
    ]

    checkpoints = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoint.pt")}
    capsys.readouterr()
    assert main(argv) == 0
    assert "12 runs, 12 finished, 0 to resume, 0 to start" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoint.pt")} == checkpoints


def test_an_interrupted_run_continues_where_it_stopped(tiny_npz, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--out", str(out), "--optimizers", "sam-aace", "--seeds", "1", "--"]
    argv += [*_train_args(tiny_npz), "--epochs", "3"]
    # The sweep's run, killed (SIGKILL) at its 9th step, in epoch 2 of 3 (6 steps per epoch).
    run = out / "sam-aace-s0"
    killed = subprocess.run(
        [sys.executable, FAULTS, "train", *_train_args(tiny_npz), "--epochs", "3",
         "--optimizer", "sam-aace", "--seed", "0", "--out", str(run)],
        env={**os.environ, "AACE_FAULTS": "step:9"}, capture_output=True, text=True,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert main(argv) == 0
    assert "1 runs, 0 finished, 1 to resume, 0 to start" in capsys.readouterr().out
    reference = tmp_path / "reference"
    flags = ["--epochs", "3", "--optimizer", "sam-aace", "--out", str(reference)]
    assert main(["train", *_train_args(tiny_npz), *flags]) == 0
    final = [json.loads((p / "summary.json").read_text()) for p in (run, reference)]
    assert final[0]["final_test_acc"] == final[1]["final_test_acc"]
    assert final[0]["final_test_loss"] == final[1]["final_test_loss"]


def test_a_failing_run_is_reported_and_the_others_finish(tiny_npz, tmp_path, capsys):
    out = tmp_path / "sweep"
    # rho 1e30 sends the perturbed weights to inf: that run stops on a non-finite loss.
    argv = ["sweep", "--out", str(out), "--optimizers", "sgd,sam-aace:1e30", "--seeds", "1", "--"]
    assert main([*argv, *_train_args(tiny_npz)]) == 1
    captured = capsys.readouterr()
    assert "sam-aace-rho1e+30-s0: failed: " in captured.out
    assert "aace: error: 1 of 2 runs failed (sam-aace-rho1e+30-s0)" in captured.err
    assert (out / "sgd-s0" / "summary.json").is_file()
    assert "Traceback" in (out / "sam-aace-rho1e+30-s0" / "train.log").read_text()


def test_a_deadline_stops_the_runs_at_a_checkpoint_and_starts_none_too_late(tiny_npz, tmp_path):
    """run_sweep(deadline=...): a run going when it passes writes a checkpoint and stops, a run
    that would start with min_start seconds or fewer left does not start; the sweep returns."""
    base = dict(dataset=f"npz:{tiny_npz}", model="wrn10_1", epochs=5000, batch_size=4)
    out = tmp_path / "sweep"
    runs = sweep.plan(base, out, [("sgd", None)], seeds=2)
    lines: list[str] = []
    far = time.monotonic() + 3600
    outcomes = sweep.run_sweep(runs, 2, lines.append, deadline=far, min_start=7200)
    assert [(o.trained, o.stopped, o.summary, o.error) for o in outcomes] == [
        (False, False, None, None)
    ] * 2
    assert not out.exists() and "2 run(s) not started" in lines[-1]

    # One job: the first run trains until the deadline, the second would start after it.
    lines.clear()
    outcomes = sweep.run_sweep(runs, 1, lines.append, deadline=time.monotonic() + 30)
    first, second = outcomes
    assert first.stopped and first.error is None and first.summary is None, lines
    assert (out / "sgd-s0" / "checkpoint.pt").is_file()
    assert not (out / "sgd-s0" / "summary.json").exists()
    assert not second.trained and not (out / "sgd-s1").exists()
    assert "sweep: the deadline has come: stopping 1 run(s)" in lines


@pytest.mark.parametrize(
    ("extra", "after", "message"),
    [
        ([], ["--seed", "1"], "before -- instead (--seed, --seeds N)"),
        ([], ["--rho", "0.1"], "--rho after --: the sweep sets it"),
        (["--baseline", "adam"], [], "--baseline: got 'adam'; expected one of the sweep's"),
        (["--jobs", "0"], [], "--jobs: got 0; expected an integer >= 1"),
        (["--rhos", "0.1,-1"], [], "--rhos: got -1 in '0.1,-1'; expected numbers in [0, inf]"),
        ([], ["--epochs", "0"], "--epochs: got 0; expected an integer >= 1"),
        ([], ["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_sweep_input_is_one_line_and_exit_2(tiny_npz, tmp_path, extra, after, message, capsys):
    argv = ["sweep", "--out", str(tmp_path / "s"), "--seeds", "1", *extra, "--"]
    assert main([*argv, *_train_args(tiny_npz), *after]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[0] and (len(err) == 1 or err[1].startswith("hint:"))


def test_a_folder_of_other_settings_is_refused_before_anything_runs(tiny_npz, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--out", str(out), "--optimizers", "sgd", "--seeds", "1", "--"]
    assert main([*argv, *_train_args(tiny_npz)]) == 0
    capsys.readouterr()
    assert main([*argv, *_train_args(tiny_npz), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings (epochs: 2 there, 3 now)" in err


def _wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _worker_pids(out: Path) -> set[int]:
    return {
        int(line.split("pid ")[1].split(",")[0])
        for log in out.glob("*/train.log")
        for line in log.read_text().splitlines()
        if line.startswith("aace sweep: pid ")
    }


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_a_stopped_sweep_stops_its_runs_at_a_checkpoint(tiny_npz, tmp_path):
    """SIGTERM to the sweep: every run checkpoints and stops, exit status 75. SIGKILL to the
    sweep: its workers notice, checkpoint and exit instead of training on unobserved."""
    out = tmp_path / "sweep"
    names = ("sgd-s0", "sgd-s1")
    command = [sys.executable, "-m", "aace", "sweep", "--out", str(out), "--optimizers", "sgd"]
    command += ["--seeds", "2", "--jobs", "2", "--", *_train_args(tiny_npz), "--epochs", "5000"]

    def epochs() -> list[int]:
        files = [out / name / "metrics.jsonl" for name in names]
        return [len(f.read_text().splitlines()) if f.is_file() else 0 for f in files]

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            command, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

    sweep_process = start()
    _wait_for(lambda: min(epochs()) >= 1)
    sweep_process.send_signal(signal.SIGTERM)
    stdout, stderr = sweep_process.communicate(timeout=120)
    assert sweep_process.returncode == 75, stderr
    assert stderr.strip().splitlines() == [
        "aace: sweep stopped by SIGTERM: 2 run(s) wrote a checkpoint and stopped; rerun the "
        "same command to continue"
    ]
    assert stdout.count(": stopped on SIGTERM") == 2
    assert all((out / name / "checkpoint.pt").is_file() for name in names)
    assert not any((out / name / "summary.json").exists() for name in names)
    _wait_for(lambda: not any(_alive(pid) for pid in _worker_pids(out)), timeout=30)

    # The same command resumes both runs; then the sweep dies without a word.
    reached = max(epochs())
    sweep_process = start()
    _wait_for(lambda: min(epochs()) > reached)
    sweep_process.kill()
    stdout, _ = sweep_process.communicate(timeout=60)
    assert "2 runs, 0 finished, 2 to resume, 0 to start" in stdout
    _wait_for(lambda: not any(_alive(pid) for pid in _worker_pids(out)), timeout=60)
    for name in names:  # each run was stopped twice, each time at a checkpoint
        log = (out / name / "train.log").read_text()
        assert log.count("aace sweep: stopped by SIGTERM") == 2, log[-2000:]


def test_old_spellings_still_work_with_one_line(capsys):
    from aace.cli import build_parser

    args = build_parser().parse_args(["sweep", "--out", "x", "--optimizer", "sam", "--rho", "0.1"])
    assert (args.optimizers, args.rhos) == ("sam", "0.1")
    assert capsys.readouterr().err.splitlines() == [
        "aace: warning: --optimizer is deprecated; use --optimizers",
        "aace: warning: --rho is deprecated; use --rhos",
    ]
    args = build_parser().parse_args(["plot", "r", "--out", "c.png", "--debug"])
    assert (args.figure, args.debug) == ("c.png", True)
    assert "--out is deprecated; use --figure" in capsys.readouterr().err
    args = build_parser().parse_args(["tune", "--out", "x", "--optimizer", "sgd,sam"])
    assert args.optimizers == "sgd,sam"
    assert capsys.readouterr().err.splitlines() == [
        "aace: warning: --optimizer is deprecated; use --optimizers"
    ]
