"""SAM + AACE under lightning.Trainer: scikit-learn's digits, a small CNN, a cosine schedule,
checkpoints.

    pip install 'aace[lightning]'
    python examples/lightning_sam_aace.py                                  # one process
    python examples/lightning_sam_aace.py --devices 2 --strategy ddp       # 2 CPU processes
    python examples/lightning_sam_aace.py --precision bf16-mixed
    python examples/lightning_sam_aace.py --epochs 20 --resume runs/lightning-digits/last.ckpt

What differs from a plain LightningModule is marked with ``# <-``: the base class (manual
optimization with one SAM step per batch), the perturbation loss, and the optimizer.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from aace import SAM, aace_loss
from aace.integrations.lightning import SAMModule


class DigitsNet(SAMModule):  # <- training_step: one SAM step, schedulers stepped
    def __init__(self, epochs: int, lr: float = 0.05, rho: float = 0.2) -> None:
        super().__init__(perturbation_loss=aace_loss)  # <- AACE in the perturbation pass
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        accuracy = (self(x).argmax(1) == y).float().mean()
        self.log("val_acc", accuracy, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        opt = SAM(
            self.parameters(),
            torch.optim.SGD,
            rho=self.hparams.rho,
            perturbation="aace",
            lr=self.hparams.lr,
            momentum=0.9,
            weight_decay=5e-4,
        )  # <- fmt: skip
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.hparams.epochs)
        return {"optimizer": opt, "lr_scheduler": scheduler}


def data() -> tuple[TensorDataset, TensorDataset]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = order[:360], order[360:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, ...")
    parser.add_argument("--out", default="runs/lightning-digits")
    parser.add_argument("--resume", help="a checkpoint to continue from, e.g. OUT/last.ckpt")
    args = parser.parse_args(argv)

    L.seed_everything(0, verbose=False)
    train, test = data()
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        precision=args.precision,
        callbacks=[ModelCheckpoint(dirpath=args.out, save_last=True)],
        logger=False,
        enable_model_summary=False,
    )
    model = DigitsNet(epochs=args.epochs)
    trainer.fit(
        model,
        DataLoader(train, batch_size=64, shuffle=True),
        DataLoader(test, batch_size=360),
        ckpt_path=args.resume,
    )
    accuracy = float(trainer.callback_metrics["val_acc"])
    if trainer.is_global_zero:
        print(f"test accuracy {accuracy:.4f} after {trainer.current_epoch} epochs")
    return accuracy


if __name__ == "__main__":
    main()
