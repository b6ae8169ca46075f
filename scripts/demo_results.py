"""Write the demo's result files from its run directories (``make demo`` calls it).

    .venv/bin/python scripts/demo_results.py runs/demo

Writes ``benchmarks/results/demo.md`` (the ``aace compare`` table of the runs, the setting, the
number of runs, the training time and the machine, all read from the run directories) and
``benchmarks/results/demo.png`` (``aace plot`` of the same runs). The manual's Getting started
page includes the Markdown, so its table is never typed by hand.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from aace.report import compare_table, plot_runs
from aace.runs import find_runs

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="the demo's folder of runs (runs/demo)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = find_runs(args.demo)
    records = [run.read_record() for run in runs]
    seconds = sum(run.read_summary()["seconds"] for run in runs if run.finished)
    presets = sorted({str(r["config"].get("preset")) for r in records})
    devices = sorted(
        {f"{r.get('device')} ({r.get('platform', platform.platform())})" for r in records}
    )
    versions = sorted({r.get("aace_version", "?") for r in records})
    args.results.mkdir(parents=True, exist_ok=True)
    figure = plot_runs([run.path for run in runs], args.results / "demo.png")
    text = [
        "# Demo",
        "",
        f"`make demo`: `aace train --preset {', '.join(presets)}` with each optimizer and seed "
        f"({len(runs)} runs, {seconds:.0f} s of training in all), then `aace compare` and "
        f"`aace plot`. Device: {', '.join(devices)}; aace {', '.join(versions)}.",
        "",
        compare_table([run.path for run in runs]),
        "",
        f"![Curves of the demo runs: test accuracy (%), losses and SAM statistics against "
        f"epoch, one line per run]({figure.name})",
        "",
    ]
    (args.results / "demo.md").write_text("\n".join(text))
    print(f"wrote {args.results / 'demo.md'} and {figure}")


if __name__ == "__main__":
    main()
