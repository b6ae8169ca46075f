"""Throughput of ``aace train`` in one process and under torchrun with two processes (CPU).

Same global batch (128), SAM+AACE, WRN-16-1 on digits (1437 training images: 11 steps per
epoch either way, of 128 images or of 2 x 64 per process), ``--epochs`` epochs, ``--runs`` runs
per setting, the settings interleaved run by run so that drift in the machine's load reaches
every setting alike. Each number is a run's ``images_per_second`` from its ``metrics.jsonl``
(read through :mod:`aace.runs`); epoch 1 is warm-up and left out, so n = runs x (epochs - 1)
per setting. The clock is the trainer's own (the epoch's wall time), the one every run records.

    python -m benchmarks.micro.distributed_throughput --runs 3 --epochs 3

Writes ``benchmarks/results/distributed_throughput.{json,md}``; docs/distributed.md includes the
table. On a 2-core CPU expect no speedup: each process gets one core, and 2 processes do the
arithmetic of 1 process with 2 threads plus the all-reduce.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from aace.runs import RunDirectory
from benchmarks.harness import DEFAULT_OUT_DIR, markdown_table, positive_int, write_results

TRAIN = ["train", "--dataset", "digits", "--model", "wrn16_1", "--batch-size", "128",
         "--optimizer", "sam-aace", "--device", "cpu"]  # fmt: skip
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
SETTINGS: dict[str, tuple[list[str], list[str], dict[str, str]]] = {
    # name: (launcher, extra flags, environment)
    "1 process, 2 intra-op threads": ([sys.executable, "-m", "aace"], [], {}),
    "1 process under torchrun (`OMP_NUM_THREADS=1`)": (
        [*TORCHRUN, "--nproc-per-node", "1", "-m", "aace"], [], {"OMP_NUM_THREADS": "1"}),
    "2 processes, `--perturbation-sync local`": (
        [*TORCHRUN, "--nproc-per-node", "2", "-m", "aace"], [], {"OMP_NUM_THREADS": "1"}),
    "2 processes, `--perturbation-sync global`": (
        [*TORCHRUN, "--nproc-per-node", "2", "-m", "aace"], ["--perturbation-sync", "global"],
        {"OMP_NUM_THREADS": "1"}),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=positive_int, default=3, help="runs per setting")
    parser.add_argument("--epochs", type=positive_int, default=3, help="epochs per run (>= 2)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error(f"--epochs: must be >= 2 (epoch 1 is warm-up), got {args.epochs}")
    samples: dict[str, list[float]] = {name: [] for name in SETTINGS}
    scratch = Path(tempfile.mkdtemp(prefix="aace-throughput-"))
    try:
        for repeat in range(args.runs):
            for k, (name, (launcher, extra, env)) in enumerate(SETTINGS.items()):
                out = scratch / f"setting{k}-run{repeat}"
                command = [*launcher, *TRAIN, "--epochs", str(args.epochs), *extra,
                           "--seed", str(repeat), "--out", str(out)]  # fmt: skip
                subprocess.run(command, check=True, env={**os.environ, **env},
                               stdout=subprocess.DEVNULL)  # fmt: skip
                rows = RunDirectory(out).read_rows()[1:]
                samples[name] += [r["images_per_second"] for r in rows]
                print(f"{name} run {repeat}: {[round(r['images_per_second']) for r in rows]}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    n = args.runs * (args.epochs - 1)
    table = markdown_table(
        ["setting", f"images/s, median (min–max), n = {n}"],
        [[name, f"{statistics.median(v):.0f} ({min(v):.0f}–{max(v):.0f})"]
         for name, v in samples.items()],
    )  # fmt: skip
    rows = [{"setting": name, "images_per_second": v} for name, v in samples.items()]
    config = {"runs": args.runs, "epochs": args.epochs, "train": TRAIN}
    text = write_results("distributed_throughput", rows, table, args.out_dir,
                         device=torch.device("cpu"), config=config)  # fmt: skip
    print(text)


if __name__ == "__main__":
    main()
