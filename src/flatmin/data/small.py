"""The small real data sets that run on a laptop CPU, offline: scikit-learn's 8×8 digits and MNIST-1D."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .dataset import Dataset, stratified_split


def load_digits_dataset() -> Dataset:
    """scikit-learn's bundled 8×8 digits (1797 images), scaled to [0, 1], with a fixed stratified
    25 % test split (``random_state=0``) so every run sees the same test set."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    train, test = stratified_split(bunch.target, 0.25, seed=0)
    return Dataset("digits", x[train], y[train], x[test], y[test], num_classes=10, input_shape=(1, 8, 8))


def _cache_dir(data_dir: Optional[str]) -> Path:
    return Path(data_dir) if data_dir else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flatmin"


def load_mnist1d_dataset(data_dir: Optional[str] = None) -> Dataset:
    """MNIST-1D generated locally by the ``mnist1d`` package with its standard settings: the
    published 4000/1000 split of 40-sample signals. Generated once, then cached as ``mnist1d.npz``."""
    path = _cache_dir(data_dir) / "mnist1d.npz"
    if not path.exists():
        from mnist1d.data import get_dataset_args, make_dataset

        data = make_dataset(get_dataset_args())  # generates; get_dataset() would try to download
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, x=data["x"], y=data["y"], x_test=data["x_test"], y_test=data["y_test"])
        os.replace(tmp, path)
    with np.load(path) as arrays:
        def signals(a: np.ndarray) -> torch.Tensor:
            return torch.tensor(a, dtype=torch.float32).unsqueeze(1)

        return Dataset("mnist1d", signals(arrays["x"]), torch.tensor(arrays["y"], dtype=torch.int64),
                       signals(arrays["x_test"]), torch.tensor(arrays["y_test"], dtype=torch.int64),
                       num_classes=10, input_shape=(1, 40))
