"""A small convolutional net that is 1-D for signals (C, L) such as MNIST-1D and 2-D for images (C, H, W)."""
from __future__ import annotations

from typing import List, Sequence

from torch import Tensor, nn


class SmallCNN(nn.Module):
    """Three conv → BatchNorm → ReLU blocks (widths 32, 64, 128; the last two halve the resolution),
    global average pooling and a linear classifier; PyTorch's default initialisation.

    Padding keeps every size >= 1, so any input from a single pixel up works: 8×8 digits,
    40-sample signals, 32×32 CIFAR images.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        if len(input_shape) not in (2, 3):
            raise ValueError(f"model 'cnn' takes signals (C, L) or images (C, H, W), not input shape "
                             f"{tuple(input_shape)}")
        if len(input_shape) == 2:
            conv, norm, pool = nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d
        else:
            conv, norm, pool = nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d
        layers: List[nn.Module] = []
        channels = input_shape[0]
        for i, width in enumerate(widths):
            layers += [conv(channels, width, 3, stride=1 if i == 0 else 2, padding=1, bias=False), norm(width),
                       nn.ReLU(inplace=True)]
            channels = width
        layers += [pool(1), nn.Flatten(), nn.Linear(channels, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
