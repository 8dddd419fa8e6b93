"""ResNets (He et al. 2016): ResNet-18 in its CIFAR form (3×3 stem, no max-pool) and the ImageNet
ResNet-18 and ResNet-50 (7×7 stride-2 stem and max-pool; Bottleneck blocks for ResNet-50, with the
stride on the 3×3 conv as in torchvision)."""
from __future__ import annotations

from typing import List, Sequence, Type, Union

from torch import Tensor, nn

from .init import kaiming_init_


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """Identity when the shapes agree, else a strided 1×1 conv and BatchNorm (option B of the paper)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3×3 convs with BatchNorm; ReLU after the residual sum."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + self.shortcut(x)).relu()


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (strided), 1×1 expand to 4× the width; ReLU after the residual sum."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out)).relu()
        return (self.bn3(self.conv3(out)) + self.shortcut(x)).relu()


class ResNet(nn.Module):
    """Stem → four stages of widths 64, 128, 256, 512 (each but the first halves the resolution)
    → global average pooling → linear classifier."""

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], depths: Sequence[int], num_classes: int,
                 in_channels: int = 3, imagenet_stem: bool = False) -> None:
        super().__init__()
        if imagenet_stem:  # 224×224 → 56×56 before the first stage
            self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:  # small images keep their resolution: 32×32 into the first stage
            self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True))
        stages: List[nn.Module] = []
        in_planes = 64
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            blocks = []
            for j in range(depth):
                blocks.append(block(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_planes, num_classes))
        kaiming_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


def resnet18(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-18 for 32×32 images: 11.17M parameters for 10 classes."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels)


def resnet18_imagenet(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-18 for ImageNet-sized images: 11.69M parameters for 1000 classes."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, imagenet_stem=True)


def resnet50_imagenet(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-50 for ImageNet-sized images: 25.56M parameters for 1000 classes."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, imagenet_stem=True)
