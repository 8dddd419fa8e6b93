"""MNIST-1D (Greydanus 2020), generated locally: 10 classes of 40-sample signals, 4000 train / 1000 test.

The ``mnist1d`` package generates the published data set from a fixed seed in about a second; the
arrays are then cached as ``mnist1d.npz`` so later runs load instantly. Nothing here touches the
network: ``mnist1d.data.get_dataset`` would try to download, so it is never called.
"""
from __future__ import annotations

import os
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch

from .dataset import Dataset

KEYS = ("x", "y", "x_test", "y_test")


def cache_dir(data_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """``data_dir`` if given, else ``$XDG_CACHE_HOME/flatmin`` (``~/.cache/flatmin`` by default)."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flatmin"


def generate() -> Dict[str, np.ndarray]:
    """The standard MNIST-1D arrays, as the package's default arguments make them."""
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds Python's and NumPy's global generators; put them back, so that loading
    # data does not change the randomness of whatever runs next (and the first, uncached run
    # behaves like every later one).
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {key: np.asarray(data[key]) for key in KEYS}


def _read_cache(path: Path) -> Optional[Dict[str, np.ndarray]]:
    try:
        with np.load(path) as arrays:
            return {key: arrays[key] for key in KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # missing, truncated or foreign: make it anew
        return None


def _write_cache(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    """Write atomically (a temporary file, then a rename), so concurrent runs never read half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".mnist1d-", suffix=".npz")
    except OSError:
        return  # a read-only place: the cache only saves time, so go on without it
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_mnist1d(data_dir: Optional[Union[str, os.PathLike]] = None) -> Dataset:
    """MNIST-1D as float32 signals (N, 1, 40); cached in :func:`cache_dir` as ``mnist1d.npz``."""
    folder = cache_dir(data_dir)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"data_dir {folder} is a file: mnist1d needs a folder to cache mnist1d.npz in")
    path = folder / "mnist1d.npz"
    arrays = _read_cache(path)
    if arrays is None:
        arrays = generate()
        _write_cache(path, arrays)

    def signals(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32)).unsqueeze(1)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return Dataset("mnist1d", signals(arrays["x"]), labels(arrays["y"]), signals(arrays["x_test"]),
                   labels(arrays["y_test"]), num_classes=10, input_shape=(1, 40))
