"""scikit-learn's bundled 8×8 handwritten digits: 1797 images, 10 classes, no download."""
from __future__ import annotations

import torch

from .dataset import Dataset, stratified_split


def load_digits() -> Dataset:
    """The digits as float32 images (N, 1, 8, 8) in [0, 1], with a FIXED stratified 25 % test split
    (``random_state=0``): every run, whatever its seed, is tested on the same 450 images."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    y = torch.tensor(bunch.target, dtype=torch.int64)
    train, test = (torch.from_numpy(i) for i in stratified_split(bunch.target, 0.25, seed=0))
    return Dataset("digits", x[train], y[train], x[test], y[test], num_classes=10, input_shape=(1, 8, 8))
