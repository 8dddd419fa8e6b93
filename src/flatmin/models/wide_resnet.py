"""Wide ResNets (Zagoruyko & Komodakis 2016): WRN-d-k has three groups of (d − 4)/6 pre-activation
basic blocks, of widths 16k, 32k and 64k, after a 3×3 stem conv of width 16."""
from __future__ import annotations

from typing import List

from torch import Tensor, nn

from .init import kaiming_init_


class WideBlock(nn.Module):
    """Pre-activation: BN → ReLU → 3×3 conv, twice, plus the shortcut. When the shape changes, the
    shortcut is a strided 1×1 conv of the pre-activated input, as in the authors' code."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride, bias=False)
                         if stride != 1 or in_planes != planes else None)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.bn1(x).relu()
        out = self.conv2(self.bn2(self.conv1(pre)).relu())
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``: 36.48M parameters for WRN-28-10, 10.96M for WRN-16-8 (10 classes)."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"Wide ResNet depth={depth} is not allowed: it must be 6n + 4 with n >= 1 "
                             f"(10, 16, 28, ...)")
        blocks_per_group = (depth - 4) // 6
        layers: List[nn.Module] = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)]
        in_planes = 16
        for i, planes in enumerate((16 * widen, 32 * widen, 64 * widen)):
            for j in range(blocks_per_group):
                layers.append(WideBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
        # The blocks end without activation, so the head starts with the last BN → ReLU.
        layers += [nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                   nn.Linear(in_planes, num_classes)]
        self.net = nn.Sequential(*layers)
        kaiming_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
