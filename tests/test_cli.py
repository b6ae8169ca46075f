"""The aace command line: every dataset format, the other commands, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from aace.cli import build_parser, config_from_args, main
from fakedata import write_cifar10, write_cifar100, write_fashion_mnist, write_food101

FAST = ["--model", "wrn10_1", "--epochs", "1", "--batch-size", "4", "--seed", "3"]


@pytest.fixture
def tiny_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (24, 8, 8), dtype=np.uint8),
        y_train=np.arange(24) % 3,
        x_test=rng.integers(0, 256, (9, 8, 8), dtype=np.uint8),
        y_test=np.arange(9) % 3,
        classes=np.array(["a", "b", "c"]),
    )
    return path


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "fashion-mnist", "food101"])
def test_train_on_each_real_format(dataset, tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    if dataset == "cifar10":
        write_cifar10(root, monkeypatch)
    elif dataset == "cifar100":
        write_cifar100(root, monkeypatch)
    elif dataset == "fashion-mnist":
        write_fashion_mnist(root)
    else:
        write_food101(root)
    out = tmp_path / "run"
    args = ["train", "--dataset", dataset, "--data-dir", str(root), "--out", str(out), *FAST]
    assert main([*args, "--optimizer", "sam-aace"]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["epoch"] == 1 and row["grad_norm"] > 0
    assert "final test accuracy" in capsys.readouterr().out


def test_train_sam_bisam_tiny_job(tiny_npz, tmp_path):
    out = tmp_path / "bisam"
    argv = ["train", "--dataset", f"npz:{tiny_npz}", "--out", str(out), *FAST]
    assert main([*argv, "--optimizer", "sam-bisam"]) == 0
    saved = json.loads((out / "config.json").read_text())["config"]
    assert (saved["optimizer"], saved["rho"]) == ("sam-bisam", None)  # None: DEFAULT_RHO
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["epoch"] == 1 and row["grad_norm"] > 0
    assert row["perturbation_norm"] == pytest.approx(0.05, rel=1e-5)  # BiSAM's CIFAR-10 rho


def test_train_help_lists_sam_bisam(capsys):
    assert main(["train", "--help"]) == 0
    assert "sam-bisam" in capsys.readouterr().out


def test_train_eval_compare_plot(tiny_npz, tmp_path, capsys):
    runs = []
    for optimizer in ("sgd", "sam-aace"):
        for seed in ("0", "1"):
            out = tmp_path / f"{optimizer}-{seed}"
            argv = ["train", "--dataset", f"npz:{tiny_npz}", "--out", str(out), *FAST]
            assert main([*argv, "--optimizer", optimizer, "--seed", seed, "--epochs", "2"]) == 0
            runs.append(str(out))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "sgd-0" / "checkpoint.pt")]) == 0
    line = capsys.readouterr().out
    summary = json.loads((tmp_path / "sgd-0" / "summary.json").read_text())
    assert f"accuracy {summary['final_test_acc']:.4f}" in line and "9 images" in line
    assert main(["eval", str(tmp_path / "sgd-0")]) == 0  # a run directory: its checkpoint.pt
    assert capsys.readouterr().out == line

    assert main(["compare", *runs]) == 0
    table = capsys.readouterr().out
    assert main(["compare", str(tmp_path)]) == 0  # the folder of the four runs (sorted)
    assert sorted(capsys.readouterr().out.splitlines()) == sorted(table.splitlines())
    finals = [json.loads((tmp_path / f"sgd-{s}" / "summary.json").read_text())["final_test_acc"]
              for s in "01"]  # fmt: skip
    assert f"| sgd | {100 * np.mean(finals):.2f} ± {100 * np.std(finals, ddof=1):.2f}" in table
    assert "| sam-aace rho=0.2 |" in table and "| 2 |" in table

    png = tmp_path / "curves.png"
    assert main(["plot", *runs, "--figure", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_preset_then_flags_override():
    parser = build_parser()
    args = parser.parse_args(["train", "--preset", "wrn28-10-cifar100", "--batch-size", "32"])
    config = config_from_args(args)
    assert (config.model, config.dataset, config.batch_size) == ("wrn28_10", "cifar100", 32)
    assert (config.lr, config.momentum, config.weight_decay, config.epochs) == (0.1, 0.9, 5e-4, 200)
    assert (config.rho, config.optimizer, config.preset) == (0.2, "sam-aace", "wrn28-10-cifar100")
    args = parser.parse_args(["train", "--preset", "pyramidnet272-cifar100"])
    assert config_from_args(args).batch_size == 64


def test_presets_command(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "wrn28-10-cifar100" in out and "pyramidnet272-cifar100" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--optimizer", "adam"], "argument --optimizer: invalid choice: 'adam'"),
        (["train", "--preset", "nope"], "--preset: unknown preset 'nope'"),
        (["train", "--rho", "-0.1"], "--rho: got -0.1; expected a finite number >= 0"),
        (["train", "--rho", "nan"], "--rho: got nan"),
        (["train", "--lr", "-1"], "--lr: got -1.0"),
        (["train", "--epochs", "0"], "--epochs: got 0; expected an integer >= 1"),
        (["train", "--batch-size", "-4"], "--batch-size: got -4"),
        (["train", "--aace-threshold", "1.5"], "--aace-threshold: got 1.5; expected a number in"),
        (["train", "--dataset", "mnist"], "mnist"),
        (["train", "--model", "resnet9"], "resnet9"),
        (["train", "--dataset", "cifar10", "--data-dir", "/nonexistent"], "/nonexistent"),
        (["eval", "/nonexistent/checkpoint.pt"], "does not exist"),
        (["compare", "/nonexistent"], "not an aace run directory"),
        (["train", "--epochs", "two"], "invalid int value: 'two'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    if argv[0] == "train":
        argv = [*argv, "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert err.startswith("aace: error:")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_before_or_after_the_subcommand(where, tmp_path, capsys):
    argv = ["train", "--rho", "-1", "--out", str(tmp_path / "r")]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "ConfigError" in err
    assert (
        err.strip().splitlines()[-1]
        == "aace: error: --rho: got -1.0; expected a finite number >= 0"
    )


@pytest.mark.parametrize("command", ["sweep", "tune"])
def test_debug_after_the_dashes_is_named(command, tmp_path, capsys):
    argv = [command, "--out", str(tmp_path / "s"), "--", "--epochs", "1", "--debug"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"aace: error: --debug after --: it is a flag of aace {command} itself, not of the "
        "runs; put it before --"
    ]


def test_corrupted_checkpoint_and_foreign_file(tmp_path, capsys):
    truncated = tmp_path / "checkpoint.pt"
    truncated.write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["eval", str(truncated)]) == 2
    assert "truncated, corrupted or not a PyTorch file" in capsys.readouterr().err
    import torch

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    assert main(["eval", str(foreign)]) == 2
    assert "not written by aace" in capsys.readouterr().err


def test_python_dash_m_runs_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "aace", "train", "--rho", "-1", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[0] == (
        "aace: error: --rho: got -1.0; expected a finite number >= 0"
    )
    assert "Traceback" not in result.stderr


def test_version(capsys):
    import aace

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"aace {aace.__version__}"


def test_ctrl_c_in_train_says_how_to_resume(tiny_npz, tmp_path, monkeypatch, capsys):
    from aace.training import trainer

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    argv = ["train", "--dataset", f"npz:{tiny_npz}", "--out", str(out), *FAST, "--epochs", "2"]
    monkeypatch.setattr(trainer.Trainer, "_train_epoch", interrupt)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err == (
        "aace: interrupted before the first checkpoint; run the same command with --resume to "
        "start over"
    )
    monkeypatch.undo()
    assert main([*argv, "--resume", "--epochs", "1"]) == 2  # another run: refused, one line
    assert main([*argv, "--resume"]) == 0
