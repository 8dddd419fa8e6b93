"""A data set held as tensors, and the stratified splits that carve test and validation sets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

# augment(x_batch, generator) -> x_batch: batched, on the batch's device, all randomness from generator.
Augment = Callable[[Tensor, torch.Generator], Tensor]
Transform = Callable[[Tensor], Tensor]


@dataclass
class Dataset:
    """Train and test tensors (and a validation split carved from train when asked for).

    ``*_x`` are the stored inputs, ``*_y`` int64 labels. Inputs are either ready floats or compact
    uint8 images that ``transform`` turns into normalised floats one batch at a time, on the batch's
    device. A loader applies ``transform`` to every batch and then, to training batches only,
    ``augment``; so ``augment`` sees the same normalised floats the model does.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    input_shape: Tuple[int, ...]  # of one sample, e.g. (1, 8, 8)
    val_x: Optional[Tensor] = None
    val_y: Optional[Tensor] = None
    augment: Optional[Augment] = None
    transform: Optional[Transform] = None


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted indices ``(kept, held_out)`` with ``fraction`` of every class held out; fixed by ``seed``."""
    from sklearn.model_selection import train_test_split

    kept, held = train_test_split(np.arange(len(labels)), test_size=fraction, random_state=seed, stratify=labels)
    # Sorting keeps the stored order, so a split is a pure selection of samples.
    return np.sort(kept), np.sort(held)


def with_validation(ds: Dataset, fraction: float, seed: int) -> Dataset:
    """``ds`` with ``fraction`` of its TRAIN samples moved to ``val_x``/``val_y`` (stratified, fixed by
    ``seed``). The test split is never touched."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction={fraction} is not allowed: it must be in [0, 1)")
    if fraction == 0.0:
        return ds
    try:
        kept, held = stratified_split(ds.train_y.numpy(), fraction, seed)
    except ValueError as err:  # sklearn: too few samples for a stratified split
        raise ValueError(f"val_fraction={fraction} cannot hold out every class of the {len(ds.train_y)} "
                         f"{ds.name} training samples: {err}") from None
    kept_t, held_t = torch.from_numpy(kept), torch.from_numpy(held)
    return dataclasses.replace(ds, train_x=ds.train_x[kept_t], train_y=ds.train_y[kept_t],
                               val_x=ds.train_x[held_t], val_y=ds.train_y[held_t])
