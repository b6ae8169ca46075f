"""What a tuning found: every configuration's score with its uncertainty, the choice, and the
final seeds compared with the baseline; ``tune.json``, ``tune.md`` and ``tune.png``.

**Uncertainty of a configuration's score.** Its standard error (SE) is the larger of two:
the spread over search seeds, sd / √S (S ≥ 2), and, for an accuracy score, the binomial SE of
one accuracy measured on the validation split, √(p (1 − p) / n_val). The second does not
shrink with more seeds (every seed is scored on the same images), so taking the larger is
conservative. The configurations whose score is within two SE of the best (the best's SE)
are those the validation split cannot tell from the best; when they span more than one grid
step the report says so, and a choice at an end of the searched range is flagged (widen it).

**Final seeds.** Every rule's chosen configuration is trained with the same new seeds, so the
comparison with ``--baseline`` is paired by seed: the mean difference with its 95 % t-interval,
the paired t-test's p-value Holm-adjusted over the rules compared, and the two one-sided tests
(TOST) of equivalence within ``±margin`` percentage points (:mod:`aace.stats`). These are
conditional on each rule's chosen configuration: they do not include the variance of the
choice itself.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from aace import stats
from aace.runs import RunDirectory, atomic_write_json, atomic_write_text
from aace.training.config import RunConfig
from aace.training.tune.sampling import final_study
from aace.training.tune.scoring import rank_key
from aace.training.tune.spec import TuneSpec
from aace.training.tune.storage import ERROR, PARAMS, RETRY_OF, RUNS, SKIPPED

__all__ = [
    "CHOSEN", "REPORT_JSON", "REPORT_MD", "REPORT_PLOT", "choose", "configurations", "uncertainty",
    "write_report",
]  # fmt: skip

REPORT_MD, REPORT_JSON, REPORT_PLOT = "tune.md", "tune.json", "tune.png"
CHOSEN = "aace_chosen"  # a final study's user attribute: the configuration the search chose
ALPHA = 0.05


def _key(params: dict[str, float]) -> str:
    return json.dumps(params, sort_keys=True)


def standard_error(runs: list[dict[str, Any]], score: str) -> float:
    """The SE of a configuration's mean score over its runs (see the module's docstring)."""
    values = [r["score"] for r in runs]
    candidates = []
    if len(values) >= 2:
        candidates.append(statistics.stdev(values) / math.sqrt(len(values)))
    counts = [r["val_count"] for r in runs if r.get("val_count")]
    if score.endswith("-acc") and counts:
        p = min(max(statistics.fmean(values), 0.0), 1.0)
        candidates.append(math.sqrt(p * (1 - p) / min(counts)))
    return max(candidates) if candidates else math.nan


def configurations(spec: TuneSpec, optimizer: str, study: Any) -> list[dict[str, Any]]:
    """Every configuration tried in the search study: its parameters, runs, state (``full``:
    every search seed trained to the end; else ``running``, ``queued`` or ``failed``), score,
    second measure and SE, in grid order (TPE: in trial order)."""
    by_key: dict[str, dict[str, Any]] = {}
    for trial in study.get_trials(deepcopy=False):
        params = trial.user_attrs.get(PARAMS)
        if params is None or trial.user_attrs.get(SKIPPED):
            continue
        entry = by_key.setdefault(
            _key(params), {"params": params, "state": "failed", "tries": 0, "first": trial.number}
        )
        entry["tries"] += 1
        state = trial.state.name
        if state == "COMPLETE" and entry["state"] != "full":
            runs = trial.user_attrs[RUNS]
            entry.update(
                state="full",
                runs=runs,
                score=statistics.fmean(r["score"] for r in runs),
                secondary=statistics.fmean(r["secondary"] for r in runs),
                se=standard_error(runs, spec.score),
                epochs=[r["epochs"] for r in runs],
                diverged=sum(r["diverged"] for r in runs),
            )
        elif state in ("RUNNING", "WAITING") and entry["state"] != "full":
            entry["state"] = "running" if state == "RUNNING" else "queued"
        elif state == "FAIL" and entry["state"] == "failed":
            entry["error"] = trial.user_attrs.get(ERROR, entry.get("error"))
    grid = spec.configurations(optimizer)
    order = {_key(c): i for i, c in enumerate(grid)} if grid is not None else {}
    entries = sorted(by_key.values(), key=lambda e: order.get(_key(e["params"]), e["first"]))
    full = sorted(
        (e for e in entries if e["state"] == "full"),
        key=lambda e: rank_key(e["score"], e["secondary"], e["params"]),
    )
    for rank, entry in enumerate(full, 1):
        entry["rank"] = rank
    return entries


def choose(spec: TuneSpec, optimizer: str, study: Any) -> dict[str, float] | None:
    """The best full configuration's parameters (ranked by :func:`scoring.rank_key`), or None
    when none is full."""
    best = [e for e in configurations(spec, optimizer, study) if e.get("rank") == 1]
    return best[0]["params"] if best else None


def uncertainty(spec: TuneSpec, optimizer: str, entries: list[dict[str, Any]]) -> dict:
    """The best configuration, the set within two SE of it, whether the validation split can
    choose, and whether the choice lies at an end of the range."""
    full = [e for e in entries if e["state"] == "full"]
    if not full:
        return {}
    best = next(e for e in full if e["rank"] == 1)
    se = best["se"]
    close = [e for e in full if not math.isnan(se) and e["score"] >= best["score"] - 2 * se]
    counts = [r["val_count"] for e in full for r in e["runs"] if r.get("val_count")]
    result: dict[str, Any] = {
        "best": best["params"],
        "best_score": best["score"],
        "best_se": se,
        "within_2se": [e["params"] for e in close],
        "val_count": min(counts) if counts else None,
        "cannot_choose": None,
        "at_range_end": None,
    }
    grid = spec.grid(optimizer) if spec.is_grid(optimizer) else None
    if grid and len(grid) == 1:
        (name, values), = grid.items()  # fmt: skip
        indices = sorted(values.index(e["params"][name]) for e in close)
        if indices and indices[-1] - indices[0] > 1:
            result["cannot_choose"] = [values[indices[0]], values[indices[-1]]]
        searched = next(s for s in spec.spaces_for(optimizer) if s.name == name)
        position = values.index(best["params"][name])
        if not searched.is_list and len(values) > 1 and position in (0, len(values) - 1):
            result["at_range_end"] = "low" if position == 0 else "high"
    return result


def _trial_counts(study: Any) -> dict[str, int]:
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SKIPPED)]
    return {
        "trials": len(trials),
        "retries": sum(RETRY_OF in t.user_attrs for t in trials),
        "errors": sum(1 for t in trials if ERROR in t.user_attrs),
    }


def _finals(spec: TuneSpec, study: Any) -> dict[str, Any]:
    """The final runs, one per seed (a seed trained twice is one sample), in seed order."""
    by_seed: dict[int, dict[str, Any]] = {}
    for trial in study.get_trials(deepcopy=False):
        if trial.state.name == "COMPLETE":
            (run,) = trial.user_attrs[RUNS]
            by_seed.setdefault(run["seed"], run)
    tests = {}
    for seed, run in sorted(by_seed.items()):
        directory = RunDirectory(run["run"])
        if directory.finished:
            tests[seed] = directory.read_summary().get("test_acc_at_selected")
    values = [v for v in tests.values() if v is not None]
    low, high = stats.confidence_interval(values)
    mean, sd = stats.mean_sd(values)
    return {
        "runs": [by_seed[s]["run"] for s in tests],
        "seeds": list(tests),
        "test_acc_at_selected": list(tests.values()),
        "mean": mean,
        "sd": sd,
        "ci95": [low, high],
        "n": len(values),
    }


def _compare(spec: TuneSpec, finals: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each rule against the baseline, paired by seed, Holm-adjusted, with TOST."""
    reference = finals[spec.baseline]  # type: ignore[index]
    base = dict(zip(reference["seeds"], reference["test_acc_at_selected"]))
    results: dict[str, dict[str, Any]] = {}
    for optimizer, final in finals.items():
        if optimizer == spec.baseline:
            continue
        own = dict(zip(final["seeds"], final["test_acc_at_selected"]))
        seeds = sorted(set(own) & set(base))
        if not seeds:
            continue
        a, b = [own[s] for s in seeds], [base[s] for s in seeds]
        paired = stats.paired_difference(a, b)
        margin = spec.margin / 100
        results[optimizer] = {
            "seeds": seeds,
            "difference": paired.difference,
            "ci95": [paired.low, paired.high],
            "p": paired.p,
            "tost_p": stats.tost_paired(a, b, margin),
            "margin": margin,
            "sd_of_differences": paired.sd,
        }
    adjusted = stats.holm([r["p"] for r in results.values()])
    tests = max(1, len(results))
    for result, p_holm in zip(results.values(), adjusted):
        result["p_holm"] = p_holm
        result["detectable"] = stats.detectable_difference(
            result["sd_of_differences"], len(result["seeds"]), ALPHA, 0.8, tests
        )
        result["verdict"] = _verdict(result)
    return results


