"""The checkpoint format: save and restore side by side, atomic, weights_only, validated."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aace.data import BatchLoader
from aace.training.build import build_optimizer, build_scheduler
from aace.training.checkpoint import (
    FORMAT,
    CheckpointError,
    Position,
    load_checkpoint,
    rank_state,
    restore_training_state,
    save_checkpoint,
    save_training_state,
)
from aace.training.config import RunConfig

_IMAGES = torch.Generator().manual_seed(0)  # (N, C, H, W) images, the same for every loader


class _Dataset:
    num_classes, in_channels = 3, 1


def _objects(config: RunConfig, seed: int):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    _IMAGES.manual_seed(0)
    images = torch.randint(0, 256, (12, 1, 2, 2), dtype=torch.uint8, generator=_IMAGES)
    loader = BatchLoader(images, torch.arange(12) % 3, batch_size=4, mean=[0.5], std=[0.25],
                         train=True, seed=config.seed)  # fmt: skip
    return model, optimizer, scheduler, loader


def _train_a_step(model, optimizer):
    loss = model(torch.ones(2, 4)).square().mean()
    loss.backward()
    if hasattr(optimizer, "first_step"):
        optimizer.first_step(zero_grad=True)
        model(torch.ones(2, 4)).square().mean().backward()
        optimizer.second_step(zero_grad=True)
    else:
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("optimizer", ["sgd", "sam-aace"])
def test_restore_gives_back_what_was_saved(tmp_path, optimizer):
    config = RunConfig(optimizer=optimizer, epochs=10, seed=3)
    model, opt, scheduler, loader = _objects(config, seed=0)
    _train_a_step(model, opt)
    scheduler.step()
    loader.set_epoch(1)
    iterator = iter(loader)
    next(iterator)  # one batch into the epoch
    state = opt.state_dict()
    rows = [{"epoch": 1, "test_acc": 0.5}]
    position = Position(epoch=1, step=1, rows=rows, seconds=2.5)
    sums = {"samples": 4}
    save_training_state(
        tmp_path / "checkpoint.pt", config=config, position=position, model=model,
        optimizer_state=state, scheduler=scheduler, dataset=_Dataset(),
        rank_states=[rank_state(torch.device("cpu"), loader, sums, state)], distributed=False,
    )  # fmt: skip
    expected_rng = torch.get_rng_state()
    torch.manual_seed(99)  # restoring must bring the saved stream back

    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["format"] == FORMAT and checkpoint["config"] == config.to_dict()
    assert (checkpoint["num_classes"], checkpoint["in_channels"]) == (3, 1)
    fresh_model, fresh_opt, fresh_scheduler, fresh_loader = _objects(config, seed=1)
    restored = restore_training_state(
        checkpoint, tmp_path / "checkpoint.pt", seed=config.seed, model=fresh_model,
        optimizer=fresh_opt, scheduler=fresh_scheduler, train_loader=fresh_loader, rank=0,
        world_size=1, device=torch.device("cpu"),
    )  # fmt: skip
    assert (restored.epoch, restored.step, restored.rows, restored.seconds) == (1, 1, rows, 2.5)
    assert restored.sums == sums
    assert restored.describe() == "after epoch 1 and step 1 of epoch 2"
    assert torch.equal(torch.get_rng_state(), expected_rng)
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    # The loader continues with the batch after the one drawn before the save.
    assert torch.equal(next(iter(fresh_loader))[0], next(iterator)[0])


def test_a_foreign_or_broken_file_is_named(tmp_path):
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="was not written by aace"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="broken.pt' is truncated, corrupted"):
        load_checkpoint(tmp_path / "broken.pt")
    save_checkpoint(tmp_path / "partial.pt", {"config": {}, "epoch": 1})
    with pytest.raises(CheckpointError, match="lacks the entry 'model'"):
        load_checkpoint(tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")


def test_restore_into_another_model_names_the_file(tmp_path):
    config = RunConfig(optimizer="sgd")
    model, opt, scheduler, loader = _objects(config, seed=0)
    position = Position(epoch=1)
    save_training_state(
        tmp_path / "c.pt", config=config, position=position, model=model,
        optimizer_state=opt.state_dict(), scheduler=scheduler, dataset=_Dataset(),
        rank_states=[rank_state(torch.device("cpu"))], distributed=False,
    )  # fmt: skip
    other = nn.Linear(4, 5)
    other_opt = build_optimizer(other, config)
    with pytest.raises(CheckpointError, match=r"c.pt' does not fit this model/optimizer"):
        restore_training_state(
            load_checkpoint(tmp_path / "c.pt"), tmp_path / "c.pt", seed=0, model=other,
            optimizer=other_opt, scheduler=build_scheduler(other_opt, config),
            train_loader=loader, rank=0, world_size=1, device=torch.device("cpu"),
        )  # fmt: skip
    assert Position(epoch=2).kept() == "checkpoint of epoch 2 kept"
