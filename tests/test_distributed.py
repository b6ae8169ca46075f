"""DDP (2 CPU processes, gloo), gradient accumulation and float16 with GradScaler.

The multi-process tests spawn two workers that write what they computed to files; the test
process checks it against a computation without DDP (one process with the whole batch, or the
m-sharpness update written out by hand).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from aace import SAM, aace_loss, frozen_batchnorm_stats
from aace.amp import unscale_
from aace.cli import main
from aace.training.build import build_optimizer
from aace.training.checkpoint import load_checkpoint
from aace.training.config import ConfigError, RunConfig
from aace.training.distributed import Distributed, wrap_model
from aace.training.metrics import TIMING_FIELDS
from aace.training.step import TrainStep
from aace.training.trainer import Trainer

WORLD = 2
B = 4  # per-rank batch
STEPS = 3
SPAWN_TIMEOUT = 120


# -- spawning ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, store: str, worker, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        worker(rank, *args)
    finally:
        if dist.is_initialized():  # a worker may have destroyed it itself
            dist.destroy_process_group()


def spawn(worker, *args) -> None:
    """Run ``worker(rank, *args)`` in 2 processes with a gloo process group.

    The group meets through a file in a fresh folder (``file://`` rendezvous), not a TCP port:
    a port picked free here could be taken by another test's process before rank 0 binds it.
    """
    with tempfile.TemporaryDirectory(prefix="aace-rendezvous-") as folder:
        store = os.path.join(folder, "store")
        context = mp.spawn(_entry, args=(store, worker, args), nprocs=WORLD, join=False)
        deadline = time.monotonic() + SPAWN_TIMEOUT
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"workers still running after {SPAWN_TIMEOUT} s")


# -- a model without BatchNorm, in float64, and its data ---------------------------------


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(24, 4),
    ).double()  # fmt: skip


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    """STEPS global batches: x (STEPS, WORLD * B, 3, 6, 6), y (STEPS, WORLD * B)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, WORLD * B, 3, 6, 6, dtype=torch.float64, generator=g)
    return x, torch.randint(0, 4, (STEPS, WORLD * B), generator=g)


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * B : (rank + 1) * B]


def step_config(**overrides) -> RunConfig:
    values = dict(optimizer="sam", rho=0.05, lr=0.1, momentum=0.9, weight_decay=5e-4)
    values.update(overrides)
    return RunConfig(**values)


def perturbations(optimizer: SAM) -> list[torch.Tensor]:
    """The last ``first_step``'s e, which ``track_stats`` keeps for the cosine."""
    return [optimizer.state[p]["previous_e"].clone() for p in optimizer.param_groups[0]["params"]]


def _sam_worker(rank: int, out: Path, overrides: dict) -> None:
    config = step_config(**overrides)
    model, ddp = wrap_model(small_model(), Distributed(rank, WORLD), torch.device("cpu"))
    optimizer = build_optimizer(model, config)
    step = TrainStep(ddp, optimizer, config, torch.device("cpu"), ddp=ddp)
    x, y = batches()
    first_e, grad_norms = None, []
    for s in range(STEPS):
        stats = step(shard(x[s], rank), shard(y[s], rank))
        grad_norms.append(stats.grad_norm)
        if first_e is None:
            first_e = perturbations(optimizer)
    result = {"model": model.state_dict(), "e": first_e, "grad_norm": grad_norms}
    if overrides.get("perturbation_sync") != "local":
        torch.save(result, out / f"rank{rank}.pt")
        return
    # The documented library recipe for DDP + SAM (local perturbation), from the same start.
    model_b, ddp_b = wrap_model(small_model(), Distributed(rank, WORLD), torch.device("cpu"))
    opt = SAM(model_b.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
              weight_decay=5e-4)  # fmt: skip
    for s in range(STEPS):
        xs, ys = shard(x[s], rank), shard(y[s], rank)
        with ddp_b.no_sync():  # local perturbation: no all-reduce in the first pass
            F.cross_entropy(ddp_b(xs), ys).backward()
        opt.first_step(zero_grad=True)
        with frozen_batchnorm_stats(ddp_b):
            F.cross_entropy(ddp_b(xs), ys).backward()  # all-reduced by DDP
        opt.second_step(zero_grad=True)
    result["recipe"] = model_b.state_dict()
    torch.save(result, out / f"rank{rank}.pt")


