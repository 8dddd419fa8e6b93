"""CIFAR-10 and CIFAR-100 from the standard python-pickle archive or its extracted folder.

Images stay uint8 (N, 3, 32, 32) in memory (150 MB for CIFAR-10's train set); each batch is turned
into normalised floats on the training device. Training augmentation: random crop 32 with zero
padding 4 and a horizontal flip, plus optional Cutout (the papers' recipe).
"""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor

from .augment import cutout, random_crop_flip
from .dataset import Dataset

LAYOUT = {
    "cifar10": {"archive": "cifar-10-python.tar.gz", "folder": "cifar-10-batches-py", "classes": 10,
                "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"], "label": b"labels"},
    "cifar100": {"archive": "cifar-100-python.tar.gz", "folder": "cifar-100-python", "classes": 100,
                 "train": ["train"], "test": ["test"], "label": b"fine_labels"},
}
MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


def _unpickle(handle: io.BufferedIOBase, where: str) -> Dict[bytes, object]:
    try:
        return pickle.load(handle, encoding="bytes")
    except Exception as err:  # a truncated or foreign file raises many kinds
        raise ValueError(f"{where} is damaged or not a CIFAR python batch ({type(err).__name__})") from None


def _read_batches(name: str, data_dir: Path) -> Dict[str, Dict[bytes, object]]:
    layout = LAYOUT[name]
    wanted = layout["train"] + layout["test"]
    folder = data_dir / layout["folder"]
    archive = data_dir / layout["archive"]
    if folder.is_dir():
        batches = {}
        for part in wanted:
            path = folder / part
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: the folder {folder} is incomplete; extract "
                                        f"{layout['archive']} again")
            with open(path, "rb") as handle:
                batches[part] = _unpickle(handle, str(path))
        return batches
    if archive.is_file():
        try:
            with tarfile.open(archive, "r:gz") as tar:
                batches = {}
                for part in wanted:
                    member = tar.extractfile(f"{layout['folder']}/{part}")
                    if member is None:
                        raise KeyError(part)
                    batches[part] = _unpickle(member, f"{archive}:{part}")
                return batches
        except (tarfile.TarError, KeyError, EOFError, OSError) as err:
            raise ValueError(f"{archive} is damaged or incomplete ({type(err).__name__}: {err}); "
                             f"download {layout['archive']} again") from None
    raise FileNotFoundError(
        f"{name} not found: download {layout['archive']} (https://www.cs.toronto.edu/~kriz/cifar.html) and put "
        f"it, or its extracted folder {layout['folder']}/, in {data_dir} (or pass --data-dir)")


def _stack(batches: List[Dict[bytes, object]], label: bytes) -> (Tensor, Tensor):
    x = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
    y = np.concatenate([np.asarray(b[label], dtype=np.int64) for b in batches])
    return torch.from_numpy(x), torch.from_numpy(y)


def normaliser(name: str) -> Callable[[Tensor], Tensor]:
    """uint8 images → floats in [0, 1] → per-channel standardised, on the batch's device."""
    mean, std = torch.tensor(MEAN[name]).view(1, 3, 1, 1), torch.tensor(STD[name]).view(1, 3, 1, 1)

    def transform(x: Tensor) -> Tensor:
        return (x.float().div_(255.0) - mean.to(x.device)) / std.to(x.device)

    return transform


def load_cifar(name: str, data_dir: Optional[str], cutout_size: int = 0) -> Dataset:
    layout = LAYOUT[name]
    root = Path(data_dir) if data_dir else Path("data")
    raw = _read_batches(name, root)
    train_x, train_y = _stack([raw[p] for p in layout["train"]], layout["label"])
    test_x, test_y = _stack([raw[p] for p in layout["test"]], layout["label"])
    # Padding is black in pixel space, as with padding before normalisation.
    black = [-m / s for m, s in zip(MEAN[name], STD[name])]

    def augment(x: Tensor, generator: torch.Generator) -> Tensor:
        x = random_crop_flip(x, generator, padding=4, fill=black)
        return cutout(x, generator, cutout_size) if cutout_size > 0 else x

    return Dataset(name, train_x, train_y, test_x, test_y, num_classes=layout["classes"],
                   input_shape=(3, 32, 32), augment=augment, transform=normaliser(name))
