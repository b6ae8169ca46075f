"""The verdict: does SAM+AACE beat SAM (and ASAM, BiSAM, SGD) when every rule's rho is tuned?

Issue 23, parts 2 and 3. Per setting and rule, one ``aace tune`` command (one study, its own
rho range, ``--trials 10`` TPE trials on a 10 % validation split, the default ASHA pruner, then
``--final-seeds 5`` runs of the chosen rho), the rest of the recipe fixed and the same for all:

* ``digits-noise40``: digits, 40 % symmetric label noise, WRN-16-1, 100 epochs, batch 64,
  lr 0.05 cosine, augmentation on (the recipe of ``label_noise.py``'s digits study);
* ``cifar2k-clean`` / ``cifar2k-noise40``: the 2,000-image balanced CIFAR-10 subset of
  ``label_noise.py`` (its :func:`~label_noise.dataset_spec`), no noise / 40 % noise, WRN-10-1,
  30 epochs, batch 64, lr 0.05 cosine, no augmentation, ``--compile``.

Rules and their rho ranges (log-uniform): sam, sam-aace-normalized 0.01:2; sam-bisam 0.001:2;
asam 0.05:10 (its operator |w| + 0.01 scales the radius, Kwon et al. use 0.5-1.0); sam-aace
0.01:5. BiSAM's range began as 0.01:2 (the digits study ran with it, its choice mid-range); on
the clean CIFAR subset it chose 0.0137, at the low end, so it was widened to 0.001:2 and that
study run again. The report reads each study's range from its ``tune.json``, so it always
shows the range the search used.
SGD has no rho: its study is a one-point grid of the fixed lr (``--lr 0.05``: one search run
with seed 0, as for the other rules' trials), then the same 5 final seeds.

    python benchmarks/verdict.py --setting digits-noise40            # all rules, resumable
    python benchmarks/verdict.py --setting digits-noise40 --rules sam,sam-aace --workers 2
    python benchmarks/verdict.py --setting digits-noise40 --report-only

Every command resumes (``aace tune`` continues from its journal and the runs' checkpoints);
the same command on another machine with a shared ``--runs-dir`` joins the studies. Runs go to
``runs/verdict/<setting>/<rule>``; each invocation of a rule's ``aace tune`` appends its wall
clock, host and cores to ``verdict-sessions.jsonl`` there. The report is made from those
directories only (``tune.json``, the runs' ``metrics.jsonl``): per rule the chosen rho and its
place in the range, the test accuracy at the validation-selected epoch of the final seeds
(mean ± sd, 95 % interval, Welch p-values against SAM and SGD), the effective radius and the
mechanism over the last third of training, validation accuracy against rho (a plot), and the
compute (epochs, CPU hours, how much pruning saved). It writes
``benchmarks/results/verdict-<setting>.{json,md,png}``. ``--smoke`` runs the whole pipeline on
a tiny budget (2 epochs, 2 trials, 2 final seeds) under ``/tmp/verdict-smoke`` and writes
nothing into ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from _common import DEFAULT_OUT_DIR, markdown_table, write_results
from label_noise import dataset_spec

from aace.report import INTERVAL_NOTE, percent_interval, welch_test

# The recipes of label_noise.py's studies (benchmarks/results/label_noise-*.md).
SETTINGS: dict[str, dict[str, Any]] = {
    "digits-noise40": dict(
        dataset="digits", model="wrn16_1", epochs=100, label_noise=0.4, extra=["--augment"]
    ),
    "cifar2k-clean": dict(
        dataset="cifar10_2k",
        model="wrn10_1",
        epochs=30,
        label_noise=0.0,
        extra=["--no-augment", "--compile"],
    ),  # fmt: skip
    "cifar2k-noise40": dict(
        dataset="cifar10_2k",
        model="wrn10_1",
        epochs=30,
        label_noise=0.4,
        extra=["--no-augment", "--compile"],
    ),  # fmt: skip
}
BATCH_SIZE, LR = 64, 0.05
# rho ranges, log-uniform; None: no rho (SGD).
RULES: dict[str, str | None] = {
    "sgd": None,
    "sam": "0.01:2:log",
    "sam-aace": "0.01:5:log",
    "sam-aace-normalized": "0.01:2:log",
    "asam": "0.05:10:log",
    "sam-bisam": "0.001:2:log",
}
END_SHARE = 0.1  # a chosen rho in the outer tenth of its log range counts as "at an end"
SESSIONS = "verdict-sessions.jsonl"


def train_args(setting: str, epochs: int) -> list[str]:
    """The ``aace train`` flags after ``--``, the same for every rule (lr is added for all but
    SGD, whose one-point grid sets it)."""
    recipe = SETTINGS[setting]
    args = [
        "--dataset", dataset_spec(recipe["dataset"]), "--model", recipe["model"],
        "--epochs", str(epochs), "--batch-size", str(BATCH_SIZE), "--schedule", "cosine",
        "--device", "cpu", *recipe["extra"],
    ]  # fmt: skip
    if recipe["label_noise"]:
        args += ["--label-noise", str(recipe["label_noise"])]
    return args


def tune_command(args: argparse.Namespace, rule: str) -> list[str]:
    space = RULES[rule]
    search = ["--lr", str(LR)] if space is None else ["--rho", space, "--trials", str(args.trials)]
    after = train_args(args.setting, args.epochs) + ([] if space is None else ["--lr", str(LR)])
    return [
        "aace", "tune", "--out", str(args.runs_dir / rule), "--optimizer", rule, *search,
        "--val-split", "0.1", "--final-seeds", str(args.final_seeds), "--pruner", args.pruner,
        *(["--min-epochs", str(args.min_epochs)] if args.min_epochs else []),
        "--workers", str(args.workers), "--", *after,
    ]  # fmt: skip


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_rule(args: argparse.Namespace, rule: str) -> int:
    """One rule's ``aace tune``; its wall clock, host and cores appended to SESSIONS."""
    command = tune_command(args, rule)
    out = args.runs_dir / rule
    out.mkdir(parents=True, exist_ok=True)
    print(f"[verdict {args.setting}/{rule}] {shlex.join(command)}", flush=True)
    start_wall, start = datetime.now(timezone.utc), time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    code = subprocess.call([sys.executable, "-m", "aace", *command[1:]])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    record = {
        "start": start_wall.isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - start,
        # user + system time of aace tune and its workers (all reaped descendants)
        "cpu_seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "exit_status": code,
        "host": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cores": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "workers": args.workers,
        "command": shlex.join(command),
    }
    with open(out / SESSIONS, "a") as file:
        file.write(json.dumps(record) + "\n")
    return code


