"""Collectives over many tensors at once, in flat buckets."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _take_tensors, _unflatten_dense_tensors

Collective = Callable[[Tensor], Any]  # takes a flat buffer, returns the async work handle
BUCKET_BYTES = 25 * 2**20


def coalesced(tensors: Sequence[Tensor], collective: Collective, bucket_bytes: int) -> None:
    """Run ``collective`` on flat buckets of ``tensors`` (one dtype each) and copy the results back.

    All buckets are issued before the first wait, so their transfers overlap.
    """
    in_flight = []
    for bucket in _take_tensors(tensors, bucket_bytes):
        flat = _flatten_dense_tensors(bucket)
        in_flight.append((collective(flat), flat, bucket))
    for work, flat, bucket in in_flight:
        work.wait()
        torch._foreach_copy_(bucket, _unflatten_dense_tensors(flat, bucket))


@torch.no_grad()
def average_gradients(params: Iterable[Tensor], bucket_bytes: int = BUCKET_BYTES) -> None:
    """``.grad ← mean over workers of .grad`` for every tensor (a missing gradient counts as zeros,
    so every worker sends the same tensors). A collective: every rank calls it.

    Args:
        params: the tensors whose ``.grad`` to average (those without ``requires_grad`` are skipped).
        bucket_bytes: the size cap of one flat all-reduce buffer, in bytes.
    """
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    coalesced(grads, lambda flat: dist.all_reduce(flat, async_op=True), bucket_bytes)
    torch._foreach_div_(grads, float(dist.get_world_size()))


@torch.no_grad()
def broadcast_buffers(model: nn.Module, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Rank 0's buffers (running statistics) on every worker. A collective: every rank calls it.

    Args:
        model: the model whose buffers to broadcast from rank 0.
        bucket_bytes: the size cap of one flat broadcast buffer, in bytes.
    """
    buffers = list(model.buffers())
    if buffers:
        coalesced(buffers, lambda flat: dist.broadcast(flat, src=0, async_op=True), bucket_bytes)