def _spawn_sam(tmp_path: Path, **overrides) -> list[dict]:
    spawn(_sam_worker, tmp_path, overrides)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def assert_same_weights(a: dict, b: dict, exact: bool = False) -> None:
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-12, msg=key)


# -- DDP + SAM -----------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer, accumulate", [("sam", 1), ("sam-aace", 2)])
def test_global_sync_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path, optimizer, accumulate):
    results = _spawn_sam(
        tmp_path, optimizer=optimizer, perturbation_sync="global", accumulate=accumulate
    )
    reference = small_model()
    config = step_config(optimizer=optimizer)
    step = TrainStep(reference, build_optimizer(reference, config), config, torch.device("cpu"))
    x, y = batches()
    for s in range(STEPS):
        step(x[s], y[s])
    assert_same_weights(results[0]["model"], results[1]["model"], exact=True)
    assert_same_weights(results[0]["model"], reference.state_dict())
    for e0, e1 in zip(results[0]["e"], results[1]["e"]):
        assert torch.equal(e0, e1)  # one perturbation, from the global gradient


def test_local_sync_perturbs_per_rank_and_keeps_one_model(tmp_path):
    results = _spawn_sam(tmp_path, perturbation_sync="local")
    assert_same_weights(results[0]["model"], results[1]["model"], exact=True)
    assert_same_weights(results[0]["recipe"], results[0]["model"])
    assert results[0]["grad_norm"][0] != results[1]["grad_norm"][0]

    # m-sharpness by hand: e_r = rho g_r / ||g_r|| from rank r's shard; the update uses the
    # mean over ranks of the gradients at w + e_r.
    model = small_model()
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = batches()
    for s in range(STEPS):
        updates = []
        for rank in range(WORLD):
            xs, ys = shard(x[s], rank), shard(y[s], rank)
            g = torch.autograd.grad(F.cross_entropy(model(xs), ys), params)
            norm = torch.sqrt(sum((gi**2).sum() for gi in g))
            e = [0.05 * gi / (norm + 1e-12) for gi in g]
            if s == 0:
                for mine, theirs in zip(e, results[rank]["e"]):
                    torch.testing.assert_close(theirs, mine, rtol=1e-10, atol=1e-14)
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, ei in zip(params, e):
                    p.add_(ei)
            updates.append(torch.autograd.grad(F.cross_entropy(model(xs), ys), params))
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
        for p, *per_rank in zip(params, *updates):
            p.grad = sum(per_rank) / WORLD
        base.step()
        base.zero_grad()
    assert not torch.allclose(results[0]["e"][0], results[1]["e"][0])
    assert_same_weights(results[0]["model"], model.state_dict())


def _threads() -> list[str]:
    """The names of this process's threads (Linux)."""
    return sorted(
        Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")
    )


def _close_worker(rank: int, out: Path) -> None:
    config = step_config(perturbation_sync="local")
    context = Distributed(rank, WORLD, owns_group=True)
    model, ddp = wrap_model(small_model(), context, torch.device("cpu"))
    step = TrainStep(ddp, build_optimizer(model, config), config, torch.device("cpu"), ddp=ddp)
    x, y = batches()
    step(shard(x[0], rank), shard(y[0], rank))
    running = _threads()
    del model, ddp, step
    context.close()
    (out / f"threads{rank}.json").write_text(json.dumps({"running": running, "closed": _threads()}))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc/self/task")
def test_close_ends_the_groups_threads_after_ddp(tmp_path):
    """Constructing DDP imports modules that bind the default group as a default argument; the
    group must still be freed by close(), or gloo's threads run through interpreter shutdown,
    where the process can abort ("terminate called without an active exception")."""
    spawn(_close_worker, tmp_path)
    for rank in range(WORLD):
        threads = json.loads((tmp_path / f"threads{rank}.json").read_text())
        assert any(name.startswith(("gloo", "pt_gloo")) for name in threads["running"])
        assert not [n for n in threads["closed"] if n.startswith(("gloo", "pt_gloo"))], threads


