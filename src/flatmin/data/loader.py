"""Fast, resumable batching of in-memory tensors.

The order of epoch ``e`` and the augmentation of its batch ``b`` come from generators seeded by
``(seed, e)`` and ``(seed, e, b)`` alone, so a run resumed at any epoch (or batch) sees exactly
the batches an uninterrupted run would.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

from .dataset import Augment


def _seeded(*parts: int) -> torch.Generator:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


class BatchLoader:
    """Batches of ``(x, y)`` on ``device``.

    Args:
        shard: ``(rank, world)`` for data parallelism: every global batch holds ``world`` per-rank
            batches of ``batch_size`` and this loader yields the ``rank``-th of each.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, *, shuffle: bool = True, drop_last: bool = False,
                 augment: Optional[Augment] = None, transform: Optional[Callable[[Tensor], Tensor]] = None,
                 seed: int = 0, device: Union[torch.device, str] = "cpu", shard: Tuple[int, int] = (0, 1)) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is not allowed: it must be >= 1")
        self.device = torch.device(device)
        # Keep the whole set on the training device: a batch is then one indexing op there.
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.batch_size = batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.augment, self.transform = augment, transform
        self.seed = seed
        self.rank, self.world = shard
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        global_batch = self.batch_size * self.world
        n = len(self.y)
        return n // global_batch if self.drop_last or self.world > 1 else -(-n // global_batch)

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[Tuple[Tensor, Tensor]]:
        """The batches of the current epoch from ``start_batch`` on."""
        n = len(self.y)
        order = (torch.randperm(n, generator=_seeded(self.seed, self.epoch)) if self.shuffle
                 else torch.arange(n)).to(self.device)
        global_batch = self.batch_size * self.world
        for b in range(start_batch, len(self)):
            first = b * global_batch + self.rank * self.batch_size
            index = order[first:min(first + self.batch_size, n)]
            x, y = self.x[index], self.y[index]
            if self.transform is not None:
                x = self.transform(x)
            if self.augment is not None:
                x = self.augment(x, _seeded(self.seed, self.epoch, b, self.rank))
            yield x, y
