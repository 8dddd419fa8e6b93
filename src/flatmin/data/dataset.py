"""A data set held as tensors: train/test (and an optional validation split carved from train)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

Augment = Callable[[Tensor, torch.Generator], Tensor]


@dataclass
class Dataset:
    """Inputs ``*_x`` (float, or uint8 images that ``transform`` turns into floats) and int64 labels.

    ``transform`` runs on every batch (train and eval) on the batch's device, ``augment`` on training
    batches only, before ``transform``.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    input_shape: Tuple[int, ...]
    val_x: Optional[Tensor] = None
    val_y: Optional[Tensor] = None
    augment: Optional[Augment] = None
    transform: Optional[Callable[[Tensor], Tensor]] = None


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices ``(keep, held_out)`` with ``fraction`` of every class held out, fixed by ``seed``."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(y))
    keep, held = train_test_split(index, test_size=fraction, random_state=seed, stratify=y)
    return np.sort(keep), np.sort(held)


def with_validation(ds: Dataset, fraction: float, seed: int) -> Dataset:
    """``ds`` with ``fraction`` of TRAIN moved to a stratified validation split (test is untouched)."""
    if fraction <= 0:
        return ds
    keep, held = stratified_split(ds.train_y.numpy(), fraction, seed)
    keep_t, held_t = torch.from_numpy(keep), torch.from_numpy(held)
    ds.val_x, ds.val_y = ds.train_x[held_t], ds.train_y[held_t]
    ds.train_x, ds.train_y = ds.train_x[keep_t], ds.train_y[keep_t]
    return ds
