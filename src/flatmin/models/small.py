"""Models for the small data sets: an MLP and a small convolutional net (1-D or 2-D by the input)."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

from torch import Tensor, nn


class MLP(nn.Module):
    """Flatten → [Linear → BatchNorm1d → ReLU] × len(hidden) → Linear."""

    def __init__(self, input_shape: Tuple[int, ...], num_classes: int, hidden: Sequence[int] = (256, 256),
                 batch_norm: bool = True) -> None:
        super().__init__()
        layers: list = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h) if batch_norm else nn.Identity(), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Three conv → BatchNorm → ReLU blocks (widths 32, 64, 128; the last two downsample by 2),
    global average pooling and a linear classifier. Conv1d for signals (C, L), Conv2d for images."""

    def __init__(self, input_shape: Tuple[int, ...], num_classes: int, widths: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        if len(input_shape) not in (2, 3):
            raise ValueError(f"cnn takes signals (C, L) or images (C, H, W), not input shape {tuple(input_shape)}")
        conv, norm, pool = ((nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d) if len(input_shape) == 2
                            else (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d))
        layers: list = []
        channels = input_shape[0]
        for i, width in enumerate(widths):
            layers += [conv(channels, width, 3, stride=1 if i == 0 else 2, padding=1, bias=False), norm(width),
                       nn.ReLU(inplace=True)]
            channels = width
        layers += [pool(1), nn.Flatten(), nn.Linear(channels, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
