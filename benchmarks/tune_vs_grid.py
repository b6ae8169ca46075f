"""A full grid of rho values trained to the end against a pruned ``aace tune`` search.

For each optimizer (default SAM and SAM+AACE): (1) ``aace tune`` with a grid of ``--grid``
rho values and no pruner (every run to the last epoch); (2) ``aace tune`` with ``--trials``
trials of a log-uniform rho range and the default pruner (asynchronous successive halving).
Both choose on the same validation split. Reported: the epochs each trained, the rho each
selects and, when they differ, how far apart they are in validation accuracy, against the
binomial standard error of a validation accuracy (sqrt(p (1 - p) / n_val)) as "noise".

The README's figures (docs/tuning.md), about 30 minutes on one CPU core:

    nice taskset -c 1 python benchmarks/tune_vs_grid.py --epochs 4 --model wrn10_1 \\
        --label-noise 0.2

Writes ``benchmarks/results/tune_vs_grid.{json,md}``; the runs go to
``benchmarks/out/tune_vs_grid`` (resumable: rerun the same command to continue).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch
from _common import DEFAULT_OUT_DIR, write_results

from aace.data import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="wrn10_1")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--label-noise", type=float, default=0.2)
    parser.add_argument("--optimizers", default="sam,sam-aace")
    parser.add_argument("--grid", default="0.01,0.02,0.05,0.1,0.2,0.5,1,2")
    parser.add_argument("--range", default="0.01:2:log")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--val-split", type=float, default=0.1)
    parser.add_argument("--runs-dir", default="benchmarks/out/tune_vs_grid")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--name", default="tune_vs_grid")
    args = parser.parse_args()
    train = [
        "--dataset", args.dataset, "--model", args.model, "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--schedule", "cosine",
    ]  # fmt: skip
    if args.label_noise:
        train += ["--label-noise", str(args.label_noise)]
    common = ["--optimizer", args.optimizers, "--val-split", str(args.val_split)]
    runs = Path(args.runs_dir)
    commands = {
        "grid": [*common, "--rho", args.grid, "--pruner", "none", "--out", str(runs / "grid")],
        "search": [
            *common,
            "--rho",
            args.range,
            "--trials",
            str(args.trials),
            "--pruner",
            "asha",
            "--out",
            str(runs / "search"),
        ],  # fmt: skip
    }
    reports = {}
    for kind, command in commands.items():
        full = [sys.executable, "-m", "aace", "tune", *command, "--", *train]
        print("$", " ".join(full), flush=True)
        subprocess.run(full, check=True)
        reports[kind] = json.loads((runs / kind / "tune.json").read_text())
    dataset = load_dataset(args.dataset, "data", False)
    n_val = sum(round(args.val_split * int(c)) for c in dataset.y_train.bincount())
    rows = []
    for optimizer in args.optimizers.split(","):
        grid = reports["grid"]["optimizers"][optimizer]
        search = reports["search"]["optimizers"][optimizer]
        grid_best, search_best = grid["best"], search["best"]
        p = grid_best["value"]
        noise = math.sqrt(p * (1 - p) / n_val)
        # The grid's validation accuracy at the rho the search chose, when the grid has it.
        by_rho = {t["params"]["rho"]: t["best_val_acc"] for t in grid["trials"]}
        rows.append(
            {
                "optimizer": optimizer,
                "grid_epochs": grid["epochs_trained"],
                "search_epochs": search["epochs_trained"],
                "epoch_ratio": search["epochs_trained"] / grid["epochs_trained"],
                "grid_rho": grid_best["params"]["rho"],
                "grid_val_acc": grid_best["value"],
                "search_rho": search_best["params"]["rho"],
                "search_val_acc": search_best["value"],
                "gap": grid_best["value"] - search_best["value"],
                "noise_se": noise,
                "grid_val_acc_at_search_rho": by_rho.get(search_best["params"]["rho"]),
                "search_trials": [
                    {k: t[k] for k in ("params", "state", "epochs", "best_val_acc")}
                    for t in search["trials"]
                ],
            }
        )
    header = (
        "| optimizer | grid: epochs | grid: chosen rho | grid: val acc (%) | search: epochs "
        "(share of grid) | search: chosen rho | search: val acc (%) | gap (pp) | noise: 1 SE (pp) |"
    )
    lines = [header, "|---" * header.count(" |") + "|"]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['grid_epochs']} | {r['grid_rho']:g} | "
            f"{100 * r['grid_val_acc']:.2f} | {r['search_epochs']} ({100 * r['epoch_ratio']:.0f} %)"
            f" | {r['search_rho']:g} | {100 * r['search_val_acc']:.2f} | "
            f"{100 * r['gap']:+.2f} | {100 * r['noise_se']:.2f} |"
        )
    setting = (
        f"{args.dataset} / {args.model} / {args.epochs} epochs / batch {args.batch_size} / lr "
        f"{args.lr:g} cosine / {100 * args.label_noise:g} % label noise / validation split "
        f"{args.val_split:g} ({n_val} images); grid rho {args.grid} (no pruning) against "
        f"{args.trials} TPE trials on rho {args.range} with ASHA pruning (first rung: 1 epoch)"
    )
    print(
        write_results(
            args.name,
            rows,
            "\n".join(lines),
            args.out_dir,
            device=torch.device("cpu"),
            config={**vars(args), "out_dir": str(args.out_dir), "commands": commands},
            notes=setting
            + ". Epochs: the epochs each trained in all (pruned trials stop early). Gap: the "
            "grid's best validation accuracy minus the search's; noise: one binomial standard "
            "error of a validation accuracy at the grid's best.",
        )
    )


if __name__ == "__main__":
    main()
