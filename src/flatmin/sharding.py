"""Parameters sharded along dim 0 across processes: PyTorch's FSDP2 (``fully_shard``) makes every
parameter a DTensor whose rank-local shard is a block of consecutive rows (slices along dim 0,
the last shard possibly short or empty). A filter therefore lies whole on one rank, and a shard is
one contiguous range of the tensor's flattened values, which is what lets the methods draw the
noise of the full tensor and keep the local part of it.

Everything here is the identity for ordinary tensors, so the methods call it unconditionally.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

# torch's DTensor machinery takes about half a second to import, and a DTensor can only exist once it
# has been imported (by fully_shard or the user): it is looked up here, never imported for plain tensors.
DTENSOR_MODULE = "torch.distributed.tensor"


def _dtensor() -> Any:
    """``torch.distributed.tensor`` if something has imported it, else ``None``."""
    return sys.modules.get(DTENSOR_MODULE)


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (its values spread over several processes)."""
    module = _dtensor()
    return module is not None and isinstance(t, module.DTensor)


def local(t: Tensor) -> Tensor:
    """The values this process holds: a DTensor's local shard (sharing its memory), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def _check_placements(t: Tensor) -> None:
    from torch.distributed.tensor import Replicate, Shard

    for placement in t.placements:
        if not (isinstance(placement, Replicate) or (isinstance(placement, Shard) and placement.dim == 0)):
            raise ValueError(
                f"a parameter of shape {tuple(t.shape)} has placements {t.placements}: flatmin supports "
                "DTensors sharded along dim 0 (FSDP2's fully_shard) or replicated, not other shardings"
            )


def local_range(t: Tensor) -> Tuple[int, int]:
    """Where this process's values of ``t`` lie in ``t.flatten()``: ``(start, stop)``."""
    if not is_sharded(t):
        return 0, t.numel()
    _check_placements(t)
    if t.ndim == 0:
        return 0, 1
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    row = math.prod(t.shape[1:])
    return offset[0] * row, (offset[0] + shape[0]) * row


def shard_group(t: Tensor) -> Optional[torch.distributed.ProcessGroup]:
    """The process group over which ``t``'s rows are split (``None`` if they are not split)."""
    if not is_sharded(t):
        return None
    _check_placements(t)
    from torch.distributed.tensor import Shard

    dims = [i for i, placement in enumerate(t.placements) if isinstance(placement, Shard)]
    if not dims:
        return None
    if len(dims) > 1:
        raise ValueError(f"a parameter of shape {tuple(t.shape)} is sharded along dim 0 over several mesh "
                         f"dimensions ({t.placements}); flatmin supports one")
    return t.device_mesh.get_group(dims[0])


def sum_over_shards(values: Sequence[Tensor], owners: Sequence[Tensor]) -> None:
    """``values[i] ← Σ over the processes that share owners[i]'s rows of values[i]``, in place; one
    all-reduce per process group (``values`` of unsplit owners are left as they are)."""
    by_group: Dict[object, List[int]] = {}
    for i, owner in enumerate(owners):
        group = shard_group(owner)
        if group is not None:
            by_group.setdefault(group, []).append(i)
    for group, indices in by_group.items():
        flat = torch.stack([values[i].reshape(()) for i in indices])
        torch.distributed.all_reduce(flat, group=group)
        for i, total in zip(indices, flat):
            values[i].copy_(total)


def sharded_like(values: Tensor, owner: Tensor) -> Tensor:
    """``values`` (this process's part of a per-row statistic of ``owner``) as a DTensor laid out like
    ``owner`` along dim 0, or ``values`` itself when ``owner`` is not a DTensor."""
    if not is_sharded(owner):
        return values
    shape = (owner.shape[0],) if owner.ndim >= 2 else tuple(owner.shape)
    return _dtensor().DTensor.from_local(values, owner.device_mesh, owner.placements, run_check=False, shape=shape,
                                         stride=tuple(torch.empty(shape, device="meta").stride()))


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered weights of every FSDP2 module of ``model``, so that its next forward gathers
    the shards anew (after they were changed in place)."""
    if _dtensor() is None:  # nothing was sharded
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
