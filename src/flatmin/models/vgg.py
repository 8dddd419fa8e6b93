"""VGG-16 with BatchNorm (Simonyan & Zisserman 2015) in its CIFAR form: the 13 conv layers, and a
single linear classifier on the 512 features left after the five 2×2 max-pools."""
from __future__ import annotations

from typing import List, Union

from torch import Tensor, nn

from .init import kaiming_init_

# Conv widths, "M" a 2×2 max-pool: five pools, so inputs need at least 32×32 pixels.
CONFIG_16: List[Union[int, str]] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                    512, 512, 512, "M"]
MIN_SIDE = 2 ** CONFIG_16.count("M")


class VGG(nn.Module):
    """VGG-16-BN: 14.72M parameters for 10 classes."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        channels = in_channels
        for item in CONFIG_16:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item),
                           nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
        kaiming_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
