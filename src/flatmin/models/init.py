"""The usual initialisation of convolutional nets (He et al. 2015)."""
from __future__ import annotations

from torch import nn


def kaiming_init_(model: nn.Module) -> None:
    """Conv weights ~ Kaiming normal (fan-out, ReLU gain); BatchNorm weight 1, bias 0. Linear
    layers keep PyTorch's default uniform initialisation."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