def _verdict(result: dict[str, Any]) -> str:
    margin = 100 * result["margin"]
    difference = 100 * result["difference"]
    if not math.isnan(result["tost_p"]) and result["tost_p"] < ALPHA:
        return f"within ±{margin:g} pp (equivalent: TOST p = {result['tost_p']:.3g})"
    if not math.isnan(result["p_holm"]) and result["p_holm"] < ALPHA:
        side = "better" if difference > 0 else "worse"
        return f"{side} by {abs(difference):.2f} pp (Holm p = {result['p_holm']:.3g})"
    return (
        f"cannot tell: neither a difference nor equivalence within ±{margin:g} pp is shown "
        f"(Δ {difference:+.2f} pp)"
    )


def write_report(spec: TuneSpec, studies: dict[str, Any]) -> dict[str, Any]:
    """``tune.json``, ``tune.md`` and ``tune.png`` in ``spec.out`` from the studies; returns
    the JSON."""
    result: dict[str, Any] = {"settings": spec.stored(), "storage": spec.storage, "optimizers": {}}
    finals = {}
    for optimizer in spec.optimizers:
        study = studies[optimizer]
        entries = configurations(spec, optimizer, study)
        entry: dict[str, Any] = {
            "budget": spec.budget(optimizer),
            "configurations": entries,
            **_trial_counts(study),
            "epochs_trained": sum(sum(e.get("epochs", [])) for e in entries),
            **uncertainty(spec, optimizer, entries),
        }
        if final_study(optimizer) in studies:
            entry["final"] = finals[optimizer] = _finals(spec, studies[final_study(optimizer)])
        result["optimizers"][optimizer] = entry
    if spec.baseline is not None and spec.final_seeds and finals[spec.baseline]["n"]:
        comparisons = _compare(spec, finals)
        for optimizer, comparison in comparisons.items():
            result["optimizers"][optimizer]["vs_baseline"] = comparison
    out = Path(spec.out)
    atomic_write_json(out / REPORT_JSON, _json_safe(result))
    atomic_write_text(out / REPORT_MD, _markdown(spec, result))
    _plot(spec, result, out / REPORT_PLOT)
    return result


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# -- text -------------------------------------------------------------------------------------


