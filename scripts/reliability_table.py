"""Feed the CLI each bad input the README's "Reliability" table lists; print what the user sees.

    .venv/bin/python scripts/reliability_table.py > /tmp/table.md

Every case runs ``aace`` in a subprocess (as a user would) inside a scratch directory and records
the exit status and the first line of stderr. The table in the README is this script's output.
"""

from __future__ import annotations

import os
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


def main() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        print("| bad input | exit | what the user sees (stderr, first line) |")
        print("|---|---|---|")
        for title, argv in cases(tmp):
            result = subprocess.run(
                [sys.executable, "-m", "aace", *argv], capture_output=True, text=True, env=env
            )
            lines = result.stderr.strip().splitlines()
            first = lines[0] if lines else "(nothing)"
            if "Traceback" in result.stderr:
                first = "TRACEBACK: " + lines[-1]
            first = first.replace(scratch, "/tmp/x").replace("|", "\\|")
            print(f"| {title} | {result.returncode} | `{first}` |")


if __name__ == "__main__":
    main()
