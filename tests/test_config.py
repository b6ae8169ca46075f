"""RunConfig: the optimizer table, config files and their precedence, the generated parser."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from aace.cli import add_run_arguments, build_parser, config_from_args, main
from aace.sam import SAM
from aace.training.build import build_optimizer
from aace.training.config import (
    OPTIMIZER_TABLE,
    OPTIMIZERS,
    PRESETS,
    RESUMABLE_CHANGES,
    ConfigError,
    RunConfig,
    read_config_file,
)
from conftest import read_rows, without_timing


def test_the_optimizer_table_is_what_the_papers_use():
    # Default radii: SAM 0.05 (Foret et al.), AACE 0.2 (the AACE paper), ASAM 0.5 (Kwon et al.),
    # BiSAM 0.05 (Xie et al.); sgd has no perturbation.
    assert {n: i.default_rho for n, i in OPTIMIZER_TABLE.items()} == {
        "sgd": None, "sam": 0.05, "sam-aace": 0.2, "sam-aace-normalized": 0.05, "asam": 0.5,
        "sam-bisam": 0.05,
    }  # fmt: skip
    assert [n for n, i in OPTIMIZER_TABLE.items() if not i.second_pass] == ["sgd"]
    assert [n for n, i in OPTIMIZER_TABLE.items() if i.adaptive] == ["asam"]
    assert OPTIMIZERS == tuple(OPTIMIZER_TABLE)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_built_optimizer_follows_the_table(name):
    import torch

    info = OPTIMIZER_TABLE[name]
    optimizer = build_optimizer(torch.nn.Linear(2, 2), RunConfig(optimizer=name))
    if not info.second_pass:
        assert isinstance(optimizer, torch.optim.SGD)
        assert RunConfig(optimizer=name).perturbation_rho is None
        return
    assert isinstance(optimizer, SAM)
    group = optimizer.param_groups[0]
    assert (group["rho"], group["perturbation"], group["adaptive"]) == (
        info.default_rho, info.rule, info.adaptive
    )  # fmt: skip


def test_every_field_has_a_flag_with_its_help_and_default():
    train = argparse.ArgumentParser()
    add_run_arguments(train)
    actions = {a.dest: a for a in train._actions}
    for field in dataclasses.fields(RunConfig):
        action = actions[field.name]
        assert action.default is None  # a preset and a file fill what is not given
        assert field.metadata["help"] in action.help and "(default " in action.help
        if field.type in ("bool", bool):
            assert isinstance(action, argparse.BooleanOptionalAction)
        if field.metadata["choices"]:
            assert tuple(action.choices) == field.metadata["choices"]
    assert "(default 200)" in actions["epochs"].help
    assert "0.2 sam-aace" in actions["rho"].help and "0.5 asam" in actions["rho"].help
    assert set(RESUMABLE_CHANGES) == {
        "out", "device", "data_dir", "download", "compile", "nonfinite", "accumulate",
        "checkpoint_every", "tensorboard", "log_every",
    }  # fmt: skip


def _config(argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_precedence_defaults_preset_file_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("epochs = 3\nbatch-size = 32\nlr = 0.01\n")
    preset = PRESETS["digits-demo"]
    config = _config(["--preset", "digits-demo", "--config", str(path), "--lr", "0.02"])
    assert config.epochs == 3 and config.batch_size == 32  # the file over the preset
    assert config.lr == 0.02  # the flag over the file
    assert config.schedule == preset["schedule"]  # the preset where the file is silent
    assert config.momentum == RunConfig().momentum  # the default where all are silent
    assert config.preset == "digits-demo"


def test_a_run_config_json_is_a_config_file(tmp_path):
    saved = RunConfig(dataset="digits", epochs=4, lr=0.03, betas=(0.8, 0.9), out="x")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"config": saved.to_dict(), "aace_version": "0"}))
    assert RunConfig(**read_config_file(path)) == saved  # betas back as a tuple


@pytest.mark.parametrize(
    "text, suffix, message",
    [
        ('{"epochs": 3, "learning_rate": 0.1}', ".json", "unknown field(s) learning_rate"),
        ("{epochs: 3", ".json", "is not valid JSON"),
        ("epochs = ", ".toml", "is not valid TOML"),
        ("[1, 2]", ".json", "holds a list; expected an object of fields"),
    ],
)
def test_bad_config_files_are_one_line(tmp_path, capsys, text, suffix, message):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match="--config"):
        read_config_file(path)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and len(err.strip().splitlines()) == 1


def test_a_null_in_a_config_file_is_named_as_written(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text('{"epochs": null}')
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "--epochs: got null; expected an integer >= 1" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.json")]) == 2
    assert "--config: cannot read" in capsys.readouterr().err


def test_bare_train_asks_what_to_train(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "no run given" in err and "--preset digits-demo" in err
    assert len(err.strip().splitlines()) == 1


def test_rerun_from_its_own_config_json_reproduces_the_metrics(npz_path, tmp_path, capsys):
    first = tmp_path / "first"
    argv = ["--dataset", f"npz:{npz_path}", "--model", "wrn10_1", "--epochs", "2"]
    argv += ["--batch-size", "16", "--lr", "0.05", "--seed", "4", "--dropout", "0.2"]
    argv += ["--aace-mode", "rand", "--device", "cpu"]
    assert main(["train", *argv, "--out", str(first)]) == 0
    again = tmp_path / "again"
    config = str(first / "config.json")
    assert main(["train", "--config", config, "--out", str(again)]) == 0
    assert without_timing(read_rows(again)) == without_timing(read_rows(first))
    saved = json.loads((again / "config.json").read_text())["config"]
    assert saved == dict(json.loads((first / "config.json").read_text())["config"], out=str(again))
    # Without --out it names the same directory, which already holds the run.
    assert main(["train", "--config", config]) == 2
    assert "already holds a run" in capsys.readouterr().err
