"""SAM + AACE in your own training loop: scikit-learn's digits, a small CNN, three optimizers.

    python examples/own_loop.py

The two lines that differ from a plain SGD loop are marked with ``# <-``.
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from aace import SAM, aace_loss, frozen_running_stats


def data():
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = order[:360], order[360:]
    return x[train], y[train], x[test], y[test]


def model():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


def train(method: str, epochs: int = 15, seed: int = 0) -> float:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = data()
    net = model()
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    if method == "sgd":
        opt = torch.optim.SGD(net.parameters(), **kwargs)
    else:
        perturbation = "aace" if method == "sam-aace" else "sam"
        rho = 0.2 if method == "sam-aace" else 0.05
        opt = SAM(net.parameters(), torch.optim.SGD, rho=rho, perturbation=perturbation, **kwargs)
    for _ in range(epochs):
        net.train()
        for batch in torch.randperm(len(y_train)).split(64):
            x, y = x_train[batch], y_train[batch]
            if method == "sgd":
                F.cross_entropy(net(x), y).backward()
                opt.step()
                opt.zero_grad()
                continue
            perturbation_loss = aace_loss if method == "sam-aace" else F.cross_entropy
            perturbation_loss(net(x), y).backward()
            opt.first_step(zero_grad=True)  # <- w -> w + e
            with frozen_running_stats(net):
                F.cross_entropy(net(x), y).backward()
            opt.second_step(zero_grad=True)  # <- back to w, then the SGD update
    net.eval()
    with torch.no_grad():
        return (net(x_test).argmax(1) == y_test).float().mean().item()


if __name__ == "__main__":
    for method in ("sgd", "sam", "sam-aace"):
        print(f"{method:10s} test accuracy {train(method):.4f}")
