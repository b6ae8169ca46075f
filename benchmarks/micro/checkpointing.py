"""What mid-epoch checkpoints cost and what they save: ``--checkpoint-every N``.

Rerun from the repository root with:

    .venv/bin/python -m benchmarks.micro.checkpointing

1. Cost, on WRN-16-4 (CIFAR-shaped batches of 128, SAM+AACE, SGD momentum): the median time of
   a training step and of writing the trainer's checkpoint (model, optimizer, scheduler, random
   streams, metrics; atomic write with fsync into a temporary directory on this disk),
   interleaved. The relative cost of ``--checkpoint-every N`` over epoch-end checkpoints is
   (write time) / (N x step time): one extra write per N steps.
2. Work lost per kill, measured with real processes: ``aace train`` on scikit-learn's digits is
   SIGKILLed at the start of a training step drawn uniformly at random (the fault injector of
   the tests, ``tests/faults.py``); the steps lost are the steps done minus the position of the
   checkpoint it left. With and without ``--checkpoint-every``, the same kill steps.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from aace.models import create_model
from aace.runs import RunDirectory
from aace.training.build import build_optimizer
from aace.training.checkpoint import load_checkpoint, save_checkpoint
from aace.training.config import RunConfig
from aace.training.step import TrainStep
from benchmarks import harness

FAULTS = harness.REPOSITORY / "tests" / "faults.py"


def measure_cost(model_name: str, batch_size: int, repeats: int, every: int) -> dict:
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, in_channels=3)
    config = RunConfig(optimizer="sam-aace", rho=0.2, batch_size=batch_size)
    optimizer = build_optimizer(model, config)
    step = TrainStep(model, optimizer, config, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [60, 120, 160], gamma=0.2)
    x = torch.randn(batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (batch_size,))
    step(x, y)  # warm-up, creates the momentum buffers
    with tempfile.TemporaryDirectory(dir=harness.REPOSITORY) as tmp:
        path = Path(tmp) / "checkpoint.pt"

        def write() -> None:
            payload = {
                "config": config.to_dict(),
                "epoch": 1,
                "step_in_epoch": 7,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state()},
                "metrics": [{"epoch": 1, "test_acc": 0.5}],
            }
            save_checkpoint(path, payload)

        samples = harness.time_interleaved(
            {"step": lambda: step(x, y), "checkpoint write": write}, repeats, warmup=0
        )
        size = path.stat().st_size
    step_times, save_times = samples["step"], samples["checkpoint write"]
    step_s = harness.summarize(step_times)
    save_s = harness.summarize(save_times)
    return {
        "model": model_name,
        "batch_size": batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "checkpoint_bytes": size,
        "step_seconds": step_s,
        "save_seconds": save_s,
        "every": every,
        "relative_cost": save_s["median"] / (every * step_s["median"]),
    }


def lost_steps(kill_steps: list[int], every: int, tmp: Path) -> list[dict]:
    """Kill a digits run at each of ``kill_steps`` (a fresh run each time); the steps lost."""
    rows = []
    steps_per_epoch = 1437 // 64  # digits: 1437 training images, batch 64, drop_last
    for k in kill_steps:
        out = tmp / f"every{every}-kill{k}"
        command = [
            sys.executable, str(FAULTS), "train", "--dataset", "digits", "--model", "wrn10_1",
            "--epochs", "4", "--batch-size", "64", "--optimizer", "sam-aace", "--out", str(out),
            "--checkpoint-every", str(every),
        ]  # fmt: skip
        env = {**os.environ, "AACE_FAULTS": f"step:{k}", "AACE_LAUNCH": "0"}
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != -9:
            raise RuntimeError(f"expected a kill at step {k}: {result.stderr[-500:]}")
        done = k - 1  # killed at the start of step k
        position = 0
        if RunDirectory(out).has_checkpoint:
            checkpoint = load_checkpoint(RunDirectory(out).checkpoint_file)
            position = checkpoint["epoch"] * steps_per_epoch + checkpoint["step_in_epoch"]
        rows.append({"every": every, "kill_at_step": k, "steps_lost": done - position})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wrn16_4")
    parser.add_argument("--batch-size", type=harness.positive_int, default=128)
    parser.add_argument("--repeats", type=harness.positive_int, default=7)
    parser.add_argument("--every", type=harness.positive_int, default=50)
    parser.add_argument("--kills", type=harness.positive_int, default=6)
    parser.add_argument("--kill-every", type=harness.positive_int, default=10)
    parser.add_argument("--out-dir", default=str(harness.DEFAULT_OUT_DIR))
    args = parser.parse_args()

    cost = measure_cost(args.model, args.batch_size, args.repeats, args.every)
    rng = random.Random(0)
    kill_steps = sorted(rng.randint(2, 4 * (1437 // 64)) for _ in range(args.kills))
    with tempfile.TemporaryDirectory() as tmp:
        kills = lost_steps(kill_steps, args.kill_every, Path(tmp))
        kills += lost_steps(kill_steps, 0, Path(tmp))

    cost_table = harness.markdown_table(
        ["model", "batch", "step (ms, median)", "checkpoint write (ms, median)", "MB",
         f"cost of --checkpoint-every {args.every}"],
        [[cost["model"], cost["batch_size"], harness.milliseconds(cost["step_seconds"]["median"]),
          harness.milliseconds(cost["save_seconds"]["median"]),
          f"{cost['checkpoint_bytes'] / 2**20:.1f}", f"{100 * cost['relative_cost']:.2f} %"]],
    )  # fmt: skip
    lost_rows = []
    for every in (args.kill_every, 0):
        lost = [r["steps_lost"] for r in kills if r["every"] == every]
        name = f"--checkpoint-every {every}" if every else "epoch ends only (22 steps/epoch)"
        lost_rows.append([name, len(lost), f"{sum(lost) / len(lost):.1f}", max(lost)])
    lost_table = harness.markdown_table(
        ["checkpoints", "kills", "steps lost (mean)", "steps lost (max)"], lost_rows
    )
    notes = (
        f"n = {args.repeats} interleaved step/write pairs; kill steps {kill_steps} (uniform, "
        "seed 0) in a 4-epoch digits run (wrn10_1, batch 64, 22 steps per epoch), each a fresh "
        "run SIGKILLed at the start of that step."
    )
    text = harness.write_results(
        "checkpointing",
        kills,
        cost_table + "\n\n" + lost_table,
        args.out_dir,
        device=torch.device("cpu"),
        config=vars(args),
        extra={"cost": cost},
        notes=notes,
    )
    print(text)


if __name__ == "__main__":
    main()
