"""Run by tests/test_lightning.py (not a test itself): SAM+AACE under ``lightning.Trainer`` with
``strategy="ddp"`` on 2 CPU processes; Lightning relaunches this script for rank 1.

    python tests/lightning_ddp_worker.py OUT  # writes OUT.rank0 and OUT.rank1
"""

from __future__ import annotations

import sys
import warnings

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from aace import SAM, aace_loss
from aace.integrations.lightning import PERTURBATION_SYNCS, SAMModule

RHO, LR, MOMENTUM = 0.3, 0.1, 0.9
PER_RANK_BATCH, SAMPLES = 4, 24  # 3 steps of 2 x 4


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(16, 4),
    ).double()  # fmt: skip


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 3, 6, 6, dtype=torch.float64, generator=g)
    return x, torch.randint(0, 4, (SAMPLES,), generator=g)


class Net(SAMModule):
    def __init__(self, perturbation_sync: str) -> None:
        super().__init__(perturbation_loss=aace_loss, perturbation_sync=perturbation_sync)
        self.net = make_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train_dataloader(self) -> DataLoader:
        # Rank r gets the samples r, r + 2, r + 4, ... in order (Lightning's own sampler would
        # shuffle them).
        dataset = TensorDataset(*make_data())
        sampler = DistributedSampler(dataset, self.trainer.world_size, self.trainer.global_rank,
                                     shuffle=False)  # fmt: skip
        return DataLoader(dataset, batch_size=PER_RANK_BATCH, sampler=sampler)

    def configure_optimizers(self):
        return SAM(self.parameters(), torch.optim.SGD, rho=RHO, perturbation="aace", lr=LR,
                   momentum=MOMENTUM)  # fmt: skip


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out = sys.argv[1]
    result = {}
    for sync in PERTURBATION_SYNCS:  # the second fit reuses the 2 processes of the first
        trainer = L.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, precision="64-true",
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, use_distributed_sampler=False,
        )  # fmt: skip
        net = Net(sync)
        trainer.fit(net)
        result[sync] = {"net": net.net.state_dict(), "global_step": trainer.global_step}
    torch.save(result, f"{out}.rank{trainer.global_rank}")
