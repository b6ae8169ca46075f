"""A converged run: SGD, SAM and SAM+AACE trained to the end of the paper's schedule, n seeds.

The GPU recipe of issue 13 (``benchmarks/gpu/run_all.sh`` calls it):

    python -m benchmarks.studies.converged --dataset npz:benchmarks/out/data/cifar10_5k.npz \\
        --model wrn16_8 --epochs 200 --seeds 3 --device cuda --budget 540

The runs are an ``aace sweep`` grid (:mod:`aace.training.sweep`), each run training in a worker
process of its own, with the settings of the paper's presets (``aace presets``: lr 0.1,
momentum 0.9, weight decay 5e-4, step schedule x0.2 at 30/60/80 % of the epochs, label smoothing
0.1 in the update loss, batch 256 as in the WRN-28-10 presets), SAM at its rho 0.05 and SAM+AACE
at its rho 0.2 (the presets'), each in ``<runs-dir>/<optimizer>-s<seed>``. Runs go seed by seed
(SGD, SAM, SAM+AACE of seed 0 first), so a partial sweep still compares like with like;
``--parallel N`` trains N at once on the one device (small models leave a large GPU idle between
kernels and while checkpoints are written).

Time-limited sessions: ``--budget SECONDS`` is the sweep's deadline: no run starts with
``--min-start`` seconds or fewer left, and at the deadline the runs still going write a
checkpoint at their next step boundary and stop; a SIGTERM or Ctrl-C does the same at once.
Calling the same command again resumes every run exactly where it stopped; finished runs (with
``summary.json``) are skipped. The script exits 0 when every run has finished, 75 when some have
not (rerun it), 1 when a run failed.

Whatever has finished at least one epoch is reported: ``<out-dir>/<name>.{json,md,png}`` with
the ``aace compare`` table (final and best test accuracy, mean ± std over seeds, with the epochs
reached), the mechanism table of the replication study (perturbation-loss gradient norm and
cosine between consecutive perturbations, first vs last third of training) and the ``aace plot``
curves. ``--copy-runs DIR`` also copies every run's ``config.json``, ``metrics.jsonl``,
``summary.json`` and ``train.log`` (not the checkpoints, which are too large to leave a GPU
machine that is given back) to ``DIR/<run>/``, where ``aace compare DIR/*`` and ``aace plot``
read them. ``--first-seed K`` starts the seeds at K, so a later session adds seeds to an earlier
one's; ``--report-only --runs-dir DIR --seeds N`` then reports all of them from the copies.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from aace.report import compare_table, plot_runs, read_run
from aace.training import sweep
from aace.training.config import OPTIMIZER_TABLE, PRESETS, ConfigError
from aace.training.preemption import EXIT_PREEMPTED, Preempted
from benchmarks.harness import DEFAULT_OUT_DIR, non_negative_int, positive_int, write_results
from benchmarks.studies.common import mechanism_table

# The paper's recipe as the presets hold it; the WRN-28-10 CIFAR-10 preset is the reference.
PRESET = "wrn28-10-cifar10"
OPTIMIZERS = ("sgd", "sam", "sam-aace")
# Each optimizer at its default rho (the runs' names carry none): SAM's 0.05 (Foret et al.),
# SAM+AACE's 0.2, which is the presets' rho.
RHO = {name: OPTIMIZER_TABLE[name].default_rho for name in OPTIMIZERS}


def plan(args: argparse.Namespace, runs_dir: Path) -> list[sweep.SweepRun]:
    """The grid: seeds ``--first-seed`` .. ``+ --seeds - 1``, SGD, SAM and SAM+AACE each (preset
    values spelled out, so a run's ``config.json`` holds no preset name that its model and
    dataset would contradict)."""
    preset = PRESETS[PRESET]
    base = dict(
        dataset=args.dataset, model=args.model, epochs=args.epochs, lr=preset["lr"],
        momentum=preset["momentum"], weight_decay=preset["weight_decay"],
        schedule=preset["schedule"], label_smoothing=preset["label_smoothing"],
        batch_size=args.batch_size or preset["batch_size"], device=args.device, amp=args.amp,
        compile=args.compile,
    )  # fmt: skip
    return sweep.plan(
        base,
        runs_dir,
        [(name, None) for name in OPTIMIZERS],
        seeds=args.seeds,
        seed=args.first_seed,
    )


def status(run: sweep.SweepRun, outcome: sweep.Outcome | None) -> str:
    if run.finished:
        return "finished"
    if outcome is not None and outcome.error is not None:
        return f"failed ({outcome.error}; see {run.out / sweep.LOG})"
    if run.directory.has_checkpoint:
        return "stopped (resumable)"
    if run.directory.read_rows(missing_ok=True):
        return "unfinished"  # a copy, without its checkpoint
    return "not started"


def copy_runs(runs: list[sweep.SweepRun], target: Path) -> None:
    """The small files of every run (not its checkpoint) to ``target/<run>/``."""
    for run in runs:
        if not run.out.is_dir():
            continue
        (target / run.name).mkdir(parents=True, exist_ok=True)
        directory = run.directory
        for path in (
            directory.config_file,
            directory.metrics_file,
            directory.summary_file,
            run.out / sweep.LOG,
        ):
            if path.is_file():
                shutil.copy2(path, target / run.name / path.name)


def report(
    args: argparse.Namespace, runs: list[sweep.SweepRun], statuses: dict[str, str]
) -> str | None:
    readable = []
    for run in runs:
        try:
            read_run(run.out)
        except ValueError:  # not started, or no epoch finished yet
            continue
        readable.append(run.out)
    if args.copy_runs:
        copy_runs(runs, args.copy_runs)
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
    for run in runs:
        epochs = len(read_run(run.out).rows) if run.out in readable else 0
        status_rows.append(f"| {run.name} | {epochs} / {args.epochs} | {statuses[run.name]} |")
    finished = sum(statuses[run.name] == "finished" for run in runs)
    state = (
        f"{finished} of {len(runs)} runs finished"
        + ("" if finished == len(runs) else "; rerun the same command to continue the others")
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
        [{"run": run.name, "status": statuses[run.name]} for run in runs],
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
        notes=f"Curves: {plot.name} (one line per run). Each run's settings are its "
        "`config.json`, its log `<runs-dir>/<run>/train.log`.",
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
        help="start no run with this many seconds of --budget left or fewer: its set-up (CUDA, "
        "data, compilation) would be spent for a few steps (default: %(default)s)",
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
    outcomes: dict[str, sweep.Outcome] = {}
    stopped = False
    try:
        runs = plan(args, runs_dir)
        if not args.report_only:
            # The sweep's deadline (bookkeeping of the session's budget, not a timing).
            deadline = time.monotonic() + args.budget if args.budget else None
            for outcome in sweep.run_sweep(
                runs,
                args.parallel,
                log=lambda line: print(line, flush=True),
                deadline=deadline,
                min_start=args.min_start,
            ):
                outcomes[outcome.run.name] = outcome
    except ConfigError as error:
        print(f"converged.py: error: {error}", file=sys.stderr)
        return 2
    except Preempted as error:  # SIGTERM or Ctrl-C: the runs wrote a checkpoint each
        print(f"-- {error}", flush=True)
        stopped = True
    statuses = {run.name: status(run, outcomes.get(run.name)) for run in runs}
    text = report(args, runs, statuses)
    if text:
        print(text)
    failed = [run for run in runs if statuses[run.name].startswith("failed")]
    for run in failed:
        print(f"converged.py: {run.name} {statuses[run.name]}", file=sys.stderr)
        log = run.out / sweep.LOG
        if log.is_file():
            print("".join(log.read_text().splitlines(keepends=True)[-5:]), file=sys.stderr)
    # 75 (as aace train's own stop): not all runs have finished; the same command continues.
    unfinished = stopped or any(statuses[run.name] != "finished" for run in runs)
    return 1 if failed else (EXIT_PREEMPTED if unfinished else 0)


if __name__ == "__main__":
    sys.exit(main())
