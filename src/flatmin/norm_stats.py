"""Freezing normalisation running statistics for the passes that must not update them.

Which pass may update BatchNorm's running mean and variance is part of each method
(docs/algorithms.md, "Normalisation statistics"): the clean pass of m-(A)RWP and SAM's first pass
do; perturbed or adversarial passes that run in addition to a clean one do not, so the running
statistics describe the unperturbed weights.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm


@contextmanager
def frozen_norm_stats(model: Optional[nn.Module]) -> Iterator[None]:
    """Inside the block, normalisation layers of ``model`` normalise with batch statistics as usual
    in training mode, but their running statistics (and ``num_batches_tracked``) stay unchanged.

    BatchNorm layers (SyncBatchNorm included) are switched to ``track_running_stats=False`` for the
    block, which skips the update exactly; InstanceNorm layers that track statistics update them
    unconditionally in training mode, so their buffers are saved and copied back. ``None`` is a no-op.

    ```python
    with flatmin.frozen_norm_stats(model):
        loss = F.cross_entropy(model(x2), y2)   # batch statistics, running statistics untouched
    ```

    Args:
        model: the model whose normalisation layers to freeze, or ``None``.

    Returns:
        A context manager; on leaving it (also by an exception) the layers are as before.
    """
    if model is None:
        yield
        return
    untracked = []
    saved = []
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            untracked.append(module)
        elif isinstance(module, _InstanceNorm) and module.track_running_stats:
            saved.append((module, {k: b.clone() for k, b in module.named_buffers(recurse=False)}))
    for module in untracked:
        module.track_running_stats = False
    try:
        yield
    finally:
        for module in untracked:
            module.track_running_stats = True
        for module, buffers in saved:
            for name, value in buffers.items():
                getattr(module, name).copy_(value)
