"""Data: offline data sets held as tensors (digits, mnist1d, cifar10, cifar100) or read lazily from
image folders (imagefolder), and loaders whose batches are reproducible per (seed, epoch)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch

from .cifar import load_cifar
from .dataset import Dataset, with_validation
from .imagefolder import FolderLoader, load_imagefolder
from .loader import BatchLoader
from .small import load_digits_dataset, load_mnist1d_dataset

DATASETS = ("digits", "mnist1d", "cifar10", "cifar100", "imagefolder")


class FolderDataset:
    """An image-folder data set: lazily decoded, so it holds datasets rather than tensors."""

    def __init__(self, data_dir: Optional[str], image_size: int) -> None:
        self.name = "imagefolder"
        self.train, self.test = load_imagefolder(data_dir, image_size)
        self.num_classes = len(self.train.classes)
        self.input_shape = (3, image_size, image_size)


def load_dataset(name: str, data_dir: Optional[str] = None, val_fraction: float = 0.0, seed: int = 0,
                 cutout: int = 0, image_size: int = 224) -> Union[Dataset, FolderDataset]:
    """The data set ``name``; ``val_fraction`` of TRAIN becomes a validation split fixed by ``seed``."""
    if name not in DATASETS:
        raise ValueError(f"unknown data {name!r}: choose one of {', '.join(DATASETS)}")
    if name == "imagefolder":
        if val_fraction > 0:
            raise ValueError("imagefolder has its own val/ folder: val_fraction must be 0")
        return FolderDataset(data_dir, image_size)
    if name == "digits":
        ds = load_digits_dataset()
    elif name == "mnist1d":
        ds = load_mnist1d_dataset(data_dir)
    else:
        ds = load_cifar(name, data_dir, cutout)
    return with_validation(ds, val_fraction, seed)


def make_loaders(ds: Union[Dataset, FolderDataset], batch_size: int, eval_batch_size: int,
                 device: Union[str, torch.device] = "cpu", seed: int = 0, num_workers: int = 0,
                 shard: Tuple[int, int] = (0, 1)) -> Tuple[Any, Dict[str, Any]]:
    """The training loader and the evaluation loaders (``train``, ``test``, ``val`` when present).

    With ``shard = (rank, world)`` the training loader yields this rank's part of every global
    batch, and each evaluation loader covers every ``world``-th sample from ``rank`` on: together
    the ranks see each evaluation sample exactly once.
    """
    rank, world = shard
    device = torch.device(device)
    if isinstance(ds, FolderDataset):
        train = FolderLoader(ds.train, batch_size, shuffle=True, seed=seed, device=device,
                             num_workers=num_workers, shard=shard)
        test = FolderLoader(torch.utils.data.Subset(ds.test, range(rank, len(ds.test), world)), eval_batch_size,
                            shuffle=False, device=device, num_workers=num_workers)
        return train, {"test": test}
    # Move each split to the device once; the training and evaluation loaders then share it.
    train_x, train_y = ds.train_x.to(device), ds.train_y.to(device)
    train = BatchLoader(train_x, train_y, batch_size, shuffle=True, augment=ds.augment,
                        transform=ds.transform, seed=seed, device=device, shard=shard)
    splits = {"train": (train_x, train_y), "test": (ds.test_x, ds.test_y)}
    if ds.val_x is not None:
        splits["val"] = (ds.val_x, ds.val_y)
    evals = {name: BatchLoader(x[rank::world], y[rank::world], eval_batch_size, shuffle=False,
                               transform=ds.transform, device=device)
             for name, (x, y) in splits.items()}
    return train, evals


__all__ = ["BatchLoader", "DATASETS", "Dataset", "FolderLoader", "load_dataset", "make_loaders"]
