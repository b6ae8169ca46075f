"""aace.runs: the run directory's files, read and written through one type."""

from __future__ import annotations

import json
import math

import pytest

from aace.report import compare_table, read_run, run_label
from aace.runs import (
    LEGACY_DEFAULT_RHO,
    RunDirectory,
    RunError,
    config_differences,
    find_runs,
    resolved_rho,
    selected_row,
)


def write_run(path, optimizer="sam", rho=None, accuracies=(0.5, 0.6), record_rho=True, **extra):
    run = RunDirectory(path)
    run.prepare(resume=False)
    config = {"dataset": "digits", "model": "wrn10_1", "epochs": len(accuracies),
              "optimizer": optimizer, "rho": rho, **extra}  # fmt: skip
    if record_rho:
        run.write_record(config, rho if rho is not None else LEGACY_DEFAULT_RHO[optimizer])
    else:  # as aace 0.1.0 wrote it
        (path / "config.json").write_text(json.dumps({"config": config}))
    for epoch, acc in enumerate(accuracies, start=1):
        run.append_row({"epoch": epoch, "test_acc": acc, "train_loss": math.nan})
    return run


def test_rows_and_record_round_trip(tmp_path):
    run = write_run(tmp_path / "r", accuracies=(0.25, 0.5))
    assert run.read_rows() == [
        {"epoch": 1, "test_acc": 0.25, "train_loss": None},  # NaN is stored as null
        {"epoch": 2, "test_acc": 0.5, "train_loss": None},
    ]
    assert run.read_config()["optimizer"] == "sam" and run.resolved_rho() == 0.05
    assert not run.finished and not run.has_checkpoint and run.holds_run
    run.write_summary({"final_test_acc": 0.5})
    assert run.finished and run.read_summary() == {"final_test_acc": 0.5}
    run.write_rows([{"epoch": 1}])
    assert run.read_rows() == [{"epoch": 1}]
    assert RunDirectory(tmp_path / "none").read_rows(missing_ok=True) == []


def test_prepare_refuses_a_run_and_a_file(tmp_path):
    write_run(tmp_path / "r")
    with pytest.raises(RunError, match="already holds a run; pass --resume"):
        RunDirectory(tmp_path / "r").prepare(resume=False)
    RunDirectory(tmp_path / "r").prepare(resume=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(RunError, match="exists and is not a directory"):
        RunDirectory(tmp_path / "file").prepare(resume=False)


def test_same_run_comparison(tmp_path):
    run = write_run(tmp_path / "r", lr=0.05, betas=[0.9, 0.999], device="cpu")
    saved = run.read_config()
    # A tuple equals the list JSON stores it as; ignored fields may differ.
    current = dict(saved, betas=(0.9, 0.999), device="cuda")
    assert config_differences(saved, current, ignore=("device",)) == []
    run.check_same_run(current, ignore=("device",))
    with pytest.raises(RunError, match=r"different run \(lr: 0.05 there, 0.2 now\)"):
        run.check_same_run(dict(current, lr=0.2), ignore=("device",))
    assert config_differences({"a": 1}, {"a": 1, "b": 2}) == ["b"]


def test_resolved_rho_of_old_and_new_records():
    assert resolved_rho({"config": {"optimizer": "asam", "rho": None}}) == 0.5  # 0.1.0: default
    assert resolved_rho({"config": {"optimizer": "sam", "rho": 0.1}}) == 0.1
    assert resolved_rho({"config": {"optimizer": "sgd", "rho": None}}) is None
    assert resolved_rho({"config": {"optimizer": "sam", "rho": None}, "resolved_rho": 0.3}) == 0.3


def test_labels_of_old_and_new_run_directories_agree(tmp_path):
    old = read_run(write_run(tmp_path / "old", optimizer="sam-aace", record_rho=False).path)
    new = read_run(write_run(tmp_path / "new", optimizer="sam-aace").path)
    assert old.label == new.label == "sam-aace rho=0.2"
    assert run_label({"optimizer": "sgd", "rho": None}) == "sgd"
    assert run_label({"optimizer": "sam", "rho": None, "sam_every": 5}, 0.1) == (
        "sam rho=0.1 every=5"
    )


def test_selected_row_is_the_first_best_validation_epoch():
    rows = [
        {"epoch": 1, "val_acc": 0.5},
        {"epoch": 2, "val_acc": 0.7},
        {"epoch": 3, "val_acc": 0.7},
    ]
    assert selected_row(rows)["epoch"] == 2
    assert selected_row([{"epoch": 1}]) is None


def test_find_runs_below_a_folder(tmp_path):
    for name in ("b-s0", "a-s1", "nested/c-s0"):
        write_run(tmp_path / "sweep" / name)
    (tmp_path / "sweep" / "empty").mkdir()
    found = [
        run.path.relative_to(tmp_path / "sweep").as_posix() for run in find_runs(tmp_path / "sweep")
    ]
    assert found == ["a-s1", "b-s0", "nested/c-s0"]
    assert find_runs(tmp_path / "sweep" / "a-s1")[0].path == tmp_path / "sweep" / "a-s1"
    with pytest.raises(RunError, match="not an aace run directory"):
        find_runs(tmp_path / "sweep" / "empty")


def test_compare_a_folder_and_one_run_without_a_spread(tmp_path):
    write_run(tmp_path / "sweep" / "sam-s0", accuracies=(0.5, 0.6))
    write_run(tmp_path / "sweep" / "sam-s1", accuracies=(0.5, 0.8))
    write_run(tmp_path / "sweep" / "sgd-s0", optimizer="sgd", accuracies=(0.5, 0.7))
    table = compare_table([tmp_path / "sweep"])
    sam = next(line for line in table.splitlines() if "| sam rho=0.05 |" in line)
    # mean 70 %, sample sd of (60, 80) = 14.14 %
    assert "| 70.00 ± 14.14 |" in sam and "| 2 |" in sam
    sgd = next(line for line in table.splitlines() if "| sgd |" in line)
    assert "| 70.00 |" in sgd and "±" not in sgd.split("|")[3]  # one run: no spread to show
