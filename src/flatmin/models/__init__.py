"""Models by name: ``create_model(name, num_classes, input_shape)``. Any ``nn.Module`` works with
the optimizers too; these are the ones the papers and the bundled data sets use.

- ``mlp``: flatten → 2 × (Linear 256 → BatchNorm → ReLU) → Linear; any input shape.
- ``cnn``: 3 conv blocks (32, 64, 128) with BatchNorm, average pooling; signals (C, L) or images (C, H, W).
- ``resnet18``: CIFAR ResNet-18 (3×3 stem, no max-pool); images.
- ``vgg16bn``: CIFAR VGG-16 with BatchNorm; images of at least 32×32.
- ``wrn28-10``, ``wrn16-8``: pre-activation Wide ResNets; images.
- ``resnet18-imagenet``, ``resnet50-imagenet``: 7×7 stride-2 stem and max-pool (Bottleneck blocks
  for ResNet-50); images.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Sequence, Tuple

from torch import nn

from .cnn import SmallCNN
from .mlp import MLP
from .resnet import resnet18, resnet18_imagenet, resnet50_imagenet
from .vgg import MIN_SIDE as VGG_MIN_SIDE
from .vgg import VGG
from .wide_resnet import WideResNet

# Image models: name -> (builder of (num_classes, in_channels), the smallest height and width it takes).
_IMAGE_MODELS: Dict[str, Tuple[Callable[[int, int], nn.Module], int]] = {
    "resnet18": (resnet18, 1),
    "vgg16bn": (VGG, VGG_MIN_SIDE),
    "wrn28-10": (lambda classes, channels: WideResNet(28, 10, classes, channels), 1),
    "wrn16-8": (lambda classes, channels: WideResNet(16, 8, classes, channels), 1),
    "resnet18-imagenet": (resnet18_imagenet, 1),
    "resnet50-imagenet": (resnet50_imagenet, 1),
}
MODELS = ("mlp", "cnn", *_IMAGE_MODELS)


def create_model(name: str, num_classes: int, input_shape: Sequence[int], **options: Any) -> nn.Module:
    """The model ``name`` (one of :data:`MODELS`) for samples of shape ``input_shape`` (without the
    batch dimension) and ``num_classes`` outputs. ``options`` go to the model's constructor, e.g.
    ``create_model("mlp", 10, (1, 8, 8), hidden=(512,), batch_norm=False)``.

    Raises ``ValueError`` for an unknown name or an input shape the model cannot take.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} is not allowed: it must be >= 1")
    shape = tuple(int(s) for s in input_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"input shape {shape} is not allowed: it needs at least one size, and every size >= 1")
    if name == "mlp":
        return MLP(shape, num_classes, **options)
    if name == "cnn":
        return SmallCNN(shape, num_classes, **options)
    build, min_side = _IMAGE_MODELS[name]
    if options:
        raise ValueError(f"model {name!r} takes no options, not {', '.join(sorted(options))}")
    if len(shape) != 3 or min(shape[1:]) < min_side:
        size = f" of at least {min_side}×{min_side} pixels" if min_side > 1 else ""
        raise ValueError(f"model {name!r} takes images (C, H, W){size}, not input shape {shape}")
    return build(num_classes, shape[0], **options)


__all__ = ["MODELS", "create_model"]
