"""--model timm:NAME: timm's ResNet and ViT test models at 32 px, pretrained weights from the
local cache only, one-line errors, and the CLI (train, resume, eval) under torchrun DDP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

from aace.cli import main
from aace.integrations import MissingExtraError
from aace.models import create_model
from aace.training.checkpoint import load_checkpoint
from conftest import Killed


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_resnet_takes_classes_and_channels_from_the_dataset(no_network):
    model = create_model("timm:test_resnet", num_classes=7, in_channels=1, image_size=(32, 32))
    assert model.conv1[0].in_channels == 1 and model.fc.out_features == 7
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name, width", [("test_vit", 64), ("vit_tiny_patch16_224", 192)])
def test_vit_is_built_for_the_dataset_image_size(name, width, no_network):
    model = create_model(f"timm:{name}", num_classes=10, in_channels=3, image_size=(32, 32))
    # 32 px in 16 px patches: a 2 x 2 grid, plus the class token.
    assert tuple(model.patch_embed.grid_size) == (2, 2)
    assert model.pos_embed.shape == (1, 1 + 4, width)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_dropout_is_timms_drop_rate():
    assert create_model("timm:test_resnet", 4, dropout=0.25).drop_rate == 0.25


def test_unknown_name_is_one_line_with_how_to_find_names(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown timm model 'timm:test_vitt'; did you mean "
                       r"timm:test_vit.*timm.list_models\('\*vit\*'\)"):  # fmt: skip
        create_model("timm:test_vitt", 4)
    assert main(["train", "--model", "timm:resnet_nope", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aace: error: unknown timm model 'timm:resnet_nope'")
    assert len(err.strip().splitlines()) == 1


def test_missing_timm_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'aace\[timm\]'"):
        create_model("timm:test_resnet", 4)
    assert main(["train", "--model", "timm:test_resnet", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == (
        "aace: error: --model timm:NAME needs the package 'timm', which is not installed; "
        "install it with: pip install 'aace[timm]'\n"
    )


def _fake_hub_cache(root, repo_id: str, state_dict) -> None:
    """The Hugging Face hub cache layout: refs/main names a snapshot holding the weights."""
    from safetensors.torch import save_file

    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file(state_dict, repo / "snapshots" / "0123abcd" / "model.safetensors")


def test_pretrained_weights_come_from_the_cache_and_are_adapted(tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants

    torch.manual_seed(5)
    source = timm.create_model("test_resnet")  # 1000 classes, 3 channels
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    _fake_hub_cache(tmp_path, "timm/test_resnet.r160_in1k", state)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    model = create_model("timm:test_resnet", num_classes=4, in_channels=1, pretrained=True)
    loaded = model.state_dict()
    assert torch.equal(loaded["layer3.0.conv1.weight"], state["layer3.0.conv1.weight"])
    # timm adapts the first convolution to one channel by summing over the three...
    torch.testing.assert_close(loaded["conv1.0.weight"], state["conv1.0.weight"].sum(1, True))
    # ...and leaves the classifier of 4 classes freshly initialized.
    assert loaded["fc.weight"].shape == (4, state["fc.weight"].shape[1])
    fresh = create_model("timm:test_resnet", num_classes=4, in_channels=1)
    assert not torch.equal(
        fresh.state_dict()["layer3.0.conv1.weight"], state["layer3.0.conv1.weight"]
    )


def test_pretrained_not_cached_is_an_error_not_a_download(tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = (
        r"--pretrained: no cached weights for timm:test_vit \(from Hugging Face hub "
        r"'timm/test_vit.r160_in1k'\); aace never downloads"
    )
    with pytest.raises(ValueError, match=expected):
        create_model("timm:test_vit", 4, pretrained=True)
    with pytest.raises(ValueError, match="only supported by timm:NAME models"):
        create_model("wrn10_1", 4, pretrained=True)


@pytest.fixture(scope="module")
def npz32(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny32.npz"
    y_train, y_test = rng.integers(0, 3, 24), rng.integers(0, 3, 9)

    def images(y):
        return (y[:, None, None, None] * 80 + rng.integers(0, 40, (len(y), 32, 32, 3))).astype(
            np.uint8
        )

    np.savez(path, x_train=images(y_train), y_train=y_train, x_test=images(y_test), y_test=y_test)
    return path


def test_torchrun_ddp_train_and_eval(npz32, tmp_path, capsys):
    """2 CPU processes: a timm ViT with SAM+AACE around AdamW; one process evaluates the
    checkpoint and finds the run's test accuracy."""
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
        "-m", "aace", "train", "--dataset", f"npz:{npz32}", "--model", "timm:test_vit",
        "--batch-size", "8", "--lr", "1e-3", "--base-optimizer", "adamw", "--weight-decay",
        "0.05", "--epochs", "1", "--out", str(out), "--tensorboard", "--log-every", "1",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    parameters = sum(
        p.numel() for p in create_model("timm:test_vit", 3, image_size=32).parameters()
    )
    assert f"timm:test_vit ({parameters:,} parameters)" in run.stdout
    assert "2 processes" in run.stdout
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert "module." not in next(iter(checkpoint["model"]))
    assert checkpoint["optimizer"]["state"][0]["exp_avg"].abs().sum() > 0
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    # Rank 0 alone writes TensorBoard events: one file per writer, 24 / 8 = 3 steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run, tag, steps in (("epochs", "test_acc", [1]), ("steps", "step/train_loss", [1, 2, 3])):
        assert len(list((out / "tensorboard" / run).iterdir())) == 1
        events = EventAccumulator(str(out / "tensorboard" / run))
        events.Reload()
        assert [e.step for e in events.Scalars(tag)] == steps
    assert main(["eval", str(out / "checkpoint.pt")]) == 0
    line = capsys.readouterr().out
    assert f"9 images, epoch 1: accuracy {row['test_acc']:.4f}, loss {row['test_loss']:.4f}" in line


def test_interrupted_run_resumes_to_the_uninterrupted_result(npz32, tmp_path, interrupt_after):
    """A timm ResNet (BatchNorm, SGD momentum): killed after epoch 1, resumed, equal to the
    uninterrupted run bit for bit."""
    from aace.training.config import RunConfig
    from aace.training.trainer import Trainer

    def config(out):
        return RunConfig(dataset=f"npz:{npz32}", model="timm:test_resnet", epochs=2,
                         batch_size=12, lr=0.05, optimizer="sam-aace", out=str(out))  # fmt: skip

    Trainer(config(tmp_path / "reference"), log=lambda _: None).fit()
    interrupt_after(1)
    with pytest.raises(Killed):
        Trainer(config(tmp_path / "run"), log=lambda _: None).fit()
    interrupt_after(None)
    Trainer(config(tmp_path / "run"), log=lambda _: None).fit(resume=True)
    final = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    expected = load_checkpoint(tmp_path / "reference" / "checkpoint.pt")
    assert final["epoch"] == 2
    for key, tensor in expected["model"].items():
        assert torch.equal(final["model"][key], tensor), key
    for index, state in expected["optimizer"]["state"].items():
        assert torch.equal(final["optimizer"]["state"][index]["momentum_buffer"],
                           state["momentum_buffer"])  # fmt: skip
