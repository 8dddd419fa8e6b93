"""Loaders whose batches depend on ``(seed, epoch)`` alone, so that training can resume anywhere.

The order of epoch ``e`` comes from a generator seeded by ``(seed, e)``, and the augmentation of
its batch ``b`` from one seeded by ``(seed, e, b, rank)``. Nothing carries over from one epoch or
batch to the next, so a run resumed at epoch ``e`` (``set_epoch(e)``), or even at batch ``k`` of it
(``iter_from(k)``), sees exactly the batches an uninterrupted run would.

Two loaders share this contract: :class:`BatchLoader`, here, batches tensors held in memory with
one indexing op per batch; :class:`~flatmin.data.imagefolder.FolderLoader` decodes image files
lazily through a ``torch.utils.data.DataLoader`` with worker processes.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

from .dataset import Augment, Transform

Batch = Tuple[Tensor, Tensor]


def mix_seed(*keys: int) -> int:
    """One seed from several integers (seed, epoch, batch, ...), by a polynomial hash."""
    value = 0
    for key in keys:
        value = (value * 1_000_003 + int(key)) % (2**63 - 1)
    return value


def generator_for(*keys: int) -> torch.Generator:
    """A CPU generator seeded by ``keys`` alone: the same keys give the same numbers on any device."""
    return torch.Generator().manual_seed(mix_seed(*keys))


class EpochBatches:
    """The batching every loader shares: the epoch's order, the batch count, and sharding.
    Subclasses yield the batches of given sample indices (``_batches``).

    With ``shard = (rank, world)`` (data parallelism) every global batch of ``world · batch_size``
    samples is split into ``world`` consecutive per-rank batches and this loader yields the
    ``rank``-th. The last, incomplete global batch is then dropped so that every rank makes the
    same number of steps.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                 shard: Tuple[int, int]) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is not allowed: it must be >= 1")
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard={tuple(shard)} is not allowed: it must be (rank, world) with 0 <= rank < world")
        self.size, self.batch_size = size, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration yield the batches of epoch ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """The number of batches per epoch."""
        step = self.batch_size * self.world
        if self.drop_last or self.world > 1:
            return self.size // step
        return -(-self.size // step)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        """The batches of the current epoch from batch ``start_batch`` on, exactly as a full
        iteration would yield them."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch={start_batch} is not allowed: it must be in 0..{len(self)} "
                             f"(an epoch has {len(self)} batches)")
        return self._batches(start_batch)

    def _batches(self, start_batch: int) -> Iterator[Batch]:
        raise NotImplementedError

    def _indices(self, start_batch: int, device: torch.device) -> Iterator[Tuple[int, Tensor]]:
        """``(b, sample indices of batch b)`` for this epoch's batches from ``start_batch`` on."""
        if self.shuffle:
            order = torch.randperm(self.size, generator=generator_for(self.seed, self.epoch))
        else:
            order = torch.arange(self.size)
        order = order.to(device)  # once per epoch; each batch is then a slice on the device
        step = self.batch_size * self.world
        for b in range(start_batch, len(self)):
            first = b * step + self.rank * self.batch_size
            yield b, order[first:first + self.batch_size]


class BatchLoader(EpochBatches):
    """Batches ``(x, y)`` of in-memory tensors, on ``device``.

    The tensors are moved to ``device`` once, so a batch is one indexing op there. Every batch goes
    through ``transform`` (e.g. uint8 → normalised floats), then ``augment`` with the batch's own
    generator; give ``augment`` to training loaders only.

    Args:
        x, y: inputs and labels, one row per sample.
        batch_size: samples per batch (per rank, when sharded).
        shuffle: a fresh random order every epoch; else the stored order.
        drop_last: leave out the last batch when it is smaller than ``batch_size``.
        augment: ``augment(x_batch, generator) -> x_batch``.
        transform: ``transform(x_batch) -> x_batch``.
        seed: the seed of the order and of the augmentation.
        device: where the batches are.
        shard: ``(rank, world)``: yield this rank's share of every global batch (see ``EpochBatches``).
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, *, shuffle: bool = True, drop_last: bool = False,
                 augment: Optional[Augment] = None, transform: Optional[Transform] = None, seed: int = 0,
                 device: Union[str, torch.device] = "cpu", shard: Tuple[int, int] = (0, 1)) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}: they must match")
        super().__init__(len(y), batch_size, shuffle, drop_last, seed, shard)
        self.device = torch.device(device)
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.augment, self.transform = augment, transform

    def _batches(self, start_batch: int) -> Iterator[Batch]:
        for b, index in self._indices(start_batch, self.device):
            x, y = self.x[index], self.y[index]
            if self.transform is not None:
                x = self.transform(x)
            if self.augment is not None:
                x = self.augment(x, generator_for(self.seed, self.epoch, b, self.rank))
            yield x, y
