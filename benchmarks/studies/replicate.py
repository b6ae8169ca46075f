"""What SAM+AACE buys at CPU scale: SGD, SAM and SAM+AACE over a rho grid, several seeds.

The grid is an ``aace sweep`` (:mod:`aace.training.sweep`): every run is a real training run in
its own process, written to ``--runs-dir``; finished runs are kept and interrupted ones resume.
The tables and plots are made only from the run directories, as ``aace compare`` and ``aace
plot`` make them.

    python -m benchmarks.studies.replicate --dataset npz:../shared/data/cifar10_5k.npz \\
        --model wrn10_1 --epochs 10 --seeds 3
    python -m benchmarks.studies.replicate --dataset digits --model wrn16_1 --epochs 10 --seeds 3

Writes ``benchmarks/results/replicate-<dataset>.{json,md,png}``.

The paper's mechanism (Ratchatorn & Tanaka, ICIP 2024): near convergence the CE gradient used by
SAM shrinks and its direction becomes unstable, while AACE's gradient grows and its direction
stays consistent. The "mechanism" table compares, per optimizer, the perturbation-loss gradient
norm and the cosine between consecutive perturbations in the first and last thirds of training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from aace.data import DatasetError
from aace.report import compare_table, plot_runs
from aace.training import sweep
from aace.training.config import ConfigError
from benchmarks.harness import DEFAULT_OUT_DIR, write_results
from benchmarks.studies.common import mechanism_table


def _slug(dataset: str) -> str:
    return Path(dataset.removeprefix("npz:")).stem if dataset.startswith("npz:") else dataset


def run_all(args: argparse.Namespace) -> list[Path]:
    """SGD, SAM (rho 0.05) and SAM+AACE at each rho, for each seed: an ``aace sweep`` grid."""
    base = dict(
        dataset=args.dataset, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, schedule="cosine", device=args.device,
    )  # fmt: skip
    optimizers = [("sgd", None), ("sam", 0.05)] + [("sam-aace", rho) for rho in args.rho]
    runs = sweep.plan(base, Path(args.runs_dir) / _slug(args.dataset), optimizers, seeds=args.seeds)
    failed = [o.run.name for o in sweep.run_sweep(runs, args.jobs) if o.error is not None]
    if failed:
        raise RuntimeError(f"runs failed: {', '.join(failed)} (see their train.log)")
    return [run.out for run in runs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", help="digits or npz:PATH (e.g. cifar10_5k)")
    parser.add_argument("--model", default="wrn16_1")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rho", type=float, action="append", help="SAM+AACE rho grid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (aace sweep)")
    parser.add_argument("--runs-dir", default="benchmarks/out/replicate")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    args = parser.parse_args()
    args.rho = args.rho or [0.1, 0.2, 0.4]
    if args.dataset.startswith("npz:") and not Path(args.dataset[4:]).is_file():
        print(
            f"replicate.py: error: --dataset: file '{args.dataset[4:]}' not found", file=sys.stderr
        )
        return 2
    try:
        paths = run_all(args)
    except (DatasetError, ConfigError, RuntimeError) as error:
        print(f"replicate.py: error: {error}", file=sys.stderr)
        return 2

    name = f"replicate-{_slug(args.dataset)}"
    accuracy = compare_table(paths)
    mechanism, rows = mechanism_table(paths)
    plot = plot_runs(paths, Path(args.out_dir) / f"{name}.png")
    text = write_results(
        name,
        rows,
        f"### Test accuracy (cosine schedule, {args.epochs} epochs)\n\n{accuracy}\n\n"
        f"### Mechanism: perturbation-loss gradient norm and consecutive-perturbation cosine\n\n"
        f"{mechanism}\n",
        args.out_dir,
        device=torch.device(args.device),
        config=vars(args),
        extra={"runs": [str(p) for p in paths]},
        notes=f"Curves: {plot.name} (one line per run).",
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
