"""How often does ``aace tune`` choose a good rho, and at what cost? Search designs replayed on a
dense, seed-repeated grid of real runs.

1. The pool: ``aace tune`` trains, for each optimizer, a dense log grid of rho (``--points``,
   default 13 over [0.01, 2]) with ``--seeds`` seeds each, every run to the last epoch, on one
   validation split.
2. The truth: per rho, the test accuracy at the validation-selected epoch averaged over all
   seeds. The best rho's mean minus one standard error (sd / sqrt(seeds)) bounds the *good*
   radii: a search succeeds when it picks one of them.
3. The designs, replayed from the pool without training: a grid of every other point (13 -> 7:
   the default of ``aace tune``) or all of them, scored with 1 or 2 (3) search seeds, for
   each score of :mod:`aace.training.tune.scoring`, over every subset of the pool's seeds
   as the search seeds. Reported: how often the choice is good, how often it is the design's
   most frequent choice (consistency across seeds), and the epochs the design trains.

Results: ``benchmarks/results/<name>.{json,md}``; the runs go to ``--runs-dir`` (resumable: rerun
the same command to continue). The tuning page's figures:

    python -m benchmarks.studies.tune_vs_grid --workers 2
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

from aace.runs import RunDirectory, selected_row
from aace.training.tune.scoring import SCORES, rank_key, run_score
from aace.training.tune.spec import Space, grid_points, run_name
from benchmarks.harness import DEFAULT_OUT_DIR, markdown_table, write_results


def _test_at_selected(rows: list[dict]) -> float:
    return selected_row(rows)["test_acc"]  # the earliest best val_acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="wrn16_1")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--label-noise", type=float, default=0.4)
    parser.add_argument("--optimizers", default="sam,sam-aace")
    parser.add_argument("--range", default="0.01:2:log")
    parser.add_argument("--points", type=int, default=13)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--val-split", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=1)
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
    pool = Path(args.runs_dir) / "pool"
    command = [
        sys.executable, "-m", "aace", "tune", "--out", str(pool), "--optimizers", args.optimizers,
        "--rho", args.range, "--trials", str(args.points), "--search-seeds", str(args.seeds),
        "--val-split", str(args.val_split), "--workers", str(args.workers), "--progress", "120",
        "--", *train,
    ]  # fmt: skip
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)

    low, high, *_ = args.range.split(":")
    dense = grid_points(Space("rho", float(low), float(high), log=True), args.points)
    seeds = list(range(args.seeds))
    rows, details = [], {}
    for optimizer in args.optimizers.split(","):
        runs = {
            (rho, seed): RunDirectory(
                pool / optimizer / run_name(optimizer, {"rho": rho}, seed)
            ).read_rows()
            for rho in dense
            for seed in seeds
        }
        truth = {rho: [_test_at_selected(runs[rho, s]) for s in seeds] for rho in dense}
        means = {rho: statistics.fmean(v) for rho, v in truth.items()}
        best = max(dense, key=means.__getitem__)
        se = statistics.stdev(truth[best]) / len(seeds) ** 0.5
        good = {rho for rho in dense if means[rho] >= means[best] - se}
        details[optimizer] = {
            "test_acc_at_selected": {str(rho): v for rho, v in truth.items()},
            "best": best, "se": se, "good": sorted(good),
        }  # fmt: skip
        # Every other point (13 -> 7: the default grid of aace tune on the same range), and all.
        sparse = dense[::2] if len(dense) % 2 == 1 else dense
        designs = [(g, s) for g in (sparse, dense) for s in (1, 2, 3) if s <= len(seeds)]
        designs = list(dict.fromkeys((tuple(g), s) for g, s in designs))
        for (grid, s), score in itertools.product(designs, SCORES):
            points = len(grid)
            choices = []
            for subset in itertools.combinations(seeds, s):
                scored = []
                for rho in grid:
                    per_run = [run_score(runs[rho, seed], score) for seed in subset]
                    scored.append(
                        rank_key(
                            statistics.fmean(r.score for r in per_run),
                            statistics.fmean(r.secondary for r in per_run),
                            {"rho": rho},
                        )
                    )
                choices.append(min(scored)[2][0])
            hits = sum(choice in good for choice in choices)
            mode, mode_count = Counter(choices).most_common(1)[0]
            rows.append({
                "optimizer": optimizer, "points": points, "search_seeds": s, "score": score,
                "epochs": points * s * args.epochs, "good": hits, "searches": len(choices),
                "most_frequent": mode, "most_frequent_count": mode_count,
                "choices": choices,
            })  # fmt: skip
    table = markdown_table(
        ["optimizer", "design", "score", "epochs", "good choice", "same choice", "most often"],
        [
            [r["optimizer"], f"{r['points']} points × {r['search_seeds']} seed(s)", r["score"],
             r["epochs"], f"{r['good']} / {r['searches']}",
             f"{r['most_frequent_count']} / {r['searches']}", f"{r['most_frequent']:g}"]
            for r in rows
        ],
    )  # fmt: skip
    truths = markdown_table(
        ["optimizer", "best rho (dense grid)", "its test acc (%)", "SE (pp)", "good rho"],
        [
            [o, f"{d['best']:g}",
             f"{100 * statistics.fmean(d['test_acc_at_selected'][str(d['best'])]):.2f}",
             f"{100 * d['se']:.2f}", ", ".join(f"{g:g}" for g in d["good"])]
            for o, d in details.items()
        ],
    )  # fmt: skip
    notes = (
        f"Pool: {len(dense)} rho values x {len(seeds)} seeds per optimizer, {args.epochs} epochs, "
        f"{args.dataset}, {args.model}, label noise {args.label_noise:g}, validation split "
        f"{args.val_split:g}. Good rho: within one SE of the dense grid's best mean test accuracy "
        "at the validation-selected epoch. A design's searches are every subset of the pool's "
        "seeds of its size (so few searches with 2-3 seeds: read the counts, not percentages)."
    )
    write_results(
        args.name, rows, truths + "\n\n" + table, args.out_dir, device=torch.device("cpu"),
        config=vars(args) | {"out_dir": str(args.out_dir)}, extra={"truth": details},
        notes=notes,
    )  # fmt: skip
    print(truths + "\n\n" + table)


if __name__ == "__main__":
    main()
