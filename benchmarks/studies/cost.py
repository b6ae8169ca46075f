"""What SAM+AACE costs and keeps when only some steps are SAM steps (``aace.schedule``).

Rerun the reported measurements from the repository root with:

    .venv/bin/python -m benchmarks.studies.cost --dataset digits --model wrn16_1 --epochs 15 \\
        --batch-size 64 --lr 0.05 --seeds 3 --name cost-digits

    .venv/bin/python -m benchmarks.studies.cost --dataset npz:../shared/data/cifar10_5k.npz \\
        --model wrn10_1 --epochs 10 --batch-size 128 --lr 0.1 --seeds 3 --name cost-cifar10_5k

Every figure comes from real ``aace train`` runs (subprocesses, cosine LR schedule, rho 0.2 for
SAM+AACE), one per configuration and seed, into ``--runs-dir`` (default ``runs/<name>``):

* ``sgd``; ``sam-aace`` (a SAM step at every step);
* ``every2``, ``every5``: ``--sam-every 2`` / ``5``;
* ``start0.5``, ``start0.8``: ``--sam-start 0.5`` / ``0.8``;
* ``adaptive0``, ``adaptive-1``: ``--sam-adaptive 0`` / ``-1``.

The configurations of one seed run back to back (seed-major, the order rotating from seed to
seed), so that SGD and the schedules see about the same machine load. For each run the script
records the whole process's wall clock and its CPU time (user + system, from
``getrusage(RUSAGE_CHILDREN)``; less sensitive to other processes on a shared machine than the
wall clock), and the training time (sum of the epochs' ``seconds``: training and evaluation,
without start-up). Ratios to SGD are taken per seed (same sitting) and then averaged.

Resumable: a run with a ``cost.json`` is kept; a run directory without one (an interrupted run)
is deleted and run again from the start, so that every time is that of one uninterrupted
process. ``--report-only`` rewrites the results from the run directories.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from aace.runs import RunDirectory
from benchmarks import harness

CONFIGS: dict[str, list[str]] = {
    "sgd": ["--optimizer", "sgd"],
    "sam-aace": ["--optimizer", "sam-aace"],
    "every2": ["--optimizer", "sam-aace", "--sam-every", "2"],
    "every5": ["--optimizer", "sam-aace", "--sam-every", "5"],
    "start0.5": ["--optimizer", "sam-aace", "--sam-start", "0.5"],
    "start0.8": ["--optimizer", "sam-aace", "--sam-start", "0.8"],
    "adaptive0": ["--optimizer", "sam-aace", "--sam-adaptive", "0"],
    "adaptive-1": ["--optimizer", "sam-aace", "--sam-adaptive", "-1"],
}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=harness.REPOSITORY,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_one(args: argparse.Namespace, config: str, seed: int, out: Path) -> dict[str, Any]:
    """One ``aace train`` subprocess; returns (and stores in ``out/cost.json``) its times."""
    if out.exists():
        shutil.rmtree(out)  # an interrupted run: start it again, for an uninterrupted time
    command = [
        sys.executable, "-m", "aace", "train", "--dataset", args.dataset, "--model", args.model,
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--schedule", "cosine", "--seed", str(seed), "--device", "cpu", "--out", str(out),
        *CONFIGS[config],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result, wall = harness.timed(
        lambda: subprocess.run(command, env=env, capture_output=True, text=True)
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{config} seed {seed} failed:\n{result.stderr}")
    record = {
        "config": config,
        "seed": seed,
        "command": command,
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "load_average_after": list(os.getloadavg()),
        "commit": _git_commit(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "cost.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def collect(runs_dir: Path, seeds: list[int]) -> list[dict[str, Any]]:
    rows = []
    for seed in seeds:
        for config in CONFIGS:
            out = runs_dir / f"{config}-s{seed}"
            if not (out / "cost.json").exists():
                continue
            record = json.loads((out / "cost.json").read_text())
            run = RunDirectory(out)
            summary, metrics = run.read_summary(), run.read_rows()
            fractions = [m.get("sam_step_fraction") or 0.0 for m in metrics]
            rows.append(
                {
                    **record,
                    "final_test_acc": summary["final_test_acc"],
                    "best_test_acc": summary["best_test_acc"],
                    "train_s": summary["seconds"],
                    "sam_step_fraction": statistics.mean(fractions) if fractions else None,
                }
            )
    return rows


def _mean_sd(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    by = {(r["config"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    table_rows, summary = [], {}
    for config in CONFIGS:
        runs = [by[(config, s)] for s in seeds if (config, s) in by]
        if not runs:
            continue
        paired = [(by[(config, s)], by[("sgd", s)]) for s in seeds if (config, s) in by and
                  ("sgd", s) in by]  # fmt: skip
        full = [(by[(config, s)], by[("sam-aace", s)]) for s in seeds if (config, s) in by and
                ("sam-aace", s) in by]  # fmt: skip
        ratio = {
            key: [a[key] / b[key] for a, b in paired] for key in ("wall_s", "cpu_s", "train_s")
        }
        acc_diff = [a["final_test_acc"] - b["final_test_acc"] for a, b in full]
        accs = [r["final_test_acc"] for r in runs]
        summary[config] = {
            "n": len(runs),
            "final_test_acc": accs,
            "sam_step_fraction": statistics.mean(r["sam_step_fraction"] for r in runs),
            "ratio_to_sgd": ratio,
            "acc_minus_full_sam_aace": acc_diff,
        }
        diff_cell = "-"
        if config != "sam-aace" and len(acc_diff) >= 2:
            se = statistics.stdev(acc_diff) / len(acc_diff) ** 0.5
            diff_cell = f"{statistics.mean(acc_diff) * 100:+.2f} (SE {se * 100:.2f})"
        table_rows.append(
            [
                config,
                len(runs),
                f"{summary[config]['sam_step_fraction']:.2f}",
                _mean_sd(ratio["wall_s"]),
                _mean_sd(ratio["cpu_s"]),
                _mean_sd(ratio["train_s"]),
                _mean_sd(accs, 100),
                diff_cell,
            ]
        )
    headers = [
        "configuration", "n", "SAM-step fraction", "wall clock / SGD", "CPU time / SGD",
        "training time / SGD", "final test acc (%)", "acc − full SAM+AACE (pp, paired)",
    ]  # fmt: skip
    table = harness.markdown_table(headers, table_rows)
    notes = (
        f"{args.dataset}, {args.model}, {args.epochs} epochs, batch {args.batch_size}, lr "
        f"{args.lr} (cosine), rho 0.2 for SAM+AACE, OMP_NUM_THREADS={args.threads}; seeds "
        f"{seeds}. Ratios are per seed (runs of one seed back to back) then mean ± sd over "
        "seeds; accuracies mean ± sd over seeds; the paired difference to full SAM+AACE is the "
        "mean over seeds with its standard error. Wall clock and CPU time are of the whole "
        "`aace train` process (start-up, data loading and evaluation included); training time "
        f"is the sum of the epochs' `seconds`. {args.machine_note}"
    )
    return harness.write_results(
        args.name,
        rows,
        table,
        args.out_dir,
        device=torch.device("cpu"),
        config={k: str(v) for k, v in vars(args).items()},
        extra={"summary": summary},
        notes=notes,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="wrn16_1")
    parser.add_argument("--epochs", type=harness.positive_int, default=15)
    parser.add_argument("--batch-size", type=harness.positive_int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seeds", type=harness.positive_int, default=3)
    parser.add_argument(
        "--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="subset to run"
    )
    parser.add_argument("--name", default="cost")
    parser.add_argument("--runs-dir", type=Path, help="default runs/<name>")
    parser.add_argument("--threads", type=harness.positive_int, default=1, help="OMP_NUM_THREADS")
    parser.add_argument(
        "--out-dir", type=Path, default=harness.DEFAULT_OUT_DIR, help="results directory"
    )
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--machine-note",
        default="Other jobs may have shared the machine: the wall clock is the noisiest of the "
        "three.",
        help="what the report says about the machine's load while the runs ran",
    )
    args = parser.parse_args(argv)
    runs_dir = args.runs_dir or Path("runs") / args.name
    seeds = list(range(args.seeds))
    if not args.report_only:
        order = [c for c in CONFIGS if c in args.configs]
        for seed in seeds:
            shift = seed % len(order)
            for config in order[shift:] + order[:shift]:
                out = runs_dir / f"{config}-s{seed}"
                if (out / "cost.json").exists():
                    continue
                record = run_one(args, config, seed, out)
                print(
                    f"{config} seed {seed}: wall {record['wall_s']:.1f} s, "
                    f"cpu {record['cpu_s']:.1f} s",
                    flush=True,
                )
                # Results after every run, so that a partial study is still reported.
                report(args, collect(runs_dir, seeds))
    print(report(args, collect(runs_dir, seeds)))


if __name__ == "__main__":
    main()
