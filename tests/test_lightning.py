"""SAM+AACE under lightning.Trainer (aace.integrations.lightning): the same steps as the
library's own loop (float32 and bf16-mixed, BatchNorm, LR schedulers), checkpoint resume that
keeps the momentum, DDP on 2 CPU processes against the m-sharpness update written out by hand,
and the example script."""

from __future__ import annotations

import functools
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import lightning_ddp_worker as worker
from aace import SAM, aace_loss
from aace.integrations import MissingExtraError
from aace.integrations.lightning import SAMModule, sam_step
from aace.training.build import build_optimizer
from aace.training.config import RunConfig
from aace.training.step import TrainStep

pytestmark = pytest.mark.filterwarnings("ignore")  # Lightning's advice on workers, loggers, ...

RHO, LR, MOMENTUM, WEIGHT_DECAY, SMOOTHING, EPOCHS, BATCH = 0.2, 0.05, 0.9, 5e-4, 0.1, 2, 8


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(32, 4),
    )  # fmt: skip


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    return TensorDataset(
        torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    )


class Net(SAMModule):
    def __init__(self) -> None:
        update = functools.partial(F.cross_entropy, label_smoothing=SMOOTHING)
        super().__init__(perturbation_loss=aace_loss, update_loss=update)
        self.net = make_net()
        self.lrs: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self):
        # track_stats as aace train's optimizer: with it SAM takes its unfused perturbation
        # path, whose last bits differ from the fused one.
        opt = SAM(self.parameters(), torch.optim.SGD, rho=RHO, perturbation="aace", lr=LR,
                  momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, track_stats=True)  # fmt: skip
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
        return {"optimizer": opt, "lr_scheduler": scheduler}

    def on_train_epoch_start(self) -> None:
        self.lrs.append(self.optimizers().optimizer.param_groups[0]["lr"])


def fit(net: L.LightningModule, max_epochs: int = EPOCHS, **kwargs) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        **{k: v for k, v in kwargs.items() if k != "ckpt_path"},
    )  # fmt: skip
    trainer.fit(net, DataLoader(make_data(), batch_size=BATCH), ckpt_path=kwargs.get("ckpt_path"))
    return trainer


