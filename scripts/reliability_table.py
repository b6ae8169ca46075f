"""Feed the CLI each bad input of the manual's Reliability page; print what the user sees.

    .venv/bin/python scripts/reliability_table.py > /tmp/table.md
    .venv/bin/python scripts/reliability_table.py --torchrun   # also under torchrun, 2 workers

Every case runs ``aace`` in a subprocess (as a user would) inside a scratch directory and records
the exit status and the first line of stderr. benchmarks/results/reliability.md is its output.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def _npz(path: Path, **overrides: object) -> str:
    rng = np.random.default_rng(0)
    arrays = dict(
        x_train=rng.integers(0, 256, (16, 8, 8), dtype=np.uint8),
        y_train=np.arange(16) % 2,
        x_test=rng.integers(0, 256, (4, 8, 8), dtype=np.uint8),
        y_test=np.arange(4) % 2,
    )
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return f"npz:{path}"


def cases(tmp: Path) -> list[tuple[str, list[str]]]:
    good = _npz(tmp / "good.npz")
    fast = ["--dataset", good, "--model", "wrn10_1", "--epochs", "1", "--batch-size", "8"]
    cifar = tmp / "data" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (cifar / name).write_bytes(b"\x80\x04garbage")
    (tmp / "notadir").write_text("")
    subprocess.run(
        [sys.executable, "-m", "aace", "train", *fast, "--out", str(tmp / "run")],
        check=True,
        capture_output=True,
    )
    (tmp / "truncated.pt").write_bytes((tmp / "run" / "checkpoint.pt").read_bytes()[:300])
    torch.save({"state_dict": {}}, tmp / "foreign.pt")
    # A run whose dataset later changes to 3 classes.
    changing = _npz(tmp / "changing.npz")
    subprocess.run(
        [sys.executable, "-m", "aace", "train", *fast, "--dataset", changing,
         "--out", str(tmp / "run2")],
        check=True, capture_output=True,
    )  # fmt: skip
    _npz(tmp / "changing.npz", y_train=np.arange(16) % 3, y_test=np.arange(4) % 3)
    return [
        ("unknown dataset", ["train", "--dataset", "imagenet"]),
        ("unknown model", ["train", *fast, "--model", "resnet50"]),
        ("invalid WideResNet depth", ["train", *fast, "--model", "wrn27_10"]),
        ("unknown optimizer", ["train", "--optimizer", "adamw"]),
        ("unknown preset", ["train", "--preset", "wrn28-10-imagenet"]),
        ("negative rho", ["train", "--rho", "-0.05"]),
        ("non-finite rho", ["train", "--rho", "inf"]),
        ("non-finite learning rate", ["train", "--lr", "nan"]),
        ("zero epochs", ["train", "--epochs", "0"]),
        ("negative batch size", ["train", "--batch-size", "-8"]),
        ("batch larger than the dataset", ["train", *fast, "--batch-size", "1000"]),
        ("AACE threshold outside [0, 1]", ["train", "--aace-threshold", "1.2"]),
        ("not a number", ["train", "--epochs", "ten"]),
        ("missing dataset files", ["train", "--dataset", "cifar100", "--data-dir", str(tmp)]),
        (
            "corrupted dataset file",
            ["train", "--dataset", "cifar10", "--data-dir", str(tmp / "data")],
        ),
        ("npz file missing", ["train", "--dataset", f"npz:{tmp / 'nope.npz'}"]),
        ("npz with a missing key", ["train", "--dataset", _npz(tmp / "a.npz", y_test=None)]),
        (
            "npz with mismatched lengths",
            ["train", "--dataset", _npz(tmp / "b.npz", y_train=np.arange(15) % 2)],
        ),
        (
            "npz labels negative",
            ["train", "--dataset", _npz(tmp / "c.npz", y_test=np.array([0, 1, -1, 0]))],
        ),
        (
            "npz labels not integers",
            ["train", "--dataset", _npz(tmp / "d.npz", y_train=np.linspace(0, 1, 16))],
        ),
        (
            "npz images of the wrong shape",
            ["train", "--dataset", _npz(tmp / "e.npz", x_test=np.zeros((4, 8), np.uint8))],
        ),
        (
            "npz images not uint8",
            ["train", "--dataset", _npz(tmp / "f.npz", x_train=np.zeros((16, 8, 8)))],
        ),
        ("output directory not writable", ["train", *fast, "--out", "/proc/aace-run"]),
        ("output path is a file", ["train", *fast, "--out", str(tmp / "notadir")]),
        ("run directory holds a run, no --resume", ["train", *fast, "--out", str(tmp / "run")]),
        (
            "--resume with different settings",
            ["train", *fast, "--lr", "0.5", "--out", str(tmp / "run"), "--resume"],
        ),
        (
            "--resume of another model",
            ["train", *fast, "--model", "wrn16_1", "--out", str(tmp / "run"), "--resume"],
        ),
        ("checkpoint missing", ["eval", str(tmp / "missing.pt")]),
        ("truncated checkpoint", ["eval", str(tmp / "truncated.pt")]),
        ("foreign checkpoint", ["eval", str(tmp / "foreign.pt")]),
        ("checkpoint of another class count", ["eval", str(tmp / "run2" / "checkpoint.pt")]),
        ("compare on a non-run directory", ["compare", str(tmp)]),
        ("a diverging run (NaN loss)", ["train", *fast, "--lr", "1e30", "--out", str(tmp / "nan")]),
    ]


def _first_line(result: subprocess.CompletedProcess, scratch: str) -> str:
    lines = result.stderr.strip().splitlines()
    first = lines[0] if lines else "(nothing)"
    if "Traceback" in result.stderr:
        first = "TRACEBACK: " + lines[-1]
    return first.replace(scratch, "/tmp/x").replace("|", "\\|")


def _under_torchrun(argv: list[str], env: dict[str, str]) -> str:
    """Exit status of each of 2 workers and the number of distinct error lines."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "aace", *argv]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    statuses = re.findall(r"^\s*exitcode\s*: (-?\d+) \(pid", result.stderr, re.M)
    if result.returncode == 0:
        statuses = ["0", "0"]
    lines = [line for line in result.stderr.splitlines() if line.startswith("aace:")]
    # torchrun's own report has a traceback of torchrun; a worker's would name aace's files.
    traceback = "; TRACEBACK" if re.search(r'File "[^"]*/aace/', result.stderr) else ""
    return f"{', '.join(sorted(statuses))}; {len(lines)} line(s){traceback}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--torchrun",
        action="store_true",
        help="also run each 'train' case under torchrun with 2 processes and report the "
        "workers' exit statuses and the number of 'aace:' lines",
    )
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        if args.torchrun:
            print("| bad input | exit | under torchrun: workers' exits; lines | what the user "
                  "sees (stderr, first line) |")  # fmt: skip
            print("|---|---|---|---|")
        else:
            print("| bad input | exit | what the user sees (stderr, first line) |")
            print("|---|---|---|")
        for title, argv in cases(tmp):
            result = subprocess.run(
                [sys.executable, "-m", "aace", *argv], capture_output=True, text=True, env=env
            )
            first = _first_line(result, scratch)
            if not args.torchrun:
                print(f"| {title} | {result.returncode} | `{first}` |")
                continue
            distributed = _under_torchrun(argv, env) if argv[0] == "train" else "(not a job)"
            print(f"| {title} | {result.returncode} | {distributed} | `{first}` |", flush=True)


if __name__ == "__main__":
    main()
