"""Data sets and loaders, all offline.

    ds = load_dataset("cifar10", data_dir="data", val_fraction=0.1, cutout=16)
    train_loader, eval_loaders = make_loaders(ds, batch_size=128, device="cuda", seed=0)
    for epoch in range(epochs):
        train_loader.set_epoch(epoch)
        for x, y in train_loader:
            ...

``digits``, ``mnist1d``, ``cifar10`` and ``cifar100`` are held in memory as tensors
(:class:`Dataset`); ``imagefolder`` is decoded lazily from image files (:class:`FolderDataset`).
Both kinds get loaders with the same contract: ``set_epoch``, ``len``, iteration and ``iter_from``,
with batches fixed by ``(seed, epoch)``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from .cifar import load_cifar
from .dataset import Dataset, with_validation
from .digits import load_digits
from .imagefolder import FolderDataset, FolderLoader, load_imagefolder
from .loader import BatchLoader
from .mnist1d import load_mnist1d

DATASETS = ("digits", "mnist1d", "cifar10", "cifar100", "imagefolder")
Loader = Union[BatchLoader, FolderLoader]


def load_dataset(name: str, data_dir: Optional[Union[str, os.PathLike]] = None, val_fraction: float = 0.0,
                 seed: int = 0, cutout: int = 0, image_size: Optional[int] = None,
                 normalize: Optional[str] = None) -> Union[Dataset, FolderDataset]:
    """The data set ``name`` (one of :data:`DATASETS`).

    Args:
        data_dir: where the files are: the CIFAR archive or its extracted folder, the ``train/`` and
            ``val/`` folders of ``imagefolder`` (both default ``./data``), or the cache of the
            generated ``mnist1d`` (default ``~/.cache/flatmin``). ``digits`` ships with scikit-learn.
        val_fraction: hold out this fraction of TRAIN, stratified by class, as ``val_x``/``val_y``.
        seed: fixes which samples the validation split holds.
        cutout: CIFAR only: the side of the square Cutout zeroes in every training image (0: off).
        image_size: ``imagefolder`` only: the side of the square crops (default: the images' own
            size, at most 224; see :mod:`flatmin.data.imagefolder`).
        normalize: ``imagefolder`` only: ``"data"`` (the training images' channel mean and std, the
            default) or ``"imagenet"``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data {name!r}: choose one of {', '.join(DATASETS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} is not allowed: it must be in [0, 1)")
    if cutout < 0:
        raise ValueError(f"cutout={cutout} is not allowed: it must be >= 0 (0 turns it off)")
    if cutout and name not in ("cifar10", "cifar100"):
        raise ValueError(f"cutout={cutout} is not allowed for {name}: Cutout applies to cifar10 and cifar100 only")
    for option, value in (("image_size", image_size), ("normalize", normalize)):
        if value is not None and name != "imagefolder":
            raise ValueError(f"{option}={value!r} is not allowed for {name}: it applies to imagefolder only")
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser()  # a config file's "~/data" reaches us unexpanded
    if name == "imagefolder":
        if val_fraction:
            raise ValueError(f"val_fraction={val_fraction} is not allowed for imagefolder: its val/ folder is "
                             f"the held-out split; use 0")
        return load_imagefolder(data_dir, image_size, normalize)
    if name == "digits":
        ds = load_digits()
    elif name == "mnist1d":
        ds = load_mnist1d(data_dir)
    else:
        ds = load_cifar(name, data_dir, cutout)
    return with_validation(ds, val_fraction, seed)


def make_loaders(ds: Union[Dataset, FolderDataset], batch_size: int, device: Union[str, torch.device] = "cpu",
                 seed: int = 0, *, eval_batch_size: Optional[int] = None, num_workers: int = 0,
                 shard: Tuple[int, int] = (0, 1)) -> Tuple[Loader, Dict[str, Loader]]:
    """The training loader (shuffled, augmented) and the evaluation loaders by split name: ``train``
    (the training set unaugmented), ``test``, and ``val`` when ``ds`` has one. An image-folder data
    set gets ``test`` only (its ``val/`` folder), since a pass over a large training set per
    evaluation is too costly; :func:`split_loader` serves its other splits.

    With ``shard = (rank, world)`` the training loader yields this rank's share of every global
    batch, and each evaluation loader covers every ``world``-th sample from ``rank`` on, so that
    together the ranks evaluate each sample exactly once. ``num_workers`` decoding processes serve
    ``imagefolder``; in-memory data needs none.
    """
    rank, world = shard
    device = torch.device(device)
    eval_batch_size = eval_batch_size or batch_size
    if isinstance(ds, FolderDataset):
        train = FolderLoader(ds.train, batch_size, shuffle=True, seed=seed, device=device, num_workers=num_workers,
                             shard=shard)
        test = FolderLoader(ds.test.shard(rank, world), eval_batch_size, shuffle=False, device=device,
                            num_workers=num_workers)
        return train, {"test": test}
    # Move the training set to the device once: the training and the evaluation loader share it.
    train_x, train_y = ds.train_x.to(device), ds.train_y.to(device)
    train = BatchLoader(train_x, train_y, batch_size, shuffle=True, augment=ds.augment, transform=ds.transform,
                        seed=seed, device=device, shard=shard)
    splits = {"train": (train_x, train_y), "test": (ds.test_x, ds.test_y)}
    if ds.val_x is not None:
        splits["val"] = (ds.val_x, ds.val_y)
    evals = {split: BatchLoader(x[rank::world], y[rank::world], eval_batch_size, shuffle=False,
                                transform=ds.transform, device=device)
             for split, (x, y) in splits.items()}
    return train, evals


def splits(ds: Union[Dataset, FolderDataset]) -> Tuple[str, ...]:
    """The split names of ``ds``: ``train`` and ``test``, and ``val`` when ``--val-fraction`` held one out."""
    return ("train", "test") + (("val",) if getattr(ds, "val_x", None) is not None else ())


def split_loader(ds: Union[Dataset, FolderDataset], split: str, batch_size: int,
                 device: Union[str, torch.device] = "cpu", seed: int = 0) -> Loader:
    """A loader of ``split`` (``train``, ``test`` or ``val``, see :func:`splits`) without augmentation,
    for measuring a model on its first batches. In-memory data comes in its stored order; an image
    folder's, stored by class, comes in an order fixed by ``seed``, so that the first batches hold
    every class. A ``ValueError`` names the splits there are when ``ds`` has no ``split``."""
    if split not in splits(ds):
        raise ValueError(f"split={split!r} is not allowed for this {ds.name}: it has {', '.join(splits(ds))}")
    if isinstance(ds, FolderDataset):
        folder = (ds.train if split == "train" else ds.test).unaugmented()
        return FolderLoader(folder, batch_size, shuffle=True, seed=seed, device=device)
    x, y = {"train": (ds.train_x, ds.train_y), "test": (ds.test_x, ds.test_y), "val": (ds.val_x, ds.val_y)}[split]
    return BatchLoader(x, y, batch_size, shuffle=False, transform=ds.transform, device=device)


__all__ = ["DATASETS", "BatchLoader", "Dataset", "FolderDataset", "FolderLoader", "load_dataset", "make_loaders",
           "split_loader", "splits"]
