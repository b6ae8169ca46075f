"""The weight initialization both CIFAR model families use."""

from torch import nn


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions (fan_out, ReLU), BatchNorm weight 1 / bias 0, linear bias 0
    (He et al. 2015, as in the WideResNet and PyramidNet reference code)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
