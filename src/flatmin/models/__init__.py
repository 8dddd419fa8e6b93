"""Models by name: ``create_model(name, num_classes, input_shape)``; any ``nn.Module`` works too."""
from __future__ import annotations

from typing import Callable, Dict, Sequence

from torch import nn

from .resnet import BasicBlock, Bottleneck, ResNet
from .small import MLP, SmallCNN
from .vgg import VGG
from .wide_resnet import WideResNet

_IMAGE_MODELS: Dict[str, Callable[[int, int], nn.Module]] = {
    "resnet18": lambda classes, c: ResNet(BasicBlock, [2, 2, 2, 2], classes, c),
    "vgg16bn": lambda classes, c: VGG(classes, c),
    "wrn28-10": lambda classes, c: WideResNet(28, 10, classes, c),
    "wrn16-8": lambda classes, c: WideResNet(16, 8, classes, c),
    "resnet18-imagenet": lambda classes, c: ResNet(BasicBlock, [2, 2, 2, 2], classes, c, imagenet_stem=True),
    "resnet50-imagenet": lambda classes, c: ResNet(Bottleneck, [3, 4, 6, 3], classes, c, imagenet_stem=True),
}
MODELS = ("mlp", "cnn", *_IMAGE_MODELS)


def create_model(name: str, num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """The model ``name`` for inputs of per-sample ``input_shape`` and ``num_classes`` outputs."""
    shape = tuple(int(s) for s in input_shape)
    if name == "mlp":
        return MLP(shape, num_classes)
    if name == "cnn":
        return SmallCNN(shape, num_classes)
    if name not in _IMAGE_MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    if len(shape) != 3 or min(shape[1:]) < 8:
        raise ValueError(f"model {name!r} needs images (C, H, W) of at least 8×8 pixels, not input shape {shape}")
    return _IMAGE_MODELS[name](num_classes, shape[0])


__all__ = ["MODELS", "create_model"]