# -- gradient accumulation -----------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "sam-aace"])
@pytest.mark.parametrize("batch, accumulate", [(8, 4), (10, 3)])
def test_accumulation_equals_one_batch_of_k_times_the_size(optimizer, batch, accumulate):
    x = torch.randn(
        2, batch, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    y = torch.arange(2 * batch).reshape(2, batch) % 4
    finals = []
    for k in (1, accumulate):
        model = small_model()
        config = step_config(optimizer=optimizer, accumulate=k, label_smoothing=0.1)
        step = TrainStep(model, build_optimizer(model, config), config, torch.device("cpu"))
        stats = [step(x[s], y[s]) for s in range(2)]
        finals.append((model.state_dict(), stats[-1]))
    (whole, whole_stats), (accumulated, accumulated_stats) = finals
    assert_same_weights(accumulated, whole)
    torch.testing.assert_close(accumulated_stats.train_loss, whole_stats.train_loss)
    if optimizer != "sgd":
        torch.testing.assert_close(accumulated_stats.grad_norm, whole_stats.grad_norm)


def test_accumulate_must_divide_the_global_batch(capsys, tmp_path):
    argv = ["train", "--batch-size", "10", "--accumulate", "3", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "--batch-size: got 10; expected a multiple of 3 = 1 process(es) x --accumulate 3" in (
        capsys.readouterr().err
    )
    assert main(["train", "--accumulate", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--accumulate: got 0; expected an integer >= 1" in capsys.readouterr().err
    assert RunConfig(batch_size=128, accumulate=2).per_rank_batch_size(4) == 32
    assert main(["train", "--perturbation-sync", "both", "--out", str(tmp_path / "r")]) == 2
    assert "argument --perturbation-sync: invalid choice: 'both'" in capsys.readouterr().err


def test_sync_bn_needs_cuda_under_ddp():
    with pytest.raises(ConfigError, match="--sync-bn: SyncBatchNorm needs CUDA devices, got cpu"):
        wrap_model(bn_model(), Distributed(rank=0, world_size=2), torch.device("cpu"), sync_bn=True)
    model = bn_model()
    assert wrap_model(model, Distributed(), torch.device("cpu"), sync_bn=True) == (model, None)


# -- float16 with GradScaler ---------------------------------------------------------------


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def overflowing(loss_fn):
    """A loss that stays finite but whose scaled value (x 65536) overflows float32."""
    return lambda logits, y: loss_fn(logits, y) * 1e34


@pytest.mark.parametrize("sam_pass", ["perturbation", "update"])
def test_fp16_overflow_skips_the_whole_sam_step(sam_pass):
    config = step_config(optimizer="sam-aace", rho=0.2, amp="fp16")
    model = bn_model()
    optimizer = build_optimizer(model, config)
    step = TrainStep(model, optimizer, config, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, 8, 3, 6, 6, generator=g), torch.randint(0, 4, (3, 8), generator=g)

    # A normal step is the library recipe of aace.amp, step for step.
    recipe_model = bn_model()
    recipe_opt = SAM(recipe_model.parameters(), torch.optim.SGD, rho=0.2, perturbation="aace",
                     lr=0.1, momentum=0.9, weight_decay=5e-4)  # fmt: skip
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = aace_loss(recipe_model(x[0]), y[0])
    scaler.scale(loss).backward()
    assert unscale_(scaler, recipe_opt, loss, sam_pass="perturbation").item() == 0
    recipe_opt.first_step(zero_grad=True)
    with frozen_batchnorm_stats(recipe_model), torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(recipe_model(x[0]), y[0])
    scaler.scale(loss).backward()
    assert unscale_(scaler, recipe_opt, loss, sam_pass="update").item() == 0
    recipe_opt.second_step(zero_grad=True)
    scaler.update()
    assert step(x[0], y[0]).skipped_pass is None
    assert_same_weights(model.state_dict(), recipe_model.state_dict(), exact=True)
    assert step.scaler.get_scale() == scaler.get_scale() == 65536.0

    before = copy.deepcopy(model.state_dict())
    momentum = copy.deepcopy(optimizer.base_optimizer.state_dict())
    if sam_pass == "perturbation":
        step.perturbation_loss = overflowing(step.perturbation_loss)
    else:
        step.update_loss = overflowing(step.update_loss)
    stats = step(x[1], y[1])
    assert stats.skipped_pass == sam_pass
    assert stats.first_pass_finite is None and stats.update_pass_finite is None  # not a stop
    assert_same_weights(model.state_dict(), before, exact=True)  # BatchNorm statistics too
    assert str(optimizer.base_optimizer.state_dict()) == str(momentum)  # SGD's momentum
    assert all(p.grad is None for p in model.parameters())
    assert step.scaler.get_scale() == 32768.0  # backed off once

    vars(step).pop("perturbation_loss", None)  # back to the class's losses
    vars(step).pop("update_loss", None)
    assert step(x[2], y[2]).skipped_pass is None
    assert not torch.equal(model.state_dict()["0.weight"], before["0.weight"])
    assert step.scaler.get_scale() == 32768.0


def _fp16_worker(rank: int, out: Path) -> None:
    config = step_config(optimizer="sam", amp="fp16", perturbation_sync="local")
    model, ddp = wrap_model(bn_model(), Distributed(rank, WORLD), torch.device("cpu"))
    step = TrainStep(ddp, build_optimizer(model, config), config, torch.device("cpu"), ddp=ddp)
    x, y = batches()
    x = x.float()
    initial = copy.deepcopy(model.state_dict())
    if rank == 1:  # overflow in rank 1's own (local) perturbation pass only
        step.perturbation_loss = overflowing(step.perturbation_loss)
    skipped = step(shard(x[0], rank), shard(y[0], rank)).skipped_pass
    after_skip = copy.deepcopy(model.state_dict())
    scale_after_skip = step.scaler.get_scale()
    vars(step).pop("perturbation_loss", None)
    taken = step(shard(x[1], rank), shard(y[1], rank)).skipped_pass
    torch.save(
        {"initial": initial, "after_skip": after_skip, "final": dict(model.named_parameters()),
         "skipped": skipped, "taken": taken, "scale": scale_after_skip},
        out / f"rank{rank}.pt",
    )  # fmt: skip


def test_fp16_overflow_on_one_rank_is_skipped_by_all(tmp_path):
    spawn(_fp16_worker, tmp_path)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for result in results:
        assert result["skipped"] == "perturbation" and result["taken"] is None
        assert result["scale"] == 32768.0
        assert_same_weights(result["after_skip"], result["initial"], exact=True)
    # One model after the step taken (BatchNorm running statistics are per rank between two
    # synchronized forward passes, as in any DDP run; parameters are compared).
    assert_same_weights(results[0]["final"], results[1]["final"], exact=True)
    assert not torch.equal(results[0]["final"]["0.weight"], results[0]["initial"]["0.weight"])


# -- aace train under DDP ------------------------------------------------------------------


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    y_train, y_test = rng.integers(0, 4, 48), rng.integers(0, 4, 15)

    def images(y):
        return (y[:, None, None, None] * 60 + rng.integers(0, 40, (len(y), 8, 8, 3))).astype(
            np.uint8
        )

    np.savez(path, x_train=images(y_train), y_train=y_train, x_test=images(y_test), y_test=y_test)
    return path


def tiny_config(npz_path, out, **overrides) -> RunConfig:
    values = dict(
        dataset=f"npz:{npz_path}", model="wrn10_1", epochs=3, batch_size=16, lr=0.05,
        out=str(out), seed=1, device="cpu",
    )  # fmt: skip
    values.update(overrides)
    return RunConfig(**values)


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class _Killed(Exception):
    pass


def _resume_worker(rank: int, npz_path: Path, tmp: Path) -> None:
    overrides = dict(dropout=0.3, aace_mode="rand")  # random streams that must be restored
    Trainer(tiny_config(npz_path, tmp / "reference", **overrides), log=lambda _: None).fit()
    real = Trainer._train_epoch

    def dies_in_epoch_3(self, run, epoch, *args, **kwargs):
        if epoch == 2:
            raise _Killed
        return real(self, run, epoch, *args, **kwargs)

    Trainer._train_epoch = dies_in_epoch_3
    try:
        Trainer(tiny_config(npz_path, tmp / "run", **overrides), log=lambda _: None).fit()
    except _Killed:
        pass
    finally:
        Trainer._train_epoch = real
    messages = []
    Trainer(tiny_config(npz_path, tmp / "run", **overrides), log=messages.append).fit(resume=True)
    (tmp / f"log{rank}.json").write_text(json.dumps(messages))


def test_interrupted_ddp_run_resumes_to_the_uninterrupted_result(npz_path, tmp_path):
    spawn(_resume_worker, npz_path, tmp_path)
    assert any("resumed" in m and "after epoch 2" in m for m in json.loads(
        (tmp_path / "log0.json").read_text()))  # fmt: skip
    assert json.loads((tmp_path / "log1.json").read_text()) == []  # rank 1 logs nothing
    rows, reference = read_rows(tmp_path / "run"), read_rows(tmp_path / "reference")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert without_timing(rows) == without_timing(reference)
    final = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    expected = load_checkpoint(tmp_path / "reference" / "checkpoint.pt")
    assert final["world_size"] == 2 and len(final["rng"]["ranks"]) == 2
    assert_same_weights(final["model"], expected["model"], exact=True)


def _nonfinite_worker(rank: int, npz_path: Path, tmp: Path) -> None:
    from aace.data import BatchLoader
    from aace.training.step import NonFiniteError

    real_iter = BatchLoader.__iter__

    def poisoned(self):  # NaN images in rank 1's 2nd step of epoch 1 only
        for i, (x, y) in enumerate(real_iter(self), start=1):
            if self.train and self.rank == 1 and (self.epoch, i) == (0, 2):
                x = torch.full_like(x, float("nan"))
            yield x, y

    BatchLoader.__iter__ = poisoned
    result = {}
    try:
        Trainer(tiny_config(npz_path, tmp / "stop", epochs=1), log=lambda _: None).fit()
    except NonFiniteError as error:
        result["stop"] = str(error)
    config = tiny_config(npz_path, tmp / "skip", epochs=1, nonfinite="skip")
    Trainer(config, log=lambda _: None).fit()
    (tmp / f"nonfinite{rank}.json").write_text(json.dumps(result))


def test_nonfinite_steps_are_agreed_on_by_all_ranks(npz_path, tmp_path):
    spawn(_nonfinite_worker, npz_path, tmp_path)
    expected = "non-finite perturbation-pass loss or gradient at step 2 of epoch 1; stopped"
    for rank in range(WORLD):  # rank 0's data was fine: it stops all the same
        assert expected in json.loads((tmp_path / f"nonfinite{rank}.json").read_text())["stop"]
    (row,) = read_rows(tmp_path / "skip")
    assert row["skipped_steps"] == 1 and math.isfinite(row["train_loss"])
    model = load_checkpoint(tmp_path / "skip" / "checkpoint.pt")["model"]
    assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())


def test_torchrun_two_processes_end_to_end(npz_path, tmp_path, capsys):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
        "-m", "aace", "train", "--dataset", f"npz:{npz_path}", "--model", "wrn10_1",
        "--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--seed", "1", "--out", str(out),
        "--perturbation-sync", "global",
    ]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, timeout=SPAWN_TIMEOUT)
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    # Rank 0 alone logs and writes.
    assert first.stdout.count("final test accuracy") == 1
    assert first.stdout.count("epoch   1 ") == 1 and "2 processes" in first.stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == ["checkpoint.pt", "config.json", "metrics.jsonl", "summary.json"]
    rows = read_rows(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint["epoch"] == 2 and "module." not in next(iter(checkpoint["model"]))
    # The test metrics are over all 15 test images (8 on rank 0, 7 on rank 1), with rank 0's
    # BatchNorm statistics: one process evaluating the checkpoint finds the same.
    assert main(["eval", str(out / "checkpoint.pt")]) == 0
    line = capsys.readouterr().out
    assert "15 images" in line
    assert f"accuracy {rows[-1]['test_acc']:.4f}, loss {rows[-1]['test_loss']:.4f}" in line

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True,
                             timeout=SPAWN_TIMEOUT)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("resumed from") == 1 and "after epoch 2" in resumed.stdout
    assert without_timing(read_rows(out)) == without_timing(rows)

    changed = subprocess.run([*command, "--resume", "--perturbation-sync", "local"],
                             capture_output=True, text=True, timeout=SPAWN_TIMEOUT)  # fmt: skip
    assert changed.returncode != 0
    assert "perturbation_sync: 'global' there, 'local' now" in changed.stderr
    assert "/aace/" not in changed.stderr  # a one-line error (torchrun adds its own report)


def test_fp16_checkpoint_holds_the_scaler_state(npz_path, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_config(npz_path, out, epochs=1, amp="fp16"), log=lambda _: None).fit()
    scaler = load_checkpoint(out / "checkpoint.pt")["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] == 3  # 3 steps, none skipped


# -- torchrun: worker deaths, preemption, two nodes, errors ----------------------------------

FAULTS = str(Path(__file__).with_name("faults.py"))


def torchrun_command(npz_path, out, *launcher, extra=()) -> list[str]:
    launcher = launcher or ("--standalone", "--nproc-per-node", "2")
    return [
        sys.executable, "-m", "torch.distributed.run", *launcher, FAULTS, "train",
        "--dataset", f"npz:{npz_path}", "--model", "wrn10_1", "--epochs", "3",
        "--batch-size", "16", "--lr", "0.05", "--seed", "1", "--dropout", "0.3",
        "--aace-mode", "rand", "--out", str(out), "--resume", *extra,
    ]  # fmt: skip


def run_torchrun(command, faults="", **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "AACE_FAULTS": faults, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True,
                          timeout=SPAWN_TIMEOUT * 2, **kwargs)  # fmt: skip


def worker_statuses(stderr: str) -> list[int]:
    """The exit codes of the workers as torchrun's failure report lists them."""
    return sorted(int(m) for m in re.findall(r"^\s*exitcode\s*: (-?\d+) \(pid", stderr, re.M))


def assert_same_run(out: Path, reference: Path) -> None:
    assert without_timing(read_rows(out)) == without_timing(read_rows(reference))
    final, expected = (load_checkpoint(p / "checkpoint.pt") for p in (out, reference))
    assert_same_weights(final["model"], expected["model"], exact=True)
    for a, b in zip(final["optimizer"]["state"].values(), expected["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


@pytest.fixture(scope="module")
def torchrun_reference(npz_path, tmp_path_factory) -> Path:
    """An uninterrupted 2-process torchrun run, checkpoints at epoch ends only."""
    out = tmp_path_factory.mktemp("torchrun") / "reference"
    result = run_torchrun(torchrun_command(npz_path, out))
    assert result.returncode == 0, result.stderr
    return out


def test_torchrun_max_restarts_rides_through_worker_deaths(npz_path, tmp_path, torchrun_reference):
    # One death per launch of the group (3 steps per epoch; checkpoints after global steps 2,
    # 4, 8 and every epoch): rank 1 at start-up; rank 0 in its 4th step (epoch 2 step 1);
    # rank 1 in the evaluation of epoch 2 (resumed from epoch 2 step 1); rank 0 while writing
    # the last checkpoint (resumed from epoch 3 step 2). The fifth launch finishes the run.
    faults = "startup@1,step:4@0,evaluate:1@1,save:3@0"
    out = tmp_path / "run"
    launcher = ("--standalone", "--nproc-per-node", "2", "--max-restarts", "4")
    command = torchrun_command(npz_path, out, *launcher, extra=("--checkpoint-every", "2"))
    result = run_torchrun(command, faults)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("resumed from") == 3  # the start-up death left no checkpoint
    assert_same_run(out, torchrun_reference)


def test_two_nodes_preempted_by_sigterm_then_resumed(npz_path, tmp_path, torchrun_reference):
    """Two torchrun launchers on 127.0.0.1 (c10d rendezvous), one process each: the documented
    multi-node command. Rank 1 gets SIGTERM in step 2 (as from a scheduler): both ranks stop
    at the same step boundary, rank 0 checkpoints, both exit 75 with one line; the same
    commands with --resume finish the run, equal to the uninterrupted one."""
    out = tmp_path / "run"
    port = _free_port()

    def launchers() -> list[subprocess.Popen]:
        nodes = ("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes")  # fmt: skip
        env = {**os.environ, "AACE_FAULTS": faults, "OMP_NUM_THREADS": "1"}
        return [
            subprocess.Popen(torchrun_command(npz_path, out, *nodes), env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
            for _ in range(2)
        ]  # fmt: skip

    def finish(processes: list[subprocess.Popen]) -> list[tuple[str, str]]:
        try:
            return [p.communicate(timeout=SPAWN_TIMEOUT * 2) for p in processes]
        finally:  # a hung launch must not outlive the test with its workers
            for process in processes:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)

    faults = "sigterm:2@1"
    first = finish(launchers())
    stderr = "".join(err for _, err in first)
    assert worker_statuses(stderr) == [75, 75], stderr
    # Where the ranks stopped (they learn of a stop one step boundary late) is in the message
    # and in the checkpoint.
    (stopped,) = [line for line in stderr.splitlines() if line.startswith("aace:")]
    match = re.fullmatch(
        r"aace: stopped by SIGTERM (at step (\d+) of epoch (\d+)|after epoch (\d+)); checkpoint "
        rf"written to '{re.escape(str(out / 'checkpoint.pt'))}'\. Run the same command with "
        r"--resume to continue",
        stopped,
    )
    assert match, stopped
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    if match[2]:
        assert (checkpoint["epoch"], checkpoint["step_in_epoch"]) == (
            int(match[3]) - 1,
            int(match[2]),
        )
    else:
        assert (checkpoint["epoch"], checkpoint["step_in_epoch"]) == (int(match[4]), 0)
    assert checkpoint["epoch"] < 3

    faults = ""
    second = launchers()
    for process, (_, err) in zip(second, finish(second)):
        assert process.returncode == 0, err
    assert_same_run(out, torchrun_reference)


def test_a_bad_argument_is_reported_when_rank_zero_starts_last(npz_path, tmp_path):
    """Rank 0 starts 8 s after rank 1, which meets the bad argument first: rank 1 must not exit
    before rank 0 has reported it (torchrun would stop rank 0 and the job would fail without a
    word, as it did when ranks other than 0 exited at once)."""
    command = torchrun_command(npz_path, tmp_path / "run", extra=("--rho", "-1"))
    result = run_torchrun(command, "delay:8@0")
    assert worker_statuses(result.stderr) == [2, 2], result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("aace:")]
    assert lines == ["aace: error: --rho: got -1.0; expected a finite number >= 0"], result.stderr


@pytest.mark.parametrize(
    "extra, status, message",
    [
        (("--rho", "-1"), 2, "aace: error: --rho: got -1.0; expected a finite number >= 0"),
        (("--lr", "1e8", "--optimizer", "sam"), 3, "aace: error: non-finite "),
    ],
)
def test_torchrun_errors_are_one_line_with_one_status(npz_path, tmp_path, extra, status, message):
    result = run_torchrun(torchrun_command(npz_path, tmp_path / "run", extra=extra))
    assert result.returncode != 0
    statuses = worker_statuses(result.stderr)
    if status == 2:
        # A bad argument is found within a second of the start: a worker still importing torch
        # when another exits can be SIGTERMed by torchrun before aace's handler is installed.
        assert status in statuses and set(statuses) <= {status, -15}, result.stderr
    else:
        assert statuses == [status, status], result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("aace:")]
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert "terminate called" not in result.stderr
