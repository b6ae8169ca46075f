"""The verdict by the field's protocol: does SAM+AACE beat SAM (and ASAM, BiSAM, SGD) when every
rule is tuned alike?

The protocol (issue 33), per setting:

1. **Equal budgets.** Every rule searches its own log range of rho with ``aace tune``: the same
   number of grid points (``--points``), each trained to the full epochs with the same search
   seeds (``--search-seeds``), scored on the same validation split. A choice at an end of its
   range is flagged in the report; widen that range (``RULES``) and rerun.
2. **Equal compute.** SGD at the rules' epochs and SGD at twice the epochs (a SAM step costs two
   forward-backward passes), each with the fixed learning rate.
3. **Validation that can choose.** The report gives, per rule, the validation split's size, the
   standard error at the best radius and the set of radii within two standard errors
   (``tune.md``'s own lines).
4. **Paired final seeds.** Every rule's choice is trained with the same ``--final-seeds`` seeds
   (aace tune gives every rule seeds SEED+S ... SEED+S+K-1), so the comparison with SAM is
   paired: mean difference and its 95 % interval, Holm-adjusted p-values over the rules, and
   the equivalence test (TOST) within ``--margin`` percentage points (:mod:`aace.stats`).
5. **Tuning variance.** Each rule's search is repeated with another validation-split seed
   (``--split-seeds 0,1``): the report shows both choices and both verdicts.
6. **Sensitivity to rho.** From the search's own runs: per rule, the test accuracy at the
   validation-selected epoch averaged over search seeds, best against median and worst over the
   grid, and the radii within 1 pp of the best, in rho and in effective radius (the mean
   perturbation norm over the last third of training).

Runs go to ``runs/verdict/<setting>/split<v>/<rule>``; every command resumes. The report is
made from those folders alone (``tune.json`` and the runs' ``metrics.jsonl``) into
``benchmarks/results/verdict-<setting>.{json,md}``:

    python benchmarks/verdict.py --setting digits-noise40 --plan     # the epochs it will train
    python benchmarks/verdict.py --setting digits-noise40 --workers 2
    python benchmarks/verdict.py --setting digits-noise40 --report-only
    python benchmarks/verdict.py --setting digits-noise40 --smoke    # the pipeline, tiny budget
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import DEFAULT_OUT_DIR, markdown_table, write_results
from label_noise import dataset_spec

from aace import stats

CIFAR5K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10_5k.npz"
SETTINGS: dict[str, dict[str, Any]] = {
    "digits-noise40": dict(dataset="digits", model="wrn16_1", epochs=30, label_noise=0.4,
                           extra=["--augment"]),
    "cifar2k-clean": dict(dataset=dataset_spec("cifar10_2k"), model="wrn10_1", epochs=30,
                          label_noise=0.0, extra=["--no-augment"]),
    "cifar2k-noise40": dict(dataset=dataset_spec("cifar10_2k"), model="wrn10_1", epochs=30,
                            label_noise=0.4, extra=["--no-augment"]),
    # The paper's recipe (crop, flip, cutout) on the whole 5,085-image subset.
    "cifar5k-clean": dict(dataset=f"npz:{CIFAR5K}", model="wrn16_1", epochs=40, label_noise=0.0,
                          extra=["--augment", "--cutout", "16"]),
}  # fmt: skip
BATCH_SIZE, LR = 64, 0.05
# Each rule's rho range (log); None: SGD, no rho.
RULES: dict[str, str | None] = {
    "sgd": None,
    "sam": "0.01:2:log",
    "sam-aace": "0.01:5:log",
    "sam-aace-normalized": "0.01:2:log",
    "asam": "0.05:10:log",
    "sam-bisam": "0.001:2:log",
}
SGD_DOUBLE = "sgd-x2"  # SGD at twice the epochs


def train_args(setting: str, epochs: int) -> list[str]:
    recipe = SETTINGS[setting]
    args = [
        "--dataset", recipe["dataset"], "--model", recipe["model"], "--epochs", str(epochs),
        "--batch-size", str(BATCH_SIZE), "--schedule", "cosine", "--device", "cpu",
        "--lr", str(LR), *recipe["extra"],
    ]  # fmt: skip
    if recipe["label_noise"]:
        args += ["--label-noise", str(recipe["label_noise"])]
    return args


def rule_dir(args: argparse.Namespace, split: int, rule: str) -> Path:
    return args.runs_dir / f"split{split}" / rule


def tune_command(args: argparse.Namespace, split: int, rule: str) -> list[str]:
    optimizer = "sgd" if rule == SGD_DOUBLE else rule
    epochs = args.epochs * (2 if rule == SGD_DOUBLE else 1)
    space = RULES.get(optimizer)
    search = [] if space is None else ["--rho", space, "--trials", str(args.points)]
    return [
        "aace", "tune", "--out", str(rule_dir(args, split, rule)), "--optimizer", optimizer,
        *search, "--search-seeds", str(args.search_seeds), "--val-split", str(args.val_split),
        "--val-split-seed", str(split), "--final-seeds", str(args.final_seeds),
        "--workers", str(args.workers), "--progress", "300",
        "--", *train_args(args.setting, epochs),
    ]  # fmt: skip


def plan(args: argparse.Namespace) -> int:
    """Epochs the protocol trains: searches (every point x seed) and final runs, per split."""
    total = 0
    for rule in args.rules:
        optimizer = "sgd" if rule == SGD_DOUBLE else rule
        points = 1 if RULES.get(optimizer) is None else args.points
        epochs = args.epochs * (2 if rule == SGD_DOUBLE else 1)
        total += (points * args.search_seeds + args.final_seeds) * epochs
    return total * len(args.split_seeds)


def run(args: argparse.Namespace) -> None:
    for split in args.split_seeds:
        for rule in args.rules:
            command = tune_command(args, split, rule)
            print(f"[verdict {args.setting} split {split}] {shlex.join(command)}", flush=True)
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "aace", *command[1:]], check=True)
            with open(rule_dir(args, split, rule) / "verdict-sessions.jsonl", "a") as file:
                file.write(json.dumps({"seconds": time.perf_counter() - started,
                                       "command": shlex.join(command)}) + "\n")  # fmt: skip


# -- report -------------------------------------------------------------------------------------


def _rows(run: str | Path) -> list[dict[str, Any]]:
    path = Path(run) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path else []


def _last_third(rows: list[dict[str, Any]], key: str) -> float | None:
    tail = rows[len(rows) - max(1, len(rows) // 3) :]
    values = [r[key] for r in tail if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def _test_at_selected(rows: list[dict[str, Any]]) -> float:
    return max(rows, key=lambda r: r["val_acc"])["test_acc"]


def collect(args: argparse.Namespace, split: int, rule: str) -> dict[str, Any] | None:
    path = rule_dir(args, split, rule) / "tune.json"
    if not path.is_file():
        return None
    optimizer = "sgd" if rule == SGD_DOUBLE else rule
    entry = json.loads(path.read_text())["optimizers"][optimizer]
    final = entry.get("final") or {"seeds": [], "test_acc_at_selected": [], "runs": []}
    grid = []
    for configuration in entry["configurations"]:
        if configuration["state"] != "full":
            continue
        rows = [_rows(r["run"]) for r in configuration["runs"]]
        radii = [_last_third(r, "perturbation_norm") for r in rows]
        grid.append({
            "rho": configuration["params"].get("rho"),
            "test": statistics.fmean(_test_at_selected(r) for r in rows),
            "radius": statistics.fmean(x for x in radii if x is not None)
            if any(x is not None for x in radii) else None,
        })  # fmt: skip
    final_rows = [_rows(run) for run in final["runs"]]

    def mean_last_third(key: str) -> float | None:
        values = [x for r in final_rows if (x := _last_third(r, key)) is not None]
        return statistics.fmean(values) if values else None

    return {
        "rule": rule,
        "chosen": entry.get("best"),
        "score": entry.get("best_score"), "se": entry.get("best_se"),
        "within_2se": entry.get("within_2se", []), "cannot_choose": entry.get("cannot_choose"),
        "at_range_end": entry.get("at_range_end"), "val_count": entry.get("val_count"),
        "seeds": final["seeds"], "tests": final["test_acc_at_selected"],
        "radius": mean_last_third("perturbation_norm"),
        "cosine": mean_last_third("perturbation_cosine"),
        "grid": grid,
        "epochs": entry.get("epochs_trained", 0) + sum(len(r) for r in final_rows),
    }  # fmt: skip


def _pp(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:+.2f}" if sign else f"{100 * value:.2f}"


def _compare(entries: dict[str, dict[str, Any]], margin: float) -> dict[str, dict[str, Any]]:
    """Each rule against SAM, paired by seed; Holm over the rules compared."""
    base = dict(zip(entries["sam"]["seeds"], entries["sam"]["tests"]))
    results = {}
    for rule, e in entries.items():
        own = dict(zip(e["seeds"], e["tests"]))
        seeds = sorted(set(own) & set(base))
        if rule == "sam" or len(seeds) < 2:
            continue
        a, b = [own[s] for s in seeds], [base[s] for s in seeds]
        paired = stats.paired_difference(a, b)
        results[rule] = {"n": len(seeds), "difference": paired.difference,
                         "ci95": [paired.low, paired.high], "p": paired.p, "sd": paired.sd,
                         "tost_p": stats.tost_paired(a, b, margin / 100)}  # fmt: skip
    for result, p in zip(results.values(), stats.holm([r["p"] for r in results.values()])):
        result["p_holm"] = p
        result["detectable"] = stats.detectable_difference(
            result["sd"], result["n"], tests=len(results)
        )
        if result["tost_p"] < 0.05:
            result["verdict"] = f"within ±{margin:g} pp of SAM"
        elif p < 0.05:
            result["verdict"] = ("better" if result["difference"] > 0 else "worse") + " than SAM"
        else:
            result["verdict"] = "these runs cannot tell"
    return results


def report(args: argparse.Namespace) -> str:
    splits, tables, extra = {}, [], {}
    for split in args.split_seeds:
        entries = {r: e for r in args.rules if (e := collect(args, split, r)) is not None}
        if "sam" not in entries:
            continue
        comparisons = _compare(entries, args.margin)
        splits[split] = {"entries": entries, "vs_sam": comparisons}
        rows = []
        for rule, e in entries.items():
            versus = comparisons.get(rule, {})
            low, high = stats.confidence_interval(e["tests"])
            chosen = ", ".join(f"{k}={v:g}" for k, v in (e["chosen"] or {}).items())
            interval = "–"
            if versus:
                interval = f"[{_pp(versus['ci95'][0], True)}, {_pp(versus['ci95'][1], True)}]"
            rows.append([
                rule, chosen or "–",
                "; ".join(f"{p['rho']:g}" for p in e["within_2se"] if "rho" in p) or "–",
                e["at_range_end"] or "", stats.mean_sd_text(e["tests"]),
                f"[{_pp(low)}, {_pp(high)}]" if e["tests"] and len(e["tests"]) > 1 else "–",
                len(e["tests"]), _pp(versus.get("difference"), sign=True),
                interval,
                "–" if not versus else f"{versus['p_holm']:.3g}",
                versus.get("verdict", "–"),
                "–" if e["radius"] is None else f"{e['radius']:.3g}",
                "–" if e["cosine"] is None else f"{e['cosine']:.3f}",
            ])  # fmt: skip
        tables.append(f"### Validation split seed {split}\n\n" + markdown_table(
            ["rule", "chosen", "within 2 SE", "at range end", "test acc (%)", "95 % CI", "n",
             "Δ vs SAM (pp)", "95 % CI", "p (Holm)", "verdict", "effective radius", "cosine"],
            rows,
        ))  # fmt: skip
        sensitivity = []
        for rule, e in entries.items():
            tests = sorted((g["test"] for g in e["grid"]), reverse=True)
            if len(tests) < 2:
                continue
            best = tests[0]
            close = [g for g in e["grid"] if g["test"] >= best - 0.01]
            sensitivity.append([
                rule, _pp(best), _pp(best - statistics.median(tests)), _pp(best - tests[-1]),
                ", ".join(f"{g['rho']:g}" for g in close),
                ", ".join("–" if g["radius"] is None else f"{g['radius']:.3g}" for g in close),
            ])  # fmt: skip
        if sensitivity:
            tables.append(
                f"Sensitivity to rho (search runs, split seed {split})\n\n"
                + markdown_table(
                    ["rule", "best grid test acc (%)", "loss to median (pp)", "loss to worst (pp)",
                     "rho within 1 pp", "their effective radius"], sensitivity,
                )
            )  # fmt: skip
        extra[f"split{split}"] = splits[split]
    epochs = sum(e["epochs"] for s in splits.values() for e in s["entries"].values())
    notes = (
        f"Protocol: {args.points} points per rule's log range, {args.search_seeds} search seed(s), "
        f"{args.epochs} epochs (SGD ×2: {2 * args.epochs}), {args.final_seeds} paired final seeds, "
        f"margin ±{args.margin:g} pp; {epochs} epochs trained in all."
    )
    text = "\n\n".join(tables) if tables else "(no rule has a report yet)"
    write_results(f"verdict-{args.setting}", [], text, args.out_dir, device=torch.device("cpu"),
                  config={k: str(v) for k, v in vars(args).items()}, extra=extra,
                  notes=notes)  # fmt: skip
    return text + "\n\n" + notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=SETTINGS, required=True)
    parser.add_argument("--rules", default=",".join([*RULES, SGD_DOUBLE]))
    parser.add_argument("--points", type=int, default=7)
    parser.add_argument("--search-seeds", type=int, default=2)
    parser.add_argument("--final-seeds", type=int, default=8)
    parser.add_argument("--split-seeds", default="0,1")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--val-split", type=float, default=0.2)
    parser.add_argument("--margin", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--runs-dir", type=Path)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--plan", action="store_true", help="print the epochs it trains; stop")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny budget under /tmp")
    args = parser.parse_args()
    args.rules = args.rules.split(",")
    args.split_seeds = [int(s) for s in args.split_seeds.split(",")]
    args.epochs = args.epochs or SETTINGS[args.setting]["epochs"]
    if args.smoke:
        args.epochs, args.points, args.search_seeds, args.final_seeds = 2, 2, 1, 2
        args.runs_dir = Path("/tmp/verdict-smoke") / args.setting
        args.out_dir = Path("/tmp/verdict-smoke")
    args.runs_dir = args.runs_dir or Path("runs/verdict") / args.setting
    print(f"{args.setting}: {plan(args)} epochs in all", flush=True)
    if args.plan:
        return
    if not args.report_only:
        run(args)
    print(report(args))


if __name__ == "__main__":
    main()