# -- report -------------------------------------------------------------------------------------


def _rows(run: str | Path) -> list[dict[str, Any]]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _last_third_mean(rows: list[dict[str, Any]], key: str) -> float | None:
    tail = rows[len(rows) - max(1, len(rows) // 3) :] if rows else []
    values = [r[key] for r in tail if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _range_position(space: str, rho: float) -> float:
    """Where rho lies in a log range: 0 at its low end, 1 at its high end."""
    low, high = (float(x) for x in space.split(":")[:2])
    return math.log(rho / low) / math.log(high / low)


def _searched_range(settings: dict[str, Any]) -> str | None:
    """The rho range a study searched, as ``low:high[:log]`` from its ``tune.json`` settings;
    None for a grid (SGD's one point) or no rho."""
    for space in settings.get("spaces", []):
        if space["name"] == "rho" and space.get("values") is None:
            return f"{space['low']:g}:{space['high']:g}" + (":log" if space["log"] else "")
    return None


def collect(args: argparse.Namespace, rule: str) -> dict[str, Any] | None:
    """One rule's entry from its ``tune.json`` and run directories; None before its report."""
    out = args.runs_dir / rule
    tune_json = out / "tune.json"
    if not tune_json.is_file():
        return None
    entry = json.loads(tune_json.read_text())["optimizers"][rule]
    settings = json.loads(tune_json.read_text())["settings"]
    epochs = settings["base"].get("epochs", args.epochs)
    best = entry.get("best")
    rho = best["params"].get("rho") if best else None
    space = _searched_range(settings)
    position = _range_position(space, rho) if space and rho is not None else None
    final = entry.get("final") or {}
    final_rows = [_rows(run) for run in final.get("runs", [])]
    search_runs = sorted({t["run"] for t in entry["trials"] if t["run"]})
    search_rows = [_rows(run) for run in search_runs]
    states = [t["state"] for t in entry["trials"]]
    sessions = out / SESSIONS
    session_records = (
        [json.loads(line) for line in sessions.read_text().splitlines() if line.strip()]
        if sessions.is_file()
        else []
    )
    return {
        "rule": rule,
        "range": space,
        "chosen_rho": rho,
        "range_position": position,
        "at_end": position is not None and not END_SHARE <= position <= 1 - END_SHARE,
        "best_val_acc": best["value"] if best else None,
        "trials": [
            {k: t[k] for k in ("number", "state", "params", "best_val_acc", "epochs")}
            for t in entry["trials"]
        ],
        "trial_states": {s: states.count(s) for s in sorted(set(states))},
        "test_acc_at_selected": final.get("test_acc_at_selected", []),
        "final_seeds": final.get("seeds", []),
        "final_selected_epoch": [
            json.loads((Path(r) / "summary.json").read_text()).get("selected_epoch")
            if (Path(r) / "summary.json").is_file()
            else None
            for r in final.get("runs", [])
        ],
        "effective_radius": _mean([_last_third_mean(r, "perturbation_norm") for r in final_rows]),
        "perturbation_cosine": _mean(
            [_last_third_mean(r, "perturbation_cosine") for r in final_rows]
        ),
        "grad_norm": _mean([_last_third_mean(r, "grad_norm") for r in final_rows]),
        "compute": {
            "epochs_per_run": epochs,
            "search_budget_trials": len(entry["trials"]) if space is None else args.trials,
            "search_epochs": sum(len(r) for r in search_rows),
            "search_epochs_unpruned": (1 if space is None else args.trials) * epochs,
            "search_seconds": sum(row.get("seconds") or 0.0 for r in search_rows for row in r),
            "final_runs": len(final_rows),
            "final_epochs": sum(len(r) for r in final_rows),
            "final_seconds": sum(row.get("seconds") or 0.0 for r in final_rows for row in r),
            "wall_seconds": sum(s["wall_seconds"] for s in session_records),
            # None when a session predates the measurement
            "cpu_seconds": sum(s["cpu_seconds"] for s in session_records)
            if all("cpu_seconds" in s for s in session_records)
            else None,
            "sessions": session_records,
        },
    }


def _pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}"


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _versus(values: list[float], reference: list[float]) -> str:
    if len(values) < 2 or len(reference) < 2 or values is reference:
        return "–"
    difference, p = welch_test(values, reference)
    return f"{100 * difference:+.2f} (p={'–' if math.isnan(p) else f'{p:.2g}'})"


def report(args: argparse.Namespace) -> str:
    entries = [e for e in (collect(args, rule) for rule in args.rules) if e is not None]
    by_rule = {e["rule"]: e for e in entries}
    sam = by_rule.get("sam", {}).get("test_acc_at_selected", [])
    sgd = by_rule.get("sgd", {}).get("test_acc_at_selected", [])
    table_rows, compute_rows = [], []
    for e in entries:
        tests = e["test_acc_at_selected"]
        sd = statistics.stdev(tests) if len(tests) > 1 else None
        e["mean"] = statistics.fmean(tests) if tests else None
        e["sd"] = sd
        for name, reference in (("sam", sam), ("sgd", sgd)):
            if e["rule"] != name and len(tests) > 1 and len(reference) > 1:
                difference, p = welch_test(tests, reference)
                e[f"difference_vs_{name}"] = difference
                e[f"p_welch_vs_{name}"] = None if math.isnan(p) else p
        chosen = "–" if e["chosen_rho"] is None else f"{e['chosen_rho']:g}"
        place = (
            "–"
            if e["range_position"] is None
            else f"{e['range_position']:.2f}" + (" **at an end**" if e["at_end"] else "")
        )
        table_rows.append(
            [
                e["rule"], e["range"] or "– (lr 0.05)", chosen, place,
                f"{e['trial_states'].get('complete', 0)} of {sum(e['trial_states'].values())}",
                _pct(e["best_val_acc"]),
                f"{_pct(e['mean'])} ± {_pct(sd)}" if tests else "–", percent_interval(tests),
                len(tests), _versus(tests, sam) if e["rule"] != "sam" else "–",
                _versus(tests, sgd) if e["rule"] != "sgd" else "–",
                _num(e["effective_radius"]), _num(e["perturbation_cosine"]), _num(e["grad_norm"]),
            ]
        )  # fmt: skip
        c = e["compute"]
        saving = 1 - c["search_epochs"] / c["search_epochs_unpruned"]
        per_epoch = c["search_seconds"] / c["search_epochs"] if c["search_epochs"] else 0.0
        saved_hours = (c["search_epochs_unpruned"] - c["search_epochs"]) * per_epoch / 3600
        cores = sorted({tuple(s["cores"] or ()) for s in c["sessions"]})
        hosts = sorted({f"{s['host']} ({s['cpu_model']})" for s in c["sessions"]})
        compute_rows.append(
            [
                e["rule"], " / ".join(f"{v} {k}" for k, v in e["trial_states"].items()),
                c["search_epochs"], c["search_epochs_unpruned"],
                f"{100 * saving:.0f} % (≈ {saved_hours:.2f} core-h)",
                c["final_epochs"], f"{c['search_seconds'] / 3600:.2f}",
                f"{c['final_seconds'] / 3600:.2f}",
                "–" if c["cpu_seconds"] is None else f"{c['cpu_seconds'] / 3600:.2f}",
                f"{c['wall_seconds'] / 3600:.2f}",
                "; ".join(hosts) or "–",
                "; ".join(",".join(map(str, cs)) for cs in cores) or "–",
            ]
        )  # fmt: skip
    total = {
        key: sum(e["compute"][key] for e in entries)
        for key in (
            "search_epochs", "search_epochs_unpruned", "final_epochs", "search_seconds",
            "final_seconds", "wall_seconds",
        )
    }  # fmt: skip
    missing = [rule for rule in args.rules if rule not in by_rule]
    incomplete = [e["rule"] for e in entries if len(e["test_acc_at_selected"]) < args.final_seeds]
    recipe = SETTINGS[args.setting]
    pruner = {"asha": "ASHA", "median": "median", "none": "none"}[args.pruner] + (
        f", first rung {args.min_epochs} epochs" if args.min_epochs else ""
    )
    png = plot(args, entries)
    status = (
        "Complete: every rule searched and its final seeds trained."
        if not missing and not incomplete
        else "**Unfinished.** "
        + (f"No report yet from: {', '.join(missing)}. " if missing else "")
        + (
            f"Fewer than {args.final_seeds} final seeds: {', '.join(incomplete)}. "
            * bool(incomplete)
        )
        + "The figures below are partial."
    )
    text = (
        f"Setting **{args.setting}**: {recipe['dataset']}, "
        f"{100 * recipe['label_noise']:g} % symmetric label noise, {recipe['model']}, "
        f"{args.epochs} epochs, batch {BATCH_SIZE}, lr {LR} (cosine), "
        f"{' '.join(recipe['extra'])}; 10 % validation split (seed 0); each rule's rho by "
        f"`aace tune` ({args.trials} TPE trials, log-uniform range, pruner {pruner}), then "
        f"{args.final_seeds} final seeds (1..{args.final_seeds}) at the chosen rho.\n\n"
        f"{status}\n\n"
        "### Test accuracy at the validation-selected epoch of the final runs\n\n"
        + markdown_table(
            [
                "rule",
                "rho range (log)",
                "chosen rho",
                "place in range (0 low, 1 high)",
                "complete trials",
                "search: best val acc (%)",
                "test acc (%) mean ± sd",
                "95 % interval",
                "n",
                "Δ vs SAM (pp, Welch p)",
                "Δ vs SGD (pp, Welch p)",
                "effective radius ‖e‖",
                "cos(e_t, e_t-1)",
                "grad norm",
            ],
            table_rows,
        )  # fmt: skip
        + "\n\n"
        f"{INTERVAL_NOTE} A chosen rho in the outer tenth of its log range (place < "
        f"{END_SHARE:g} or > {1 - END_SHARE:g}) is marked **at an end**: its range should be "
        "widened. The chosen rho is the best *complete* trial's (aace tune's rule: a pruned "
        "trial cannot be chosen), so with one complete trial the search chose nothing. "
        "Effective radius, cosine of consecutive perturbations and gradient norm: "
        "means over the last third of the epochs of each final run's `metrics.jsonl`, then "
        "over the final runs (per-epoch means of the SAM statistics; none for SGD).\n\n"
        "### Compute\n\n"
        + markdown_table(
            [
                "rule",
                "search trials",
                "search epochs",
                "trials × epochs (no pruning)",
                "pruning saved",
                "final-run epochs",
                "search core-h",
                "final core-h",
                "measured CPU h",
                "wall clock h",
                "host (CPU)",
                "cores",
            ],
            compute_rows,
        )  # fmt: skip
        + "\n\n"
        f"Total: {total['search_epochs']} search epochs of {total['search_epochs_unpruned']} "
        f"without pruning ("
        + (
            f"{100 * (1 - total['search_epochs'] / total['search_epochs_unpruned']):.0f} % saved"
            if total["search_epochs_unpruned"]
            else "–"
        )
        + f"), {total['final_epochs']} final-run epochs; "
        f"{(total['search_seconds'] + total['final_seconds']) / 3600:.2f} core-hours of training "
        f"(search {total['search_seconds'] / 3600:.2f}, final {total['final_seconds'] / 3600:.2f})"
        f", {total['wall_seconds'] / 3600:.2f} hours of wall clock. Core-hours: the sum of the "
        "epochs' `seconds` (the wall time of each epoch's training and evaluation) over the "
        "runs, each worker training with one torch thread (the cores divided among the "
        "workers), so on a core shared with other work they include time it served that work; "
        "pruning's saving in core-hours is "
        "the epochs it skipped times the rule's mean seconds per search epoch. Measured CPU: "
        "user + system time of the `aace tune` process and its workers (`getrusage`; – where a "
        "session predates that measurement). Wall clock: the `aace tune` commands as timed by "
        "this script (`verdict-sessions.jsonl`), start-up and reports included. A pruned or "
        "resumed run counts the epochs it trained.\n\n"
    )
    # As last run (its --workers), or as this invocation would run it.
    commands = [
        by_rule[rule]["compute"]["sessions"][-1]["command"]
        if rule in by_rule and by_rule[rule]["compute"]["sessions"]
        else shlex.join(tune_command(args, rule))
        for rule in args.rules
    ]
    text += "### Commands (one per rule, as last run; rerun to resume)\n\n" + "\n".join(
        f"    {command}" for command in commands
    )
    # The section the docs include (pymdownx.snippets: "verdict-<setting>.md:verdict"); the
    # plot's link is relative to this folder, so it stays outside.
    text = (
        f"<!-- --8<-- [start:verdict] -->\n{text}\n<!-- --8<-- [end:verdict] -->\n\n"
        f"![validation accuracy against rho]({png.name})"
    )
    return write_results(
        args.name,
        entries,
        text,
        args.out_dir,
        device=torch.device("cpu"),
        config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        extra={"totals": total, "tune_commands": commands},
    )


def plot(args: argparse.Namespace, entries: list[dict[str, Any]]) -> Path:
    """Best validation accuracy of every trial against rho, one panel per rule (log x; x:
    pruned; star: chosen; dotted: the range's ends); SGD's validation accuracy as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    searched = [e for e in entries if e["range"]]
    sgd = next((e for e in entries if e["rule"] == "sgd"), None)
    columns = max(1, min(3, len(searched)))
    rows = max(1, math.ceil(len(searched) / columns))
    figure, axes = plt.subplots(
        rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False, sharey=True,
        constrained_layout=True,
    )  # fmt: skip
    for ax, e in zip(axes.flat, searched):
        for state, marker in (("complete", "o"), ("pruned", "x")):
            points = [
                (t["params"]["rho"], 100 * t["best_val_acc"])
                for t in e["trials"]
                if t["state"] == state and t["best_val_acc"] is not None
            ]
            if points:
                ax.scatter(*zip(*points), marker=marker, label=state)
        for t in e["trials"]:  # the epochs a trial trained: its best val acc is over those
            if t["best_val_acc"] is not None:
                ax.annotate(
                    str(t["epochs"]), (t["params"]["rho"], 100 * t["best_val_acc"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7, color="grey",
                )  # fmt: skip
        if e["chosen_rho"] is not None:
            ax.scatter(
                [e["chosen_rho"]], [100 * e["best_val_acc"]], marker="*", s=250,
                color="gold", edgecolors="black", zorder=5, label=f"chosen {e['chosen_rho']:g}",
            )  # fmt: skip
        low, high = (float(x) for x in e["range"].split(":")[:2])
        for end in (low, high):
            ax.axvline(end, color="grey", ls=":", lw=1)
        if sgd and sgd["best_val_acc"] is not None:
            ax.axhline(100 * sgd["best_val_acc"], color="black", ls="--", lw=1, label="SGD")
        ax.set_xscale("log")
        ax.set_xlabel("rho")
        ax.set_title(e["rule"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(searched) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("best val acc of the trial (%)")
    figure.suptitle(
        f"{args.name}: best validation accuracy of each trial against rho "
        "(x: pruned; grey: epochs trained)",
        fontsize=10,
    )
    out = Path(args.out_dir) / f"{args.name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", required=True, choices=list(SETTINGS))
    parser.add_argument(
        "--rules", default=",".join(RULES), help="comma-separated, of " + ", ".join(RULES)
    )
    parser.add_argument("--workers", type=int, default=1, help="aace tune --workers")
    parser.add_argument(
        "--pruner",
        choices=["asha", "median", "none"],
        default="asha",
        help="aace tune --pruner (default asha); another pruner or --min-epochs gets its own "
        "runs folder runs/verdict-<pruner>[-min<R>]/<setting> and result name",
    )
    parser.add_argument("--min-epochs", type=int, help="aace tune --min-epochs (first rung)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="2 epochs, 2 trials, 2 final seeds, under /tmp/verdict-smoke; writes nothing "
        "into benchmarks/results",
    )
    parser.add_argument("--runs-dir", type=Path, help="default runs/verdict/<setting>")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()
    args.rules = [rule.strip() for rule in args.rules.split(",") if rule.strip()]
    for rule in args.rules:
        if rule not in RULES:
            parser.error(f"--rules: got {rule!r}; expected some of {', '.join(RULES)}")
    # The default search (ASHA from its default first rung) keeps the short names.
    variant = "" if args.pruner == "asha" and not args.min_epochs else f"-{args.pruner}"
    variant += f"-min{args.min_epochs}" if args.min_epochs else ""
    args.name = f"verdict-{args.setting}{variant}"
    if args.smoke:
        args.epochs, args.trials, args.final_seeds = 2, 2, 2
        smoke = Path("/tmp/verdict-smoke")
        args.runs_dir = args.runs_dir or smoke / f"{args.setting}{variant}"
        if args.out_dir == DEFAULT_OUT_DIR:
            args.out_dir = smoke / "results"
    else:
        args.epochs, args.trials, args.final_seeds = SETTINGS[args.setting]["epochs"], 10, 5
        args.runs_dir = args.runs_dir or Path(f"runs/verdict{variant}") / args.setting
    if not args.report_only:
        for rule in args.rules:
            code = run_rule(args, rule)
            if code == 75:  # SIGTERM: trials back in the queue; rerun to continue
                print(f"[verdict] {rule}: stopped (exit 75); rerun to continue", flush=True)
                return code
            if code:
                print(f"[verdict] {rule}: aace tune exit status {code}", flush=True)
        print(f"[verdict] {args.setting}: all rules done", flush=True)
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