def _params_text(params: dict[str, float] | None) -> str:
    if params is None:
        return "–"
    return ", ".join(f"{k}={v:g}" for k, v in params.items()) or "defaults"


def _score_text(spec: TuneSpec, value: float | None, se: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    scale = 100 if spec.score.endswith("-acc") else 1
    digits = 2 if scale == 100 else 4
    shown = value if scale == 100 else -value  # a loss score is minus the loss
    text = f"{scale * shown:.{digits}f}"
    if se is not None and not math.isnan(se):
        text += f" ± {scale * se:.{digits}f}"
    return text


def _rule_lines(spec: TuneSpec, optimizer: str, entry: dict[str, Any]) -> list[str]:
    entries = entry["configurations"]
    full = [e for e in entries if e["state"] == "full"]
    unit = "%" if spec.score.endswith("-acc") else "(validation loss)"
    lines = [f"### {optimizer}", ""]
    facts = [
        f"Configurations compared at full budget: {len(full)} of {entry['budget']}, "
        f"{spec.search_seeds} seed(s) each, {spec.epochs} epochs."
    ]
    n_val = entry.get("val_count")
    if n_val:
        facts.append(f"Validation split: {n_val} images; one image is {100 / n_val:.2f} pp.")
    if full:
        facts.append(
            f"Best: {_params_text(entry['best'])}, score {_score_text(spec, entry['best_score'])}"
            f" {unit}, SE {_score_text(spec, entry['best_se'])}."
        )
        close = entry["within_2se"]
        facts.append(
            "Within two SE of the best: "
            + ("; ".join(_params_text(p) for p in close) if close else "– (SE unknown)")
            + "."
        )
        if entry.get("cannot_choose"):
            low, high = entry["cannot_choose"]
            name = next(iter(entry["best"]))
            facts.append(
                f"**The validation split cannot choose {name} within [{low:g}, {high:g}].**"
            )
        if entry.get("at_range_end"):
            facts.append(
                f"**The choice is at the {entry['at_range_end']} end of the searched range: "
                "widen the range and rerun.**"
            )
    if entry["retries"] or entry["errors"]:
        facts.append(
            f"Trials: {entry['trials']} ({entry['retries']} of them retries of stopped or "
            f"failed trials; {entry['errors']} raised an error)."
        )
    lines += [" ".join(facts), ""]
    names = sorted({k for e in entries for k in e["params"]})
    columns = [*names, "seeds", "epochs", "state", "score ± SE", "rank"]
    lines += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for e in entries:
        epochs = ", ".join(sorted({str(x) for x in e.get("epochs", [])})) or "–"
        state = e["state"] + (f" ({e['diverged']} diverged)" if e.get("diverged") else "")
        if e["state"] == "failed" and e.get("error"):
            state += f": {e['error'][:80]}"
        cells = [f"{e['params'][n]:g}" for n in names]
        lines.append(
            "| " + " | ".join(cells) + (" | " if cells else "")
            + f"{len(e.get('runs', []))} | {epochs} | {state} | "
            f"{_score_text(spec, e.get('score'), e.get('se'))} | {e.get('rank', '–')} |"
        )  # fmt: skip
    return lines + [""]


def _markdown(spec: TuneSpec, result: dict[str, Any]) -> str:
    spaces = ", ".join(
        f"{s.name} in {list(s.values)}"
        if s.values is not None
        else f"{s.name} in [{s.low:g}, {s.high:g}]{' (log)' if s.log else ''}"
        for s in spec.spaces
    )
    base = RunConfig(**spec.base)
    lines = [
        f"# aace tune: {base.dataset} / {base.model} / {base.epochs} epochs"
        + (f" / {100 * base.label_noise:g} % label noise" if base.label_noise else ""),
        "",
        f"Searched {spaces or 'nothing (defaults)'}; score `{spec.score}` on a validation split"
        f" of {spec.val_split:g} (split seed {spec.val_split_seed}); search seeds "
        f"{spec.search_seed_values}. SE: the larger of the spread over seeds and the binomial "
        "SE of the validation split.",
        "",
        "| optimizer | full / configurations | epochs trained | chosen | score ± SE |",
        "|---|---|---|---|---|",
    ]
    for optimizer, entry in result["optimizers"].items():
        full = sum(e["state"] == "full" for e in entry["configurations"])
        lines.append(
            f"| {optimizer} | {full} / {entry['budget']} | {entry['epochs_trained']} | "
            f"{_params_text(entry.get('best'))} | "
            f"{_score_text(spec, entry.get('best_score'), entry.get('best_se'))} |"
        )
    lines.append("")
    for optimizer, entry in result["optimizers"].items():
        lines += _rule_lines(spec, optimizer, entry)
    if spec.final_seeds:
        lines += _final_lines(spec, result)
    return "\n".join(lines) + "\n"


def _final_lines(spec: TuneSpec, result: dict[str, Any]) -> list[str]:
    baseline = spec.baseline
    lines = [
        "## Final runs",
        "",
        f"Each rule's chosen configuration trained with the same {spec.final_seeds} new seeds "
        f"{spec.final_seed_values}; test accuracy at the epoch the validation split selects. "
        + (
            f"Against {baseline}: the paired difference (same seed), its 95 % t-interval, the "
            "paired t-test Holm-adjusted over the rules, and equivalence within "
            f"±{spec.margin:g} pp (TOST). All conditional on each rule's chosen configuration."
            if baseline
            else ""
        ),
        "",
        "| optimizer | chosen | test acc (%) | 95 % CI | n |"
        + (f" Δ vs {baseline} (pp) | 95 % CI | p (Holm) | verdict |" if baseline else ""),
        "|---|---|---|---|---|" + ("---|---|---|---|" if baseline else ""),
    ]
    for optimizer, entry in result["optimizers"].items():
        final = entry.get("final") or {"test_acc_at_selected": [], "n": 0}
        low, high = final.get("ci95") or (None, None)
        interval = "–" if low is None or math.isnan(low) else f"[{100 * low:.2f}, {100 * high:.2f}]"
        line = (
            f"| {optimizer} | {_params_text(entry.get('best'))} | "
            f"{stats.mean_sd_text(final['test_acc_at_selected'])} | {interval} | {final['n']} |"
        )
        if baseline:
            versus = entry.get("vs_baseline")
            if versus is None:
                line += " – | – | – | – |"
            else:
                d_low, d_high = versus["ci95"]
                ci = "–" if math.isnan(d_low) else f"[{100 * d_low:+.2f}, {100 * d_high:+.2f}]"
                p = versus["p_holm"]
                line += (
                    f" {100 * versus['difference']:+.2f} | {ci} | "
                    f"{'–' if math.isnan(p) else f'{p:.3g}'} | {versus['verdict']} |"
                )
        lines.append(line)
    detectable = [
        (o, e["vs_baseline"]["detectable"])
        for o, e in result["optimizers"].items()
        if e.get("vs_baseline") and not math.isnan(e["vs_baseline"]["detectable"])
    ]
    if detectable:
        lines += [
            "",
            "Smallest true difference these seeds detect (paired t-test at α = 0.05 over the "
            "rules compared, 80 % power, the observed sd of the differences): "
            + ", ".join(f"{o} {100 * d:.2f} pp" for o, d in detectable)
            + ".",
        ]
    return lines + [""]


def _plot(spec: TuneSpec, result: dict[str, Any], path: Path) -> None:
    """Score ± SE against the first searched parameter (log axis for a log range), per-seed
    points, each rule's choice a star; full configurations only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in spec.spaces]
    x_name = "rho" if "rho" in names else (names[0] if names else None)
    scale = 100 if spec.score.endswith("-acc") else -1
    figure, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for index, (optimizer, entry) in enumerate(result["optimizers"].items()):
        color = f"C{index % 10}"
        full = [e for e in entry["configurations"] if e["state"] == "full"]
        if full and all(x_name not in e["params"] for e in full):  # SGD: nothing on the axis
            ax.axhline(scale * entry["best_score"], color=color, linestyle="--", label=optimizer)
            continue
        full = [e for e in full if x_name in e["params"]]
        if not full:
            continue
        full.sort(key=lambda e: e["params"][x_name])
        xs = [e["params"][x_name] for e in full]
        ys = [scale * e["score"] for e in full]
        errors = [0 if math.isnan(e["se"]) else abs(scale) * e["se"] for e in full]
        ax.errorbar(xs, ys, yerr=errors, color=color, marker="o", capsize=3, label=optimizer)
        for e in full:
            seeds = [scale * r["score"] for r in e["runs"]]
            ax.scatter([e["params"][x_name]] * len(seeds), seeds, color=color, s=8, alpha=0.4)
        best = entry.get("best")
        if best and x_name in best:
            ax.scatter([best[x_name]], [scale * entry["best_score"]], color=color, marker="*",
                       s=250, edgecolors="black", zorder=5)  # fmt: skip
    log = any(s.log for s in spec.spaces if s.name == x_name) or x_name == "rho"
    if x_name is not None:
        ax.set_xlabel(x_name)
        if log:
            ax.set_xscale("log")
    unit = "%" if scale == 100 else "validation loss"
    ax.set_ylabel(f"{spec.score} ({unit}), mean ± SE over {spec.search_seeds} seed(s)")
    ax.set_title(f"aace tune: every configuration at {spec.epochs} epochs (★ chosen)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)