def library_loop(amp: str = "off") -> tuple[nn.Module, list[float]]:
    """aace train's own step (TrainStep) and scheduler on the same batches."""
    config = RunConfig(optimizer="sam-aace", rho=RHO, lr=LR, momentum=MOMENTUM,
                       weight_decay=WEIGHT_DECAY, label_smoothing=SMOOTHING, amp=amp)  # fmt: skip
    model = make_net()
    optimizer = build_optimizer(model, config)
    step = TrainStep(model, optimizer, config, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    lrs = []
    for _ in range(EPOCHS):
        lrs.append(optimizer.param_groups[0]["lr"])
        model.train()
        for x, y in DataLoader(make_data(), batch_size=BATCH):
            step(x, y)
        scheduler.step()
    return model, lrs


@pytest.fixture(scope="module")
def lightning_run():
    net = Net()
    trainer = fit(net)
    return net, trainer


def test_same_steps_as_the_library_loop(lightning_run):
    net, trainer = lightning_run
    reference, lrs = library_loop()
    assert trainer.global_step == EPOCHS * 32 // BATCH  # one optimizer step per SAM step
    assert net.lrs == lrs and lrs[1] < lrs[0]  # the scheduler stepped once per epoch
    for key, value in reference.state_dict().items():  # BatchNorm statistics included
        torch.testing.assert_close(net.net.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_bf16_mixed_is_autocast_in_both_passes(lightning_run):
    net = Net()
    fit(net, precision="bf16-mixed")
    reference, _ = library_loop(amp="bf16")
    float32_net, _ = lightning_run
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(net.net.state_dict()[key], value, msg=key)
    weight = "0.weight"
    assert not torch.allclose(net.net.state_dict()[weight], float32_net.net.state_dict()[weight])


def test_checkpoint_resume_keeps_momentum_and_schedule(lightning_run, tmp_path):
    straight, _ = lightning_run
    first = Net()
    trainer = fit(first, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    saved = torch.load(tmp_path / "epoch1.ckpt", weights_only=True)
    (state,) = saved["optimizer_states"]
    assert state["state"][0]["momentum_buffer"].abs().sum() > 0  # SGD's, inside SAM's state

    resumed = Net()
    fit(resumed, ckpt_path=tmp_path / "epoch1.ckpt")
    assert resumed.lrs == straight.lrs[1:]
    for key, value in straight.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[key], value), key


def test_step_interval_scheduler_with_frequency():
    class StepScheduled(Net):
        def configure_optimizers(self):
            config = super().configure_optimizers()
            scheduler = torch.optim.lr_scheduler.StepLR(config["optimizer"], 1, gamma=0.5)
            return {**config, "lr_scheduler": {"scheduler": scheduler, "interval": "step",
                                                "frequency": 3}}  # fmt: skip

    net = StepScheduled()
    fit(net, max_epochs=1)  # 4 steps: the scheduler steps after the 3rd
    assert net.optimizers().optimizer.param_groups[0]["lr"] == LR * 0.5


class _Plain(Net):
    automatic = True

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = self.automatic

    def training_step(self, batch, batch_idx):
        return sam_step(self, *batch).update_loss


@pytest.mark.parametrize(
    "case, message",
    [
        # Lightning's automatic optimization calls SAM.step(closure) with no AACE gradient.
        ("automatic", "automatic_optimization = False"),
        ("sgd", "sam_step needs an aace.SAM optimizer from configure_optimizers, got SGD"),
        ("fp16", "precision='16-mixed' \\(float16 with a GradScaler\\) is not supported"),
    ],
)
def test_misuse_is_a_clear_error(case, message):
    class Case(_Plain):
        automatic = case == "automatic"

        def configure_optimizers(self):
            if case == "sgd":
                return torch.optim.SGD(self.parameters(), lr=0.1)
            return super().configure_optimizers()

    # float16 with a GradScaler, as "16-mixed" is on CUDA (on a CPU it would fall back to bf16).
    scaler = torch.amp.GradScaler("cpu")
    plugins = [MixedPrecision("16-mixed", "cpu", scaler)] if case == "fp16" else []
    with pytest.raises(ValueError, match=message):
        fit(Case(), max_epochs=1, plugins=plugins)


def test_missing_lightning_names_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "aace.integrations.lightning")
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'aace\[lightning\]'"):
        importlib.import_module("aace.integrations.lightning")


def _m_sharpness_reference(sync: str) -> dict[str, torch.Tensor]:
    """SAM+AACE over 2 ranks by hand: rank r perturbs with the AACE gradient of its own shard
    ("local") or of both ("global"), e = -rho g; the update is SGD with the mean over the ranks
    of the cross-entropy gradient at w + e_r."""
    net = worker.make_net()
    names = [n for n, _ in net.named_parameters()]
    params = list(net.parameters())
    sgd = torch.optim.SGD(params, lr=worker.LR, momentum=worker.MOMENTUM)
    x, y = worker.make_data()
    shards = [list(range(rank, worker.SAMPLES, 2)) for rank in range(2)]

    def grad(ps, loss_fn, index):
        ps = [p.detach().requires_grad_() for p in ps]
        logits = functional_call(net, dict(zip(names, ps)), (x[index],))
        return torch.autograd.grad(loss_fn(logits, y[index]), ps)

    batch = worker.PER_RANK_BATCH
    for s in range(worker.SAMPLES // (2 * batch)):
        index = [shard[s * batch : (s + 1) * batch] for shard in shards]
        w = [p.detach().clone() for p in params]
        first = [grad(w, aace_loss, i) for i in index]
        if sync == "global":
            first = [[(a + b) / 2 for a, b in zip(*first)]] * 2
        second = [
            grad([p - worker.RHO * g for p, g in zip(w, gs)], F.cross_entropy, i)
            for gs, i in zip(first, index)
        ]
        for p, a, b in zip(params, *second):
            p.grad = (a + b) / 2
        sgd.step()
    return net.state_dict()


def test_ddp_two_cpu_processes_equal_the_m_sharpness_update(tmp_path):
    script = Path(worker.__file__)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    references = {sync: _m_sharpness_reference(sync) for sync in ("local", "global")}
    distance = max(
        (references["local"][k] - v).abs().max() for k, v in references["global"].items()
    )
    assert distance > 1e-4  # the two settings are distinguishable
    for rank in range(2):
        result = torch.load(tmp_path / f"out.rank{rank}", weights_only=True)
        for sync, reference in references.items():
            assert result[sync]["global_step"] == worker.SAMPLES // (2 * worker.PER_RANK_BATCH)
            for key, value in reference.items():
                torch.testing.assert_close(result[sync]["net"][key], value, rtol=1e-12,
                                           atol=1e-14, msg=f"{sync} rank {rank} {key}")  # fmt: skip


def test_example_script_trains(tmp_path):
    path = Path(__file__).parent.parent / "examples" / "lightning_sam_aace.py"
    spec = importlib.util.spec_from_file_location("lightning_sam_aace", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accuracy = example.main(["--epochs", "2", "--out", str(tmp_path)])
    assert accuracy > 0.5  # 10 digit classes: chance is 0.1
    assert (tmp_path / "last.ckpt").exists()
