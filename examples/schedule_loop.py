"""SAM+AACE at part of the price: SAM steps only on some steps, in your own training loop.

    python examples/schedule_loop.py

Same data and model as ``own_loop.py``; a ``SAMSchedule`` decides at each step whether to take a
SAM step (two passes) or a plain SGD step (one pass). The lines that differ from
``own_loop.py`` are marked with ``# <-``.
"""

import math

import torch
import torch.nn.functional as F
from own_loop import data, model

from aace import SAM, aace_loss, frozen_running_stats
from aace.schedule import SAMSchedule, squared_grad_norm


def train(schedule: SAMSchedule, epochs: int = 15, seed: int = 0) -> tuple[float, float]:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = data()
    net = model()
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.2, perturbation="aace",
              lr=0.05, momentum=0.9, weight_decay=5e-4)  # fmt: skip
    for _ in range(epochs):
        net.train()
        for batch in torch.randperm(len(y_train)).split(64):
            x, y = x_train[batch], y_train[batch]
            if schedule.sam_step():  # <- SAM step or plain step?
                aace_loss(net(x), y).backward()
                schedule.observe(squared_grad_norm(net.parameters()))  # <- adaptive rule only
                opt.first_step(zero_grad=True)
                with frozen_running_stats(net):
                    F.cross_entropy(net(x), y).backward()
                opt.second_step(zero_grad=True)
            else:
                F.cross_entropy(net(x), y).backward()
                schedule.observe(squared_grad_norm(net.parameters()))  # <- adaptive rule only
                opt.plain_step(zero_grad=True)  # <- the SGD step, no perturbation
    net.eval()
    with torch.no_grad():
        accuracy = (net(x_test).argmax(1) == y_test).float().mean().item()
    return accuracy, schedule.sam_steps / schedule.steps


if __name__ == "__main__":
    steps = 15 * math.ceil(1437 / 64)
    for name, schedule in [
        ("every step", SAMSchedule()),
        ("every 2nd step", SAMSchedule(every=2)),
        ("last 50% of steps", SAMSchedule(start_step=math.ceil(0.5 * steps))),
        ("adaptive, c = 0", SAMSchedule(adaptive=0.0)),
    ]:
        accuracy, fraction = train(schedule)
        print(f"{name:20s} test accuracy {accuracy:.4f}, SAM steps {fraction:.0%}")
