"""A converged run: SGD, SAM and SAM+AACE trained to the end of the paper's schedule, n seeds.

The GPU recipe of issue 13 (``benchmarks/gpu/run_all.sh`` calls it):

    python benchmarks/converged.py --dataset npz:benchmarks/out/data/cifar10_5k.npz \\
        --model wrn16_8 --epochs 200 --seeds 3 --device cuda --budget 540

Every run is a real ``aace train`` run (a subprocess, ``python -m aace train ... --resume``) with
the settings of the paper's presets (``aace presets``: lr 0.1, momentum 0.9, weight decay 5e-4,
step schedule x0.2 at 30/60/80 % of the epochs, label smoothing 0.1 in the update loss, batch
256 as in the WRN-28-10 presets), SAM at rho 0.05 and SAM+AACE at the presets' rho 0.2, each in
``<runs-dir>/<optimizer>-s<seed>``. Runs go seed by seed (SGD, SAM, SAM+AACE of seed 0 first), so
a partial sweep still compares like with like; ``--parallel N`` trains N at once on the one device
(small models leave a large GPU idle between kernels and while checkpoints are written).

Time-limited sessions: ``--budget SECONDS`` stops starting runs once too little is left and, at
the deadline, sends SIGTERM to the runs still going; ``aace train`` then writes a checkpoint at
the next step boundary and exits (status 75). Calling the same command again resumes every run
exactly where it stopped; finished runs (with ``summary.json``) are skipped. The script exits 0
when every run has finished, 75 when some have not (rerun it), 1 when a run failed.

Whatever has finished at least one epoch is reported: ``<out-dir>/<name>.{json,md,png}`` with
the ``aace compare`` table (final and best test accuracy, mean ± std over seeds, with the epochs
reached), the mechanism table of ``replicate.py`` (perturbation-loss gradient norm and cosine
between consecutive perturbations, first vs last third of training) and the ``aace plot``
curves. ``--copy-runs DIR`` also copies every run's ``config.json``, ``metrics.jsonl``,
``summary.json`` and log (not the checkpoints, which are too large to leave a GPU machine that
is given back) to ``DIR/<run>/``, where ``aace compare DIR/*`` and ``aace plot`` read them.
``--first-seed K`` starts the seeds at K, so a later session adds seeds to an earlier one's;
``--report-only --runs-dir DIR --seeds N`` then reports all of them from the copies.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _common import DEFAULT_OUT_DIR, non_negative_int, positive_int, write_results
from replicate import mechanism_table

from aace.report import compare_table, plot_runs, read_run
from aace.runs import CONFIG, METRICS, SUMMARY, RunDirectory
from aace.training.config import OPTIMIZER_TABLE, PRESETS

# The paper's recipe as the presets hold it; the WRN-28-10 CIFAR-10 preset is the reference.
PRESET = "wrn28-10-cifar10"
OPTIMIZERS = ("sgd", "sam", "sam-aace")
RHO = {"sgd": None, "sam": OPTIMIZER_TABLE["sam"].default_rho, "sam-aace": PRESETS[PRESET]["rho"]}
EXIT_PREEMPTED = 75
# After SIGTERM a run finishes its step and writes a checkpoint; then it is killed.
STOP_GRACE_S = 90.0


class Stop(Exception):
    """SIGTERM reached this script (a time limit): stop the runs resumably, then report."""


def _raise_stop(signum: int, frame: object) -> None:
    raise Stop(f"signal {signum}")


@dataclass
class Job:
    optimizer: str
    seed: int
    out: Path
    log: Path
    process: subprocess.Popen | None = None
    started: float = 0.0
    status: str = "pending"
    returncodes: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.out.name

    @property
    def finished(self) -> bool:
        return RunDirectory(self.out).finished

    @property
    def pid_file(self) -> Path:
        return self.out.parent / f"{self.out.name}.pid"


def _stop_leftover(job: Job) -> None:
    """A run of an earlier call that outlived it (the runs are in sessions of their own, so a
    killed parent leaves them going): stop it with a checkpoint before resuming it."""
    try:
        pid = int(job.pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        return
    if str(job.out) not in cmdline:
        return  # the pid now belongs to another process
    print(f"-- {job.name}: an earlier call's run (pid {pid}) is still going; stopping it")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(1.0)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)


def train_command(args: argparse.Namespace, job: Job) -> list[str]:
    """The ``aace train`` command of one run (preset values spelled out, so the run's
    ``config.json`` holds no preset name that its model and dataset would contradict)."""
    preset = PRESETS[PRESET]
    command = [
        sys.executable,
        "-m",
        "aace",
        "train",
        "--dataset",
        args.dataset,
        "--model",
        args.model,
        "--optimizer",
        job.optimizer,
        "--lr",
        str(preset["lr"]),
        "--momentum",
        str(preset["momentum"]),
        "--weight-decay",
        str(preset["weight_decay"]),
        "--schedule",
        preset["schedule"],
        "--label-smoothing",
        str(preset["label_smoothing"]),
        "--batch-size",
        str(args.batch_size or preset["batch_size"]),
        "--epochs",
        str(args.epochs),
        "--seed",
        str(job.seed),
        "--device",
        args.device,
        "--amp",
        args.amp,
        "--out",
        str(job.out),
        "--resume",
    ]
    if RHO[job.optimizer] is not None:
        command += ["--rho", str(RHO[job.optimizer])]
    if args.compile:
        command.append("--compile")
    return command


def _stop(jobs: list[Job]) -> None:
    """SIGTERM every running job, wait for their checkpoints, kill what is left."""
    running = [job for job in jobs if job.process is not None and job.process.poll() is None]
    for job in running:
        print(f"-- stopping {job.name} (checkpoint, then exit)", flush=True)
        job.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for job in running:
        try:
            job.process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"-- {job.name} did not stop in {STOP_GRACE_S:.0f} s; killed", flush=True)
            job.process.kill()
            job.process.wait()


def _reap(job: Job) -> None:
    code = job.process.returncode
    job.returncodes.append(code)
    job.process = None
    if job.finished:
        job.status = "finished"
    elif code == EXIT_PREEMPTED:
        job.status = "stopped (resumable)"
    else:
        job.status = f"failed (exit {code}; see {job.log})"
    minutes = (time.monotonic() - job.started) / 60
    print(f"-- {job.name}: {job.status} after {minutes:.1f} min", flush=True)


def run_jobs(args: argparse.Namespace, jobs: list[Job]) -> None:
    """Start jobs in order, at most ``--parallel`` at once, until done or out of budget."""
    deadline = time.monotonic() + args.budget if args.budget else None
    queue = [job for job in jobs if not job.finished]
    for job in jobs:
        if job.finished:
            job.status = "finished"
    running: list[Job] = []
    while queue or running:
        for job in list(running):
            if job.process.poll() is not None:
                _reap(job)
                running.remove(job)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            _stop(running)
            for job in running:
                _reap(job)
            running = []
            break
        while queue and len(running) < args.parallel and (left is None or left > args.min_start):
            job = queue.pop(0)
            job.out.parent.mkdir(parents=True, exist_ok=True)
            _stop_leftover(job)
            command = train_command(args, job)
            print(f"== {job.name}: {' '.join(command[1:])}", flush=True)
            with job.log.open("a") as log:
                log.write(f"\n== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(command)}\n")
                log.flush()
                # A new session: a Ctrl-C in the terminal reaches this script, which stops
                # the runs itself (SIGTERM, checkpoint), instead of killing them mid-write.
                job.process = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=dict(os.environ, PYTHONUNBUFFERED="1"),
                )
            job.pid_file.write_text(str(job.process.pid))
            job.started = time.monotonic()
            job.status = "running"
            running.append(job)
        if not running and queue:
            print(
                f"-- {len(queue)} run(s) not started: {left:.0f} s left, under the "
                f"--min-start {args.min_start} s; rerun the command to continue",
                flush=True,
            )
            break
        time.sleep(2.0)


def copy_runs(jobs: list[Job], target: Path) -> None:
    """The small files of every run (not its checkpoint) to ``target/<run>/``."""
    for job in jobs:
        if not job.out.is_dir():
            continue
        (target / job.name).mkdir(parents=True, exist_ok=True)
        for name in (CONFIG, METRICS, SUMMARY):
            if (job.out / name).is_file():
                shutil.copy2(job.out / name, target / job.name / name)
        if job.log.is_file():
            shutil.copy2(job.log, target / job.name / "train.log")


def report(args: argparse.Namespace, jobs: list[Job]) -> str | None:
    readable = []
    for job in jobs:
        if job.finished:
            job.status = "finished"
        try:
            read_run(job.out)
        except ValueError:  # not started, or no epoch finished yet
            continue
        readable.append(job.out)
    if args.copy_runs:
        copy_runs(jobs, args.copy_runs)
    if not readable:
        print("no run has finished an epoch yet: nothing to report", flush=True)
        return None
    accuracy = compare_table(readable)
    try:
        mechanism, mechanism_rows = mechanism_table(readable)
    except (ValueError, KeyError, ZeroDivisionError) as error:  # too few epochs for thirds
        mechanism, mechanism_rows = f"(not available yet: {error})", []
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    plot = plot_runs(readable, Path(args.out_dir) / f"{args.name}.png")
    status_rows = []
    for job in jobs:
        epochs = len(read_run(job.out).rows) if job.out in readable else 0
        status_rows.append(f"| {job.name} | {epochs} / {args.epochs} | {job.status} |")
    finished = sum(job.status == "finished" for job in jobs)
    state = (
        f"{finished} of {len(jobs)} runs finished"
        + ("" if finished == len(jobs) else "; rerun the same command to continue the others")
        + "."
    )
    preset = PRESETS[PRESET]
    recipe = (
        f"`{args.model}` on `{args.dataset}`, {args.epochs} epochs, the presets' recipe "
        f"(`{PRESET}` values: lr {preset['lr']}, momentum {preset['momentum']}, weight decay "
        f"{preset['weight_decay']}, {preset['schedule']} schedule, label smoothing "
        f"{preset['label_smoothing']}, batch {args.batch_size or preset['batch_size']}), SAM rho "
        f"{RHO['sam']}, SAM+AACE rho {RHO['sam-aace']}, amp {args.amp}"
        + (", compiled" if args.compile else "")
        + "."
    )
    text = write_results(
        args.name,
        [{"run": job.name, "status": job.status, "returncodes": job.returncodes} for job in jobs],
        f"{recipe} {state}\n\n"
        f"### Test accuracy\n\n{accuracy}\n\n"
        f"### Mechanism: perturbation-loss gradient norm and consecutive-perturbation cosine\n\n"
        f"{mechanism}\n\n### Runs\n\n| run | epochs | status |\n|---|---|---|\n"
        + "\n".join(status_rows),
        args.out_dir,
        device=torch.device(args.device),
        config={
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "preset_values_from": PRESET,
            "rho": RHO,
        },
        extra={"runs": [str(p) for p in readable], "mechanism": mechanism_rows},
        notes=f"Curves: {plot.name} (one line per run). Each run's command is at the top of "
        f"its log, `<runs-dir>/<run>.log`.",
    )
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="npz:PATH (e.g. the CIFAR-10 subset)")
    parser.add_argument("--model", default="wrn16_8")
    parser.add_argument("--epochs", type=positive_int, default=PRESETS[PRESET]["epochs"])
    parser.add_argument(
        "--seeds",
        type=positive_int,
        default=3,
        help="number of seeds, each with SGD, SAM and SAM+AACE (default: %(default)s)",
    )
    parser.add_argument(
        "--first-seed",
        type=non_negative_int,
        default=0,
        help="seeds K..K+N-1 (default: %(default)s); another session's seeds go on from there",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help=f"default: the presets' {PRESETS[PRESET]['batch_size']}",
    )
    parser.add_argument("--device", default="cuda", help="auto, cpu or cuda (default: cuda)")
    parser.add_argument(
        "--amp", choices=("off", "bf16"), default="off", help="default: off (the presets')"
    )
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=False, help="aace --compile"
    )
    parser.add_argument(
        "--parallel",
        type=positive_int,
        default=3,
        help="runs trained at once on the device (default: %(default)s)",
    )
    parser.add_argument(
        "--budget",
        type=non_negative_int,
        default=0,
        help="seconds; stop (resumably) when they are spent (default: 0, no limit)",
    )
    parser.add_argument(
        "--min-start",
        type=non_negative_int,
        default=90,
        help="start no run with fewer seconds of --budget left: CUDA set-up and the first "
        "epoch would be lost (default: %(default)s)",
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=None,
        help="the run directories <optimizer>-s<seed> (default: "
        "runs/converged/<dataset stem>-<model>-e<epochs>); with --report-only also a --copy-runs "
        "directory",
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--name", default=None, help="default: converged-<dataset file stem>")
    parser.add_argument(
        "--copy-runs",
        type=Path,
        default=None,
        metavar="DIR",
        help="also copy each run's config.json, metrics.jsonl, summary.json and log to DIR/<run>",
    )
    parser.add_argument(
        "--report-only",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train nothing; report the runs that exist",
    )
    args = parser.parse_args(argv)
    if not args.dataset.startswith("npz:"):
        parser.error(f"--dataset: got {args.dataset!r}; expected npz:PATH")
    if not Path(args.dataset[4:]).is_file():
        print(
            f"converged.py: error: --dataset: file '{args.dataset[4:]}' not found", file=sys.stderr
        )
        return 2
    stem = Path(args.dataset[4:]).stem
    args.name = args.name or f"converged-{stem}"
    runs_dir = args.runs_dir or Path("runs/converged") / f"{stem}-{args.model}-e{args.epochs}"
    jobs = [
        Job(
            optimizer,
            seed,
            runs_dir / f"{optimizer}-s{seed}",
            runs_dir / f"{optimizer}-s{seed}.log",
        )
        for seed in range(args.first_seed, args.first_seed + args.seeds)
        for optimizer in OPTIMIZERS
    ]
    stopped = False
    if not args.report_only:
        signal.signal(signal.SIGTERM, _raise_stop)
        try:
            run_jobs(args, jobs)
        except (KeyboardInterrupt, Stop) as error:
            print(f"-- interrupted ({error or 'Ctrl-C'}): stopping the runs resumably", flush=True)
            _stop(jobs)
            for job in jobs:
                if job.process is not None:
                    _reap(job)
            stopped = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    text = report(args, jobs)
    if text:
        print(text)
    failed = [job for job in jobs if job.status.startswith("failed")]
    for job in failed:
        print(f"converged.py: {job.name} {job.status}", file=sys.stderr)
        if job.log.is_file():
            print("".join(job.log.read_text().splitlines(keepends=True)[-5:]), file=sys.stderr)
    # 75 (as aace train's own stop): not all runs have finished; the same command continues.
    unfinished = stopped or any(job.status != "finished" for job in jobs)
    return 1 if failed else (EXIT_PREEMPTED if unfinished else 0)


if __name__ == "__main__":
    sys.exit(main())
