"""Label noise: SGD, SAM and SAM+AACE against the noise rate, trained until SGD memorizes the noise.

SAM's advantage over SGD grows with the label-noise rate (Foret et al. 2021, Table 4; Kwon et
al. 2021, Table 6; Baek et al., ICLR 2024): it appears once SGD starts fitting the wrong labels,
its accuracy on the noisy training labels passing the share of clean ones and its test accuracy
falling from its peak. The reported studies (rerun them with these commands; resumable):

    python -m benchmarks.studies.label_noise --dataset digits --model wrn16_1 --epochs 100 \\
        --batch-size 64 --lr 0.05 --optimizers sgd,sam:0.05,sam-aace:0.2 --name label_noise-digits

    python -m benchmarks.studies.label_noise --dataset cifar10_2k --model wrn10_1 --epochs 30 \\
        --batch-size 64 --lr 0.05 --no-augment --compile --optimizers sgd,sam:0.05,sam-aace:0.2 \\
        --no-sharpness --name label_noise-cifar10_2k

(The README's runs used ``--jobs 1`` pinned to one core each; the CIFAR grid was trained one
noise rate per process, ``--noise 0.4`` etc. with a shared ``--runs-dir``, then reported with
``--report-only``.) The default ``--optimizers`` adds SAM and SAM+AACE at rho 0.1.

``--dataset cifar10_2k`` is the first 200 training images of each class of
``../shared/data/cifar10_5k.npz`` (written to ``benchmarks/out/data/cifar10_2k.npz``) with the
file's whole test set (1,017 images): small enough for a 2-core CPU to train a model to
memorization in minutes. Any ``aace train`` dataset works too.

Steps, each resumable: (1) the grid, an ``aace sweep`` (:mod:`aace.training.sweep`) of
``--optimizers`` x ``--noise`` x ``--seeds`` into ``--runs-dir``; (2) ``aace sharpness`` of every
finished run (``--sharpness`` arguments; labels as trained, i.e. noisy); (3) the report:
``benchmarks/results/<name>.{json,md,png}`` with the ``aace compare`` table (baseline SGD, Welch
t-tests), accuracy against noise rate per optimizer, how much noise each optimizer memorized,
and the sharpness of the final models. ``--report-only`` skips (1) and (2).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from aace.report import compare_table, confidence_interval, read_run, run_label, welch_test
from aace.training import sweep
from benchmarks.harness import DEFAULT_OUT_DIR, markdown_table, write_results
from benchmarks.studies.common import dataset_spec, measure_sharpness, mechanism_table


def plan(args: argparse.Namespace) -> list[sweep.SweepRun]:
    base = dict(
        dataset=dataset_spec(args.dataset), model=args.model, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, schedule="cosine", device="cpu",
        augment=args.augment, compile=args.compile, sam_every=args.sam_every,
    )  # fmt: skip
    return sweep.plan(
        base,
        args.runs_dir,
        sweep.parse_optimizers(args.optimizers),
        seeds=args.seeds,
        label_noise=sweep.parse_numbers("noise", args.noise, 0, 1),
    )


def _mean_sd(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * sd:.{digits}f}"


def _best(run) -> dict:
    return max(run.rows, key=lambda row: row["test_acc"])


def report(args: argparse.Namespace, runs: list[sweep.SweepRun]) -> str:
    finished = [run for run in runs if run.finished]
    paths = [run.out for run in finished]
    read = {run.name: read_run(run.out) for run in finished}
    noises = sweep.parse_numbers("noise", args.noise, 0, 1)
    labels: list[str] = []
    for run in runs:
        label = run_label(run.config.to_dict())
        if label not in labels:
            labels.append(label)

    def members(label: str, noise: float) -> list:
        return [
            read[r.name]
            for r in finished
            if r.config.label_noise == noise and run_label(r.config.to_dict()) == label
        ]

    # Final (and best) test accuracy per optimizer and noise rate; difference to SGD.
    rows, summary = [], []
    for label in labels:
        cells: list[object] = [label]
        for noise in noises:
            group = members(label, noise)
            final = [r.rows[-1]["test_acc"] for r in group]
            best = [max(row["test_acc"] for row in r.rows) for r in group]
            sgd = [r.rows[-1]["test_acc"] for r in members("sgd", noise)]
            text = f"{_mean_sd(final)} / {_mean_sd(best)} (n={len(final)})"
            difference = p = None
            if label != "sgd" and len(final) > 1 and len(sgd) > 1:
                difference, p = welch_test(final, sgd)
                text += f"; {100 * difference:+.1f}, p={p:.2g}"
            cells.append(text)
            summary.append(
                {
                    "optimizer": label, "noise": noise, "n": len(final), "final": final,
                    "best": best, "difference_to_sgd": difference, "p_welch": p,
                    "train_acc_noisy": [r.rows[-1]["train_acc"] for r in group],
                    "train_acc_clean": [r.rows[-1]["train_acc_clean"] for r in group],
                    "best_epoch": [_best(r)["epoch"] for r in group],
                    "sharpness": [r.sharpness for r in group],
                }
            )  # fmt: skip
        rows.append(cells)
    headers = ["optimizer"] + [f"noise {100 * n:g} %" for n in noises]
    accuracy = markdown_table(headers, rows)

    # Memorization: final training accuracy on the noisy labels (clean share = 1 - rate).
    memo_rows = []
    for label in labels:
        cells = [label]
        for noise in noises:
            group = members(label, noise)
            noisy = [r.rows[-1]["train_acc"] for r in group]
            clean = [r.rows[-1]["train_acc_clean"] for r in group]
            cells.append(f"{_mean_sd(noisy)} / {_mean_sd(clean)}")
        memo_rows.append(cells)
    memorization = markdown_table(headers, memo_rows)

    # Sharpness of the final models (labels as trained).
    sharp_rows = []
    for label in labels:
        cells = [label]
        for noise in noises:
            group = [r for r in members(label, noise) if r.sharpness]
            eig = [r.sharpness["hessian_eigenvalues"][0] for r in group]
            trace = [r.sharpness.get("hessian_trace") for r in group]
            trace = [t for t in trace if t is not None]
            cells.append(
                f"{_mean_sd(eig, 1, 3)} / {_mean_sd(trace, 1, 3)} (n={len(eig)})" if eig else "–"
            )
        sharp_rows.append(cells)
    sharpness_table = markdown_table(headers, sharp_rows)

    # Without noise the grid is a training-to-convergence study: the paper's mechanism.
    clean_runs = [run.out for run in finished if run.config.label_noise == 0]
    mechanism = mechanism_table(clean_runs)[0] if clean_runs else "(no finished run)"

    png = plot(args, labels, noises, members)
    baseline = "sgd" if any(run.config.optimizer == "sgd" for run in finished) else None
    compare = compare_table(paths, baseline) if paths else "(nothing finished yet)"
    first = runs[0].config
    text = (
        f"Grid: {len(runs)} runs, {len(finished)} finished. {first.dataset}, {first.model}, "
        f"{first.epochs} epochs, batch {first.batch_size}, lr {first.lr} (cosine), augmentation "
        f"{'on' if first.augment else 'off'}, label noise {args.noise}, seeds 0..{args.seeds - 1}"
        f", SAM steps every {args.sam_every} step(s).\n\n"
        "### Test accuracy (%): final / best, mean ± sd over seeds; difference of the final "
        "accuracy to SGD (pp) and its Welch t-test p-value\n\n"
        f"{accuracy}\n\n"
        "### Memorization: final training accuracy (%) on the noisy labels / on the true labels "
        "(training batches; the clean share of the labels is 100 % minus the noise rate)\n\n"
        f"{memorization}\n\n"
        "### Sharpness of the final models: top Hessian eigenvalue / Hessian trace "
        f"(`aace sharpness {args.sharpness}`, on the noisy training labels)\n\n"
        f"{sharpness_table}\n\n"
        "### Without noise: the mechanism (perturbation-loss gradient norm and cosine between "
        "consecutive perturbations, mean over seeds, first vs last third of training)\n\n"
        f"{mechanism}\n\n"
        f"### `aace compare{' --baseline sgd' if baseline else ''}` of all finished runs\n\n"
        f"{compare}\n\n"
        f"![accuracy against noise rate]({png.name})\n"
    )
    return write_results(
        args.name,
        summary,
        text,
        args.out_dir,
        device=torch.device("cpu"),
        config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    )


def plot(args, labels, noises, members) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    panels = (
        ("final test accuracy (%)", lambda r: r.rows[-1]["test_acc"]),
        ("best test accuracy (%)", lambda r: max(row["test_acc"] for row in r.rows)),
        ("final train accuracy on the noisy labels (%)", lambda r: r.rows[-1]["train_acc"]),
    )
    for ax, (title, value) in zip(axes, panels):
        for i, label in enumerate(labels):
            xs, ys, errors = [], [], []
            for noise in noises:
                values = [value(r) for r in members(label, noise)]
                if not values:
                    continue
                low, high = confidence_interval(values) if len(values) > 1 else (np.nan, np.nan)
                xs.append(100 * noise + (i - len(labels) / 2) * 0.6)  # dodge the error bars
                ys.append(100 * statistics.fmean(values))
                errors.append(0 if np.isnan(low) else 100 * (high - low) / 2)
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=label)
        if "noisy" in title:
            ax.plot([100 * n for n in noises], [100 * (1 - n) for n in noises], "k--", lw=1,
                    label="clean share")  # fmt: skip
        ax.set_xlabel("label noise (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    figure.suptitle(f"{args.name}: mean over seeds, error bars 95 % CI (Student t)")
    out = Path(args.out_dir) / f"{args.name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", help="an aace dataset, or cifar10_2k")
    parser.add_argument("--model", default="wrn16_1")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--noise", default="0,0.2,0.4,0.6", help="label-noise rates")
    parser.add_argument("--optimizers", default="sgd,sam:0.05,sam:0.1,sam-aace:0.1,sam-aace:0.2")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sam-every", type=int, default=1, help="--sam-every of the SAM runs")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument(
        "--sharpness",
        default="--images 512 --samples 10 --steps 0 --average-samples 0",
        help="aace sharpness arguments for every finished run",
    )
    parser.add_argument("--no-sharpness", action="store_true")
    parser.add_argument("--name", default="label_noise")
    parser.add_argument("--runs-dir", type=Path, help="default benchmarks/out/label_noise/<name>")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    args.runs_dir = args.runs_dir or Path("benchmarks/out/label_noise") / args.name
    runs = plan(args)
    if not args.report_only:
        sweep.run_sweep(runs, args.jobs)
        if not args.no_sharpness:
            for run in runs:
                if run.finished:
                    measure_sharpness(run.out, shlex.split(args.sharpness))
    print(report(args, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
