"""A multilayer perceptron for small inputs of any shape (8×8 digits, 40-sample signals)."""
from __future__ import annotations

import math
from typing import List, Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """Flatten → [Linear → BatchNorm1d → ReLU] per hidden width → Linear.

    BatchNorm is on by default, so that training methods must handle running statistics; PyTorch's
    default initialisation.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (256, 256),
                 batch_norm: bool = True) -> None:
        super().__init__()
        layers: List[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU(inplace=True))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
